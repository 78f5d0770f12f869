"""VideoAutoencoderKL: the SD image VAE applied frame by frame to videos [B, C, T, H, W].

Frames are folded into the batch ([B, C, T, H, W] -> [B*T, C, H, W]) and run through the
AutoencoderKL in micro-batches of `micro_batch_size` frames. encode returns
(z - shift_factor) * scale_factor with z the posterior mean (`sample_posterior=False`) or a
sample of it; decode inverts the scaling first.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

import mindspore as ms

from opensora.utils.tensor_files import resolve_dtype
from opensora.vae.autoencoder_kl import (AutoencoderKL, AutoencoderKLConfig, DecodeNet, DiagonalGaussianDistribution,
                                         EncodeNet, find_weight_file, load_weights, state_dict)

log = logging.getLogger(__name__)


def _resolve(from_pretrained, config) -> tuple[Optional[Path], AutoencoderKLConfig]:
    """(weights file or None, config) from a diffusers folder (or a pipeline folder with `vae/`), a weights
    file with config.json beside it, and/or a `config` dict (which wins over config.json)."""
    weights, cfg_file = None, None
    if from_pretrained is not None:
        path = Path(from_pretrained)
        if path.is_dir():
            if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
                path = path / "vae"  # a whole diffusers pipeline folder
            weights, cfg_file = find_weight_file(path), path / "config.json"
        elif path.is_file():
            weights, cfg_file = path, path.parent / "config.json"
        else:
            raise FileNotFoundError(f"VAE checkpoint not found: {path} (expected a diffusers AutoencoderKL folder "
                                    "with config.json and diffusion_pytorch_model.safetensors, e.g. from "
                                    f"`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}`, "
                                    "or a weights file with config.json beside it)")
    if config is not None:
        if isinstance(config, AutoencoderKLConfig):
            return weights, config
        if not isinstance(config, dict):  # a Hydra DictConfig
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        return weights, AutoencoderKLConfig.from_dict(config)
    if cfg_file is None:
        raise ValueError("VideoAutoencoderKL needs from_pretrained (a diffusers folder or weights file) and/or config")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: the VAE config (diffusers config.json) must lie beside "
                                f"{weights.name}, or be passed as `config`")
    return weights, AutoencoderKLConfig.from_json(cfg_file)


class VideoAutoencoderKL:
    """The SD VAE (diffusers AutoencoderKL) on videos, with the project's VAE interface:
    ``encode(x) -> z`` and ``decode(z) -> x`` on [B, C, T, H, W] numpy (or MindSpore) arrays, float32 out;
    ``latent_channels``; ``downsample`` = [1, f, f] with f = 2^(len(block_out_channels) - 1) (8 for SD).

    `from_pretrained`: a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors
    or .bin), or a weights file (.ckpt written by `save_checkpoint`, .safetensors, .bin) with config.json
    beside it or `config` given. With only `config`, the weights are random (seeded by `seed`).
    `scale_factor` / `shift_factor` default to the config's scaling_factor / shift_factor.
    `sample_posterior`: encode draws z ~ N(mean, std) from an RNG seeded by `seed` (or the `rng` passed
    to encode) instead of returning the mean. `dtype`: convs and linears in fp32/fp16/bf16, GroupNorm and
    softmax always fp32. `latent_channels` / `downsample`, when given (configs state them for the
    diffusion model's shapes), must agree with the loaded model. `conv_impl`: "auto" (im2col + MatMul on
    CPU, native conv elsewhere), "conv" or "matmul".
    """

    def __init__(self, from_pretrained: Optional[str] = None, config: Optional[dict] = None,
                 micro_batch_size: Optional[int] = None, scale_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, sample_posterior: bool = False, seed: int = 0,
                 dtype: str = "fp32", latent_channels: Optional[int] = None, downsample=None,
                 conv_impl: str = "auto"):
        ms_dtype = resolve_dtype(dtype, "vae.dtype")
        if ms_dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
            raise ValueError("VideoAutoencoderKL dtype=bf16: MindSpore has no bfloat16 Conv2D kernel on CPU; "
                             "use fp32 or fp16")
        weights, self.config = _resolve(from_pretrained, config)
        cfg = self.config
        self.module = AutoencoderKL(cfg, ms_dtype, seed=None if weights is not None else seed, conv_impl=conv_impl)
        if conv_impl == "auto" and self.module.conv_impl == "matmul":
            log.info("VAE: 3x3 convs run as im2col + MatMul on CPU (conv_impl=auto; faster than CPU Conv2D)")
        self.weights_file = weights
        if weights is not None:
            load_weights(self.module, weights)
            log.info("VAE weights loaded from %s", weights)
        self.module.set_train(False)
        for p in self.module.get_parameters():
            p.requires_grad = False
        if ms_dtype != ms.float32 and cfg.force_upcast:
            log.warning("VAE config sets force_upcast (diffusers runs it in fp32); dtype=%s may overflow", dtype)
        self._encode_net, self._decode_net = EncodeNet(self.module), DecodeNet(self.module)

        self.latent_channels = cfg.latent_channels
        f = cfg.spatial_downsample
        self.downsample = [1, f, f]
        if latent_channels is not None and int(latent_channels) != self.latent_channels:
            raise ValueError(f"vae.latent_channels={latent_channels} but the VAE ({from_pretrained}) has "
                             f"latent_channels={self.latent_channels}")
        if downsample is not None:
            given = [1, int(downsample), int(downsample)] if np.ndim(downsample) == 0 else [int(d) for d in downsample]
            if given != self.downsample:
                raise ValueError(f"vae.downsample={list(given)} but the VAE ({from_pretrained}) downsamples by "
                                 f"{self.downsample}")
        self.scale_factor = float(cfg.scaling_factor if scale_factor is None else scale_factor)
        shift = cfg.shift_factor if shift_factor is None else shift_factor
        self.shift_factor = float(shift or 0.0)
        if micro_batch_size is not None and int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: expected a positive number of frames or null")
        self.micro_batch_size = None if micro_batch_size is None else int(micro_batch_size)
        self.sample_posterior = bool(sample_posterior)
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _numpy(x) -> np.ndarray:
        x = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
        return np.asarray(x, dtype=np.float32)

    def _run(self, net, frames: np.ndarray) -> np.ndarray:
        """`net` over [N, C, H, W] in micro-batches; in GRAPH_MODE the last one is padded to the micro-batch
        size (frames are independent) so a single graph is compiled."""
        n = frames.shape[0]
        mb = n if self.micro_batch_size is None else min(self.micro_batch_size, n)
        pad = ms.get_context("mode") == ms.GRAPH_MODE
        outs = []
        for s in range(0, n, mb):
            chunk = frames[s:s + mb]
            k = chunk.shape[0]
            if pad and k < mb:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], mb - k, axis=0)])
            outs.append(net(ms.Tensor(np.ascontiguousarray(chunk))).asnumpy()[:k])
        return np.concatenate(outs).astype(np.float32, copy=False)

    @staticmethod
    def _fold(x: np.ndarray) -> np.ndarray:
        b, c, t, h, w = x.shape
        return x.transpose(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B, C, T, H, W] -> [B*T, C, H, W]

    @staticmethod
    def _unfold(x: np.ndarray, b: int) -> np.ndarray:
        n, c, h, w = x.shape
        return np.ascontiguousarray(x.reshape(b, n // b, c, h, w).transpose(0, 2, 1, 3, 4))  # -> [B, C, T, H, W]

    def _check(self, x: np.ndarray, channels: int, what: str, factor: int = 1) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"VideoAutoencoderKL.{what} expects [B, {channels}, T, H, W], got shape {x.shape}")
        if x.shape[3] % factor or x.shape[4] % factor:
            raise ValueError(f"VideoAutoencoderKL.encode: frame size {x.shape[3]}x{x.shape[4]} is not divisible by "
                             f"the VAE downsample factor {factor}")

    # ------------------------------------------------------------ interface

    def latent_dist(self, x, strict_size: bool = True) -> DiagonalGaussianDistribution:
        """The posterior of each frame: mean / logvar / std shaped [B, latent, T, h, w] (unscaled). strict_size=False
        accepts frames the downsample factor does not divide, as diffusers does (each downsampling halves with
        floor: 240 x 426 -> 30 x 53, what Open-Sora 1.1 gets for its table sizes)."""
        x = self._numpy(x)
        self._check(x, self.config.in_channels, "encode", self.config.spatial_downsample if strict_size else 1)
        moments = self._unfold(self._run(self._encode_net, self._fold(x)), x.shape[0])
        return DiagonalGaussianDistribution(moments, axis=1)

    def encode(self, x, rng: Optional[np.random.Generator] = None, noise: Optional[np.ndarray] = None,
               strict_size: bool = True) -> np.ndarray:
        """Videos [B, in, T, H, W] in [-1, 1] -> scaled latents [B, latent, T, H/f, W/f] float32. With
        sample_posterior, z = mean + std * noise: the given `noise` (the train task draws it from its own RNG for
        the global batch), else drawn from `rng` (default: this VAE's seeded RNG). strict_size: see latent_dist."""
        dist = self.latent_dist(x, strict_size)
        if not self.sample_posterior:
            z = dist.mean
        elif noise is not None:
            z = dist.sample(noise=np.asarray(noise, np.float32))
        else:
            z = dist.sample(rng if rng is not None else self.rng)
        return ((z - self.shift_factor) * self.scale_factor).astype(np.float32)

    def decode(self, z) -> np.ndarray:
        """Scaled latents [B, latent, T, h, w] -> videos [B, out, T, h*f, w*f] float32 (not clipped)."""
        z = self._numpy(z)
        self._check(z, self.latent_channels, "decode")
        z = z / self.scale_factor + self.shift_factor
        return self._unfold(self._run(self._decode_net, self._fold(z)), z.shape[0])

    # ------------------------------------------------------------ weights

    def state_dict(self) -> dict[str, np.ndarray]:
        """{diffusers parameter name: float32 numpy array}."""
        return state_dict(self.module)

    def save_checkpoint(self, path) -> Path:
        """Write the weights as a MindSpore .ckpt (diffusers names) and the diffusers config.json beside it,
        which `VideoAutoencoderKL(from_pretrained=path)` loads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in self.state_dict().items()], str(path))
        with open(path.parent / "config.json", "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        return path
