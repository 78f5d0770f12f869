"""CPU throughput of the data tools (the README's "Data processing" figures): clips/s of scan_videos,
scene_detect, scene_cut, datautil info, camera_motion and flow_score on generated H.264 videos.

    python benchmarks/data_tools_cpu.py                                   # 8 videos, 10 s, 640x360 @ 24 fps
    python benchmarks/data_tools_cpu.py --videos 4 --seconds 4 --height 180 --width 320   # a quick run

Each source has two scenes (a hard cut half-way): a blurred-noise texture panning right 1 px/frame, then
another one tilting down 0.5 px/frame. The tools run as `python run.py task=<tool>` would (the task's run
function on the composed config, `--workers` worker processes), one after the other on the previous one's
output; the time of each includes starting its workers but not Python's or MindSpore's start-up. scene_cut
keeps the size and fps (shorter_size = the source's height, target_fps null), so the clips are the scenes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_videos(folder: Path, n: int, frames: int, height: int, width: int, fps: int) -> Path:
    """n videos: a window over a blurred-noise texture panning right 1 px/frame, then (a hard cut) another
    texture tilting down 0.5 px/frame."""
    import cv2
    import pandas as pd

    from opensora.utils.video_io import save_video

    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        half = frames // 2
        scenes = []
        for count, (dx, dy) in ((half, (1.0, 0.0)), (frames - half, (0.0, 0.5))):
            tex = cv2.GaussianBlur(rng.random((height + 200, width + 300, 3)).astype(np.float32), (0, 0), 3)
            tex = np.round((tex - tex.min()) / (tex.max() - tex.min()) * 255).astype(np.uint8)
            scenes.append(np.stack([cv2.warpAffine(tex, np.float32([[1, 0, dx * t], [0, 1, dy * t]]), (width, height),
                                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                                   borderMode=cv2.BORDER_REFLECT) for t in range(count)]))
        save_video(np.concatenate(scenes), folder / f"video{k:03d}.mp4", fps=fps)
        rows.append((f"video{k:03d}.mp4", f"a generated video {k}"))
    csv = folder / "videos.csv"
    pd.DataFrame(rows, columns=["video", "caption"]).to_csv(csv, index=False)
    return csv


def compose(overrides, out: Path):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import open_dict

    from opensora.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*overrides, "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--folder", type=str, default=None, help="work here (default: a new temporary folder)")
    args = ap.parse_args()

    import mindspore  # noqa: F401 - before decord
    from hydra.utils import get_method

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="data-tools-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    frames = int(round(args.seconds * args.fps))
    t0 = time.perf_counter()
    make_videos(folder, args.videos, frames, args.height, args.width, args.fps)
    print(f"{args.videos} videos {args.width}x{args.height}, {frames} frames @ {args.fps} fps (two scenes each), "
          f"made in {time.perf_counter() - t0:.1f} s in {folder}; {os.cpu_count()} cpus, "
          f"load avg {os.getloadavg()[0]:.1f}, {args.workers} workers", flush=True)
    w = f"task.num_workers={args.workers}"
    steps = [
        ("scan_videos", "videos", ["task=scan_videos", f"task.csv_path={folder / 'videos.csv'}",
                                   f"task.output_csv={folder / 'meta.csv'}", w]),
        ("scene_detect", "videos", ["task=scene_detect", f"task.csv_path={folder / 'meta.csv'}", w]),
        ("scene_cut", "videos", ["task=scene_cut", f"task.csv_path={folder / 'meta_timestamp.csv'}",
                                 "task.target_fps=null", f"task.shorter_size={args.height}", w]),
        ("datautil info", "clips", ["task=datautil", f"task.csv_path={folder / 'meta_timestamp_clips.csv'}",
                                    "task.info=all", w]),
        ("camera_motion", "clips", ["task=camera_motion", f"task.csv_path={folder / 'meta_timestamp_clips.csv'}", w]),
        ("flow_score", "clips", ["task=flow_score", f"task.csv_path={folder / 'meta_timestamp_clips.csv'}", w]),
    ]
    import pandas as pd

    for name, unit, overrides in steps:
        cfg = compose(overrides, folder / "runs" / name.replace(" ", "_"))
        rows = len(pd.read_csv(cfg.task.csv_path))
        t0 = time.perf_counter()
        get_method(cfg.task._target_)(cfg)
        dt = time.perf_counter() - t0
        print(f"{name:14s} {rows:3d} {unit:6s} in {dt:6.1f} s: {rows / dt:6.2f} {unit}/s", flush=True)
    clips = pd.read_csv(folder / "meta_timestamp_clips.csv")
    print(f"clips: {len(clips)}, {clips.num_frames.min()}..{clips.num_frames.max()} frames, "
          f"{clips.width.iloc[0]}x{clips.height.iloc[0]}")


if __name__ == "__main__":
    main()
