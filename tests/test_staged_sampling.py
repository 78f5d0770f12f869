"""Inference recipes (conf/experiment/sample_*.yaml) and staged sampling: text embeddings cached by
task=embed_text, task=sample reading them and saving latents, task=decode turning latents into videos.

Fast tests compose the recipes and run single stages in-process on a tiny STDiT; the slow ones run the
CLI: a staged run must give the videos of a one-shot run with the same seed.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import CONF, ROOT, compose_cfg

RECIPES = {
    # name: (latent input_size, space_scale, time_scale, fps, precision, flash attention, weights file)
    "sample_16x256x256": ([16, 32, 32], 0.5, 1.0, 8, "fp32", False, "OpenSora-v1-HQ-16x256x256.pth"),
    "sample_16x512x512": ([16, 64, 64], 1.0, 1.0, 8, "fp32", False, "OpenSora-v1-HQ-16x512x512.pth"),
    "sample_64x512x512": ([64, 64, 64], 1.0, 2 / 3, 12, "bf16", True, "OpenSora-v1-HQ-16x512x512.pth"),
}
PROMPT_FILE = ROOT / "assets" / "texts" / "t2v_samples.txt"

# The tiny stand-ins: a 16-wide T5 with 8 tokens, STDiT with hidden 32 and one block, 4 frames of 8x8 pixels.
T5_DIM, T5_LEN = 16, 8
CAPTIONS = [f"a {c} {s} moving {d}" for c in ("red", "green", "blue", "yellow") for s in ("square", "circle")
            for d in ("left", "right")]


def tiny_overrides(assets: Path) -> list[str]:
    """Shrink a recipe to the tiny models; everything else (scales, CFG, steps' schedule, seed) stays.
    clip_denoised keeps the samples of the random tiny model inside [-1, 1] (they would saturate)."""
    return ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", f"model.caption_channels={T5_DIM}",
            f"model.model_max_length={T5_LEN}", f"model.pretrained={assets / 'stdit.ckpt'}",
            "data.num_frames=4", "data.image_size=8", "vae=identity",
            f"text_encoder.from_pretrained={assets / 't5'}", f"text_encoder.output_dim={T5_DIM}",
            f"text_encoder.model_max_length={T5_LEN}", "scheduler.num_sampling_steps=3",
            "scheduler.clip_denoised=true", "precision=fp32", f"data.prompt_file={PROMPT_FILE}"]


def write_text_cache(folder: Path, t5_folder: Path, prompts: list[str]) -> None:
    """What task=embed_text writes, built here with the cache functions."""
    from opensora.data.cache import save_text_embedding, text_cache_settings, write_index, write_meta
    from opensora.text_encoder import T5Embedder

    emb = T5Embedder(from_pretrained=str(t5_folder), model_max_length=T5_LEN, clean_caption=True).encode(prompts)
    for i in range(len(prompts)):
        save_text_embedding(folder / f"{i:06d}.npz", emb["y"][i, 0], emb["mask"][i])
    write_index(folder, pd.DataFrame({"caption": prompts, "path": [f"{i:06d}.npz" for i in range(len(prompts))]}))
    write_meta(folder, "text", text_cache_settings({"from_pretrained": str(t5_folder), "model_max_length": T5_LEN,
                                                    "output_dim": T5_DIM, "clean_caption": True}))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny T5 folder (HF layout), a tiny STDiT .ckpt with every weight perturbed (so the output depends on
    the caption), and the embeddings of the recipe prompts (for the in-process tests)."""
    import mindspore as ms

    from opensora.model import STDiT
    from opensora.text_encoder import T5Embedder, train_sentencepiece

    out = tmp_path_factory.mktemp("assets")
    spiece = train_sentencepiece(CAPTIONS, str(out / "tok"), vocab_size=64)
    t5 = T5Embedder(config=dict(vocab_size=64, d_model=T5_DIM, d_kv=4, d_ff=32, num_layers=2, num_heads=4),
                    tokenizer_path=spiece, model_max_length=T5_LEN, clean_caption=False)
    t5.save_pretrained(str(out / "t5"))
    model = STDiT(input_size=(4, 8, 8), in_channels=3, hidden_size=32, depth=1, num_heads=2,
                  caption_channels=T5_DIM, model_max_length=T5_LEN)
    rng = np.random.default_rng(0)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(p.asnumpy() + 0.05 * rng.standard_normal(p.shape)
                                                      .astype(np.float32))}
                        for n, p in model.parameters_and_names()], str(out / "stdit.ckpt"))
    prompts = [line.strip() for line in PROMPT_FILE.read_text().splitlines() if line.strip()]
    write_text_cache(out / "embeds", out / "t5", prompts)
    return out


# ================================================================
# Recipes
# ================================================================


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_composes_to_the_original_settings(name, tmp_path):
    from hydra.utils import instantiate

    input_size, space, time, fps, dtype, flash, weights = RECIPES[name]
    cfg = compose_cfg([f"experiment={name}", "paths.pretrained_dir=/weights"], tmp_path)
    assert cfg.task._target_ == "opensora.tasks.sample.run" and cfg.seed == 42
    m = cfg.model
    assert list(m.input_size) == input_size and m.in_channels == 4 and list(m.patch_size) == [1, 2, 2]
    assert (m.hidden_size, m.depth, m.num_heads, m.caption_channels, m.model_max_length) == (1152, 28, 16, 4096, 120)
    assert m.space_scale == space and m.time_scale == pytest.approx(time, abs=1e-12)
    assert m.enable_flashattn is flash and m.dtype == dtype == cfg.precision.dtype
    # Only paths.pretrained_dir points at the downloads.
    assert m.pretrained == f"/weights/{weights}" and cfg.task.ckpt_path == m.pretrained
    assert cfg.text_encoder.from_pretrained == "/weights/t5-v1_1-xxl"
    assert cfg.vae.from_pretrained == "/weights/sd-vae-ft-ema"
    assert cfg.text_encoder._target_ == "opensora.text_encoder.T5Embedder" and cfg.text_encoder.clean_caption
    assert (cfg.text_encoder.output_dim, cfg.text_encoder.model_max_length) == (4096, 120)
    assert cfg.vae._target_ == "opensora.vae.VideoAutoencoderKL" and cfg.vae.scale_factor == 0.18215
    assert list(cfg.vae.downsample) == [1, 8, 8] and cfg.vae.micro_batch_size == 16
    s = cfg.scheduler
    assert (s.num_sampling_steps, s.cfg_scale, s.cfg_channel, s.sampler._target_) == (
        100, 7.0, 3, "opensora.scheduler.samplers.AncestralSampler")
    assert not s.clip_denoised and not s.predict_xstart
    assert len(instantiate(s).timestep_map) == 100
    assert cfg.task.fps == fps == cfg.data.fps and cfg.task.batch_size == 1
    assert cfg.task.prompt_file.endswith("assets/texts/t2v_samples.txt") and cfg.data.prompt_file == cfg.task.prompt_file
    assert len([ln for ln in PROMPT_FILE.read_text().splitlines() if ln.strip()]) == 10
    header = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert f"#   python run.py experiment={name}" in header


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_staged_commands_of_a_recipe_compose(name, tmp_path):
    cfg = compose_cfg([f"experiment={name}", "task.text_embed_folder=E", "task.save_latents=true"], tmp_path)
    assert cfg.task._target_ == "opensora.tasks.sample.run" and cfg.task.save_latents
    cfg = compose_cfg([f"experiment={name}", "task=decode", "task.latents_dir=L"], tmp_path)
    # the frame rate the sample stage recorded with its latents (task.fps=N would override it)
    assert cfg.task._target_ == "opensora.tasks.decode.run" and cfg.task.fps is None
    assert cfg.vae._target_ == "opensora.vae.VideoAutoencoderKL"
    cfg = compose_cfg([f"experiment={name}", "task=embed_text", "task.output_dir=E"], tmp_path)
    assert cfg.task._target_ == "opensora.tasks.embed_text.run" and cfg.task.prompt_file.endswith("t2v_samples.txt")
    assert cfg.text_encoder.from_pretrained.endswith("t5-v1_1-xxl")


# ================================================================
# Cached text embeddings (task=sample task.text_embed_folder=...)
# ================================================================


def _text_cache(folder: Path, captions, shape=(T5_LEN, T5_DIM), kind="text", settings=None):
    from opensora.data.cache import save_text_embedding, write_index, write_meta

    rng = np.random.default_rng(1)
    for i, _ in enumerate(captions):
        save_text_embedding(folder / f"{i}.npz", rng.standard_normal(shape), (np.arange(shape[0]) < 3 + i))
    write_index(folder, pd.DataFrame({"caption": captions, "path": [f"{i}.npz" for i in range(len(captions))]}))
    write_meta(folder, kind, settings or {})


def test_cached_embeddings_encode_like_a_text_encoder(tmp_path):
    from opensora.data.cache import load_text_embedding
    from opensora.tasks.sample import CachedTextEmbeddings

    _text_cache(tmp_path, ["a", "b", "c"])
    cache = CachedTextEmbeddings(str(tmp_path), caption_channels=T5_DIM, model_max_length=T5_LEN)
    assert cache.select(None, None) == ["a", "b", "c"]
    assert cache.select(["c", "a"], None) == ["c", "a"]
    out = cache.encode(["c", "a", "a"])
    assert out["y"].shape == (3, 1, T5_LEN, T5_DIM) and out["mask"].shape == (3, T5_LEN)
    assert out["mask"].dtype == np.int32 and out["mask"].sum(1).tolist() == [5, 3, 3]
    np.testing.assert_array_equal(out["y"][0, 0], load_text_embedding(tmp_path / "2.npz")[0])
    with pytest.raises(KeyError, match=r"1 of 2 prompts have no embedding.*'zzz'"):
        cache.select(["a", "zzz"], None)


def test_cached_embeddings_for_another_model_fail_clearly(tmp_path):
    from opensora.tasks.sample import CachedTextEmbeddings

    _text_cache(tmp_path / "wide", ["a"], shape=(T5_LEN, 4096))
    with pytest.raises(ValueError, match=r"0\.npz: text embedding of shape \[8, 4096\].*caption_channels=16"):
        CachedTextEmbeddings(str(tmp_path / "wide"), caption_channels=T5_DIM, model_max_length=T5_LEN)
    _text_cache(tmp_path / "video", ["a"], kind="video")
    with pytest.raises(ValueError, match="is a 'video' cache, expected a 'text' cache"):
        CachedTextEmbeddings(str(tmp_path / "video"), caption_channels=T5_DIM, model_max_length=T5_LEN)
    with pytest.raises(FileNotFoundError, match=r"task.text_embed_folder=.*nope does not exist.*task=embed_text"):
        CachedTextEmbeddings(str(tmp_path / "nope"), caption_channels=T5_DIM, model_max_length=T5_LEN)
    # Recorded settings differ from the configured text encoder's (e.g. caption cleaning).
    _text_cache(tmp_path / "ok", ["a"], settings={"clean_caption": False})
    with pytest.raises(ValueError, match=r"different settings \(clean_caption: cache False vs config True\)"):
        CachedTextEmbeddings(str(tmp_path / "ok"), caption_channels=T5_DIM, model_max_length=T5_LEN,
                             settings={"clean_caption": True})


def test_sample_stage_builds_neither_text_encoder_nor_vae(assets, tmp_path):
    """In-process task=sample on cached embeddings with save_latents: the text encoder and VAE targets are
    made unimportable, so building either would fail."""
    from opensora.data.cache import load_video_latent, read_index, read_meta
    from opensora.tasks.sample import run

    prompts = [ln.strip() for ln in PROMPT_FILE.read_text().splitlines() if ln.strip()]
    cfg = compose_cfg(["experiment=sample_16x256x256", *tiny_overrides(assets), "logger=none",
                       f"task.text_embed_folder={assets / 'embeds'}", "task.save_latents=true",
                       "task.prompt_file=null", "text_encoder._target_=no.such.TextEncoder",
                       "vae._target_=no.such.VAE"], tmp_path)
    cfg.task.prompts = [prompts[3], prompts[1]]  # looked up in the cache (commas: not a CLI list)
    run(cfg)
    folder = tmp_path / "latents"
    index = read_index(folder)
    assert index["caption"].tolist() == [prompts[3], prompts[1]]
    assert index["path"].tolist() == ["000000.npz", "000001.npz"]
    z = load_video_latent(folder / "000000.npz")
    assert z.shape == (3, 4, 8, 8) and np.isfinite(z).all() and np.abs(z).max() <= 1.0 + 1e-6
    meta = read_meta(folder)
    assert meta["kind"] == "video" and meta["settings"]["latent_shape"] == [3, 4, 8, 8]
    assert meta["settings"]["fps"] == 8 and meta["settings"]["seed"] == 42
    assert meta["settings"]["text_embed_folder"] == str(assets / "embeds")
    assert not (tmp_path / "samples").exists()


def test_sample_stage_refuses_evaluate_without_decoding(tmp_path):
    from opensora.tasks.sample import run

    cfg = compose_cfg(["task=sample", "task.ckpt_path=x", "task.save_latents=true", "task.evaluate=true"], tmp_path)
    with pytest.raises(ValueError, match="evaluate in task=decode"):
        run(cfg)


# ================================================================
# Decode (task=decode)
# ================================================================


def _latents(folder: Path, n: int, vae: dict, fps: int = 5):
    from opensora.tasks.sample import write_latents

    rng = np.random.default_rng(2)
    # A flat colour per video and frame (mp4's 4:2:0 chroma blurs pixel noise, not flat colours).
    z = [np.broadcast_to(rng.uniform(-0.9, 0.9, (3, 4, 1, 1)), (3, 4, 8, 8)).astype(np.float32) for _ in range(n)]
    write_latents(folder, z, [f"prompt {i}" for i in range(n)], {"vae": vae, "fps": fps, "upscale": 1})
    return z


IDENTITY = {"_target_": "opensora.vae.IdentityVAE", "latent_channels": 3, "downsample": 1}


def test_decode_builds_only_the_vae_and_uses_the_recorded_fps(tmp_path):
    import imageio_ffmpeg

    from opensora.tasks.decode import run
    from opensora.utils.video_io import read_video, to_uint8_frames

    z = _latents(tmp_path / "latents", 3, IDENTITY, fps=5)
    cfg = compose_cfg(["task=decode", f"task.latents_dir={tmp_path / 'latents'}", "task.batch_size=2", "logger=none",
                       "vae=identity", "model._target_=no.such.Model", "text_encoder._target_=no.such.TextEncoder"],
                      tmp_path / "run")
    run(cfg)
    samples = tmp_path / "run" / "samples"
    videos = sorted(samples.glob("*.mp4"))
    assert [v.name for v in videos] == ["000-prompt-0.mp4", "001-prompt-1.mp4", "002-prompt-2.mp4"]
    assert (samples / "grid.gif").is_file()
    for v, latent in zip(videos, z):
        frames = read_video(v).astype(int)  # mp4 (crf 12) of the identity decode of the latent
        assert np.abs(frames - to_uint8_frames(latent).astype(int)).max() <= 3
    reader = imageio_ffmpeg.read_frames(str(videos[0]))
    assert next(reader)["fps"] == 5
    reader.close()


def test_decode_refuses_latents_of_another_vae(tmp_path, caplog):
    from omegaconf import OmegaConf

    from opensora.tasks.decode import check_latents_meta

    vae = OmegaConf.create(IDENTITY)
    _latents(tmp_path / "a", 1, {**IDENTITY, "latent_channels": 4})
    with pytest.raises(ValueError, match=r"sampled for another VAE \(vae.latent_channels: latents 4 vs config 3\)"):
        check_latents_meta(tmp_path / "a", vae)
    _latents(tmp_path / "b", 1, {**IDENTITY, "from_pretrained": "/elsewhere"})
    with caplog.at_level(logging.WARNING):
        assert check_latents_meta(tmp_path / "b", vae)["fps"] == 5
    assert "vae.from_pretrained differs" in caplog.text
    with pytest.raises(FileNotFoundError, match="task.latents_dir=.*nope does not exist"):
        check_latents_meta(tmp_path / "nope", vae)


def test_decode_batches_group_equal_shapes():
    from opensora.tasks.decode import _batches

    shapes = [(4, 2), (4, 2), (4, 2), (4, 1), (4, 2)]
    assert list(_batches(shapes, 2)) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert list(_batches(shapes, 8)) == [(0, 3), (3, 4), (4, 5)]


# ================================================================
# End to end through the CLI
# ================================================================


def run_cli(args, cwd: Path, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PROJECT_ROOT": str(cwd),
           "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.mark.slow
def test_staged_run_gives_the_one_shot_videos(assets, tmp_path):
    """experiment=sample_16x256x256 (tiny) one-shot vs embed_text -> sample save_latents -> decode: the same
    videos (same seed). Each stage gets the other stages' models as unimportable targets."""
    from opensora.logger.wandb import read_offline_run
    from opensora.utils.video_io import read_video

    recipe = ["experiment=sample_16x256x256", *tiny_overrides(assets)]
    run_cli([*recipe, f"hydra.run.dir={tmp_path / 'oneshot'}"], tmp_path)

    embeds = tmp_path / "embeds"
    run_cli([*recipe, "task=embed_text", f"task.output_dir={embeds}", "model._target_=no.such.Model",
             "vae._target_=no.such.VAE", f"hydra.run.dir={tmp_path / 'embed'}"], tmp_path)
    run_cli([*recipe, f"task.text_embed_folder={embeds}", "task.save_latents=true",
             "text_encoder._target_=no.such.TextEncoder", f"hydra.run.dir={tmp_path / 'latents'}"], tmp_path)
    run_cli([*recipe, "task=decode", f"task.latents_dir={tmp_path / 'latents' / 'latents'}",
             "model._target_=no.such.Model", "text_encoder._target_=no.such.TextEncoder",
             f"hydra.run.dir={tmp_path / 'decode'}"], tmp_path)

    one = sorted((tmp_path / "oneshot" / "samples").glob("*.mp4"))
    staged = sorted((tmp_path / "decode" / "samples").glob("*.mp4"))
    assert len(one) == 10 and [p.name for p in staged] == [p.name for p in one]
    first = read_video(one[0]).astype(int)
    for a, b in zip(one, staged):
        fa, fb = read_video(a).astype(int), read_video(b).astype(int)
        assert fa.shape == (4, 8, 8, 3)
        # Same numbers up to T5 batching noise (~1e-6): identical uint8 frames but for rare rounding flips.
        assert np.abs(fa - fb).max() <= 2 and (fa != fb).mean() < 0.01, a.name
    assert np.abs(read_video(one[1]).astype(int) - first).mean() > 10  # different prompts, different videos
    assert json.loads((tmp_path / "decode" / "samples" / "prompts.json").read_text()) == \
        json.loads((tmp_path / "oneshot" / "samples" / "prompts.json").read_text())
    # The decode stage logs its videos to W&B like task=sample does.
    runs = list((tmp_path / "decode" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = read_offline_run(str(runs[0]))["history"]
    assert sum("samples/video/path" in h for h in history) == 10 and any("samples/grid/path" in h for h in history)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sample_16x512x512", "sample_64x512x512"])
def test_recipe_runs_end_to_end_at_tiny_size(name, assets, tmp_path):
    from opensora.utils.video_io import read_video

    run_cli([f"experiment={name}", *tiny_overrides(assets), "task.prompts=[a red square moving left]",
             "task.prompt_file=null", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    videos = sorted((tmp_path / "run" / "samples").glob("*.mp4"))
    assert [v.name for v in videos] == ["000-a-red-square-moving-left.mp4"]
    assert read_video(videos[0]).shape == (4, 8, 8, 3)
