"""Eval-loss task: the validation loss of a checkpoint per (resolution, frames) bucket and per fixed timestep
(opensora/eval/loss.py), as a table on stdout, <run>/eval_loss.csv, a W&B table and <run>/eval_loss.png.

    python run.py task=eval_loss task.run=outputs/stages/v1_1_stage1 task.csv_path=my/val.csv
    python run.py experiment=train_v1_1_stage3 task=eval_loss task.ckpt_path=models/OpenSora-STDiT-v2-stage3 \\
        task.csv_path=my/val.csv
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from opensora.logger import build_logger
from opensora.tasks.common import build_model, build_text_encoder, record_run, run_dir

log = logging.getLogger(__name__)


def validation_dataset(cfg: DictConfig, settings):
    """The VariableVideoTextDataset of a validation CSV (`settings`: task=eval_loss's task, or task.validate), read
    with the training data's frame interval, size conditioning and seed."""
    from opensora.data.cache import text_cache_settings
    from opensora.data.variable import VariableVideoTextDataset

    data = cfg.data
    text = settings.get("text_embed_folder")
    return VariableVideoTextDataset(
        str(settings.csv_path), settings.get("video_folder"), frame_interval=int(data.frame_interval),
        text_embed_folder=text, text_cache_settings=text_cache_settings(cfg.text_encoder) if text else None,
        seed=int(cfg.seed), ar_condition=str(data.get("ar_condition", "width/height")),
        fps_condition=str(data.get("fps_condition", "video")))


def build_evaluator(cfg: DictConfig, settings, model, diffusion, text_encoder, vae):
    from opensora.eval.loss import BucketLossEvaluator

    dataset = validation_dataset(cfg, settings)
    buckets = settings.get("bucket_config") or cfg.data.bucket_config
    return BucketLossEvaluator(model, diffusion, dataset, buckets, int(cfg.data.frame_interval), text_encoder, vae,
                               int(cfg.seed), int(settings.num_timesteps), settings.get("max_samples"),
                               cfg.data.get("resolutions"), str(settings.get("shapes") or "per_shape"))


def run(cfg: DictConfig) -> dict:
    from opensora.eval.loss import format_table, save_results
    from opensora.tasks.sample import load_model_weights

    task = cfg.task
    out = run_dir(cfg)
    record_run(cfg, out)
    text_encoder = None if task.get("text_embed_folder") else build_text_encoder(cfg)
    vae = instantiate(cfg.vae)
    model = build_model(cfg, with_pretrained=False)
    loaded = load_model_weights(model, task.ckpt_path, bool(task.use_ema))
    log.info("weights from %s", loaded)
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
    evaluator = build_evaluator(cfg, task, model, diffusion, text_encoder, vae)
    log.info("validation loss of %d samples of %s in %d buckets at timesteps %s", len(evaluator), task.csv_path,
             len(evaluator.buckets), evaluator.timesteps)
    logger = build_logger(cfg)
    exit_code = 1
    try:
        results = evaluator()
        table = format_table(results, evaluator.timesteps)
        print(f"\nvalidation loss of {loaded}:\n{table}", flush=True)
        csv, png = save_results(results, evaluator.timesteps, out, f"validation loss: {Path(str(loaded)).name}")
        import pandas as pd

        logger.log_table("eval/loss_by_bucket", pd.DataFrame(results))
        logger.log_image("eval/loss_by_bucket_plot", str(png))
        metrics = evaluator.metrics(results, prefix="eval")
        metrics["eval/bad_samples"] = len(evaluator.bad)
        logger.summary(metrics)
        log.info("wrote %s and %s", csv, png)
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return metrics
