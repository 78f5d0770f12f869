"""What one training step needs besides the weights: its random draws, made on the host for the global batch,
and the model inputs of a loaded batch (VAE / text-encoder outputs, or their caches).

Every random choice of a step comes from the train RNG (numpy, seeded by `seed`, saved in each checkpoint), drawn
for the whole global batch in a fixed order and sliced by each rank (`strategy.rows`): the VAE's posterior noise
(when it samples), the timesteps, the diffusion noise and the caption-dropout decisions. So data-parallel ranks
together use exactly what one process with the global batch would, and a resumed run continues the stream.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def posterior_shape(vae, video_shape) -> Optional[tuple]:
    """Shape of the VAE's posterior noise for a pixel batch of `video_shape` [B, C, T, H, W] (None when the VAE
    does not sample, e.g. pixel space or the posterior mean)."""
    if not getattr(vae, "sample_posterior", False):
        return None
    d = vae.downsample
    dt, dh, dw = (1, d, d) if isinstance(d, int) else tuple(int(v) for v in d)
    b, _, t, h, w = video_shape
    return (b, int(vae.latent_channels), t // dt, h // dh, w // dw)


def draw_posterior(rng: np.random.Generator, vae, batch: dict, world_batch: int) -> Optional[np.ndarray]:
    """VAE posterior noise for the global batch (`world_batch` samples), when this batch is pixels the VAE samples
    from; None otherwise (cached latents, pixel space)."""
    if vae is None or "video" not in batch:
        return None
    shape = posterior_shape(vae, (world_batch, *np.shape(batch["video"])[1:]))
    return None if shape is None else rng.standard_normal(shape, dtype=np.float32)


def draw_step(rng: np.random.Generator, world_batch: int, latent_shape, num_timesteps: int, timesteps,
              drop_prob: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, noise, drop) for the global batch, in this order: `timesteps(rng, batch, num_timesteps)` (a
    opensora.scheduler.timestep_sampler), N(0, 1) noise of [world_batch, *latent_shape], and the caption dropout
    (drawn only when drop_prob > 0)."""
    t = timesteps(rng, world_batch, num_timesteps)
    noise = rng.standard_normal((world_batch, *latent_shape)).astype(np.float32)
    drop = rng.random(world_batch) < drop_prob if drop_prob > 0 else np.zeros(world_batch, bool)
    return t, noise, drop


def model_inputs(batch: dict, vae, text_encoder, posterior: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict]:
    """(x [B, C, T, H, W] float32, {"y": [B, 1, L, D], "mask": [B, L] int32}) of a loaded batch: cached latents /
    text embeddings as they are, pixels / captions encoded (with the given posterior noise when the VAE samples)."""
    if "latent" in batch:
        x = batch["latent"]
    else:
        if vae is None:
            raise ValueError("the batch holds pixels but no VAE was built")
        x = vae.encode(batch["video"], noise=posterior) if posterior is not None else vae.encode(batch["video"])
    if "text_emb" in batch:
        emb = {"y": np.asarray(batch["text_emb"], np.float32)[:, None], "mask": np.asarray(batch["mask"], np.int32)}
    else:
        if text_encoder is None:
            raise ValueError("the batch holds captions but no text encoder was built")
        emb = text_encoder.encode(batch["caption"])
    return np.asarray(x, np.float32), emb
