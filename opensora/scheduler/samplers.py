"""Sampling methods of the IDDPM scheduler (scheduler/sampler/*.yaml): how the respaced reverse process is run.

A sampler names the timesteps it keeps (`respacing`, passed to space_timesteps) and runs the loop (`loop`).
"""
from __future__ import annotations


class AncestralSampler:
    """Ancestral sampling (p_sample_loop, the original), on even sections of the schedule."""

    name = "ancestral"

    def respacing(self, num_steps: int) -> str:
        return str(num_steps)

    def loop(self, diffusion, model, shape, **kwargs):
        return diffusion.p_sample_loop(model, tuple(shape), **kwargs)


class DDIMSampler:
    """DDIM (ddim_sample_loop) with noise `eta` (0: deterministic). timestep_spacing: `sections` (even sections,
    as the original respaces: 10 steps -> 0, 111, ..., 999) or `stride` (the DDIM paper's: 0, 100, ..., 900)."""

    name = "ddim"

    def __init__(self, eta: float = 0.0, timestep_spacing: str = "sections"):
        if timestep_spacing not in ("sections", "stride"):
            raise ValueError(f"scheduler.sampler.timestep_spacing={timestep_spacing!r}: expected 'sections' (the "
                             "original) or 'stride' (DDIM's fixed stride)")
        if eta < 0:
            raise ValueError(f"scheduler.sampler.eta={eta} must be >= 0")
        self.eta, self.timestep_spacing = float(eta), timestep_spacing

    def respacing(self, num_steps: int) -> str:
        return f"ddim{num_steps}" if self.timestep_spacing == "stride" else str(num_steps)

    def loop(self, diffusion, model, shape, **kwargs):
        return diffusion.ddim_sample_loop(model, tuple(shape), eta=self.eta, **kwargs)


def make_sampler(sampler, ddim_eta: float = 0.0, timestep_spacing: str = "sections"):
    """A sampler object from itself or its name ("ancestral", "ddim"), for code that builds IDDPM directly."""
    if not isinstance(sampler, str):
        return sampler
    if sampler == "ancestral":
        return AncestralSampler()
    if sampler == "ddim":
        return DDIMSampler(ddim_eta, timestep_spacing)
    raise ValueError(f"scheduler.sampler={sampler!r}: expected 'ancestral' or 'ddim' (or a sampler object)")
