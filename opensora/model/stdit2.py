"""STDiT2 (Open-Sora 1.1): STDiT with qk-norm, a normalised and modulated temporal branch with RoPE,
size / aspect-ratio / duration / fps conditioning and inputs of any size.

Reads like hpcaitech/Open-Sora v1.1.0 `opensora/models/stdit/stdit2.py`; parameter names equal its
state-dict keys (those of the released hpcai-tech/OpenSora-STDiT-v2-stage2/-stage3 safetensors), so
loading is a copy by name. What differs from STDiT (opensora/model/stdit.py):

- self-attention (spatial and temporal) normalises q and k over the head dim with RMSNorm
  (`q_norm.weight`, `k_norm.weight`, eps 1e-6, in fp32) when `qk_norm`;
- the temporal branch has its own LayerNorm and adaLN: `scale_shift_table_temporal` [3, C] +
  `t_block_temp(t + fl(num_frames) + fps(fps))` give its shift, scale and gate;
- temporal attention rotates q and k with RoPE (head dim, theta 1e4, interleaved pairs (x_2i, x_2i+1),
  positions 0..T-1 of the frames after patching) instead of a temporal position embedding;
- the spatial adaLN and the MLP see t + [csize(height), csize(width), ar(ar)] through `t_block`;
- the 2-D position embedding is computed for each input: positions arange(n) / scale * base / n with
  scale = sqrt(height[0] * width[0]) / input_sq_size (sample 0's pixel size) and base = round(sqrt(Hp * Wp));
- inputs are zero-padded to a multiple of the patch size and the output is cropped back;
- `x_mask` [B, T] (False = a conditioning frame): those frames take every modulation (spatial,
  temporal, MLP, final layer) from the timestep-0 embedding.

**RoPE before qk-norm (`qk_norm_legacy=True`, the default).** The v1.1.0 `Attention` rotates q and k
and then normalises them (its comment: "WARNING: this may be a bug"); the released weights were trained
so. The two orders differ only through the RMSNorm weight (a rotation keeps the RMS), i.e. not at
initialisation but after training. `qk_norm_legacy=False` normalises first, as Open-Sora 1.2 does by
default.

Other quirks of v1.1.0 mirrored as they are:
- the final layer modulates generated frames with the raw timestep embedding t, but x_mask'ed frames
  with t0 + [csize, ar] (the spatial t0, size conditioning included), and for those it normalises and
  modulates the already t-modulated features a second time (LayerNorm -> mod(t) -> LayerNorm -> mod(t0));
- every size condition of a batch is embedded per sample, but the position-embedding scale uses sample
  0's height and width for the whole batch;
- the model takes `ar` and `fps` as given: the v1.1.0 training data gave ar = width / height and fps =
  the video's own fps, its inference passes ar = height / width and the configured fps (SPEC-1.1 §1.5);
  what to pass is the caller's choice.
Deliberate differences: the timestep, size and position embeddings and RoPE run in fp32 whatever the
compute dtype (the original casts them, the timesteps and the size values to bf16 under bf16); no
drop_path (0 in every released config).
"""

from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from . import stdit
from .layers import LayerNorm, Linear, Mlp, RMSNorm, attention, bcast, merge_heads, shape_known, t2i_modulate
from .precision import resolve_dtype
from .stdit import (
    STDiT,
    CaptionEmbedder,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    TimestepEmbedder,
    _fill,
    apply_recompute,
    frames_first,
    frames_last,
)


# ================================================================
# Embedding layers
# ================================================================


class SizeEmbedder(TimestepEmbedder):
    """Scalar conditions -> a [cos | sin] sinusoid (256) per value -> Linear -> SiLU -> Linear, the
    embeddings of a sample's values concatenated: [B', d] -> [B, d * hidden] (rows repeated from B' to B,
    as for a classifier-free-guidance batch). Always fp32."""

    def construct(self, s, batch):
        if s.ndim == 1:
            s = s[:, None]  # [B'] -> [B', 1]
        if s.shape[0] != batch:
            if batch % s.shape[0]:
                raise ValueError(f"a size condition has {s.shape[0]} rows for a batch of {batch}")
            s = ops.tile(s, (batch // s.shape[0], 1))
        b, d = s.shape
        emb = self.mlp(self.timestep_embedding(s.reshape(-1)))  # [B*d, hidden]
        return emb.reshape(b, -1)  # [B, d * hidden]: value 0's embedding, then value 1's, ...


class PositionEmbedding2D(nn.Cell):
    """2-D sin-cos position embedding of an h x w token grid, computed per call (sizes vary):
    [h*w, dim] in row-major token order; channels [:dim/2] encode the column, [dim/2:] the row, each
    [sin | cos] over the frequencies 10000^(-k / (dim/4)), k < dim/4. Positions are
    arange(n) / scale * base_size / n. fp32."""

    def __init__(self, dim):
        super().__init__()
        assert dim % 4 == 0, "dim must be divisible by 4"
        self.dim = dim
        half = dim // 2
        inv_freq = 1.0 / 10000 ** (np.arange(0, half, 2, dtype=np.float64) / half)
        self.inv_freq = Tensor(inv_freq[None].astype(np.float32))  # [1, dim/4]

    def _sin_cos(self, pos):
        out = pos[:, None] * self.inv_freq  # [n, dim/4]
        return ops.concat([ops.sin(out), ops.cos(out)], axis=-1)  # [n, dim/2]

    def construct(self, h, w, scale, base_size):
        # h, w, base_size: ints; scale: fp32 scalar tensor
        grid_h = ops.arange(h, dtype=ms.float32) / scale * (base_size / h)
        grid_w = ops.arange(w, dtype=ms.float32) / scale * (base_size / w)
        half = self.dim // 2
        emb_w = ops.broadcast_to(self._sin_cos(grid_w)[None], (h, w, half))  # column of each token
        emb_h = ops.broadcast_to(self._sin_cos(grid_h)[:, None], (h, w, half))  # row of each token
        return ops.concat([emb_w, emb_h], axis=-1).reshape(h * w, self.dim)  # [S, dim]


class RotaryEmbedding(nn.Cell):
    """RoPE tables for the temporal attention. `freqs` [dim/2] = theta^(-2i/dim) is a frozen parameter
    (a non-learned parameter in the original too, saved in its checkpoints as `rope.freqs`).

    construct(T) -> (cos, sin), each [T, dim] fp32 with every frequency repeated for its pair of
    channels (2i, 2i+1), positions 0..T-1."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        assert dim % 2 == 0, "the RoPE dim (head dim) must be even"
        freqs = 1.0 / (theta ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / np.float32(dim)))
        self.freqs = Parameter(Tensor(freqs.astype(np.float32)), name="freqs", requires_grad=False)

    def construct(self, length):
        pos = ops.arange(length, dtype=ms.float32)
        angles = pos[:, None] * ops.cast(self.freqs, ms.float32)[None]  # [T, dim/2]
        angles = ops.stack([angles, angles], axis=-1).reshape(length, -1)  # [T, dim]: f0 f0 f1 f1 ...
        return ops.cos(angles), ops.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x_2i, x_2i+1) of x [..., T, D] by position * freq_i, in fp32:
    x * cos + rotate_half(x) * sin with rotate_half(x)_(2i, 2i+1) = (-x_2i+1, x_2i)."""
    dtype = x.dtype
    x = ops.cast(x, ms.float32)
    shape = x.shape
    pairs = x.reshape(shape[:-1] + (shape[-1] // 2, 2))
    rotated = ops.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(shape)
    return ops.cast(x * bcast(cos, x) + rotated * bcast(sin, x), dtype)


# ================================================================
# Attention
# ================================================================


class Attention(stdit.Attention):
    """STDiT's self-attention plus optional RMSNorm of q and k over the head dim (`q_norm`, `k_norm`)
    and optional RoPE tables (temporal attention). qk_norm_legacy=True: RoPE, then the norm (v1.1.0,
    the released weights); False: the norm, then RoPE."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, qk_norm_legacy=True, enable_flashattn=False):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, enable_flashattn=enable_flashattn)
        self.qk_norm = qk_norm
        self.qk_norm_legacy = qk_norm_legacy
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = RMSNorm(self.head_dim, eps=1e-6)

    def _norm(self, q, k):
        if self.qk_norm:
            return self.q_norm(q), self.k_norm(k)
        return q, k

    def construct(self, x, rope_cos=None, rope_sin=None):
        B, N, C = x.shape
        q, k, v = ops.split(self.qkv(x), C, axis=-1)  # 3 x [B, N, C]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, H, N, D]
        if not self.qk_norm_legacy:
            q, k = self._norm(q, k)
        if rope_cos is not None:
            q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        if self.qk_norm_legacy:
            q, k = self._norm(q, k)
        x = attention(q, k, v, self.scale, self.use_flash)  # [B, H, N, D]
        return self.proj(merge_heads(x))  # [B, N, C]


# ================================================================
# Blocks
# ================================================================


def frame_modulation(mod, mod0=None, x_mask=None):
    """adaLN parameters per frame: mod [B, k, C] -> [B, 1, k, C]; with x_mask [B, T] (bool) the frames
    where it is False take mod0 instead -> [B, T, k, C]. (Selecting the parameters per frame equals the
    original's modulating twice and selecting the results per frame, value for value.)"""
    if x_mask is None:
        return mod[:, None]
    return ops.where(x_mask[:, :, None, None], mod[:, None], mod0[:, None])


def _frames_last(x):
    """[B, T, S, C] -> [B, S, T, C]: STDiT's split + concat (no Transpose kernel; layers' memory note) when the
    shape is static, a transpose when traced with dynamic shapes (T unknown: no split into T pieces)."""
    return frames_last(x) if shape_known(x) else x.transpose(0, 2, 1, 3)


def _frames_first(x):
    """[B, S, T, C] -> [B, T, S, C], the inverse of `_frames_last`."""
    return frames_first(x) if shape_known(x) else x.transpose(0, 2, 1, 3)


class STDiT2Block(nn.Cell):
    """Spatial self-attn -> temporal self-attn (own norm, adaLN, RoPE) -> cross-attn -> MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, qk_norm_legacy=True,
                 enable_flashattn=False):
        super().__init__()
        self.hidden_size = hidden_size
        # spatial branch
        self.norm1 = LayerNorm(eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              qk_norm_legacy=qk_norm_legacy, enable_flashattn=enable_flashattn)
        self.scale_shift_table = Parameter(
            initializer(Normal(sigma=hidden_size**-0.5), (6, hidden_size)), name="scale_shift_table"
        )
        # cross attention
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        # mlp branch
        self.norm2 = LayerNorm(eps=1e-6)
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        # temporal branch
        self.norm_temp = LayerNorm(eps=1e-6)
        self.attn_temp = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                                   qk_norm_legacy=qk_norm_legacy, enable_flashattn=enable_flashattn)
        self.scale_shift_table_temporal = Parameter(
            initializer(Normal(sigma=hidden_size**-0.5), (3, hidden_size)), name="scale_shift_table_temporal"
        )

    def construct(self, x, y, t, t_tmp, mask=None, x_mask=None, t0=None, t0_tmp=None, rope_cos=None, rope_sin=None):
        # x [B, T, S, C]; y [B, L, C]; t / t0 [B, 6C]; t_tmp / t0_tmp [B, 3C]; mask [B, L] or None;
        # x_mask [B, T] bool or None; rope_cos / rope_sin [T, D]
        B, T, S, C = x.shape
        table = ops.cast(self.scale_shift_table, x.dtype)[None]  # [1, 6, C]
        table_tmp = ops.cast(self.scale_shift_table_temporal, x.dtype)[None]  # [1, 3, C]
        mod0 = mod0_tmp = None
        if x_mask is not None:
            mod0, mod0_tmp = table + t0.reshape(B, 6, C), table_tmp + t0_tmp.reshape(B, 3, C)
        mod = frame_modulation(table + t.reshape(B, 6, C), mod0, x_mask)  # [B, T or 1, 6, C]
        mod_tmp = frame_modulation(table_tmp + t_tmp.reshape(B, 3, C), mod0_tmp, x_mask)  # [B, T or 1, 3, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, 1, axis=2)  # [B, T|1, 1, C]
        shift_tmp, scale_tmp, gate_tmp = ops.split(mod_tmp, 1, axis=2)

        # spatial branch: attention within each frame
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        x_s = self.attn(x_m.reshape(B * T, S, C)).reshape(B, T, S, C)  # [B*T, S, C] <-> [B, T, S, C]
        x = x + bcast(gate_msa, x_s) * x_s

        # temporal branch: attention over frames at each spatial position
        x_m = t2i_modulate(self.norm_temp(x), shift_tmp, scale_tmp)
        x_t = _frames_last(x_m).reshape(B * S, T, C)  # [B, T, S, C] -> [B*S, T, C]
        x_t = self.attn_temp(x_t, rope_cos, rope_sin)
        x_t = _frames_first(x_t.reshape(B, S, T, C))  # [B*S, T, C] -> [B, T, S, C]
        x = x + bcast(gate_tmp, x_t) * x_t

        # cross attention to the caption (no norm, no gate)
        x = x + self.cross_attn(x.reshape(B, T * S, C), y, mask).reshape(B, T, S, C)

        # mlp
        x_m = self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + bcast(gate_mlp, x_m) * x_m
        return x


class T2IFinalLayer(stdit.T2IFinalLayer):
    """PixArt final layer; frames where x_mask is False are modulated with t0 instead of t.

    As in v1.1.0 (whose released weights were trained so), those frames' t0 modulation is applied to the
    t-modulated features, normalised again: LayerNorm -> modulate(t) -> LayerNorm -> modulate(t0) (the
    original normalises the already modulated x for its t0 branch)."""

    def construct(self, x, t, x_mask=None, t0=None):
        # x [B, T, S, C]; t / t0 [B, C]; x_mask [B, T] bool or None
        table = ops.cast(self.scale_shift_table, x.dtype)[None]  # [1, 2, C]
        shift, scale = ops.split((table + t[:, None])[:, None], 1, axis=2)  # 2 x [B, 1, 1, C]
        x = t2i_modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = ops.split((table + t0[:, None])[:, None], 1, axis=2)
            x_zero = t2i_modulate(self.norm_final(x), shift0, scale0)
            x = ops.where(x_mask[:, :, None, None], x, x_zero)  # per frame
        return self.linear(x)  # [B, T, S, prod(patch) * out_channels]


# ================================================================
# STDiT2
# ================================================================


class STDiT2(nn.Cell):
    """Spatial-Temporal DiT of Open-Sora 1.1 (see the module docstring for what it adds to STDiT).

    construct(x [B, C, T, H, W], timestep [B], y [B, 1, L, caption_channels], mask [B, L] or None,
    force_drop_ids [B] or None, x_mask [B, T'] bool or None, num_frames [B], height [B], width [B],
    ar [B], fps [B]) -> [B, out_channels, T, H, W] float32.

    x: latents of any T, H, W (padded to the patch size inside, the output cropped back). T' = frames
    after patching (= T for the released patch (1, 2, 2)); x_mask True = a generated frame, False = a
    conditioning frame (modulated with timestep 0). num_frames, height and width are the clip's pixel
    frames and size (the original passes the clip's, not the latent's), ar its aspect ratio and fps its
    frame rate: tensors with one value per sample (or one for the batch, repeated), all required.
    mask, x_mask and the conditions with half the batch's rows are repeated (classifier-free guidance).

    Settings are those of the released STDiT2-XL/2 by default; the original's config keys keep their
    names (input_sq_size, qk_norm, model_max_length, ...). input_size: the latent size the tasks use
    by default (the original's config key); the model itself takes any size. dtype, recompute_blocks,
    caption dropout (`set_train`, `force_drop_ids`) and enable_flashattn behave as in STDiT.
    """

    # True: trace for MindSpore dynamic shapes (`Cell.set_inputs` with None dims: one graph for every input size;
    # set by the train step with task.shapes=dynamic). Pads always and computes the position embedding's base
    # size as a tensor; the same values as the static path.
    dynamic_shapes = False

    # STDiT2Config (v1.1.0) keys that fix the architecture or its numerics, with the value a config.json
    # that omits the key stands for (STDiT2Config's defaults; qk_norm_legacy arrived in 1.2, and a 1.1
    # folder without it was written by code that had only the legacy order). A Hugging Face folder's
    # config.json must agree with the model on each (opensora/model/pretrained.py).
    hf_config_defaults = {
        "in_channels": 4, "patch_size": (1, 2, 2), "hidden_size": 1152, "depth": 28, "num_heads": 16,
        "mlp_ratio": 4.0, "pred_sigma": True, "caption_channels": 4096, "model_max_length": 120,
        "input_sq_size": 32, "qk_norm": False, "qk_norm_legacy": True,
    }  # fmt: skip

    def __init__(
        self,
        input_size=None,
        input_sq_size=512,
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        pred_sigma=True,
        caption_channels=4096,
        model_max_length=200,
        qk_norm=True,
        qk_norm_legacy=True,
        enable_flashattn=False,
        dtype=ms.float32,
        recompute_blocks=None,
    ):
        super().__init__()
        if hidden_size % 3:
            raise ValueError(f"STDiT2 hidden_size={hidden_size} must be divisible by 3 (size conditioning: "
                             "2/3 height and width, 1/3 aspect ratio)")
        if hidden_size % 4 or hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"STDiT2 hidden_size={hidden_size}, num_heads={num_heads}: the hidden size must be "
                             "divisible by 4 (2-D position embedding) and by num_heads, with an even head dim (RoPE)")
        self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
        self.input_sq_size = input_sq_size
        self.in_channels = in_channels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.pred_sigma = pred_sigma
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.qk_norm = qk_norm
        self.qk_norm_legacy = qk_norm_legacy
        self.dtype = resolve_dtype(dtype)

        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.SequentialCell(nn.SiLU(), Linear(hidden_size, 6 * hidden_size))
        self.t_block_temp = nn.SequentialCell(nn.SiLU(), Linear(hidden_size, 3 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, uncond_prob=class_dropout_prob,
                                          token_num=model_max_length)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.blocks = nn.CellList(
            [
                STDiT2Block(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                            qk_norm_legacy=qk_norm_legacy, enable_flashattn=enable_flashattn)
                for _ in range(depth)
            ]
        )  # fmt: skip
        self.final_layer = T2IFinalLayer(hidden_size, int(np.prod(self.patch_size)), self.out_channels)

        # size, aspect-ratio, frames and fps conditioning
        self.csize_embedder = SizeEmbedder(hidden_size // 3)
        self.ar_embedder = SizeEmbedder(hidden_size // 3)
        self.fl_embedder = SizeEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)

        # the STDiT initialisation applies as it is (same attribute names), plus t_block_temp
        STDiT.initialize_weights(self)
        _fill(self.t_block_temp[1].weight, Normal(sigma=0.02))
        STDiT.initialize_temporal(self)
        self.recompute_blocks = apply_recompute(self.blocks, recompute_blocks)

    def construct(self, x, timestep, y, mask=None, force_drop_ids=None, x_mask=None, num_frames=None, height=None,
                  width=None, ar=None, fps=None):
        if num_frames is None or height is None or width is None or ar is None or fps is None:
            raise ValueError("STDiT2 needs num_frames, height, width (the clip's pixel frames and size), ar and fps "
                             "for every sample: pass them as keyword arguments (tensors [B] or [1])")
        B = x.shape[0]
        x = ops.cast(x, self.dtype)
        y = ops.cast(y, self.dtype)

        # === size / aspect-ratio / duration conditioning (fp32) ===
        height = ops.cast(height, ms.float32).reshape(-1)
        width = ops.cast(width, ms.float32).reshape(-1)
        rs = ops.sqrt(height[0] * width[0])  # sample 0's pixel size sets the position scale of the batch
        csize = self.csize_embedder(ops.stack([height, width], axis=1), B)  # [B, 2C/3]
        ar = self.ar_embedder(ops.cast(ar, ms.float32).reshape(-1, 1), B)  # [B, C/3]
        data_info = ops.concat([csize, ar], axis=1)  # [B, C]
        fl = self.fl_embedder(ops.cast(num_frames, ms.float32).reshape(-1, 1), B)  # [B, C]
        fl = fl + self.fps_embedder(ops.cast(fps, ms.float32).reshape(-1, 1), B)

        # === pad to the patch size; dynamic position embedding ===
        _, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.patch_size
        pad_t, pad_h, pad_w = (-Tx) % pt, (-Hx) % ph, (-Wx) % pw
        T, H, W = (Tx + pad_t) // pt, (Hx + pad_h) // ph, (Wx + pad_w) // pw
        S = H * W
        if self.dynamic_shapes:  # sizes known only when the graph runs: always pad, the base size as a tensor
            x = ops.stop_gradient(ops.pad(x, (0, pad_w, 0, pad_h, 0, pad_t)))  # (the data: no gradient)
            base_size = ops.round(ops.sqrt(ops.scalar_to_tensor(S, ms.float32)))
        else:
            if pad_t or pad_h or pad_w:
                x = ops.pad(x, (0, pad_w, 0, pad_h, 0, pad_t))  # zeros at the end of each axis
            base_size = round(S**0.5)
        scale = rs / self.input_sq_size
        pos_emb = self.pos_embed(H, W, scale, base_size)  # [S, C] fp32

        # === embedding ===
        x = self.x_embedder(x).reshape(B, T, S, self.hidden_size)  # [B, C_in, T, H, W] -> [B, T, S, C]
        x = ops.cast(ops.cast(x, ms.float32) + pos_emb, self.dtype)  # position embedding added in fp32

        # === adaLN inputs (fp32, cast to the compute dtype) ===
        t = self.t_embedder(timestep)  # [B, C]
        t_spc_mlp = ops.cast(self.t_block(t + data_info), self.dtype)  # [B, 6C]
        t_tmp_mlp = ops.cast(self.t_block_temp(t + fl), self.dtype)  # [B, 3C]
        t0_spc = t0_spc_mlp = t0_tmp_mlp = None
        if x_mask is not None:
            x_mask = ops.cast(x_mask, ms.bool_).reshape(x_mask.shape[0], -1)
            if not self.dynamic_shapes:  # (under dynamic shapes the caller gives one row per sample)
                if x_mask.shape[1] != T:
                    raise ValueError(f"x_mask has {x_mask.shape[1]} frames, the input {T} after patching")
                if x_mask.shape[0] != B:
                    x_mask = ops.tile(x_mask, (B // x_mask.shape[0], 1))
            t0 = self.t_embedder(ops.zeros_like(timestep))
            t0_spc = t0 + data_info
            t0_spc_mlp = ops.cast(self.t_block(t0_spc), self.dtype)
            t0_tmp_mlp = ops.cast(self.t_block_temp(t0 + fl), self.dtype)
            t0_spc = ops.cast(t0_spc, self.dtype)

        # === caption ===
        y, mask = self.y_embedder.tokens(y, mask, self.training, force_drop_ids)  # [B, L, C], [B, L] or None

        # === blocks ===
        rope_cos, rope_sin = self.rope(T)  # [T, head_dim] each
        for block in self.blocks:
            x = block(x, y, t_spc_mlp, t_tmp_mlp, mask, x_mask, t0_spc_mlp, t0_tmp_mlp, rope_cos, rope_sin)

        # === final layer: raw t for generated frames, t0 + size conditioning for x_mask'ed ones ===
        x = self.final_layer(x, ops.cast(t, self.dtype), x_mask, t0_spc)  # [B, T, S, pt*ph*pw*C_out]
        x = self.unpatchify(x, H, W)  # [B, C_out, T*pt, H*ph, W*pw]
        x = x[:, :, :Tx, :Hx, :Wx]  # crop the padding
        return ops.cast(x, ms.float32)

    def unpatchify(self, x, nh, nw):
        """[B, Nt, Nh*Nw, (pt ph pw C_out)] -> [B, C_out, Nt*pt, Nh*ph, Nw*pw]."""
        B, nt = x.shape[0], x.shape[1]
        pt, ph, pw = self.patch_size
        c = self.out_channels
        x = x.reshape(B, nt, nh, nw, pt, ph, pw, c)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, nt, pt, nh, ph, nw, pw]
        return x.reshape(B, c, nt * pt, nh * ph, nw * pw)

    get_null_y = STDiT.get_null_y  # y_embedding as [1, 1, L, caption_channels]


def stdit2_xl2(**kwargs) -> STDiT2:
    """STDiT2-XL/2: depth 28, hidden 1152, 16 heads, patch (1, 2, 2)."""
    return STDiT2(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16, **kwargs)
