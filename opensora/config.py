"""Typed schemas for the cross-cutting config sections and the resolvers the configs use."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class PrecisionConfig:
    """Numeric precision of the trained model. fp32 is the only mode so far."""

    dtype: str = "fp32"
    loss_scale: Optional[str] = None


@dataclass
class ParallelConfig:
    """How processes and devices are used. `single`: one process, one device."""

    mode: str = "single"
    device_target: str = "CPU"
    jit_level: str = "O0"


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
