"""Train and test one captioner: `python train.py model=dino_lstm_init`, or all five:
`python train.py -m model=resnet_rnn,dino_rnn,dino_lstm,dino_lstm_init,dino_attention`.
A thin wrapper: the configuration lives in conf/ next to this file, the work in captioner.training."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from captioner.errors import user_errors_reported
    from captioner.training import train

    with user_errors_reported():  # bad input: one message and exit status 2, no traceback
        return train(cfg)


if __name__ == "__main__":
    from captioner.errors import exit_on_user_error

    exit_on_user_error(main)  # Hydra's own errors (an unknown key, a missing config group) likewise
