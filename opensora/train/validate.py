"""The validation loss during training (task.validate): every N steps and at the end, the loss per bucket and
timestep of a validation CSV (opensora/eval/loss.py) with the current training weights (or the EMA's), logged as
curves: val/loss (every sample and timestep), val/loss/<resolution>x<frames>, val/loss_t<timestep>."""
from __future__ import annotations

import logging
from typing import Optional

from omegaconf import DictConfig

from opensora.tasks.common import build_model

log = logging.getLogger(__name__)


class LossValidator:
    """Evaluates a model of its own (built once, so its graphs compile once), refreshed from the training weights
    at each call; rank 0 only."""

    def __init__(self, cfg: DictConfig, text_encoder, vae, diffusion, logger):
        from opensora.tasks.eval_loss import build_evaluator

        self.settings, self.logger = cfg.task.validate, logger
        if vae is None:  # training reads cached latents; the validation CSV is read as pixels
            from hydra.utils import instantiate

            log.info("validation: building the VAE (training reads cached latents, the validation CSV pixels)")
            vae = instantiate(cfg.vae)
        if text_encoder is None and not self.settings.get("text_embed_folder"):
            from opensora.tasks.common import build_text_encoder

            log.info("validation: building the text encoder (task.validate.text_embed_folder is not set)")
            text_encoder = build_text_encoder(cfg)
        self.model = build_model(cfg, with_pretrained=False)
        self.evaluator = build_evaluator(cfg, self.settings, self.model, diffusion, text_encoder, vae)
        log.info("validation: %d samples of %s in %d buckets at timesteps %s, every %s steps", len(self.evaluator),
                 self.settings.csv_path, len(self.evaluator.buckets), self.evaluator.timesteps,
                 self.settings.every or "(only at the end)")

    def __call__(self, model_params: dict, ema: Optional[dict], step: int) -> dict:
        values = {**model_params, **(ema or {})} if self.settings.use_ema else model_params
        for n, p in self.model.parameters_and_names():
            p.set_data(values[n].data.copy().astype(p.dtype))
        metrics = self.evaluator.metrics(self.evaluator())
        self.logger.log(metrics, step=step)
        log.info("step %d: validation loss %s", step, ", ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()
                                                                 if k.count("/") <= 2 and "loss_t" not in k))
        return metrics
