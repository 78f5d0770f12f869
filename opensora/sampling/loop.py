"""Loop generation of Open-Sora 1.1 (inference-long.py): videos longer than one clip.

Loop 0 samples a clip under the prompts' own mask strategies. Each later loop k appends the previous
clip to every prompt's references and the insertion "k,<its ref id>,-cfl,0,cfl" to its strategy (the
last `cfl` = condition_frame_length frames of the previous clip, kept, at the first cfl positions of
the new clip), then samples again. The video is clip 0 followed by every later clip without its first
cfl frames: loop * (T - cfl) + cfl frames.

`reencode` decides what "the previous clip" is: True (the original) VAE-encodes the decoded clip, so
the condition is encode(decode(z)) - what a user would get by extending the saved video; False reuses
the sampled latents themselves, which skips a VAE round trip per loop and makes the conditioning frames
of clip k+1 the last frames of clip k exactly (with exact conditioning in the sampler).
Unlike the original, the caller's reference lists and strategies are not modified (the original grows
them across `num_sample` repetitions of a prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from opensora.sampling.conditioning import apply_mask_strategy, parse_mask_strategy


def loop_strategy(loop_i: int, ref_id: int, condition_frame_length: int) -> str:
    """The insertion loop `loop_i` adds: the last cfl frames of reference `ref_id` at frames 0..cfl-1."""
    cfl = int(condition_frame_length)
    return f"{loop_i},{ref_id},-{cfl},0,{cfl}"


def append_strategy(strategy: Optional[str], insertion: str) -> str:
    """strategy + ";" + insertion (just the insertion when there is no strategy), as the original."""
    return insertion if strategy is None else f"{strategy};{insertion}"


def loop_video_length(loop: int, num_frames: int, condition_frame_length: int) -> int:
    """Frames of a loop-generated video: loop * (T - cfl) + cfl (T for loop 1, whatever cfl)."""
    return loop * (num_frames - condition_frame_length) + condition_frame_length


@dataclass
class LoopOutput:
    clips: list  # per loop, the sampled latents [B, C, T, h, w]
    masks: list  # per loop, the frame mask [B, T] it was sampled with
    strategies: list  # per prompt, its mask strategy of the last loop (its own + the appended insertions)
    latents: np.ndarray  # [B, C, L, h, w]: clip 0 + each later clip without its first cfl frames
    video: Optional[np.ndarray]  # decoded and joined the same way [B, C', L, H, W] (with `decode`)


def _join(clips: Sequence[np.ndarray], cfl: int) -> np.ndarray:
    return np.concatenate([clips[0]] + [c[:, :, cfl:] for c in clips[1:]], axis=2)


def generate_loop(sample_clip: Callable, draw_noise: Callable, prompts: Sequence[Sequence[str]],
                  refs: Sequence[Optional[Sequence[np.ndarray]]], strategies: Sequence[Optional[str]],
                  loop: int = 1, condition_frame_length: int = 0, decode: Optional[Callable] = None,
                  encode: Optional[Callable] = None, reencode: bool = True) -> LoopOutput:
    """Run `loop` iterations of conditioned sampling.

    :param sample_clip: (z [B, C, T, h, w] with the reference frames written, mask [B, T] float,
        prompts of this loop: list of B texts) -> sampled latents [B, C, T, h, w].
    :param draw_noise: loop index -> initial noise [B, C, T, h, w] of that loop.
    :param prompts: per prompt, its text of every loop (len == loop each, see split_loop_prompts).
    :param refs: per prompt, its reference latents [C, T_ref, h, w] (None or [] for none).
    :param strategies: per prompt, its mask strategy string or None.
    :param decode / encode: the VAE on [B, C, T, ...] arrays; decode gives `video`; both are needed for
        reencode=True (the original) when loop > 1.
    """
    b = len(prompts)
    if loop < 1:
        raise ValueError(f"loop must be >= 1, got {loop}")
    if len(refs) != b or len(strategies) != b:
        raise ValueError(f"{b} prompts but {len(refs)} reference lists and {len(strategies)} strategies")
    for i, texts in enumerate(prompts):
        if isinstance(texts, str) or len(texts) != loop:
            raise ValueError(f"prompt {i}: expected its text for each of the {loop} loops (split_loop_prompts), "
                             f"got {texts!r}")
        parse_mask_strategy(strategies[i], i)  # a malformed strategy fails before any sampling
    if loop > 1 and reencode and (encode is None or decode is None):
        raise ValueError("reencode=True (the original: condition on encode(decode(previous clip))) needs the VAE's "
                         "encode and decode; pass reencode=False to condition on the sampled latents")
    cfl = int(condition_frame_length)
    refs = [list(r or []) for r in refs]  # the caller's lists stay as they are
    strategies = list(strategies)
    clips, masks, decoded = [], [], []
    for loop_i in range(loop):
        z = np.asarray(draw_noise(loop_i), dtype=np.float32)
        if z.ndim != 5 or z.shape[0] != b:
            raise ValueError(f"draw_noise({loop_i}) gave shape {z.shape}, expected [{b}, C, T, h, w]")
        if loop_i == 0 and loop > 1 and not 1 <= cfl < z.shape[2]:
            raise ValueError(f"condition_frame_length must be in 1..{z.shape[2] - 1} for loop generation with "
                             f"{z.shape[2]} latent frames per clip, got {cfl}")
        if loop_i > 0:
            prev = clips[-1]
            if reencode:
                prev = np.asarray(encode(decoded[-1]), dtype=np.float32)
                if prev.shape != clips[-1].shape:
                    raise ValueError(f"encode(decode(clip)) has shape {prev.shape}, the clip {clips[-1].shape}")
            for j in range(b):
                refs[j].append(prev[j])
                strategies[j] = append_strategy(strategies[j], loop_strategy(loop_i, len(refs[j]) - 1, cfl))
        z_cond, mask = apply_mask_strategy(z, refs, strategies, loop_i)
        clip = np.asarray(sample_clip(z_cond, mask, [p[loop_i] for p in prompts]), dtype=np.float32)
        if clip.shape != z.shape:
            raise ValueError(f"sample_clip returned shape {clip.shape} for latents {z.shape}")
        clips.append(clip)
        masks.append(mask)
        if decode is not None:
            decoded.append(np.asarray(decode(clip), dtype=np.float32))
            if decoded[-1].shape[2] != clip.shape[2]:
                raise ValueError(f"decode changed the frame count {clip.shape[2]} -> {decoded[-1].shape[2]}; loop "
                                 "generation drops cfl frames per clip and needs a per-frame VAE")
    video = _join(decoded, cfl) if decode is not None else None
    return LoopOutput(clips=clips, masks=masks, strategies=strategies, latents=_join(clips, cfl), video=video)
