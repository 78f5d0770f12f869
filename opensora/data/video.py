"""Video-text pairs from a CSV: frame sampling, resize + center crop, and cached embeddings.

    video,caption                      # or path,text (Open-Sora 1.1 CSVs; extra columns are kept)
    clips/vid001.mp4,a dog runs on the beach
    stills/cat.png,a cat asleep on a sofa

Paths are relative to `video_folder` (default: the CSV's folder) unless absolute. Videos are read
with decord, decoding only the sampled frames: a window of num_frames * frame_interval frames at a
random start, num_frames indices spread evenly over it (Open-Sora 1.0's TemporalRandomCrop +
linspace). Frames are resized (bilinear, short side to the target, as torch's
interpolate(scale_factor=...)) and center-cropped to image_size, then mapped to [-1, 1]. Images
(jpg, png, ...) are one frame repeated num_frames times.

With `text_embed_folder` / `video_embed_folder` (written by task=embed_text / task=embed_video)
items carry the cached T5 embedding / VAE latent instead of the caption's encoding / the pixels.
A sample that cannot be read (missing, unreadable, truncated or too-short video, missing cache
file) raises `BadSampleError`, which the loader counts and replaces.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from opensora.data.aspect import as_size
from opensora.data.cache import check_meta, load_text_embedding, read_index
from opensora.data.loader import BadSampleError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif", ".flv", ".wmv", ".mpg", ".mpeg")
COLUMN_SETS = (("video", "caption"), ("path", "text"))


# ================================================================
# CSV
# ================================================================


def read_video_csv(csv_path: str | os.PathLike) -> pd.DataFrame:
    """The CSV as strings with columns renamed to `video`, `caption` (from video,caption or path,text).

    Raises naming the file and, for bad rows, the row (1 = first data row, as in a spreadsheet's line - 1)
    and column: a missing column, an empty path or an empty caption."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.csv_path={csv_path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as CSV ({e})") from e
    columns = [str(c).strip() for c in df.columns]
    df.columns = columns
    for video_col, caption_col in COLUMN_SETS:
        if video_col in columns and caption_col in columns:
            break
    else:
        has = ", ".join(columns) or "none"
        missing = [c for c in ("video", "caption") if c not in columns] if "path" not in columns else \
            [c for c in ("path", "text") if c not in columns]
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the header must hold video,caption "
                         f"(or path,text), it has: {has}")
    df = df.rename(columns={video_col: "video", caption_col: "caption"})
    if len(df) == 0:
        raise ValueError(f"{path}: no rows under the header")
    for col, shown in (("video", video_col), ("caption", caption_col)):
        empty = np.flatnonzero(df[col].str.strip().eq("").to_numpy())
        if len(empty):
            rows = ", ".join(str(i + 1) for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise ValueError(f"{path}: empty {shown!r} in row {rows} (line {empty[0] + 2} of the file, counting "
                             f"the header); every row needs a {shown}")
    df["caption"] = df["caption"].str.strip()
    df["video"] = df["video"].str.strip()
    return df


def cache_name(video: str, taken: set) -> str:
    """The cache file of a CSV path: the same relative path with a .npz suffix (`clips/a.mp4` ->
    `clips/a.npz`); `a.mp4.npz` when `a.npz` is already `taken` (e.g. by `a.png`). Absolute paths
    lose their root. Adds the name to `taken`."""
    p = PurePosixPath(video.replace(os.sep, "/"))
    if p.is_absolute():
        p = PurePosixPath(*p.parts[1:])
    name = str(p.with_suffix(".npz"))
    if name in taken:
        name = f"{p}.npz"
    k = 1
    while name in taken:
        name = f"{p}.{k}.npz"
        k += 1
    taken.add(name)
    return name


# ================================================================
# Frame sampling and transforms
# ================================================================


def sample_frame_indices(total_frames: int, num_frames: int, frame_interval: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Open-Sora 1.0: a window of num_frames * frame_interval frames starting at a random frame in
    [0, max(0, total - window - 1)], cut at the video's end; indices = linspace(start, end - 1,
    num_frames) as ints. Raises ValueError when the window holds fewer than num_frames frames."""
    window = num_frames * frame_interval
    start = int(rng.integers(0, max(0, total_frames - window - 1) + 1))
    end = min(start + window, total_frames)
    if end - start < num_frames:
        raise ValueError(f"{total_frames} frames, fewer than num_frames={num_frames}")
    return np.linspace(start, end - 1, num_frames, dtype=int)


def _linear_taps(in_size: int, scale: float, start: int, count: int, out_size: Optional[int] = None):
    """Source rows (i0, i1) and weights (w0, w1) of outputs start..start+count-1 of a bilinear resize by
    `scale` (torch interpolate, align_corners=False: src = (dst + 0.5) / scale - 0.5, clamped at 0). With
    `out_size` (a resize to a size, torch interpolate(size=...)) the coordinates are torch's float32 ones:
    src = float32(in / out) * (dst + 0.5) - 0.5."""
    if out_size is not None:
        dst = np.arange(start, start + count, dtype=np.float32)
        src = np.maximum(np.float32(in_size / out_size) * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    else:
        dst = np.arange(start, start + count, dtype=np.float64)
        src = np.maximum((dst + 0.5) / scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (1.0 - w1), w1


def resize_crop_geometry(height: int, width: int, size) -> dict:
    """Where resize-short-side + center crop to `size` takes its pixels from a height x width frame:
    {"scale", "resized": (h, w), "offset": (top, left)} (Open-Sora's UCFCenterCropVideo: the scale makes
    the frame cover the target, resized sizes are floor(size * scale), offsets round((resized - target) / 2))."""
    th, tw = as_size(size)
    scale = max(th / height, tw / width)
    rh, rw = max(th, int(np.floor(height * scale))), max(tw, int(np.floor(width * scale)))
    return {"scale": scale, "resized": (rh, rw),
            "offset": (int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0)))}


def resize_crop(frames: np.ndarray, size) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> float32 [T, h, w, 3] in [-1, 1]: bilinear resize of the short side (the
    frame covers `size`), center crop, (x / 255 - 0.5) / 0.5. Only the source rows / columns the crop needs
    are read and only the cropped pixels computed."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    t, h, w, _ = frames.shape
    th, tw = as_size(size)
    geo = resize_crop_geometry(h, w, (th, tw))
    top, left = geo["offset"]
    return bilinear_crop(frames, _linear_taps(h, geo["scale"], top, th), _linear_taps(w, geo["scale"], left, tw))


def resize_crop_to_fill(frames: np.ndarray, size) -> np.ndarray:
    """Open-Sora 1.1's `resize_crop` of videos (its ResizeCrop / resize_crop_to_fill): uint8 frames [T, H, W, 3]
    -> float32 [T, th, tw, 3] in [-1, 1]. The side needing the larger scale is resized to exactly its target,
    the other to round(side * that scale) (torch `interpolate(size=...)`, bilinear, align_corners=False: each
    axis scaled by target / source), then center-cropped at floor((resized - target) / 2)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    _, h, w, _ = frames.shape
    th, tw = as_size(size)
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        top, left = 0, int(round(sw - tw) / 2.0)
    else:
        sh, sw = round(h * rw), tw
        top, left = int(round(sh - th) / 2.0), 0
    return bilinear_crop(frames, _linear_taps(h, sh / h, top, th, sh), _linear_taps(w, sw / w, left, tw, sw))


def bilinear_crop(frames: np.ndarray, rows, cols) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> float32 [T, h, w, 3] in [-1, 1] ((x / 255 - 0.5) / 0.5): the separable bilinear
    resample with the (i0, i1, w0, w1) taps of `_linear_taps` for the output rows and columns. Only the source
    window the taps read is touched."""
    (r0, r1, a0, a1), (c0, c1, b0, b1) = rows, cols
    rlo, clo = int(r0.min()), int(c0.min())
    src = frames[:, rlo:int(r1.max()) + 1, clo:int(c1.max()) + 1]  # the window the crop reads
    r0, r1, c0, c1 = r0 - rlo, r1 - rlo, c0 - clo, c1 - clo
    x = np.multiply(src[:, r0], a0[None, :, None, None], dtype=np.float32)  # rows: [T, th, W', 3]
    x += np.multiply(src[:, r1], a1[None, :, None, None], dtype=np.float32)
    y = np.multiply(x[:, :, c0], b0[None, None, :, None])  # columns: [T, th, tw, 3]
    y += np.multiply(x[:, :, c1], b1[None, None, :, None])
    y *= np.float32(2.0 / 255.0)
    y -= np.float32(1.0)
    return y


def is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 (RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ================================================================
# Dataset
# ================================================================


class VideoTextDataset:
    """Map-style dataset over the rows of a video-caption CSV (see the module docstring).

    `load(i, epoch)` returns a dict:
        video  [3, T, H, W] float32 in [-1, 1]    (or latent [C, T, h, w] from video_embed_folder)
        caption str                                (always)
        text_emb [L, D] float32, mask [L] int32   (only with text_embed_folder)
    and raises BadSampleError for a sample that cannot be read. The random frame window (and the
    posterior sample of a cached latent) comes from default_rng([seed, epoch, i]), so an item does not
    depend on which process loads it. `text_cache_settings` / `video_cache_settings` are compared with
    the settings the caches were built with (opensora.data.cache.check_meta); a mismatch is refused.
    """

    def __init__(self, csv_path: str, video_folder: Optional[str] = None, num_frames: int = 16,
                 frame_interval: int = 3, image_size=256, text_embed_folder: Optional[str] = None,
                 video_embed_folder: Optional[str] = None, text_cache_settings: Optional[Mapping] = None,
                 video_cache_settings: Optional[Mapping] = None, seed: int = 0, decode_threads: int = 1):
        if not csv_path:
            raise ValueError("data.csv_path is not set: point it at a CSV with header video,caption (or path,text), "
                             "e.g. data.csv_path=my/clips.csv data.video_folder=my/clips")
        if int(num_frames) < 1 or int(frame_interval) < 1:
            raise ValueError(f"data.num_frames={num_frames} and data.frame_interval={frame_interval} must be >= 1")
        self.csv_path = str(csv_path)
        self.video_folder = Path(video_folder) if video_folder else Path(csv_path).resolve().parent
        if not self.video_folder.is_dir():
            raise FileNotFoundError(f"data.video_folder={video_folder} does not exist")
        self.num_frames, self.frame_interval = int(num_frames), int(frame_interval)
        self.image_size = as_size(image_size)
        self.seed, self.decode_threads = int(seed), int(decode_threads)
        df = read_video_csv(csv_path)
        self.table = df  # every column of the CSV (as strings), video and caption renamed
        self.videos: list[str] = df["video"].tolist()
        self.captions: list[str] = df["caption"].tolist()
        self.text_folder = self.video_cache = None
        self.text_files: dict = {}  # (video, caption) or caption -> .npz path in text_embed_folder
        self.latent_files: dict = {}  # video -> .npz path in video_embed_folder
        self._text_by_video = False
        if text_embed_folder:
            self.text_folder = Path(text_embed_folder)
            check_meta(self.text_folder, "text", dict(text_cache_settings or {}), "data.text_embed_folder")
            index = read_index(self.text_folder)
            by_video = "video" in index.columns
            for row in index.itertuples(index=False):
                key = (str(row.video), str(row.caption)) if by_video else str(row.caption)
                self.text_files[key] = str(row.path)
            self._text_by_video = by_video
        if video_embed_folder:
            self.video_cache = Path(video_embed_folder)
            check_meta(self.video_cache, "video", dict(video_cache_settings or {}), "data.video_embed_folder")
            index = read_index(self.video_cache)
            if "video" not in index.columns:
                raise ValueError(f"data.video_embed_folder={video_embed_folder}: its index.csv has no 'video' column; "
                                 "it was not written by task=embed_video")
            self.latent_files = {str(v): str(p) for v, p in zip(index["video"], index["path"])}
        if text_cache_settings is None and text_embed_folder:
            log.warning("data.text_embed_folder is used without expected settings: only its kind was checked")
        if video_cache_settings is None and video_embed_folder:
            log.warning("data.video_embed_folder is used without expected settings: only its kind was checked")
        log.info("%d video-caption pairs from %s (videos under %s)%s%s", len(self), csv_path, self.video_folder,
                 f", text embeddings from {text_embed_folder}" if text_embed_folder else "",
                 f", video latents from {video_embed_folder}" if video_embed_folder else "")

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        return self.load(i, 0)

    def path_of(self, i: int) -> Path:
        p = Path(self.videos[i])
        return p if p.is_absolute() else self.video_folder / p

    def rng(self, i: int, epoch: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(i), stream])

    # ------------------------------------------------------------ pixels

    def read_clip(self, i: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 frames [T, H, W, 3] as stored, frame indices [T]) of item i; images give T copies of
        the image and indices of zeros. Raises BadSampleError."""
        path = self.path_of(i)
        if not path.is_file():
            raise BadSampleError(str(path), "file not found")
        if is_image(str(path)):
            try:
                image = read_image(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
                raise BadSampleError(str(path), f"unreadable image ({type(e).__name__}: {e})") from None
            return np.broadcast_to(image, (self.num_frames, *image.shape)), np.zeros(self.num_frames, np.int64)
        frames, indices, _ = self.read_window(path, i, epoch, self.num_frames)
        return frames, indices

    def read_window(self, path: Path, i: int, epoch: int, num_frames: int,
                    too_short: str = "too short") -> tuple[np.ndarray, np.ndarray, float]:
        """(uint8 frames [T, H, W, 3], their indices, the container's fps) of `num_frames` frames of the video at
        `path` (row i) over the random window of epoch `epoch`. Raises BadSampleError."""
        from opensora.utils.video_io import open_video, read_frames

        try:
            reader = open_video(path, self.decode_threads)
            total = len(reader)
            fps = float(reader.get_avg_fps())
        except Exception as e:  # noqa: BLE001
            raise BadSampleError(str(path), f"unreadable video ({_short(e)})") from None
        try:
            indices = sample_frame_indices(total, num_frames, self.frame_interval, self.rng(i, epoch))
        except ValueError as e:
            raise BadSampleError(str(path), f"{too_short}: {e}") from None
        try:
            frames = read_frames(reader, indices)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt stream
            raise BadSampleError(str(path), f"cannot decode frames {indices.tolist()} ({_short(e)})") from None
        finally:
            del reader
        if frames.shape[0] != num_frames or frames.shape[-1] != 3 or frames.size == 0:
            raise BadSampleError(str(path), f"decoded frames of shape {frames.shape}")
        return frames, indices, fps

    def clip(self, i: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(video [3, T, H, W] float32 in [-1, 1] resized and center-cropped to image_size, frame indices)."""
        frames, indices = self.read_clip(i, epoch)
        if frames.shape[1] < 1 or frames.shape[2] < 1:
            raise BadSampleError(str(self.path_of(i)), f"empty frames {frames.shape}")
        if is_image(self.videos[i]):  # transform once, then repeat
            x = np.repeat(resize_crop(frames[:1], self.image_size), self.num_frames, axis=0)
        else:
            x = resize_crop(frames, self.image_size)
        return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), indices  # [T, H, W, 3] -> [3, T, H, W]

    def video(self, i: int, epoch: int = 0) -> np.ndarray:
        return self.clip(i, epoch)[0]

    # ------------------------------------------------------------ caches

    def _cache_file(self, folder: Path, name: Optional[str], what: str, i: int) -> Path:
        if name is None:
            raise BadSampleError(str(self.path_of(i)), f"no {what} in {folder / 'index.csv'}")
        path = folder / name
        if not path.is_file():
            raise BadSampleError(str(path), f"{what} file missing")
        return path

    def text_embedding(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        key = (self.videos[i], self.captions[i]) if self._text_by_video else self.captions[i]
        path = self._cache_file(self.text_folder, self.text_files.get(key), "text embedding", i)
        try:
            return load_text_embedding(path)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign .npz
            raise BadSampleError(str(path), f"unreadable text embedding ({_short(e)})") from None

    def latent(self, i: int, epoch: int = 0) -> np.ndarray:
        """The cached latent [C, T, h, w]; a posterior sample mean + std * N(0, 1) when the cache holds
        latent_std (VAE with sample_posterior), drawn per (seed, epoch, i)."""
        path = self._cache_file(self.video_cache, self.latent_files.get(self.videos[i]), "video latent", i)
        try:
            with np.load(path) as f:
                z = f["latent"].astype(np.float32)
                std = f["latent_std"].astype(np.float32) if "latent_std" in f.files else None
        except Exception as e:  # noqa: BLE001
            raise BadSampleError(str(path), f"unreadable video latent ({_short(e)})") from None
        if std is not None:
            z = z + std * self.rng(i, epoch, 1).standard_normal(z.shape, dtype=np.float32)
        return z

    # ------------------------------------------------------------ items

    def load(self, i: int, epoch: int = 0) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows of {self.csv_path}")
        i %= len(self)
        item = {"caption": self.captions[i]}
        if self.text_folder is not None:
            item["text_emb"], item["mask"] = self.text_embedding(i)
        if self.video_cache is not None:
            item["latent"] = self.latent(i, epoch)
        else:
            item["video"] = self.video(i, epoch)
        return item


def _short(e: Exception) -> str:
    """A decoder error in one line (decord's messages carry a multi-line C++ trace)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def unique_videos(videos: Sequence[str]) -> list[int]:
    """Index of the first row of each distinct video path, in CSV order."""
    seen: dict[str, int] = {}
    for i, v in enumerate(videos):
        seen.setdefault(v, i)
    return list(seen.values())
