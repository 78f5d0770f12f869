"""The initialisation pass, after the config passed validation (opensora/config/validate.py) and before a task
runs: the device context, the parallel strategy's process groups, the dtype kernels and every RNG's seed."""
from __future__ import annotations

import logging
import random
from typing import Optional

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)

_STRATEGY: list = []


def initialise(cfg: DictConfig):
    """Set MindSpore's context from `cfg.device`, start the parallel strategy (`cfg.parallel`), check that the
    device has kernels for the configured dtypes and seed every RNG (the same seed on every rank). Returns the
    strategy, also available as `get_strategy()`."""
    import mindspore as ms

    from opensora.model.precision import check_dtype_supported

    dev = cfg.device
    context = dict(mode=ms.GRAPH_MODE, device_target=str(dev.target), jit_config={"jit_level": str(dev.jit_level)},
                   memory_optimize_level=str(dev.memory_optimize_level))
    if dev.get("runtime_num_threads"):
        context["runtime_num_threads"] = int(dev.runtime_num_threads)
    ms.set_context(**context)
    strategy = instantiate(cfg.parallel, _convert_="all")
    strategy.start()
    _STRATEGY[:] = [strategy]
    if cfg.get("precision") is not None:
        check_dtype_supported(str(cfg.precision.dtype), str(dev.target))
    for part in ("text_encoder", "vae"):  # components with their own dtype setting
        dtype = (cfg.get(part) or {}).get("dtype")
        if dtype in ("fp16", "bf16"):
            check_dtype_supported(dtype, str(dev.target), setting=f"{part}.dtype")
    ms.set_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    random.seed(int(cfg.seed))
    return strategy


def get_strategy():
    """The parallel strategy `initialise` started (a single-process one before that)."""
    if not _STRATEGY:
        from opensora.parallel.single import SingleProcess

        return SingleProcess()
    return _STRATEGY[0]


def set_strategy(strategy: Optional[object]) -> None:
    """Use `strategy` (tests that run a task without `initialise`)."""
    _STRATEGY[:] = [strategy] if strategy is not None else []
