"""Data parallelism: per-rank data shards, start-up checks, and (slow) a real 2-rank msrun job on CPU
whose weights equal those of one process trained on the same global batch."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import ROOT, assert_same_training_state, msrun_output, run_cli, run_msrun
from opensora.data.loader import BatchLoader
from opensora.parallel import init_parallel, msrun_world_size
from opensora.parallel.strategy import global_rows


class Items:
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"video": np.full((1,), i, np.float32), "caption": f"c{i}"}


def test_rank_shards_together_equal_the_global_batch():
    single = iter(BatchLoader(Items(), 6, seed=3))
    ranks = [iter(BatchLoader(Items(), 3, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(7):  # crosses epoch boundaries (3 global batches of 6 per epoch, 2 samples dropped)
        caps = next(single)["caption"]
        parts = [next(it)["caption"] for it in ranks]
        assert parts[0] + parts[1] == caps and not set(parts[0]) & set(parts[1])
    # the same slicing for the per-step timesteps/noise drawn for the global batch
    draw = np.arange(12).reshape(6, 2)
    assert np.array_equal(np.concatenate([global_rows(draw, r, 2) for r in range(2)]), draw)
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


@pytest.mark.alone
@pytest.mark.slow
def test_msrun_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    proc, logs = run_msrun([str(ROOT / "run.py"), "parallel=data", "data.batch_size=2", *SMALL], tmp_path)
    assert proc.returncode == 0, msrun_output(proc, logs)

    # one run directory for both ranks (and msrun's scheduler process), checkpoints by rank 0
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    dp = runs[0] / "checkpoints" / "step_000003"
    assert "step 3: weights identical on all 2 ranks" in (runs[0] / "run.log").read_text()

    # one process, global batch 4
    single = tmp_path / "single"
    run_cli(["data.batch_size=4", *SMALL, f"hydra.run.dir={single}"], tmp_path)
    assert_same_training_state(dp, single / "checkpoints" / "step_000003", position=12)


@pytest.mark.alone
@pytest.mark.slow
def test_multirun_under_msrun_makes_one_sweep_directory(tmp_path):
    args = [a for a in SMALL if not a.startswith("task.max_steps")] + [
        "task.max_steps=2", "task.ckpt_every=2", "optimized_metric=train/final_loss_avg", "data.batch_size=2"]
    proc, logs = run_msrun([str(ROOT / "run.py"), "-m", "parallel=data", "optim.lr=1e-4,1e-3", *args], tmp_path)
    assert proc.returncode == 0, msrun_output(proc, logs)
    (sweep,) = list((tmp_path / "outputs" / "multiruns").iterdir())  # one sweep directory for all ranks
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert "step 2: weights identical on all 2 ranks" in (sweep / job / "run.log").read_text()
        assert (sweep / job / "checkpoints" / "step_000002" / "model.ckpt").is_file()
    # rank 0 alone reports the sweep's best
    assert [name for name, text in logs.items() if "sweep best: train/final_loss_avg = " in text] == ["worker_0.log"]


NODE = '''"""Runs msrun as a second node whose master is "another machine" (tests/test_parallel.py): on one machine
both nodes see the master address as local, and msrun would start a second scheduler."""
import sys

import mindspore.parallel.cluster.process_entity._api as api

api._is_local_ip = lambda ip: False
from mindspore.parallel.cluster.run import main  # noqa: E402

sys.argv[0] = "msrun"
sys.exit(main())
'''


@pytest.mark.alone
@pytest.mark.slow
def test_two_nodes_equal_one_process_on_the_global_batch(tmp_path):
    """The documented multi-node command, as two "nodes" of one rank each on this machine (node 1's msrun is told
    the master is remote), gives the weights one process trains on the global batch."""
    import os
    import subprocess
    import sys

    from helpers import cli_env, cores_alone, free_port

    run, port = tmp_path / "run", free_port()
    args = [str(ROOT / "run.py"), "parallel=data", "data.batch_size=2", *SMALL, f"hydra.run.dir={run}"]
    common = ["--worker_num=2", "--local_worker_num=1", "--master_addr=127.0.0.1", f"--master_port={port}",
              "--join=True"]
    env = cli_env(tmp_path)
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    (tmp_path / "node.py").write_text(NODE)
    with cores_alone():
        node0 = subprocess.Popen([msrun, *common, "--node_rank=0", f"--log_dir={tmp_path / 'node0'}", *args],
                                 cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        node1 = subprocess.run([sys.executable, str(tmp_path / "node.py"), *common, "--node_rank=1",
                                f"--log_dir={tmp_path / 'node1'}", *args], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)
        node0_rc = node0.wait(timeout=300)
    assert node0_rc == 0 and node1.returncode == 0, node1.stdout[-3000:]
    assert "step 3: weights identical on all 2 ranks" in (run / "run.log").read_text()
    single = tmp_path / "single"
    run_cli(["data.batch_size=4", *SMALL, f"hydra.run.dir={single}"], tmp_path)
    assert_same_training_state(run / "checkpoints" / "step_000003", single / "checkpoints" / "step_000003",
                               position=12)
