"""Pixel-space diffusion: the identity map with the VAE interface."""
from __future__ import annotations

import numpy as np


class IdentityVAE:
    """encode/decode are the identity; `latent_channels` = 3 colour channels, `downsample` = 1.

    Every VAE exposes the same interface: ``encode(x) -> z`` and ``decode(z) -> x`` on numpy or
    MindSpore arrays shaped [B, C, T, H, W], plus ``latent_channels`` and ``downsample``
    (temporal/spatial factor: an int or [t, h, w]).
    """

    def __init__(self, latent_channels: int = 3, downsample: int = 1):
        if downsample != 1:
            raise ValueError(f"IdentityVAE cannot downsample (vae.downsample={downsample}); use 1")
        self.latent_channels = latent_channels
        self.downsample = downsample

    def encode(self, x):
        return x

    def decode(self, z):
        return np.clip(np.asarray(z, dtype=np.float32), -1.0, 1.0)
