"""End-to-end runs of the real CLI, as a user would type them (slow: several graph compilations)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT
from opensora.logger.wandb import read_offline_run

pytestmark = pytest.mark.slow

# A tiny, fast training setup shared by the runs below.
SMALL = ["model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]", "model.num_heads=2", "data.num_frames=4", "data.image_size=8", "data.dataset.speed=1",
         "data.batch_size=4", "data.dataset.num_samples=64", "scheduler.num_sampling_steps=3"]
TINY = [*SMALL, "task.eval.num_samples_per_prompt=1", "task.eval.batch_size=8", "task.eval.upscale=2"]


def run_cli(args, tmp_path, check=True, timeout=600, popen=False):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PROJECT_ROOT": str(tmp_path),
           "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), *args]
    if popen:  # background run in its own process group, output to a file (a full pipe would block it)
        log = open(tmp_path / "background.log", "w")
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_ckpt(path):
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run with evaluation at the end; later tests sample from it."""
    tmp = tmp_path_factory.mktemp("train")
    run_dir = tmp / "run"
    proc = run_cli([*TINY, "task.max_steps=6", "task.ckpt_every=3", "task.log_every=2", f"hydra.run.dir={run_dir}"],
                   tmp)
    return run_dir, proc


def test_train_writes_checkpoints_samples_scores_and_wandb(trained):
    run_dir, proc = trained
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000006"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000003", "step_000006"]
    assert not list(ckpts.glob(".tmp-*"))
    state = json.loads((ckpts / "step_000006" / "state.json").read_text())
    assert state["step"] == 6 and state["data"] == {"epoch": 0, "position": 24}
    assert (run_dir / "config_resolved.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    scores = json.loads((run_dir / "samples" / "step_000006" / "scores.json").read_text())
    assert scores["n"] == 8 and 0.0 <= scores["color_acc"] <= 1.0
    assert "evaluation: color_acc" in proc.stdout
    mp4s = sorted((run_dir / "samples" / "step_000006").glob("*.mp4"))
    assert len(mp4s) == 8 and (run_dir / "samples" / "step_000006" / "grid.gif").is_file()
    # W&B offline run: its run file holds the config, the logged history and the summary.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(state["wandb_run_id"])
    wb = read_offline_run(str(next(offline[0].glob("run-*.wandb"))))
    assert [h["_step"] for h in wb["history"] if "train/loss" in h] == [2, 4, 6]
    assert wb["summary"]["eval/color_acc"] == scores["color_acc"]
    assert wb["config"]["model"]["hidden_size"] == 32 and wb["config"]["task"]["max_steps"] == 6


def test_sample_task_writes_playable_mp4(trained, tmp_path):
    from opensora.utils.video_io import read_video

    run_dir, _ = trained
    out = tmp_path / "sample"
    run_cli([*SMALL, "task=sample", f"task.ckpt_path={run_dir}/checkpoints/latest", "text_encoder=t5_folder",
             f"text_encoder.from_pretrained={run_dir}/text_encoder", "task.prompts=[a red square moving left,"
             "a blue circle moving up]", "task.evaluate=true", "task.upscale=4", "logger=none",
             f"hydra.run.dir={out}"], tmp_path)
    videos = sorted((out / "samples").glob("*.mp4"))
    assert [v.name for v in videos] == ["000-a-red-square-moving-left.mp4", "001-a-blue-circle-moving-up.mp4"]
    frames = read_video(videos[0])
    assert frames.shape == (4, 32, 32, 3)  # 4 frames of 8x8 upscaled 4x
    assert json.loads((out / "samples" / "scores.json").read_text())["n"] == 2


def test_sample_errors_are_clear(trained, tmp_path):
    run_dir, _ = trained
    base = [*SMALL, "task=sample", "text_encoder=t5_folder", f"text_encoder.from_pretrained={run_dir}/text_encoder",
            "logger=none", f"hydra.run.dir={tmp_path / 'x'}"]
    proc = run_cli([*base, f"task.ckpt_path={run_dir}", "task.prompts=[]"], tmp_path, check=False)
    assert proc.returncode != 0 and "no prompts" in proc.stderr
    proc = run_cli([*base, "task.prompts=[a red square moving left]"], tmp_path, check=False)
    assert proc.returncode != 0 and "task.ckpt_path" in proc.stderr


def test_resume_without_checkpoint_names_the_directory(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    proc = run_cli([*TINY, f"resume={empty}", "logger=none"], tmp_path, check=False)
    assert proc.returncode != 0 and f"no checkpoint in {empty}/checkpoints" in proc.stderr


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a run after its first checkpoint; resuming it ends bit-for-bit (within fp32 noise) where an
    uninterrupted run ends (1e-4; one repeated or skipped Adam step would move weights by ~lr = 1e-3). Caption dropout is off so that in-graph randomness plays no part."""
    args = [*TINY, "model.class_dropout_prob=0", "task.max_steps=60", "task.ckpt_every=4", "task.eval=null",
            "optim.lr_schedule.kind=constant", "logger=none"]
    ref = tmp_path / "ref"
    run_cli([*args, f"hydra.run.dir={ref}"], tmp_path)

    killed = tmp_path / "killed"
    proc = run_cli([*args, f"hydra.run.dir={killed}"], tmp_path, popen=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "latest").exists():
        assert proc.poll() is None, (tmp_path / "background.log").read_text()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = (killed / "checkpoints" / "latest").read_text().strip()
    assert first != "step_000060", "the run finished before it could be killed"

    resumed = run_cli([*args, f"resume={killed}"], tmp_path)
    assert "resumed from" in resumed.stderr + resumed.stdout
    a = load_ckpt(ref / "checkpoints" / "step_000060" / "model.ckpt")
    b = load_ckpt(killed / "checkpoints" / "step_000060" / "model.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-4, err_msg=k)  # CPU threading noise ~1e-5
    sa = json.loads((ref / "checkpoints" / "step_000060" / "state.json").read_text())
    sb = json.loads((killed / "checkpoints" / "step_000060" / "state.json").read_text())
    assert sa["data"] == sb["data"] and sa["rng"] == sb["rng"]


def test_multirun_two_points_two_wandb_runs(tmp_path):
    proc = run_cli(["-m", "optim.lr=1e-4,3e-4", "debug=fast", *TINY, "task.eval=null",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    jobs = sorted((tmp_path / "sweep").glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    ids = set()
    for job, lr in zip(jobs, ("0.0001", "0.0003")):
        assert f"optim.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        ids.add(runs[0].name.rsplit("-", 1)[-1])
        wb = read_offline_run(str(next(runs[0].glob("run-*.wandb"))))
        assert wb["config"]["optim"]["lr"] == pytest.approx(float(lr)) and wb["history"]
    assert len(ids) == 2
