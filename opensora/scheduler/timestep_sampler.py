"""How training timesteps are drawn (task/timestep_sampling/*.yaml): callables (rng, batch, T) -> int32 [batch]."""
from __future__ import annotations

import numpy as np


class UniformTimesteps:
    """t ~ U{0, ..., T-1} (the original)."""

    def __call__(self, rng: np.random.Generator, batch: int, num_timesteps: int) -> np.ndarray:
        return rng.integers(0, num_timesteps, size=batch).astype(np.int32)


class PowerTimesteps:
    """t = floor(T * u^(1/power)), u ~ U(0, 1): power > 1 favours noisy steps."""

    def __init__(self, power: float = 1.5):
        if not power > 0:
            raise ValueError(f"task.timestep_sampling.power={power} must be > 0")
        self.power = float(power)

    def __call__(self, rng: np.random.Generator, batch: int, num_timesteps: int) -> np.ndarray:
        u = rng.random(batch) ** (1.0 / self.power)
        return np.minimum((u * num_timesteps).astype(np.int32), num_timesteps - 1)
