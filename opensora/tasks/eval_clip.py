"""Eval-CLIP task: the CLIP score of videos against their prompts.

    python run.py task=eval_clip task.samples_dir=outputs/runs/<run>/samples     # what task=sample wrote
    python run.py task=eval_clip task.csv_path=videos.csv                        # path,text (or video,caption)

CLIP score of a video = the mean over its frames of max(100 * cos(image embedding, text embedding), 0):
torchmetrics' CLIPScore (Hessel et al. 2021's CLIP-S with the weight 100 in place of 2.5, the scale
text-to-video papers report), computed per frame and averaged, with every frame (task.num_frames
null) or N evenly spaced ones. The CLIP is `clip=` (default ViT-L/14, torchmetrics' default model).
A video that cannot be read is counted and listed, never fatal.

Writes <run>/clip_score.csv (the input's columns + clip_score, frames, error) and clip_score.json
(mean, counts, failures, settings), prints a table, logs eval_clip/* to W&B. Returns eval_clip/clip_score
(the mean) and the counts.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from opensora.data.frames import FramePixels, evenly_spaced
from opensora.data.resumable import RateMeter, map_safely
from opensora.data.row_task import init_tool_worker
from opensora.data.table import media_folder, media_paths, read_table, require_columns
from opensora.eval.clip import build_clip
from opensora.logger import build_logger
from opensora.tasks.common import record_run, run_dir

log = logging.getLogger(__name__)

SCORE_WEIGHT = 100.0


def clip_score(image_features: np.ndarray, text_feature: np.ndarray) -> float:
    """Mean over frames of max(100 cos, 0) for unit-norm image features [k, P] and a text feature [P]."""
    return float(np.maximum(SCORE_WEIGHT * (image_features @ text_feature), 0.0).mean())


def read_samples(samples_dir) -> pd.DataFrame:
    """path,text of the videos task=sample wrote to a folder (its prompts.json)."""
    folder = Path(samples_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"task.samples_dir={samples_dir} does not exist: point it at the samples folder of a "
                                "task=sample run (outputs/runs/<run>/samples)")
    index = folder / "prompts.json"
    if not index.is_file():
        raise FileNotFoundError(f"task.samples_dir={samples_dir} has no prompts.json, so it was not written by "
                                "task=sample; score other videos with task.csv_path=CSV (columns path,text)")
    entries = json.loads(index.read_text())
    bad = [e for e in entries if not isinstance(e, dict) or "prompt" not in e or "video" not in e]
    if bad or not entries:
        raise ValueError(f"{index}: expected a list of {{'prompt', 'video'}} entries, got {bad[:1] or 'none'}")
    return pd.DataFrame({"path": [str(e["video"]) for e in entries], "text": [str(e["prompt"]) for e in entries]})


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    if task.get("samples_dir") and task.get("csv_path"):
        raise ValueError("task=eval_clip: set task.samples_dir or task.csv_path, not both")
    path_col, text_col = "path", "text"
    if task.get("samples_dir"):
        df, folder = read_samples(task.samples_dir), Path(task.samples_dir)
    elif task.get("csv_path"):
        df = read_table(task.csv_path)
        require_columns(df, [text_col], task.csv_path, "task=eval_clip (the prompt each video is scored against)")
        folder = media_folder(task.csv_path, task.get("video_folder"))
    else:
        raise ValueError("task=eval_clip needs task.samples_dir (a folder written by task=sample) or task.csv_path "
                         "(a CSV with path,text columns)")
    evenly_spaced(task.get("num_frames"))  # checks task.num_frames before CLIP loads
    clip = build_clip(cfg.clip)
    out = run_dir(cfg)
    record_run(cfg, out)

    prompts = list(dict.fromkeys(df[text_col]))
    text = dict(zip(prompts, clip.text_features(prompts)))
    keys = list(dict.fromkeys(zip(df[path_col], df[text_col])))
    paths = list(dict.fromkeys(k[0] for k in keys))
    files = dict(zip(df[path_col], media_paths(df, folder)))
    load = FramePixels(clip.processor, num_frames=task.get("num_frames"))
    stream = zip(paths, map_safely(load, [files[p] for p in paths], task.num_workers, init_tool_worker))
    by_path = {}
    for p, t in keys:
        by_path.setdefault(p, []).append(t)
    scores: dict = {}
    frames: dict = {}
    failures: dict = {}
    logger = build_logger(cfg)
    exit_code = 1
    meter = RateMeter("videos")
    try:
        for rel, (ok, pixels, reason) in tqdm(stream, total=len(paths), desc="eval_clip", dynamic_ncols=True):
            if not ok:
                failures[rel] = reason
                log.warning("eval_clip: cannot score %s: %s (%d failed so far)", rel, reason, len(failures))
                continue
            features = clip.image_features(pixels)  # [k, P], unit norm
            frames[rel] = len(features)
            for t in by_path[rel]:
                scores[(rel, t)] = clip_score(features, text[t])
            meter.update(1)

        table = df.copy()
        row_keys = list(zip(df[path_col], df[text_col]))
        table["clip_score"] = [scores.get(k, np.nan) for k in row_keys]
        table["frames"] = [frames.get(k[0], np.nan) for k in row_keys]
        table["error"] = [failures.get(k[0], "") for k in row_keys]
        table.to_csv(out / "clip_score.csv", index=False)
        values = np.array(list(scores.values()), np.float64)
        mean = float(values.mean()) if len(values) else float("nan")
        report = {"clip_score": mean, "num_videos": len(frames), "num_scored_pairs": len(scores),
                  "num_failed": len(failures), "failures": failures,
                  "definition": "mean over frames of max(100 * cos(CLIP image, CLIP text), 0)",
                  "frames_per_video": task.get("num_frames") or "all", "clip": str(cfg.clip.from_pretrained),
                  "source": str(task.get("samples_dir") or task.get("csv_path"))}
        (out / "clip_score.json").write_text(json.dumps(report, indent=1, default=str))
        with pd.option_context("display.max_colwidth", 60, "display.width", 160, "display.float_format",
                               "{:.3f}".format):
            print("\n" + table[[path_col, text_col, "clip_score", "frames", "error"]].head(20).to_string(index=False))
        if len(table) > 20:
            print(f"... {len(table) - 20} more rows in clip_score.csv")
        print(f"clip_score (mean over {len(scores)} video-prompt pairs, {len(failures)} videos failed): {mean:.4f}\n",
              flush=True)
        logger.log({"eval_clip/clip_score": mean})
        logger.log_table("eval_clip/videos", table[[path_col, text_col, "clip_score", "frames", "error"]])
        logger.summary({"eval_clip/clip_score": mean, "eval_clip/num_videos": len(frames),
                        "eval_clip/num_failed": len(failures)})
        exit_code = 0
    finally:
        logger.finish(exit_code)
    log.info("eval_clip: %d videos scored, %d failed -> %s", len(frames), len(failures), out / "clip_score.csv")
    log.info("eval_clip: %s", meter.summary())
    return {"eval_clip/clip_score": mean, "eval_clip/videos": len(frames), "eval_clip/failed": len(failures)}
