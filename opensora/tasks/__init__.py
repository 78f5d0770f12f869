"""Tasks: what `run.py` does with a composed config (train, sample, ...), chosen by `task=`."""
from __future__ import annotations

import logging
import random

import numpy as np
from hydra.utils import get_method
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def setup_runtime(cfg: DictConfig) -> None:
    """Check precision/parallel settings, set up MindSpore (graph mode: the whole train step is
    compiled) and the ranks (msrun), and seed every RNG (the same seed on every rank)."""
    import mindspore as ms

    from opensora.config import check_parallel, check_precision
    from opensora.model.precision import check_dtype_supported
    from opensora.parallel import init_parallel, msrun_role, msrun_world_size

    check_parallel(cfg.parallel)
    if cfg.parallel.mode == "sequence":  # before any process group: msrun's scheduler fails alike
        from opensora.parallel.sequence import check_sequence_parallel

        check_sequence_parallel(cfg, msrun_world_size() if msrun_role() else None)
    if cfg.get("precision") is not None:
        check_precision(cfg.precision, training=False)
    ms.set_context(mode=ms.GRAPH_MODE, device_target=cfg.parallel.device_target,
                   jit_config={"jit_level": cfg.parallel.jit_level},
                   memory_optimize_level=cfg.parallel.get("memory_optimize_level", "O0"))
    init_parallel(cfg.parallel)
    if cfg.get("precision") is not None:
        check_dtype_supported(cfg.precision.dtype, cfg.parallel.device_target)
    for part in ("text_encoder", "vae"):  # components with their own dtype setting
        dtype = (cfg.get(part) or {}).get("dtype")
        if dtype in ("fp16", "bf16"):
            check_dtype_supported(dtype, cfg.parallel.device_target, setting=f"{part}.dtype")
    ms.set_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    random.seed(int(cfg.seed))


def run_task(cfg: DictConfig) -> float:
    """Run `cfg.task._target_(cfg)` and return its metric as a float (for sweeps)."""
    setup_runtime(cfg)
    task = get_method(cfg.task._target_)
    metric = task(cfg)
    return float(metric) if metric is not None else float("nan")
