"""Shared building blocks of the DiT family (DiT / PixArt / Open-Sora): MLP, LayerNorm without
affine, RMSNorm, adaLN modulation, scaled dot-product attention and sin-cos position embeddings.

Memory note (MindSpore 2.10, CPU graph mode). Some CPU kernels keep a private buffer of 2 to 5
times their output for as long as the compiled graph lives, so a graph made of them holds memory in
proportion to all its intermediates instead of its working set. Measured per kernel on a 256 MB
float32 output (growth of the process after the graph ran once): Add/Sub/Mul/MaskedFill whose
operands differ in shape (implicit broadcasting) 1.0-1.15 GB, Div 1.15-1.3 GB even on equal shapes,
Transpose 0.5 GB, softmax's backward 1.0 GB; the same ops on equal shapes, BroadcastTo, BiasAdd,
LayerNorm, Split/Concat/Stack/Unstack, MatMul/BatchMatMul and unary ops keep nothing. So the layers
here broadcast explicitly (`bcast`), add biases with BiasAdd, normalise with sums (or the fused
LayerNorm kernel in eval off CPU), and move attention heads with split/concat (`split_heads` /
`merge_heads`) instead of transposes: the same values, without those buffers.

Speed note (same CPU kernels, issue #13). Broadcasts and sums are slow kernels there, and so are the
ones autodiff puts in their place in the backward (the gradient of a broadcast is a sum, that of a sum
a broadcast), while a matmul with a ones vector gives the same values fast. Per kernel on this
project's 2-core benchmark machine (milliseconds, x of [2, 512, 384] or [1024, C]):

    BroadcastTo [1024, 1] -> [1024, 384]     1.42   matmul [1024, 1] x ones [1, 384]         0.14
    ReduceSum of [2, 512, 384] over axis 1   2.03   batched matmul ones [2, 1, 512] x x      0.17
    ReduceSum of [2, 512, 384] over axis 2   1.29   matmul [1024, 384] x ones [384, 1]       0.34
    BiasAddGrad of [1024, 1536]              4.79   matmul ones [1, 1024] x [1024, 1536]     0.80

So on CPU `bcast` and `sum_last` are matmuls with ones (exact: each output is 1 * y, or a float32-
accumulated sum), training-mode Linear adds its bias as such a broadcast (its gradient is then a
matmul instead of BiasAddGrad), and elsewhere (Ascend, where those kernels are fast) they are plain
BroadcastTo / ReduceSum / BiasAdd.
"""

import logging
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops import functional as F

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


@ops.constexpr
def _matmul_reductions() -> bool:
    """True where broadcasts and sums run as matmuls with ones (CPU; see the speed note)."""
    return ms.get_context("device_target") == "CPU"


def shape_known(x):
    """True when x's shape is known while tracing (False in a graph traced with dynamic shapes)."""
    return not F.is_sequence_value_unknown(ops.shape(x))


_MM = ops.MatMul()  # broadcasts and sums (not the model's matmuls, which benchmark FLOP counts intercept)
_BMM_BCAST = ops.BatchMatMul()


@ops.constexpr
def _bcast_plan(y_shape, x_shape, float_dtype):
    """How `bcast` broadcasts y_shape to x_shape (evaluated once while tracing): (lead, n, tail) for a matmul
    with ones, [lead, 1, tail] -> [lead, n, tail], or None for BroadcastTo."""
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    ys = (1,) * (len(x_shape) - len(y_shape)) + y_shape
    axes = [d for d in range(len(x_shape)) if ys[d] != x_shape[d]]
    if not axes or not float_dtype:
        return None
    first, end = axes[0], axes[-1] + 1
    if any(ys[d] != 1 for d in range(first, end)):  # not one run of broadcast axes
        return None
    return math.prod(x_shape[:first]), math.prod(x_shape[first:end]), math.prod(x_shape[end:])


def bcast(y, x):
    """`y` broadcast to `x`'s shape, for an elementwise op with `x` (no implicitly broadcasting kernel: see
    the memory note). On CPU, when y's broadcast axes are one run of axes, y is a float tensor and the
    shapes are static, as a matmul of y with a ones vector (see the speed note), else by BroadcastTo."""
    if not (_matmul_reductions() and shape_known(x) and shape_known(y)):  # (traced with dynamic shapes: sizes unknown)
        return ops.broadcast_to(y, x.shape)
    plan = _bcast_plan(y.shape, x.shape, y.dtype in (ms.float32, ms.float16, ms.bfloat16))
    if plan is None:
        return ops.broadcast_to(y, x.shape)
    lead, n, tail = plan
    if tail == 1:  # [lead, 1] -> [lead, n]
        out = _MM(y.reshape(lead, 1), ops.ones((1, n), y.dtype))
    elif lead == 1:  # [1, tail] -> [n, tail]
        out = _MM(ops.ones((n, 1), y.dtype), y.reshape(1, tail))
    else:  # [lead, 1, tail] -> [lead, n, tail]
        out = _BMM_BCAST(ops.ones((lead, n, 1), y.dtype), y.reshape(lead, 1, tail))
    return out.reshape(x.shape)


def sum_last(x):
    """x [..., C] -> [..., 1], the sum over the last axis (on CPU a matmul with a ones column: see the
    speed note)."""
    if not (_matmul_reductions() and shape_known(x)):
        return x.sum(axis=-1, keepdims=True)
    C = x.shape[-1]
    return _MM(x.reshape(-1, C), ops.ones((C, 1), x.dtype)).reshape(x.shape[:-1] + (1,))


def t2i_modulate(x, shift, scale):
    """PixArt adaLN-single modulation: x * (1 + scale) + shift (shift/scale broadcast to x explicitly)."""
    return x * bcast(1 + scale, x) + bcast(shift, x)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis without affine parameters, computed in float32 and returned
    in the input dtype (like torch.nn.LayerNorm(elementwise_affine=False)).

    On CPU, and in training everywhere, as sums, explicit broadcasts and rsqrt (`sum_last`, `bcast`:
    matmuls on CPU). On CPU that is faster than MindSpore's fused LayerNorm kernel both ways: 2.6 ms
    against 4.8 ms on [2048, 384] without gradients, and autodiff's backward of the sums took about
    half the time of the LayerNormGrad kernel even before they were matmuls. Without gradients on other
    devices: the fused kernel (unit gain, zero bias). The two agree to float32 rounding."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        dtype = x.dtype
        x = ops.cast(x, ms.float32)
        C = x.shape[-1]
        if self.training or _matmul_reductions():
            xc = x - bcast(sum_last(x) * (1.0 / C), x)
            var = sum_last(xc * xc) * (1.0 / C)
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
        x = x * bcast(ops.rsqrt(sum_last(x * x) * (1.0 / x.shape[-1]) + self.eps), x)
        x = ops.cast(x, dtype)
        return bcast(ops.cast(self.weight, dtype), x) * x


class Linear(nn.Dense):
    """nn.Dense (weight [out, in], bias [out]) computed in the input's dtype (fp32 master weights are
    cast), as a 2-D matmul + BiasAdd (no broadcasting kernel: see the memory note); in training on CPU
    the bias is added as a `bcast` instead (see the speed note)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_nt = ops.MatMul(transpose_b=True)
        self.bias_add_2d = ops.BiasAdd()

    def construct(self, x):
        shape = x.shape
        x = self.matmul_nt(x.reshape(-1, shape[-1]), ops.cast(self.weight, x.dtype))  # compute in x's dtype
        if self.has_bias:
            bias = ops.cast(self.bias, x.dtype)
            if self.training and _matmul_reductions():  # gradient by a matmul, not BiasAddGrad (speed note)
                x = x + bcast(bias.reshape(1, -1), x)  # [M, out] + [1, out] -> [M, out]
            else:
                x = self.bias_add_2d(x, bias)  # [M, out] + [out]
        return x.reshape(shape[:-1] + (self.out_channels,))


class GELUTanh(nn.Cell):
    """GELU, tanh approximation: 0.5 x (1 + tanh(z)) written as x * sigmoid(2 z) (the same function),
    z = sqrt(2/pi) (x + 0.044715 x^3). Several times faster than nn.GELU on CPU."""

    def construct(self, x):
        c = 2.0 * math.sqrt(2.0 / math.pi)
        return x * ops.sigmoid(x * (c + (c * 0.044715) * (x * x)))  # x * x: faster than Square on CPU


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
