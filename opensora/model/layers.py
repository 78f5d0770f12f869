"""Shared building blocks of the DiT family (DiT / PixArt / Open-Sora): MLP, LayerNorm without
affine, RMSNorm, adaLN modulation, scaled dot-product attention and sin-cos position embeddings.

Memory note (MindSpore 2.10, CPU graph mode). Some CPU kernels keep a private buffer of 2 to 5
times their output for as long as the compiled graph lives, so a graph made of them holds memory in
proportion to all its intermediates instead of its working set. Measured per kernel on a 256 MB
float32 output (growth of the process after the graph ran once): Add/Sub/Mul/MaskedFill whose
operands differ in shape (implicit broadcasting) 1.0-1.15 GB, Div 1.15-1.3 GB even on equal shapes,
Transpose 0.5 GB, softmax's backward 1.0 GB; the same ops on equal shapes, BroadcastTo, BiasAdd,
LayerNorm, Split/Concat/Stack/Unstack, MatMul/BatchMatMul and unary ops keep nothing. So the layers
here broadcast explicitly (`bcast`), add biases with BiasAdd, normalise with the fused LayerNorm
(eval) or sums (training), and move attention heads with split/concat (`split_heads` /
`merge_heads`) instead of transposes: the same values, without those buffers.
"""

import logging
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

logger = logging.getLogger(__name__)

_FLASH_FALLBACK_LOGGED = False


def flash_attention_available(requested: bool) -> bool:
    """True when the fused kernel was requested and can run (Ascend only); logs the fallback once."""
    global _FLASH_FALLBACK_LOGGED
    if not requested:
        return False
    target = ms.get_context("device_target")
    if target == "Ascend":
        return True
    if not _FLASH_FALLBACK_LOGGED:
        logger.warning(
            "enable_flashattn=True but device target is %s: flash_attention_score is Ascend-only, "
            "using the (numerically equivalent) math attention instead.",
            target,
        )
        _FLASH_FALLBACK_LOGGED = True
    return False


# ================================================================
# Layers
# ================================================================


def bcast(y, x):
    """`y` broadcast to `x`'s shape by an explicit BroadcastTo, for an elementwise op with `x` (see the
    module note: implicitly broadcasting CPU kernels keep 4x their output alive)."""
    return ops.broadcast_to(y, x.shape)


def t2i_modulate(x, shift, scale):
    """PixArt adaLN-single modulation: x * (1 + scale) + shift (shift/scale broadcast to x explicitly)."""
    return x * bcast(1 + scale, x) + bcast(shift, x)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis without affine parameters, computed in float32 and returned
    in the input dtype (like torch.nn.LayerNorm(elementwise_affine=False)).

    Without gradients (eval mode) MindSpore's fused kernel (unit gain, zero bias); in training the
    same function as sums, explicit broadcasts and rsqrt, whose autodiff backward took about half the
    time of the CPU LayerNormGrad kernel (measured on [1024, 384] and [8192, 1152]). The two agree to
    float32 rounding."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        dtype = x.dtype
        x = ops.cast(x, ms.float32)
        C = x.shape[-1]
        if self.training:
            xc = x - bcast(x.sum(axis=-1, keepdims=True) * (1.0 / C), x)
            var = ops.square(xc).sum(axis=-1, keepdims=True) * (1.0 / C)
            x = xc * bcast(ops.rsqrt(var + self.eps), xc)
        else:
            x = self.layer_norm(x, ops.ones((C,), ms.float32), ops.zeros((C,), ms.float32))[0]
        return ops.cast(x, dtype)


class RMSNorm(nn.Cell):
    """RMS norm over the last axis (the original's LlamaRMSNorm, used as qk-norm): normalised in float32,
    cast back to the input dtype, times `weight` [dim] (ones at init)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones((dim,), np.float32)), name="weight")

    def construct(self, x):
        dtype = x.dtype
        x = ops.cast(x, ms.float32)
        x = x * ops.rsqrt(ops.square(x).mean(axis=-1, keep_dims=True) + self.eps)
        return ops.cast(self.weight, dtype) * ops.cast(x, dtype)


class Linear(nn.Dense):
    """nn.Dense (weight [out, in], bias [out]) computed in the input's dtype (fp32 master weights are
    cast), as a 2-D matmul + BiasAdd (no broadcasting kernel: see the module note)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_nt = ops.MatMul(transpose_b=True)
        self.bias_add_2d = ops.BiasAdd()

    def construct(self, x):
        shape = x.shape
        x = self.matmul_nt(x.reshape(-1, shape[-1]), ops.cast(self.weight, x.dtype))  # compute in x's dtype
        if self.has_bias:
            x = self.bias_add_2d(x, ops.cast(self.bias, x.dtype))  # [M, out] + [out]
        return x.reshape(shape[:-1] + (self.out_channels,))


class GELUTanh(nn.Cell):
    """GELU, tanh approximation: 0.5 x (1 + tanh(z)) written as x * sigmoid(2 z) (the same function),
    z = sqrt(2/pi) (x + 0.044715 x^3). Several times faster than nn.GELU on CPU."""

    def construct(self, x):
        c = 2.0 * math.sqrt(2.0 / math.pi)
        return x * ops.sigmoid(x * (c + (c * 0.044715) * ops.square(x)))


class Mlp(nn.Cell):
    """timm-style MLP: fc1 -> GELU(tanh) -> fc2 (parameter names fc1.*, fc2.*)."""

    def __init__(self, in_features, hidden_features=None, out_features=None):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = GELUTanh()
        self.fc2 = Linear(hidden_features, out_features)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


_BMM = ops.BatchMatMul()
_BMM_NT = ops.BatchMatMul(transpose_b=True)


def stack_heads(heads):
    """H tensors [B, N, D] -> [B, H, N, D]: concat of [B, 1, N, D] views (the values of a stack). Not
    ops.stack: in MindSpore 2.10 the gradient graph of Stack/Unstack fails to infer for some shapes
    ("For 'Stack', the element of 'input_x[0]' must be Tensor, but got Int64"); Split/Concat/Reshape
    differentiate into each other and keep no buffers (module note)."""
    B, N, D = heads[0].shape
    return ops.concat([h.reshape(B, 1, N, D) for h in heads], axis=1)


def split_heads(x, num_heads: int):
    """[B, N, H*D] -> [B, H, N, D] (split + concat: the values a reshape + transpose gives, without a
    Transpose kernel; see the module note)."""
    return stack_heads(ops.split(x, x.shape[-1] // num_heads, axis=-1))


def merge_heads(x):
    """[B, H, N, D] -> [B, N, H*D], the inverse of `split_heads` (split + concat)."""
    B, H, N, D = x.shape
    return ops.concat([h.reshape(B, N, D) for h in ops.split(x, 1, axis=1)], axis=-1)


def scaled_dot_product_attention(q, k, v, scale, mask=None, bias=None):
    """Math attention; scores q k^T and softmax in float32, probabilities @ v in q's dtype.

    q [B, H, N, D], k/v [B, H, L, D], mask [B, L] (1 = key may be attended) or None, bias: float32 added
    to the scores before the softmax (broadcast to [B, H, N, L], e.g. a causal mask [1, 1, N, L]) or None.
    A query row whose keys are all masked gets a zero output.
    Returns [B, H, N, D] in q's dtype.
    """
    dtype = q.dtype
    q = ops.cast(q, ms.float32) * scale
    attn = _BMM_NT(q, ops.cast(k, ms.float32))  # [B, H, N, L]
    if bias is not None:
        attn = attn + bcast(bias, attn)
    if mask is not None:
        keep = bcast(ops.cast(mask, ms.bool_)[:, None, None, :], attn)  # [B, 1, 1, L] -> [B, H, N, L]
        attn = ops.masked_fill(attn, ops.logical_not(keep), -65504.0)  # finite even in fp16: no NaN
        attn = ops.softmax(attn, axis=-1) * ops.cast(keep, attn.dtype)
    else:
        attn = ops.softmax(attn, axis=-1)
    attn = ops.cast(attn, dtype)
    return _BMM(attn, v)


def attention(q, k, v, scale, use_flash=False):
    """Self-attention core on [B, H, N, D] q and [B, H, L, D] k/v -> [B, H, N, D] in q's dtype: the fused
    flash_attention_score kernel (Ascend; fp32 inputs run it in fp16) or `scaled_dot_product_attention`."""
    if use_flash:
        dtype = q.dtype
        if dtype == ms.float32:  # the fused kernel takes fp16/bf16
            q, k, v = ops.cast(q, ms.float16), ops.cast(k, ms.float16), ops.cast(v, ms.float16)
        x = ops.flash_attention_score(q, k, v, q.shape[1], scalar_value=scale, input_layout="BNSD")
        return ops.cast(x, dtype)
    return scaled_dot_product_attention(q, k, v, scale)


# ================================================================
# Sine/cosine position embeddings (numpy, computed once; MAE / PixArt convention)
# ================================================================


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: positions of any shape (M after flattening) -> [M, embed_dim] laid out [sin | cos],
    omega_k = 10000^(-k / (embed_dim/2))."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    pos = np.asarray(pos).reshape(-1)  # [M]
    out = np.outer(pos, omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def get_1d_sincos_pos_embed(embed_dim, length, scale=1.0):
    """[length, embed_dim] over positions arange(length) / scale."""
    pos = np.arange(0, length)[..., None] / scale
    return get_1d_sincos_pos_embed_from_grid(embed_dim, pos)


def get_2d_sincos_pos_embed(embed_dim, grid_size, scale=1.0, base_size=None):
    """[H*W, embed_dim] for a grid (H, W) in row-major (h, w) token order.

    Positions are arange(n) / scale (times base_size / n when base_size is given). The first half of
    the channels encodes the column w, the second half the row h; each half is [sin | cos].
    """
    if not isinstance(grid_size, (tuple, list)):
        grid_size = (grid_size, grid_size)
    grid_h = np.arange(grid_size[0], dtype=np.float32) / scale
    grid_w = np.arange(grid_size[1], dtype=np.float32) / scale
    if base_size is not None:
        grid_h *= base_size / grid_size[0]
        grid_w *= base_size / grid_size[1]
    ww, hh = np.meshgrid(grid_w, grid_h)  # each [H, W]
    assert embed_dim % 2 == 0
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, ww)  # [H*W, D/2]
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, hh)  # [H*W, D/2]
    return np.concatenate([emb_w, emb_h], axis=1)  # [H*W, D]
