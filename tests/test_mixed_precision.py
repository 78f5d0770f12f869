"""Mixed precision and loss scaling: config checks, the device-support probe, fp16 training of a tiny
STDiT, and the train step's overflow handling (skip + count + scale update) with injected infs."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from mindspore.experimental.optim import AdamW

from mindspore import amp

from opensora.config import ConfigError, validate
from opensora.model import STDiT
from opensora.model.precision import check_dtype_supported
from opensora.parallel.single import SingleProcess
from opensora.scheduler import IDDPM
from opensora.train.state import optimizer_state
from opensora.train.step import DiffusionLoss, TrainStep, loss_scaler

TINY = dict(input_size=(2, 4, 4), in_channels=3, hidden_size=32, depth=1, num_heads=2, caption_channels=8,
            model_max_length=4, class_dropout_prob=0.0)


def _batch(seed=0, inf=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 2, 4, 4)).astype(np.float32)
    if inf:
        x[0, 0, 0, 0, 0] = np.inf
    return [ms.Tensor(x), ms.Tensor(np.array([10, 700], np.int32)),
            ms.Tensor(rng.standard_normal(x.shape).astype(np.float32)),
            ms.Tensor(rng.standard_normal((2, 1, 4, 8)).astype(np.float32)), ms.Tensor(np.array([[1, 1, 1, 0]] * 2))]


def make_step(loss_net, model, lr, clip, ema_decay, scaler):
    """A TrainStep for `model` on one process (the train task builds it the same way)."""
    params = dict(model.parameters_and_names())
    names = [n for n, p in params.items() if p.requires_grad]
    update = SingleProcess().build_update(names, [params[n] for n in names], lambda w: AdamW(w, lr=lr), ema_decay,
                                          params)
    step = TrainStep(loss_net, update, clip, ema_decay, scaler)
    step.set_train(True)
    return step, update, params


def _snapshot(*dicts):
    return {f"{i}.{n}": p.asnumpy().copy() for i, d in enumerate(dicts) for n, p in d.items()}


# ---------------------------------------------------------------- settings


def test_fp16_without_loss_scale_fails_naming_both_settings(compose_config):
    from hydra.errors import ConfigCompositionException

    cfg = compose_config(["precision=fp16", "precision.loss_scale=null", "logger=none"])
    with pytest.raises(ConfigError, match=r"precision\.dtype=fp16.*precision\.loss_scale=null"):
        validate(cfg)
    validate(compose_config(["precision=fp16", "precision.loss_scale=null", "task=benchmark"]))  # not training
    with pytest.raises(ConfigCompositionException, match="always"):
        compose_config(["precision.loss_scale=always"])


def test_precision_group_composes_into_model_and_loss_scale(compose_config):
    cfg = compose_config(["precision=fp16"])
    assert cfg.model.dtype == "fp16"
    scaler = loss_scaler(cfg.precision)
    assert isinstance(scaler, amp.DynamicLossScaler)
    assert (float(scaler.scale_value.asnumpy()), scaler.scale_factor, scaler.scale_window) == (65536.0, 2, 2000)
    cfg = compose_config(["precision=bf16"])
    assert cfg.model.dtype == "bf16" and loss_scaler(cfg.precision) is None
    assert loss_scaler(compose_config([]).precision) is None
    static = loss_scaler(compose_config(["precision=fp16", "precision.loss_scale=static"]).precision)
    assert isinstance(static, amp.StaticLossScaler)


def test_unsupported_dtype_on_cpu_fails_once_and_clearly():
    check_dtype_supported("fp32", "CPU")
    check_dtype_supported("fp16", "CPU")  # MindSpore 2.10 has fp16 CPU kernels
    # ... but no bf16 MatMul on CPU: the check names the setting and the device, not a kernel stack trace
    with pytest.raises(RuntimeError, match=r"precision\.dtype=bf16 is not supported on device_target=CPU.*MatMul"):
        check_dtype_supported("bf16", "CPU")


def test_runtime_initialisation_rejects_bf16_on_cpu(compose_config):
    from opensora.runtime import initialise, set_strategy

    try:
        with pytest.raises(RuntimeError, match="precision.dtype=bf16 is not supported"):
            initialise(compose_config(["precision=bf16"]))
        with pytest.raises(RuntimeError, match="text_encoder.dtype=bf16 is not supported"):
            initialise(compose_config(["text_encoder.dtype=bf16"]))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        set_strategy(None)


# ---------------------------------------------------------------- fp16 training with dynamic loss scale


@pytest.fixture(scope="module")
def fp16_step():
    """A tiny fp16 STDiT's train step, dynamic loss scale with a 3-step growth window, EMA on."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    model = STDiT(**TINY, dtype="fp16")
    step, update, params = make_step(DiffusionLoss(model, IDDPM(num_sampling_steps=None)), model, 1e-3, 1.0, 0.9,
                                     amp.DynamicLossScaler(65536.0, 2, 3))
    opt_state = optimizer_state(update.optimizer, update.weights)
    yield model, step, params, update.ema, opt_state
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_fp16_trains_tiny_model_and_matches_fp32_loss(fp16_step):
    model, step, params, _, _ = fp16_step
    # reference: the same weights in an fp32 model, loss evaluated eagerly
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref = STDiT(**TINY, dtype="fp32")
    ref_params = dict(ref.parameters_and_names())
    for n, p in params.items():
        ref_params[n].set_data(p.data.copy())
    ref.set_train(True)
    loss32 = float(DiffusionLoss(ref, IDDPM(num_sampling_steps=None))(*_batch()).asnumpy())
    ms.set_context(mode=ms.GRAPH_MODE)

    losses = []
    for _ in range(8):  # fit one fixed batch
        loss, grad_norm, finite, scale = step(*_batch())
        assert bool(finite.asnumpy()) and np.isfinite(float(grad_norm.asnumpy()))
        losses.append(float(loss.asnumpy()))
    assert abs(losses[0] - loss32) < 1e-2 * abs(loss32)  # fp16 matmuls, fp32 loss: same value to ~1e-3
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    assert all(np.isfinite(p.asnumpy()).all() and p.dtype == ms.float32 for p in params.values())  # fp32 masters
    # 8 finite steps with window 3: the scale doubled twice (after steps 3 and 6), 2 steps into the next window
    assert float(step.scaler.scale_value.asnumpy()) == 65536.0 * 4 and int(step.scaler.counter.asnumpy()) == 2
    assert int(step.skipped_steps.asnumpy()) == 0


def test_overflow_step_is_skipped_counted_and_halves_the_scale(fp16_step):
    _, step, params, ema, opt_state = fp16_step
    scale0 = float(step.scaler.scale_value.asnumpy())
    before = _snapshot(params, ema, opt_state)
    skipped0 = int(step.skipped_steps.asnumpy())

    loss, grad_norm, finite, used = step(*_batch(seed=1, inf=True))  # an inf input: non-finite gradients
    assert not bool(finite.asnumpy()) and float(used.asnumpy()) == scale0
    after = _snapshot(params, ema, opt_state)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)  # weights, EMA, AdamW state
    assert int(step.skipped_steps.asnumpy()) == skipped0 + 1
    assert float(step.scaler.scale_value.asnumpy()) == scale0 / 2 and int(step.scaler.counter.asnumpy()) == 0

    # training resumes normally; 3 finite steps in a row double the scale again
    for i in range(3):
        _, _, finite, _ = step(*_batch(seed=2 + i))
        assert bool(finite.asnumpy())
    assert float(step.scaler.scale_value.asnumpy()) == scale0
    changed = _snapshot(params, ema, opt_state)
    assert any(not np.array_equal(after[k], changed[k]) for k in after)


class _Toy(nn.Cell):
    """loss = mean((x W^T + b)^2) * k; k = inf makes every gradient non-finite."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 3)

    def construct(self, x, k):
        return (self.dense(x) ** 2).mean() * k


def _toy_step(scaler, seed=0):
    ms.set_seed(seed)
    net = _Toy()
    step, _, _ = make_step(net, net, 1e-2, 0.0, None, scaler)
    return net, step


def test_static_loss_scale_unscales_exactly_and_skips_overflow(graph_mode):
    x = ms.Tensor(np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    one, inf = ms.Tensor(1.0, ms.float32), ms.Tensor(np.inf, ms.float32)
    net_a, plain = _toy_step(None)
    net_b, scaled = _toy_step(amp.StaticLossScaler(1024.0))
    for _ in range(2):
        la, ga, _, _ = plain(x, one)
        lb, gb, fb, sb = scaled(x, one)
        # a power-of-two scale is exact in fp32: same loss, same unscaled gradient norm, same update
        assert float(la.asnumpy()) == float(lb.asnumpy()) and float(ga.asnumpy()) == float(gb.asnumpy())
        assert bool(fb.asnumpy()) and float(sb.asnumpy()) == 1024.0
    np.testing.assert_array_equal(net_a.dense.weight.asnumpy(), net_b.dense.weight.asnumpy())
    w = net_b.dense.weight.asnumpy().copy()
    _, _, fb, _ = scaled(x, inf)
    assert not bool(fb.asnumpy()) and int(scaled.skipped_steps.asnumpy()) == 1
    assert float(scaled.scaler.scale_value.asnumpy()) == 1024.0  # static: never changes
    np.testing.assert_array_equal(net_b.dense.weight.asnumpy(), w)
