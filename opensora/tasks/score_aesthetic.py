"""Score-aesthetic task: the LAION aesthetic score of every clip of a CSV -> column `aes`.

    python run.py task=score_aesthetic task.csv_path=clips.csv      # -> clips_aes.csv beside it

As Open-Sora's tools/scoring/aesthetic/inference.py (v1.1.0): frames at 10 / 50 / 90 % of each video
(task.num_frames 3; 1: 50 %, 2: 25 / 50 %) taken of the CSV's `num_frames` when it has that column, else
of the video's frame count; an image is scored once. Each frame: CLIP (`clip=`, ViT-L/14 as the original)
image embedding, L2-normalised, through the LAION MLP head (task.head_path, opensora/eval/aesthetic.py);
the clip's `aes` is the mean over its frames. Preprocessing is transformers' CLIPImageProcessor (see
opensora/eval/clip_processing.py for how it differs from OpenAI's by at most a one-pixel crop shift).

Unlike the original, rows are not dropped for a score <= 0 (only unreadable rows are left out, and
listed in <output>_failed.csv); the output keeps every input column, and a second run resumes (see
opensora/tasks/scoring.py). Returns the mean score.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from opensora.data.frames import FramePixels
from opensora.eval.aesthetic import load_aesthetic_head
from opensora.eval.clip import batched_call, build_clip
from opensora.tasks.common import record_run, run_dir
from opensora.tasks.scoring import default_output, read_table, resolve, score_csv

log = logging.getLogger(__name__)

NUM_FRAMES_POINTS = {1: (0.5,), 2: (0.25, 0.5), 3: (0.1, 0.5, 0.9)}


def _int_or_none(value):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def run(cfg: DictConfig) -> float:
    task = cfg.task
    if int(task.num_frames) not in NUM_FRAMES_POINTS:
        raise ValueError(f"task.num_frames={task.num_frames}: 1, 2 or 3 frames per clip (at {NUM_FRAMES_POINTS})")
    df, path_col, _ = read_table(task.get("csv_path"), "task.csv_path", "score_aesthetic")
    folder = Path(task.video_folder) if task.get("video_folder") else Path(task.csv_path).resolve().parent
    output = Path(task.output_csv) if task.get("output_csv") else default_output(task.csv_path, "aes")
    head = load_aesthetic_head(task.get("head_path"), "task.head_path")
    clip = build_clip(cfg.clip, with_text=False)
    if head.sizes[0] != clip.config.projection_dim:
        raise ValueError(f"task.head_path={task.head_path} takes {head.sizes[0]}-d embeddings, but "
                         f"clip.from_pretrained={cfg.clip.from_pretrained} gives {clip.config.projection_dim}-d ones "
                         "(the released head is for CLIP ViT-L/14: clip=vit_l14)")
    out = run_dir(cfg)
    record_run(cfg, out)
    has_count = "num_frames" in df.columns

    def load_args(row):
        return resolve(row[path_col], folder), _int_or_none(row["num_frames"]) if has_count else None

    def score(rows):
        pixels = np.concatenate([p for _, p in rows])  # [sum k, 3, S, S]
        scores = batched_call(head, (clip.image_features(pixels),), clip.batch_size)  # [sum k]
        ends = np.cumsum([len(p) for _, p in rows])
        return [float(s.mean()) for s in np.split(scores, ends[:-1])]

    load = FramePixels(clip.processor, points=NUM_FRAMES_POINTS[int(task.num_frames)])
    result = score_csv(df, [path_col], "aes", output, load, load_args, score, int(task.batch_size),
                       int(task.num_workers), bool(task.overwrite), desc="score_aesthetic")
    return result["mean"]
