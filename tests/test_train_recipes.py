"""Training recipes (conf/experiment/train_*.yaml): the Open-Sora 1.0 stages and the MindSpore port's "_ms"
variants against SPEC section 4, their chaining (stage N initialises from stage N-1's output directory),
`debug=fast` on each, and, slow, every recipe run end to end through the CLI under debug=fast: the four
stages in sequence from a tiny PixArt-layout checkpoint, then the two "_ms" variants.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import CONF, compose_cfg, load_ckpt, run_cli, write_mp4

# SPEC section 4, per recipe: (frames, interval, image size, space_scale, time_scale, flash attention,
# lr, schedule (kind, warmup, min_lr), batch per device, grad clip, init: "pixart" or the stage it continues).
SPEC = {
    "train_16x256x256": (16, 3, 256, 0.5, 1.0, False, 2e-5, ("constant", 0, None), 8, 1.0, "pixart"),
    "train_16x256x256_hq": (16, 3, 256, 0.5, 1.0, False, 2e-5, ("constant", 0, None), 8, 1.0, "16x256x256"),
    "train_16x512x512_hq": (16, 2, 512, 1.0, 1.0, False, 2e-5, ("constant", 0, None), 2, 1.0, "16x256x256_hq"),
    "train_64x512x512": (64, 2, 512, 1.0, 2 / 3, True, 2e-5, ("constant", 0, None), 4, 1.0, "16x512x512_hq"),
    "train_16x256x256_ms": (16, 3, 256, 0.5, 1.0, False, 1e-4, ("constant", 0, None), 3, 5.0, "pixart"),
    "train_64x512x512_ms": (64, 2, 512, 1.0, 2 / 3, True, 1e-4, ("cosine", 500, 2e-5), 1, 5.0, "16x512x512_hq"),
}
STAGES = ["train_16x256x256", "train_16x256x256_hq", "train_16x512x512_hq", "train_64x512x512"]


def compose_with_hydra(overrides):
    """The composed config with its `hydra` node (to resolve hydra.run.dir as run.py would)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_every_train_recipe_is_checked_here():  # (the Open-Sora 1.1 stages: tests/test_train_v1_1.py)
    assert sorted(p.stem for p in (CONF / "experiment").glob("train_*.yaml") if not p.stem.startswith("train_v1_1")) \
        == sorted(SPEC)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_recipe_matches_spec(name, tmp_path):
    frames, interval, size, space, time, flash, lr, (kind, warmup, min_lr), batch, clip, init = SPEC[name]
    cfg = compose_cfg([f"experiment={name}", "paths.pretrained_dir=/weights", "paths.log_dir=/out"], tmp_path)
    assert cfg.task._target_ == "opensora.tasks.train.run" and cfg.seed == 42
    # model: STDiT-XL/2 on SD-VAE latents and T5-XXL embeddings
    m = cfg.model
    assert (m.hidden_size, m.depth, m.num_heads, list(m.patch_size)) == (1152, 28, 16, [1, 2, 2])
    assert (m.in_channels, m.caption_channels, m.model_max_length) == (4, 4096, 120)
    assert list(m.input_size) == [frames, size // 8, size // 8]
    assert m.space_scale == space and m.time_scale == pytest.approx(time, abs=1e-12)
    assert m.enable_flashattn is flash and m.recompute_blocks == "all"
    assert cfg.text_encoder.from_pretrained == "/weights/t5-v1_1-xxl" and cfg.text_encoder.clean_caption
    assert cfg.vae.from_pretrained == "/weights/sd-vae-ft-ema" and cfg.vae.scale_factor == 0.18215
    assert cfg.scheduler._target_ == "opensora.scheduler.IDDPM" and cfg.scheduler.diffusion_steps == 1000
    # data: the user's CSV (required), clips of the stage's size
    d = cfg.data
    assert d.dataset._target_ == "opensora.data.video.VideoTextDataset"
    assert OmegaConf.is_missing(d, "csv_path")
    assert (d.num_frames, d.frame_interval, d.image_size, d.batch_size) == (frames, interval, size, batch)
    assert d.text_embed_folder is None and d.video_embed_folder is None  # T5 and VAE run online
    # optimiser: AdamW eps 1e-8, no weight decay, betas (0.9, 0.999); clipping; fp32 EMA 0.9999
    o = cfg.optim
    assert o.optimizer._target_ == "mindspore.experimental.optim.AdamW"
    assert (o.optimizer.eps, o.optimizer.weight_decay, list(o.optimizer.betas)) == (1e-8, 0.0, [0.9, 0.999])
    assert o.lr == lr and o.grad_clip == clip and o.ema_decay == 0.9999
    schedules = {"opensora.optim.ConstantLR": "constant", "opensora.optim.CosineLR": "cosine"}
    assert (schedules[o.lr_schedule._target_], o.lr_schedule.warmup_steps) == (kind, warmup)
    if min_lr is not None:
        assert o.lr_schedule.min_lr == min_lr
    # fp16 with a dynamic loss scale: 65536, x2 after 2000 finite steps
    p = cfg.precision
    assert (p.dtype, p.loss_scale, p.loss_scale_value, p.loss_scale_factor, p.loss_scale_window) == \
        ("fp16", "dynamic", 65536.0, 2, 2000)
    assert m.dtype == "fp16"
    # init chain
    expected = "/weights/PixArt-XL-2-512x512.pth" if init == "pixart" else f"/out/stages/{init}/checkpoints/latest"
    assert cfg.model.pretrained == expected
    # the header names the stage's command
    header = [ln for ln in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines() if ln.startswith("#")]
    assert any(ln.startswith(f"#   python run.py experiment={name} data.csv_path=") for ln in header)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_learning_rate_schedule_of_recipe(name, tmp_path):
    from hydra.utils import instantiate

    lr, (kind, warmup, min_lr) = SPEC[name][6], SPEC[name][7]
    cfg = compose_cfg([f"experiment={name}"], tmp_path)
    steps = int(cfg.task.max_steps)
    lr_at = instantiate(cfg.optim.lr_schedule, base_lr=float(cfg.optim.lr), max_steps=steps)
    if kind == "constant":  # no warmup: the full rate from the first step to the last
        assert [lr_at(s) for s in (0, 1, steps // 2, steps - 1)] == [lr] * 4
    else:  # linear warmup over 500 steps, then cosine from 1e-4 to 2e-5 at max_steps
        assert lr_at(0) == pytest.approx(lr / warmup) and lr_at(warmup - 1) == pytest.approx(lr)
        assert lr_at(warmup) == pytest.approx(lr)
        assert lr_at((warmup + steps) // 2) == pytest.approx((lr + min_lr) / 2, rel=1e-3)
        assert lr_at(steps) == pytest.approx(min_lr)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_stage_writes_to_its_own_directory(name, tmp_path):
    cfg = compose_with_hydra([f"experiment={name}", "paths.log_dir=/out"])
    assert cfg.hydra.run.dir == f"/out/stages/{cfg.stage.name}"
    assert name == f"train_{cfg.stage.name}"
    cfg = compose_with_hydra([f"experiment={name}", f"resume=/out/stages/{cfg.stage.name}"])
    assert cfg.hydra.run.dir == f"/out/stages/{cfg.stage.name}"


def test_chain_follows_the_original_order_and_is_overridable(tmp_path):
    """16x256x256 -> 16x256x256_hq -> 16x512x512_hq -> 64x512x512 (and _ms) by stage name; another start by
    stage.init_from or model.pretrained."""
    names = {n: compose_cfg([f"experiment={n}"], tmp_path).stage for n in SPEC}
    chain = [names[n].name for n in STAGES]
    assert chain == ["16x256x256", "16x256x256_hq", "16x512x512_hq", "64x512x512"]
    for prev, name in zip(STAGES, STAGES[1:]):
        assert names[name].init_from == names[prev].name
    assert names["train_64x512x512_ms"].init_from == "16x512x512_hq"
    cfg = compose_cfg(["experiment=train_16x256x256_hq", "stage.init_from=16x256x256_ms", "paths.log_dir=/o"], tmp_path)
    assert cfg.model.pretrained == "/o/stages/16x256x256_ms/checkpoints/latest"
    cfg = compose_cfg(["experiment=train_16x512x512_hq", "model.pretrained=/w/OpenSora-v1-HQ-16x256x256.pth"], tmp_path)
    assert cfg.model.pretrained == "/w/OpenSora-v1-HQ-16x256x256.pth"
    cfg = compose_cfg(["experiment=train_16x256x256", "paths.pixart_checkpoint=/w/PixArt.ckpt"], tmp_path)
    assert cfg.model.pretrained == "/w/PixArt.ckpt"


@pytest.mark.parametrize("name", sorted(SPEC))
def test_debug_fast_shrinks_a_recipe_and_keeps_its_settings(name, tmp_path):
    from opensora.tasks.common import build_model

    frames, interval, size, space, time, flash, lr, (kind, warmup, min_lr), batch, clip, init = SPEC[name]
    cfg = compose_cfg([f"experiment={name}", "debug=fast", "paths.log_dir=/out"], tmp_path)
    # tiny stand-ins for the downloads: STDiT, a T5 with a tokenizer trained in the run, pixel space
    assert (cfg.model.hidden_size, cfg.model.depth) == (32, 1)
    assert cfg.text_encoder.from_pretrained is None and cfg.text_encoder.config.d_model == 64
    assert cfg.vae._target_ == "opensora.vae.IdentityVAE"
    assert list(cfg.model.input_size) == [4, 12, 12] and cfg.model.caption_channels == 64
    assert (cfg.task.max_steps, cfg.task.ckpt_every, cfg.data.batch_size) == (4, 2, 2)
    # what the recipe chose stays
    assert cfg.data.frame_interval == interval and cfg.model.space_scale == space
    assert cfg.model.time_scale == pytest.approx(time) and cfg.model.enable_flashattn is flash
    assert cfg.model.recompute_blocks == "all" and cfg.precision.dtype == "fp16"
    schedule = {"opensora.optim.ConstantLR": "constant", "opensora.optim.CosineLR": "cosine"}[cfg.optim.lr_schedule._target_]
    assert (cfg.optim.lr, schedule, cfg.optim.grad_clip, cfg.optim.ema_decay) == (lr, kind, clip, 0.9999)
    assert OmegaConf.is_missing(cfg.data, "csv_path")
    # stage chaining stays (in a folder of its own); the XL-sized PixArt download does not
    if init == "pixart":
        assert cfg.model.pretrained is None
    else:
        assert cfg.model.pretrained == f"/out/debug/stages/{init}/checkpoints/latest"
    model = build_model(cfg, with_pretrained=False)
    assert sum(int(np.prod(p.shape)) for p in model.get_parameters()) < 100_000


def test_missing_previous_stage_is_named(tmp_path):
    from opensora.tasks.common import build_model

    cfg = compose_cfg(["experiment=train_16x512x512_hq", "debug=fast", f"paths.log_dir={tmp_path}"], tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert f"model.pretrained={tmp_path}/debug/stages/16x256x256_hq/checkpoints/latest does not exist" in msg
    assert "run that stage first" in msg and "stage.init_from" in msg


def test_missing_csv_is_named(tmp_path):
    from opensora.data import build_dataset

    cfg = compose_cfg(["experiment=train_16x256x256", "debug=fast"], tmp_path)
    with pytest.raises(Exception, match=r"data.csv_path is not set: point it at a CSV"):  # wrapped by Hydra
        build_dataset(cfg)
    cfg = compose_cfg(["experiment=train_16x256x256", "debug=fast", f"data.csv_path={tmp_path / 'nope.csv'}"],
                      tmp_path)
    with pytest.raises(Exception, match=r"data.csv_path=.*nope.csv does not exist"):
        build_dataset(cfg)


def test_new_run_in_a_directory_with_checkpoints_is_refused(tmp_path):
    """A stage's directory is fixed: running the stage again must not mix its checkpoints with the earlier
    run's (pruning would delete the new ones); resume= continues instead."""
    from opensora.tasks import train

    stage_dir = tmp_path / "stages" / "16x256x256"
    (stage_dir / "checkpoints" / "step_000200").mkdir(parents=True)
    (stage_dir / "checkpoints" / "latest").write_text("step_000200\n")
    cfg = compose_cfg(["experiment=train_16x256x256", "debug=fast", "logger=none"], stage_dir)
    d = re.escape(str(stage_dir))
    with pytest.raises(FileExistsError, match=rf"{d} already holds checkpoints.*step_000200.*resume={d}"):
        train.run(cfg)
    assert not (stage_dir / "config_resolved.yaml").exists()
    # through the CLI it is refused before anything is written into the directory
    (tmp_path / "clips.csv").write_text("video,caption\na.mp4,a clip\n")
    before = sorted(p.relative_to(stage_dir) for p in stage_dir.rglob("*"))
    proc = run_cli(["experiment=train_16x256x256", "debug=fast", "logger=none", f"hydra.run.dir={stage_dir}",
                    f"data.csv_path={tmp_path / 'clips.csv'}"], tmp_path, check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    assert sorted(p.relative_to(stage_dir) for p in stage_dir.rglob("*")) == before


# ================================================================
# End to end: every recipe under debug=fast through the CLI
# ================================================================


def pixart_file(path: Path, cfg) -> dict[str, np.ndarray]:
    """A PixArt-XL-2-512x512.pth layout for the model of `cfg`: {"state_dict": ...} without the temporal
    attention, a 2-D patch conv, a 120-token null caption and pos_embed; returns the state dict."""
    torch = pytest.importorskip("torch")
    from opensora.tasks.common import build_model

    model = build_model(cfg, with_pretrained=False)
    rng = np.random.default_rng(7)
    sd = {n: (0.02 * rng.standard_normal(p.shape)).astype(np.float32) for n, p in model.parameters_and_names()
          if "attn_temp" not in n}
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][:, :, 0]
    sd["y_embedder.y_embedding"] = (0.02 * rng.standard_normal((120, sd["y_embedder.y_embedding"].shape[1]))
                                    ).astype(np.float32)
    sd["pos_embed"] = np.zeros((1, 36, 32), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, str(path))
    return sd


def load_report(log: str) -> tuple[str, int, int]:
    """(file, tensors loaded, missing) from the run's 'pretrained weights ...' line."""
    m = re.search(r"pretrained weights (\S+?)(?: \[\w+\])?: loaded (\d+) tensors \(\d+ adapted\), missing (\d+)", log)
    assert m, "no load report in the log"
    return m.group(1), int(m.group(2)), int(m.group(3))


@pytest.mark.slow
def test_every_recipe_runs_end_to_end_under_debug_fast(tmp_path):
    """The four stages in sequence, each initialised by the recipe's own path interpolation from the one
    before (stage 1 from a tiny PixArt-layout file), then 16x256x256_ms (from PixArt) and 64x512x512_ms
    (from the 16x512x512 stage). Each run's log names the file it loaded, and its EMA weights after 4 steps
    equal those it started from to within 1e-6 (EMA 0.9999: at most 1e-4 * 10 * lr away), which are the
    PixArt file's for every spatial weight."""
    import pandas as pd

    rng = np.random.default_rng(0)
    captions = ["a red ball rolls on the grass", "a dog runs along a beach", "waves break on rocks at sunset",
                "a car drives through a city at night"]
    for i in range(len(captions)):  # 20 frames: enough for 4 frames at interval 3
        write_mp4(tmp_path / "media" / f"clip{i}.mp4", rng.integers(0, 256, (20, 24, 32, 3), np.uint8), 24)
    pd.DataFrame({"video": [f"clip{i}.mp4" for i in range(len(captions))], "caption": captions}).to_csv(
        tmp_path / "media" / "videos.csv", index=False)
    common = ["debug=fast", f"data.csv_path={tmp_path / 'media' / 'videos.csv'}", "logger=none"]
    pixart = tmp_path / "models" / "PixArt-XL-2-512x512.pth"
    sd = pixart_file(pixart, compose_cfg(["experiment=train_16x256x256", *common], tmp_path))
    stages = tmp_path / "outputs" / "debug" / "stages"

    def run(name, *extra):
        proc = run_cli([f"experiment={name}", *common, *extra], tmp_path)
        stage = name[len("train_"):]
        ckpt = stages / stage / "checkpoints"
        assert (ckpt / "latest").read_text().strip() == "step_000004", name
        resolved = OmegaConf.load(stages / stage / "config_resolved.yaml")
        assert resolved.stage.name == stage
        return proc.stdout + proc.stderr, load_ckpt(ckpt / "step_000004" / "ema.ckpt"), resolved

    def assert_close(a, b, name):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=f"{name}: {k}")

    # stage 1: the PixArt file, temporal attention left at initialisation
    pixart_args = [f"paths.pixart_checkpoint={pixart}"]
    log, ema, resolved = run("train_16x256x256", *pixart_args)
    path, loaded, missing = load_report(log)
    assert path == str(pixart) and resolved.model.pretrained == str(pixart)
    temporal = sorted(k for k in ema if "attn_temp" in k)
    assert temporal and missing == len(temporal) and loaded == len(sd) - 1  # all but pos_embed
    assert "temporal parameters not in the file, left at initialisation" in log
    for k, v in sd.items():
        if k == "pos_embed":
            continue
        want = v[:, :, None] if k == "x_embedder.proj.weight" else v[:8] if k == "y_embedder.y_embedding" else v
        np.testing.assert_allclose(ema[k], want, rtol=0, atol=1e-6, err_msg=k)
    assert "train/skipped_steps" in log  # fp16 with its loss scale
    emas = {"16x256x256": ema}

    # stages 2-4 and the 64-frame _ms variant: each from its predecessor's latest checkpoint (EMA weights)
    for name in [*STAGES[1:], "train_64x512x512_ms"]:
        cfg = compose_cfg([f"experiment={name}"], tmp_path)
        prev = cfg.stage.init_from
        log, ema, resolved = run(name)
        path, loaded, missing = load_report(log)
        assert path == str(stages / prev / "checkpoints" / "step_000004" / "ema.ckpt"), name
        assert resolved.model.pretrained == str(stages / prev / "checkpoints" / "latest")
        assert missing == 0 and loaded == len(ema)
        assert_close(ema, emas[prev], name)
        emas[name[len("train_"):]] = ema
        if cfg.model.enable_flashattn:
            assert "flash_attention_score is Ascend-only" in log
        assert resolved.model.time_scale == pytest.approx(cfg.model.time_scale)
        assert resolved.data.frame_interval == cfg.data.frame_interval
    lr_line = [ln for ln in log.splitlines() if "lr=" in ln]
    assert lr_line and "lr=8.00e-07" in lr_line[-1]  # _ms: warmup, 1e-4 * 4 / 500 at the 4th step

    # 16x256x256_ms: from PixArt like stage 1
    log, ema, resolved = run("train_16x256x256_ms", *pixart_args)
    assert load_report(log)[0] == str(pixart)
    assert_close({k: v for k, v in ema.items() if "attn_temp" not in k},
                 {k: v for k, v in emas["16x256x256"].items() if "attn_temp" not in k}, "16x256x256_ms")
    assert math.isclose(resolved.optim.lr, 1e-4) and resolved.optim.grad_clip == 5.0
