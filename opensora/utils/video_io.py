"""Video files: model tensors to uint8 frames, browser-playable mp4 (H.264, yuv420p), GIF / PNG grids."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

_GAP = 2          # px between grid cells (after upscaling)
_GAP_VALUE = 128  # grey
_LINE_H = 11      # px per label line (PIL's default bitmap font is ~6x11)
_CHAR_W = 6


def to_uint8_frames(x) -> np.ndarray:
    """Video -> [T, H, W, 3] uint8.

    Accepts [C, T, H, W] float in [-1, 1] (model space, C in {1, 3}), [T, H, W, C] float in [0, 1], or
    [T, H, W, C] uint8; channels-last is assumed when the last axis has 1 or 3 entries.
    """
    if hasattr(x, "asnumpy"):
        x = x.asnumpy()
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected a 4-d video ([C, T, H, W] or [T, H, W, C]), got shape {x.shape}")
    if x.shape[-1] in (1, 3):
        if x.dtype != np.uint8:
            x = np.round(np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif x.shape[0] in (1, 3):
        x = x.astype(np.float32).transpose(1, 2, 3, 0)  # [C, T, H, W] -> [T, H, W, C]
        x = np.round(np.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
    else:
        raise ValueError(f"cannot tell the channel axis of a video of shape {x.shape}: need 1 or 3 channels")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    if factor < 1:
        raise ValueError(f"upscale must be >= 1, got {factor}")
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)  # nearest neighbour


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _atomic_write(path, write) -> str:
    from opensora.utils.tensor_files import atomic_write

    return str(atomic_write(path, write))


def save_video(frames, path, fps: int = 8, upscale: int = 1) -> str:
    """Write uint8 frames [T, H, W, 3] as an H.264 / yuv420p mp4 that browsers play; returns the path.

    Frames are upscaled `upscale` times (nearest neighbour), then padded on the bottom/right by
    repeating the edge to even sizes (yuv420p needs them). Written to a temp file, then renamed.
    """
    import imageio_ffmpeg

    frames = _upscale(_check_frames(frames), int(upscale))
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", "12", "-movflags", "+faststart"])
        writer.send(None)  # start ffmpeg
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()

    return _atomic_write(path, write)


def save_image(frame, path, upscale: int = 1) -> str:
    """Write one uint8 frame [H, W, 3] as a PNG (upscaled `upscale` times, nearest neighbour); returns the path.
    Written to a temp file, then renamed."""
    import imageio.v3 as iio

    frame = _upscale(_check_frames(np.asarray(frame)[None]), int(upscale))[0]
    return _atomic_write(path, lambda tmp: iio.imwrite(tmp, frame, extension=".png"))


# Set in data-loader worker processes, which never load MindSpore (see `_decord`).
DECORD_WITHOUT_MINDSPORE = False


def _decord():
    """The decord module. MindSpore must be loaded before decord: the other order aborts the process
    when MindSpore starts ("random_device could not be read"), e.g. in a test session that uses both.
    Loader workers that never load MindSpore skip that import (it costs seconds and memory)."""
    if not DECORD_WITHOUT_MINDSPORE:
        import mindspore  # noqa: F401
    import decord

    return decord


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    """One decord frame [H, W, row_bytes / W] -> [H, W, 3] (see `read_video` on padded rows)."""
    h, w = frame.shape[:2]
    if frame.shape[2] == 3:
        return frame
    return np.ascontiguousarray(frame.reshape(h, -1)[:, :w * 3]).reshape(h, w, 3)


def open_video(path, num_threads: int = 0):
    """A decord VideoReader on `path` (`num_threads` decoder threads, 0: decord's default)."""
    decord = _decord()
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=int(num_threads))


def read_frames(reader, indices) -> np.ndarray:
    """Frames `indices` of an open VideoReader -> [len(indices), H, W, 3] uint8; only those frames are
    decoded (plus what seeking needs). Handles decord's padded-row frames like `read_video`."""
    decord = _decord()
    indices = [int(i) for i in indices]
    try:
        frames = reader.get_batch(indices).asnumpy()
        if frames.ndim == 4 and frames.shape[-1] == 3:
            return frames
    except decord.DECORDError:
        frame = reader[indices[0]].asnumpy()
        if frame.shape[2] == 3:  # not the padded-row case: a real decoding error
            raise
    return np.stack([_as_rgb(reader[i].asnumpy()) for i in indices])


def video_info(reader) -> dict:
    """num_frames, fps, height, width of an open VideoReader (frame 0 is decoded for the size)."""
    n = len(reader)
    h, w = reader[0].shape[:2] if n else (0, 0)
    return {"num_frames": int(n), "fps": float(reader.get_avg_fps()), "height": int(h), "width": int(w)}


def read_video(path) -> np.ndarray:
    """Decode a video file with decord -> [T, H, W, 3] uint8.

    decord 0.6 mis-shapes frames whose RGB rows are padded (e.g. widths 16, 24, 48: a 16x16 frame comes
    back as [16, 16, 6] with each 96-byte row holding 48 real bytes, and `get_batch` fails); such frames
    are read one at a time and their rows cropped to width * 3 bytes.
    """
    # MindSpore must be loaded before decord: the other order aborts the process when MindSpore
    # starts ("random_device could not be read"), e.g. in a test session that uses both.
    import mindspore  # noqa: F401
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    try:
        return reader.get_batch(list(range(len(reader)))).asnumpy()
    except decord.DECORDError:
        frames = []
        for i in range(len(reader)):
            f = reader[i].asnumpy()  # [H, W, row_bytes / W]
            h, w = f.shape[:2]
            frames.append(np.ascontiguousarray(f.reshape(h, -1)[:, :w * 3]).reshape(h, w, 3))
        return np.stack(frames)


def _label_strip(text: str, width: int) -> Optional[np.ndarray]:
    """Text wrapped to `width` px on a black strip [h, width, 3] uint8; None if PIL is unavailable."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - pillow comes with imageio
        return None
    per_line = max(1, width // _CHAR_W)
    words, lines, line = text.split(), [], ""
    for word in words:
        while len(word) > per_line:  # hard-wrap words longer than a line
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:per_line])
            word = word[per_line:]
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    image = Image.new("RGB", (width, _LINE_H * max(1, len(lines)) + 1))
    draw = ImageDraw.Draw(image)
    for i, text_line in enumerate(lines):
        draw.text((1, i * _LINE_H), text_line, fill=(255, 255, 255))
    return np.asarray(image, dtype=np.uint8)


def grid_frames(videos: Sequence[np.ndarray], nrow: Optional[int] = None, upscale: int = 1,
                labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """Tile videos [T_i, H, W, 3] uint8 into one video [T, H', W', 3]; `nrow` videos per row.

    Shorter videos hold their last frame; cells are separated by grey gaps; `labels` are drawn under
    each cell (wrapped to its width).
    """
    if not videos:
        raise ValueError("no videos to put in a grid")
    videos = [_upscale(_check_frames(v), int(upscale)) for v in videos]
    if len({v.shape[1:] for v in videos}) != 1:
        raise ValueError(f"grid videos must share H and W, got {sorted({v.shape[1:3] for v in videos})}")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"{len(labels)} labels for {len(videos)} videos")
    n = len(videos)
    ncol = int(nrow) if nrow else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    t = max(v.shape[0] for v in videos)
    h, w = videos[0].shape[1:3]
    strips = [_label_strip(str(s), w) for s in labels] if labels is not None else []
    strips = [s for s in strips if s is not None]
    label_h = max((s.shape[0] for s in strips), default=0)
    cell_h = h + label_h
    out = np.full((t, nrows * cell_h + (nrows + 1) * _GAP, ncol * w + (ncol + 1) * _GAP, 3), _GAP_VALUE, np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, ncol)
        y, x = _GAP + r * (cell_h + _GAP), _GAP + c * (w + _GAP)
        v = np.concatenate([v, np.repeat(v[-1:], t - v.shape[0], axis=0)]) if v.shape[0] < t else v
        out[:, y:y + h, x:x + w] = v
        if label_h:
            out[:, y + h:y + cell_h, x:x + w] = 0
            if i < len(strips):
                out[:, y + h:y + h + strips[i].shape[0], x:x + w] = strips[i]
    return out


def save_grid(videos: Sequence[np.ndarray], path, nrow: Optional[int] = None, fps: int = 8, upscale: int = 1,
              labels: Optional[Sequence[str]] = None) -> str:
    """Animated, looping GIF of a grid of uint8 videos (see `grid_frames`); returns the path.

    Pillow merges identical consecutive frames, so a grid of static videos may read back shorter.
    """
    import imageio.v3 as iio

    frames = grid_frames(videos, nrow=nrow, upscale=upscale, labels=labels)
    return _atomic_write(path, lambda tmp: iio.imwrite(tmp, frames, extension=".gif", plugin="pillow",
                                                       duration=1000.0 / fps, loop=0))


def save_grid_png(videos: Sequence[np.ndarray], path, nrow: Optional[int] = None, upscale: int = 1,
                  labels: Optional[Sequence[str]] = None) -> str:
    """PNG of the grid's first and last frames side by side (a still preview of the motion)."""
    import imageio.v3 as iio

    frames = grid_frames(videos, nrow=nrow, upscale=upscale, labels=labels)
    gap = np.full((frames.shape[1], 4 * _GAP, 3), 255, np.uint8)
    image = np.concatenate([frames[0], gap, frames[-1]], axis=1)
    return _atomic_write(path, lambda tmp: iio.imwrite(tmp, image, extension=".png"))
