"""Frames of a video (or an image) for the scorers and evaluations: which frames, then decoding them.

`read_frames_at(path, select)` decodes the frames `select(total_frames)` names (decord, only those
frames); `select` is one of
    at_points(points, num_frames)   Open-Sora's `tools/datasets/utils.extract_frames(points=...)`: frame
                                    int(p * total) for p in [0, 1), clamped to the last frame; `total` is
                                    the video's frame count or, when given, the CSV's `num_frames` (the
                                    original's aesthetic scorer passes it). Indices past the real last frame
                                    are clamped to it (the original's OpenCV reader returned a black frame).
    evenly_spaced(n)                n frames spread evenly over the video (rounded), every frame when n is
                                    None or >= the frame count
    first_window(n, interval)       frames 0, interval, ..., (n - 1) * interval; a shorter video is refused
An image is its own single frame whatever `select` says. Every failure raises BadSampleError naming the
file, so a caller can count it and go on. The selectors and the loaders below are picklable and do not
import MindSpore, so worker processes stay small.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np

from opensora.data.loader import BadSampleError
from opensora.data.video import is_image, read_image


def _points(points: Sequence[float], num_frames: Optional[int], total: int) -> np.ndarray:
    count = int(num_frames) if num_frames is not None and int(num_frames) > 0 else total
    idx = np.clip([int(p * count) for p in points], 0, count - 1)
    return np.minimum(idx, total - 1).astype(np.int64)


def _spaced(n: Optional[int], total: int) -> np.ndarray:
    if n is None or int(n) >= total:
        return np.arange(total, dtype=np.int64)
    return np.round(np.linspace(0, total - 1, int(n))).astype(np.int64)


def _window(n: int, interval: int, total: int) -> np.ndarray:
    idx = np.arange(int(n), dtype=np.int64) * int(interval)
    if idx[-1] >= total:
        raise ValueError(f"too short: {total} frames, fewer than {idx[-1] + 1} ({n} frames at interval {interval})")
    return idx


def at_points(points: Sequence[float], num_frames: Optional[int] = None) -> Callable[[int], np.ndarray]:
    return partial(_points, tuple(float(p) for p in points), num_frames)


def evenly_spaced(n: Optional[int]) -> Callable[[int], np.ndarray]:
    if n is not None and int(n) < 1:
        raise ValueError(f"number of frames must be >= 1 or null (every frame), got {n}")
    return partial(_spaced, n)


def first_window(n: int, interval: int = 1) -> Callable[[int], np.ndarray]:
    if int(n) < 1 or int(interval) < 1:
        raise ValueError(f"num_frames={n} and frame_interval={interval} must be >= 1")
    return partial(_window, int(n), int(interval))


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def read_frames_at(path: str | os.PathLike, select: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 frames [N, H, W, 3], their indices [N]) of the video at `path`; an image gives its one frame."""
    path = str(path)
    if not os.path.isfile(path):
        raise BadSampleError(path, "file not found")
    if is_image(path):
        try:
            return read_image(path)[None], np.zeros(1, np.int64)
        except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
            raise BadSampleError(path, f"unreadable image ({_short(e)})") from None
    from opensora.utils.video_io import open_video, read_frames

    try:
        reader = open_video(path, num_threads=1)
        total = len(reader)
    except Exception as e:  # noqa: BLE001
        raise BadSampleError(path, f"unreadable video ({_short(e)})") from None
    try:
        if total < 1:
            raise BadSampleError(path, "the video has no frames")
        try:
            indices = np.asarray(select(total), np.int64)
        except ValueError as e:
            raise BadSampleError(path, str(e)) from None
        try:
            frames = read_frames(reader, indices)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt stream
            raise BadSampleError(path, f"cannot decode frames {indices.tolist()[:8]} ({_short(e)})") from None
    finally:
        del reader
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3 or frames.size == 0:
        raise BadSampleError(path, f"decoded frames of shape {frames.shape}")
    return frames, indices


class ResizedClip:
    """path -> video [3, T, H, W] float32 in [-1, 1]: the frames `select` names, resized (short side,
    bilinear) and center-cropped to `image_size` as training clips are (opensora/data/video.py)."""

    def __init__(self, select: Callable[[int], np.ndarray], image_size):
        self.select, self.image_size = select, image_size

    def __call__(self, path: str) -> np.ndarray:
        from opensora.data.video import resize_crop

        frames, _ = read_frames_at(path, self.select)
        return np.ascontiguousarray(resize_crop(frames, self.image_size).transpose(3, 0, 1, 2))  # [T, H, W, 3] -> [3, T, H, W]


class FramePixels:
    """(path, frame count or None) -> `processor(frames)`, e.g. CLIP pixel_values [k, 3, S, S]: the frames at
    relative `points` (of the given frame count, else the video's), or else `num_frames` evenly spaced
    ones (None: every frame)."""

    def __init__(self, processor, points: Optional[Sequence[float]] = None, num_frames: Optional[int] = None):
        self.processor, self.num_frames = processor, num_frames
        self.points = None if points is None else tuple(float(p) for p in points)
        if points is None:
            evenly_spaced(num_frames)  # validates

    def __call__(self, path: str, count: Optional[int] = None) -> np.ndarray:
        select = at_points(self.points, count) if self.points is not None else evenly_spaced(self.num_frames)
        frames, _ = read_frames_at(path, select)
        return self.processor(list(frames))
