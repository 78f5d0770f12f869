"""Camera-motion task: a camera-motion label per video from Farneback optical flow.

    python run.py task=camera_motion task.csv_path=meta/clips.csv       # -> meta/clips_cmotion.csv

Adds the column `cmotion` (static, zoom in, zoom out, pan left, pan right, tilt up, tilt down, pan/tilt,
dynamic or unknown; method, thresholds and the differences from the original in opensora.data.motion).
"""
from __future__ import annotations

import functools

from omegaconf import DictConfig

from opensora.data.motion import camera_motion
from opensora.data.row_task import run_over_rows
from opensora.tasks.common import record_run, run_dir


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    record_run(cfg, run_dir(cfg))
    tau_zoom = [float(v) for v in task.tau_zoom]
    if len(tau_zoom) != 2 or not tau_zoom[0] <= tau_zoom[1]:
        raise ValueError(f"task.tau_zoom={list(task.tau_zoom)} must be [low, high] with low <= high")
    settings = {"frame_interval": int(task.frame_interval), "tau_static": float(task.tau_static),
                "tau_zoom": tau_zoom, "reference": str(task.reference)}
    if settings["frame_interval"] < 1:
        raise ValueError(f"task.frame_interval={task.frame_interval} must be >= 1")
    if settings["reference"] not in ("previous", "first"):
        raise ValueError(f"task.reference={task.reference} must be 'previous' or 'first'")
    df, _ = run_over_rows(task, functools.partial(camera_motion, **settings), "cmotion", settings, "camera_motion")
    if len(df):
        counts = df["cmotion"].value_counts()
        print("camera motion: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return {"camera_motion/clips": len(df)}
