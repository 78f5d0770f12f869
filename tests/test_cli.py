"""End-to-end runs of the real CLI, as a user would type them (slow: several graph compilations)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY, load_ckpt, run_cli
from opensora.logger.wandb import read_offline_run

pytestmark = pytest.mark.slow

SMALL = [a for a in TINY if not a.startswith("task.eval")]


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder` (to prove a refused command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


def test_sample_from_a_run_needs_only_the_run(trained, tmp_path):
    """task.run takes the run's model, text encoder (with the tokenizer it trained), VAE, data sizes and
    scheduler, and its latest checkpoint: nothing of the training command is repeated."""
    from opensora.utils.video_io import read_video

    run_dir, _ = trained
    out = tmp_path / "sample"
    run_cli(["task=sample", f"task.run={run_dir}", "task.prompts=[a red square moving left,a blue circle moving up]",
             "task.evaluate=true", "task.upscale=4", "logger=none", f"hydra.run.dir={out}"], tmp_path)
    videos = sorted((out / "samples").glob("*.mp4"))
    assert [v.name for v in videos] == ["000-a-red-square-moving-left.mp4", "001-a-blue-circle-moving-up.mp4"]
    frames = read_video(videos[0])
    assert frames.shape == (4, 32, 32, 3)  # the run's 4 frames of 8x8, upscaled 4x
    assert json.loads((out / "samples" / "scores.json").read_text())["n"] == 2
    record = (out / "config_resolved.yaml").read_text()
    assert f"from_pretrained: {run_dir}/text_encoder" in record and "hidden_size: 32" in record

    # the same with every part named by hand gives the same video
    again = tmp_path / "by_hand"
    run_cli([*SMALL, "task=sample", f"task.ckpt_path={run_dir}/checkpoints/latest", "text_encoder=t5_folder",
             f"text_encoder.from_pretrained={run_dir}/text_encoder", "task.prompts=[a red square moving left]",
             "task.upscale=4", "logger=none", f"hydra.run.dir={again}"], tmp_path)
    np.testing.assert_array_equal(read_video(sorted((again / "samples").glob("*.mp4"))[0]), frames)


def test_sample_errors_are_clear(trained, tmp_path):
    run_dir, _ = trained
    base = [*SMALL, "task=sample", "text_encoder=t5_folder", f"text_encoder.from_pretrained={run_dir}/text_encoder",
            "logger=none", f"hydra.run.dir={tmp_path / 'x'}"]
    proc = run_cli([*base, f"task.ckpt_path={run_dir}", "task.prompts=[]"], tmp_path, check=False)
    assert proc.returncode == 2 and "no prompts" in proc.stderr
    (tmp_path / "blank.txt").write_text("\n  \n")
    proc = run_cli([*base, f"task.ckpt_path={run_dir}", f"task.prompt_file={tmp_path / 'blank.txt'}"], tmp_path,
                   check=False)
    assert proc.returncode == 2 and f"task.prompt_file={tmp_path / 'blank.txt'} holds no prompt" in proc.stderr
    proc = run_cli([*base, "task.prompts=[a red square moving left]"], tmp_path, check=False)
    assert proc.returncode == 2 and "task.ckpt_path" in proc.stderr and "task.run" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_resume_of_a_folder_that_is_no_run_is_refused_before_anything_is_written(trained, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    proc = run_cli([f"resume={empty}", "logger=none"], tmp_path, check=False)
    assert proc.returncode == 2 and f"resume={empty}: {empty} is not a run directory" in proc.stderr
    assert list(empty.iterdir()) == []
    proc = run_cli([f"resume={tmp_path / 'nonexistent'}"], tmp_path, check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and not (tmp_path / "nonexistent").exists()
    run_dir, _ = trained
    step = run_dir / "checkpoints" / "step_000003"
    before = tree(run_dir)
    proc = run_cli([f"resume={step}", "model.hidden_size=64", "logger=none"], tmp_path, check=False)
    assert proc.returncode == 2 and "model.hidden_size: 32 -> 64" in proc.stderr
    assert tree(run_dir) == before  # the run directory is byte-identical


def test_killed_run_resumes_from_its_directory_to_the_same_weights(tmp_path):
    """SIGKILL a run after its first checkpoint; `resume=<run>` alone (no overrides repeated) ends bit-for-bit
    (within fp32 noise) where an uninterrupted run ends (1e-4; one repeated or skipped Adam step would move
    weights by ~lr = 1e-3), with the same loss trace (the smoothed loss at every checkpoint)."""
    args = [*SMALL, "task.max_steps=60", "task.ckpt_every=4", "task.keep_last=20", "task.eval=null",
            "optim/lr_schedule=constant", "logger=none"]
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

    record = tree(killed / ".hydra")
    resumed = run_cli([f"resume={killed}"], tmp_path)
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert tree(killed / ".hydra") == record  # the first run's record is never rewritten
    (again,) = (killed / "resumes").iterdir()
    assert (again / ".hydra" / "config.yaml").is_file() and (again / "config_resolved.yaml").is_file()
    a = load_ckpt(ref / "checkpoints" / "step_000060" / "model.ckpt")
    b = load_ckpt(killed / "checkpoints" / "step_000060" / "model.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-4, err_msg=k)  # CPU threading noise ~1e-5
    sa = json.loads((ref / "checkpoints" / "step_000060" / "state.json").read_text())
    sb = json.loads((killed / "checkpoints" / "step_000060" / "state.json").read_text())
    assert sa["data"] == sb["data"] and sa["rng"] == sb["rng"]
    for ckpt in sorted((killed / "checkpoints").glob("step_*")):  # the loss trace
        la = json.loads((ref / "checkpoints" / ckpt.name / "state.json").read_text())["loss_avg"]
        lb = json.loads((ckpt / "state.json").read_text())["loss_avg"]
        assert abs(la - lb) <= 1e-5 * abs(la), ckpt.name


def test_multirun_two_points_two_wandb_runs(tmp_path):
    run_cli(["-m", "optim.lr=1e-4,3e-4", "debug=fast", *TINY, "task.eval=null",
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
