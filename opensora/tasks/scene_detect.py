"""Scene-detection task: the scenes of every video of a CSV (PySceneDetect's AdaptiveDetector).

    python run.py task=scene_detect task.csv_path=meta/videos.csv        # -> meta/videos_timestamp.csv

Adds the column `timestamp` (the scenes as a list of (start, end) timecodes, see opensora.data.scenes)
to every row; task=scene_cut cuts them. Resumable; unreadable videos are left out and listed.
"""
from __future__ import annotations

import functools

from omegaconf import DictConfig

from opensora.data.row_task import run_over_rows
from opensora.data.scenes import scene_timestamp
from opensora.tasks.common import record_run, run_dir


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    record_run(cfg, run_dir(cfg))
    settings = {"adaptive_threshold": float(task.adaptive_threshold), "min_scene_len": int(task.min_scene_len),
                "start_in_scene": bool(task.start_in_scene)}
    df, _ = run_over_rows(task, functools.partial(scene_timestamp, **settings), "timestamp", settings, "scene_detect")
    return {"scene_detect/videos": len(df)}
