"""T5 v1.1 encoder (the text encoder of PixArt / Open-Sora: DeepFloyd/t5-v1_1-xxl, encoder only).

Parameter names equal the Hugging Face `T5EncoderModel` state-dict keys, so a checkpoint loads
with no rename table (`encoder.embed_tokens.weight` is accepted as an alias of `shared.weight`):

    shared.weight                                                   [vocab, d_model]
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight          [H*d_kv, d_model]
    encoder.block.{i}.layer.0.SelfAttention.o.weight                [d_model, H*d_kv]
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   [buckets, H]
    encoder.block.{i}.layer.0.layer_norm.weight                     [d_model]
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight     [d_ff, d_model]   (gated)
    encoder.block.{i}.layer.1.DenseReluDense.wi.weight              [d_ff, d_model]   (not gated)
    encoder.block.{i}.layer.1.DenseReluDense.wo.weight              [d_model, d_ff]
    encoder.block.{i}.layer.1.layer_norm.weight                     [d_model]
    encoder.final_layer_norm.weight                                 [d_model]

T5 specifics: no biases, no 1/sqrt(d) attention scaling, a learned relative position bias
(bidirectional buckets) computed in block 0 and shared by all blocks, RMS norm without mean
subtraction, gated-GELU (tanh approximation, "gelu_new") feed-forward.

Precision: the residual stream, every RMS norm (and its weight), the softmax and `wo` (HF's
`_keep_in_fp32_modules`) are float32; the other matmuls run in `dtype`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import nn, ops

FP32_MIN = float(np.finfo(np.float32).min)


@dataclass
class T5Config:
    """The encoder-relevant fields of a Hugging Face T5 `config.json`."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        self.activation  # validates feed_forward_proj

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """HF's `dense_act_fn`: the last part of feed_forward_proj, with the legacy alias
        "gated-gelu" -> "gelu_new" (tanh approximation)."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT'")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: activation {act!r} not supported "
                             f"(supported: {sorted(_ACTIVATIONS)})")
        return act

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if n not in d]
        if missing:
            raise KeyError(f"T5 config lacks {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "T5Config":
        """Reads a Hugging Face T5 config.json (unknown keys are ignored)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """A config.json that transformers' T5EncoderModel can load."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=["T5EncoderModel"], model_type="t5", is_encoder_decoder=True,
                 num_decoder_layers=self.num_layers, dense_act_fn=self.activation, is_gated_act=self.is_gated,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
                 initializer_factor=1.0, tie_word_embeddings=False, use_cache=False)
        return d


def relative_position_bucket_table(num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Bucket of each relative position d = key_pos - query_pos for d in [-max_distance, max_distance].

    Bidirectional T5 buckets: half the buckets for d > 0; exact buckets for |d| < num_buckets/4,
    log-spaced ones up to max_distance, the last bucket beyond. Computed in float32 like
    transformers' `_relative_position_bucket` (identical ids, checked in tests); buckets are
    constant for |d| >= max_distance, so clipping d to +-max_distance is exact.
    """
    d = np.arange(-max_distance, max_distance + 1)
    half = num_buckets // 2
    max_exact = half // 2
    a = np.abs(d)
    large = max_exact + (np.log(np.maximum(a, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets = (d > 0).astype(np.int64) * half + np.where(a < max_exact, a, large)
    return buckets.astype(np.int32)


# ================================================================
# Layers
# ================================================================


def gelu_tanh(x):
    """HF "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). The fused op is used because
    MindSpore's CPU `tanh` is only accurate to ~1e-4 (the fused GeLU to ~5e-7)."""
    return ops.gelu(x, approximate="tanh")


def gelu_erf(x):
    return ops.gelu(x, approximate="none")


_ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu": gelu_erf, "relu": ops.relu, "silu": ops.silu}


class Linear(nn.Cell):
    """Bias-free linear layer, weight [out, in] as in torch; computes in the weight's dtype."""

    def __init__(self, in_features: int, out_features: int, dtype=ms.float32):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.zeros((out_features, in_features), np.float32), dtype), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        shape = x.shape
        x = ops.cast(x, self.weight.dtype).reshape(-1, shape[-1])
        y = self.matmul(x, self.weight)  # [N, in] -> [N, out]
        return y.reshape(shape[:-1] + (self.weight.shape[0],))


class Embedding(nn.Cell):
    """Token embedding with a torch-named `weight` [vocab, d_model]."""

    def __init__(self, vocab_size: int, d_model: int, dtype=ms.float32):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.zeros((vocab_size, d_model), np.float32), dtype), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class T5LayerNorm(nn.Cell):
    """RMS norm: x * rsqrt(mean(x^2) + eps) * weight, in float32 (weight kept float32)."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.ones((d_model,), np.float32)), name="weight")
        self.eps = eps

    def construct(self, x):
        x = ops.cast(x, ms.float32)
        variance = ops.mean(ops.square(x), -1, keep_dims=True)
        return self.weight * (x * ops.rsqrt(variance + self.eps))


class T5Attention(nn.Cell):
    """Multi-head self-attention without scaling; block 0 owns the relative position bias."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, dtype=ms.float32):
        super().__init__()
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, dtype)
        self.k = Linear(config.d_model, inner, dtype)
        self.v = Linear(config.d_model, inner, dtype)
        self.o = Linear(inner, config.d_model, dtype)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads,
                                                     ms.float32)
            self.max_distance = config.relative_attention_max_distance
            self.bucket_table = ms.Tensor(relative_position_bucket_table(config.relative_attention_num_buckets,
                                                                         config.relative_attention_max_distance))

    def compute_bias(self, length: int):
        """Relative position bias [1, H, L, L] (float32)."""
        pos = ops.arange(0, length, dtype=ms.int32)
        rel = ops.expand_dims(pos, 0) - ops.expand_dims(pos, 1)  # [L(query), L(key)]: key - query
        rel = ops.clip_by_value(rel, -self.max_distance, self.max_distance) + self.max_distance
        buckets = ops.gather(self.bucket_table, rel, 0)  # [L, L]
        bias = self.relative_attention_bias(buckets)  # [L, L, H]
        return ops.expand_dims(ops.transpose(bias, (2, 0, 1)), 0)  # [1, H, L, L]

    def construct(self, x, position_bias):
        # x [B, L, C]; position_bias [B or 1, H, L, L] float32 (relative bias + padding mask)
        b, l, _ = x.shape
        h, dk = self.num_heads, self.d_kv
        q = self.q(x).reshape(b, l, h, dk).transpose(0, 2, 1, 3)  # [B, H, L, dk]
        k = self.k(x).reshape(b, l, h, dk).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(b, l, h, dk).transpose(0, 2, 1, 3)
        scores = ops.BatchMatMul(transpose_b=True)(q, k)  # [B, H, L, L], no 1/sqrt(dk)
        scores = ops.cast(scores, ms.float32) + position_bias
        attn = ops.softmax(scores, -1)
        out = ops.BatchMatMul()(ops.cast(attn, v.dtype), v)  # [B, H, L, dk]
        out = out.transpose(0, 2, 1, 3).reshape(b, l, h * dk)  # [B, L, H*dk]
        return ops.cast(self.o(out), ms.float32)


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, dtype=ms.float32):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, dtype)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x, position_bias):
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseActDense(nn.Cell):
    """Feed-forward: wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x)); wo in float32."""

    def __init__(self, config: T5Config, dtype=ms.float32):
        super().__init__()
        self.is_gated = config.is_gated
        if self.is_gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, dtype)
            self.wi_1 = Linear(config.d_model, config.d_ff, dtype)
        else:
            self.wi = Linear(config.d_model, config.d_ff, dtype)
        self.wo = Linear(config.d_ff, config.d_model, ms.float32)
        self.act = _ACTIVATIONS[config.activation]

    def construct(self, x):
        if self.is_gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)  # [B, L, d_ff]
        else:
            h = self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(nn.Cell):
    def __init__(self, config: T5Config, dtype=ms.float32):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config, dtype)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x):
        return x + ops.cast(self.DenseReluDense(self.layer_norm(x)), ms.float32)


class T5Block(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, dtype=ms.float32):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(config, has_relative_attention_bias, dtype),
                                  T5LayerFF(config, dtype)])

    def construct(self, x, position_bias):
        x = self.layer[0](x, position_bias)
        return self.layer[1](x)


class T5Stack(nn.Cell):
    """The encoder stack (HF `encoder.*`); embeddings live in the parent's `shared`."""

    def __init__(self, config: T5Config, dtype=ms.float32):
        super().__init__()
        self.block = nn.CellList([T5Block(config, i == 0, dtype) for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x, attention_mask):
        # x [B, L, C] float32; attention_mask [B, L] (1 = token, 0 = padding)
        length = x.shape[1]
        mask = (1.0 - ops.cast(attention_mask, ms.float32)) * FP32_MIN
        mask = mask.reshape(mask.shape[0], 1, 1, length)  # [B, 1, 1, L]: padding keys masked out
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(length) + mask  # [B, H, L, L]
        for blk in self.block:
            x = blk(x, position_bias)
        return self.final_layer_norm(x)


# ================================================================
# Model
# ================================================================


class T5Encoder(nn.Cell):
    """T5 encoder: (input_ids [B, L] int32, attention_mask [B, L]) -> last_hidden_state [B, L, d_model] float32.

    `dtype` is the storage/compute dtype of the embedding and the q/k/v/o/wi matmuls; RMS norms,
    softmax, `wo` and the residual stream are float32. Weights are initialised like HF's
    `T5PreTrainedModel._init_weights` (factor 1.0) from `seed`, deterministically.
    """

    def __init__(self, config: T5Config, dtype=ms.float32, seed: Optional[int] = 0):
        super().__init__()
        self.config = config
        self.dtype = dtype
        # bf16 Gather has no CPU kernel: a bf16 model keeps its token embedding in float32
        self.shared = Embedding(config.vocab_size, config.d_model, ms.float32 if dtype == ms.bfloat16 else dtype)
        self.encoder = T5Stack(config, dtype)
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """Normal init with HF's per-matrix std; RMS norm weights 1."""
        c = self.config
        rng = np.random.default_rng(seed)
        std = {"shared": 1.0, "q": (c.d_model * c.d_kv) ** -0.5, "k": c.d_model ** -0.5, "v": c.d_model ** -0.5,
               "o": (c.num_heads * c.d_kv) ** -0.5, "relative_attention_bias": c.d_model ** -0.5,
               "wi": c.d_model ** -0.5, "wi_0": c.d_model ** -0.5, "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5}
        for name, p in self.parameters_and_names():
            kind = name.split(".")[-2]
            if kind in ("layer_norm", "final_layer_norm"):
                value = np.ones(p.shape, np.float32)
            else:
                value = (rng.standard_normal(p.shape) * std[kind]).astype(np.float32)
            p.set_data(ms.Tensor(value, p.dtype))

    def construct(self, input_ids, attention_mask):
        x = ops.cast(self.shared(input_ids), ms.float32)  # [B, L] -> [B, L, C]
        return self.encoder(x, attention_mask)
