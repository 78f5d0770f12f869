"""Score-aesthetic task: the LAION aesthetic score of every clip of a CSV -> column `aes`.

    python run.py task=score_aesthetic task.csv_path=meta/clips.csv      # -> meta/clips_aes.csv

As Open-Sora's tools/scoring/aesthetic/inference.py (v1.1.0): frames at 10 / 50 / 90 % of each video
(task.num_frames 3; 1: 50 %, 2: 25 / 50 %) taken of the CSV's `num_frames` when the row has one, else of
the video's frame count; an image is scored once. Each frame: CLIP (`clip=`, ViT-L/14 as the original)
image embedding, L2-normalised, through the LAION MLP head (task.head_path, opensora/eval/aesthetic.py);
the clip's `aes` is the mean over its frames. Preprocessing is transformers' CLIPImageProcessor (see
opensora/eval/clip_processing.py for how it differs from OpenAI's: at most a one-pixel crop shift).

Like the other data tools (opensora/data/row_task.py): every input column is kept (training columns first,
missing size columns measured), a killed run resumes from its progress log, unreadable rows are listed in
<output>_failed.csv. Unlike the original, rows scoring <= 0 are kept: filtering is task=datautil's
(task.aesmin). Filter with task=datautil task.aesmin=5 (the original docs' threshold).
"""
from __future__ import annotations

import math

import numpy as np
from omegaconf import DictConfig

from opensora.data.cache import content_fingerprint
from opensora.data.frames import FramePixels
from opensora.data.row_task import score_over_rows
from opensora.eval.aesthetic import load_aesthetic_head
from opensora.eval.clip import batched_call, build_clip
from opensora.tasks.common import record_run, run_dir

NUM_FRAMES_POINTS = {1: (0.5,), 2: (0.25, 0.5), 3: (0.1, 0.5, 0.9)}


def _frame_count(row):
    """The row's num_frames (None when absent or empty)."""
    value = row.get("num_frames")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return int(value) if math.isfinite(value) and value > 0 else None


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    points = NUM_FRAMES_POINTS[int(task.num_frames)]
    head = load_aesthetic_head(task.head_path, "task.head_path")
    clip = build_clip(cfg.clip, with_text=False)
    if head.sizes[0] != clip.config.projection_dim:
        raise ValueError(f"task.head_path={task.head_path} takes {head.sizes[0]}-d embeddings, but "
                         f"clip.from_pretrained={cfg.clip.from_pretrained} gives {clip.config.projection_dim}-d ones "
                         "(the released head is for CLIP ViT-L/14: clip=vit_l14)")
    record_run(cfg, run_dir(cfg))
    settings = {"clip": content_fingerprint(clip.folder), "head": content_fingerprint(task.head_path),
                "points": list(points)}

    def score(rows):
        pixels = np.concatenate([p for _, p in rows])  # [sum k, 3, S, S]
        scores = batched_call(head, (clip.image_features(pixels),), clip.batch_size)  # [sum k]
        ends = np.cumsum([len(p) for _, p in rows])
        return [float(s.mean()) for s in np.split(scores, ends[:-1])]

    df, _ = score_over_rows(task, FramePixels(clip.processor, points=points), lambda row: (_frame_count(row),),
                            score, "aes", "aes", settings, "score_aesthetic")
    if len(df):
        print(f"aesthetic score: mean {df['aes'].mean():.3f}, min {df['aes'].min():.3f}, max {df['aes'].max():.3f}",
              flush=True)
    return {"score_aesthetic/clips": len(df), "score_aesthetic/mean": float(df["aes"].mean()) if len(df) else math.nan}
