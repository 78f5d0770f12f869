"""AutoencoderKL (the Stable Diffusion VAE, e.g. stabilityai/sd-vae-ft-ema) in MindSpore.

Parameter names equal the diffusers `AutoencoderKL` state-dict keys, so a diffusers folder
(`config.json` + `diffusion_pytorch_model.safetensors`, `.bin` or a MindSpore `.ckpt`) loads with no
rename table:

    encoder.conv_in.{weight,bias}
    encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}.{weight,bias}
    encoder.down_blocks.{i}.downsamplers.0.conv.{weight,bias}         (all but the last block)
    encoder.mid_block.resnets.{0,1}.*    encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.*
    encoder.conv_norm_out.*  encoder.conv_out.*                       (conv_out -> 2 * latent_channels)
    decoder.conv_in.*  decoder.mid_block.*  decoder.up_blocks.{i}.resnets.{j}.*  (layers_per_block + 1 resnets)
    decoder.up_blocks.{i}.upsamplers.0.conv.*                         (all but the last block)
    decoder.conv_norm_out.*  decoder.conv_out.*
    quant_conv.*  post_quant_conv.*                                   (1x1 convs)

Older diffusers files name the mid-block attention `query/key/value/proj_attn` (sometimes as 1x1
conv weights [C, C, 1, 1]); they are renamed and reshaped on load.

Numerics follow diffusers: GroupNorm (eps 1e-6) and the attention softmax in float32, SiLU,
ResNet blocks without time embedding, a single-head mid-block self-attention over the H*W
positions with a residual, downsampling by zero-padding (right, bottom) + 3x3 stride-2 conv,
upsampling by 2x nearest neighbour + 3x3 conv.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from opensora.utils.tensor_files import open_tensors, to_numpy

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
                "diffusion_pytorch_model.ckpt")
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ================================================================
# Config
# ================================================================


@dataclass
class AutoencoderKLConfig:
    """The fields of a diffusers AutoencoderKL `config.json` (unknown keys are ignored)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | Sequence[int] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        self.down_block_types = list(self.down_block_types)
        self.up_block_types = list(self.up_block_types)
        n = len(self.block_out_channels)
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types) or len(self.down_block_types) != n:
            raise ValueError(f"AutoencoderKL config: down_block_types={self.down_block_types}; expected "
                             f"{n} x 'DownEncoderBlock2D' (one per block_out_channels entry)")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types) or len(self.up_block_types) != n:
            raise ValueError(f"AutoencoderKL config: up_block_types={self.up_block_types}; expected "
                             f"{n} x 'UpDecoderBlock2D' (one per block_out_channels entry)")
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"AutoencoderKL config: act_fn={self.act_fn!r} not supported ({sorted(_ACTIVATIONS)})")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"AutoencoderKL config: block_out_channels {bad} not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    @property
    def spatial_downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.extra = {k: v for k, v in d.items() if k not in names}
        return cfg

    @classmethod
    def from_json(cls, path) -> "AutoencoderKLConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """A config.json that diffusers' AutoencoderKL loads."""
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        d["_class_name"] = "AutoencoderKL"
        return d


# ================================================================
# Layers
# ================================================================


def _mish(x):
    return x * ops.tanh(ops.softplus(x))


_ACTIVATIONS = {"silu": ops.silu, "swish": ops.silu, "relu": ops.relu, "mish": _mish,
                "gelu": lambda x: ops.gelu(x, approximate="none")}


class Conv2d(nn.Cell):
    """torch-style Conv2d: weight [out, in, k, k], bias [out], zero padding `padding` on every side.

    `use_matmul` (set by `set_conv_impl`) computes k > 1 convs as im2col (`ops.unfold`) + one batched
    MatMul: MindSpore's CPU Conv2D kernel is ~15x slower than that for these shapes. im2col holds k*k
    copies of the input, so CPU memory grows with the micro-batch.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dtype=ms.float32):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.zeros((cout, cin, kernel, kernel), np.float32), dtype), name="weight")
        self.bias = ms.Parameter(ms.Tensor(np.zeros((cout,), np.float32), dtype), name="bias")
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.pad_mode = "pad" if padding else "valid"
        self.use_matmul = False
        self.bmm = ops.BatchMatMul()

    def construct(self, x):
        if self.use_matmul and self.kernel > 1:
            return self._im2col_conv(x)
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.pad_mode, self.padding)

    def _im2col_conv(self, x):
        b, c, h, w = x.shape
        k, s, p = self.kernel, self.stride, self.padding
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        cols = ops.unfold(x, k, 1, p, s)  # [B, C*k*k, Ho*Wo], rows ordered (C, ki, kj) like the weight
        cout = self.weight.shape[0]
        weight = ops.broadcast_to(self.weight.reshape(1, cout, c * k * k), (b, cout, c * k * k))
        y = self.bmm(weight, cols) + self.bias.reshape(1, cout, 1)  # [B, out, Ho*Wo]
        return y.reshape(b, cout, ho, wo)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dtype=ms.float32) -> Conv2d:
    return Conv2d(cin, cout, kernel, stride, padding, dtype)


def set_conv_impl(cell: nn.Cell, impl: str = "auto") -> str:
    """Choose how the Conv2d cells of `cell` compute: "conv" (ops.conv2d), "matmul" (im2col + MatMul), or
    "auto" (matmul on CPU, conv elsewhere). Returns the choice."""
    if impl not in ("auto", "conv", "matmul"):
        raise ValueError(f"conv_impl={impl!r}: expected 'auto', 'conv' or 'matmul'")
    if impl == "auto":
        impl = "matmul" if ms.get_context("device_target") == "CPU" else "conv"
    for _, sub in cell.cells_and_names():
        if isinstance(sub, Conv2d):
            sub.use_matmul = impl == "matmul"
    return impl


class GroupNorm(nn.Cell):
    """torch GroupNorm over [B, C, H, W] computed in float32 (weight/bias float32); returns the input dtype."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = ms.Parameter(ms.Tensor(np.ones((num_channels,), np.float32)), name="weight")
        self.bias = ms.Parameter(ms.Tensor(np.zeros((num_channels,), np.float32)), name="bias")

    def construct(self, x):
        dtype = x.dtype
        b, c, h, w = x.shape
        x = ops.cast(x, ms.float32).reshape(b, self.num_groups, -1)  # [B, G, C/G*H*W]
        mean = ops.mean(x, -1, True)
        x = x - mean
        var = ops.mean(x * x, -1, True)
        x = (x / ops.sqrt(var + self.eps)).reshape(b, c, h, w)
        x = x * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)
        return ops.cast(x, dtype)


class ResnetBlock2D(nn.Cell):
    """norm1 -> act -> conv1 -> norm2 -> act -> conv2, plus the input (1x1 conv_shortcut when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act: str, eps: float = 1e-6,
                 dtype=ms.float32):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = _conv(in_channels, out_channels, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = _conv(out_channels, out_channels, 3, padding=1, dtype=dtype)
        self.conv_shortcut = _conv(in_channels, out_channels, 1, dtype=dtype) if in_channels != out_channels else None
        self.act = _ACTIVATIONS[act]

    def construct(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Cell):
    """Single-head self-attention over the H*W positions of a feature map, with GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6, dtype=ms.float32):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Dense(channels, channels, weight_init="zeros", bias_init="zeros", dtype=dtype)
        self.to_k = nn.Dense(channels, channels, weight_init="zeros", bias_init="zeros", dtype=dtype)
        self.to_v = nn.Dense(channels, channels, weight_init="zeros", bias_init="zeros", dtype=dtype)
        self.to_out = nn.CellList([nn.Dense(channels, channels, weight_init="zeros", bias_init="zeros", dtype=dtype)])
        self.scale = channels ** -0.5
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(0, 2, 1)  # [B, C, H, W] -> [B, HW, C]
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        scores = ops.cast(self.bmm_t(q, k), ms.float32) * self.scale  # [B, HW, HW]
        attn = ops.softmax(scores, -1)
        out = self.bmm(ops.cast(attn, v.dtype), v)  # [B, HW, C]
        out = self.to_out[0](out)
        return x + out.transpose(0, 2, 1).reshape(b, c, h, w)


class Downsample2D(nn.Cell):
    """Zero-pad one row/column at the bottom/right, then a 3x3 stride-2 conv: [H, W] -> [H/2, W/2]."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2, dtype=dtype)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Cell):
    """2x nearest-neighbour upsampling, then a 3x3 conv: [H, W] -> [2H, 2W]."""

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = _conv(channels, channels, 3, padding=1, dtype=dtype)

    def construct(self, x):
        b, c, h, w = x.shape
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str,
                 add_downsample: bool, dtype=ms.float32):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act,
                                                  dtype=dtype) for i in range(num_layers)])
        self.downsamplers = nn.CellList([Downsample2D(out_channels, dtype)]) if add_downsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str,
                 add_upsample: bool, dtype=ms.float32):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act,
                                                  dtype=dtype) for i in range(num_layers)])
        self.upsamplers = nn.CellList([Upsample2D(out_channels, dtype)]) if add_upsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """resnet -> attention -> resnet at constant width (no attention when add_attention is False)."""

    def __init__(self, channels: int, groups: int, act: str, add_attention: bool, dtype=ms.float32):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups, act, dtype=dtype) for _ in range(2)])
        self.attentions = nn.CellList([Attention(channels, groups, dtype=dtype)]) if add_attention else None

    def construct(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Cell):
    """[B, in, H, W] -> [B, 2 * latent, H / 2^(n-1), W / 2^(n-1)] (mean and log-variance, before quant_conv)."""

    def __init__(self, cfg: AutoencoderKLConfig, dtype=ms.float32):
        super().__init__()
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, padding=1, dtype=dtype)
        self.down_blocks = nn.CellList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, cfg.act_fn,
                               add_downsample=i < len(ch) - 1, dtype=dtype) for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.act_fn, cfg.mid_block_add_attention, dtype)
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype)
        self.act = _ACTIVATIONS[cfg.act_fn]

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    """[B, latent, h, w] -> [B, out, h * 2^(n-1), w * 2^(n-1)]."""

    def __init__(self, cfg: AutoencoderKLConfig, dtype=ms.float32):
        super().__init__()
        rev = list(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, padding=1, dtype=dtype)
        self.mid_block = UNetMidBlock2D(rev[0], g, cfg.act_fn, cfg.mid_block_add_attention, dtype)
        self.up_blocks = nn.CellList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, cfg.act_fn,
                             add_upsample=i < len(rev) - 1, dtype=dtype) for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(g, rev[-1], 1e-6)
        self.conv_out = _conv(rev[-1], cfg.out_channels, 3, padding=1, dtype=dtype)
        self.act = _ACTIVATIONS[cfg.act_fn]

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


# ================================================================
# Model
# ================================================================


class AutoencoderKL(nn.Cell):
    """The diffusers AutoencoderKL. `encode(x)` -> moments [B, 2*latent, h, w] (float32: mean | logvar),
    `decode(z)` -> image [B, out, H, W] (float32). Convs and linears run in `dtype`; GroupNorm and the
    attention softmax in float32. `conv_impl`: see `set_conv_impl`. `construct(x)` reconstructs x through
    the posterior mean."""

    def __init__(self, config: AutoencoderKLConfig, dtype=ms.float32, seed: Optional[int] = None,
                 conv_impl: str = "auto"):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, dtype)
        self.decoder = Decoder(config, dtype)
        c = config.latent_channels
        self.quant_conv = _conv(2 * c, 2 * c, 1, dtype=dtype) if config.use_quant_conv else None
        self.post_quant_conv = _conv(c, c, 1, dtype=dtype) if config.use_post_quant_conv else None
        if seed is not None:
            self.init_weights(seed)
        self.conv_impl = set_conv_impl(self, conv_impl)

    def init_weights(self, seed: int = 0) -> None:
        """torch's default init (uniform +-1/sqrt(fan_in) for conv/linear weights and biases; norms 1, 0), seeded."""
        rng = np.random.default_rng(seed)
        params = dict(self.parameters_and_names())
        for name, p in params.items():
            if ".norm" in name or "norm_out" in name or "group_norm" in name:
                value = np.ones(p.shape, np.float32) if name.endswith("weight") else np.zeros(p.shape, np.float32)
            else:
                w = params[name.rsplit(".", 1)[0] + ".weight"]
                bound = 1.0 / math.sqrt(int(np.prod(w.shape[1:])))
                value = rng.uniform(-bound, bound, p.shape).astype(np.float32)
            p.set_data(ms.Tensor(value, p.dtype))

    def encode(self, x):
        """[B, in, H, W] -> moments [B, 2 * latent, h, w] float32."""
        h = self.encoder(ops.cast(x, self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return ops.cast(h, ms.float32)

    def decode(self, z):
        """[B, latent, h, w] (unscaled latents) -> [B, out, H, W] float32."""
        z = ops.cast(z, self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return ops.cast(self.decoder(z), ms.float32)

    def construct(self, x):
        mean = self.encode(x)[:, :self.config.latent_channels]
        return self.decode(mean)


class EncodeNet(nn.Cell):
    """`vae.encode` as a cell of its own (one compiled graph in GRAPH_MODE)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__(auto_prefix=False)
        self.vae = vae

    def construct(self, x):
        return self.vae.encode(x)


class DecodeNet(nn.Cell):
    """`vae.decode` as a cell of its own (one compiled graph in GRAPH_MODE)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__(auto_prefix=False)
        self.vae = vae

    def construct(self, z):
        return self.vae.decode(z)


class DiagonalGaussianDistribution:
    """The posterior N(mean, exp(logvar)) of moments [..., 2C, ...] split on `axis` (numpy, float32);
    logvar is clipped to [-30, 20] as in diffusers."""

    def __init__(self, moments: np.ndarray, axis: int = 1):
        self.mean, logvar = np.split(np.asarray(moments, np.float32), 2, axis=axis)
        self.logvar = np.clip(logvar, -30.0, 20.0)
        self.std = np.exp(0.5 * self.logvar)
        self.var = np.exp(self.logvar)

    def mode(self) -> np.ndarray:
        return self.mean

    def sample(self, rng: Optional[np.random.Generator] = None, noise: Optional[np.ndarray] = None) -> np.ndarray:
        """mean + std * noise, noise ~ N(0, 1) from `rng` (or the given `noise`)."""
        if noise is None:
            rng = rng if rng is not None else np.random.default_rng()
            noise = rng.standard_normal(self.mean.shape, dtype=np.float32)
        return (self.mean + self.std * noise).astype(np.float32)


# ================================================================
# Weights
# ================================================================


def state_dict(cell: nn.Cell) -> dict[str, np.ndarray]:
    """{diffusers name: float32 numpy array} of `cell`'s parameters (e.g. to write a .ckpt or safetensors)."""
    out = {}
    for name, p in cell.parameters_and_names():
        out[name] = np.ascontiguousarray(to_numpy(p), dtype=np.float32)
    return out


def find_weight_file(folder) -> Path:
    """The weights of a diffusers model folder; FileNotFoundError naming the expected files."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no AutoencoderKL weights found (expected one of {list(WEIGHT_FILES)})")


def read_weights(path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors / .bin (torch, weights_only) / .ckpt (MindSpore) file as numpy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights file not found: {path}")
    return open_tensors(path, unwrap=False).load()


def rename_legacy_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers attention names (`attentions.N.query/key/value/proj_attn`) -> `to_q/to_k/to_v/to_out.0`;
    1x1-conv attention weights [C, C, 1, 1] -> [C, C]."""
    out = {}
    for key, arr in tensors.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] != "to_out" and "attentions" in parts[:-2] and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
        if ".attentions." in key and ".to_" in key and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr.reshape(arr.shape[:2])
        out[key] = arr
    return out


def _listing(items, n=5) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_weights(vae: AutoencoderKL, path) -> list[str]:
    """Copy the tensors of `path` (see `read_weights`) into `vae`. Every parameter must be present with
    its shape and nothing else may be in the file; otherwise ValueError lists the first mismatches
    and what was expected. Returns the names loaded."""
    path = Path(path)
    tensors = rename_legacy_keys(read_weights(path))
    params = dict(vae.parameters_and_names())
    missing = [n for n in params if n not in tensors]
    unexpected = [k for k in tensors if k not in params]
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(params[k].shape)})" for k in params
             if k in tensors and tuple(tensors[k].shape) != tuple(params[k].shape)]
    if missing or unexpected or wrong:
        lines = [f"{path} does not match an AutoencoderKL with config {vae.config.block_out_channels=}, "
                 f"{vae.config.latent_channels=}, {vae.config.layers_per_block=}:"]
        if wrong:
            lines.append(f"  wrong shapes: {_listing(wrong)}")
        if missing:
            lines.append(f"  missing {len(missing)} of {len(params)} parameters: "
                         f"{_listing(f'{n} {tuple(params[n].shape)}' for n in missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_listing(f'{k} {tuple(tensors[k].shape)}' for k in unexpected)}")
        lines.append("  Expected a diffusers AutoencoderKL checkpoint (e.g. stabilityai/sd-vae-ft-ema) whose "
                     "config.json matches the weights.")
        raise ValueError("\n".join(lines))
    for name, p in params.items():
        p.set_data(ms.Tensor(np.ascontiguousarray(tensors[name], dtype=np.float32), p.dtype))
    return list(params)
