"""Scan-videos task: measure every video (and image) of a folder or CSV and keep those that pass filters.

    python run.py task=scan_videos task.folder=my/clips task.filters.min_frames=48 task.filters.min_height=256
    python run.py task=scan_videos task.csv_path=my/clips.csv task.folder=my/clips   # keeps the CSV's columns

Writes two CSVs: scan.csv (every file: num_frames, height, width, fps, aspect_ratio = height / width,
duration in s, readable, error, keep) and the kept rows (task.output_csv, default <run>/videos.csv),
with paths relative to task.folder as data.video_folder expects. A file is readable when decord opens
it and (task.check_decode) decodes its first and last frames, which finds truncated files.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from opensora.data.loader import map_ordered, worker_process_setup
from opensora.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image
from opensora.tasks.common import record_run, run_dir

log = logging.getLogger(__name__)

INFO_COLUMNS = ["num_frames", "height", "width", "fps", "aspect_ratio", "duration", "readable", "error"]
_CHECK: dict = {"decode": True}


def _init(check_decode: bool) -> None:
    worker_process_setup()
    _CHECK["decode"] = bool(check_decode)


def probe(path: str, check_decode: bool = True) -> dict:
    """num_frames, height, width, fps, aspect_ratio (H / W), duration (s), readable, error of one file;
    images have 1 frame, fps 0 and duration 0."""
    info = {"num_frames": 0, "height": 0, "width": 0, "fps": 0.0, "aspect_ratio": float("nan"), "duration": 0.0,
            "readable": False, "error": ""}
    p = Path(path)
    try:
        if not p.is_file():
            raise FileNotFoundError("file not found")
        if is_image(path):
            from opensora.data.video import read_image

            h, w = read_image(p).shape[:2] if check_decode else _image_size(p)
            info.update(num_frames=1, height=h, width=w)
        else:
            from opensora.utils.video_io import open_video, read_frames, video_info

            reader = open_video(p, num_threads=1)
            n, fps = len(reader), float(reader.get_avg_fps())
            info.update(num_frames=n, fps=fps, duration=n / fps if fps > 0 else 0.0)  # from the header
            if n < 1:
                raise ValueError("no frames")
            meta = video_info(reader)  # decodes frame 0
            info.update(height=meta["height"], width=meta["width"])
            if check_decode:
                read_frames(reader, [0, n - 1])
            del reader
        info["aspect_ratio"] = info["height"] / info["width"] if info["width"] else float("nan")
        info["readable"] = True
    except Exception as e:  # noqa: BLE001 - any failure means unreadable
        info["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return info


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _probe(path: str) -> dict:
    return probe(path, _CHECK["decode"])


def find_media(folder: Path) -> list[str]:
    """Video and image files under `folder` (recursive), as sorted POSIX paths relative to it."""
    exts = set(VIDEO_EXTENSIONS) | set(IMAGE_EXTENSIONS)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def apply_filters(df: pd.DataFrame, filters, video: pd.Series) -> pd.Series:
    """Boolean `keep` per row, and logs how many rows each filter removes. Frame count and duration
    filters apply to videos only (`video` marks them; an image is repeated over the frames)."""
    f = dict(filters or {})
    keep = pd.Series(True, index=df.index)
    checks = [
        ("readable", f.get("readable", True), lambda v: df["readable"].astype(bool)),
        ("min_frames", f.get("min_frames"), lambda v: ~video | (df["num_frames"] >= v)),
        ("min_height", f.get("min_height"), lambda v: df["height"] >= v),
        ("min_width", f.get("min_width"), lambda v: df["width"] >= v),
        ("min_fps", f.get("min_fps"), lambda v: ~video | (df["fps"] >= v)),
        ("min_duration", f.get("min_duration"), lambda v: ~video | (df["duration"] >= v)),
        ("max_duration", f.get("max_duration"), lambda v: ~video | (df["duration"] <= v)),
        ("min_aspect_ratio", f.get("min_aspect_ratio"), lambda v: df["aspect_ratio"] >= v),
        ("max_aspect_ratio", f.get("max_aspect_ratio"), lambda v: df["aspect_ratio"] <= v),
    ]
    known = {name for name, _, _ in checks}
    unknown = set(f) - known
    if unknown:
        raise ValueError(f"task.filters has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    for name, value, test in checks:
        if value is None or value is False:
            continue
        ok = test(value).fillna(False).astype(bool)
        removed = int((keep & ~ok).sum())
        if removed:
            log.info("filter %s=%s removes %d file(s)", name, value, removed)
        keep &= ok
    return keep


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    out = run_dir(cfg)
    record_run(cfg, out)
    folder = Path(task.folder) if task.get("folder") else None
    if task.get("csv_path"):
        csv = Path(task.csv_path)
        if not csv.is_file():
            raise FileNotFoundError(f"task.csv_path={csv} does not exist")
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        col = "video" if "video" in df.columns else "path" if "path" in df.columns else None
        if col is None:
            raise ValueError(f"{csv}: no 'video' (or 'path') column; it has: {', '.join(df.columns)}")
        folder = folder or csv.resolve().parent
        df = df.drop(columns=[c for c in INFO_COLUMNS if c in df.columns])
    elif folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"task.folder={folder} does not exist")
        col = "video"
        df = pd.DataFrame({col: find_media(folder)})
        if len(df) == 0:
            raise ValueError(f"task.folder={folder} holds no video or image files ({', '.join(VIDEO_EXTENSIONS)}, "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
    else:
        raise ValueError("task=scan_videos needs task.folder (a folder to walk) or task.csv_path (a CSV of videos)")

    paths = [str(Path(v) if Path(v).is_absolute() else folder / v) for v in df[col]]
    infos = list(tqdm(map_ordered(_probe, paths, int(task.num_workers), initializer=_init,
                                  initargs=(bool(task.check_decode),)), total=len(paths), desc="scan",
                      dynamic_ncols=True))
    df = pd.concat([df.reset_index(drop=True), pd.DataFrame(infos, columns=INFO_COLUMNS)], axis=1)
    video = ~df[col].map(is_image)
    df["keep"] = apply_filters(df, task.get("filters"), video)
    unreadable = df[~df["readable"]]
    for path, err in zip(unreadable[col], unreadable["error"]):
        log.warning("unreadable: %s (%s)", path, err)

    kept_csv = Path(task.output_csv) if task.get("output_csv") else out / "videos.csv"
    scan_csv = kept_csv.with_name(f"{kept_csv.stem}_scan.csv") if task.get("output_csv") else out / "scan.csv"
    kept_csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(scan_csv, index=False)
    kept = df[df["keep"]].drop(columns=["readable", "error", "keep"])
    kept.to_csv(kept_csv, index=False)
    log.info("scanned %d files under %s: %d videos, %d images, %d unreadable; kept %d -> %s (all: %s)",
             len(df), folder, int((video & df["readable"]).sum()), int((~video & df["readable"]).sum()),
             len(unreadable), len(kept), kept_csv, scan_csv)
    if len(kept) and video.any():
        v = df[df["keep"] & video]
        if len(v):
            log.info("kept videos: frames %d..%d, height %d..%d, width %d..%d, fps %.3g..%.3g", v.num_frames.min(),
                     v.num_frames.max(), v.height.min(), v.height.max(), v.width.min(), v.width.max(), v.fps.min(),
                     v.fps.max())
    return {"scan_videos/kept": len(kept)}
