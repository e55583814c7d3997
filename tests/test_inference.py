"""Using a trained checkpoint as a user does: `eval.py`, `captioner-caption` (with attention maps), and loading
checkpoints as data only (a pickle payload is refused, never run)."""

import json
import os

import pytest
import torch
from PIL import Image

from conftest import run_here, run_script

TINY = ["debug=tiny"]


@pytest.fixture(scope="module")
def attention_run(tiny_attention_run):
    return tiny_attention_run


def _best(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]


def test_eval_reproduces_the_training_test_metrics_and_runs_beam_search(attention_run):
    root, run_dir = attention_run
    train_metrics = json.loads((run_dir / "metrics.json").read_text())
    out = root / "eval-greedy"
    # the same precision as the training run (model=dino_attention trains with bf16 autocast)
    r = run_here(["eval.py", f"ckpt_path={_best(run_dir)}", *TINY, "trainer.precision=bf16-mixed",
              f"hydra.run.dir={out}"], root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    # the same checkpoint, data and greedy decoding as the test at the end of training: the same numbers
    for key in ("bleu_4", "cider", "rouge_l", "object_accuracy"):
        assert m["test"][key] == pytest.approx(train_metrics["test"][key], abs=1e-9), key
    assert m["images"] == 10 and m["decode"]["beam_size"] == 1 and m["encoder"] == "efficientnet_lite0"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 10

    beam = root / "eval-beam"
    r = run_here(["eval.py", f"ckpt_path={_best(run_dir)}", *TINY, "decode.beam_size=3", "split=val",
              f"hydra.run.dir={beam}"], root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((beam / "metrics.json").read_text())
    assert m["decode"]["beam_size"] == 3 and m["split"] == "val" and 0 <= m["test"]["bleu_4"] <= 1


def _eval_here(root, args):
    """`python eval.py args...` in this process (no interpreter start): (exit status, stderr)."""
    return run_script("eval.py", [*TINY, *args], env={"CAPTIONER_ROOT": str(root)})


def test_eval_never_overwrites_another_commands_outputs_unless_told(attention_run, tmp_path):
    root, run_dir = attention_run
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.json", "predictions.jsonl")}
    status, err = _eval_here(root, [f"ckpt_path={_best(run_dir)}", f"hydra.run.dir={run_dir}"])
    assert status == 2 and "overwrite=true" in err and "hydra.run.dir" in err
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    out = tmp_path / "eval"
    for _ in range(2):  # a second evaluation into its own earlier dir needs the same consent
        status, err = _eval_here(root, [f"ckpt_path={_best(run_dir)}", "overwrite=true", f"hydra.run.dir={out}"])
        assert status == 0, err[-3000:]
    assert json.loads((out / "metrics.json").read_text())["images"] == 10


def test_eval_refuses_an_encoder_the_checkpoint_was_not_trained_on(attention_run):
    root, run_dir = attention_run
    status, err = _eval_here(root, [f"ckpt_path={_best(run_dir)}", "encoder=resnet50",
                                    f"hydra.run.dir={root / 'eval-wrong'}"])
    assert status == 2 and "Traceback" not in err
    assert "efficientnet_lite0" in err and "resnet50" in err
    assert not (root / "eval-wrong" / "metrics.json").exists()


def test_caption_command_skips_a_broken_file_and_writes_attention_maps(attention_run, tmp_path):
    root, run_dir = attention_run
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    Image.new("RGBA", (64, 40), (255, 0, 0, 128)).save(images / "alpha.png")
    Image.new("L", (333, 200), 90).save(images / "nested" / "gray.webp")
    Image.new("RGB", (1, 1), (0, 0, 255)).save(images / "tiny.jpg")
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    maps = tmp_path / "maps"
    r = run_here(["-m", "captioner.caption", "--ckpt", _best(run_dir), str(images), "--json", "--beam-size", "2",
              "--attention-maps", str(maps)], root)
    assert r.returncode == 1, r.stderr[-3000:]  # 1: some files skipped, the rest captioned
    assert "broken.jpg" in r.stderr and "not a readable image" in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(os.path.basename(x["file"]) for x in rows) == ["alpha.png", "gray.webp", "tiny.jpg"]
    for row in rows:
        assert isinstance(row["caption"], str) and "<eos>" not in row["caption"]
        with Image.open(row["attention_map"]) as im:
            assert im.format == "PNG" and im.size[0] > 200


def test_caption_command_samples_repeatably_and_blocks_trigrams(attention_run, tmp_path, monkeypatch, capsys):
    """--sample draws other captions for the same image (repeatable with --seed), --block-trigrams keeps every
    caption free of repeated trigrams, and flags that cannot work together are refused before any work. The
    command's main() called directly (`python -m captioner.caption` is run above)."""
    from captioner.caption import main

    root, run_dir = attention_run
    monkeypatch.setenv("CAPTIONER_ROOT", str(root))
    image = tmp_path / "grey.png"
    Image.new("RGB", (224, 224), (120, 120, 120)).save(image)
    ckpt = _best(run_dir)

    def run(*args) -> tuple[int, str, str]:
        status = main(["--ckpt", ckpt, *map(str, args)])
        out = capsys.readouterr()
        return status, out.out, out.err

    def captions(*flags):
        status, out, err = run(*[image] * 6, "--json", *flags)
        assert status == 0, err[-3000:]
        return [json.loads(line)["caption"] for line in out.splitlines()]

    first = captions("--sample", "--seed", "3", "--block-trigrams")
    assert first == captions("--sample", "--seed", "3", "--block-trigrams")  # repeatable
    assert len(set(first)) > 1  # six draws for one image: not one caption six times
    assert len(set(captions())) == 1  # greedy: one caption
    for caption in first:
        words = caption.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        assert len(grams) == len(set(grams)), caption
    status, _, err = run(image, "--temperature", "0.5")
    assert status == 2 and "only apply with --sample" in err
    status, _, err = run(image, "--sample", "--beam-size", "3")
    assert status == 2 and "--sample=true" in err and "--beam-size=3" in err


def test_attention_maps_are_distributions_over_the_grid(attention_run):
    from captioner.caption import ImageCaptioner

    _, run_dir = attention_run
    cap = ImageCaptioner(_best(run_dir), device="cpu")
    image = Image.new("RGB", (224, 224), (120, 120, 120))
    (res,) = cap.caption([image], attention=True)
    assert res["attention"].shape == (len(res["words"]), 7, 7)
    if res["words"]:
        assert res["attention"].reshape(len(res["words"]), -1).sum(axis=1) == pytest.approx(1.0, abs=1e-4)


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_run(tmp_path):
    from captioner.checkpoint import CheckpointError, load_captioner

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling this calls open(marker, "w"): it would create the file
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_captioner(evil)
    assert not marker.exists()
    # the same file loaded the unsafe way really would have run the payload: the test's payload is real
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_caption_command_explains_a_missing_checkpoint(tmp_path):
    r = run_here(["-m", "captioner.caption", "--ckpt", str(tmp_path / "nope.ckpt"), str(tmp_path)], tmp_path)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_a_diverging_training_stops_with_a_message_naming_the_step(tiny_root, tmp_path):
    # lr=1e30: the first AdamW update throws every weight to ~1e30 and the next loss is NaN/inf
    r = run_here(["train.py", *TINY, "optimizer.lr=1e30", "loader.batch_size=8", "trainer.max_epochs=1",
              f"hydra.run.dir={tmp_path / 'run'}"], tiny_root)
    assert r.returncode != 0
    assert "training loss became" in r.stderr and "at step" in r.stderr and "ckpt_path=last" in r.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
