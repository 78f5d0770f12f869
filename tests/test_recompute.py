"""Gradient checkpointing (model.recompute_blocks): the same loss and gradients as without it."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from opensora.model import STDiT
from opensora.scheduler import IDDPM
from opensora.train.step import DiffusionLoss

def _params(cell):
    return dict(cell.parameters_and_names())


TINY = dict(input_size=(2, 4, 4), in_channels=3, hidden_size=32, depth=2, num_heads=2, caption_channels=8,
            model_max_length=4, class_dropout_prob=0.0)


class _Grads(nn.Cell):
    def __init__(self, loss_net, weights):
        super().__init__()
        self.fn = ms.value_and_grad(loss_net, None, weights)

    def construct(self, *inputs):
        return self.fn(*inputs)


def _recomputed(model):
    return [bool(getattr(b, "_has_config_recompute", False)) for b in model.blocks]


def test_recompute_blocks_setting():
    assert STDiT(**TINY).recompute_blocks == 0
    m = STDiT(**TINY, recompute_blocks=1)
    assert m.recompute_blocks == 1 and _recomputed(m) == [True, False]
    m = STDiT(**TINY, recompute_blocks="all")
    assert m.recompute_blocks == 2 and _recomputed(m) == [True, True]
    with pytest.raises(ValueError, match=r"model.recompute_blocks=3.*model.depth=2"):
        STDiT(**TINY, recompute_blocks=3)
    with pytest.raises(ValueError, match="model.recompute_blocks='some'"):
        STDiT(**TINY, recompute_blocks="some")


def _matmuls_in_compiled_graph(folder) -> int:
    """MatMul + BatchMatMul nodes in the validated graph MindSpore dumped (save_graphs) to `folder`."""
    (ir,) = list(folder.glob("*_validate_*.ir"))
    text = ir.read_text()
    return text.count("PrimFunc_MatMul(") + text.count("PrimFunc_BatchMatMul(")


def test_recompute_gives_identical_loss_and_grads(tmp_path, monkeypatch):
    monkeypatch.setenv("MS_DEV_DUMP_IR_PASSES", "validate")  # dump only the graph counted below
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 3, 2, 4, 4)).astype(np.float32)
        inputs = [ms.Tensor(x), ms.Tensor(np.array([3, 800], np.int32)),
                  ms.Tensor(rng.standard_normal(x.shape).astype(np.float32)),
                  ms.Tensor(rng.standard_normal((2, 1, 4, 8)).astype(np.float32)),
                  ms.Tensor(np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32))]
        ref_values = None
        results, matmuls = {}, {}
        for setting in (None, 1, "all"):
            ms.set_context(save_graphs=1, save_graphs_path=str(tmp_path / str(setting)))
            model = STDiT(**TINY, recompute_blocks=setting)
            params = _params(model)
            if ref_values is None:  # random values everywhere (zero-init layers too), shared by all three
                ref_values = {n: (0.2 * rng.standard_normal(p.shape)).astype(np.float32) for n, p in params.items()}
            for n, p in params.items():
                p.set_data(ms.Tensor(ref_values[n]))
            model.set_train(True)
            weights = ms.ParameterTuple(model.trainable_params())
            loss, grads = _Grads(DiffusionLoss(model, IDDPM(num_sampling_steps=None)), weights)(*inputs)
            results[setting] = (float(loss.asnumpy()), [g.asnumpy() for g in grads])
            matmuls[setting] = _matmuls_in_compiled_graph(tmp_path / str(setting))
        # recomputation is really compiled in: each recomputed block repeats its forward matmuls, 15 of the
        # layers (qkv, proj, 2 batched for each self-attention; q, kv, proj, 2 batched for cross-attention;
        # MLP 2) and, on CPU, 23 broadcasts and sums done as matmuls (opensora/model/layers.py, speed note:
        # 9 training-mode biases, 2 gates, 2 x 2 modulations, 2 LayerNorms x 4); block 0 (recomputed when
        # recompute_blocks=1) also broadcasts the temporal position embedding
        assert matmuls[1] == matmuls[None] + 15 + 23 + 1 and matmuls["all"] == matmuls[1] + 15 + 23, matmuls
        loss0, grads0 = results[None]
        assert np.isfinite(loss0) and any(np.abs(g).max() > 0 for g in grads0)
        for setting in (1, "all"):
            loss, grads = results[setting]
            # same arithmetic in the same order: equal up to fp32 rounding (1e-6 relative)
            assert abs(loss - loss0) <= 1e-6 * abs(loss0), setting
            for g, g0 in zip(grads, grads0):
                np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(g0).max()))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE, save_graphs=0)
