"""Entry point: compose the config, run the selected task, return the metric a sweep optimises.

    python run.py                                  # the built-in demo
    python run.py experiment=<name> key=value ...  # any recipe, any override
    python run.py -m hparams_search=lr_grid        # a sweep
    python run.py resume=outputs/runs/<run>        # continue a run from its directory
"""
import hydra
from omegaconf import DictConfig

from opensora.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from opensora.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
