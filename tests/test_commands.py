"""The data commands as a user runs them: python -m captioner.inspect / captioner.prepare with Hydra overrides."""

from conftest import run_here

SMALL = ["data.num_train=30", "data.num_val=10", "data.num_test=10"]


def run(module, *args, root):
    return run_here(["-m", module, *args], root)


def test_inspect_shapes_reports_splits_vocab_lengths_and_agreement(tmp_path):
    r = run("captioner.inspect", *SMALL, root=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "train" in out and "30" in out and "vocabulary:" in out and "p50=" in out
    assert "reference agreement BLEU-4" in out
    assert (tmp_path / "data" / "shapes").is_dir()


def test_prepare_builds_cache_and_second_run_reuses_it(tmp_path):
    r = run("captioner.prepare", "data=shapes", "encoder=efficientnet_lite0", *SMALL, "features.num_workers=0",
            root=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ready: efficientnet_lite0 (package)" in r.stdout
    caches = sorted(p for p in (tmp_path / "data" / "cache").iterdir() if p.is_dir())  # (and <key>.lock files)
    assert len(caches) == 3 and all((c / "global.npy").exists() for c in caches)
    again = run("captioner.prepare", *SMALL, root=tmp_path)
    assert again.returncode == 0 and sorted(p for p in (tmp_path / "data" / "cache").iterdir() if p.is_dir()) == caches


def test_wrong_dataset_root_is_one_clear_error(tmp_path):
    r = run("captioner.inspect", "data=flickr8k", f"data.root={tmp_path}/nowhere", root=tmp_path)
    assert r.returncode == 2
    assert f"{tmp_path}/nowhere" in r.stderr and "Flickr8k.token.txt" in r.stderr
    assert "Traceback" not in r.stderr
