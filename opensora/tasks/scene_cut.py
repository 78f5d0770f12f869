"""Scene-cut task: cut the scenes found by task=scene_detect into clips, and list the clips in a CSV.

    python run.py task=scene_cut task.csv_path=meta/videos_timestamp.csv task.min_seconds=2 task.max_seconds=15
    # -> clips in meta/videos_timestamp_clips/ and their CSV meta/videos_timestamp_clips.csv

One row per clip: path (relative to the output CSV's folder when the clips are under it), the source
row's text, the clip's own num_frames, height, width, aspect_ratio, fps (measured from the written file),
then source (the video's path), scene_index, scene_start and scene_end (s in the source) and the source
row's other columns. Options and the differences from the original in opensora.data.scenes. Resumable
per video; a video whose cut fails is left out and listed in <output>_failed.csv.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from opensora.data.media_info import PROBE_COLUMNS
from opensora.data.resumable import map_rows
from opensora.data.row_task import init_tool_worker, output_path, write_failed
from opensora.data.scenes import clip_name, cut_row, scale_filter
from opensora.data.table import media_folder, media_paths, read_table, require_columns, write_table
from opensora.tasks.common import record_run, run_dir

log = logging.getLogger(__name__)

CLIP_COLUMNS = ["num_frames", "height", "width", "aspect_ratio", "fps"]


def _check_names(paths) -> None:
    """Two videos must not give the same clip names (same folder and name, other extension or root)."""
    seen: dict = {}
    for p in dict.fromkeys(paths):
        name = clip_name(p, 0)
        if name in seen:
            raise ValueError(f"videos {seen[name]!r} and {p!r} would both write clips named {name!r}: rename one")
        seen[name] = p


def _optional(value, kind):
    return None if value is None else kind(value)


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    record_run(cfg, run_dir(cfg))
    csv = task.csv_path
    out = output_path(task, "clips")
    save_dir = Path(task.save_dir) if task.get("save_dir") else out.with_suffix("")
    opts = {"save_dir": str(save_dir.resolve()), "min_seconds": _optional(task.min_seconds, float),
            "max_seconds": _optional(task.max_seconds, float), "target_fps": _optional(task.target_fps, float),
            "shorter_size": _optional(task.shorter_size, int), "upscale": bool(task.upscale), "crf": int(task.crf)}
    try:
        scale_filter(opts["shorter_size"], opts["upscale"])  # checks the size before any work
    except ValueError as e:
        raise ValueError(f"task.{e}") from None
    for key in ("min_seconds", "max_seconds", "target_fps"):
        if opts[key] is not None and opts[key] <= 0:
            raise ValueError(f"task.{key}={opts[key]} must be positive (or null)")
    df = read_table(csv).reset_index(drop=True)
    require_columns(df, ["timestamp"], csv, "task=scene_cut")
    _check_names(df["path"])
    files = media_paths(df, media_folder(csv, task.get("video_folder")))
    fps = pd.to_numeric(df["fps"], errors="coerce") if "fps" in df.columns else pd.Series(float("nan"), df.index)
    items = [{"file": f, "path": p, "timestamp": str(t), "fps": None if pd.isna(v) or v <= 0 else float(v)}
             for f, p, t, v in zip(files, df["path"], df["timestamp"], fps)]
    results = map_rows(functools.partial(cut_row, **opts), files, items, out, opts, int(task.num_workers),
                       initializer=init_tool_worker, desc="scene_cut")

    carried = [c for c in df.columns if c not in set(PROBE_COLUMNS) | {"path", "timestamp", "resolution"}]
    in_csv_folder = save_dir.resolve().is_relative_to(out.resolve().parent)
    rows, failed = [], []
    for i, f in enumerate(files):
        ok, clips, error = results[f]
        if not ok:
            failed.append((df.at[i, "path"], error))
            continue
        for clip in clips:
            file = save_dir.resolve() / clip["clip"]
            path = os.path.relpath(file, out.resolve().parent) if in_csv_folder else str(file)
            rows.append({"path": Path(path).as_posix(), **{c: clip[c] for c in CLIP_COLUMNS},
                         "source": df.at[i, "path"], "scene_index": clip["scene_index"],
                         "scene_start": clip["scene_start"], "scene_end": clip["scene_end"],
                         **{c: df.at[i, c] for c in carried}})
    columns = ["path", *CLIP_COLUMNS, "source", "scene_index", "scene_start", "scene_end", *carried]
    table = pd.DataFrame(rows, columns=columns)
    if "text" not in table.columns:
        table["text"] = ""
    write_table(table, out)
    failed_csv = write_failed(failed, out)
    log.info("scene_cut: %d videos -> %d clips in %s, listed in %s%s", len(df) - len(failed), len(table), save_dir,
             out, f"; {len(failed)} failed (listed in {failed_csv})" if failed else "")
    return {"scene_cut/clips": len(table), "scene_cut/failed_videos": len(failed)}
