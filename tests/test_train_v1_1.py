"""Open-Sora 1.1 training: the stage recipes (conf/experiment/train_v1_1_stage*.yaml) against SPEC-1.1 §1.1 and their
chaining, debug=fast on them, bad bucketed-data settings refused before a run; slow, end to end through the CLI:
a folder of mixed-size mp4s and images measured by task=scan_videos and trained as stage 1 under debug=fast (the
bucket report in the log), resumed after clips were added to the CSV (re-planned, one log line), then stages 2 and
3 each from its predecessor's output."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from helpers import CONF, compose_cfg, load_ckpt, run_cli, write_mp4

MASK_RATIOS = {"mask_no": 0.75, "mask_quarter_random": 0.025, "mask_quarter_head": 0.025, "mask_quarter_tail": 0.025,
               "mask_quarter_head_tail": 0.05, "mask_image_random": 0.025, "mask_image_head": 0.025,
               "mask_image_tail": 0.025, "mask_image_head_tail": 0.05}
# SPEC-1.1 §1.1, verbatim ((keep_prob, batch size) as lists); recompute: grad_checkpoint
STAGES = {
    "train_v1_1_stage1": ({"144p": {1: [0.5, 48], 16: [1.0, 6], 32: [1.0, 3], 96: [1.0, 1]},
                           "256": {1: [0.5, 24], 16: [0.5, 3], 48: [0.5, 1], 64: [0.0, None]},
                           "240p": {16: [0.3, 2], 32: [0.3, 1], 64: [0.0, None]},
                           "512": {1: [0.4, 12]}, "1024": {1: [0.3, 3]}}, None, "pixart"),
    "train_v1_1_stage2": ({"144p": {1: [1.0, 48], 16: [1.0, 17], 32: [1.0, 9], 64: [1.0, 4], 128: [1.0, 1]},
                           "256": {1: [0.8, 254], 16: [0.5, 17], 32: [0.5, 9], 64: [0.5, 4], 128: [0.5, 1]},
                           "240p": {1: [0.1, 20], 16: [0.9, 17], 32: [0.8, 9], 64: [0.8, 4], 128: [0.8, 2]},
                           "512": {1: [0.5, 86], 16: [0.2, 4], 32: [0.2, 2], 64: [0.2, 1], 128: [0.0, None]},
                           "480p": {1: [0.4, 54], 16: [0.4, 4], 32: [0.0, None]},
                           "720p": {1: [0.1, 20], 16: [0.1, 2], 32: [0.0, None]},
                           "1024": {1: [0.3, 20]}, "1080p": {1: [0.4, 8]}}, "all", "v1_1_stage1"),
    "train_v1_1_stage3": ({"144p": {1: [1.0, 200], 16: [1.0, 36], 32: [1.0, 18], 64: [1.0, 9], 128: [1.0, 4]},
                           "256": {1: [0.8, 200], 16: [0.5, 22], 32: [0.5, 11], 64: [0.5, 6], 128: [0.8, 4]},
                           "240p": {1: [0.8, 200], 16: [0.5, 22], 32: [0.5, 10], 64: [0.5, 6], 128: [0.5, 3]},
                           "360p": {1: [0.5, 120], 16: [0.5, 9], 32: [0.5, 4], 64: [0.5, 2], 128: [0.5, 1]},
                           "512": {1: [0.5, 120], 16: [0.5, 9], 32: [0.5, 4], 64: [0.5, 2], 128: [0.8, 1]},
                           "480p": {1: [0.4, 80], 16: [0.6, 6], 32: [0.6, 3], 64: [0.6, 1], 128: [0.0, None]},
                           "720p": {1: [0.4, 40], 16: [0.6, 3], 32: [0.6, 1], 96: [0.0, None]},
                           "1024": {1: [0.3, 40]}}, "all", "v1_1_stage2"),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_recipe_matches_spec(name, tmp_path):
    buckets, recompute, init = STAGES[name]
    cfg = compose_cfg([f"experiment={name}", "paths.pretrained_dir=/weights", "paths.log_dir=/out"], tmp_path)
    assert OmegaConf.to_container(cfg.data.bucket_config) == buckets
    assert OmegaConf.to_container(cfg.data.mask_ratios) == MASK_RATIOS
    assert cfg.data.dataset._target_ == "opensora.data.variable.VariableVideoTextDataset"
    assert (cfg.data.frame_interval, cfg.data.ar_condition, cfg.data.fps_condition) == (3, "width/height", "video")
    m = cfg.model
    assert m._target_ == "opensora.model.STDiT2" and (m.hidden_size, m.depth, m.num_heads) == (1152, 28, 16)
    assert (m.input_sq_size, m.qk_norm, m.qk_norm_legacy, m.model_max_length, m.pred_sigma) == (512, True, True, 200,
                                                                                               True)
    assert m.recompute_blocks == recompute and m.dtype == "bf16" and cfg.precision.loss_scale is None
    assert cfg.text_encoder.model_max_length == 200 and cfg.vae.from_pretrained == "/weights/sd-vae-ft-ema"
    o = cfg.optim
    assert (o.lr, o.grad_clip, o.ema_decay, o.optimizer.weight_decay, o.optimizer.eps) == (2e-5, 1.0, 0.9999, 0.0,
                                                                                          1e-8)
    assert o.lr_schedule._target_ == "opensora.optim.ConstantLR" and o.lr_schedule.warmup_steps == 0
    assert cfg.scheduler.learn_sigma and cfg.seed == 42 and cfg.task.ckpt_every == 500
    want = "/weights/PixArt-XL-2-512x512.pth" if init == "pixart" else f"/out/stages/{init}/checkpoints/latest"
    assert cfg.model.pretrained == want and cfg.stage.name == name[len("train_"):]
    assert f"#   python run.py experiment={name} data.csv_path=" in (CONF / "experiment" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_debug_fast_shrinks_a_stage_to_tiny_buckets(name, tmp_path):
    from opensora.data.bucket import Bucket
    from opensora.tasks.common import build_model

    cfg = compose_cfg([f"experiment={name}", "debug=fast", "paths.log_dir=/out"], tmp_path)
    b = Bucket(cfg.data.bucket_config, resolutions=cfg.data.resolutions)
    assert set(b.resolutions) == {"px16", "px8"} and max(b.get_thw(x)[1] * b.get_thw(x)[2] for x in b.buckets) <= 256
    assert cfg.model._target_ == "opensora.model.STDiT2" and cfg.model.hidden_size == 48
    assert (cfg.task.max_steps, cfg.task.ckpt_every) == (4, 2) and cfg.precision.dtype == "fp32"
    # what the recipe chose stays: masks, conventions, interval, recompute, the chain (in debug/stages)
    assert OmegaConf.to_container(cfg.data.mask_ratios) == MASK_RATIOS and cfg.data.frame_interval == 3
    assert cfg.model.recompute_blocks == STAGES[name][1]
    init = STAGES[name][2]
    assert cfg.model.pretrained == (None if init == "pixart" else f"/out/debug/stages/{init}/checkpoints/latest")
    assert sum(int(np.prod(p.shape)) for p in build_model(cfg, with_pretrained=False).get_parameters()) < 300_000


def test_bad_bucketed_settings_are_refused_naming_them(tmp_path):
    from opensora.config import ConfigError, validate

    csv = tmp_path / "c.csv"
    csv.write_text("path,text,num_frames,height,width\na.mp4,a,10,8,8\n")
    base = ["experiment=train_v1_1_stage1", "debug=fast", f"data.csv_path={csv}", "logger=none"]

    def problems(*extra):
        try:
            validate(compose_cfg([*base, *extra], tmp_path))
        except ConfigError as e:
            return e.problems
        return []

    assert problems() == []
    assert any("unknown resolution '1440p'" in p for p in problems("data.bucket_config=null",
                                                                   "data.bucket_config={1440p: {1: [1.0, 2]}}"))
    assert any("data.bucket_config.px8.4: keep_prob must be a probability in [0, 1], got 2.0" in p
               for p in problems("data.bucket_config=null", "data.bucket_config={px8: {4: [2.0, 2]}}"))
    assert any("data.mask_ratios must sum to 1 (within 1e-6), got 0.8" in p
               for p in problems("data.mask_ratios=null", "data.mask_ratios={mask_no: 0.8}"))
    assert any("trains STDiT2" in p for p in problems("model._target_=opensora.model.STDiT"))


# ================================================================
# End to end
# ================================================================


def mixed_folder(root, n_videos: int, start: int = 0, seed: int = 0):
    """Clips of several sizes and lengths (14..40 frames, 8..32 px) and images, as a user's folder; captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    captions = {}
    sizes = [(20, 12, 16), (26, 16, 16), (40, 18, 24), (16, 8, 8), (30, 16, 12), (24, 24, 32)]
    for i in range(start, start + n_videos):
        t, h, w = sizes[i % len(sizes)]
        write_mp4(root / f"clips/v{i}.mp4", rng.integers(0, 256, (t, h, w, 3), np.uint8), 24)
        captions[f"clips/v{i}.mp4"] = f"noise clip {i}"
    for i in range(start, start + n_videos // 2):
        (root / "stills").mkdir(parents=True, exist_ok=True)
        h, w = [(16, 16), (12, 16), (10, 10), (24, 18)][i % 4]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"stills/s{i}.png")
        captions[f"stills/s{i}.png"] = f"noise image {i}"
    return captions


def write_captions(root, captions: dict):
    pd.DataFrame(list(captions.items()), columns=["video", "caption"]).to_csv(root / "captions.csv", index=False)


@pytest.mark.slow
def test_a_folder_trains_stage_1_resumes_after_clips_were_added_and_chains_stages(tmp_path):
    media = tmp_path / "media"
    captions = mixed_folder(media, 12)
    write_captions(media, captions)
    scan = ["task=scan_videos", f"task.csv_path={media / 'captions.csv'}", f"task.folder={media}",
            f"task.output_csv={media / 'videos.csv'}", "logger=none"]
    run_cli(scan, tmp_path)
    table = pd.read_csv(media / "videos.csv")
    assert list(table.columns[:7]) == ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]
    common = ["debug=fast", f"data.csv_path={media / 'videos.csv'}", f"data.video_folder={media}", "logger=none",
              "task.shapes=dynamic"]
    stage1 = tmp_path / "outputs" / "debug" / "stages" / "v1_1_stage1"
    proc = run_cli(["experiment=train_v1_1_stage1", *common], tmp_path)
    log = proc.stdout + proc.stderr
    assert re.search(r"buckets: 12 \(resolution x frames x aspect ratio\)", log)
    assert re.search(r"epoch 0: \d+ of 18 rows trained in \d+ steps", log) and "dropped this epoch:" in log
    assert "compiled the train step" in log and "one dynamic-shape graph" in log
    state = json.loads((stage1 / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["data"]["plan"] and (stage1 / "data" / f"plan-{state['data']['plan']}.npz").is_file()

    # clips added to the CSV: the resume re-plans the epoch instead of crashing, and trains on
    captions.update(mixed_folder(media, 6, start=12, seed=1))
    write_captions(media, captions)
    run_cli(scan, tmp_path)
    proc = run_cli([f"resume={stage1}", "task.max_steps=8"], tmp_path)
    log = proc.stdout + proc.stderr
    assert re.search(r"data: rows 18 -> 27 \(9 new, 0 gone\) since the checkpoint .* is re-planned over", log)
    assert (stage1 / "checkpoints" / "latest").read_text().strip() == "step_000008"

    # stages 2 and 3, each from its predecessor's EMA weights
    emas = {"v1_1_stage1": load_ckpt(stage1 / "checkpoints" / "step_000008" / "ema.ckpt")}
    for name, prev in (("v1_1_stage2", "v1_1_stage1"), ("v1_1_stage3", "v1_1_stage2")):
        proc = run_cli([f"experiment=train_{name}", *common], tmp_path)
        log = proc.stdout + proc.stderr
        ckpt = tmp_path / "outputs" / "debug" / "stages" / name / "checkpoints"
        assert (ckpt / "latest").read_text().strip() == "step_000004", name
        latest = (tmp_path / "outputs" / "debug" / "stages" / prev / "checkpoints" / "latest").read_text().strip()
        assert f"stages/{prev}/checkpoints/{latest}/ema.ckpt" in log
        ema = load_ckpt(ckpt / "step_000004" / "ema.ckpt")
        for k, v in ema.items():  # EMA 0.9999 over 4 steps: within 1e-6 of where it started
            np.testing.assert_allclose(v, emas[prev][k], rtol=0, atol=1e-6, err_msg=f"{name}: {k}")
        emas[name] = ema


@pytest.mark.slow
def test_bucket_latent_cache_validation_during_training_and_eval_loss(tmp_path):
    """task=embed_video on bucketed data caches one latent per video per bucket size; training reads them (no VAE
    built) and logs the validation loss; task=eval_loss of the run writes its table, CSV and plot."""
    media = tmp_path / "media"
    captions = mixed_folder(media, 8)
    rows = []
    for path, text in captions.items():
        from opensora.data.media_info import probe

        info = probe(str(media / path))
        rows.append((path, text, info["num_frames"], info["height"], info["width"]))
    pd.DataFrame(rows, columns=["path", "text", "num_frames", "height", "width"]).to_csv(media / "videos.csv",
                                                                                       index=False)
    common = ["task=train", "data=variable_csv", "debug=fast", "scheduler=iddpm", f"data.csv_path={media / 'videos.csv'}",
              "logger=none"]
    cache = tmp_path / "latents"
    run_cli([*common, "task=embed_video", f"task.output_dir={cache}"], tmp_path)
    index = pd.read_csv(cache / "index.csv")
    assert set(index.columns) >= {"video", "path", "num_frames", "height", "width"}
    assert (index.groupby("video").size() >= 1).all() and index.path.str.match(r"\d+x\d+x\d+/").all()
    run = tmp_path / "run"
    proc = run_cli([*common, f"data.video_embed_folder={cache}", "task.max_steps=2", "task.ckpt_every=2",
                    f"task.validate.csv_path={media / 'videos.csv'}", "task.validate.max_samples=2",
                    "task.validate.num_timesteps=2", f"hydra.run.dir={run}"], tmp_path)
    log = proc.stdout + proc.stderr
    assert "validation: " in log and re.search(r"step 2: validation loss loss \d", log)
    assert re.search(r"val/loss = \d", log)
    proc = run_cli(["task=eval_loss", f"task.run={run}", f"task.csv_path={media / 'videos.csv'}",
                    "task.num_timesteps=2", "task.max_samples=3", f"hydra.run.dir={tmp_path / 'eval'}",
                    "logger=none"], tmp_path)
    assert re.search(r"px16 x 4 +\d+ +\d", proc.stdout) and "t=333" in proc.stdout
    table = pd.read_csv(tmp_path / "eval" / "eval_loss.csv")
    assert list(table.columns) == ["resolution", "num_frames", "samples", "t333", "t666", "mean"]
    assert (tmp_path / "eval" / "eval_loss.png").stat().st_size > 1000
