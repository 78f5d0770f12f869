"""STDiT2's size, aspect-ratio, duration and fps conditioning for a clip size, as Open-Sora 1.1's inference
builds it (scripts/inference.py, `multi_resolution == "STDiT2"`): height and width in pixels of the requested
clip (not of the latent, nor of what the VAE decodes: 240 x 426 stays 426 although the video comes out 424
wide), num_frames in pixel frames, ar = height / width, fps = the configured fps, or 120 (IMAGE_FPS) for a
single frame. One value per sample, float32.

The v1.1.0 *training* data gave ar = width / height and the video's own fps (SPEC-1.1 §1.5); callers that
mirror training pass `ar` explicitly. The original builds these tensors in the model dtype (bf16 under bf16,
where 426 rounds to 424 and 240/426 to 0.5625); here they stay float32 and STDiT2 embeds them in fp32.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from opensora.data.media_info import IMAGE_FPS


def conditioning_fps(num_frames: int, fps: float) -> float:
    """The fps STDiT2 is conditioned on: `fps`, or IMAGE_FPS (120) for a single frame (the original's rule)."""
    return float(IMAGE_FPS) if int(num_frames) == 1 else float(fps)


def size_conditions(batch: int, num_frames: int, height: int, width: int, fps: float,
                    ar: Optional[float] = None) -> dict[str, np.ndarray]:
    """{num_frames, height, width, ar, fps} -> float32 [batch] each, for `STDiT2(..., **kwargs)` /
    `IDDPM.sample(model_kwargs=...)`. ar defaults to height / width (inference); fps to `conditioning_fps`."""
    if min(int(num_frames), int(height), int(width)) < 1 or batch < 1:
        raise ValueError(f"size conditions need positive sizes and batch, got batch={batch}, num_frames={num_frames}, "
                         f"height={height}, width={width}")
    values = {"num_frames": float(num_frames), "height": float(height), "width": float(width),
              "ar": float(height) / float(width) if ar is None else float(ar),
              "fps": conditioning_fps(num_frames, fps)}
    return {k: np.full((int(batch),), v, dtype=np.float32) for k, v in values.items()}
