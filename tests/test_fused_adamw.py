"""FusedAdamW (opensora/optim/adamw.py): torch.optim.AdamW's updates with one Adam kernel per parameter,
and the state layout of mindspore.experimental.optim.AdamW (checkpoints load either way).

Tolerance: 1e-6 absolute on parameters of scale ~1 after 6 steps and 1e-6 of the first moment's largest
value (float32 rounding of a few steps; the experimental AdamW differs from torch by the same order);
the second moment 2e-5 relative (the kernel's float32 1 - beta2, see the test)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.experimental.optim import AdamW

from opensora.optim.adamw import FusedAdamW

torch = pytest.importorskip("torch")

SHAPES = [(24, 16), (16,)]


class Step(nn.Cell):
    def __init__(self, opt):
        super().__init__()
        self.opt = opt

    def construct(self, grads):
        self.opt(grads)
        return True


def make_params(tag):
    rng = np.random.default_rng(0)
    return [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"{tag}{i}") for i, s in enumerate(SHAPES)]


def grads_for(step):
    rng = np.random.default_rng(100 + step)
    return [(rng.standard_normal(s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32) for s in SHAPES]


def run_ms(opt_cls, params, steps, lrs, **kw):
    opt = opt_cls(params, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, **kw)
    step = Step(opt)
    for i in range(steps):
        opt.param_groups[0]["lr"].set_data(Tensor(lrs[i], ms.float32))  # as the train task sets it
        step(tuple(Tensor(g) for g in grads_for(i)))
    return opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_adamw_equals_torch_adamw(graph_mode, weight_decay):
    steps, lrs = 6, [1e-2, 1e-2, 5e-3, 5e-3, 2e-3, 1e-3]
    params = make_params(f"wd{weight_decay}_")
    opt = run_ms(FusedAdamW, params, steps, lrs, weight_decay=weight_decay)

    rng = np.random.default_rng(0)  # make_params' values
    tparams = [torch.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True) for s in SHAPES]
    topt = torch.optim.AdamW(tparams, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for i in range(steps):
        for group in topt.param_groups:
            group["lr"] = lrs[i]
        for p, g in zip(tparams, grads_for(i)):
            p.grad = torch.from_numpy(g)
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.asnumpy(), tp.detach().numpy(), rtol=0, atol=1e-6)
    for m, v, tp in zip(opt.exp_avg, opt.exp_avg_sq, tparams):
        st = topt.state[tp]
        m_ref, v_ref = st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()
        # the kernel forms b m + (1 - b) g in another order: float32 rounding of the moment's scale
        np.testing.assert_allclose(m.asnumpy(), m_ref, rtol=0, atol=1e-6 * np.abs(m_ref).max())
        # ... and takes 1 - b2 in float32 (1 - 0.999f = 0.00099998713): v is 1.29e-5 smaller relative to
        # torch's (which multiplies by the double 1 - 0.999); the update then differs by ~6e-6 of itself
        np.testing.assert_allclose(v.asnumpy(), v_ref, rtol=2e-5, atol=1e-6 * np.abs(v_ref).max())
    assert int(opt.state_step.asnumpy()) == steps


def test_state_layout_equals_experimental_adamw_and_resumes_from_it(graph_mode):
    """The state parameters have the experimental AdamW's names and shapes, so a checkpoint of one loads
    into the other; 3 experimental steps + 3 fused steps from its state = 6 experimental steps."""
    from opensora.train.state import optimizer_state

    lrs = [1e-2] * 6
    a_params, b_params = make_params("a"), make_params("b")
    a = run_ms(AdamW, a_params, 3, lrs, weight_decay=0.0)
    b = FusedAdamW(b_params, lr=1e-2, weight_decay=0.0)
    sa, sb = optimizer_state(a, a_params), optimizer_state(b, b_params)
    strip = lambda k: k.replace("a0", "#0").replace("a1", "#1").replace("b0", "#0").replace("b1", "#1")
    assert {strip(k): tuple(v.shape) for k, v in sa.items()} == {strip(k): tuple(v.shape) for k, v in sb.items()}
    # resume: copy weights and state, then 3 more steps each way
    for pa, pb in zip(a_params, b_params):
        pb.set_data(pa.data.copy())
    by_name = {strip(k): v for k, v in sa.items()}
    for k, v in sb.items():
        v.set_data(by_name[strip(k)].data.copy())
    sa_step, sb_step = Step(a), Step(b)
    for i in range(3, 6):
        g = tuple(Tensor(x) for x in grads_for(i))
        sa_step(g)
        sb_step(g)
    for pa, pb in zip(a_params, b_params):
        np.testing.assert_allclose(pb.asnumpy(), pa.asnumpy(), rtol=0, atol=1e-6)


def test_amsgrad_is_refused_with_the_alternative_named():
    with pytest.raises(ValueError, match="mindspore.experimental.optim.AdamW"):
        FusedAdamW(make_params("c"), lr=1e-3, amsgrad=True)
