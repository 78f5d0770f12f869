"""Score-match task: how well each clip matches its caption -> column `match`.

    python run.py task=score_match task.csv_path=meta/clips.csv       # -> meta/clips_match.csv

As Open-Sora's tools/scoring/matching/inference.py (v1.1.0): the middle frame (int(0.5 * frame count)) of
each video, or the image, and the caption; match = logit_scale * cos(CLIP image embedding, CLIP text
embedding) with the model's own logit scale (100 for OpenAI's CLIPs), CLIP = `clip=` (ViT-L/14 as the
original). Captions are tokenized as CLIPTokenizerFast does, truncated to 77 tokens as OpenAI's
clip.tokenize(truncate=True). Rows are keyed by (path, caption): one video with two captions gets two
scores. Like the other data tools (opensora/data/row_task.py): every input column kept, resumable,
unreadable rows listed in <output>_failed.csv. Filter with task=datautil task.matchmin=...
"""
from __future__ import annotations

import json
import math

import numpy as np
from omegaconf import DictConfig

from opensora.data.cache import content_fingerprint
from opensora.data.frames import FramePixels
from opensora.data.row_task import score_over_rows
from opensora.eval.clip import build_clip
from opensora.tasks.common import record_run, run_dir

POINTS = (0.5,)


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    clip = build_clip(cfg.clip)
    record_run(cfg, run_dir(cfg))
    settings = {"clip": content_fingerprint(clip.folder), "points": list(POINTS)}

    def score(rows):
        image = clip.image_features(np.concatenate([p[:1] for _, p in rows]))  # [B, P], unit norm
        text = clip.text_features([json.loads(key)[1] for key, _ in rows])  # the key is [file, caption]
        return list(clip.logit_scale * (image * text).sum(-1))

    df, _ = score_over_rows(task, FramePixels(clip.processor, points=POINTS), lambda row: (), score, "match", "match",
                            settings, "score_match", key_columns=("path", "text"), required=("text",),
                            purpose="task=score_match (the caption each clip is matched against)")
    if len(df):
        print(f"matching score: mean {df['match'].mean():.3f}, min {df['match'].min():.3f}, "
              f"max {df['match'].max():.3f}", flush=True)
    return {"score_match/clips": len(df), "score_match/mean": float(df["match"].mean()) if len(df) else math.nan}
