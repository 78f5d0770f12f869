"""STDiT (Open-Sora 1.0) on MindSpore: checkpoint names, sizes, embeddings, attention/masking,
block wiring, init, graph-mode forward/backward and class dropout.

References are hand-computed values or small numpy implementations written from SPEC §1.1.
Tolerances: fp32 comparisons atol 1e-5 (1e-4 where sums over many terms), stated per test.
"""

import logging
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from opensora.model import STDiT, count_parameters, stdit_xl2
from opensora.model import layers as L
from opensora.model.stdit import (
    Attention,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    STDiTBlock,
    T2IFinalLayer,
    TimestepEmbedder,
)

TINY = dict(
    input_size=(4, 8, 8),
    in_channels=3,
    hidden_size=64,
    depth=2,
    num_heads=4,
    caption_channels=32,
    model_max_length=8,
)


# ---------------------------------------------------------------- helpers


def _np(t):
    return t.asnumpy() if isinstance(t, Tensor) else np.asarray(t)


def randomize(cell, seed):
    """Give every trainable parameter a random value of sensible scale (zero-init layers included)."""
    rng = np.random.default_rng(seed)
    for p in cell.trainable_params():
        shape = p.shape
        if len(shape) >= 2 and "scale_shift_table" not in p.name:
            v = rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[1:])))
        else:
            v = 0.1 * rng.standard_normal(shape)
        p.set_data(Tensor(v.astype(np.float32)))


def np_layernorm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def np_linear(x, dense):
    return x @ _np(dense.weight).T + _np(dense.bias)


def inputs(batch=2, seed=0, cfg=TINY):
    rng = np.random.default_rng(seed)
    C, (T, H, W) = cfg["in_channels"], cfg["input_size"]
    Lt, Cc = cfg["model_max_length"], cfg["caption_channels"]
    x = rng.standard_normal((batch, C, T, H, W)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int32)
    y = rng.standard_normal((batch, 1, Lt, Cc)).astype(np.float32)
    lens = rng.integers(1, Lt + 1, batch)
    lens[0] = 3
    mask = (np.arange(Lt)[None] < lens[:, None]).astype(np.int32)
    return x, t, y, mask


def T_(*arrays):
    return [Tensor(a) for a in arrays]


@pytest.fixture(scope="module")
def tiny():
    """Tiny STDiT with all weights random (so zero-init layers do not hide anything), eval mode."""
    ms.set_seed(0)
    net = STDiT(**TINY)
    randomize(net, seed=1)
    net.set_train(False)
    return net


# ---------------------------------------------------------------- checkpoint names and sizes


def test_parameter_names_equal_torch_checkpoint_keys():
    net = STDiT(**TINY)  # depth 2
    expected = {
        "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "t_block.1.weight", "t_block.1.bias",
        "y_embedder.y_embedding",
        "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias",
        "y_embedder.y_proj.fc2.weight", "y_embedder.y_proj.fc2.bias",
        "blocks.0.scale_shift_table",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.cross_attn.q_linear.weight", "blocks.0.cross_attn.q_linear.bias",
        "blocks.0.cross_attn.kv_linear.weight", "blocks.0.cross_attn.kv_linear.bias",
        "blocks.0.cross_attn.proj.weight", "blocks.0.cross_attn.proj.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "blocks.0.attn_temp.qkv.weight", "blocks.0.attn_temp.qkv.bias",
        "blocks.0.attn_temp.proj.weight", "blocks.0.attn_temp.proj.bias",
        "blocks.1.scale_shift_table",
        "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias",
        "blocks.1.attn.proj.weight", "blocks.1.attn.proj.bias",
        "blocks.1.cross_attn.q_linear.weight", "blocks.1.cross_attn.q_linear.bias",
        "blocks.1.cross_attn.kv_linear.weight", "blocks.1.cross_attn.kv_linear.bias",
        "blocks.1.cross_attn.proj.weight", "blocks.1.cross_attn.proj.bias",
        "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias",
        "blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias",
        "blocks.1.attn_temp.qkv.weight", "blocks.1.attn_temp.qkv.bias",
        "blocks.1.attn_temp.proj.weight", "blocks.1.attn_temp.proj.bias",
        "final_layer.scale_shift_table",
        "final_layer.linear.weight", "final_layer.linear.bias",
    }  # fmt: skip
    names = [p.name for p in net.get_parameters()]
    assert len(names) == len(set(names))
    assert set(names) == expected
    # pos embeds are recomputed constants, not parameters
    assert not any("pos_embed" in n for n in names)

    shapes = {p.name: tuple(p.shape) for p in net.get_parameters()}
    assert shapes["x_embedder.proj.weight"] == (64, 3, 1, 2, 2)  # torch Conv3d layout
    assert shapes["t_embedder.mlp.0.weight"] == (64, 256)  # Linear [out, in]
    assert shapes["t_block.1.weight"] == (6 * 64, 64)
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * 64, 64)
    assert shapes["blocks.0.cross_attn.kv_linear.weight"] == (2 * 64, 64)
    assert shapes["blocks.0.scale_shift_table"] == (6, 64)
    assert shapes["final_layer.scale_shift_table"] == (2, 64)
    assert shapes["final_layer.linear.weight"] == (1 * 2 * 2 * 6, 64)
    assert shapes["y_embedder.y_embedding"] == (8, 32)
    assert net.out_channels == 6

    # y_embedding is a frozen buffer: not trainable, not counted
    y_emb = net.y_embedder.y_embedding
    assert y_emb.requires_grad is False
    assert "y_embedder.y_embedding" not in [p.name for p in net.trainable_params()]


def analytic_count(hidden, depth, in_ch, patch, caption_channels, mlp_ratio=4.0, pred_sigma=True):
    """Trainable parameters of STDiT counted per component (SPEC §1.1)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    out_ch = 2 * in_ch if pred_sigma else in_ch
    mlp_hidden = int(hidden * mlp_ratio)
    block = (
        6 * hidden  # scale_shift_table
        + 2 * (lin(hidden, 3 * hidden) + lin(hidden, hidden))  # attn, attn_temp
        + lin(hidden, hidden) + lin(hidden, 2 * hidden) + lin(hidden, hidden)  # cross_attn
        + lin(hidden, mlp_hidden) + lin(mlp_hidden, hidden)  # mlp
    )  # fmt: skip
    embed = (
        in_ch * int(np.prod(patch)) * hidden + hidden  # x_embedder
        + lin(256, hidden) + lin(hidden, hidden)  # t_embedder
        + lin(hidden, 6 * hidden)  # t_block
        + lin(caption_channels, hidden) + lin(hidden, hidden)  # y_proj
        + 2 * hidden + lin(hidden, int(np.prod(patch)) * out_ch)  # final layer
    )  # fmt: skip
    return embed + depth * block, block


def test_parameter_count_formula_matches_built_models_and_xl2():
    # the formula equals count_parameters() on two different small models
    n, _ = analytic_count(64, 2, 3, (1, 2, 2), 32)
    assert count_parameters(STDiT(**TINY)) == n
    other = dict(input_size=(4, 8, 8), in_channels=2, patch_size=(2, 2, 2), hidden_size=48, depth=1,
                 num_heads=3, mlp_ratio=2.0, pred_sigma=False, caption_channels=16, model_max_length=4)  # fmt: skip
    n, _ = analytic_count(48, 1, 2, (2, 2, 2), 16, mlp_ratio=2.0, pred_sigma=False)
    assert count_parameters(STDiT(**other)) == n
    # STDiT-XL/2 (SPEC §1.1)
    total, block = analytic_count(1152, 28, 4, (1, 2, 2), 4096)
    assert block == 26_568_576
    assert total == 759_620_768
    # one real-size block, built
    assert count_parameters(STDiTBlock(1152, 16, d_s=4, d_t=2)) == 26_568_576


@pytest.mark.slow
def test_stdit_xl2_parameter_count_built():
    net = stdit_xl2(input_size=(16, 32, 32))  # ~17 s, 3.5 GB
    assert count_parameters(net) == 759_620_768
    assert (net.depth, net.hidden_size, net.num_heads, net.patch_size, net.out_channels) == (28, 1152, 16, (1, 2, 2), 8)


# ---------------------------------------------------------------- embeddings


def test_timestep_embedding_cos_sin_layout_hand_values():
    emb = TimestepEmbedder(hidden_size=8, frequency_embedding_size=8)
    got = _np(emb.timestep_embedding(Tensor(np.array([0.0, 1.0, 500.0], np.float32))))
    # half = 4: freqs = exp(-ln(10000) * k / 4) = 10^-k, k = 0..3; layout [cos | sin]
    expected = []
    for t in (0.0, 1.0, 500.0):
        args = [t * 1.0, t * 0.1, t * 0.01, t * 0.001]
        expected.append([math.cos(a) for a in args] + [math.sin(a) for a in args])
    np.testing.assert_allclose(got, np.array(expected), atol=1e-4)  # cos(500) in fp32: ~3e-5 error
    assert got[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_1d_sincos_pos_embed_hand_values():
    got = L.get_1d_sincos_pos_embed(4, 3, scale=2.0)
    # positions 0, 0.5, 1.0; omega = 10000^(-k/2) = [1, 0.01]; layout [sin | cos]
    expected = [[math.sin(p), math.sin(0.01 * p), math.cos(p), math.cos(0.01 * p)] for p in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_2d_sincos_pos_embed_w_first_then_h_hand_values():
    got = L.get_2d_sincos_pos_embed(8, (2, 3), scale=0.5)  # 2 rows (h), 3 columns (w)
    assert got.shape == (6, 8)

    def emb(h, w):  # positions / 0.5; each half: omega = [1, 0.01], [sin | cos]
        hp, wp = h / 0.5, w / 0.5
        return [math.sin(wp), math.sin(0.01 * wp), math.cos(wp), math.cos(0.01 * wp),
                math.sin(hp), math.sin(0.01 * hp), math.cos(hp), math.cos(0.01 * hp)]  # fmt: skip

    for h in range(2):
        for w in range(3):
            np.testing.assert_allclose(got[h * 3 + w], emb(h, w), atol=1e-6)
    # literal spot check: token (h=1, w=2) -> w' = 4, h' = 2
    spot = [math.sin(4), math.sin(0.04), math.cos(4), math.cos(0.04),
            math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]  # fmt: skip
    np.testing.assert_allclose(got[5], spot, atol=1e-6)


def test_model_pos_embeds_use_scales_and_are_constants():
    net = STDiT(**{**TINY, "input_size": (4, 8, 12)}, space_scale=0.5, time_scale=2 / 3)
    pe = _np(net.pos_embed)
    assert pe.shape == (1, 4 * 6, 64)  # grid 4 x 6 (patch 2)
    np.testing.assert_allclose(pe[0], L.get_2d_sincos_pos_embed(64, (4, 6), scale=0.5), atol=1e-6)
    # token (h=3, w=5): first channel = sin(5/0.5), channel 32 = sin(3/0.5)
    np.testing.assert_allclose(pe[0, 3 * 6 + 5, [0, 32]], [math.sin(10.0), math.sin(6.0)], atol=1e-6)
    pt = _np(net.pos_embed_temporal)
    assert pt.shape == (1, 4, 64)
    np.testing.assert_allclose(pt[0, :, 0], [math.sin(i * 1.5) for i in range(4)], atol=1e-6)
    np.testing.assert_allclose(pt[0, :, 32], [math.cos(i * 1.5) for i in range(4)], atol=1e-6)


def test_patch_embed_equals_strided_conv3d():
    rng = np.random.default_rng(0)
    for patch in [(1, 2, 2), (2, 2, 2)]:
        pe = PatchEmbed3D(patch, in_chans=3, embed_dim=5)
        w = rng.standard_normal((5, 3, *patch)).astype(np.float32)
        b = rng.standard_normal(5).astype(np.float32)
        pe.proj.weight.set_data(Tensor(w))
        pe.proj.bias.set_data(Tensor(b))
        x = rng.standard_normal((2, 3, 4, 6, 4)).astype(np.float32)
        got = _np(pe(Tensor(x)))
        pt, ph, pw = patch
        nt, nh, nw = 4 // pt, 6 // ph, 4 // pw
        assert got.shape == (2, nt * nh * nw, 5)
        for i in range(nt):
            for j in range(nh):
                for k in range(nw):
                    # input window [B, C, pt, ph, pw] under output position (i, j, k)
                    window = x[:, :, i * pt:(i + 1) * pt, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw]
                    ref = np.tensordot(window, w, axes=([1, 2, 3, 4], [1, 2, 3, 4])) + b  # conv output at (i, j, k)
                    np.testing.assert_allclose(got[:, (i * nh + j) * nw + k], ref, atol=1e-5)


def test_unpatchify_hand_built_tokens():
    net = STDiT(input_size=(4, 4, 6), in_channels=1, patch_size=(2, 2, 2), hidden_size=16, depth=1, num_heads=2,
                caption_channels=8, model_max_length=2)  # fmt: skip
    pt, ph, pw, C = 2, 2, 2, 2  # out_channels = 2 (pred_sigma)
    nt, nh, nw = 2, 2, 3
    tokens = np.zeros((1, nt * nh * nw, pt * ph * pw * C), np.float32)
    for a in range(nt):
        for b in range(nh):
            for c_ in range(nw):
                for i in range(pt):
                    for j in range(ph):
                        for k in range(pw):
                            for ch in range(C):
                                t, h, w = a * pt + i, b * ph + j, c_ * pw + k
                                n, f = (a * nh + b) * nw + c_, ((i * ph + j) * pw + k) * C + ch
                                tokens[0, n, f] = ch * 1000 + t * 100 + h * 10 + w
    out = _np(net.unpatchify(Tensor(tokens)))
    assert out.shape == (1, 2, 4, 4, 6)
    ch, t, h, w = np.meshgrid(range(2), range(4), range(4), range(6), indexing="ij")
    np.testing.assert_array_equal(out[0], ch * 1000 + t * 100 + h * 10 + w)


# ---------------------------------------------------------------- layers


def test_layernorm_mlp_modulate():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32) * 3 + 1
    np.testing.assert_allclose(_np(L.LayerNorm()(Tensor(x))), np_layernorm(x), atol=1e-5)

    mlp = L.Mlp(16, hidden_features=32, out_features=8)
    randomize(mlp, 0)
    ref = np_linear(np_gelu_tanh(np_linear(x, mlp.fc1)), mlp.fc2)  # GELU tanh: 0.5x(1+tanh(...))
    np.testing.assert_allclose(_np(mlp(Tensor(x))), ref, atol=1e-5)
    assert [n for n, _ in mlp.parameters_and_names()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]

    s, h = rng.standard_normal((2, 1, 16)), rng.standard_normal((2, 1, 16))
    np.testing.assert_allclose(_np(L.t2i_modulate(Tensor(x), Tensor(h), Tensor(s))), x * (1 + s) + h, atol=1e-5)


def np_self_attention(x, attn, num_heads):
    B, N, C = x.shape
    D = C // num_heads
    qkv = np_linear(x, attn.qkv).reshape(B, N, 3, num_heads, D).transpose(2, 0, 3, 1, 4)  # torch view/permute
    q, k, v = qkv
    a = np_softmax((q * D**-0.5) @ k.transpose(0, 1, 3, 2))
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, N, C)
    return np_linear(o, attn.proj)


def test_self_attention_matches_numpy():
    rng = np.random.default_rng(0)
    attn = Attention(16, num_heads=2, qkv_bias=True)
    randomize(attn, 0)
    x = rng.standard_normal((3, 7, 16)).astype(np.float32)
    np.testing.assert_allclose(_np(attn(Tensor(x))), np_self_attention(x, attn, 2), atol=1e-5)


def np_packed_cross_attention(x, cond, mask, ca, num_heads):
    """The original: all samples' valid text tokens packed into one sequence, block-diagonal mask."""
    B, N, C = x.shape
    D = C // num_heads
    lens = mask.sum(1)
    packed = np.concatenate([cond[b][mask[b] != 0] for b in range(B)], 0)  # [sum(lens), C]
    q = np_linear(x.reshape(B * N, C), ca.q_linear).reshape(B * N, num_heads, D)
    kv = np_linear(packed, ca.kv_linear).reshape(-1, 2, num_heads, D)
    k, v = kv[:, 0], kv[:, 1]
    bias = np.full((B * N, len(packed)), -np.inf)
    start = 0
    for b in range(B):
        bias[b * N:(b + 1) * N, start:start + lens[b]] = 0.0
        start += lens[b]
    s = np.einsum("qhd,khd->hqk", q * D**-0.5, k) + bias[None]
    o = np.einsum("hqk,khd->qhd", np_softmax(s), v).reshape(B, N, C)
    return np_linear(o, ca.proj)


def test_cross_attention_equals_packed_block_diagonal():
    rng = np.random.default_rng(0)
    ca = MultiHeadCrossAttention(16, num_heads=2)
    randomize(ca, 0)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    cond = rng.standard_normal((3, 6, 16)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], np.int32)
    got = _np(ca(Tensor(x), Tensor(cond), Tensor(mask)))
    np.testing.assert_allclose(got, np_packed_cross_attention(x, cond, mask, ca, 2), atol=1e-5)
    # padded tokens have no influence
    cond2 = cond.copy()
    cond2[mask == 0] = 100.0
    np.testing.assert_allclose(_np(ca(Tensor(x), Tensor(cond2), Tensor(mask.astype(bool)))), got, atol=1e-6)
    # mask None == all tokens valid
    ones = np.ones_like(mask)
    ref = np_packed_cross_attention(x, cond, ones, ca, 2)
    np.testing.assert_allclose(_np(ca(Tensor(x), Tensor(cond))), ref, atol=1e-5)


def test_flashattn_on_cpu_falls_back_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(L, "_FLASH_FALLBACK_LOGGED", False)
    with caplog.at_level(logging.WARNING, logger=L.__name__):
        a1 = Attention(16, num_heads=2, qkv_bias=True, enable_flashattn=True)
        Attention(16, num_heads=2, qkv_bias=True, enable_flashattn=True)
    assert not a1.use_flash
    msgs = [r for r in caplog.records if "flash" in r.getMessage()]
    assert len(msgs) == 1
    randomize(a1, 0)
    x = np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(_np(a1(Tensor(x))), np_self_attention(x, a1, 2), atol=1e-5)


# ---------------------------------------------------------------- block / final layer / model wiring


def test_block_wiring_matches_spec():
    """Compose SPEC §1.1 step 4 in numpy from the block's (separately verified) sub-cells."""
    rng = np.random.default_rng(0)
    B, T, S, C, Lt = 2, 3, 4, 16, 5
    blk = STDiTBlock(C, 2, d_s=S, d_t=T)
    randomize(blk, 0)
    x = rng.standard_normal((B, T * S, C)).astype(np.float32)
    y = rng.standard_normal((B, Lt, C)).astype(np.float32)
    t0 = rng.standard_normal((B, 6 * C)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    tpe = rng.standard_normal((1, T, C)).astype(np.float32)
    call = lambda cell, *a: _np(cell(*[Tensor(np.ascontiguousarray(v)) for v in a]))  # noqa: E731

    for use_tpe in (True, False):
        mod = _np(blk.scale_shift_table)[None] + t0.reshape(B, 6, C)
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = [mod[:, i:i + 1] for i in range(6)]
        x_m = np_layernorm(x) * (1 + sc_msa) + sh_msa
        x1 = x + g_msa * call(blk.attn, x_m.reshape(B * T, S, C)).reshape(B, T * S, C)
        x_t = x1.reshape(B, T, S, C).transpose(0, 2, 1, 3).reshape(B * S, T, C)
        if use_tpe:
            x_t = x_t + tpe
        o_t = call(blk.attn_temp, x_t).reshape(B, S, T, C).transpose(0, 2, 1, 3).reshape(B, T * S, C)
        x2 = x1 + g_msa * o_t  # same gate as the spatial branch
        x3 = x2 + call(blk.cross_attn, x2, y, mask)  # no norm, no gate
        x4 = x3 + g_mlp * call(blk.mlp, np_layernorm(x3) * (1 + sc_mlp) + sh_mlp)
        got = blk(Tensor(x), Tensor(y), Tensor(t0), Tensor(mask), Tensor(tpe) if use_tpe else None)
        np.testing.assert_allclose(_np(got), x4, atol=1e-4)


def test_final_layer_matches_numpy():
    rng = np.random.default_rng(0)
    fl = T2IFinalLayer(16, 4, 6)
    randomize(fl, 0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    t = rng.standard_normal((2, 16)).astype(np.float32)
    mod = _np(fl.scale_shift_table)[None] + t[:, None]
    ref = np_linear(np_layernorm(x) * (1 + mod[:, 1:2]) + mod[:, 0:1], fl.linear)  # shift = row 0, scale = row 1
    np.testing.assert_allclose(_np(fl(Tensor(x), Tensor(t))), ref, atol=1e-5)


def np_unpatchify(tok, nt, nh, nw, patch, c):
    pt, ph, pw = patch
    B = tok.shape[0]
    out = np.zeros((B, c, nt * pt, nh * ph, nw * pw), np.float32)
    for n in range(nt * nh * nw):
        a, b, k = n // (nh * nw), (n // nw) % nh, n % nw
        blk = tok[:, n].reshape(B, pt, ph, pw, c).transpose(0, 4, 1, 2, 3)
        out[:, :, a * pt:(a + 1) * pt, b * ph:(b + 1) * ph, k * pw:(k + 1) * pw] = blk
    return out


def test_model_forward_wiring(tiny):
    """Top level: pos_embed add, t0 = t_block(t) to blocks, tpe to block 0 only, raw t to final layer."""
    net = tiny
    x, t, y, mask = inputs()
    seen_tpe = []
    originals = [blk.construct for blk in net.blocks]

    def spy(i, fn):
        def construct(x_, y_, t0_, mask_=None, tpe_=None):
            seen_tpe.append((i, None if tpe_ is None else _np(tpe_)))
            return fn(x_, y_, t0_, mask_, tpe_)

        return construct

    try:
        for i, blk in enumerate(net.blocks):
            blk.construct = spy(i, originals[i])
        got = _np(net(*T_(x, t, y, mask)))
    finally:
        for blk, fn in zip(net.blocks, originals):
            blk.construct = fn
    assert [i for i, v in seen_tpe if v is not None] == [0]
    np.testing.assert_array_equal(seen_tpe[0][1], _np(net.pos_embed_temporal))

    B, Tn, S, C = 2, 4, 16, 64
    h = _np(net.x_embedder(Tensor(x))).reshape(B, Tn, S, C) + _np(net.pos_embed)
    h = Tensor(h.reshape(B, Tn * S, C))
    temb = net.t_embedder(Tensor(t))
    t0 = net.t_block(temb)
    yy = net.y_embedder(Tensor(y), False).reshape(B, -1, C)
    for i, blk in enumerate(net.blocks):
        h = blk(h, yy, t0, Tensor(mask), net.pos_embed_temporal if i == 0 else None)
    tok = _np(net.final_layer(h, temb))
    ref = np_unpatchify(tok, 4, 4, 4, (1, 2, 2), 6)
    assert got.shape == (2, 6, 4, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_forward_inputs_variants(tiny):
    x, t, y, mask = inputs()
    base = _np(tiny(*T_(x, t, y, mask)))
    # float timestep == int timestep
    np.testing.assert_allclose(_np(tiny(*T_(x, t.astype(np.float32), y, mask))), base, atol=1e-6)
    # bool mask == int mask
    np.testing.assert_allclose(_np(tiny(*T_(x, t, y, mask.astype(bool)))), base, atol=1e-6)
    # mask None == all-ones mask, and differs from the padded mask
    full = _np(tiny(*T_(x, t, y, np.ones_like(mask))))
    np.testing.assert_allclose(_np(tiny(*T_(x, t, y))), full, atol=1e-6)
    assert np.abs(full - base).max() > 1e-3
    # a [1, L] mask is repeated over the batch
    m1 = mask[:1]
    np.testing.assert_allclose(_np(tiny(*T_(x, t, y, m1))), _np(tiny(*T_(x, t, y, np.repeat(m1, 2, 0)))), atol=1e-6)
    # null caption
    null = _np(tiny.get_null_y())
    assert null.shape == (1, 1, 8, 32)
    np.testing.assert_array_equal(null[0, 0], _np(tiny.y_embedder.y_embedding))


def test_initialization_follows_original():
    ms.set_seed(0)
    net = STDiT(**{**TINY, "hidden_size": 128})
    p = {q.name: _np(q) for q in net.get_parameters()}
    C = 128
    zero = ["final_layer.linear.weight", "final_layer.linear.bias"]
    for i in range(2):
        zero += [f"blocks.{i}.{m}.{k}" for m in ("cross_attn.proj", "attn_temp.proj") for k in ("weight", "bias")]
        assert np.all(p[f"blocks.{i}.attn.qkv.bias"] == 0) and np.all(p[f"blocks.{i}.mlp.fc1.bias"] == 0)
    for n in zero:
        assert np.all(p[n] == 0), n
    # xavier-uniform Linear: |w| <= sqrt(6 / (fan_in + fan_out)), std = bound / sqrt(3)
    for n, (fi, fo) in {"blocks.0.attn.proj.weight": (C, C), "blocks.1.mlp.fc1.weight": (C, 4 * C),
                        "blocks.0.attn_temp.qkv.weight": (C, 3 * C)}.items():  # fmt: skip
        bound = math.sqrt(6 / (fi + fo))
        assert np.abs(p[n]).max() <= bound and abs(p[n].std() / (bound / math.sqrt(3)) - 1) < 0.05, n
    # patch conv: xavier over the flattened [C, 3*1*2*2] weight; bias = torch conv default U(+-1/sqrt(12))
    w = p["x_embedder.proj.weight"]
    bound = math.sqrt(6 / (12 + C))
    assert np.abs(w).max() <= bound and abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1
    b = p["x_embedder.proj.bias"]
    assert np.abs(b).max() <= 1 / math.sqrt(12) and b.std() > 0.1
    # normal(0.02) for the timestep / caption MLP weights
    for n in ["t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "t_block.1.weight",
              "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight"]:  # fmt: skip
        assert abs(p[n].std() / 0.02 - 1) < 0.1 and abs(p[n].mean()) < 0.003, n
    # randn / sqrt(dim) tables and null caption
    assert abs(p["blocks.0.scale_shift_table"].std() * math.sqrt(C) - 1) < 0.1
    assert abs(p["y_embedder.y_embedding"].std() * math.sqrt(32) - 1) < 0.15
    # zero output layer -> the untrained model predicts exactly zero
    net.set_train(False)
    assert np.all(_np(net(*T_(*inputs(cfg=TINY)))) == 0)


# ---------------------------------------------------------------- graph mode, backward, class dropout


def test_graph_mode_forward_equals_pynative(tiny, graph_mode):
    x, t, y, mask = inputs()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref = _np(tiny(*T_(x, t, y, mask)))
    ms.set_context(mode=ms.GRAPH_MODE)
    got = _np(tiny(*T_(x, t, y, mask)))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_jit_value_and_grad_matches_finite_differences():
    ms.set_seed(0)
    net = STDiT(**TINY, class_dropout_prob=0.0)
    randomize(net, seed=2)
    net.set_train(True)
    x, t, y, mask = T_(*inputs(seed=3))
    R = Tensor(np.random.default_rng(4).standard_normal((2, 6, 4, 8, 8)).astype(np.float32))
    params = net.trainable_params()

    def loss_fn(x, t, y, mask):
        return (net(x, t, y, mask) * R).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, params)

    @ms.jit
    def train_step(x, t, y, mask):
        return grad_fn(x, t, y, mask)

    loss, grads = train_step(x, t, y, mask)
    grads = {p.name: _np(g) for p, g in zip(params, grads)}
    assert np.isfinite(float(loss))
    for name, g in grads.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name  # every trainable parameter is reached
    assert "y_embedder.y_embedding" not in grads

    # central differences (PyNative forward) on a few entries spread over the model
    checks = [("x_embedder.proj.weight", (1, 2, 0, 1, 0)), ("t_embedder.mlp.0.weight", (3, 5)),
              ("y_embedder.y_proj.fc1.weight", (2, 7)), ("blocks.0.attn_temp.qkv.weight", (70, 9)),
              ("blocks.1.scale_shift_table", (5, 11)), ("blocks.1.cross_attn.kv_linear.bias", (80,)),
              ("final_layer.linear.weight", (4, 20))]  # fmt: skip
    byname = {p.name: p for p in params}
    eps = 1e-2
    for name, idx in checks:
        p = byname[name]
        v0 = _np(p).copy()
        vals = []
        for s in (+1, -1):
            v = v0.copy()
            v[idx] += s * eps
            p.set_data(Tensor(v))
            vals.append(float(loss_fn(x, t, y, mask)))
        p.set_data(Tensor(v0))
        fd = (vals[0] - vals[1]) / (2 * eps)
        np.testing.assert_allclose(grads[name][idx], fd, rtol=3e-2, atol=1e-6, err_msg=name)


def test_graph_gradients_when_caption_length_equals_video_tokens():
    """Regression: with the caption as long as the video's tokens (here 8 = 2 frames x 4 patches) the
    cross-attention's q and k heads have one shape, and MindSpore 2.10 once failed to infer the gradient graph
    of heads taken as tuple slices ("For 'Stack' ... got Int64"; CI's test_vae_training). The heads are now
    built by split + concat; the graph gradient must compile and reach every trainable parameter."""
    ms.set_seed(0)
    net = STDiT(input_size=(2, 4, 4), in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2,
                caption_channels=8, model_max_length=8, class_dropout_prob=0.0)
    randomize(net, seed=5)
    net.set_train(True)
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((4, 4, 2, 4, 4)).astype(np.float32))
    t = Tensor(np.array([1, 5, 9, 13]), ms.int32)
    y = Tensor(rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    mask = Tensor(np.ones((4, 8)), ms.int32)
    params = net.trainable_params()

    def loss_fn(x, t, y, mask):
        return (net(x, t, y, mask) ** 2).mean()

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, params))
    loss, grads = grad_fn(x, t, y, mask)
    assert np.isfinite(float(loss))
    for p, g in zip(params, grads):
        assert np.isfinite(_np(g)).all() and np.abs(_np(g)).max() > 0, p.name


def test_class_dropout_in_graph_mode():
    ms.set_seed(0)
    net = STDiT(**TINY, class_dropout_prob=0.5)
    randomize(net, seed=5)
    B = 16
    x, t, y, mask = inputs(batch=B, seed=6)
    null_y = np.broadcast_to(_np(net.get_null_y()), y.shape).copy()

    net.set_train(False)  # eval: never drops
    cond = _np(net(*T_(x, t, y, mask)))
    uncond = _np(net(*T_(x, t, null_y, mask)))
    assert np.abs(cond - uncond).max(axis=(1, 2, 3, 4)).min() > 1e-3

    net.set_train(True)

    @ms.jit
    def train_forward(x, t, y, mask):
        return net(x, t, y, mask)

    dropped = []
    for _ in range(2):
        out = _np(train_forward(*T_(x, t, y, mask)))
        for b in range(B):
            is_cond = np.allclose(out[b], cond[b], atol=1e-5)
            is_null = np.allclose(out[b], uncond[b], atol=1e-5)
            assert is_cond != is_null, b  # the whole caption is kept or replaced by y_embedding
            dropped.append(is_null)
    assert 0 < sum(dropped) < len(dropped)  # both happen (P(fail) ~ 2^-31)
    assert dropped[:B] != dropped[B:]  # fresh randomness per call
    net.set_train(False)


def test_force_drop_ids_choose_the_dropped_captions():
    """Given ids (1 = drop) replace exactly those captions by y_embedding, in train and eval mode and
    whatever class_dropout_prob is (the original CaptionEmbedder's force_drop_ids); the result is the
    same on every call (no in-graph draw)."""
    ms.set_seed(0)
    net = STDiT(**TINY, class_dropout_prob=0.5)
    randomize(net, seed=5)
    B = 6
    x, t, y, mask = inputs(batch=B, seed=6)
    null_y = np.broadcast_to(_np(net.get_null_y()), y.shape).copy()
    ids = np.array([1, 0, 0, 1, 1, 0], np.int32)
    net.set_train(False)
    expected = _np(net(*T_(x, t, np.where(ids[:, None, None, None] == 1, null_y, y), mask)))
    assert np.abs(expected - _np(net(*T_(x, t, y, mask)))).max() > 1e-3  # dropping changes the output

    eval_out = _np(net(*T_(x, t, y, mask), Tensor(ids)))
    np.testing.assert_allclose(eval_out, expected, atol=1e-5)

    net.set_train(True)

    @ms.jit
    def train_forward(x, t, y, mask, ids):
        return net(x, t, y, mask, ids)

    for _ in range(2):
        np.testing.assert_allclose(_np(train_forward(*T_(x, t, y, mask), Tensor(ids))), expected, atol=1e-5)
    none = _np(train_forward(*T_(x, t, y, mask), Tensor(np.zeros(B, np.int32))))
    np.testing.assert_allclose(none, _np(net(*T_(x, t, y, mask), Tensor(np.zeros(B, np.int32)))), atol=1e-5)
    net.set_train(False)
    np.testing.assert_allclose(none, _np(net(*T_(x, t, y, mask))), atol=1e-5)  # all kept = the eval forward


def test_fp16_compute_close_to_fp32():
    x, t, y, mask = T_(*inputs())
    outs = []
    for dtype in (ms.float32, ms.float16):
        ms.set_seed(0)
        net = STDiT(**TINY, dtype=dtype)
        randomize(net, seed=7)
        net.set_train(False)
        outs.append(net(x, t, y, mask))
    assert outs[1].dtype == ms.float32
    a, b = _np(outs[0]), _np(outs[1])
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 2e-2 * np.abs(a).max()
