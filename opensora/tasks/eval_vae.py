"""Eval-VAE task: reconstruction quality of the configured VAE on a CSV of clips (PSNR, SSIM, LPIPS).

    python run.py task=eval_vae vae=sd_vae_ft_ema task.csv_path=my/clips.csv

Each clip: frames 0, i, ..., (n - 1) * i (task.num_frames, task.frame_interval; a still image is a
1-frame clip), resized (short side, bilinear) and center-cropped to task.image_size as for training
(opensora/data/video.py), encoded and decoded by the VAE (the posterior mean unless
task.sample_posterior), the reconstruction clipped to [-1, 1]; both mapped to [0, 1] and compared
frame by frame (opensora/eval/metrics.py: PSNR and SSIM with data range 1; LPIPS with
task.lpips.alexnet_path and task.lpips.heads_path, opensora/eval/lpips.py), each clip's value being the
mean over its frames. An unreadable or too short clip is counted and listed, never fatal.

Writes <run>/eval_vae.csv (the input's columns + psnr, ssim[, lpips], frames, error; failed clips have
empty metrics and the reason) and eval_vae.json (the means over clips, counts, failures, settings),
prints a table, and logs eval_vae/* to W&B (means in the summary, the per-clip table). Returns the
means as eval_vae/psnr, eval_vae/ssim (, eval_vae/lpips) for optimized_metric.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from opensora.data.frames import ResizedClip, first_window
from opensora.data.resumable import RateMeter, map_safely
from opensora.data.row_task import init_tool_worker
from opensora.data.table import media_folder, media_paths, read_table
from opensora.eval.metrics import SSIM_MIN_SIZE, clip_metrics, summarize
from opensora.logger import build_logger
from opensora.tasks.common import record_run, run_dir

log = logging.getLogger(__name__)


def reconstruct(vae, videos: np.ndarray, sample_posterior: bool) -> np.ndarray:
    """VAE encode -> decode of [B, 3, T, H, W] in [-1, 1]; clipped to [-1, 1]. The posterior mean is decoded
    unless `sample_posterior` (then the VAE's own encode, which may sample)."""
    if not sample_posterior and hasattr(vae, "latent_dist"):
        z = (np.asarray(vae.latent_dist(videos).mean, np.float32) - vae.shift_factor) * vae.scale_factor
    else:
        z = vae.encode(videos)
    return np.clip(np.asarray(vae.decode(z), np.float32), -1.0, 1.0)


def _to01(video: np.ndarray) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] float64 in [0, 1]."""
    return np.clip((video.transpose(1, 2, 3, 0).astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _groups(items: list, batch_size: int):
    """Runs of consecutive loaded clips of one shape, at most batch_size long."""
    run: list = []
    for item in items:
        if run and (len(run) >= batch_size or item[1].shape != run[0][1].shape):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    df = read_table(task.csv_path)
    folder = media_folder(task.csv_path, task.get("video_folder"))
    image_size = OmegaConf.to_container(task.image_size) if not isinstance(task.image_size, int) else task.image_size
    sizes = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    if min(sizes) < SSIM_MIN_SIZE:
        raise ValueError(f"task.image_size={image_size}: SSIM needs frames of at least {SSIM_MIN_SIZE} pixels")
    lp = task.get("lpips") or {}
    use_lpips = bool(lp.get("alexnet_path") or lp.get("heads_path"))
    out = run_dir(cfg)
    record_run(cfg, out)

    lpips = None
    if use_lpips:
        from opensora.eval.lpips import LpipsMetric

        lpips = LpipsMetric(lp.get("alexnet_path"), lp.get("heads_path"), int(lp.get("batch_size", 16)))
    vae = instantiate(cfg.vae)  # a missing vae.from_pretrained was named by the validation pass
    factor = vae.downsample if np.ndim(vae.downsample) == 0 else vae.downsample[-1]
    if any(s % int(factor) for s in sizes):
        raise ValueError(f"task.image_size={image_size} is not divisible by the VAE's downsample factor {factor}")

    files = dict(zip(df["path"], media_paths(df, folder)))  # the CSV's path -> its file
    paths = list(files)
    loader = ResizedClip(first_window(int(task.num_frames), int(task.frame_interval)), image_size)
    stream = zip(paths, map_safely(loader, [files[p] for p in paths], task.num_workers, init_tool_worker))
    results: dict = {}
    failures: dict = {}
    logger = build_logger(cfg)
    exit_code = 1
    meter = RateMeter("clips")
    try:
        with tqdm(total=len(paths), desc="eval_vae", dynamic_ncols=True) as bar:
            pending: list = []

            def evaluate(group):
                rec = reconstruct(vae, np.stack([v for _, v in group]), bool(task.sample_posterior))
                for (p, v), r in zip(group, rec):
                    ref01, rec01 = _to01(v), _to01(r)
                    m = clip_metrics(ref01, rec01)
                    if lpips is not None:
                        m["lpips"] = float(lpips(ref01, rec01).mean())
                    m["frames"] = v.shape[1]
                    results[p] = m
                bar.update(len(group))
                meter.update(len(group))

            for rel, (ok, video, reason) in stream:
                if not ok:
                    failures[rel] = reason
                    log.warning("eval_vae: cannot evaluate %s: %s (%d failed so far)", rel, reason, len(failures))
                    bar.update(1)
                    continue
                pending.append((rel, video))
                if len(pending) >= int(task.batch_size):
                    for group in _groups(pending, int(task.batch_size)):
                        evaluate(group)
                    pending = []
            for group in _groups(pending, int(task.batch_size)):
                evaluate(group)

        metric_names = ["psnr", "ssim"] + (["lpips"] if lpips is not None else [])
        table = df.copy()
        for name in metric_names + ["frames"]:
            table[name] = [results[p][name] if p in results else np.nan for p in df["path"]]
        table["error"] = [failures.get(p, "") for p in df["path"]]
        table.to_csv(out / "eval_vae.csv", index=False)
        summary = summarize([{k: v for k, v in results[p].items() if k in metric_names} for p in results])
        means = {k: summary.get(k, float("nan")) for k in metric_names}
        report = {**means, "num_clips": len(results), "num_failed": len(failures), "failures": failures,
                  "csv_path": str(task.csv_path), "vae": OmegaConf.to_container(cfg.vae, resolve=True),
                  "num_frames": int(task.num_frames), "frame_interval": int(task.frame_interval),
                  "image_size": image_size, "sample_posterior": bool(task.sample_posterior),
                  "data_range": "frames in [0, 1]",
                  "ssim_settings": "Gaussian window sigma 1.5, population covariance (Wang et al.)"}
        (out / "eval_vae.json").write_text(json.dumps(report, indent=1, default=str))
        _print_table(table, "path", metric_names, means, len(failures))
        logger.log({f"eval_vae/{k}": v for k, v in means.items()})
        logger.log_table("eval_vae/clips", table[["path"] + metric_names + ["frames", "error"]])
        logger.summary({**{f"eval_vae/{k}": v for k, v in means.items()}, "eval_vae/num_clips": len(results),
                        "eval_vae/num_failed": len(failures)})
        exit_code = 0
    finally:
        logger.finish(exit_code)
    log.info("eval_vae: %d clips evaluated, %d failed -> %s", len(results), len(failures), out / "eval_vae.csv")
    log.info("eval_vae: %s", meter.summary())
    return {f"eval_vae/{k}": v for k, v in means.items()} | {"eval_vae/clips": len(results),
                                                            "eval_vae/failed": len(failures)}


def _print_table(table: pd.DataFrame, path_col: str, metrics: list, means: dict, failed: int, limit: int = 20) -> None:
    shown = table[[path_col] + metrics + ["error"]].head(limit)
    with pd.option_context("display.max_colwidth", 60, "display.width", 160, "display.float_format", "{:.4f}".format):
        print("\n" + shown.to_string(index=False), flush=True)
    if len(table) > limit:
        print(f"... {len(table) - limit} more rows in eval_vae.csv")
    print("eval_vae mean over clips: " + ", ".join(f"{k} {means[k]:.4f}" for k in metrics) +
          f" ({len(table) - failed} clips, {failed} failed)\n", flush=True)
