"""Entry point: compose the config, seed, run the selected task, return its metric.

    python run.py                                  # the built-in demo
    python run.py experiment=<name> key=value ...  # any recipe, any override
    python run.py -m optim.lr=1e-4,3e-4            # a sweep
"""
import hydra
from omegaconf import DictConfig

from opensora.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from opensora.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
