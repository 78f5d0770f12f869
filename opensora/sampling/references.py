"""Reference images and videos of Open-Sora 1.1 conditioning, read as the original reads them and encoded with
the VAE (inference-long.py `collect_references_batch` + `read_from_path(..., transform_name="resize_crop")`).

An image is one frame, a video all its frames (not subsampled by frame_interval, as the original), each
resized to cover the sampled size and center-cropped to it (opensora/data/fill_crop.py: bilinear for video
frames as torch's interpolate, PIL bicubic for images), in [-1, 1], then VAE-encoded to latents
[C, T_ref, h, w] (an image or video at the sampled size has the latent size of the sampled clip).

Only the frames a prompt's mask strategy copies are decoded and encoded (the original decodes and encodes the
whole video); the others are zeros in the returned latent, which keeps the reference's frame count, so
negative ref_start values count from the video's real end. The 2-D VAE encodes frame by frame, so this equals
encoding the whole video (up to the posterior noise draw when the VAE samples it).

Errors name the prompt, the field and the file: a missing or unreadable file, an unsupported suffix, a URL
(nothing is downloaded at run time), a strategy range past a reference's end.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from opensora.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from opensora.sampling.conditioning import MaskInsertion, resolve_insertion

log = logging.getLogger(__name__)


class ReferenceError(ValueError):
    """A reference file that cannot be used; the message names the file, the prompt and the config key."""


@dataclass
class Reference:
    """One reference of one prompt: its path, frame count and the frames its strategy copies, read as
    [3, len(frames), H, W] float32 in [-1, 1] (`pixels`, aligned with `frames`)."""

    path: str
    num_frames: int
    frames: list[int]
    pixels: Optional[np.ndarray] = None


def _where(prompt_index: int, ref_id: int, path: str, key: str) -> str:
    return f"{key}: reference {ref_id} of prompt {prompt_index} ({path})"


def frame_count(path: str, prompt_index: int = 0, ref_id: int = 0, key: str = "task.reference_path") -> int:
    """1 for an image, the number of frames of a video (its header, via decord); errors name the file."""
    where = _where(prompt_index, ref_id, path, key)
    if "://" in path:
        raise ReferenceError(f"{where} is a URL: nothing is downloaded at run time; download it and give its local "
                             "path")
    p = Path(path)
    if not p.is_file():
        raise ReferenceError(f"{where}: no such file")
    suffix = p.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return 1
    if suffix not in VIDEO_EXTENSIONS:
        raise ReferenceError(f"{where}: unsupported file type {suffix or '(none)'}; images "
                             f"{', '.join(IMAGE_EXTENSIONS)} or videos {', '.join(VIDEO_EXTENSIONS)}")
    from opensora.utils.video_io import open_video

    try:
        n = len(open_video(p, num_threads=1))
    except Exception as e:  # noqa: BLE001 - decord raises several types; the message names the file
        raise ReferenceError(f"{where}: cannot be read as a video ({type(e).__name__}: {e})") from e
    if n < 1:
        raise ReferenceError(f"{where}: the video has no frames")
    return int(n)


def needed_frames(insertions: Sequence[MaskInsertion], ref_id: int, ref_frames: int, clip_frames: int,
                  prompt_index: int = 0) -> list[int]:
    """The frames of reference `ref_id` that `insertions` copy (all insertions, every loop), sorted; the
    ranges are checked against the reference and a clip of `clip_frames` latent frames (MaskStrategyError)."""
    used: set[int] = set()
    for j, ins in enumerate(insertions):
        if ins.ref_id != ref_id:
            continue
        rs, _ = resolve_insertion(ins, clip_frames, ref_frames, prompt_index, j)
        used.update([0] if ref_frames == 1 else range(rs, rs + ins.length))
    return sorted(used)


def read_frames_at(path: str, frames: Sequence[int], size, prompt_index: int = 0, ref_id: int = 0,
                   key: str = "task.reference_path") -> np.ndarray:
    """Frames `frames` of an image / video, resize-cropped to `size` -> [3, len(frames), H, W] float32."""
    from opensora.data.fill_crop import fill_crop_image, fill_crop_video

    where = _where(prompt_index, ref_id, path, key)
    p = Path(path)
    try:
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            from PIL import Image

            with Image.open(p) as im:
                x = fill_crop_image(im, size)  # [1, H, W, 3]
        else:
            from opensora.utils.video_io import open_video, read_frames

            x = fill_crop_video(read_frames(open_video(p, num_threads=1), list(frames)), size)
    except Exception as e:  # noqa: BLE001 - PIL / decord raise several types; the message names the file
        raise ReferenceError(f"{where}: cannot be read ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # [T, H, W, 3] -> [3, T, H, W]


def read_references(paths: Sequence[str], insertions: Sequence[MaskInsertion], size, clip_frames: int,
                    prompt_index: int = 0, key: str = "task.reference_path") -> list[Reference]:
    """Every reference of one prompt, with the frames its insertions copy read at `size` (pixels)."""
    refs = []
    for ref_id, path in enumerate(paths):
        n = frame_count(path, prompt_index, ref_id, key)
        frames = needed_frames(insertions, ref_id, n, clip_frames, prompt_index)
        if not frames:
            log.warning("%s is not used by the mask strategy of prompt %d", _where(prompt_index, ref_id, path, key),
                        prompt_index)
        pixels = read_frames_at(path, frames, size, prompt_index, ref_id, key) if frames else None
        refs.append(Reference(path, n, frames, pixels))
    return refs


def encode_references(refs: Sequence[Reference], vae, latent_hw: Sequence[int]) -> list[np.ndarray]:
    """VAE latents [C, T_ref, h, w] of one prompt's references: the read frames encoded, zeros elsewhere."""
    out = []
    for ref in refs:
        h, w = int(latent_hw[0]), int(latent_hw[1])
        z = np.zeros((int(vae.latent_channels), ref.num_frames, h, w), dtype=np.float32)
        if ref.frames:
            enc = encode_any_size(vae, ref.pixels[None])[0]  # [C, len(frames), h', w']
            if enc.shape[2:] != (h, w):
                raise ValueError(f"reference {ref.path} encodes to latents of {enc.shape[2]}x{enc.shape[3]}, the "
                                 f"sampled clip has {h}x{w}: the VAE's downsampling does not match vae.downsample")
            z[:, ref.frames] = enc
        out.append(z)
    return out


def encode_any_size(vae, x: np.ndarray) -> np.ndarray:
    """vae.encode on frames of any size (the SD VAE refuses sizes its factor does not divide unless asked)."""
    import inspect

    if "strict_size" in inspect.signature(vae.encode).parameters:
        return np.asarray(vae.encode(x, strict_size=False), dtype=np.float32)
    return np.asarray(vae.encode(x), dtype=np.float32)
