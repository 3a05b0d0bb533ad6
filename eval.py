"""Test a trained checkpoint: python eval.py ckpt_path=<run>/checkpoints/best.ckpt [data=collection data.root=DIR]"""
import hydra
from omegaconf import DictConfig

import w2t.train  # noqa: F401  registers the configs' resolvers before Hydra composes


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from w2t.train.console import report_errors
    from w2t.train.run import evaluate

    return report_errors(evaluate, cfg)


if __name__ == "__main__":
    main()
