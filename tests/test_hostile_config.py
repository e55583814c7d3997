"""Hostile configuration: every value that cannot be right is refused at the boundary, as the user runs the
command (`python train.py KEY=VALUE`, `python eval.py ...`): exit status 2, one `error:` message naming the key,
the value and what is allowed, no traceback, and nothing built or written.

The commands run in this process (runpy of train.py / eval.py as `__main__`, so through Hydra and the command's
own error reporting exactly as from a shell): an interpreter per case would cost 5 s of imports each. The
subprocess runs of tests/test_hostile_outputs.py show the exit status and stderr a shell sees.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_script


def run_command(script: str, args: list[str], tmp_path) -> tuple[int, str]:
    """`python <script> args...` in this process: (exit status, stderr)."""
    return run_script(script, [f"hydra.run.dir={tmp_path / 'run'}", "logger=none", *args],
                      env={"CAPTIONER_ROOT": str(tmp_path / "root")})


def assert_refused(status: int, err: str, *named: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    assert err.count("error:") == 1 and err.startswith("error:"), err
    for text in named:
        assert text in err, (text, err)


# (overrides, what the message must name): the cases of issue 17 and their kin.
TRAIN_CASES = {
    "beam_size_0": (["decode.beam_size=0"], ["decode.beam_size=0", "an integer >= 1"]),
    "beam_size_negative": (["decode.beam_size=-1"], ["decode.beam_size=-1", "an integer >= 1"]),
    "beam_size_not_a_number": (["decode.beam_size=abc"], ["decode.beam_size='abc'", "an integer"]),
    "max_len_0": (["decode.max_len=0"], ["decode.max_len=0", "an integer >= 1"]),
    "min_len_over_max_len": (["decode.min_len=40"], ["decode.min_len=40", "decode.max_len=30"]),
    "misspelled_added_decode_key": (["+decode.beam_sise=3"], ["decode.beam_sise", "did you mean decode.beam_size"]),
    "batch_size_0": (["loader.batch_size=0"], ["loader.batch_size=0", "an integer >= 1"]),
    "max_length_0": (["text.max_length=0"], ["text.max_length=0", "an integer >= 1"]),
    "min_word_count_0": (["text.min_word_count=0"], ["text.min_word_count=0"]),
    "max_epochs_negative": (["trainer.max_epochs=-1"], ["trainer.max_epochs=-1", "an integer >= 1"]),
    "lr_negative": (["optimizer.lr=-1"], ["optimizer.lr=-1", ">= 0"]),
    "lr_zero": (["optimizer.lr=0"], ["optimizer.lr=0", "> 0"]),
    "two_bad_values_at_once": (["trainer.max_epochs=0", "optimizer.lr=-1"],
                               ["2 values", "trainer.max_epochs=0", "optimizer.lr=-1"]),
    "num_train_0": (["data.num_train=0"], ["data.num_train=0", "an integer >= 1"]),
    "seed_negative": (["seed=-1"], ["seed=-1"]),
    "dropout_1": (["decoder.dropout=1.0"], ["decoder.dropout=1.0", "[0, 1)"]),
    "misspelled_added_top_level_key": (["+label_smothing=0.1"], ["label_smothing", "did you mean label_smoothing"]),
    "misspelled_trainer_key": (["+trainer.max_epoch=3"], ["trainer.max_epoch", "did you mean trainer.max_epochs"]),
    "misspelled_reader_key": (["experiment=flickr8k", "+data.reader.token_fil=x"],
                              ["data.reader.token_fil", "did you mean data.reader.token_file"]),
    "heads_not_dividing": (["model=dino_attention", "attention.num_heads=3"],
                           ["decoder.d_model=256", "attention.num_heads=3"]),
    "unknown_resize": (["encoder.resize=stretch"], ["encoder.resize='stretch'", "squash | crop | pad"]),
    "unknown_tokenizer": (["metrics.tokenizer=nltk"], ["metrics.tokenizer='nltk'", "auto | java | python"]),
    "warmup_fraction_1": (["scheduler.warmup_fraction=1"], ["scheduler.warmup_fraction=1", "[0, 1)"]),
    "resume_last_without_last_ckpt": (["ckpt_path=last"], ["ckpt_path=last", "last.ckpt", "drop ckpt_path"]),
    "resume_from_url": (["ckpt_path=http://127.0.0.1:9/x.ckpt"], ["http://127.0.0.1:9/x.ckpt", "local files only"]),
    "resume_missing_file": (["ckpt_path=/nowhere/x.ckpt"], ["/nowhere/x.ckpt", "not found"]),
    "hydra_unknown_key": (["decode.beam_sise=3"], ["decode.beam_sise"]),
    "hydra_unknown_group_option": (["model=dino_gru"], ["model/dino_gru", "dino_lstm"]),
    "unresolvable_interpolation": (["data.root=${oc.env:CAPTIONER_NO_SUCH_VARIABLE}"],
                                   ["data", "CAPTIONER_NO_SUCH_VARIABLE"]),
}
if not torch.cuda.is_available():
    TRAIN_CASES["cuda_without_gpu"] = (["features.device=cuda"], ["features.device=cuda", "no CUDA GPU"])


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_a_value_that_cannot_work(case, tmp_path):
    overrides, named = TRAIN_CASES[case]
    status, err = run_command("train.py", overrides, tmp_path)
    assert_refused(status, err, *named)
    # Refused before anything was built: no dataset, no cache, no checkpoint.
    assert not (tmp_path / "root").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


EVAL_CASES = {
    "split_train": (["split=train"], ["split='train'", "val | test"]),
    "beam_size_0": (["decode.beam_size=0"], ["decode.beam_size=0"]),
    "overwrite_not_a_flag": (["overwrite=maybe"], ["overwrite='maybe'", "true or false"]),
    "no_checkpoint": ([], ["ckpt_path=PATH"]),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_refuses_a_value_that_cannot_work(case, tmp_path):
    overrides, named = EVAL_CASES[case]
    ckpt = [] if case == "no_checkpoint" else [f"ckpt_path={tmp_path / 'model.ckpt'}"]
    status, err = run_command("eval.py", ckpt + overrides, tmp_path)
    assert_refused(status, err, *named)
    assert not (tmp_path / "root").exists()


def test_the_default_configs_pass_the_schema():
    """The schema refuses only what cannot work: every shipped model, experiment and data config passes."""
    from captioner.config import compose
    from captioner.schema import check_config

    for overrides in (["model=" + m for m in ("resnet_rnn", "dino_rnn", "dino_lstm", "dino_lstm_init",
                                               "dino_attention", "dino_sat")]
                      + ["experiment=flickr8k", "experiment=flickr30k", "experiment=coco", "trainer=ddp_cpu",
                         "data=csv experiment=none", "data=flickr8k_csv experiment=none",
                         "data=karpathy experiment=none", "data=coco experiment=none"]):
        check_config(compose(overrides.split()))
    check_config(compose(["ckpt_path=x.ckpt"], config_name="eval"), task="eval")


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_run_directory_in_use_is_refused(script, tmp_path):
    """Two commands at once in one run directory (a second `train.py hydra.run.dir=<same>`, an `eval.py` into a
    run still training) would mix their checkpoints and results: the second is refused while the first holds it."""
    from captioner.files import exclusive_use

    run = tmp_path / "run"
    run.mkdir()
    (run / ".in_use.lock").symlink_to(tmp_path / "elsewhere")  # a planted link is replaced, never followed
    with exclusive_use(run, "train.py"):
        status, err = run_command(script, [f"ckpt_path={tmp_path / 'model.ckpt'}"] if script == "eval.py" else [],
                                  tmp_path)
    assert_refused(status, err, str(run), "in use by train.py (pid")
    assert not (tmp_path / "elsewhere").exists()
