"""Train a learned pruning head (or the tiny backbone) with Hydra + Lightning.

    python train.py module=backbone                         # the embedded default backbone
    python train.py module=backbone trainer.fast_dev_run=true
    python train.py module=backbone ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume
"""

import hydra
from omegaconf import DictConfig

from learned_prune.run import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
