"""Training through a sampling VAE (vae=sd_vae_ft_ema with sample_posterior, as Open-Sora encodes): the posterior
noise is part of the training state - drawn on the host for the global batch from the train RNG, sliced per rank,
restored on resume. So (slow) 2 data-parallel ranks equal one process on the global batch, and a run resumed from
a mid-run checkpoint equals the uninterrupted one. A tiny random SD-layout VAE (2 blocks: downsample 2) stands in
for sd-vae-ft-ema."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import ROOT, assert_same_training_state, msrun_output, run_cli, run_msrun
from opensora.train.batch import draw_posterior, model_inputs, posterior_shape

TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    from opensora.vae import VideoAutoencoderKL

    path = tmp_path_factory.mktemp("vae") / "tiny-sd-vae.ckpt"
    VideoAutoencoderKL(config=TINY_VAE, seed=3).save_checkpoint(path)  # writes config.json beside it
    return path


def test_posterior_noise_is_drawn_for_the_global_batch_and_sliced_per_rank(vae_file):
    from opensora.parallel.strategy import global_rows
    from opensora.vae import VideoAutoencoderKL

    vae = VideoAutoencoderKL(from_pretrained=str(vae_file), sample_posterior=True)
    video = np.random.default_rng(0).uniform(-1, 1, (4, 3, 2, 8, 8)).astype(np.float32)
    assert posterior_shape(vae, video.shape) == (4, 4, 2, 4, 4)
    assert posterior_shape(VideoAutoencoderKL(from_pretrained=str(vae_file)), video.shape) is None  # the mean
    noise = draw_posterior(np.random.default_rng(5), vae, {"video": video[:2]}, world_batch=4)
    assert noise.shape == (4, 4, 2, 4, 4)
    whole, _ = model_inputs({"video": video, "caption": ["a"] * 4}, vae, _NoText(), noise)
    halves = [model_inputs({"video": video[r * 2:(r + 1) * 2], "caption": ["a"] * 2}, vae, _NoText(),
                           global_rows(noise, r, 2))[0] for r in range(2)]
    # the same per-sample maths on 2 samples or 4: equal to fp32 rounding of the conv kernels
    np.testing.assert_allclose(np.concatenate(halves), whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    mean = vae.latent_dist(video).mean * vae.scale_factor
    assert np.abs(whole - mean).max() > 1e-3  # it did sample


class _NoText:
    def encode(self, captions):
        return {"y": np.zeros((len(captions), 1, 1, 1), np.float32), "mask": np.ones((len(captions), 1), np.int32)}


def _args(vae_file):
    return ["vae=sd_vae_ft_ema", f"vae.from_pretrained={vae_file}", "vae.downsample=[1,2,2]", "vae.micro_batch_size=4",
            "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=[1,2,2]",
            "model.class_dropout_prob=0.5", "data.num_frames=2", "data.image_size=8", "data.dataset.speed=1",
            "data.dataset.num_samples=64", "task.eval=null", "task.log_every=1", "optim/lr_schedule=constant",
            "logger=none"]


@pytest.mark.alone
@pytest.mark.slow
def test_data_parallel_through_a_sampling_vae_equals_one_process(vae_file, tmp_path):
    args = [*_args(vae_file), "task.max_steps=3", "task.ckpt_every=3"]
    proc, logs = run_msrun([str(ROOT / "run.py"), "parallel=data", "data.batch_size=2", *args], tmp_path)
    assert proc.returncode == 0, msrun_output(proc, logs)
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    single = tmp_path / "single"
    run_cli([*args, "data.batch_size=4", f"hydra.run.dir={single}"], tmp_path)
    assert_same_training_state(run / "checkpoints" / "step_000003", single / "checkpoints" / "step_000003",
                               position=12, rng=True)


@pytest.mark.slow
def test_resume_through_a_sampling_vae_equals_the_uninterrupted_run(vae_file, tmp_path):
    args = [*_args(vae_file), "data.batch_size=2", "task.max_steps=4", "task.ckpt_every=2"]
    ref = tmp_path / "ref"
    run_cli([*args, f"hydra.run.dir={ref}"], tmp_path)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    (resumed / "checkpoints" / "latest").write_text("step_000002\n")
    run_cli([f"resume={resumed}"], tmp_path)
    assert_same_training_state(resumed / "checkpoints" / "step_000004", ref / "checkpoints" / "step_000004", rng=True)
