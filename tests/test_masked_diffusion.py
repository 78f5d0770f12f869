"""Open-Sora 1.1 frame masks in the IDDPM scheduler: the masked training loss and sampling with a float
per-frame mask (release step int(mask * steps), re-noising at release, x_mask, reset of held frames, CFG).

References are float64 numpy written here from the formulas (SPEC-1.1 §2.2-2.3). Tolerances: float32
maths against float64, rtol 1e-5 / atol 1e-5 on values of order 1; "exact" only where both sides are the
same float32 values copied (held reference frames).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from opensora.scheduler import IDDPM, forward_with_cfg, mean_flat


def np_tables(diff):
    ab = diff.alphas_cumprod
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return ab, ab_prev


# ----------------------------------------------------------------------------- training side
def test_mean_flat_frame_mask_and_empty_sample():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4, 2, 3))
    mask = np.array([[True, False, True, True], [False] * 4, [True] * 4])
    got = mean_flat(ms.Tensor(x, ms.float32), ms.Tensor(mask)).asnumpy()
    hand0 = x[0][:, [0, 2, 3]].mean()
    np.testing.assert_allclose(got, [hand0, 0.0, x[2].mean()], rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()  # the all-False sample is 0, not 0 / 0


class MaskAwareNet(nn.Cell):
    """eps = a * x_t (+ 1 on frames whose x_mask is False, if x_mask is given), v = tanh(b * x_t)."""

    def __init__(self):
        super().__init__()
        self.a = ms.Parameter(ms.Tensor(np.array([0.3], np.float32)), name="a")
        self.b = ms.Parameter(ms.Tensor(np.array([0.7], np.float32)), name="b")

    def construct(self, x, t, x_mask=None):
        eps = self.a * x
        if x_mask is not None:
            cond = 1.0 - x_mask.astype(ms.float32)  # [B, T]
            eps = eps + cond.reshape(cond.shape[0], 1, cond.shape[1], 1, 1)
        return ops.cat([eps, ops.tanh(self.b * x)], axis=1)


class LossCell(nn.Cell):
    def __init__(self, net, diffusion, pass_x_mask):
        super().__init__()
        self.net, self.diffusion, self.pass_x_mask = net, diffusion, pass_x_mask

    def construct(self, x, t, noise, frame_mask):
        terms = self.diffusion.training_losses(self.net, x, t, noise=noise, mask=frame_mask,
                                               pass_x_mask=self.pass_x_mask)
        return terms["loss"].mean()


@pytest.fixture(scope="module")
def full():
    return IDDPM()


def test_training_conditioning_frames_excluded_and_x_mask_passed(full):
    rng = np.random.default_rng(1)
    shape = (3, 2, 4, 2, 2)
    x0, noise = rng.uniform(-1, 1, shape), rng.standard_normal(shape)
    t = np.array([0, 300, 999])
    mask = np.array([[True, True, False, False], [False, True, True, True], [False] * 4])
    seen = []

    def model_with(out_at_cond):
        def model(x, tt, **kw):
            seen.append(kw)
            xn = x.asnumpy()
            eps = 0.2 * xn + np.where(mask[:, None, :, None, None], 0.0, out_at_cond)
            return ms.Tensor(np.concatenate([eps, np.full_like(xn, 0.1)], axis=1).astype(np.float32))
        return model

    args = (ms.Tensor(x0, ms.float32), ms.Tensor(t, ms.int32))
    kw = dict(noise=ms.Tensor(noise, ms.float32), mask=ms.Tensor(mask), pass_x_mask=True)
    a = full.training_losses(model_with(0.0), *args, model_kwargs={"y": 1}, **kw)
    b = full.training_losses(model_with(5.0), *args, model_kwargs={"y": 1}, **kw)
    assert seen[0]["y"] == 1 and seen[0]["x_mask"].dtype == ms.bool_
    np.testing.assert_array_equal(seen[0]["x_mask"].asnumpy(), mask)
    for k in ("mse", "vb", "loss"):  # what the model says at conditioning frames changes nothing
        np.testing.assert_allclose(a[k].asnumpy(), b[k].asnumpy(), rtol=1e-6, atol=1e-7, err_msg=k)
        assert a[k].asnumpy()[2] == 0.0  # a sample without a generated frame: loss 0 (original: NaN)
    # MSE by hand over the True frames (eps target)
    ab = full.alphas_cumprod
    x_t = np.sqrt(ab[t]).reshape(-1, 1, 1, 1, 1) * x0 + np.sqrt(1 - ab[t]).reshape(-1, 1, 1, 1, 1) * noise
    x_t = np.where(mask[:, None, :, None, None], x_t, np.sqrt(ab[0]) * x0 + np.sqrt(1 - ab[0]) * noise)
    err = (noise - 0.2 * x_t) ** 2
    hand = [err[i][:, mask[i]].mean() for i in range(2)]
    np.testing.assert_allclose(a["mse"].asnumpy()[:2], hand, rtol=1e-5)
    # without pass_x_mask the kwargs are the caller's alone (the original's train script adds x_mask itself)
    full.training_losses(model_with(0.0), *args, model_kwargs={"y": 1}, noise=kw["noise"], mask=kw["mask"])
    assert "x_mask" not in seen[-1]


def test_training_x_mask_graph_mode(full):
    """pass_x_mask traced under ms.jit with value_and_grad equals PyNative; the mask reaches the net."""
    rng = np.random.default_rng(2)
    shape = (2, 2, 3, 2, 2)
    args = (ms.Tensor(rng.uniform(-1, 1, shape), ms.float32), ms.Tensor(np.array([5, 700], np.int32)),
            ms.Tensor(rng.standard_normal(shape), ms.float32), ms.Tensor(np.array([[False, True, True]] * 2)))
    net = MaskAwareNet()
    params = net.trainable_params()
    losses = {}
    for pass_x_mask in (True, False):
        grad_fn = ms.value_and_grad(LossCell(net, full, pass_x_mask), None, params)
        loss_py, grads_py = grad_fn(*args)

        @ms.jit
        def step(*a):
            return grad_fn(*a)

        loss_g, grads_g = step(*args)
        np.testing.assert_allclose(loss_g.asnumpy(), loss_py.asnumpy(), rtol=1e-5)
        for gg, gp in zip(grads_g, grads_py):
            np.testing.assert_allclose(gg.asnumpy(), gp.asnumpy(), rtol=1e-4, atol=1e-7)
        losses[pass_x_mask] = float(loss_py.asnumpy())
    # the net's +1 on x_mask-False frames only touches excluded frames: same loss either way
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


# ----------------------------------------------------------------------------- sampling side
def test_release_steps_float32_like_the_original():
    diff = IDDPM(num_sampling_steps=100)
    x_shape = (1, 4, 6, 2, 2)
    m = np.array([[0.0, 0.29, 0.57, 0.3, 0.999, 1.0]])
    # float32: 0.29 * 100 -> 29.0 and 0.57 * 100 -> 57.0 (float64 would truncate to 28 and 56)
    assert diff.frame_mask_steps(m, x_shape).tolist() == [[0, 29, 57, 30, 99, 100]]
    assert diff.frame_mask_steps(ms.Tensor(m, ms.float32), x_shape).dtype == np.int32
    assert IDDPM(num_sampling_steps=10).frame_mask_steps(m, x_shape).tolist() == [[0, 2, 5, 3, 9, 10]]
    exact = IDDPM(num_sampling_steps=100, exact_conditioning=True)
    assert exact.frame_mask_steps(m, x_shape).tolist() == [[-1, 29, 57, 30, 99, 100]]
    with pytest.raises(ValueError, match=r"expected \[B, T\] = \[1, 6\]"):
        diff.frame_mask_steps(np.ones((1, 5)), x_shape)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        diff.frame_mask_steps(np.full((1, 6), 1.5), x_shape)


def test_p_sample_with_frame_mask_one_step_vs_numpy():
    """At t = 5 of 10 steps, frames released at 10 / 5 / 3 / 0: generated / re-noised now / held / held."""
    diff = IDDPM(num_sampling_steps=10, learn_sigma=False, sigma_small=True)  # posterior variance
    rng = np.random.default_rng(3)
    shape = (2, 3, 4, 2, 2)
    x, eps_out, noise, mnoise = (rng.standard_normal(shape) for _ in range(4))
    frame_mask = np.array([[1.0, 0.5, 0.3, 0.0], [0.0, 0.55, 1.0, 0.9]])  # steps [10,5,3,0], [0,5,10,9]
    seen = []

    def model(xx, tt, **kw):
        seen.append((xx.asnumpy(), kw["x_mask"].asnumpy()))
        return ms.Tensor(eps_out.astype(np.float32))

    t = 5
    got = diff.p_sample(model, ms.Tensor(x, ms.float32), ms.Tensor(np.array([t, t], np.int32)),
                        clip_denoised=False, noise=ms.Tensor(noise, ms.float32),
                        frame_mask=frame_mask, mask_noise=ms.Tensor(mnoise, ms.float32))["sample"].asnumpy()
    ab, ab_prev = np_tables(diff)
    steps = np.array([[10, 5, 3, 0], [0, 5, 10, 9]])
    fr = lambda m: m[:, None, :, None, None]  # noqa: E731  [B, T] -> [B, 1, T, 1, 1]
    x_in = np.where(fr(steps == t), np.sqrt(ab[t]) * x + np.sqrt(1 - ab[t]) * mnoise, x)
    pred_x0 = np.sqrt(1 / ab[t]) * x_in - np.sqrt(1 / ab[t] - 1) * eps_out
    beta = 1 - ab[t] / ab_prev[t]
    coef1, coef2 = beta * np.sqrt(ab_prev[t]) / (1 - ab[t]), (1 - ab_prev[t]) * np.sqrt(1 - beta) / (1 - ab[t])
    mean = coef1 * pred_x0 + coef2 * x_in
    var = beta * (1 - ab_prev[t]) / (1 - ab[t])
    expect = np.where(fr(steps < t), x, mean + np.sqrt(var) * noise)
    np.testing.assert_allclose(seen[0][0], x_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(seen[0][1], steps > t)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    held = fr(steps < t) & np.ones(shape, bool)
    np.testing.assert_array_equal(got[held], x.astype(np.float32)[held])  # held frames: copied exactly


class Recorder:
    """CFG-batch model: eps = 0.1 * x (ignores y), v = 0; records x, t and x_mask of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None, mask=None, x_mask=None, **kw):
        xn = x.asnumpy()
        self.calls.append(dict(x=xn, t=t.asnumpy(), x_mask=None if x_mask is None else x_mask.asnumpy(), kw=kw))
        return ms.Tensor(np.concatenate([0.1 * xn, np.zeros_like(xn)], axis=1).astype(np.float32))


def _conditioned_sample(diff, frame_mask, seed=0, **sample_kw):
    rng = np.random.default_rng(seed)
    b, c, t = frame_mask.shape[0], 4, frame_mask.shape[1]
    ref = rng.standard_normal((b, c, t, 3, 3)).astype(np.float32)
    z = np.where((frame_mask < 1)[:, None, :, None, None], ref, rng.standard_normal(ref.shape)).astype(np.float32)
    y = ms.Tensor(np.ones((b, 1, 3, 5), np.float32))
    y_null = ms.Tensor(np.zeros((1, 1, 3, 5), np.float32))
    rec = Recorder()
    ms.set_seed(seed)
    out = diff.sample(rec, z.shape, y, None, y_null, noise=ms.Tensor(z), progress=False, frame_mask=frame_mask,
                      **sample_kw).asnumpy()
    return ref, out, rec


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_edit_ratio_releases_reference_at_its_step(sampler):
    steps = 10
    diff = IDDPM(num_sampling_steps=steps, sampler=sampler, cfg_scale=4.0)
    frame_mask = np.array([[1.0, 0.0, 0.4, 0.0, 1.0]], np.float32)  # release steps 10, 0, 4, 0, 10
    release = np.array([10, 0, 4, 0, 10])
    ref, out, rec = _conditioned_sample(diff, frame_mask,
                                        model_kwargs={"fps": ms.Tensor(np.array([24.0], np.float32))})
    assert len(rec.calls) == steps
    ab = diff.alphas_cumprod
    for call, t in zip(rec.calls, range(steps - 1, -1, -1)):
        assert call["x_mask"].shape == (2, 5)  # doubled for CFG, both halves alike
        np.testing.assert_array_equal(call["x_mask"], np.stack([release > t] * 2))
        np.testing.assert_array_equal(call["kw"]["fps"].asnumpy(), [24.0, 24.0])  # model_kwargs doubled
        x = call["x"][0]  # cond half
        for f in (1, 2, 3):
            if release[f] < t:  # still held: the reference, exactly
                np.testing.assert_array_equal(x[:, f], ref[0, :, f])
            elif release[f] == t:  # released now: noised to level t once
                resid = (x[:, f] - np.sqrt(ab[t]) * ref[0, :, f]) / np.sqrt(1 - ab[t])
                assert 0.4 < resid.std() < 1.8  # 36 values of N(0, 1) scaled by sqrt(1 - abar_t)
        if t < 4:  # after its release the edited frame evolves with the others (no reset)
            assert np.abs(x[:, 2] - ref[0, :, 2]).max() > 1e-3
    # mask 0, the original's rule: released at t = 0 and denoised once -> ref + sqrt(1/abar_0 - 1) (eps - eps_model)
    last = rec.calls[-1]["x"][0]
    mnoise = (last[:, [1, 3]] - np.sqrt(ab[0]) * ref[0][:, [1, 3]]) / np.sqrt(1 - ab[0])
    expect = (last[:, [1, 3]] - np.sqrt(1 - ab[0]) * 0.1 * last[:, [1, 3]]) / np.sqrt(ab[0])
    np.testing.assert_allclose(out[0][:, [1, 3]], expect, rtol=1e-5, atol=1e-5)
    dev = np.abs(out[0][:, [1, 3]] - ref[0][:, [1, 3]]).max()
    assert 1e-4 < dev < 0.1 and np.abs(mnoise).max() > 0.1  # close to the reference, not equal


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_mask_zero_frames_exact_with_exact_conditioning(sampler):
    diff = IDDPM(num_sampling_steps=6, sampler=sampler, exact_conditioning=True)
    frame_mask = np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.5]], np.float32)
    ref, out, rec = _conditioned_sample(diff, frame_mask, seed=1)
    keep = frame_mask == 0
    for i in range(2):
        np.testing.assert_array_equal(out[i][:, keep[i]], ref[i][:, keep[i]])
    release = np.array([[-1, 6, 6, -1], [-1, -1, 6, 3]])  # mask 0 -> never released
    for call, t in zip(rec.calls, range(5, -1, -1)):
        np.testing.assert_array_equal(call["x_mask"], np.concatenate([release > t] * 2))
    np.testing.assert_array_equal(rec.calls[-1]["x_mask"][:2], ~keep)  # still conditioning at t = 0
    assert np.abs(out[1][:, 3] - ref[1][:, 3]).max() > 1e-3  # the 0.5 frame was released and regenerated


def test_no_frame_mask_unchanged():
    """Without a frame mask the sampler passes no x_mask and gives the same samples as before."""
    diff = IDDPM(num_sampling_steps=4)
    rng = np.random.default_rng(4)
    z = rng.standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
    y, y_null = ms.Tensor(np.ones((1, 1, 3, 5), np.float32)), ms.Tensor(np.zeros((1, 1, 3, 5), np.float32))
    rec = Recorder()
    ms.set_seed(5)
    a = diff.sample(rec, z.shape, y, None, y_null, noise=ms.Tensor(z), progress=False).asnumpy()
    assert all(c["x_mask"] is None for c in rec.calls)
    ms.set_seed(5)
    b = diff.sample(rec, z.shape, y, None, y_null, noise=ms.Tensor(z), progress=False,
                    frame_mask=np.ones((1, 2), np.float32)).asnumpy()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # mask 1 everywhere = plain sampling


def test_forward_with_cfg_doubles_model_kwargs():
    seen = {}

    def model(x, t, y=None, mask=None, **kw):
        seen.update(kw)
        return ops.zeros((x.shape[0], 8) + tuple(x.shape[2:]), ms.float32)

    x = ms.Tensor(np.zeros((2, 4, 3, 2, 2), np.float32))
    t = ms.Tensor(np.array([1, 1], np.int32))
    y = ms.Tensor(np.ones((2, 1, 3, 5), np.float32))
    y_null = ms.Tensor(np.zeros((1, 1, 3, 5), np.float32))
    x_mask = ms.Tensor(np.array([[True, False, True], [False, True, True]]))
    forward_with_cfg(model, x, t, y, None, y_null, 7.0, 3,
                     model_kwargs={"x_mask": x_mask, "height": np.array([240.0, 240.0]), "base": 512})
    np.testing.assert_array_equal(seen["x_mask"].asnumpy(), np.concatenate([x_mask.asnumpy()] * 2))
    assert seen["height"].tolist() == [240.0] * 4 and seen["base"] == 512
    forward_with_cfg(model, x, t, y, None, y_null, 7.0, 3, model_kwargs={"ar": np.array([0.5])})
    assert seen["ar"].tolist() == [0.5]  # one value for the whole batch: passed as it is (the model repeats it)
    with pytest.raises(ValueError, match="'ar' of shape \\(3,\\) is not per sample"):
        forward_with_cfg(model, x, t, y, None, y_null, 7.0, 3, model_kwargs={"ar": np.array([0.5, 0.5, 0.5])})
