"""Train a W2T model on a LoRA collection: python train.py experiment=classification|performance|retrieval"""
import hydra
from omegaconf import DictConfig

import w2t.train  # noqa: F401  registers the configs' resolvers before Hydra composes


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from w2t.train.console import report_errors  # imported here so `--help` and `--cfg job` stay fast
    from w2t.train.run import train

    return report_errors(train, cfg)  # the monitored metric, for hyperparameter sweepers


if __name__ == "__main__":
    main()
