"""Tasks: what `run.py` does with a composed config (train, sample, ...), chosen by `task=`.

Each task is `run(cfg) -> dict | None` (its metrics). Before it runs, the config was rebuilt (resume) and
validated by the Hydra callback (opensora/config/callback.py) and the runtime initialised (opensora/runtime.py).
"""
from __future__ import annotations

import logging
from typing import Optional

from hydra.utils import get_method
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def optimized_value(cfg: DictConfig, metrics: Optional[dict]) -> Optional[float]:
    """The value of `optimized_metric` among the task's metrics (None when no metric is asked for); a metric the
    task did not return fails naming the key and listing what it returned."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    metrics = metrics or {}
    if name not in metrics:
        have = ", ".join(sorted(metrics)) or "none"
        raise KeyError(f"optimized_metric={name} is not among the metrics this run returned ({have}); set "
                       "optimized_metric to one of them (and optimized_direction to minimize or maximize)")
    value = metrics[name]
    return float(value) if value is not None else float("nan")


def run_task(cfg: DictConfig) -> Optional[float]:
    """Initialise, run `cfg.task._target_(cfg)` and return the value a sweep optimises (or None)."""
    from opensora.config.callback import NOTES
    from opensora.runtime import initialise

    for warning in NOTES.get("warnings", []):
        log.warning(warning)
    for key, (before, now) in NOTES.get("resume_changes", {}).items():
        log.warning("resumed run changes %s: %r -> %r", key, before, now)
    initialise(cfg)
    metrics = get_method(cfg.task._target_)(cfg)
    return optimized_value(cfg, metrics if isinstance(metrics, dict) else None)
