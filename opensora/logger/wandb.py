"""Weights & Biases tracking: one run per job, always finished, offline by default."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class NullLogger:
    """Tracking turned off (logger=none): every call is accepted and does nothing."""

    run_id: Optional[str] = None

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        pass

    def log_video(self, key: str, path: str, caption: str = "", step: Optional[int] = None, fps: int = 8) -> None:
        pass

    def log_image(self, key: str, path: str, caption: str = "", step: Optional[int] = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """A W&B run holding the fully resolved config as a plain dict.

    `mode` is "offline" (default: files under <dir>/wandb, upload later with `wandb sync`),
    "online" (needs WANDB_API_KEY) or "disabled". `resume_id` continues an earlier run.
    """

    def __init__(self, project: str, entity: Optional[str] = None, group: Optional[str] = None,
                 name: Optional[str] = None, tags: Optional[list] = None, mode: str = "offline",
                 dir: str = ".", run_config: Optional[dict] = None, resume_id: Optional[str] = None):
        import wandb

        os.makedirs(dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, group=group, name=name, tags=list(tags or []),
            mode=mode, dir=dir, config=run_config, id=resume_id, resume="allow" if resume_id else None,
            reinit="finish_previous",
        )
        self.run_id = self.run.id
        log.info("W&B run %s (%s mode) in %s", self.run_id, mode, dir)

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        self.run.log(metrics, step=step)

    def log_video(self, key: str, path: str, caption: str = "", step: Optional[int] = None, fps: int = 8) -> None:
        self.run.log({key: self._wandb.Video(path, caption=caption, format=os.path.splitext(path)[1][1:])}, step=step)

    def log_image(self, key: str, path: str, caption: str = "", step: Optional[int] = None) -> None:
        self.run.log({key: self._wandb.Image(path, caption=caption)}, step=step)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def build_logger(cfg: DictConfig, resume_id: Optional[str] = None, rank: int = 0) -> NullLogger:
    """The configured logger on rank 0, a NullLogger elsewhere or when `logger` is null."""
    if cfg.get("logger") is None or rank != 0:
        return NullLogger()
    from hydra.utils import instantiate

    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return instantiate(cfg.logger, run_config=resolved, resume_id=resume_id)
