"""STDiT (Open-Sora 1.0): PixArt-alpha blocks with a temporal self-attention after the spatial one.

Reads like hpcaitech/Open-Sora v1.0.0 `opensora/models/stdit/stdit.py`; parameter names equal the
PyTorch checkpoint keys, so loading a checkpoint is a rename-free copy (patch conv weight keeps its
5-D shape [hidden, C, pt, ph, pw]).
"""

import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Uniform, XavierUniform, Zero, initializer

from .precision import resolve_dtype
from .layers import (
    LayerNorm,
    Linear,
    Mlp,
    attention,
    bcast,
    flash_attention_available,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
    t2i_modulate,
)



# ================================================================
# Embedding layers
# ================================================================


class PatchConv3d(nn.Cell):
    """Conv3d whose kernel equals its stride, computed as patchify + matmul (exactly the conv).

    Parameters: weight [out, in, pt, ph, pw] (torch Conv3d layout), bias [out].
    """

    def __init__(self, in_channels, out_channels, patch_size):
        super().__init__()
        self.patch_size = tuple(patch_size)
        shape = (out_channels, in_channels, *self.patch_size)
        self.weight = Parameter(initializer(XavierUniform(), shape), name="weight")
        self.bias = Parameter(initializer(Zero(), (out_channels,)), name="bias")
        self.matmul_nt = ops.MatMul(transpose_b=True)

    def construct(self, x):
        B, C, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        nt, nh, nw = T // pt, H // ph, W // pw
        x = x.reshape(B, C, nt, pt, nh, ph, nw, pw)
        x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7)  # [B, nt, nh, nw, C, pt, ph, pw]
        x = x.reshape(B * nt * nh * nw, C * pt * ph * pw)
        w = ops.cast(self.weight, x.dtype).reshape(self.weight.shape[0], -1)  # [out, C*pt*ph*pw]
        x = self.matmul_nt(x, w) + ops.cast(self.bias, x.dtype)
        return x.reshape(B, nt * nh * nw, -1)  # [B, nt*nh*nw, out], tokens in (t, h, w) order


class PatchEmbed3D(nn.Cell):
    """Video to patch tokens: [B, C, T, H, W] -> [B, N, hidden]."""

    def __init__(self, patch_size=(1, 2, 2), in_chans=4, embed_dim=1152):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = PatchConv3d(in_chans, embed_dim, self.patch_size)

    def construct(self, x):
        return self.proj(x)


class TimestepEmbedder(nn.Cell):
    """Scalar timesteps -> [cos | sin] sinusoid (256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256, max_period=10000):
        super().__init__()
        self.mlp = nn.SequentialCell(
            Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        half = frequency_embedding_size // 2
        freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
        self.freqs = Tensor(freqs[None], ms.float32)  # [1, half]
        self.pad_odd = frequency_embedding_size % 2 == 1

    def timestep_embedding(self, t):
        """t [B] (may be fractional) -> [B, frequency_embedding_size] laid out [cos | sin]."""
        args = ops.cast(t, ms.float32)[:, None] * self.freqs  # [B, half]
        emb = ops.concat([ops.cos(args), ops.sin(args)], axis=-1)
        if self.pad_odd:
            emb = ops.concat([emb, ops.zeros_like(emb[:, :1])], axis=-1)
        return emb

    def construct(self, t, dtype=ms.float32):
        return self.mlp(ops.cast(self.timestep_embedding(t), dtype))  # [B, hidden]


class CaptionEmbedder(nn.Cell):
    """Text embeddings -> hidden, with classifier-free-guidance caption dropout in training.

    y_embedding [L, caption_channels] is the (frozen) null caption. Which captions are dropped is drawn
    in the graph with probability uncond_prob, or given by the caller as `force_drop_ids` [B] (1 = drop;
    the train task draws them on the host for the global batch, so they do not depend on the number of
    ranks). As in the original, given ids apply in eval mode too.
    """

    def __init__(self, in_channels, hidden_size, uncond_prob, token_num=120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_features=hidden_size, out_features=hidden_size)
        null = initializer(Normal(sigma=in_channels**-0.5), (token_num, in_channels))  # randn / sqrt(C)
        self.y_embedding = Parameter(null, name="y_embedding", requires_grad=False)
        self.uncond_prob = uncond_prob
        self.uniform = ops.UniformReal()

    def token_drop(self, caption, force_drop_ids=None):
        """Replace each sample's whole caption by y_embedding: with probability uncond_prob, or where
        force_drop_ids == 1."""
        B = caption.shape[0]
        if force_drop_ids is None:
            drop = self.uniform((B,)) < self.uncond_prob  # [B] bool
        else:
            drop = force_drop_ids == 1  # [B] bool
        null = ops.cast(self.y_embedding, caption.dtype)  # [L, C]
        return ops.where(bcast(drop.reshape(B, 1, 1, 1), caption), bcast(null, caption), caption)

    def construct(self, caption, train, force_drop_ids=None):
        # caption [B, 1, L, C]
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)  # [B, 1, L, hidden]

    def tokens(self, caption, mask, train, force_drop_ids=None):
        """The embedded caption as [B, L, hidden] tokens and its mask as [B, L] (rows repeated to the
        batch, e.g. one mask for both halves of a guidance batch), or None."""
        y = self.construct(caption, train, force_drop_ids)
        y = y.reshape(y.shape[0], -1, y.shape[-1])  # [B, 1, L, hidden] -> [B, L, hidden]
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)  # [B, L]
            if mask.shape[0] != y.shape[0]:
                mask = ops.tile(mask, (y.shape[0] // mask.shape[0], 1))
        return y, mask


# ================================================================
# Attention
# ================================================================


class Attention(nn.Cell):
    """Multi-head self-attention: qkv Linear(C, 3C) -> softmax(q k^T * d^-0.5) v -> proj."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, enable_flashattn=False):
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, has_bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.use_flash = flash_attention_available(enable_flashattn)

    def _heads(self, x):
        return split_heads(x, self.num_heads)  # [B, N, C] -> [B, H, N, D]

    def construct(self, x):
        q, k, v = (self._heads(h) for h in ops.split(self.qkv(x), x.shape[-1], axis=-1))  # 3 x [B, H, N, D]
        x = attention(q, k, v, self.scale, self.use_flash)  # [B, H, N, D]
        return self.proj(merge_heads(x))  # [B, N, C]


class MultiHeadCrossAttention(nn.Cell):
    """Video tokens (queries) attend to the sample's own valid text tokens (keys/values).

    Equals the original's packed sequence with a block-diagonal mask: sample b's queries see only
    the tokens with mask[b] == 1.
    """

    def __init__(self, d_model, num_heads):
        super().__init__()
        assert d_model % num_heads == 0, "d_model must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scale = self.head_dim**-0.5
        self.q_linear = Linear(d_model, d_model)
        self.kv_linear = Linear(d_model, d_model * 2)
        self.proj = Linear(d_model, d_model)

    def _heads(self, x):
        return split_heads(x, self.num_heads)  # [B, N, C] -> [B, H, N, D]

    def construct(self, x, cond, mask=None):
        # x [B, N, C]; cond [B, L, C]; mask [B, L] (1 = valid) or None
        q = self._heads(self.q_linear(x))  # [B, H, N, D]
        k, v = (self._heads(h) for h in ops.split(self.kv_linear(cond), x.shape[-1], axis=-1))  # [B, H, L, D]
        x = scaled_dot_product_attention(q, k, v, self.scale, mask)  # [B, H, N, D]
        return self.proj(merge_heads(x))  # [B, N, C]


# ================================================================
# Blocks
# ================================================================


def frames_last(x):
    """[B, T, S, C] -> [B, S, T, C] by split + concat over the T frames (the values of a transpose
    without a Transpose kernel, and not Unstack + Stack, whose gradient graph MindSpore 2.10 fails to
    infer for some shapes; see layers' memory note and `stack_heads`)."""
    B, T, S, C = x.shape
    return ops.concat([f.reshape(B, S, 1, C) for f in ops.split(x, 1, axis=1)], axis=2)


def frames_first(x):
    """[B, S, T, C] -> [B, T, S, C], the inverse of `frames_last`."""
    B, S, T, C = x.shape
    return ops.concat([f.reshape(B, 1, S, C) for f in ops.split(x, 1, axis=2)], axis=1)


class STDiTBlock(nn.Cell):
    """Spatial self-attn -> temporal self-attn -> cross-attn -> MLP, with adaLN-single modulation."""

    def __init__(self, hidden_size, num_heads, d_s, d_t, mlp_ratio=4.0, enable_flashattn=False):
        super().__init__()
        self.hidden_size = hidden_size
        self.d_s = d_s  # spatial tokens per frame
        self.d_t = d_t  # frames (temporal tokens)
        self.norm1 = LayerNorm(eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, enable_flashattn=enable_flashattn)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = LayerNorm(eps=1e-6)
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.scale_shift_table = Parameter(
            initializer(Normal(sigma=hidden_size**-0.5), (6, hidden_size)), name="scale_shift_table"
        )
        self.attn_temp = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, enable_flashattn=enable_flashattn)

    def construct(self, x, y, t0, mask=None, tpe=None):
        # x [B, N=T*S, C]; y [B, L, C]; t0 [B, 6*C]; mask [B, L] or None; tpe [1, T, C] or None
        # (T: the frames this process holds: d_t, or its share under sequence parallelism)
        B, N, C = x.shape
        S = self.d_s
        T = N // S
        mod = ops.cast(self.scale_shift_table, x.dtype)[None] + t0.reshape(B, 6, C)  # [B, 6, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, 1, axis=1)  # 6 x [B, 1, C]

        gate_msa, gate_mlp = bcast(gate_msa, x), bcast(gate_mlp, x)  # [B, 1, C] -> [B, N, C]

        # spatial branch: attention within each frame
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        x_s = x_m.reshape(B * T, S, C)  # [B, T*S, C] -> [B*T, S, C]
        x_s = self.attn(x_s)
        x_s = x_s.reshape(B, N, C)  # [B*T, S, C] -> [B, T*S, C]
        x = x + gate_msa * x_s

        # temporal branch: attention over frames at each spatial position (raw residual, no norm)
        x_t = frames_last(x.reshape(B, T, S, C)).reshape(B * S, T, C)  # [B, T*S, C] -> [B*S, T, C]
        if tpe is not None:
            x_t = ops.cast(ops.cast(x_t, ms.float32) + bcast(tpe, x_t), x_t.dtype)  # position embedding in fp32
        x_t = self.attn_temp(x_t)
        x_t = frames_first(x_t.reshape(B, S, T, C)).reshape(B, N, C)  # [B*S, T, C] -> [B, T*S, C]
        x = x + gate_msa * x_t

        # cross attention to the caption
        x = x + self.cross_attn(x, y, mask)

        # mlp
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Cell):
    """PixArt final layer: LayerNorm -> modulate(scale_shift_table + t) -> Linear(C, prod(patch)*out)."""

    def __init__(self, hidden_size, num_patch, out_channels):
        super().__init__()
        self.norm_final = LayerNorm(eps=1e-6)
        self.linear = Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = Parameter(
            initializer(Normal(sigma=hidden_size**-0.5), (2, hidden_size)), name="scale_shift_table"
        )
        self.out_channels = out_channels

    def construct(self, x, t):
        # x [B, N, C]; t [B, C]
        mod = ops.cast(self.scale_shift_table, x.dtype)[None] + t[:, None]  # [B, 2, C]
        shift, scale = ops.split(mod, 1, axis=1)  # 2 x [B, 1, C]
        x = t2i_modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # [B, N, prod(patch) * out_channels]


# ================================================================
# STDiT
# ================================================================


class STDiT(nn.Cell):
    """Spatial-Temporal DiT of Open-Sora 1.0.

    construct(x [B, C, T, H, W], timestep [B], y [B, 1, L, caption_channels], mask [B, L] or None,
    force_drop_ids [B] or None) -> [B, out_channels, T, H, W] float32 (channels [:C] = eps, [C:] =
    variance interpolation).

    dtype: compute dtype ("fp32", "fp16", "bf16") of activations and matmuls; parameters stay fp32
    (master weights) and are cast where used. LayerNorm, attention scores and softmax, the timestep
    embedding (sinusoid and MLPs) and the position-embedding adds always run in fp32; the output is
    fp32. On CPU only fp32 and fp16 kernels exist (opensora.model.precision checks at start-up).
    recompute_blocks: gradient checkpointing (activations of a block are recomputed in the backward
    pass instead of stored): None = off, N = the first N blocks, "all" = every block.
    Caption dropout follows `self.training` (set_train): a function wrapped in ms.jit fixes the mode
    it was compiled in, so compile train and eval steps separately. `force_drop_ids` (1 = replace the
    caption by the null caption) overrides the random draw, in either mode.
    `no_temporal_pos_emb=True` skips the temporal position embedding (the v1.0.0 original stored
    this flag without using it; every released config leaves it False).
    """

    def __init__(
        self,
        input_size=(16, 32, 32),
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        pred_sigma=True,
        no_temporal_pos_emb=False,
        caption_channels=4096,
        model_max_length=120,
        space_scale=1.0,
        time_scale=1.0,
        enable_flashattn=False,
        dtype=ms.float32,
        recompute_blocks=None,
    ):
        super().__init__()
        input_size = tuple(int(s) for s in input_size)
        patch_size = tuple(int(p) for p in patch_size)
        assert all(i % p == 0 for i, p in zip(input_size, patch_size)), "input_size must be divisible by patch_size"
        self.pred_sigma = pred_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_temporal = input_size[0] // patch_size[0]
        self.num_spatial = (input_size[1] // patch_size[1]) * (input_size[2] // patch_size[2])
        self.num_patches = self.num_temporal * self.num_spatial
        self.num_heads = num_heads
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.space_scale = space_scale
        self.time_scale = time_scale
        self.dtype = resolve_dtype(dtype)

        # constant (recomputed, not parameters) position embeddings
        self.pos_embed = self.get_spatial_pos_embed()  # [1, S, C]
        self.pos_embed_temporal = self.get_temporal_pos_embed()  # [1, T, C]

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.SequentialCell(nn.SiLU(), Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(
            in_channels=caption_channels,
            hidden_size=hidden_size,
            uncond_prob=class_dropout_prob,
            token_num=model_max_length,
        )
        self.blocks = nn.CellList(
            [
                STDiTBlock(
                    hidden_size,
                    num_heads,
                    d_s=self.num_spatial,
                    d_t=self.num_temporal,
                    mlp_ratio=mlp_ratio,
                    enable_flashattn=enable_flashattn,
                )
                for _ in range(depth)
            ]
        )
        self.final_layer = T2IFinalLayer(hidden_size, int(np.prod(patch_size)), self.out_channels)

        self.initialize_weights()
        self.initialize_temporal()
        self.recompute_blocks = apply_recompute(self.blocks, recompute_blocks)

    def construct(self, x, timestep, y, mask=None, force_drop_ids=None):
        # T: frames after patching in this call: num_temporal, or this rank's share of them under sequence
        # parallelism (opensora/parallel/sequence.py), which also gives pos_embed_temporal those frames' rows
        B, T = x.shape[0], x.shape[2] // self.patch_size[0]
        x = ops.cast(x, self.dtype)
        y = ops.cast(y, self.dtype)

        # embedding
        x = self.x_embedder(x)  # [B, C_in, T, H, W] -> [B, T*S, C]
        x = x.reshape(B, T, self.num_spatial, self.hidden_size)  # [B, T, S, C]
        x = ops.cast(x, ms.float32)
        x = ops.cast(x + bcast(self.pos_embed, x), self.dtype)  # position embedding added in fp32
        x = x.reshape(B, T * self.num_spatial, self.hidden_size)  # [B, T*S, C]

        t = self.t_embedder(timestep)  # [B, C], fp32
        t0 = ops.cast(self.t_block(t), self.dtype)  # [B, 6*C]
        t = ops.cast(t, self.dtype)
        y, mask = self.y_embedder.tokens(y, mask, self.training, force_drop_ids)  # [B, L, C], [B, L] or None

        # blocks
        for i, block in enumerate(self.blocks):
            if i == 0 and not self.no_temporal_pos_emb:
                x = block(x, y, t0, mask, self.pos_embed_temporal)
            else:
                x = block(x, y, t0, mask, None)

        # final process
        x = self.final_layer(x, t)  # [B, N, pt*ph*pw*C_out]
        x = self.unpatchify(x)  # [B, C_out, T, H, W]
        return ops.cast(x, ms.float32)

    def unpatchify(self, x):
        """[B, (Nt Nh Nw), (pt ph pw C_out)] -> [B, C_out, Nt*pt, Nh*ph, Nw*pw]."""
        B = x.shape[0]
        nh, nw = [self.input_size[i] // self.patch_size[i] for i in (1, 2)]
        nt = x.shape[1] // (nh * nw)
        pt, ph, pw = self.patch_size
        c = self.out_channels
        x = x.reshape(B, nt, nh, nw, pt, ph, pw, c)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, nt, pt, nh, ph, nw, pw]
        return x.reshape(B, c, nt * pt, nh * ph, nw * pw)

    def get_spatial_pos_embed(self):
        grid = (self.input_size[1] // self.patch_size[1], self.input_size[2] // self.patch_size[2])
        pe = get_2d_sincos_pos_embed(self.hidden_size, grid, scale=self.space_scale)
        return Tensor(pe[None], ms.float32)  # [1, S, C]

    def get_temporal_pos_embed(self):
        pe = get_1d_sincos_pos_embed(self.hidden_size, self.num_temporal, scale=self.time_scale)
        return Tensor(pe[None], ms.float32)  # [1, T, C]

    def get_null_y(self):
        """The null caption y_embedding as [1, 1, L, caption_channels] (for classifier-free guidance)."""
        return Tensor(self.y_embedder.y_embedding.asnumpy()[None, None])

    def initialize_temporal(self):
        for block in self.blocks:
            _fill(block.attn_temp.proj.weight, Zero())
            _fill(block.attn_temp.proj.bias, Zero())

    def initialize_weights(self):
        # every Linear: xavier-uniform weight, zero bias
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Dense):
                _fill(cell.weight, XavierUniform())
                if cell.has_bias:
                    _fill(cell.bias, Zero())

        # patch conv like a Linear over the flattened [out, in*pt*ph*pw] weight; bias keeps the
        # torch Conv3d default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        w = self.x_embedder.proj.weight
        fan_out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
        _fill(w, Uniform(scale=math.sqrt(6.0 / (fan_in + fan_out))))
        _fill(self.x_embedder.proj.bias, Uniform(scale=1.0 / math.sqrt(fan_in)))

        # timestep and caption embedding MLPs
        for dense in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            _fill(dense.weight, Normal(sigma=0.02))
        _fill(self.y_embedder.y_proj.fc1.weight, Normal(sigma=0.02))
        _fill(self.y_embedder.y_proj.fc2.weight, Normal(sigma=0.02))

        # zero-out cross-attention output projections and the output layer
        for block in self.blocks:
            _fill(block.cross_attn.proj.weight, Zero())
            _fill(block.cross_attn.proj.bias, Zero())
        _fill(self.final_layer.linear.weight, Zero())
        _fill(self.final_layer.linear.bias, Zero())


def apply_recompute(blocks: nn.CellList, recompute_blocks) -> int:
    """Turn on recomputation (Cell.recompute) for the first N blocks or "all"; returns N."""
    depth = len(blocks)
    if recompute_blocks is None or recompute_blocks is False:
        return 0
    if recompute_blocks == "all" or recompute_blocks is True:
        n = depth
    elif isinstance(recompute_blocks, int) and 0 <= recompute_blocks <= depth:
        n = recompute_blocks
    else:
        raise ValueError(f"model.recompute_blocks={recompute_blocks!r}: use null (off), an integer 0..{depth} "
                         f"(the first N of model.depth={depth} blocks) or all")
    for block in list(blocks)[:n]:
        block.recompute()
    return n


def _fill(param, init):
    param.set_data(initializer(init, param.shape, param.dtype))


def stdit_xl2(**kwargs) -> STDiT:
    """STDiT-XL/2: depth 28, hidden 1152, 16 heads, patch (1, 2, 2)."""
    return STDiT(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16, **kwargs)


# Frozen parameters that are parameters in the original too, so counted (STDiT2's fixed RoPE frequencies).
COUNTED_FROZEN = ("rope.freqs",)


def count_parameters(cell) -> int:
    """Number of parameters as the original counts them (torch `model.parameters()`): the trainable ones
    and the frozen COUNTED_FROZEN; the frozen null caption y_embedding, a buffer there, is not counted."""
    return int(sum(p.size for p in cell.get_parameters() if p.requires_grad or p.name.endswith(COUNTED_FROZEN)))
