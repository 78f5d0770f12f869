"""Loader throughput on real mp4 files: clips/s of decode + resize + crop for 16x256x256 clips
(interval 3) with 0, 2 and 4 worker processes, against the training step it has to feed.

    python benchmarks/data_loader.py                          # 720p sources, workers 0 2 4
    python benchmarks/data_loader.py --height 360 --width 640 # smaller sources
    python benchmarks/data_loader.py --videos 4 --batches 2   # a quick smoke run

Generates `--videos` H.264 clips (moving gradients with noise, `--frames` frames at `--fps`) in a
temporary folder, then times `--batches` batches of `--batch-size` clips through
opensora.data.loader.BatchLoader over opensora.data.video.VideoTextDataset (the first batch, which
includes starting the workers, is not timed). Also prints the in-process split of one clip's time
into decoding and the transform, and the clips/s a training step needs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Seed port of Open-Sora 1.0 on Ascend 910* (SPEC.md §5): seconds per step and batch per device.
REFERENCE_STEPS = {"16x256x256 bs2": (1.10, 2), "16x512x512 bs1": (1.67, 1), "64x512x512 bs1": (6.70, 1)}


def make_videos(folder: Path, n: int, frames: int, height: int, width: int, fps: int) -> Path:
    import imageio_ffmpeg
    import pandas as pd

    rows = []
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for k in range(n):
        path = folder / f"clip{k:03d}.mp4"
        writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                             pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
                                             ffmpeg_log_level="error", output_params=["-crf", "23", "-preset", "veryfast"])
        writer.send(None)
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(xx / 40 + phase[c]) + np.cos(yy / 55 + phase[c]) for c in range(3)], -1)
        base = np.clip(127 + 60 * base + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
        for t in range(frames):  # the pattern pans by 3 px/frame and drifts down by 1 px/frame
            writer.send(np.ascontiguousarray(np.roll(base, (t, 3 * t), axis=(0, 1))))
        writer.close()
        rows.append((path.name, f"clip {k}"))
    csv = folder / "clips.csv"
    pd.DataFrame(rows, columns=["video", "caption"]).to_csv(csv, index=False)
    return csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--frames", type=int, default=150, help="frames per source video")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--decode-threads", type=int, default=1)
    ap.add_argument("--folder", type=str, default=None, help="reuse/keep the generated videos here")
    args = ap.parse_args()

    import mindspore  # noqa: F401 - before decord

    from opensora.data.loader import BatchLoader
    from opensora.data.video import VideoTextDataset, resize_crop

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="loader-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "clips.csv"
    if not csv.is_file():
        t0 = time.perf_counter()
        make_videos(folder, args.videos, args.frames, args.height, args.width, args.fps)
        print(f"generated {args.videos} videos {args.width}x{args.height}, {args.frames} frames @ {args.fps} fps "
              f"in {time.perf_counter() - t0:.1f} s -> {folder}")
    size_mb = sum(p.stat().st_size for p in folder.glob("*.mp4")) / 2**20
    print(f"sources: {args.videos} x {args.width}x{args.height}, {args.frames} frames, {size_mb:.1f} MiB in all; "
          f"clips: {args.num_frames}x{args.size}x{args.size}, interval {args.interval}; cpus: {os.cpu_count()} "
          f"(load avg {os.getloadavg()[0]:.1f})")
    ds = VideoTextDataset(str(csv), num_frames=args.num_frames, frame_interval=args.interval, image_size=args.size,
                          seed=0, decode_threads=args.decode_threads)

    decode, transform = [], []
    for i in range(min(len(ds), 6)):
        t0 = time.perf_counter()
        frames, _ = ds.read_clip(i, 0)
        t1 = time.perf_counter()
        resize_crop(frames, args.size)
        transform.append(time.perf_counter() - t1)
        decode.append(t1 - t0)
    print(f"one clip in-process: decode {np.median(decode) * 1e3:.0f} ms, resize+crop {np.median(transform) * 1e3:.0f} ms "
          f"(median of {len(decode)})")

    results = {}
    for w in args.workers:
        loader = BatchLoader(ds, args.batch_size, seed=0, num_workers=w, prefetch=max(2, w))
        it = iter(loader)
        t0 = time.perf_counter()
        next(it)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        dt = time.perf_counter() - t0
        loader.close()
        results[w] = args.batches * args.batch_size / dt
        print(f"workers {w}: {results[w]:6.2f} clips/s  ({dt / args.batches:.2f} s per batch of {args.batch_size}; "
              f"first batch {start:.1f} s; batch {list(batch['video'].shape)})", flush=True)

    print("\ntraining steps to keep up with (seed port, Ascend 910*, per device):")
    for name, (sec, bs) in REFERENCE_STEPS.items():
        need = bs / sec
        print(f"  {name}: {sec:.2f} s/step -> {need:.2f} clips/s per device, {8 * need:.1f} clips/s for 8 devices on one host")


if __name__ == "__main__":
    main()
