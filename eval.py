"""Evaluate a trained checkpoint on a split with the full metric suite:
`python eval.py ckpt_path=PATH [data=...] [split=val|test] [decode.beam_size=3]`.
A thin wrapper: the configuration lives in conf/eval.yaml, the work in captioner.evaluation."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from captioner.errors import user_errors_reported
    from captioner.evaluation import evaluate

    with user_errors_reported():  # bad input: one message and exit status 2, no traceback
        evaluate(cfg)


if __name__ == "__main__":
    from captioner.errors import exit_on_user_error

    exit_on_user_error(main)  # Hydra's own errors (an unknown key, a missing config group) likewise
