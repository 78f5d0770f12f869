"""task=eval_vae and task=eval_clip, in process and (slow) through the CLI.

eval_vae runs a VAE whose reconstruction is the input shifted by +0.1 in [-1, 1] (+0.05 in [0, 1]), so
every unclipped frame has PSNR 10 log10(1 / 0.05^2) = 26.0206 dB and an SSIM given by its local means
alone (tests/test_metrics.py derives both); the clipped still image is checked against its MSE by hand.
eval_clip is checked against transformers' CLIPModel on the frames read back from the mp4s.
Tolerances: 1e-6 relative for PSNR/SSIM (float64 metrics of float32 frames); 1e-4 of the score scale
for CLIP scores (float32 model).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from helpers import compose_cfg, grey_clip, lpips_files, run_cli, tiny_clip, write_mp4
from opensora.config import ConfigError, validate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHIFT = 0.1
# a still image bright enough that the reconstruction clips at 1
BRIGHT = np.random.default_rng(4).integers(180, 256, (40, 36, 3), dtype=np.uint8)


class ShiftVAE:
    """A VAE that reconstructs x + 0.1 (the VAE interface of opensora/vae/identity.py)."""

    def __init__(self, latent_channels: int = 3, downsample: int = 1):
        self.latent_channels, self.downsample = latent_channels, downsample

    def encode(self, x):
        return np.asarray(x, np.float32)

    def decode(self, z):
        return np.asarray(z, np.float32) + SHIFT


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("eval_media")
    write_mp4(root / "wide.mp4", grey_clip(20, 48, 80), 24)
    write_mp4(root / "tall.mp4", grey_clip(12, 72, 40), 24)
    write_mp4(root / "short.mp4", grey_clip(3, 40, 40), 24)
    (root / "corrupt.mp4").write_bytes(b"\x00" * 3000)
    Image.fromarray(BRIGHT).save(root / "bright.png")
    pd.DataFrame({"path": ["wide.mp4", "tall.mp4", "short.mp4", "bright.png", "corrupt.mp4", "missing.mp4"],
                  "fps": ["24", "24", "24", "0", "24", "24"]}).to_csv(root / "clips.csv", index=False)
    return root


def _ref_frames(path, indices, size):
    from opensora.data.video import resize_crop
    from opensora.utils.video_io import read_video

    frames = BRIGHT[None] if str(path).endswith(".png") else read_video(path)[indices]
    return (resize_crop(frames, size).astype(np.float64) + 1) / 2  # [T, H, W, 3] in [0, 1]


def _ssim_by_hand(ref01):
    """SSIM of x vs x + 0.05 (no clipping): the mean over channels and the cropped frame of the luminance term."""
    from scipy.ndimage import gaussian_filter

    c1, vals = 0.01 ** 2, []
    for f in ref01:
        per_channel = []
        for c in range(3):
            mu = gaussian_filter(f[..., c], 1.5, truncate=3.5, mode="reflect")
            lum = (2 * mu * (mu + 0.05) + c1) / (mu ** 2 + (mu + 0.05) ** 2 + c1)
            per_channel.append(lum[5:-5, 5:-5].mean())
        vals.append(np.mean(per_channel))
    return float(np.mean(vals))


def test_eval_vae_psnr_ssim_lpips_per_clip_and_mean(media, tmp_path):
    from opensora.logger.wandb import read_offline_run
    from opensora.tasks.eval_vae import run

    _, _, alexnet, heads = lpips_files(tmp_path)
    cfg = compose_cfg(["task=eval_vae", f"task.csv_path={media / 'clips.csv'}", "vae=identity",
                       "vae._target_=test_eval_tasks.ShiftVAE", "task.num_frames=4", "task.frame_interval=2",
                       "task.image_size=32", "task.batch_size=2", "task.num_workers=1",
                       f"task.lpips.alexnet_path={alexnet}", f"task.lpips.heads_path={heads}"], tmp_path)
    metrics = run(cfg)
    mean_psnr = metrics["eval_vae/psnr"]
    table = pd.read_csv(tmp_path / "eval_vae.csv")
    table["error"] = table["error"].fillna("")
    assert table.columns.tolist() == ["path", "fps", "psnr", "ssim", "lpips", "frames", "error"]
    rows = table.set_index("path")
    for name in ("wide.mp4", "tall.mp4"):
        ref = _ref_frames(media / name, [0, 2, 4, 6], 32)
        assert rows.loc[name, "psnr"] == pytest.approx(10 * math.log10(1 / 0.05 ** 2), rel=1e-6)  # 26.0206 dB
        assert rows.loc[name, "ssim"] == pytest.approx(_ssim_by_hand(ref), rel=1e-6)
        assert rows.loc[name, "frames"] == 4
    still = _ref_frames(media / "bright.png", None, 32)
    mse = np.mean((np.minimum(still + 0.05, 1.0) - still) ** 2)  # the brightest pixels clip at 1
    assert rows.loc["bright.png", "psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6) and mse < 0.05 ** 2
    assert rows.loc["bright.png", "frames"] == 1
    assert "too short" in rows.loc["short.mp4", "error"] and "file not found" in rows.loc["missing.mp4", "error"]
    assert rows.loc["corrupt.mp4", "error"] and np.isnan(rows.loc["corrupt.mp4", "psnr"])
    good = table[table["error"] == ""]
    assert (good["lpips"] > 0).all()
    report = json.loads((tmp_path / "eval_vae.json").read_text())
    assert report["num_clips"] == 3 and report["num_failed"] == 3
    assert report["psnr"] == pytest.approx(good["psnr"].mean()) == mean_psnr
    assert report["ssim"] == pytest.approx(good["ssim"].mean())
    # logged to W&B (offline run in the run directory)
    wb = read_offline_run(str(next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))))
    assert wb["summary"]["eval_vae/psnr"] == pytest.approx(mean_psnr) and wb["summary"]["eval_vae/num_failed"] == 3


def test_eval_vae_errors(media, tmp_path):
    from opensora.tasks.eval_vae import run

    base = ["task=eval_vae", "vae=identity", "logger=none", "task.image_size=32"]
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(ValueError, match=r"no 'path' \(or 'video'\) column; it has: file"):
        run(compose_cfg([*base, f"task.csv_path={tmp_path / 'bad.csv'}"], tmp_path))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*base, f"task.csv_path={media / 'clips.csv'}", "vae=sd_vae_ft_ema",
                              f"vae.from_pretrained={tmp_path}/no_vae", f"task.lpips.alexnet_path={tmp_path}/a.pth"],
                             tmp_path))
    text = str(err.value)
    assert "vae.from_pretrained=" in text and "no_vae does not exist" in text
    assert "task.lpips.alexnet_path=" in text and "a.pth: no such file" in text
    assert "task.lpips.heads_path is not set but task.lpips.alexnet_path is" in text
    with pytest.raises(ValueError, match="SSIM needs frames of at least 11 pixels"):
        run(compose_cfg([*base, f"task.csv_path={media / 'clips.csv'}", "task.image_size=8"], tmp_path))


# ================================================================
# eval_clip
# ================================================================


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory, "vit_b32", seed=2)


PROMPTS = ["a photo of a cat", "a dog running on the beach", "a photo of a cat"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A samples folder as task=sample writes it (save_samples: mp4s + prompts.json)."""
    from opensora.tasks.common import save_samples

    rng = np.random.default_rng(5)
    # a flat colour per frame (mp4's 4:2:0 chroma blurs pixel noise, not flat colours)
    videos = [np.broadcast_to(rng.uniform(-0.9, 0.9, (3, 6, 1, 1)), (3, 6, 24, 32)).astype(np.float32)
              for _ in PROMPTS]
    folder = tmp_path_factory.mktemp("run") / "samples"
    save_samples(videos, PROMPTS, folder, fps=8, upscale=1)
    return folder


def _reference_scores(model, folder, videos, prompts, indices):
    from opensora.utils.video_io import read_video

    tok = transformers.CLIPTokenizerFast.from_pretrained(folder)
    proc = transformers.CLIPImageProcessor.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for v, p in zip(videos, prompts):
            frames = read_video(v)
            x = torch.from_numpy(proc(list(frames[indices(len(frames))]), return_tensors="np")["pixel_values"])
            img = torch.nn.functional.normalize(model.get_image_features(pixel_values=x), dim=-1)
            ids = tok([p], padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
            txt = torch.nn.functional.normalize(model.get_text_features(input_ids=ids), dim=-1)
            out.append(float(torch.clamp(100 * img @ txt[0], min=0).mean()))
    return np.array(out)


@pytest.mark.parametrize("num_frames", [None, 3])
def test_eval_clip_on_a_samples_folder(clip_folder, samples, tmp_path, num_frames):
    from opensora.tasks.eval_clip import run

    model, folder = clip_folder
    cfg = compose_cfg(["task=eval_clip", f"task.samples_dir={samples}", f"clip.from_pretrained={folder}",
                       "clip.batch_size=4", "logger=none", f"task.num_frames={'null' if num_frames is None else 3}",
                       "task.num_workers=0"], tmp_path)
    mean = run(cfg)["eval_clip/clip_score"]
    table = pd.read_csv(tmp_path / "clip_score.csv")
    assert table["text"].tolist() == PROMPTS and table["frames"].tolist() == [6 if num_frames is None else 3] * 3
    entries = json.loads((samples / "prompts.json").read_text())
    pick = (lambda n: np.arange(n)) if num_frames is None else (lambda n: np.round(np.linspace(0, n - 1, 3)).astype(int))
    want = _reference_scores(model, folder, [samples / e["video"] for e in entries], PROMPTS, pick)
    np.testing.assert_allclose(table["clip_score"], want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))
    assert want.max() > 0 and mean == pytest.approx(want.mean(), abs=1e-4 * max(1.0, np.abs(want).max()))
    report = json.loads((tmp_path / "clip_score.json").read_text())
    assert report["num_videos"] == 3 and report["num_failed"] == 0 and "max(100 * cos" in report["definition"]


def test_eval_clip_score_definition():
    from opensora.eval.clip import eos_positions  # noqa: F401 - the module imports
    from opensora.tasks.eval_clip import clip_score

    text = np.array([1.0, 0.0])
    frames = np.array([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]])  # cos 1, 0.6, -0.6 -> 100, 60, 0
    assert clip_score(frames, text) == pytest.approx((100 + 60 + 0) / 3)


def test_eval_clip_on_a_csv_counts_unreadable_videos(clip_folder, samples, tmp_path):
    from opensora.tasks.eval_clip import run

    _, folder = clip_folder
    entries = json.loads((samples / "prompts.json").read_text())
    pd.DataFrame({"video": [entries[0]["video"], "gone.mp4"], "caption": ["a cat", "a dog"], "fps": [8, 8]}).to_csv(
        samples / "list.csv", index=False)
    cfg = compose_cfg(["task=eval_clip", f"task.csv_path={samples / 'list.csv'}", f"clip.from_pretrained={folder}",
                       "logger=none", "task.num_workers=0"], tmp_path)
    run(cfg)
    table = pd.read_csv(tmp_path / "clip_score.csv", keep_default_na=False)
    assert table.columns.tolist() == ["path", "text", "fps", "clip_score", "frames", "error"]  # video,caption read as such
    assert table["error"].tolist()[0] == "" and "file not found" in table["error"].tolist()[1]
    assert json.loads((tmp_path / "clip_score.json").read_text())["num_failed"] == 1


def test_eval_clip_errors(clip_folder, samples, tmp_path):
    from opensora.tasks.eval_clip import run

    _, folder = clip_folder
    base = ["task=eval_clip", f"clip.from_pretrained={folder}", "logger=none"]
    with pytest.raises(ValueError, match="needs task.samples_dir"):
        run(compose_cfg(base, tmp_path))
    with pytest.raises(FileNotFoundError, match="has no prompts.json"):
        run(compose_cfg([*base, f"task.samples_dir={tmp_path}"], tmp_path))
    (tmp_path / "notext.csv").write_text("path\na.mp4\n")
    with pytest.raises(ValueError, match=r"no column 'text' \(needed for task=eval_clip"):
        run(compose_cfg([*base, f"task.csv_path={tmp_path / 'notext.csv'}"], tmp_path))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*base, f"task.samples_dir={tmp_path / 'nowhere'}",
                              f"clip.from_pretrained={tmp_path / 'noclip'}"], tmp_path))
    text = str(err.value)
    assert "task.samples_dir=" in text and "nowhere: no such folder" in text
    assert "clip.from_pretrained=" in text and "noclip does not exist" in text


@pytest.mark.slow
def test_eval_clip_after_a_sampling_run_through_the_cli(clip_folder, tmp_path):
    """`task=decode` (the last stage of sampling; it writes <run>/samples as task=sample does) with a fixed run
    directory, then `task=eval_clip task.samples_dir=<run>/samples`: the chained command the README shows."""
    from opensora.tasks.sample import write_latents

    _, folder = clip_folder
    rng = np.random.default_rng(0)
    z = [np.broadcast_to(rng.uniform(-0.9, 0.9, (3, 4, 1, 1)), (3, 4, 16, 16)).astype(np.float32) for _ in range(2)]
    write_latents(tmp_path / "latents", z, ["a photo of a cat", "a dog"], {"vae": {
        "_target_": "opensora.vae.IdentityVAE", "latent_channels": 3, "downsample": 1}, "fps": 8, "upscale": 1})
    run = tmp_path / "outputs" / "runs" / "sampled"
    run_cli(["task=decode", f"task.latents_dir={tmp_path / 'latents'}", "vae=identity", "logger=none",
             f"hydra.run.dir={run}"], tmp_path)
    proc = run_cli(["task=eval_clip", f"task.samples_dir={run}/samples", f"clip.from_pretrained={folder}",
                    f"hydra.run.dir={tmp_path / 'outputs' / 'runs' / 'clip'}"], tmp_path)
    assert "clip_score (mean over 2 video-prompt pairs, 0 videos failed)" in proc.stdout
    report = json.loads((tmp_path / "outputs" / "runs" / "clip" / "clip_score.json").read_text())
    assert report["num_videos"] == 2 and np.isfinite(report["clip_score"])
