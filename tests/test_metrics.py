"""PSNR / SSIM (scikit-image) against values computed by hand on synthetic frames.

Tolerances: 1e-9 relative for closed forms evaluated in float64 (both sides round differently only in the
last bits); the textured-offset SSIM compares with a hand evaluation of the same Gaussian window (1e-9).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from opensora.eval.metrics import clip_metrics, psnr_frames, ssim_frames, summarize


def test_psnr_of_a_known_mse_float_and_uint8():
    ref = np.full((2, 16, 16, 3), 0.5)
    rec = ref.copy()
    rec[0] += 0.1   # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    rec[1] += 0.01  # MSE 1e-4 -> 40 dB
    np.testing.assert_allclose(psnr_frames(ref, rec), [20.0, 40.0], rtol=1e-9)
    assert clip_metrics(ref, rec)["psnr"] == pytest.approx(30.0, rel=1e-9)

    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 110, np.uint8)  # MSE 100 on the 0-255 range
    assert psnr_frames(a, b)[0] == pytest.approx(10 * math.log10(255 ** 2 / 100), rel=1e-9)  # 28.1308 dB


def test_psnr_of_random_noise_with_a_fixed_magnitude():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.1, 0.9, (3, 20, 24, 3))
    rec = ref + 0.05 * rng.choice([-1.0, 1.0], ref.shape)  # every error +-0.05: MSE 0.0025
    np.testing.assert_allclose(psnr_frames(ref, rec), 10 * math.log10(1 / 0.0025), rtol=1e-9)  # 26.0206 dB


def test_identical_frames():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert np.isinf(psnr_frames(x, x)).all()
    np.testing.assert_allclose(ssim_frames(x, x), 1.0, rtol=1e-12)


@pytest.mark.parametrize("a, b, L", [(0.5, 0.6, 1.0), (100, 110, 255)])
def test_ssim_of_flat_frames_with_an_offset(a, b, L):
    """Flat frames: every window has variance 0, so SSIM = luminance term (2ab + C1) / (a^2 + b^2 + C1),
    C1 = (0.01 L)^2 (e.g. 0.6001 / 0.6101 = 0.98361 for 0.5 vs 0.6)."""
    dtype = np.uint8 if L == 255 else np.float64
    x = np.full((1, 16, 16, 3), a, dtype)
    y = np.full((1, 16, 16, 3), b, dtype)
    c1 = (0.01 * L) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim_frames(x, y)[0] == pytest.approx(want, rel=1e-9)


def test_ssim_of_a_textured_frame_with_a_constant_offset():
    """y = x + c: local covariance = both local variances, so the contrast-structure term is exactly 1 and
    SSIM is the mean of the luminance term over the frame minus a 5 px border, with Gaussian (sigma 1.5,
    11 taps) local means."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 0.8, (24, 28))
    c = 0.1
    mu = gaussian_filter(x, 1.5, truncate=3.5, mode="reflect")
    c1 = 0.01 ** 2
    lum = (2 * mu * (mu + c) + c1) / (mu ** 2 + (mu + c) ** 2 + c1)
    want = lum[5:-5, 5:-5].mean()
    got = ssim_frames(x[None], (x + c)[None])[0]
    assert got == pytest.approx(want, rel=1e-9)
    assert got < 1.0


def test_summary_and_errors():
    assert summarize([{"psnr": 30.0, "ssim": 0.9}, {"psnr": 20.0, "ssim": 0.7}, {"psnr": float("nan")}]) == \
        pytest.approx({"psnr": 25.0, "ssim": 0.8, "num_clips": 3})
    x = np.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_frames(x, np.zeros((1, 16, 17, 3)))
    with pytest.raises(ValueError, match="differ in dtype"):
        psnr_frames(x, x.astype(np.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        psnr_frames(x - 1, x)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_frames(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
