"""Reconstruction metrics of videos: PSNR and SSIM from scikit-image, per frame -> per clip -> over clips.

Frames are [T, H, W, 3] (or [T, H, W]); the data range follows the dtype: uint8 frames have range 255,
float frames must lie in [0, 1] and have range 1. Both clips of a pair must share shape and dtype.

    PSNR  skimage.metrics.peak_signal_noise_ratio: 10 log10(range^2 / MSE) over all pixels and channels
          of a frame; identical frames give inf (the original eval/vae/cal_psnr.py returned 100 for
          MSE < 1e-10).
    SSIM  skimage.metrics.structural_similarity with Wang et al.'s settings - Gaussian window sigma 1.5
          (11 x 11), population covariances, K1 0.01, K2 0.03 - per channel, averaged over channels and
          over the frame minus a 5-pixel border: the formula of the original eval/vae/cal_ssim.py (its
          filter2D border handling only touches the border it crops). scikit-image's own default (7 x 7
          uniform window, sample covariance) gives other values. Frames need H, W >= 11.

A clip's value is the mean over its frames; `summarize` averages clips (the original averaged each
frame position over the videos, then the positions: the same number when all clips have T frames).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import numpy as np

SSIM_SIGMA = 1.5
SSIM_MIN_SIZE = 11


def data_range(frames: np.ndarray) -> float:
    """255 for uint8 frames, 1 for float frames in [0, 1]; other dtypes raise."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return 255.0
    if np.issubdtype(frames.dtype, np.floating):
        return 1.0
    raise ValueError(f"frames must be uint8 (0-255) or float in [0, 1], got {frames.dtype}")


def _check_pair(ref: np.ndarray, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    ref, rec = np.asarray(ref), np.asarray(rec)
    if ref.shape != rec.shape:
        raise ValueError(f"reference and reconstruction differ in shape: {ref.shape} vs {rec.shape}")
    if ref.dtype != rec.dtype:
        raise ValueError(f"reference and reconstruction differ in dtype: {ref.dtype} vs {rec.dtype}")
    if ref.ndim not in (3, 4):
        raise ValueError(f"expected frames [T, H, W] or [T, H, W, C], got shape {ref.shape}")
    rng = data_range(ref)
    if rng == 1.0:
        lo, hi = min(ref.min(), rec.min()), max(ref.max(), rec.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"float frames must lie in [0, 1] (data range 1), got values in [{lo:.4g}, {hi:.4g}]; "
                             "clip them or pass uint8 frames")
    return ref, rec, rng


def psnr_frames(ref, rec) -> np.ndarray:
    """PSNR in dB of each frame [T] (float64)."""
    from skimage.metrics import peak_signal_noise_ratio

    ref, rec, rng = _check_pair(ref, rec)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # identical frames: MSE 0 -> inf, said above
        return np.array([peak_signal_noise_ratio(a, b, data_range=rng) for a, b in zip(ref, rec)], np.float64)


def ssim_frames(ref, rec) -> np.ndarray:
    """SSIM of each frame [T] (float64), Wang et al.'s Gaussian-window settings."""
    from skimage.metrics import structural_similarity

    ref, rec, rng = _check_pair(ref, rec)
    if min(ref.shape[1:3]) < SSIM_MIN_SIZE:
        raise ValueError(f"SSIM needs frames of at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} pixels (its 11x11 Gaussian "
                         f"window), got {ref.shape[1]}x{ref.shape[2]}")
    channel_axis = -1 if ref.ndim == 4 else None
    return np.array([structural_similarity(a, b, data_range=rng, channel_axis=channel_axis, gaussian_weights=True,
                                           sigma=SSIM_SIGMA, use_sample_covariance=False)
                     for a, b in zip(ref, rec)], np.float64)


def clip_metrics(ref, rec) -> dict:
    """{"psnr", "ssim"}: the means over the frames of one clip."""
    return {"psnr": float(psnr_frames(ref, rec).mean()), "ssim": float(ssim_frames(ref, rec).mean())}


def summarize(per_clip: Iterable[Mapping[str, float]]) -> dict:
    """The mean of each metric over clips (NaN-free entries only) and the number of clips."""
    rows = list(per_clip)
    out = {}
    for key in sorted({k for r in rows for k in r}):
        values = np.array([r[key] for r in rows if r.get(key) is not None and not np.isnan(r[key])], np.float64)
        out[key] = float(values.mean()) if len(values) else float("nan")
    out["num_clips"] = len(rows)
    return out
