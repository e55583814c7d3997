"""Evaluate a trained checkpoint on a split with the full metric suite:
`python eval.py ckpt_path=PATH [data=...] [split=val|test] [decode.beam_size=3]`.
A thin wrapper: the configuration lives in conf/eval.yaml, the work in captioner.evaluation."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from captioner.evaluation import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
