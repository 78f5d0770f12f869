"""Score-matching task: how well each clip matches its caption -> column `match`.

    python run.py task=score_matching task.csv_path=clips.csv       # -> clips_match.csv beside it

As Open-Sora's tools/scoring/matching/inference.py (v1.1.0): the middle frame (int(0.5 * frame count))
of each video, or the image, and the caption; match = logit_scale * cos(CLIP image embedding, CLIP
text embedding) with the model's own logit scale (100 for OpenAI's CLIPs), CLIP = `clip=` (ViT-L/14 as
the original). Captions are tokenized as CLIPTokenizerFast does, truncated to 77 tokens as OpenAI's
clip.tokenize(truncate=True). Rows are keyed by (path, caption): one video with two captions gets two
scores. The output keeps every input column; a second run resumes (opensora/tasks/scoring.py).
Returns the mean score.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from opensora.data.frames import FramePixels
from opensora.eval.clip import build_clip
from opensora.tasks.common import record_run, run_dir
from opensora.tasks.scoring import default_output, read_table, resolve, score_csv

log = logging.getLogger(__name__)

POINTS = (0.5,)


def run(cfg: DictConfig) -> float:
    task = cfg.task
    df, path_col, text_col = read_table(task.get("csv_path"), "task.csv_path", "score_matching", need_text=True)
    folder = Path(task.video_folder) if task.get("video_folder") else Path(task.csv_path).resolve().parent
    output = Path(task.output_csv) if task.get("output_csv") else default_output(task.csv_path, "match")
    clip = build_clip(cfg.clip)
    out = run_dir(cfg)
    record_run(cfg, out)

    def load_args(row):
        return (resolve(row[path_col], folder),)  # the video's own frame count, as the original

    def score(rows):
        image = clip.image_features(np.concatenate([p[:1] for _, p in rows]))  # [B, P], unit norm
        text = clip.text_features([key[1] for key, _ in rows])
        return list(clip.logit_scale * (image * text).sum(-1))

    result = score_csv(df, [path_col, text_col], "match", output, FramePixels(clip.processor, points=POINTS),
                       load_args, score, int(task.batch_size), int(task.num_workers), bool(task.overwrite),
                       desc="score_matching")
    return result["mean"]
