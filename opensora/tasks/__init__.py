"""Tasks: what `run.py` does with a composed config (train, sample, ...), chosen by `task=`."""
from __future__ import annotations

import logging
import random

import numpy as np
from hydra.utils import get_method
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def setup_runtime(cfg: DictConfig) -> None:
    """Seed every RNG and set up MindSpore (graph mode: the whole train step is compiled)."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target=cfg.parallel.device_target,
                   jit_config={"jit_level": cfg.parallel.jit_level})
    ms.set_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    random.seed(int(cfg.seed))


def run_task(cfg: DictConfig) -> float:
    """Run `cfg.task._target_(cfg)` and return its metric as a float (for sweeps)."""
    setup_runtime(cfg)
    task = get_method(cfg.task._target_)
    metric = task(cfg)
    return float(metric) if metric is not None else float("nan")
