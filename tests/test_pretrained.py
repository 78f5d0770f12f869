"""Pretrained STDiT weights (opensora/model/pretrained.py) and the convert task (opensora/tasks/convert.py).

Original-format files are written here with the original torch key names and shapes: torch
pickles (plain, "ema" / "state_dict" / "model" wrappers), safetensors, MindSpore .ckpt, and a
PixArt-style file (2-D patch conv, no temporal keys, its own null-caption length). Loaded values
must equal the file's bit for bit.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn
from omegaconf import open_dict

from helpers import ROOT, compose_cfg
from opensora.model import STDiT
from opensora.model.pretrained import CheckpointMismatchError, UnsafeCheckpointError, load_pretrained

TINY = dict(input_size=(2, 4, 4), in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=4,
            caption_channels=16, model_max_length=8)
RECOMPUTED = ("pos_embed", "pos_embed_temporal")


def tiny(**kw):
    return STDiT(**{**TINY, **kw})


def params_of(model) -> dict[str, np.ndarray]:
    return {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}


def original_state(model, seed=0) -> dict[str, np.ndarray]:
    """A state dict as the torch STDiT saves it: every parameter under its key, random values, plus
    the pos_embed / pos_embed_temporal buffers."""
    rng = np.random.default_rng(seed)
    sd = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in model.parameters_and_names()}
    sd["pos_embed"] = rng.standard_normal((1, 4, TINY["hidden_size"])).astype(np.float32)
    sd["pos_embed_temporal"] = rng.standard_normal((1, 2, TINY["hidden_size"])).astype(np.float32)
    return sd


def torch_save(obj, path):
    torch = pytest.importorskip("torch")

    def conv(v):
        return {k: conv(x) for k, x in v.items()} if isinstance(v, dict) else torch.from_numpy(np.array(v))

    torch.save(conv(obj), str(path))
    return path


def assert_loaded(model, sd, skip=()):
    for name, value in params_of(model).items():
        if name not in skip:
            np.testing.assert_array_equal(value, sd[name], err_msg=name)


# ================================================================
# Formats
# ================================================================


def test_pth_with_original_names_loads_exactly(tmp_path):
    model = tiny()
    pe, pe_t = model.pos_embed.asnumpy().copy(), model.pos_embed_temporal.asnumpy().copy()
    sd = original_state(model)
    report = load_pretrained(model, torch_save(sd, tmp_path / "OpenSora-v1-16x256x256.pth"))
    assert_loaded(model, sd)
    assert sorted(report.recomputed) == sorted(RECOMPUTED)
    assert not report.missing and not report.unexpected and not report.mismatched and not report.adapted
    assert len(report.loaded) == len(params_of(model))
    # the recomputed embeddings are the model's own, not the file's
    np.testing.assert_array_equal(model.pos_embed.asnumpy(), pe)
    np.testing.assert_array_equal(model.pos_embed_temporal.asnumpy(), pe_t)
    assert model.y_embedder.y_embedding.requires_grad is False  # loading keeps the buffer frozen


@pytest.mark.parametrize("wrapper,expect", [("ema", "ema"), ("state_dict", "state_dict"), ("model", "model")])
def test_pth_wrappers(tmp_path, wrapper, expect):
    model = tiny()
    ema, plain = original_state(model, 1), original_state(model, 2)
    if wrapper == "ema":
        obj = {"ema": ema, "state_dict": plain, "step": np.array(5)}
    else:
        obj = {wrapper: plain, "epoch": np.array(3)}
    report = load_pretrained(model, torch_save(obj, tmp_path / "w.pth"))
    assert report.entry == expect
    assert_loaded(model, ema if wrapper == "ema" else plain)


def test_pth_ema_not_used_when_asked(tmp_path):
    model = tiny()
    ema, plain = original_state(model, 1), original_state(model, 2)
    report = load_pretrained(model, torch_save({"ema": ema, "state_dict": plain}, tmp_path / "w.pth"), use_ema=False)
    assert report.entry == "state_dict"
    assert_loaded(model, plain)


def test_safetensors_with_fp16_and_bf16_tensors(tmp_path):
    from safetensors.numpy import save_file

    model = tiny()
    sd = original_state(model)
    sd["t_block.1.weight"] = sd["t_block.1.weight"].astype(np.float16)
    save_file(sd, str(tmp_path / "m.safetensors"))
    load_pretrained(model, tmp_path / "m.safetensors")
    assert_loaded(model, {k: v.astype(np.float32) for k, v in sd.items()})

    # bf16 (written by torch): exactly representable values come back unchanged
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    bf = {k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in sd.items()}
    save_torch(bf, str(tmp_path / "bf16.safetensors"))
    load_pretrained(model, tmp_path / "bf16.safetensors")
    assert_loaded(model, {k: v.float().numpy() for k, v in bf.items()})


@pytest.mark.parametrize("prefix", ["", "module."])
def test_mindspore_ckpt(tmp_path, prefix):
    model = tiny()
    sd = original_state(model)
    ms.save_checkpoint([{"name": prefix + k, "data": ms.Tensor(v)} for k, v in sd.items()], str(tmp_path / "m.ckpt"))
    report = load_pretrained(model, tmp_path / "m.ckpt")
    assert_loaded(model, sd)
    assert report.entry == prefix.rstrip(".")


def test_flat_file_prefers_ema_prefix(tmp_path):
    model = tiny()
    ema, plain = original_state(model, 1), original_state(model, 2)
    entries = [{"name": k, "data": ms.Tensor(v)} for k, v in plain.items()]
    entries += [{"name": "ema." + k, "data": ms.Tensor(v)} for k, v in ema.items()]
    ms.save_checkpoint(entries, str(tmp_path / "m.ckpt"))
    assert load_pretrained(model, tmp_path / "m.ckpt").entry == "ema"
    assert_loaded(model, ema)
    load_pretrained(model, tmp_path / "m.ckpt", use_ema=False)
    assert_loaded(model, plain)


# ================================================================
# PixArt initialisation, reports, refusals
# ================================================================


def pixart_state(model, seed=3):
    """PixArt-XL-2 layout: 2-D patch conv, no temporal attention, a 6-row null caption (model has 8),
    pos_embed, and a key STDiT has no place for."""
    sd = original_state(model, seed)
    for k in [k for k in sd if "attn_temp" in k or k == "pos_embed_temporal"]:
        del sd[k]
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][:, :, 0]  # [C, in, 2, 2]
    sd["y_embedder.y_embedding"] = sd["y_embedder.y_embedding"][:6]
    sd["ar_embedder.mlp.0.weight"] = np.ones((32, 256), np.float32)
    return sd


def test_pixart_file_initialises_spatial_parts_only(tmp_path, caplog):
    model = tiny()
    before = params_of(model)
    sd = pixart_state(model)
    with caplog.at_level(logging.INFO, logger="opensora.model.pretrained"):
        report = load_pretrained(model, torch_save({"state_dict": sd}, tmp_path / "PixArt-XL-2-512x512.pth"))
    after = params_of(model)
    temporal = sorted(n for n in after if "attn_temp" in n)
    assert temporal and sorted(report.missing) == temporal
    for n in temporal:  # left at initialisation (proj zero, qkv xavier)
        np.testing.assert_array_equal(after[n], before[n])
    assert_loaded(model, sd, skip=temporal + ["x_embedder.proj.weight", "y_embedder.y_embedding"])
    # patch conv: time axis added
    np.testing.assert_array_equal(after["x_embedder.proj.weight"], sd["x_embedder.proj.weight"][:, :, None])
    # null caption: 6 rows extended to 8 by repeating the last
    y = after["y_embedder.y_embedding"]
    np.testing.assert_array_equal(y[:6], sd["y_embedder.y_embedding"])
    np.testing.assert_array_equal(y[6:], np.repeat(sd["y_embedder.y_embedding"][-1:], 2, axis=0))
    assert report.unexpected == ["ar_embedder.mlp.0.weight"]
    assert report.recomputed == ["pos_embed"]
    assert len(report.adapted) == 2
    text = caplog.text
    assert "ar_embedder.mlp.0.weight" in text and "blocks.0.attn_temp.qkv.weight" in text
    assert "x_embedder.proj.weight: [32, 4, 2, 2] -> [32, 4, 1, 2, 2]" in text


def test_longer_null_caption_is_cut(tmp_path):
    model = tiny()
    sd = original_state(model)
    sd["y_embedder.y_embedding"] = np.random.default_rng(5).standard_normal((12, 16)).astype(np.float32)
    load_pretrained(model, torch_save(sd, tmp_path / "m.pth"))
    np.testing.assert_array_equal(model.y_embedder.y_embedding.asnumpy(), sd["y_embedder.y_embedding"][:8])


def test_partial_mismatch_is_reported_and_not_loaded(tmp_path, caplog):
    model = tiny()
    before = params_of(model)
    sd = original_state(model)
    sd["final_layer.linear.weight"] = np.zeros((7, 32), np.float32)
    del sd["blocks.1.mlp.fc1.bias"]
    with caplog.at_level(logging.WARNING, logger="opensora.model.pretrained"):
        report = load_pretrained(model, torch_save(sd, tmp_path / "m.pth"))
    assert report.mismatched == [("final_layer.linear.weight", (7, 32), (32, 32))]
    assert report.missing == ["blocks.1.mlp.fc1.bias", "final_layer.linear.weight"]
    after = params_of(model)
    for n in report.missing:
        np.testing.assert_array_equal(after[n], before[n])
    assert "final_layer.linear.weight file [7, 32], model [32, 32]" in caplog.text
    assert "blocks.1.mlp.fc1.bias" in caplog.text
    with pytest.raises(CheckpointMismatchError, match="strict"):
        load_pretrained(model, tmp_path / "m.pth", strict=True)


def test_wrong_model_file_is_refused_before_loading(tmp_path):
    model = tiny()
    before = params_of(model)
    vae = {"encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float32), "decoder.conv_out.bias": np.zeros(3)}
    vae.update({"t_block.1.bias": np.ones(6 * 32, np.float32)})  # one matching name must not be copied either
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(model, torch_save(vae, tmp_path / "vae.pth"))
    msg = str(err.value)
    assert "vae.pth" in msg and f"only 1 of its {len(before)} parameter tensors" in msg
    assert "encoder.conv_in.weight [128, 3, 3, 3]" in msg and "x_embedder.proj.weight [32, 4, 1, 2, 2]" in msg
    for n, v in params_of(model).items():
        np.testing.assert_array_equal(v, before[n])


def test_wrong_size_file_lists_shapes(tmp_path):
    big = original_state(tiny(hidden_size=64))
    big.pop("pos_embed"), big.pop("pos_embed_temporal")
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(tiny(), torch_save(big, tmp_path / "xl.pth"))
    assert "x_embedder.proj.weight: [64, 4, 1, 2, 2] -> [32, 4, 1, 2, 2]" in str(err.value)


def _touch(path):
    Path(path).touch()


class Payload:
    """Unpickling this calls _touch(marker): the proof of an unsafe load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_unsafe_pickle_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "code-ran"
    sd = {k: torch.from_numpy(v) for k, v in original_state(tiny()).items()}
    torch.save({"state_dict": sd, "extra": Payload(str(marker))}, str(tmp_path / "evil.pth"))
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True") as err:
        load_pretrained(tiny(), tmp_path / "evil.pth")
    assert "evil.pth" in str(err.value) and "_touch" in str(err.value)
    assert not marker.exists()


def test_torch_missing_names_the_fix(tmp_path, monkeypatch):
    (tmp_path / "m.pth").write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'.*task=convert"):
        load_pretrained(tiny(), tmp_path / "m.pth")


def test_unreadable_files_name_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="broken.pth could not be read as a torch checkpoint"):
        load_pretrained(tiny(), tmp_path / "broken.pth")
    torch.save([torch.zeros(2)], str(tmp_path / "list.pth"))
    with pytest.raises(CheckpointMismatchError, match="list.pth holds a list, not a dict"):
        load_pretrained(tiny(), tmp_path / "list.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointMismatchError, match="broken.safetensors is not a safetensors file"):
        load_pretrained(tiny(), tmp_path / "broken.safetensors")
    (tmp_path / "broken.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointMismatchError, match="broken.ckpt could not be read as a MindSpore checkpoint"):
        load_pretrained(tiny(), tmp_path / "broken.ckpt")


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format '.npz'"):
        load_pretrained(tiny(), tmp_path / "m.npz")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(tiny(), tmp_path / "nope.pth")


def test_sample_task_loads_original_files(tmp_path):
    from opensora.tasks.sample import load_model_weights

    model = tiny()
    sd = original_state(model)
    assert load_model_weights(model, str(torch_save({"ema": sd}, tmp_path / "m.pth"))) == str(tmp_path / "m.pth")
    assert_loaded(model, sd)


# ================================================================
# build_model and the convert task
# ================================================================


def _convert_cfg(tmp_path, overrides):
    return compose_cfg(["task=convert", "logger=none", *overrides], tmp_path / "run")


def test_build_model_applies_model_pretrained(tmp_path):
    from opensora.tasks.common import build_model

    cfg = compose_cfg([], tmp_path)
    sd = original_state(build_model(cfg))
    cfg = compose_cfg([f"model.pretrained={torch_save(sd, tmp_path / 'm.pth')}"], tmp_path)
    assert_loaded(build_model(cfg), sd)
    fresh = params_of(build_model(cfg, with_pretrained=False))
    assert not np.array_equal(fresh["t_block.1.weight"], sd["t_block.1.weight"])


@pytest.mark.parametrize("wrapper", ["ema", "state_dict"])
def test_convert_model_round_trip_without_torch(tmp_path, wrapper):
    from opensora.tasks import convert
    from opensora.tasks.common import build_model

    cfg = compose_cfg([], tmp_path)
    model = build_model(cfg)
    sd = original_state(model)
    sd["pos_embed"] = np.zeros((1, 5, 64), np.float32)
    src = torch_save({wrapper: sd, "other": {"x": np.zeros(1)}}, tmp_path / "orig.pth")
    out = tmp_path / "models" / "stdit.ckpt"
    cfg = _convert_cfg(tmp_path, [f"model.pretrained={src}", f"task.output={out}"])
    assert convert.run(cfg) == {"convert/tensors": len(params_of(model))}
    saved = ms.load_checkpoint(str(out))
    assert set(saved) == set(params_of(model))
    for k, v in saved.items():
        np.testing.assert_array_equal(v.asnumpy(), sd[k], err_msg=k)

    # the .ckpt loads in a process where torch cannot be imported
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, mindspore as ms\n"
        "from helpers import compose_cfg\n"
        "from opensora.tasks.common import build_model\n"
        f"cfg = compose_cfg(['model.pretrained={out}'], {str(tmp_path)!r})\n"
        "m = build_model(cfg)\n"
        f"np.savez({str(tmp_path / 'loaded.npz')!r}, **{{n: p.asnumpy() for n, p in m.parameters_and_names()}})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "tests", timeout=120)
    loaded = np.load(tmp_path / "loaded.npz")
    assert set(loaded.files) == set(params_of(model))
    for k in loaded.files:
        np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)


def test_convert_pixart_leaves_temporal_parts_out(tmp_path):
    from opensora.tasks import convert

    model = tiny()
    sd = pixart_state(model)
    src = torch_save({"state_dict": sd}, tmp_path / "PixArt.pth")
    shape = [f"model.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in TINY.items()]
    cfg = _convert_cfg(tmp_path, [f"model.pretrained={src}", f"task.output={tmp_path / 'p.ckpt'}", *shape])
    convert.run(cfg)
    saved = ms.load_checkpoint(str(tmp_path / "p.ckpt"))
    assert not any("attn_temp" in k for k in saved)
    assert saved["x_embedder.proj.weight"].shape == (32, 4, 1, 2, 2)
    assert saved["y_embedder.y_embedding"].shape == (8, 16)


def test_convert_rejects_bad_requests(tmp_path):
    from opensora.tasks import convert

    with pytest.raises(ValueError, match="model.pretrained"):
        convert.run(_convert_cfg(tmp_path, [f"task.output={tmp_path / 'a.ckpt'}"]))
    with pytest.raises(ValueError, match=r"name it \*\.ckpt"):
        convert.run(_convert_cfg(tmp_path, [f"task.output={tmp_path / 'a.pth'}"]))
    from hydra.errors import ConfigCompositionException  # the typed task section refuses it at compose time

    with pytest.raises(ConfigCompositionException, match="unet"):
        _convert_cfg(tmp_path, ["task.component=unet", f"task.output={tmp_path / 'a.ckpt'}"])
    with pytest.raises(ValueError, match="no MindSpore weights"):
        convert.run(_convert_cfg(tmp_path, ["task.component=vae", f"task.output={tmp_path / 'a.ckpt'}"]))


def test_convert_text_encoder_round_trip(tmp_path, caplog):
    from opensora.tasks import convert
    from opensora.text_encoder import T5Embedder, train_sentencepiece

    captions = [f"a {c} {s} moving {d}" for c in ("red", "blue") for s in ("square", "circle") for d in ("up", "left")]
    spiece = train_sentencepiece(captions, str(tmp_path / "tok"), vocab_size=40)
    src = tmp_path / "t5"
    T5Embedder(config=dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4),
               tokenizer_path=spiece, model_max_length=8, seed=3).save_pretrained(str(src))
    out = tmp_path / "t5-ms" / "model.ckpt"
    common = ["text_encoder=t5_folder", "text_encoder.model_max_length=8", "task.component=text_encoder"]
    with pytest.raises(ValueError, match="model.ckpt"):
        convert.run(_convert_cfg(tmp_path, [*common, f"text_encoder.from_pretrained={src}",
                                            f"task.output={tmp_path / 't5.ckpt'}"]))
    with caplog.at_level(logging.INFO, logger="opensora.tasks.convert"):
        n = convert.run(_convert_cfg(tmp_path, [*common, f"text_encoder.from_pretrained={src}", f"task.output={out}"]))["convert/tensors"]
    assert f"verified: T5 encoder loaded from {out.parent}" in caplog.text
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", "model.ckpt", "spiece.model",
                                                           "tokenizer_config.json"]
    a = T5Embedder(from_pretrained=str(src), model_max_length=8, clean_caption=False)
    b = T5Embedder(from_pretrained=str(out.parent), model_max_length=8, clean_caption=False)
    assert b.load_report.files == [str(out)] and not b.load_report.missing
    pa, pb = params_of(a.model), params_of(b.model)
    assert n == len(pa) and set(pa) == set(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    ya, yb = a.encode(captions[:3]), b.encode(captions[:3])
    np.testing.assert_array_equal(ya["mask"], yb["mask"])
    np.testing.assert_array_equal(ya["y"], yb["y"])


class TinyVAE:
    """Stand-in for a VAE wrapper whose `.module` is the MindSpore cell."""

    def __init__(self, latent_channels=4, downsample=8):
        self.latent_channels, self.downsample = latent_channels, downsample
        ms.set_seed(0)
        self.module = nn.SequentialCell(nn.Conv2d(3, 8, 3, has_bias=True), nn.Dense(8, 4))


def test_convert_vae_module(tmp_path):
    from opensora.tasks import convert

    out = tmp_path / "vae.ckpt"
    cfg = _convert_cfg(tmp_path, ["task.component=vae", f"task.output={out}"])
    with open_dict(cfg):
        cfg.vae = {"_target_": f"{__name__}.TinyVAE", "latent_channels": 4, "downsample": 1}
    assert convert.run(cfg) == {"convert/tensors": 4}
    ref = dict(TinyVAE().module.parameters_and_names())
    saved = ms.load_checkpoint(str(out))
    assert set(saved) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(saved[k].asnumpy(), ref[k].asnumpy())


def test_convert_verification_detects_a_changed_tensor():
    from opensora.tasks.convert import compare, digest

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    saved = {"w": digest(a)}
    compare(saved, {"w": a.copy()}, "same")
    b = a.copy()
    b[1, 2] = np.nextafter(b[1, 2], np.float32(10))  # one ulp
    with pytest.raises(RuntimeError, match="1 tensors differ"):
        compare(saved, {"w": b}, "changed")
    with pytest.raises(RuntimeError, match="did not load back"):
        compare(saved, {}, "empty")
    with pytest.raises(RuntimeError, match="differ"):
        compare(saved, {"w": a.astype(np.float64)}, "dtype")


@pytest.mark.slow
def test_convert_cli(tmp_path):
    """`python run.py task=convert ...` as a user types it, then the .ckpt as model.pretrained of a run."""
    from opensora.tasks.common import build_model

    model = build_model(compose_cfg([], tmp_path))
    sd = original_state(model)
    src = torch_save({"ema": sd}, tmp_path / "orig.pth")
    out = tmp_path / "stdit.ckpt"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "task=convert", f"model.pretrained={src}",
                           f"task.output={out}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PROJECT_ROOT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"converted model: {len(sd) - 2} tensors -> {out}" in proc.stdout
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()
    assert "verified: model loaded from" in (tmp_path / "run" / "run.log").read_text()
    assert_loaded(build_model(compose_cfg([f"model.pretrained={out}"], tmp_path)), sd)


def test_convert_sd_vae_round_trip(tmp_path, caplog):
    from opensora.tasks import convert

    sd_vae = pytest.importorskip("opensora.vae.sd_vae")
    tiny_vae = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                    latent_channels=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2)
    out = tmp_path / "vae" / "sd-vae.ckpt"
    cfg = _convert_cfg(tmp_path, ["task.component=vae", f"task.output={out}"])
    with open_dict(cfg):
        cfg.vae = {"_target_": "opensora.vae.sd_vae.VideoAutoencoderKL", "config": tiny_vae, "seed": 1,
                   "latent_channels": 4, "downsample": [1, 2, 2]}
    with caplog.at_level(logging.INFO, logger="opensora.tasks.convert"):
        n = convert.run(cfg)["convert/tensors"]
    assert f"verified: VAE loaded from {out}" in caplog.text  # VideoAutoencoderKL(from_pretrained=out)
    assert (out.parent / "config.json").is_file()
    ref = params_of(sd_vae.VideoAutoencoderKL(config=tiny_vae, seed=1).module)
    loaded = params_of(sd_vae.VideoAutoencoderKL(from_pretrained=str(out)).module)
    assert n == len(ref) and set(loaded) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(loaded[k], ref[k], err_msg=k)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"d_model": 8}')
    cfg.task.output = str(tmp_path / "other" / "v.ckpt")
    with pytest.raises(FileExistsError, match="not this VAE's config"):
        convert.run(cfg)
    assert not (tmp_path / "other" / "v.ckpt").exists()
