"""Open-Sora 1.1's "resize_crop" transform: scale a frame so that it covers the target size, then crop the
middle (HPC@v1.1.0 `resize_crop_to_fill`; the 1.1 dataset and the inference references use it).

The scale is the larger of target_h / h and target_w / w; the other side becomes round(side * scale)
(Python's round). Two variants, as the original:
- videos (`fill_crop_video`): bilinear resize of the whole frame to that size, as torch's
  `interpolate(mode="bilinear", align_corners=False)` without antialiasing (weights from the in / out size
  ratio of each axis), crop offset floor((resized - target) / 2);
- images (`fill_crop_image`): PIL's bicubic resize (PIL antialiases when it shrinks), crop offset
  round((resized - target) / 2) (half to even).
Both return float32 [T, th, tw, 3] in [-1, 1] ((x / 255 - 0.5) / 0.5). Unlike Open-Sora 1.0's short-side
resize (opensora/data/video.py `resize_crop`: floor of the resized size, offsets rounded), the resized size
is rounded and the video offset floored.
"""
from __future__ import annotations

import numpy as np

from opensora.data.aspect import as_size
from opensora.data.video import _linear_taps, bilinear_crop


def fill_geometry(height: int, width: int, size) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((resized h, w), video crop offset (top, left), image crop offset (top, left)) of a height x width
    frame filled into `size`."""
    th, tw = as_size(size)
    rh, rw = th / height, tw / width
    if rh > rw:
        sh, sw = th, round(width * rh)
    else:
        sh, sw = round(height * rw), tw
    video_offset = ((sh - th) // 2, (sw - tw) // 2)  # int(round(sw - tw) / 2.0): the difference is an int
    image_offset = (int(round((sh - th) / 2.0)), int(round((sw - tw) / 2.0)))
    return (sh, sw), video_offset, image_offset


def fill_crop_video(frames: np.ndarray, size) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> float32 [T, th, tw, 3] in [-1, 1]; only the cropped pixels are computed."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    _, h, w, _ = frames.shape
    th, tw = as_size(size)
    (sh, sw), (top, left), _ = fill_geometry(h, w, (th, tw))
    return bilinear_crop(frames, _linear_taps(h, sh / h, top, th), _linear_taps(w, sw / w, left, tw))


def fill_crop_image(image, size) -> np.ndarray:
    """A PIL image (or uint8 [H, W, 3]) -> float32 [1, th, tw, 3] in [-1, 1]."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    th, tw = as_size(size)
    (sh, sw), _, (top, left) = fill_geometry(image.height, image.width, (th, tw))
    arr = np.asarray(image.resize((sw, sh), Image.BICUBIC), dtype=np.float32)[top:top + th, left:left + tw]
    return (arr * np.float32(2.0 / 255.0) - np.float32(1.0))[None]
