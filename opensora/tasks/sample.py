"""Sample task: prompts -> text embeddings -> diffusion sampling with CFG -> decode -> videos."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opensora.logger import build_logger
from opensora.tasks.common import build_model, build_text_encoder, generate, read_prompts, record_run, run_dir, \
    save_samples, score_samples
from opensora.utils.checkpoint import load_params_into, resolve_checkpoint_dir

log = logging.getLogger(__name__)


def load_model_weights(model, path: str, use_ema: bool = True) -> str:
    """Load weights from a train-task checkpoint directory (EMA if asked and present) or a .ckpt file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt":
        load_params_into(dict(model.parameters_and_names()), p)
        return str(p)
    ckpt = resolve_checkpoint_dir(p)
    f = ckpt / ("ema.ckpt" if use_ema and (ckpt / "ema.ckpt").is_file() else "model.ckpt")
    load_params_into(dict(model.parameters_and_names()), f)
    return str(f)


def run(cfg: DictConfig) -> float:
    task = cfg.task
    prompts = read_prompts(task.prompts, task.prompt_file)
    out = run_dir(cfg)
    record_run(cfg, out)
    text_encoder = build_text_encoder(cfg)
    vae = instantiate(cfg.vae)
    model = build_model(cfg)
    loaded = load_model_weights(model, task.ckpt_path, bool(task.use_ema))
    log.info("weights from %s", loaded)
    sampler = instantiate(cfg.scheduler)
    latent = [int(v) for v in cfg.model.input_size]
    prompts = [p for p in prompts for _ in range(int(task.num_samples_per_prompt))]

    logger = build_logger(cfg)
    exit_code = 1
    try:
        videos = generate(model, text_encoder, vae, sampler, prompts, latent, int(task.batch_size), int(cfg.seed))
        save_samples(videos, prompts, out / "samples", int(task.fps), int(task.upscale), logger)
        metric = float("nan")
        if task.evaluate:
            result = score_samples(cfg, videos, prompts, out / "samples", logger)
            logger.summary(result)
            metric = next(iter(result.values()), metric)
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return metric
