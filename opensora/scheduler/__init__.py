"""Diffusion schedulers: IDDPM (improved DDPM with learned sigma, respacing, CFG sampling)."""
from .gaussian_diffusion import (
    GaussianDiffusion,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
    mean_flat,
)
from .iddpm import IDDPM, forward_with_cfg
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "IDDPM",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "forward_with_cfg",
    "get_named_beta_schedule",
    "mean_flat",
    "space_timesteps",
]
