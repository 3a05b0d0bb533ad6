"""Test a trained checkpoint on a collection: python eval.py experiment=... ckpt_path=<run>/checkpoints/best.ckpt"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from w2t.train.run import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main()
