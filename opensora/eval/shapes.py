"""Score "a <colour> <shape> moving <direction>" videos from their pixels: colour and motion direction.

Foreground: pixels clearly brighter than the background (the per-channel median of the clip). A
pixel's excess is its largest per-channel rise above the background, averaged over its 3x3
neighbourhood (damps speckle noise); it must exceed MIN_THRESHOLD, half the clip's 99th-percentile
excess, and the median excess plus NOISE_SIGMAS robust standard deviations (so pure noise has none).
Colour: majority vote of the foreground pixels' nearest palette colours. Direction: dominant axis of
the least-squares slope of the foreground centroid over frames.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from opensora.data.synthetic import COLORS, DIRECTIONS, parse_caption

MIN_THRESHOLD = 0.2     # a foreground pixel exceeds the background by at least this (in [0, 1] units)
NOISE_SIGMAS = 4.0     # foreground must stand this many robust std devs above the typical pixel
MIN_PIXELS = 2          # a frame with fewer foreground pixels has no centroid
MIN_SPEED = 0.3         # px/frame along the dominant axis for motion to count
MIN_DOMINANCE = 1.5     # |slope| on the dominant axis over |slope| on the other
MIN_R2 = 0.7            # straightness of the dominant-axis trajectory


def _as_float(video) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [T, H, W, 3], got shape {v.shape}")
    return v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v.astype(np.float32)


def foreground_mask(video) -> np.ndarray:
    """[T, H, W, 3] in [0, 1] (or uint8) -> bool [T, H, W]: pixels clearly brighter than the background."""
    v = _as_float(video)
    background = np.median(v.reshape(-1, 3), axis=0)
    excess = (v - background).max(-1)  # [T, H, W]
    h, w = excess.shape[1:]
    padded = np.pad(excess, ((0, 0), (1, 1), (1, 1)))  # background (excess 0) beyond the border
    excess = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0  # 3x3 mean
    median = float(np.median(excess))
    robust_std = 1.4826 * float(np.median(np.abs(excess - median)))
    threshold = max(MIN_THRESHOLD, 0.5 * float(np.percentile(excess, 99)), median + NOISE_SIGMAS * robust_std)
    return excess > threshold


def detect_color(video, palette: Mapping[str, Sequence[float]] = COLORS) -> Optional[str]:
    """Nearest palette colour of the foreground (majority vote over its pixels); None if no foreground."""
    v = _as_float(video)
    pixels = v[foreground_mask(v)]  # [N, 3]
    if len(pixels) == 0:
        return None
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], dtype=np.float32)  # [K, 3]
    nearest = ((pixels[:, None, :] - ref[None]) ** 2).sum(-1).argmin(1)  # [N]
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def centroids(video) -> tuple[np.ndarray, np.ndarray]:
    """Foreground centroid per frame: (frame indices [F], (x, y) [F, 2]) for frames with a foreground."""
    mask = foreground_mask(video)
    frames, xy = [], []
    for t, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(xs) >= MIN_PIXELS:
            frames.append(t)
            xy.append((xs.mean(), ys.mean()))
    return np.asarray(frames, dtype=np.float64), np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def detect_direction(video) -> Optional[str]:
    """"left" / "right" / "up" / "down" from the centroid trajectory; None without a clear straight motion.

    Needs a foreground in at least half the frames (and 2), a dominant-axis slope of at least MIN_SPEED
    px/frame and MIN_DOMINANCE times the other axis's, and a fit with R^2 >= MIN_R2 on that axis.
    """
    num_frames = np.asarray(video).shape[0]
    t, xy = centroids(video)
    if len(t) < max(2, (num_frames + 1) // 2):
        return None
    tc = t - t.mean()
    slope = (tc[:, None] * (xy - xy.mean(0))).sum(0) / (tc ** 2).sum()  # [2]: (dx/dt, dy/dt)
    axis = int(np.abs(slope).argmax())
    major, minor = abs(slope[axis]), abs(slope[1 - axis])
    if major < MIN_SPEED or major < MIN_DOMINANCE * minor:
        return None
    residual = xy[:, axis] - xy[:, axis].mean() - slope[axis] * tc
    total = ((xy[:, axis] - xy[:, axis].mean()) ** 2).sum()
    if 1.0 - (residual ** 2).sum() / total < MIN_R2:
        return None
    step = [0, 0]
    step[axis] = 1 if slope[axis] > 0 else -1
    return next(name for name, d in DIRECTIONS.items() if tuple(d) == tuple(step))


def evaluate_samples(videos: Sequence[np.ndarray], prompts: Sequence[str]) -> dict:
    """Score videos [T, H, W, 3] (uint8 or float in [0, 1]) against their prompts.

    Returns {"color_acc", "direction_acc", "joint_acc" (both right), "n", "per_sample": [...]}.
    """
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    if not videos:
        raise ValueError("no videos to evaluate")
    per_sample = []
    for video, prompt in zip(videos, prompts):
        color, _, direction = parse_caption(prompt)
        got_color, got_direction = detect_color(video), detect_direction(video)
        per_sample.append({"prompt": prompt, "color": got_color, "direction": got_direction,
                           "color_ok": got_color == color, "direction_ok": got_direction == direction})
    n = len(per_sample)
    return {
        "color_acc": sum(s["color_ok"] for s in per_sample) / n,
        "direction_acc": sum(s["direction_ok"] for s in per_sample) / n,
        "joint_acc": sum(s["color_ok"] and s["direction_ok"] for s in per_sample) / n,
        "n": n,
        "per_sample": per_sample,
    }
