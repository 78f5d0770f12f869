"""Scan-videos task: measure every video (and image) of a folder or CSV and keep those that pass filters.

    python run.py task=scan_videos task.folder=my/clips task.filters.min_frames=48 task.filters.min_height=256
    python run.py task=scan_videos task.csv_path=my/clips.csv task.folder=my/clips   # keeps the CSV's columns

Writes two CSVs: the kept rows (task.output_csv, default <run>/videos.csv) with exactly the training
columns path,text,num_frames,height,width,aspect_ratio (= height / width),fps first (text from the input
CSV's text or caption column, empty for a folder; then the input CSV's other columns), so it trains
directly; and scan.csv (every file: the same columns, then duration in s, readable, error, keep). Paths
are relative to task.folder as data.video_folder expects; measurements as opensora.data.media_info's. A
file is readable when decord opens it and (task.check_decode) decodes its first and last frames, which
finds truncated files.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from opensora.data.loader import map_ordered, worker_process_setup
from opensora.data.media_info import PROBE_COLUMNS, find_media, probe  # noqa: F401 - probe re-exported
from opensora.data.table import write_table
from opensora.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image
from opensora.tasks.common import record_run, run_dir

log = logging.getLogger(__name__)

INFO_COLUMNS = PROBE_COLUMNS


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
        df = df.rename(columns={old: new for old, new in (("video", "path"), ("caption", "text"))
                                if old in df.columns and new not in df.columns})
        col = "path"
    elif folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"task.folder={folder} does not exist")
        col = "path"
        df = pd.DataFrame({col: find_media(folder)})
        if len(df) == 0:
            raise ValueError(f"task.folder={folder} holds no video or image files ({', '.join(VIDEO_EXTENSIONS)}, "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
    else:
        raise ValueError("task=scan_videos needs task.folder (a folder to walk) or task.csv_path (a CSV of videos)")

    paths = [str(Path(v) if Path(v).is_absolute() else folder / v) for v in df[col]]
    measure = functools.partial(probe, check_decode=bool(task.check_decode))
    infos = list(tqdm(map_ordered(measure, paths, int(task.num_workers), initializer=worker_process_setup),
                      total=len(paths), desc="scan", dynamic_ncols=True))
    df = pd.concat([df.reset_index(drop=True), pd.DataFrame(infos, columns=INFO_COLUMNS)], axis=1)
    if "text" not in df.columns:
        df["text"] = ""  # no captions yet: caption the videos before training
    video = ~df[col].map(is_image)
    df["keep"] = apply_filters(df, task.get("filters"), video)
    unreadable = df[~df["readable"]]
    for path, err in zip(unreadable[col], unreadable["error"]):
        log.warning("unreadable: %s (%s)", path, err)

    kept_csv = Path(task.output_csv) if task.get("output_csv") else out / "videos.csv"
    scan_csv = kept_csv.with_name(f"{kept_csv.stem}_scan.csv") if task.get("output_csv") else out / "scan.csv"
    kept_csv.parent.mkdir(parents=True, exist_ok=True)
    write_table(df, scan_csv)
    kept = df[df["keep"]].drop(columns=["duration", "readable", "error", "keep"])
    write_table(kept, kept_csv)
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
