"""Learning-rate schedules (optim/lr_schedule/*.yaml); the optimiser itself is MindSpore's AdamW, built from
config. A schedule is built with the run's base rate and length and called with the 0-based step."""
from __future__ import annotations

import math


class ConstantLR:
    """Linear warmup over `warmup_steps` (from base_lr / warmup_steps), then base_lr."""

    def __init__(self, base_lr: float, max_steps: int, warmup_steps: int = 0):
        self.base_lr, self.max_steps, self.warmup_steps = float(base_lr), int(max_steps), int(warmup_steps)

    def warmup(self, step: int):
        return self.base_lr * (step + 1) / self.warmup_steps if step < self.warmup_steps else None

    def __call__(self, step: int) -> float:
        w = self.warmup(step)
        return self.base_lr if w is None else w


class CosineLR(ConstantLR):
    """Linear warmup, then cosine decay from base_lr to min_lr at max_steps."""

    def __init__(self, base_lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        super().__init__(base_lr, max_steps, warmup_steps)
        self.min_lr = float(min_lr)

    def __call__(self, step: int) -> float:
        w = self.warmup(step)
        if w is not None:
            return w
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


__all__ = ["ConstantLR", "CosineLR"]
