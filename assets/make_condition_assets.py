"""Writes the reference image / video files the Open-Sora 1.1 conditioning recipes use by default (a drawn
sunset over the sea: assets/images/condition/sunset*.png, assets/videos/condition/sunset.mp4), so each recipe
runs as it is; point task.reference_path at your own files instead.

    python assets/make_condition_assets.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

H, W = 240, 426
HORIZON = 0.56


def sunset(sun_y: float, phase: float = 0.0) -> np.ndarray:
    """[H, W, 3] uint8: a gradient sky, a sun at height sun_y (fraction of H) and a rippled sea reflecting it."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    v, u = y / H, x / W
    top, glow = np.array([40, 60, 140], np.float32), np.array([250, 150, 60], np.float32)
    a = np.clip(v / HORIZON, 0, 1)[..., None] ** 1.5
    img = top * (1 - a) + glow * a
    d = np.hypot(u - 0.5, (v - sun_y) * H / W)
    img += np.clip(1 - d / 0.08, 0, 1)[..., None] ** 0.5 * (np.array([255, 235, 180]) - img) * (v < HORIZON)[..., None]
    img += np.exp(-d / 0.12)[..., None] * np.array([60, 30, 0], np.float32)
    sea = v >= HORIZON
    depth = np.clip((v - HORIZON) / (1 - HORIZON), 0, 1)
    near, far = np.array([30, 50, 90], np.float32), np.array([10, 20, 50], np.float32)
    base = near * (1 - depth[..., None]) + far * depth[..., None]
    ripple = 0.5 + 0.5 * np.sin(2 * np.pi * (12 * depth ** 0.7 * 8 + 0.02 * x) + phase)
    column = np.exp(-((u - 0.5) / (0.05 + 0.1 * depth)) ** 2) * (1.0 - 0.8 * depth)
    shine = (column * ripple * (sun_y < HORIZON))[..., None] * np.array([230, 160, 80], np.float32)
    img = np.where(sea[..., None], base + shine + 10 * ripple[..., None], img)
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> None:
    from PIL import Image

    from opensora.utils.video_io import save_video

    root = Path(__file__).resolve().parent
    Image.fromarray(sunset(0.30)).save(root / "images/condition/sunset.png", optimize=True)
    Image.fromarray(sunset(0.50)).save(root / "images/condition/sunset_low.png", optimize=True)
    frames = np.stack([sunset(0.30 + 0.004 * i, phase=0.5 * i) for i in range(32)])
    save_video(frames, root / "videos/condition/sunset.mp4", fps=8)


if __name__ == "__main__":
    main()
