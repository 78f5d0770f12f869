"""Bad input, as a user or an adversary would give it: every case ends in a clear error or the right result. Each
asserts the exit status, that the message names the key or the file, and that nothing written before was changed
(refusals at start-up write nothing at all).

Fast tests call the validation pass and the checkpoint code directly; the CLI ones (slow) run `run.py`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from helpers import TINY, compose_cfg, run_cli, write_mp4
from opensora.config import ConfigError, validate


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args, cwd: Path, *expected: str, status: int = 2):
    """Run `run.py ARGS`, assert it fails with `status` before writing anything, and that stderr holds every
    expected text; returns stderr."""
    before = tree(cwd)
    proc = run_cli([*args, "logger=none"], cwd, check=False, timeout=300)
    assert proc.returncode == status, (args, proc.returncode, proc.stderr[-3000:])
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-3000:])
    assert tree(cwd) == before, "a refused run wrote files"
    assert not (cwd / "outputs").exists()
    return proc.stderr


# ---------------------------------------------------------------- values (fast)


def problems(overrides, tmp_path):
    try:
        validate(compose_cfg([*overrides, "logger=none"], tmp_path))
    except ConfigError as e:
        return e.problems
    return []


def test_values_that_cannot_work_are_named_with_what_is_allowed(tmp_path):
    got = problems(["task.max_steps=-1", "task.keep_last=0", "task.ckpt_every=0", "task.log_every=0",
                    "model.depth=0", "optim.lr=-1", "optim.ema_decay=1.5", "data.batch_size=0",
                    "parallel.sync_timeout_s=0"], tmp_path)
    for text in ("task.max_steps=-1: must be >= 1", "task.keep_last=0: must be >= 1", "task.log_every=0: must be >= 1",
                 "task.ckpt_every=0: must be >= 1 (null writes no checkpoints)", "model.depth=0: must be >= 1",
                 "optim.lr=-1: must be > 0", "optim.ema_decay=1.5: must be < 1 (null: no EMA)",
                 "data.batch_size=0: must be >= 1", "parallel.sync_timeout_s=0.0: must be > 0"):
        assert text in got, (text, got)
    got = problems(["task=sample", "task.batch_size=0", "task.fps=0", "task.num_samples_per_prompt=0",
                    f"task.ckpt_path={tmp_path / 'nope.ckpt'}", "task.prompts=[a cat]"], tmp_path)
    assert {"task.batch_size=0: must be >= 1", "task.fps=0: must be >= 1",
            "task.num_samples_per_prompt=0: must be >= 1", f"task.ckpt_path={tmp_path / 'nope.ckpt'}: does not exist"
            } <= set(got)


def test_settings_that_contradict_each_other_are_named(tmp_path):
    assert any("parallel=zero runs one process per device started by msrun" in p
               for p in problems(["parallel=zero"], tmp_path))
    assert any("precision.dtype=fp16 needs a loss scale" in p
               for p in problems(["precision=fp16", "precision.loss_scale=null"], tmp_path))
    assert any("model.pred_sigma=True but scheduler.learn_sigma=False" in p
               for p in problems(["model.pred_sigma=true"], tmp_path))


# ---------------------------------------------------------------- checkpoints (fast)


class _Toy(ms.nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = ms.nn.Dense(3, 2)

    def construct(self, x):
        return (self.dense(x) ** 2).mean()


def _state(out: Path):
    """A TrainingState of a tiny model (the train task builds it the same way)."""
    from mindspore.experimental.optim import AdamW

    from opensora.parallel.single import SingleProcess
    from opensora.train.state import TrainingState
    from opensora.train.step import TrainStep

    net = _Toy()
    params = dict(net.parameters_and_names())
    names = list(params)
    update = SingleProcess().build_update(names, [params[n] for n in names], lambda w: AdamW(w, lr=1e-3), 0.9, params)
    step = TrainStep(net, update, 1.0, 0.9, None)
    return TrainingState(out, 3, SingleProcess(), step, update, params), params


def test_a_latest_checkpoint_that_does_not_load_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    state, params = _state(tmp_path)
    for step in (1, 2):
        params["dense.weight"].set_data(ms.Tensor(np.full((2, 3), step, np.float32)))
        state.save(step, {"step": step, "data": {}})
    latest = tmp_path / "checkpoints" / "step_000002" / "model.ckpt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated (a disk that filled up, a copy cut short)
    fresh, fresh_params = _state(tmp_path)
    with caplog.at_level("WARNING"):
        ckpt, host = fresh.restore(str(tmp_path))
    assert ckpt.name == "step_000001" and host["step"] == 1
    assert (fresh_params["dense.weight"].asnumpy() == 1).all()
    assert "step_000002" in caplog.text and "falling back to the previous one" in caplog.text
    # resume=<run>/checkpoints/step_N picks that one, and does not fall back from it
    with pytest.raises(Exception):
        fresh.restore(str(tmp_path / "checkpoints" / "step_000002"))
    assert fresh.restore(str(tmp_path / "checkpoints" / "step_000001"))[0].name == "step_000001"


def test_a_full_disk_at_save_time_names_the_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import opensora.utils.checkpoint as checkpoint

    state, _ = _state(tmp_path)
    state.save(1, {"step": 1, "data": {}})

    def disk_full(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_ms_checkpoint", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*step_000002 \(OSError: \[Errno 28\] No space left "
                                      r"on device\); .*step_000001 is still the latest"):
        state.save(2, {"step": 2, "data": {}})
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000001" and not list(ckpts.glob(".tmp-*"))


def test_a_malicious_pickle_in_a_t5_folder_is_refused_naming_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from opensora.text_encoder.embedder import load_hf_t5_weights
    from opensora.text_encoder.t5 import T5Config, T5Encoder
    from opensora.utils.tensor_files import UnsafeCheckpointError

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "t5"
    folder.mkdir()
    torch.save({"shared.weight": torch.zeros(4, 4), "x": Payload()}, folder / "pytorch_model.bin")
    encoder = T5Encoder(T5Config(vocab_size=4, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(UnsafeCheckpointError, match=rf"{folder / 'pytorch_model.bin'} was not loaded"):
        load_hf_t5_weights(encoder, folder)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- through the CLI (slow)


@pytest.mark.slow
def test_refusals_at_start_up_write_nothing(tmp_path):
    refused(["task.max_steps=abc"], tmp_path, "task.max_steps", "could not be converted to Integer", status=1)
    refused(["seed=abc"], tmp_path, "seed", status=1)
    refused(["optim.lr=abc", "optim.lr_schedule.warmup_steps=-1"], tmp_path, "optim.lr='abc': must be a number",
            "optim.lr_schedule.warmup_steps=-1: must be >= 0")
    refused(["task.keep_last=0", "task.ckpt_every=0", "task.max_steps=-1", "model.depth=0", "task.log_every=0"],
            tmp_path, "task.keep_last=0", "task.ckpt_every=0", "task.max_steps=-1", "model.depth=0", "task.log_every=0")
    refused(["task=sample", "task.batch_size=0", "task.fps=0", "task.num_samples_per_prompt=0", "task.prompts=[a]"],
            tmp_path, "task.batch_size=0", "task.fps=0", "task.num_samples_per_prompt=0", "task.run=")
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n \n")
    refused(["task=sample", f"task.ckpt_path={blank}", f"task.prompt_file={blank}"], tmp_path,
            f"task.prompt_file={blank} holds no prompt")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused([f"paths.log_dir={blocker / 'out'}"], tmp_path, f"paths.log_dir={blocker / 'out'}: cannot be written")
    refused(["parallel=data"], tmp_path, "parallel=data runs one process per device started by msrun")
    refused(["data=video_csv", f"data.csv_path={tmp_path / 'none.csv'}"], tmp_path,
            f"data.csv_path={tmp_path / 'none.csv'}: no such file")


@pytest.mark.slow
def test_resume_of_what_is_not_a_run_writes_nothing(tmp_path):
    refused([f"resume={tmp_path / 'nonexistent'}"], tmp_path, "no such folder")
    assert not (tmp_path / "nonexistent").exists()
    videos = tmp_path / "videos"
    write_mp4(videos / "a.mp4", np.zeros((4, 8, 8, 3), np.uint8), 8)
    refused([f"resume={videos}"], tmp_path, f"{videos} is not a run directory")
    run = tmp_path / "run"
    run_cli([*TINY, "task.max_steps=2", "task.ckpt_every=2", "task.eval=null", "logger=none",
             f"hydra.run.dir={run}"], tmp_path)
    (run / "checkpoints" / "step_000002" / "model.ckpt").unlink()
    before = tree(run)
    proc = run_cli([f"resume={run / 'checkpoints' / 'step_000002'}", "logger=none"], tmp_path, check=False)
    assert proc.returncode == 2 and "not a checkpoint folder (no model.ckpt in it)" in proc.stderr
    assert tree(run) == before


@pytest.mark.slow
def test_online_tracking_without_a_server_fails_fast_or_falls_back_offline(tmp_path):
    import time

    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the mode comes from logger.mode here
    env.update({"WANDB_SILENT": "true", "PROJECT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1",
                "WANDB_BASE_URL": "http://127.0.0.1:9"})  # nothing listens on port 9
    t0 = time.monotonic()
    proc = run_cli(["logger.mode=online", "logger.reach_timeout_s=2"], tmp_path, check=False, env=env)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60
    assert "logger.mode=online but the W&B server http://127.0.0.1:9 cannot be reached within 2 s" in proc.stderr
    assert "logger.mode=offline" in proc.stderr and "logger=none" in proc.stderr
    assert not (tmp_path / "outputs").exists()
    run = tmp_path / "run"
    proc = run_cli([*TINY, "logger.mode=online", "logger.if_unreachable=offline", "logger.reach_timeout_s=2",
                    "task.max_steps=2", "task.ckpt_every=2", "task.eval=null", f"hydra.run.dir={run}"], tmp_path,
                   env=env)
    assert "W&B falls back to offline mode" in proc.stdout + proc.stderr
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_a_run_that_fails_says_so_in_its_directory(tmp_path):
    """A failure after start-up (here the data: every clip unreadable) ends run.log with the error and leaves a
    FAILED file, so the run is never mistaken for a finished one."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.mp4").write_bytes(b"not a video")
    (media / "videos.csv").write_text("video,caption\na.mp4,a broken clip\n")
    run = tmp_path / "run"
    proc = run_cli(["model=stdit_tiny", "data=video_csv", f"data.csv_path={media / 'videos.csv'}", "data.num_frames=4",
                    "data.image_size=16", "data.batch_size=1", "data.num_workers=0", "logger=none",
                    f"hydra.run.dir={run}"], tmp_path, check=False)
    assert proc.returncode == 1
    failed = (run / "FAILED").read_text()
    assert "TooManyBadSamples" in failed and "a.mp4" in failed
    log = (run / "run.log").read_text()
    assert "the run failed" in log and "TooManyBadSamples" in log.split("the run failed", 1)[1]


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path):
    args = [*TINY, "task.max_steps=1", "task.ckpt_every=1", "task.eval=null", "logger=none"]
    procs = [run_cli(args, tmp_path, popen=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, (tmp_path / "background.log").read_text()[-3000:]
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2, runs
    for r in runs:
        assert (r / "checkpoints" / "step_000001" / "model.ckpt").is_file()
        assert json.loads((r / "checkpoints" / "step_000001" / "state.json").read_text())["step"] == 1
