"""Open-Sora 1.1 generation with STDiT2: batches of prompts, each with its references, mask strategy and
per-loop texts, sampled with the size conditioning and the frame mask, loop by loop (inference-long.py).

What one batch does, as the original: the size conditions of the clip (`size_conditions`: pixel height and
width, frames, ar = H / W, fps; per sample, doubled for CFG by the sampler), for each loop fresh noise with
the reference latents written at the strategy's frames (`apply_mask_strategy`), the caption of that loop,
`IDDPM.sample(..., model_kwargs, frame_mask)`; later loops condition on the previous clip (`generate_loop`).

Randomness: the initial noise of sample i (its position in the run's list of samples) is drawn from
`default_rng(seed + i)` (loop 0, as STDiT 1.0 sampling) and `default_rng([seed + i, k])` (loop k), and the
sampler's own noise (ancestral steps, re-noising at release) from MindSpore's global RNG, re-seeded with
seed + i of the batch's first sample. So a batch's result depends only on its samples, and a resumed run with
batch size 1 regenerates exactly the videos an uninterrupted one makes.

A frame mask of all ones (no conditioning) is not passed to the sampler: the model then runs without x_mask,
as the original's plain inference (with x_mask all True the model gives the same values with more work).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from opensora.model.stdit2_conditions import size_conditions
from opensora.sampling.loop import generate_loop
from opensora.sampling.prompts import PromptPlan
from opensora.sampling.references import encode_any_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipSpec:
    """What every sample of a run is: num_frames x height x width pixels (as requested: the size conditioning),
    its latent [C, T, h, w], and the fps the model is conditioned on (before the 120-for-images rule)."""

    num_frames: int
    height: int
    width: int
    latent_shape: tuple
    fps: float


@dataclass
class SampleItem:
    """One sample to make: its position in the run's list (noise seeds), prompt plan and reference latents."""

    index: int
    plan: PromptPlan
    refs: list = field(default_factory=list)


@dataclass
class BatchResult:
    items: list  # the SampleItems of the batch (not the padding)
    latents: np.ndarray  # [n, C, L, h, w]: loop clips joined
    videos: Optional[np.ndarray]  # [n, 3, L, H', W'] decoded (with a VAE)
    clips: list  # per loop, its sampled latents [n, C, T, h, w]
    masks: list  # per loop, the frame mask [n, T] it was sampled with


def initial_noise(seed: int, index: int, loop_i: int, latent_shape: Sequence[int]) -> np.ndarray:
    """x_T of sample `index` in loop `loop_i`, float32 [C, T, h, w] (see the module docstring)."""
    rng = np.random.default_rng(seed + index if loop_i == 0 else [seed + index, loop_i])
    return rng.standard_normal(tuple(latent_shape)).astype(np.float32)


def sample_batches(model, text_encoder, diffusion, items: Sequence[SampleItem], spec: ClipSpec, batch_size: int,
                   seed: int, vae=None, loop: int = 1, condition_frame_length: int = 0, reencode: bool = True,
                   progress: bool = True) -> Iterator[BatchResult]:
    """Sample `items` in batches of `batch_size` (the last padded with its last item, so the compiled graph is
    reused); yields each batch's latents (and videos when `vae` is given: it decodes every clip, and encodes
    the previous clip for loop conditioning with `reencode`, the original)."""
    import mindspore as ms

    model.set_train(False)
    null = model.get_null_y()
    kwargs = {k: ms.Tensor(v) for k, v in size_conditions(batch_size, spec.num_frames, spec.height, spec.width,
                                                           spec.fps).items()}
    decode = None if vae is None else (lambda z: np.asarray(vae.decode(z), dtype=np.float32))
    encode = None if vae is None else (lambda x: encode_any_size(vae, x))
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ms.set_seed(int(seed) + chunk[0].index)

        def sample_clip(z, mask, texts):
            emb = text_encoder.encode(list(texts))
            frame_mask = None if np.all(mask == 1.0) else ms.Tensor(mask)
            out = diffusion.sample(model, shape=z.shape, y=ms.Tensor(emb["y"]), mask=ms.Tensor(emb["mask"]),
                                   y_null=null, noise=ms.Tensor(z), progress=progress, model_kwargs=kwargs,
                                   frame_mask=frame_mask)
            return out.asnumpy() if hasattr(out, "asnumpy") else np.asarray(out)

        def draw_noise(loop_i):
            return np.stack([initial_noise(seed, it.index, loop_i, spec.latent_shape) for it in padded])

        out = generate_loop(sample_clip, draw_noise, [it.plan.texts for it in padded], [it.refs for it in padded],
                            [it.plan.mask_strategy for it in padded], loop=loop,
                            condition_frame_length=condition_frame_length, decode=decode, encode=encode,
                            reencode=reencode)
        n = len(chunk)
        yield BatchResult(chunk, out.latents[:n], None if out.video is None else out.video[:n],
                          [c[:n] for c in out.clips], [m[:n] for m in out.masks])
