"""Timestep respacing: run a diffusion on a subset of the original steps (improved-diffusion)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """Original timesteps to keep, taken evenly from equal-size sections of the process.

    :param section_counts: list of step counts per section (e.g. [10, 15, 20] over 300 steps: 10 from
        steps 0-99, 15 from 100-199, 20 from 200-299), or the same as a comma-separated string, or
        "ddimN": the fixed integer stride of the DDIM paper (range(0, T, stride) with exactly N steps).
        Within a section of `size` steps, `count` steps are round(k * (size-1)/(count-1)), so one
        section of 100 over 1000 gives 0, 10, 20, 30, 40, 50, 61, ..., 989, 999.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride over {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only `use_timesteps` of a base diffusion.

    Betas are rebuilt so the kept steps have the base alpha_bar: beta_k = 1 - abar[s_k] / abar[s_{k-1}].
    The model always receives the ORIGINAL timestep index `timestep_map[k]`.
    """

    def __init__(self, use_timesteps, *, betas, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base_betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(base_betas)
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        last_alpha_cumprod = 1.0
        new_betas = []
        self.timestep_map = []
        for i, alpha_cumprod in enumerate(alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(betas=np.array(new_betas, dtype=np.float64), **kwargs)
        self._identity_map = self.timestep_map == list(range(self.original_num_steps))
        self._timestep_map = ms.Tensor(np.array(self.timestep_map, dtype=np.int32))

    def _call_model(self, model, x, t, model_kwargs):
        if not self._identity_map:
            t = ops.gather(self._timestep_map, t.astype(ms.int32), 0)  # respaced index -> original timestep
        return model(x, t, **model_kwargs)
