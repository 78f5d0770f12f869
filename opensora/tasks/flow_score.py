"""Flow-score task: how much a video moves, the mean Farneback optical flow over frames 0, 10, 20, 30.

    python run.py task=flow_score task.csv_path=meta/clips.csv          # -> meta/clips_flow.csv

Adds the column `flow` (px at 320 x 576). Computed like Open-Sora 1.1's UniMatch scorer but with
Farneback flow, which needs no weights: its values are not comparable with the original's `flow`
(see opensora.data.motion); filter with task=datautil task.flowmin=...
"""
from __future__ import annotations

import functools

from omegaconf import DictConfig

from opensora.data.motion import flow_score
from opensora.data.row_task import run_over_rows
from opensora.tasks.common import record_run, run_dir


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    record_run(cfg, run_dir(cfg))
    frames, size = [int(i) for i in task.frame_indices], [int(s) for s in task.size]
    if len(frames) < 2 or min(frames) < 0 or len(size) != 2 or min(size) < 2:
        raise ValueError(f"task.frame_indices={frames} needs two or more indices >= 0 and task.size={size} [H, W] "
                         "with both >= 2")
    settings = {"frame_indices": frames, "size": size}
    df, _ = run_over_rows(task, functools.partial(flow_score, **settings), "flow", settings, "flow_score")
    if len(df):
        print(f"flow score: mean {df['flow'].mean():.3g}, min {df['flow'].min():.3g}, max {df['flow'].max():.3g}",
              flush=True)
    return {"flow_score/clips": len(df), "flow_score/mean": float(df["flow"].mean()) if len(df) else float("nan")}
