"""Data parallelism: per-rank data shards, start-up checks, and (slow) a real 2-rank msrun job on CPU
whose weights equal those of one process trained on the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import ROOT
from opensora.data.loader import BatchLoader
from opensora.parallel import init_parallel, msrun_world_size
from opensora.tasks.train import global_slice


class Items:
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return np.full((1,), i, np.float32), f"c{i}"


def test_rank_shards_together_equal_the_global_batch():
    single = iter(BatchLoader(Items(), 6, seed=3))
    ranks = [iter(BatchLoader(Items(), 3, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(7):  # crosses epoch boundaries (3 global batches of 6 per epoch, 2 samples dropped)
        _, caps = next(single)
        parts = [next(it)[1] for it in ranks]
        assert parts[0] + parts[1] == caps and not set(parts[0]) & set(parts[1])
    # the same slicing for the per-step timesteps/noise drawn for the global batch
    draw = np.arange(12).reshape(6, 2)
    assert np.array_equal(np.concatenate([global_slice(draw, r, 3) for r in range(2)]), draw)
    with pytest.raises(ValueError, match=r"data.batch_size=8 x 3 ranks"):
        BatchLoader(Items(), 8, world_size=3)


def test_parallel_mode_and_launcher_must_agree(monkeypatch):
    for key in ("MS_ROLE", "MS_WORKER_NUM", "RANK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert msrun_world_size() == 1
    with pytest.raises(RuntimeError, match=r"parallel=data .* started by msrun.*msrun --worker_num=2"):
        init_parallel(OmegaConf.create({"mode": "data"}))
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    with pytest.raises(RuntimeError, match=r"started by msrun \(2 workers\) but parallel=single"):
        init_parallel(OmegaConf.create({"mode": "single"}))
    with pytest.raises(ValueError, match="parallel.mode='pipeline' is not one of: single, data, zero"):
        init_parallel(OmegaConf.create({"mode": "pipeline"}))


# ---------------------------------------------------------------- a real 2-rank job (slow)

SMALL = ["model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]", "model.num_heads=2",
         # caption dropout is drawn on the host for the global batch, so 2 ranks still equal 1 process
         "model.class_dropout_prob=0.5",
         "data.num_frames=4", "data.image_size=8", "data.dataset.speed=1", "data.dataset.num_samples=64", "task.max_steps=3",
         "task.ckpt_every=3", "task.log_every=1", "task.eval=null", "logger=none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ckpt(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def assert_same_training_state(got, ref, position):
    """Two checkpoint directories hold the same model, EMA, optimiser state, data position and loss.

    The same maths summed in a different order (e.g. a mean of 2 rank means vs one mean of 4) differs
    by fp32 rounding only, hence the tolerances."""
    import json

    for name in ("model.ckpt", "ema.ckpt", "optimizer.ckpt"):
        a, b = _ckpt(got / name), _ckpt(ref / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{k}")
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (got, ref))
    assert sa["data"] == sb["data"] == {"epoch": 0, "position": position}
    assert abs(sa["loss_avg"] - sb["loss_avg"]) < 1e-5 * abs(sb["loss_avg"])


@pytest.mark.slow
def test_msrun_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline"}
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={tmp_path / 'msrun'}", "--join=True", str(ROOT / "run.py"), "parallel=data",
           "data.batch_size=2", *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text() for p in (tmp_path / "msrun").glob("*.log")}
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n".join(v[-3000:] for v in logs.values())

    # one run directory for both ranks (and msrun's scheduler process), checkpoints by rank 0
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    dp = runs[0] / "checkpoints" / "step_000003"
    assert "step 3: weights identical on all 2 ranks" in (runs[0] / "run.log").read_text()

    # one process, global batch 4
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(ROOT / "run.py"), "data.batch_size=4", *SMALL, f"hydra.run.dir={single}"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    assert_same_training_state(dp, single / "checkpoints" / "step_000003", position=12)


@pytest.mark.slow
def test_multirun_under_msrun_makes_one_sweep_directory(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1"}
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    args = [a for a in SMALL if not a.startswith("task.max_steps")] + ["task.max_steps=2", "task.ckpt_every=2",
                                                                        "task.metric=loss", "data.batch_size=2"]
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={tmp_path / 'msrun'}", "--join=True", str(ROOT / "run.py"), "-m", "parallel=data",
           "optim.lr=1e-4,1e-3", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text() for p in (tmp_path / "msrun").glob("*.log")}
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n".join(v[-3000:] for v in logs.values())
    (sweep,) = list((tmp_path / "outputs" / "multiruns").iterdir())  # one sweep directory for all ranks
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert "step 2: weights identical on all 2 ranks" in (sweep / job / "run.log").read_text()
        assert (sweep / job / "checkpoints" / "step_000002" / "model.ckpt").is_file()
    # rank 0 alone reports the sweep's best
    assert [name for name, text in logs.items() if "sweep best: loss = " in text] == ["worker_0.log"]
