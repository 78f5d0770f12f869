"""Learning-rate schedules (the optimiser itself is MindSpore's AdamW, built from config)."""
from __future__ import annotations

import math


def lr_schedule(step: int, *, base_lr: float, max_steps: int, kind: str = "constant",
                warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate at `step` (0-based): linear warmup over `warmup_steps`, then
    `constant` or `cosine` decay from base_lr to min_lr at max_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.lr_schedule.kind={kind!r} is not one of: constant, cosine")
