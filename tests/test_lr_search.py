"""The learning-rate search's summary: each variant's rate chosen on validation BLEU-4, never on test scores."""

import json
from pathlib import Path

import pytest

from captioner.report.lr_search import choose, main, read_search


def _run(sweep, job, model, variant, lr, val, test, seed=0):
    d = sweep / str(job)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nmodel:\n  name: {model}\n  variant: {variant}\noptimizer:\n  lr: {lr}\n")
    (d / "metrics.json").write_text(json.dumps({"model": model, "best_val_bleu_4": val, "best_epoch": 3,
                                                "test": {"bleu_4": test}}))


@pytest.fixture
def sweep(tmp_path):
    # b's test score would pick 1e-3; its validation score picks 3e-4. a's best rate is at the grid's top.
    rows = [("b", 2, 3e-4, 0.50, 0.40), ("b", 2, 1e-3, 0.45, 0.60), ("b", 2, 3e-3, 0.30, 0.30),
            ("a", 1, 3e-4, 0.20, 0.20), ("a", 1, 1e-3, 0.25, 0.25), ("a", 1, 3e-3, 0.31, 0.10)]
    for job, row in enumerate(rows):
        _run(tmp_path, job, *row)
    (tmp_path / "9").mkdir()  # an unfinished run: no metrics.json yet
    return tmp_path


def test_the_rate_is_chosen_on_validation_never_on_test(sweep):
    rows = choose(read_search(sweep))
    assert [r["model"] for r in rows] == ["a", "b"]  # variant order
    assert rows[1]["chosen_lr"] == 3e-4 and rows[1]["val_bleu_4"] == {3e-4: 0.50, 1e-3: 0.45, 3e-3: 0.30}
    assert rows[0]["chosen_lr"] == 3e-3 and rows[0]["at_grid_edge"]


def test_seeds_are_averaged_and_ties_go_to_the_smaller_rate(tmp_path):
    _run(tmp_path, 0, "a", 1, 1e-3, 0.2, 0.0, seed=0)
    _run(tmp_path, 1, "a", 1, 1e-3, 0.4, 0.0, seed=1)
    _run(tmp_path, 2, "a", 1, 3e-4, 0.3, 0.9)
    [row] = choose(read_search(tmp_path))
    assert row["val_bleu_4"][1e-3] == pytest.approx(0.3) and row["chosen_lr"] == 3e-4


def test_the_cli_writes_markdown_and_json(sweep, capsys):
    assert main([str(sweep)]) == 0
    text = (sweep / "lr_search.md").read_text()
    assert "| b | **0.500** | 0.450 | 0.300 | 0.0003 (grid edge) |" in text
    assert json.loads((sweep / "lr_search.json").read_text())["choices"][1]["chosen_lr"] == 3e-4
    assert text in capsys.readouterr().out


def test_an_empty_or_foreign_directory_is_one_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text("{}")
    assert main([str(tmp_path)]) == 2
    assert ".hydra/config.yaml: missing" in capsys.readouterr().err


def test_every_variant_trains_at_the_rate_its_recorded_search_chose():
    """The configs' learning rates are the search's choices (experiments/results/lr_search.json), one per variant:
    no variant runs an untuned default, and none was tuned apart from the others."""
    from captioner.config import compose, variants

    recorded = json.loads((Path(__file__).resolve().parents[1] / "experiments" / "results" / "lr_search.json").read_text())
    chosen = {row["model"]: row["chosen_lr"] for row in recorded["choices"]}
    assert set(chosen) == set(variants()), "re-run `make search` after adding a variant"
    grids = {tuple(sorted(row["val_bleu_4"])) for row in recorded["choices"]}
    assert len(grids) == 1, "every variant searched over the same grid"
    for model in variants():
        assert compose([f"model={model}"]).optimizer.lr == pytest.approx(chosen[model]), model
