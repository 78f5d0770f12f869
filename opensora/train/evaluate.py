"""Held-out evaluation during and after training: sample the dataset's held-out prompts with the EMA weights and
score them with the dataset's evaluator (the demo's colour and direction accuracy)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from opensora.model.stdit2 import STDiT2
from opensora.tasks.common import build_model, generate, save_samples, score_samples
from opensora.train.batch import fixed_size_conditions


def wants_evaluation(cfg: DictConfig, dataset) -> bool:
    """Evaluation runs when task.eval is set and the dataset has held-out prompts and an evaluator."""
    return bool(cfg.task.get("eval") and cfg.data.get("evaluator") and hasattr(dataset, "heldout_prompts"))


class HeldoutEvaluator:
    """Samples the held-out prompts with the given weights and scores them (`data.evaluator`).

    The sampling model is built once and refreshed from the training weights at each call, so periodic
    evaluation compiles its graph only once."""

    def __init__(self, cfg: DictConfig, dataset, text_encoder, vae, out: Path, logger):
        self.cfg, self.text_encoder, self.vae, self.out, self.logger = cfg, text_encoder, vae, out, logger
        ev = cfg.task.eval
        self.prompts = [p for p in dataset.heldout_prompts() for _ in range(int(ev.num_samples_per_prompt))]
        self.sampler = instantiate(cfg.scheduler)
        self.model = build_model(cfg, with_pretrained=False)  # weights are copied from training at each call

    def __call__(self, model_params: dict, ema: Optional[dict], step: int) -> dict:
        cfg, ev = self.cfg, self.cfg.task.eval
        values = {**model_params, **(ema or {})}
        for n, p in self.model.parameters_and_names():
            p.set_data(values[n].data.copy().astype(p.dtype))
        latent = [int(v) for v in cfg.model.input_size]
        kwargs = None
        if isinstance(self.model, STDiT2):  # sampled at the clip size it trains on (GlobalBatchFeed's conditions)
            conditions = fixed_size_conditions(cfg.data)
            kwargs = {k: np.full((int(ev.batch_size),), v, np.float32) for k, v in conditions.items()}
        videos = generate(self.model, self.text_encoder, self.vae, self.sampler, self.prompts, latent,
                          int(ev.batch_size), int(cfg.seed), progress=False, model_kwargs=kwargs)
        folder = self.out / "samples" / f"step_{step:06d}"
        save_samples(videos, self.prompts, folder, int(ev.fps), int(ev.upscale), self.logger, step, prefix="eval")
        return score_samples(cfg, videos, self.prompts, folder, self.logger, step)
