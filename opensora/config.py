"""Typed schemas for the cross-cutting config sections and the resolvers the configs use."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class PrecisionConfig:
    """Numeric precision of the diffusion model.

    dtype: compute dtype of its matmuls/activations (fp32, fp16, bf16); parameters, LayerNorm,
    softmax, embeddings and the loss stay fp32. loss_scale: null, `dynamic` (start at
    loss_scale_value, multiply by loss_scale_factor after loss_scale_window finite steps, divide on
    an overflow and skip that step) or `static` (fixed loss_scale_value; overflow steps skipped).
    """

    dtype: str = "fp32"
    loss_scale: Optional[str] = None
    loss_scale_value: float = 65536.0
    loss_scale_factor: int = 2
    loss_scale_window: int = 2000


@dataclass
class ParallelConfig:
    """How processes and devices are used. `single`: one process, one device; `data`: data parallel
    over the ranks msrun starts (gradients averaged with AllReduce, one data shard per rank); `zero`:
    `data` with the optimizer state (AdamW moments, EMA) sharded over the ranks (opensora/parallel/zero.py);
    `sequence`: each video's frames split over groups of `sequence_size` ranks (null: all of them),
    data parallel across the groups; `sequence_attention` is how the temporal attention sees all
    frames: `ulysses` (all-to-all from frames to heads), `allgather` (keys/values gathered) or `auto`
    (ulysses on Ascend, allgather elsewhere). See opensora/parallel/sequence.py."""

    mode: str = "single"
    device_target: str = "CPU"
    jit_level: str = "O0"
    # MindSpore's memory_optimize_level: O0 or O1 (reuse of intermediate buffers)
    memory_optimize_level: str = "O0"
    sequence_size: Optional[int] = None
    sequence_attention: str = "auto"
    # Under msrun: how long a rank waits for the others where one can be far behind (rank-0-only
    # checkpoint writing and evaluation, graph compilation); CPU collectives themselves give up after 30 s.
    sync_timeout_s: float = 1800.0


PRECISION_DTYPES = ("fp32", "fp16", "bf16")
LOSS_SCALES = (None, "dynamic", "static")
PARALLEL_MODES = ("single", "data", "zero", "sequence")


def check_precision(precision: Any, training: bool = True) -> None:
    """Fail early, naming the settings, on a precision config that cannot work."""
    dtype, scale = precision.dtype, precision.get("loss_scale")
    if dtype not in PRECISION_DTYPES:
        raise ValueError(f"precision.dtype={dtype!r} is not one of: {', '.join(PRECISION_DTYPES)}")
    if scale not in LOSS_SCALES:
        raise ValueError(f"precision.loss_scale={scale!r} is not one of: null, dynamic, static")
    if training and dtype == "fp16" and scale is None:
        raise ValueError("precision.dtype=fp16 needs a loss scale, but precision.loss_scale=null: fp16 gradients "
                         "underflow without one. Use precision=fp16 (dynamic) or set precision.loss_scale=dynamic "
                         "or static")
    if scale is not None:
        if float(precision.loss_scale_value) < 1:
            raise ValueError(f"precision.loss_scale_value={precision.loss_scale_value} must be >= 1")
        if scale == "dynamic" and (int(precision.loss_scale_factor) < 2 or int(precision.loss_scale_window) < 1):
            raise ValueError(f"precision.loss_scale=dynamic needs loss_scale_factor >= 2 and loss_scale_window >= 1, "
                             f"got {precision.loss_scale_factor} and {precision.loss_scale_window}")


def check_sigma(cfg: Any) -> None:
    """model.pred_sigma (2C output channels) and scheduler.learn_sigma (the loss/sampler reads them)
    must agree; fail early naming both."""
    model, scheduler = cfg.get("model"), cfg.get("scheduler")
    if not model or not scheduler or "pred_sigma" not in model or "learn_sigma" not in scheduler:
        return
    if bool(model.pred_sigma) != bool(scheduler.learn_sigma):
        raise ValueError(f"model.pred_sigma={model.pred_sigma} but scheduler.learn_sigma={scheduler.learn_sigma}: a "
                         "model that predicts its variance needs a scheduler that learns it, and vice versa; set "
                         "both to true (the original) or both to false")


def check_parallel(parallel: Any) -> None:
    if parallel.mode not in PARALLEL_MODES:
        raise ValueError(f"parallel.mode={parallel.mode!r} is not one of: {', '.join(PARALLEL_MODES)}")


_LAUNCH_TIME: list = []


def launch_time(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """The job's start time, formatted: the same on every rank of an msrun job (the start time of the
    msrun process that spawned them all), so all ranks share one run directory; else this process's
    first call. On several nodes pass hydra.run.dir explicitly instead."""
    if not _LAUNCH_TIME:
        t = time.time()
        if os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED"):  # spawned by msrun (ranks and scheduler)
            try:
                import psutil

                t = psutil.Process(os.getppid()).create_time()
            except Exception:  # noqa: BLE001 - fall back to this process's time
                pass
        _LAUNCH_TIME.append(t)
    return time.strftime(fmt, time.localtime(_LAUNCH_TIME[0]))


def sweep_name() -> Optional[str]:
    """In a multirun job, the sweep directory's name (used as the W&B group); else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return None


def latent_size(num_frames: int, image_size: Any, downsample: Any) -> list[int]:
    """[T, H, W] of the latent video for a clip of `num_frames` x `image_size` pixels."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    dt, dh, dw = (1, downsample, downsample) if isinstance(downsample, int) else tuple(downsample)
    for name, size, factor in (("height", h, dh), ("width", w, dw), ("frames", num_frames, dt)):
        if size % factor:
            raise ValueError(f"data {name} {size} is not divisible by the VAE downsample factor {factor}")
    return [num_frames // dt, h // dh, w // dw]


def hf_config_value(folder: str, key: str) -> Any:
    """`key` from `<folder>/config.json` (a Hugging Face model folder), for use in configs."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: text_encoder.from_pretrained must be a folder "
                                "with config.json, spiece.model and the weights")
    config = json.loads(path.read_text())
    if key not in config:
        raise KeyError(f"{path} has no {key!r}")
    return config[key]


def _as_list(x: Any) -> Any:
    return list(x) if isinstance(x, Sequence) and not isinstance(x, str) else x


def register_configs() -> None:
    """Register schemas and resolvers (idempotent). Called by run.py and the tests."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="precision", node=PrecisionConfig)
    cs.store(group="schema", name="parallel", node=ParallelConfig)
    if not OmegaConf.has_resolver("latent_size"):
        OmegaConf.register_new_resolver(
            "latent_size", lambda t, s, d: latent_size(int(t), _as_list(s), _as_list(d))
        )
    if not OmegaConf.has_resolver("hf_config"):
        OmegaConf.register_new_resolver("hf_config", hf_config_value)
    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", lambda value, default: default if value is None else value)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time)
    if not OmegaConf.has_resolver("sweep_name"):
        OmegaConf.register_new_resolver("sweep_name", sweep_name)
