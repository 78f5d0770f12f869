"""Video-text pairs of any size and length, trained in buckets (Open-Sora 1.1's VariableVideoTextDataset).

    path,text,num_frames,height,width,aspect_ratio,fps      # task=scan_videos writes exactly these
    clips/a.mp4,a dog runs on the beach,300,720,1280,0.5625,30
    stills/b.png,a cat asleep on a sofa,1,1024,1024,1.0,120

(`video,caption` work as well.) num_frames, height and width decide each row's bucket (opensora/data/bucket.py);
a CSV without them is refused with the command that measures them. The sampler (opensora/data/sampler.py) gives
each sample as a `SampleKey`: its row and the bucket's frames T and pixel size H x W. Loading it:
- a video: T frames spread over a random window of T * frame_interval frames (`linspace`, as 1.0 and 1.1),
  resized and center-cropped to H x W as 1.1's `resize_crop` (opensora.data.video.resize_crop_to_fill);
- an image: one frame (T = 1), PIL bicubic resize-to-fill and center crop as 1.1 does for images, fps 120.
The item carries, besides "video" (or a cached "latent") and the caption (or its cached embedding), the size
conditioning STDiT2 takes, one float32 per sample: num_frames (T), height, width (the bucket's pixels, as 1.1
passes them), ar and fps:
- ar_condition "width/height" (default, v1.1.0's training data and so the released stage-2/3 weights) or
  "height/width" (1.1's inference and the later fix #375): what the model sees as `ar`;
- fps_condition "video" (default, v1.1.0: the container's frame rate, 24 when unknown) or "video/interval"
  (the later fix #444, 1.2: fps // frame_interval, the rate of the sampled frames); images are 120 either way.
A model must be sampled with the convention it was trained with.

Cached latents (task=embed_video with this data): one latent per video per bucket size it can train at,
`<folder>/<T>x<H>x<W>/<video>.npz` (the window of epoch 0, as the fixed-size cache), listed in index.csv with
the size. A missing entry is a bad sample (skipped and counted, replaced from its bucket).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pandas as pd

from opensora.data.cache import check_meta, read_index
from opensora.data.loader import BadSampleError
from opensora.data.sampler import SizeTable
from opensora.data.video import VideoTextDataset, _short, is_image, resize_crop_to_fill

log = logging.getLogger(__name__)

IMAGE_FPS = 120.0  # Open-Sora 1.1's IMG_FPS
DEFAULT_FPS = 24.0  # v1.1.0's fps of a video whose container gives none
SIZE_COLUMNS = ("num_frames", "height", "width")
AR_CONDITIONS = ("width/height", "height/width")
FPS_CONDITIONS = ("video", "video/interval")


@dataclass(frozen=True)
class SampleKey:
    """One sample of a bucketed micro-batch: its CSV row, the bucket's frames and pixel size, and rows of the
    same bucket that may stand in for it when it is bad (`VariableVideoTextDataset.replacement`)."""

    row: int
    num_frames: int
    height: int
    width: int
    spares: tuple = ()


def size_dir(num_frames: int, height: int, width: int) -> str:
    """The cache folder of one bucket size: `16x240x426`."""
    return f"{int(num_frames)}x{int(height)}x{int(width)}"


class VariableVideoTextDataset(VideoTextDataset):
    """Rows of a sized video-caption CSV, loaded at the size of their bucket (see the module docstring).

    `load(key: SampleKey, epoch)` returns a dict: video [3, T, H, W] float32 in [-1, 1] (or latent [C, T, h, w]
    from video_embed_folder), caption, text_emb + mask (with text_embed_folder), and num_frames, height, width,
    ar, fps (float32 scalars). Randomness (the frame window) comes from default_rng([seed, epoch, row]).
    Bad samples raise BadSampleError (the loader counts and replaces them).
    """

    def __init__(self, csv_path: str, video_folder: Optional[str] = None, frame_interval: int = 3,
                 text_embed_folder: Optional[str] = None, video_embed_folder: Optional[str] = None,
                 text_cache_settings: Optional[Mapping] = None, video_cache_settings: Optional[Mapping] = None,
                 seed: int = 0, decode_threads: int = 1, ar_condition: str = "width/height",
                 fps_condition: str = "video"):
        if ar_condition not in AR_CONDITIONS:
            raise ValueError(f"data.ar_condition={ar_condition!r}: expected one of {AR_CONDITIONS} ('width/height' "
                             "is v1.1.0's training data, 'height/width' its inference)")
        if fps_condition not in FPS_CONDITIONS:
            raise ValueError(f"data.fps_condition={fps_condition!r}: expected one of {FPS_CONDITIONS}")
        super().__init__(csv_path, video_folder, num_frames=1, frame_interval=frame_interval, image_size=1,
                         text_embed_folder=text_embed_folder, text_cache_settings=text_cache_settings, seed=seed,
                         decode_threads=decode_threads)
        missing = [c for c in SIZE_COLUMNS if c not in self.table.columns]
        if missing:
            raise ValueError(
                f"{csv_path}: no column(s) {', '.join(missing)}; bucketed training needs each file's num_frames, "
                f"height and width. Measure them with `python run.py task=scan_videos task.csv_path={csv_path}` "
                "(writes path,text,num_frames,height,width,aspect_ratio,fps) or task=datautil task.info=missing, "
                "and train on its output")
        self.sizes = SizeTable.from_frame(self.table)
        unknown = np.flatnonzero(~(np.isfinite(self.sizes.num_frames) & np.isfinite(self.sizes.height)
                                   & np.isfinite(self.sizes.width)))
        if len(unknown):
            rows = ", ".join(str(i + 1) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            log.warning("%s: %d row(s) have no number in num_frames/height/width (row %s); they get no bucket "
                        "(counted as size_unknown in the bucket report)", csv_path, len(unknown), rows)
        self.csv_fps = (pd.to_numeric(self.table["fps"], errors="coerce").to_numpy(np.float64)
                        if "fps" in self.table.columns else None)
        self.ar_condition, self.fps_condition = ar_condition, fps_condition
        self.bucket_latents: dict = {}  # (video, T, H, W) -> .npz path in video_embed_folder
        if video_embed_folder:
            self.video_cache = Path(video_embed_folder)
            check_meta(self.video_cache, "video", dict(video_cache_settings or {}), "data.video_embed_folder")
            index = read_index(self.video_cache)
            if not set(SIZE_COLUMNS) <= set(index.columns):
                raise ValueError(f"data.video_embed_folder={video_embed_folder}: its index.csv has no bucket sizes "
                                 "(num_frames, height, width); it is a fixed-size cache. Build one for this data with "
                                 "task=embed_video and the same data settings")
            for row in index.itertuples(index=False):
                key = (str(row.video), int(row.num_frames), int(row.height), int(row.width))
                self.bucket_latents[key] = str(row.path)

    # ------------------------------------------------------------ the sampler's keys
    def replacement(self, key: SampleKey, rng: np.random.Generator) -> SampleKey:
        """Another sample of the same bucket for a bad one: one of its spares (drawn by the loader's rng)."""
        if not key.spares:
            return key
        return replace(key, row=int(key.spares[int(rng.integers(len(key.spares)))]))

    def row_of(self, key) -> int:
        return int(key.row) if isinstance(key, SampleKey) else int(key)

    # ------------------------------------------------------------ items
    def conditions(self, key: SampleKey, fps: float) -> dict:
        """The size conditioning of a sample (see the module docstring)."""
        t, h, w = key.num_frames, key.height, key.width
        if t > 1 and self.fps_condition == "video/interval":
            fps = float(fps // self.frame_interval)
        ar = w / h if self.ar_condition == "width/height" else h / w
        return {"num_frames": np.float32(t), "height": np.float32(h), "width": np.float32(w),
                "ar": np.float32(ar), "fps": np.float32(fps)}

    def sized_clip(self, key: SampleKey, epoch: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
        """(video [3, T, H, W] float32 in [-1, 1] at the key's size, frame indices, fps) of the key's row."""
        i = key.row
        path = self.path_of(i)
        if not path.is_file():
            raise BadSampleError(str(path), "file not found")
        if is_image(str(path)):
            if key.num_frames != 1:
                raise BadSampleError(str(path), f"an image in a {key.num_frames}-frame bucket (the CSV says it "
                                                f"has {self.table['num_frames'][i]} frames)")
            try:
                x = self._image(path, key.height, key.width)
            except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
                raise BadSampleError(str(path), f"unreadable image ({_short(e)})") from None
            return x, np.zeros(1, np.int64), IMAGE_FPS
        frames, indices, fps = self.read_window(path, i, epoch, key.num_frames,
                                                f"too short for {key.num_frames} frames")
        x = resize_crop_to_fill(frames, (key.height, key.width))  # [T, H, W, 3]
        if not np.isfinite(fps) or fps <= 0:
            fps = float(self.csv_fps[i]) if self.csv_fps is not None and np.isfinite(self.csv_fps[i]) else DEFAULT_FPS
        return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), indices, fps

    @staticmethod
    def _image(path: Path, th: int, tw: int) -> np.ndarray:
        """[3, 1, th, tw] in [-1, 1]: PIL bicubic resize so the image covers th x tw, center crop (1.1's
        resize_crop_to_fill of images, offsets round((resized - target) / 2))."""
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            rh, rw = th / h, tw / w
            if rh > rw:
                sh, sw = th, round(w * rh)
                top, left = 0, int(round((sw - tw) / 2.0))
            else:
                sh, sw = round(h * rw), tw
                top, left = int(round((sh - th) / 2.0)), 0
            arr = np.asarray(im.resize((sw, sh), Image.BICUBIC), dtype=np.float32)[top:top + th, left:left + tw]
        x = arr * np.float32(2.0 / 255.0) - np.float32(1.0)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[:, None])  # [H, W, 3] -> [3, 1, H, W]

    def bucket_latent(self, key: SampleKey, epoch: int = 0) -> tuple[np.ndarray, float]:
        """(latent [C, T, h, w], fps) from the bucket cache; a posterior sample when it holds latent_std."""
        video = self.videos[key.row]
        name = self.bucket_latents.get((video, key.num_frames, key.height, key.width))
        what = f"latent at {size_dir(key.num_frames, key.height, key.width)}"
        path = self._cache_file(self.video_cache, name, what, key.row)
        try:
            with np.load(path) as f:
                z = f["latent"].astype(np.float32)
                std = f["latent_std"].astype(np.float32) if "latent_std" in f.files else None
                fps = float(f["fps"]) if "fps" in f.files else DEFAULT_FPS
        except Exception as e:  # noqa: BLE001
            raise BadSampleError(str(path), f"unreadable video latent ({_short(e)})") from None
        if std is not None:
            z = z + std * self.rng(key.row, epoch, 1).standard_normal(z.shape, dtype=np.float32)
        return z, fps

    def load(self, key, epoch: int = 0) -> dict:
        if not isinstance(key, SampleKey):
            raise TypeError(f"{type(self).__name__} loads samples by SampleKey (row and bucket size), got {key!r}; "
                            "it is read through the bucket sampler (data.bucket_config)")
        if not 0 <= key.row < len(self):
            raise IndexError(f"row {key.row} out of range for {len(self)} rows of {self.csv_path}")
        item = {"caption": self.captions[key.row]}
        if self.text_folder is not None:
            item["text_emb"], item["mask"] = self.text_embedding(key.row)
        if self.video_cache is not None:
            item["latent"], fps = self.bucket_latent(key, epoch)
        else:
            item["video"], _, fps = self.sized_clip(key, epoch)
        item.update(self.conditions(key, fps))
        return item

    def __getitem__(self, i):
        raise TypeError(f"{type(self).__name__} is indexed by SampleKey through the bucket sampler: use "
                        "load(SampleKey(row, num_frames, height, width), epoch)")
