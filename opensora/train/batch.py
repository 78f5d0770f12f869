"""What one training step needs besides the weights: its random draws, made on the host for the global batch,
and the model inputs of a loaded batch (VAE / text-encoder outputs, or their caches).

Fixed-size batches (`GlobalBatchFeed`): every random choice of a step comes from the train RNG (numpy, seeded by
`seed`, saved in each checkpoint), drawn for the whole global batch in a fixed order and sliced by each rank
(`strategy.rows`): the VAE's posterior noise (when it samples), the timesteps, the diffusion noise and the
caption-dropout decisions. So data-parallel ranks together use exactly what one process with the global batch
would, and a resumed run continues the stream. Bucketed micro-batches (`BucketFeed`), whose shapes differ between
ranks: each micro-batch draws from generators of (seed, step, slot), the same on whichever rank it trains.
`build_feed` picks the feed of the configured data; the train loop only calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
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


# ================================================================
# One step's inputs, whatever the data
# ================================================================


@dataclass
class StepInputs:
    """The train step's inputs of one step on this rank: `micro` = one tuple of arrays per micro-batch (the
    compiled step's argument order), `slot_keys` = a shape key per slot of the step over all ranks (bucketed
    data; None for fixed-size batches), `samples` = samples in the step over all ranks."""

    micro: list
    samples: int
    slot_keys: Optional[list] = None


class GlobalBatchFeed:
    """Fixed-size batches (Open-Sora 1.0 data): every draw is made for the global batch from the train RNG `rng`
    (saved in checkpoints) and sliced per rank, so data-parallel ranks together use exactly what one process
    with the global batch would (see the module docstring). Inputs: (x, t, noise, y, mask, drop), and for an STDiT2
    (`conditions`: the clip size of every sample, see `fixed_size_conditions`) also (x_mask, num_frames, height,
    width, ar, fps, weight) with every frame a target and weight 1, BucketFeed's order."""

    def __init__(self, strategy, vae, text_encoder, diffusion, timesteps, drop_prob: float, batch_size: int,
                 rng: np.random.Generator, conditions: Optional[dict] = None):
        self.strategy, self.vae, self.text_encoder = strategy, vae, text_encoder
        self.diffusion, self.timesteps, self.drop_prob = diffusion, timesteps, float(drop_prob)
        self.global_batch = int(batch_size) * strategy.ctx.data_size  # the loader yields whole batches
        self.rng = rng
        self.conditions = conditions

    def __call__(self, batch: dict, step: int) -> StepInputs:
        rows, rng = self.strategy.rows, self.rng
        posterior = draw_posterior(rng, self.vae, batch, self.global_batch)
        x, emb = model_inputs(batch, self.vae, self.text_encoder, None if posterior is None else rows(posterior))
        t, noise, drop = draw_step(rng, self.global_batch, x.shape[1:], self.diffusion.num_timesteps, self.timesteps,
                                   self.drop_prob)
        t, noise, drop = rows(t), rows(noise), rows(drop)
        x, noise = self.strategy.frames(x), self.strategy.frames(noise)
        inputs = (x, t, noise, emb["y"], emb["mask"], drop.astype(np.int32))
        if self.conditions is not None:
            b = x.shape[0]
            keys = ("num_frames", "height", "width", "ar", "fps")
            cond = [np.full((b,), self.conditions[k], np.float32) for k in keys]
            inputs = (*inputs, np.ones((b, x.shape[2]), bool), *cond, np.float32(1.0))
        return StepInputs([inputs], self.global_batch)


def fixed_size_conditions(data_cfg) -> dict[str, float]:
    """STDiT2's size conditions for fixed-size data (Open-Sora 1.0 style data; the original could not train
    STDiT2 without its variable dataset): every sample is data.num_frames x data.image_size pixels, ar = height /
    width and fps = data.fps (default 8, data=prompts' default, so a run sampled from its directory is
    conditioned as it trained), 120 for single frames - `size_conditions`' inference rules."""
    from opensora.model.stdit2_conditions import size_conditions

    size = data_cfg.image_size
    height, width = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    values = size_conditions(1, int(data_cfg.num_frames), height, width, float(data_cfg.get("fps") or 8))
    return {k: float(v[0]) for k, v in values.items()}


class BucketFeed:
    """Bucketed micro-batches (Open-Sora 1.1 data, opensora/data/bucket_loader.py): each micro-batch is drawn for
    itself, from generators of (seed, step, slot) - slot = its place among the step's micro-batches over all
    ranks - so the draws of a micro-batch do not depend on which rank trains it or what else is in the step,
    and a resumed run draws the same again without any saved RNG state. In this order: timesteps, noise, caption
    dropout from default_rng([seed, step, slot, 1]); the VAE's posterior noise from [seed, step, slot, 2]; the
    frame masks from data.mask_ratios' generator (seeded per (seed, step, slot)).

    Inputs: (x, t, noise, y, mask, drop, x_mask, num_frames, height, width, ar, fps, weight). `weight` makes the
    mean over ranks (and accumulated micro-batches) what `micro_batch_weight` says: "equal" (1) averages the
    micro-batches' mean losses, each micro-batch counting the same, as v1.1.0 (each rank's loss mean, averaged by
    its all-reduce, whatever the rank's batch size); "samples" (b * slots / samples) weighs each micro-batch by
    its samples, so the update is the gradient of the mean loss over every sample of the step."""

    def __init__(self, vae, text_encoder, diffusion, timesteps, drop_prob: float, seed: int, masks=None,
                 micro_batch_weight: str = "equal"):
        if micro_batch_weight not in ("equal", "samples"):
            raise ValueError(f"task.micro_batch_weight={micro_batch_weight!r}: expected equal or samples")
        self.vae, self.text_encoder, self.diffusion = vae, text_encoder, diffusion
        self.timesteps, self.drop_prob, self.seed, self.masks = timesteps, float(drop_prob), int(seed), masks
        self.weighting = micro_batch_weight

    def micro_batch(self, batch: dict, step: int, slot: int, weight: float) -> tuple:
        rng = np.random.default_rng([self.seed, int(step), int(slot), 1])
        posterior = None
        if self.vae is not None and "video" in batch:
            shape = posterior_shape(self.vae, np.shape(batch["video"]))
            if shape is not None:
                posterior = np.random.default_rng([self.seed, int(step), int(slot), 2]).standard_normal(
                    shape, dtype=np.float32)
        x, emb = model_inputs(batch, self.vae, self.text_encoder, posterior)
        b, t_latent = x.shape[0], x.shape[2]
        t = self.timesteps(rng, b, self.diffusion.num_timesteps)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        drop = rng.random(b) < self.drop_prob if self.drop_prob > 0 else np.zeros(b, bool)
        x_mask = (self.masks.get_masks(b, t_latent, step, slot) if self.masks is not None
                  else np.ones((b, t_latent), bool))
        cond = [np.asarray(batch[k], np.float32).reshape(b) for k in ("num_frames", "height", "width", "ar", "fps")]
        return (x, t, noise, emb["y"], emb["mask"], drop.astype(np.int32), x_mask, *cond, np.float32(weight))

    def __call__(self, batch, step: int) -> StepInputs:
        slots = len(batch.slot_keys)
        micro = []
        for k, mb in enumerate(batch.micro_batches):
            b = len(mb["caption"])
            weight = 1.0 if self.weighting == "equal" else b * slots / batch.samples
            micro.append(self.micro_batch(mb, step, batch.first_slot + k, weight))
        return StepInputs(micro, batch.samples, batch.slot_keys)


def build_feed(cfg, strategy, vae, text_encoder, diffusion, timesteps, drop_prob: float, rng: np.random.Generator):
    """The feed of the configured data: BucketFeed with data.bucket_config (masks from data.mask_ratios), else
    GlobalBatchFeed (with the data's clip size as the conditions of an STDiT2)."""
    from opensora.sampling.request import is_stdit2

    if cfg.data.get("bucket_config") is None:
        conditions = fixed_size_conditions(cfg.data) if is_stdit2(cfg.model.get("_target_")) else None
        return GlobalBatchFeed(strategy, vae, text_encoder, diffusion, timesteps, drop_prob, int(cfg.data.batch_size),
                               rng, conditions)
    from opensora.data.masks import build_mask_generator

    return BucketFeed(vae, text_encoder, diffusion, timesteps, drop_prob, int(cfg.seed),
                      build_mask_generator(cfg.data.get("mask_ratios"), int(cfg.seed)),
                      str(cfg.task.get("micro_batch_weight") or "equal"))
