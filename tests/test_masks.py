"""Training frame masks (Open-Sora 1.1 MaskGenerator, SPEC-1.1 §2.1): type frequencies within binomial
bounds, each type's frames exact, determinism per (seed, step, rank), validation and the T = 1..3 choices."""
from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from opensora.data.masks import MASK_TYPES, MaskGenerator, build_mask_generator, validate_mask_ratios

STAGE_RATIOS = {  # the 1.1 stage configs
    "mask_no": 0.75, "mask_quarter_random": 0.025, "mask_quarter_head": 0.025, "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05, "mask_image_random": 0.025, "mask_image_head": 0.025,
    "mask_image_tail": 0.025, "mask_image_head_tail": 0.05,
}


def test_type_frequencies_within_binomial_bounds():
    gen = MaskGenerator(OmegaConf.create(STAGE_RATIOS), seed=3)  # a DictConfig as Hydra gives it
    counts = dict.fromkeys(MASK_TYPES, 0)
    n = 0
    for step in range(100):
        _, types = gen.get_masks(200, 16, step=step, return_types=True)
        for name in types:
            counts[name] += 1
        n += len(types)
    for name, p in STAGE_RATIOS.items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[name] - n * p) < 5 * sd, (name, counts[name], n * p)  # 5 sigma: ~1e-6 false alarm


@pytest.mark.parametrize("name", MASK_TYPES)
def test_each_type_frames_exact(name):
    gen = MaskGenerator({name: 1.0}, seed=0)
    for t in (4, 9, 16):
        masks, types = gen.get_masks(400, t, return_types=True)
        k_max = t // 4
        ks, starts = set(), set()
        for m in masks:
            cond = np.flatnonzero(~m)
            if name == "mask_no":
                assert cond.size == 0
            elif name == "mask_quarter_random":
                assert 1 <= cond.size <= k_max and np.all(np.diff(cond) == 1)  # one contiguous run
                ks.add(cond.size)
                starts.add(int(cond[0]))
                assert cond[-1] <= t - 1
            elif name == "mask_quarter_head":
                assert 1 <= cond.size <= k_max and cond.tolist() == list(range(cond.size))
                ks.add(cond.size)
            elif name == "mask_quarter_tail":
                assert 1 <= cond.size <= k_max and cond.tolist() == list(range(t - cond.size, t))
                ks.add(cond.size)
            elif name == "mask_quarter_head_tail":
                k = cond.size // 2
                assert cond.size % 2 == 0 and 1 <= k <= k_max
                assert cond.tolist() == list(range(k)) + list(range(t - k, t))
                ks.add(k)
            elif name == "mask_image_random":
                assert cond.size == 1
                starts.add(int(cond[0]))
            elif name == "mask_image_head":
                assert cond.tolist() == [0]
            elif name == "mask_image_tail":
                assert cond.tolist() == [t - 1]
            elif name == "mask_image_head_tail":
                assert cond.tolist() == [0, t - 1]
        if name.startswith("mask_quarter"):
            assert ks == set(range(1, k_max + 1))  # every k in 1..T//4 occurs
        if name == "mask_quarter_random":
            assert starts == set(range(0, t))  # any start 0..T-k (k = 1 reaches T-1)
        if name == "mask_image_random":
            assert starts == set(range(t))
        assert set(types) == {name}


def test_short_clips_choices():
    for name in MASK_TYPES:
        gen = MaskGenerator({name: 1.0})
        assert gen.get_masks(5, 1).all()  # images are never masked
        m2, m3 = gen.get_masks(50, 2), gen.get_masks(50, 3)
        if name.startswith("mask_quarter") or name == "mask_no":
            assert m2.all() and m3.all()  # T // 4 = 0: nothing to condition (the original raises)
    # image_head_tail at T = 2 would condition every frame: conditions none (the original: all False)
    masks, types = MaskGenerator({"mask_image_head_tail": 1.0}).get_masks(3, 2, return_types=True)
    assert masks.all() and types == ["mask_no"] * 3
    np.testing.assert_array_equal(MaskGenerator({"mask_image_head_tail": 1.0}).get_masks(1, 3), [[False, True, False]])
    assert MaskGenerator({"mask_image_tail": 1.0}).get_masks(1, 2).tolist() == [[True, False]]


def test_determinism_per_seed_step_rank():
    gen = MaskGenerator(STAGE_RATIOS, seed=7)
    a = gen.get_masks(64, 16, step=5, rank=1)
    np.testing.assert_array_equal(a, MaskGenerator(STAGE_RATIOS, seed=7).get_masks(64, 16, step=5, rank=1))
    assert a.dtype == bool and a.shape == (64, 16)
    for other in (gen.get_masks(64, 16, step=6, rank=1), gen.get_masks(64, 16, step=5, rank=0),
                  MaskGenerator(STAGE_RATIOS, seed=8).get_masks(64, 16, step=5, rank=1)):
        assert (other != a).any()
    # the type draw is taken for images too, so types do not depend on T
    _, t1 = gen.get_masks(32, 1, step=2, return_types=True)
    _, t16 = gen.get_masks(32, 16, step=2, return_types=True)
    assert t1 == ["mask_no"] * 32 and t16.count("mask_no") < 32


def test_cumulative_choice_in_dict_order():
    gen = MaskGenerator({"mask_image_head": 0.25, "mask_no": 0.5, "mask_image_tail": 0.25})
    assert [gen.pick_type(u) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999)] == [
        "mask_image_head", "mask_image_head", "mask_no", "mask_no", "mask_image_tail", "mask_image_tail"]
    short = MaskGenerator({"mask_image_head": 0.9999995})  # within 1e-6 of 1
    assert short.pick_type(0.9999998) == "mask_no"


def test_ratio_validation():
    with pytest.raises(ValueError, match=r"unknown mask type 'mask_random'; known types: mask_no, "):
        validate_mask_ratios({"mask_no": 0.5, "mask_random": 0.5})
    with pytest.raises(ValueError, match=r"must sum to 1 \(within 1e-6\), got 0\.9"):
        validate_mask_ratios({"mask_no": 0.5, "mask_image_head": 0.4})
    with pytest.raises(ValueError, match=r"mask_image_head = -0.1 is negative"):
        validate_mask_ratios({"mask_no": 1.1, "mask_image_head": -0.1})
    with pytest.raises(ValueError, match="must be a probability"):
        validate_mask_ratios({"mask_no": "1"})
    with pytest.raises(ValueError, match="non-empty mapping"):
        validate_mask_ratios({})
    assert list(validate_mask_ratios(STAGE_RATIOS)) == list(STAGE_RATIOS)
    assert build_mask_generator(None) is None
    assert build_mask_generator({"mask_no": 1}).get_masks(2, 8).all()
