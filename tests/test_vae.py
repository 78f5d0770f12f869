"""SD VAE (AutoencoderKL) and VideoAutoencoderKL: parity with diffusers on a tiny random model saved with
`save_pretrained`, loading (.safetensors, .bin, legacy attention names, .ckpt), micro-batching, errors,
and the vae=sd_vae_ft_ema config.

Parity tolerance: max |ours - diffusers| <= 1e-5 * max |diffusers| in float32 (measured ~1e-6 relative).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import mindspore as ms

from helpers import compose_cfg
from opensora.vae import VideoAutoencoderKL
from opensora.vae.autoencoder_kl import AutoencoderKLConfig, read_weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
            latent_channels=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2)
B, T, H, W = 2, 3, 16, 16


def _rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny diffusers AutoencoderKL with every parameter perturbed (norm affines too), saved as safetensors."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("sd_vae")
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    return model, folder


@pytest.fixture
def video():
    return np.random.default_rng(0).uniform(-1, 1, (B, 3, T, H, W)).astype(np.float32)


def _frames(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])))


def _video(frames, b):
    n, c, h, w = frames.shape
    return frames.reshape(b, n // b, c, h, w).transpose(0, 2, 1, 3, 4)


@pytest.mark.parametrize("conv_impl", ["conv", "matmul"])
def test_encode_decode_match_diffusers(reference, video, conv_impl):
    model, folder = reference
    vae = VideoAutoencoderKL(from_pretrained=str(folder), conv_impl=conv_impl)
    assert vae.latent_channels == 4 and vae.downsample == [1, 2, 2] and vae.scale_factor == pytest.approx(0.18215)
    with torch.no_grad():
        dist = model.encode(_frames(video)).latent_dist
        mean, logvar = _video(dist.mean.numpy(), B), _video(dist.logvar.numpy(), B)
    ours = vae.latent_dist(video)
    assert ours.mean.shape == (B, 4, T, H // 2, W // 2)
    assert _rel_err(ours.mean, mean) <= 1e-5
    assert _rel_err(ours.logvar, logvar) <= 1e-5

    z = vae.encode(video)  # posterior mean (sample_posterior=False), scaled
    np.testing.assert_allclose(z, ours.mean * 0.18215, rtol=0, atol=0)
    with torch.no_grad():
        ref = _video(model.decode(_frames(mean)).sample.numpy(), B)
    x = vae.decode(z)
    assert x.dtype == np.float32 and x.shape == video.shape
    assert _rel_err(x, ref) <= 1e-5


def test_other_configs_match_diffusers(tmp_path):
    """3 blocks, 2 layers per block, other channel counts, no mid-block attention, no quant convs."""
    config = dict(in_channels=2, out_channels=1, block_out_channels=[4, 8, 8], layers_per_block=2, norm_num_groups=2,
                  latent_channels=3, sample_size=8, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.5, shift_factor=0.1,
                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    torch.manual_seed(1)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    vae = VideoAutoencoderKL(from_pretrained=str(tmp_path))
    assert vae.downsample == [1, 4, 4] and vae.latent_channels == 3
    x = np.random.default_rng(1).uniform(-1, 1, (1, 2, 2, 8, 8)).astype(np.float32)
    with torch.no_grad():
        mean = model.encode(_frames(x)).latent_dist.mean
        ref = _video(model.decode(mean).sample.numpy(), 1)
        mean = _video(mean.numpy(), 1)
    z = vae.encode(x)
    assert _rel_err(z, (mean - 0.1) * 0.5) <= 1e-5
    assert _rel_err(vae.decode(z), ref) <= 1e-5


def test_sample_posterior_uses_the_seeded_rng(reference, video):
    _, folder = reference
    vae = VideoAutoencoderKL(from_pretrained=str(folder), sample_posterior=True, seed=3)
    dist = vae.latent_dist(video)
    z = vae.encode(video, rng=np.random.default_rng(7))
    noise = np.random.default_rng(7).standard_normal(dist.mean.shape, dtype=np.float32)
    np.testing.assert_allclose(z, (dist.mean + dist.std * noise) * 0.18215, rtol=1e-6, atol=1e-7)
    again = VideoAutoencoderKL(from_pretrained=str(folder), sample_posterior=True, seed=3)
    z1, z2 = vae.encode(video), again.encode(video)
    np.testing.assert_array_equal(z1, z2)
    assert np.abs(z1 - dist.mean * 0.18215).max() > 1e-3  # it did sample


def test_micro_batches_equal_one_batch(reference, video):
    _, folder = reference
    whole = VideoAutoencoderKL(from_pretrained=str(folder))
    z = whole.encode(video)
    x = whole.decode(z)
    micro = VideoAutoencoderKL(from_pretrained=str(folder), micro_batch_size=4)  # 6 frames: 4 + 2
    # Not bitwise: the CPU kernels (oneDNN) may block a 4-frame batch differently from a 6-frame one, so
    # sums run in another order (measured with ONEDNN_MAX_CPU_ISA=AVX2: 4.7e-8 at scale ~0.3). A frame
    # lost, repeated or taken from another micro-batch moves values by O(scale).
    tol_z, tol_x = 1e-6 * np.abs(z).max(), 1e-6 * np.abs(x).max()
    np.testing.assert_allclose(micro.encode(video), z, rtol=0, atol=tol_z)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)  # as in the tasks; the last micro-batch is padded to 4 frames
    try:
        np.testing.assert_allclose(micro.encode(video), z, rtol=0, atol=tol_z)
        np.testing.assert_allclose(micro.decode(z), x, rtol=0, atol=tol_x)
    finally:
        ms.set_context(mode=mode)


def test_bin_and_legacy_attention_names_load(reference, video, tmp_path):
    model, folder = reference
    expected = VideoAutoencoderKL(from_pretrained=str(folder)).encode(video)

    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    np.testing.assert_array_equal(VideoAutoencoderKL(from_pretrained=str(tmp_path / "bin")).encode(video), expected)

    # old diffusers layout: attentions.0.{query,key,value,proj_attn}, here with 1x1-conv shaped weights
    from safetensors.numpy import save_file

    legacy = {}
    for k, v in read_weights(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v
        legacy[k] = np.ascontiguousarray(v)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "legacy" / "config.json").write_text((folder / "config.json").read_text())
    np.testing.assert_array_equal(VideoAutoencoderKL(from_pretrained=str(tmp_path / "legacy")).encode(video),
                                  expected)


def test_ckpt_by_parameter_names_loads(reference, video, tmp_path):
    _, folder = reference
    vae = VideoAutoencoderKL(from_pretrained=str(folder))
    params = dict(vae.module.parameters_and_names())
    assert "encoder.mid_block.attentions.0.to_q.weight" in params and "quant_conv.weight" in params
    # what a conversion task does: save the cell's parameters, config given separately or beside the file
    ms.save_checkpoint(params, str(tmp_path / "vae.ckpt"))
    config = json.loads((folder / "config.json").read_text())
    loaded = VideoAutoencoderKL(from_pretrained=str(tmp_path / "vae.ckpt"), config=config)
    np.testing.assert_array_equal(loaded.encode(video), vae.encode(video))
    # save_checkpoint writes config.json beside the .ckpt
    path = vae.save_checkpoint(tmp_path / "out" / "sd_vae.ckpt")
    again = VideoAutoencoderKL(from_pretrained=str(path))
    z = vae.encode(video)
    np.testing.assert_array_equal(again.decode(z), vae.decode(z))
    assert set(again.state_dict()) == set(params)
    # a diffusers-style folder holding diffusion_pytorch_model.ckpt
    path.rename(tmp_path / "out" / "diffusion_pytorch_model.ckpt")
    folder_ckpt = VideoAutoencoderKL(from_pretrained=str(tmp_path / "out"))
    np.testing.assert_array_equal(folder_ckpt.decode(z), vae.decode(z))


def test_wrong_checkpoint_lists_mismatches(reference, tmp_path):
    _, folder = reference
    config = json.loads((folder / "config.json").read_text())
    stdit = {"x_embedder.proj.weight": np.zeros((96, 4, 1, 2, 2), np.float32),
             "blocks.0.attn.qkv.weight": np.zeros((288, 96), np.float32)}
    ms.save_checkpoint(stdit, str(tmp_path / "stdit.ckpt"))
    with pytest.raises(ValueError) as e:
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "stdit.ckpt"), config=config)
    msg = str(e.value)
    assert "stdit.ckpt" in msg and "x_embedder.proj.weight (96, 4, 1, 2, 2)" in msg
    assert "encoder.conv_in.weight (8, 3, 3, 3)" in msg and "AutoencoderKL" in msg

    # right names, wrong sizes: a config with other widths than the weights
    wider = dict(config, block_out_channels=[16, 16])
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight \(8, 3, 3, 3\) \(expected \(16, 3, 3, 3\)\)"):
        VideoAutoencoderKL(from_pretrained=str(folder / "diffusion_pytorch_model.safetensors"), config=wider)


def test_missing_files_are_named(reference, tmp_path):
    _, folder = reference
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "nowhere"))
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no_config/config\.json"):
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "no_config"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "no_weights"))


def test_bad_inputs_and_declared_shapes_are_checked(reference, video):
    _, folder = reference
    with pytest.raises(ValueError, match=r"downsample=\[1, 8, 8\].*\[1, 2, 2\]"):
        VideoAutoencoderKL(from_pretrained=str(folder), downsample=[1, 8, 8])
    with pytest.raises(ValueError, match="latent_channels=16"):
        VideoAutoencoderKL(from_pretrained=str(folder), latent_channels=16)
    vae = VideoAutoencoderKL(from_pretrained=str(folder), latent_channels=4, downsample=[1, 2, 2])
    with pytest.raises(ValueError, match=r"expects \[B, 3, T, H, W\]"):
        vae.encode(video[:, :, 0])
    with pytest.raises(ValueError, match="not divisible"):
        vae.encode(video[..., :15])


def test_random_config_and_fp16(video):
    cfg = AutoencoderKLConfig.from_dict(TINY)
    fp32 = VideoAutoencoderKL(config=TINY, seed=1)
    fp16 = VideoAutoencoderKL(config=cfg, seed=1, dtype="fp16")
    assert fp16.module.encoder.conv_in.weight.dtype == ms.float16
    assert fp16.module.encoder.conv_norm_out.weight.dtype == ms.float32  # GroupNorm stays fp32
    z32, z16 = fp32.encode(video), fp16.encode(video)
    assert z16.dtype == np.float32 and _rel_err(z16, z32) < 1e-2
    assert _rel_err(fp16.decode(z32), fp32.decode(z32)) < 1e-2


def test_sd_vae_config_composes(reference, tmp_path):
    _, folder = reference
    cfg = compose_cfg(["vae=sd_vae_ft_ema", "data.image_size=256", "data.num_frames=16"], tmp_path)
    assert cfg.vae.from_pretrained.endswith("models/sd-vae-ft-ema")
    assert list(cfg.model.input_size) == [16, 32, 32] and cfg.model.in_channels == 4
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    with pytest.raises(InstantiationException, match="downsample"):  # the tiny VAE downsamples by 2, not 8
        instantiate(cfg.vae, from_pretrained=str(folder))
    vae = instantiate(cfg.vae, from_pretrained=str(folder), downsample=[1, 2, 2])
    assert vae.sample_posterior and vae.micro_batch_size == 16 and vae.scale_factor == pytest.approx(0.18215)
