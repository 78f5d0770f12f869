"""Training-side frame masks of Open-Sora 1.1 (`data.mask_ratios`): which latent frames of a sample are
conditioning frames (kept nearly clean and excluded from the loss) and which are generated.

A mask is bool [T]: True = the frame is noised and predicted, False = conditioning frame. Each sample
draws one type by cumulative probability over `mask_ratios` in its order (u ~ U[0, 1), the first type
whose running sum exceeds u), then its frames; with k_max = T // 4:

| type | conditioning frames |
|---|---|
| mask_no | none |
| mask_quarter_random | a run of k ~ U{1..k_max} frames at a start ~ U{0..T-k} |
| mask_quarter_head / _tail | the first / last k ~ U{1..k_max} |
| mask_quarter_head_tail | the first k and the last k (one k) |
| mask_image_random | one frame ~ U{0..T-1} |
| mask_image_head / _tail | frame 0 / frame T-1 |
| mask_image_head_tail | frames 0 and T-1 |

Choices where the original (v1.1.0 MaskGenerator) crashes or degenerates:
- T <= 1 (images) is never masked, as the original; the type is still drawn, so the random stream of
  the other samples does not depend on T.
- T = 2 or 3 (k_max = 0): the original raises (`randint(1, 0)`); here the quarter types condition no
  frame: a quarter of 2-3 frames is zero frames.
- A draw that would condition every frame (only mask_image_head_tail at T = 2) conditions none instead:
  the original's all-False mask leaves nothing to predict and makes the frame-masked loss 0 / 0.
- Randomness comes from a numpy Generator seeded by (seed, step, rank), not Python's global `random`,
  so a resumed run draws the same masks for the same step.
- If the ratios sum to 1 - 1e-6 <= s < 1 and u falls past the sum, the sample is not masked (the
  original's behaviour).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import numpy as np

MASK_TYPES = (
    "mask_no",
    "mask_quarter_random",
    "mask_quarter_head",
    "mask_quarter_tail",
    "mask_quarter_head_tail",
    "mask_image_random",
    "mask_image_head",
    "mask_image_tail",
    "mask_image_head_tail",
)


def validate_mask_ratios(mask_ratios: Mapping, key: str = "data.mask_ratios") -> dict[str, float]:
    """{type: probability} in the given order; every name one of MASK_TYPES, every value a number >= 0,
    the sum 1 within 1e-6. Raises ValueError naming the bad entry (or the sum)."""
    if not isinstance(mask_ratios, Mapping) or len(mask_ratios) == 0:
        raise ValueError(f"{key} must be a non-empty mapping of mask type -> probability, got {mask_ratios!r}")
    ratios = {}
    for name, value in mask_ratios.items():
        if name not in MASK_TYPES:
            raise ValueError(f"{key}: unknown mask type {name!r}; known types: {', '.join(MASK_TYPES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}.{name} must be a probability (a number), got {value!r}")
        if value < 0:
            raise ValueError(f"{key}.{name} = {value} is negative; probabilities must be >= 0")
        ratios[str(name)] = float(value)
    total = sum(ratios.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{key} must sum to 1 (within 1e-6), got {total!r}: {ratios}")
    return ratios


class MaskGenerator:
    """Frame masks for a batch of latents [B, C, T, H, W] (see the module docstring).

    :param mask_ratios: {type: probability}, e.g. the stage configs' 0.75 mask_no, 0.025 / 0.05 others.
    :param seed: base seed; the masks of (step, rank) come from np.random.default_rng([seed, step, rank]).
    """

    def __init__(self, mask_ratios: Mapping, seed: int = 0, key: str = "data.mask_ratios"):
        self.mask_ratios = validate_mask_ratios(mask_ratios, key)
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self._cumulative = np.cumsum(list(self.mask_ratios.values()))
        self._names = list(self.mask_ratios)

    def pick_type(self, u: float) -> str:
        """The type of a uniform draw u in [0, 1): the first whose running sum exceeds u."""
        idx = int(np.searchsorted(self._cumulative, u, side="right"))
        return self._names[idx] if idx < len(self._names) else "mask_no"

    @staticmethod
    def frames(name: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        """bool [T] mask of type `name` (True = generated), drawing its random sizes / positions from rng."""
        t = int(num_frames)
        mask = np.ones(t, dtype=bool)
        if t <= 1 or name == "mask_no":
            return mask
        k_max = t // 4
        if name.startswith("mask_quarter"):
            if k_max == 0:  # T = 2, 3: no quarter to condition (the original raises)
                return mask
            k = int(rng.integers(1, k_max + 1))
            if name == "mask_quarter_random":
                start = int(rng.integers(0, t - k + 1))
                mask[start:start + k] = False
            elif name == "mask_quarter_head":
                mask[:k] = False
            elif name == "mask_quarter_tail":
                mask[-k:] = False
            elif name == "mask_quarter_head_tail":
                mask[:k] = False
                mask[-k:] = False
            else:
                raise ValueError(f"unknown mask type {name!r}")
        elif name == "mask_image_random":
            mask[int(rng.integers(0, t))] = False
        elif name == "mask_image_head":
            mask[0] = False
        elif name == "mask_image_tail":
            mask[-1] = False
        elif name == "mask_image_head_tail":
            mask[0] = False
            mask[-1] = False
        else:
            raise ValueError(f"unknown mask type {name!r}; known types: {', '.join(MASK_TYPES)}")
        if not mask.any():  # every frame conditioned (image_head_tail at T = 2): nothing to predict
            mask[:] = True
        return mask

    def get_masks(self, batch_size: int, num_frames: int, step: int = 0, rank: int = 0,
                  return_types: bool = False):
        """bool [B, T] masks for one micro-batch (B = batch_size, T = latent frames), deterministic in
        (seed, step, rank). With return_types also the list of the B drawn type names (the effective
        type: "mask_no" where a type conditioned nothing)."""
        rng = np.random.default_rng([self.seed, int(step), int(rank)])
        masks = np.ones((int(batch_size), int(num_frames)), dtype=bool)
        types: list[str] = []
        for i in range(int(batch_size)):
            name = self.pick_type(float(rng.random()))
            masks[i] = self.frames(name, num_frames, rng)
            types.append(name if not masks[i].all() else "mask_no")
        return (masks, types) if return_types else masks


def build_mask_generator(mask_ratios: Optional[Mapping], seed: int = 0) -> Optional[MaskGenerator]:
    """None when mask_ratios is None (no masked training, the 1.0 recipes), else a MaskGenerator."""
    return None if mask_ratios is None else MaskGenerator(mask_ratios, seed)
