"""Optimizer-state sharding (`parallel=zero`): the sharding plan, the state layout, start-up checks,
and (slow) real 2-rank msrun jobs on CPU: zero equals one process on the global batch and resumes
across rank counts, each rank holds about half the optimizer state, and a failing rank stops the job."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import ROOT, assert_same_training_state, msrun_output, run_cli, run_msrun
import opensora.parallel as parallel
from opensora.parallel import ParallelContext, init_parallel, sync_ranks
from opensora.parallel.zero import ZeroState, plan_shards

SMALL = ["model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]", "model.num_heads=2",
         "data.num_frames=4", "data.image_size=8", "data.dataset.speed=1", "data.dataset.num_samples=64",
         "task.log_every=1", "task.eval=null", "logger=none"]


# ---------------------------------------------------------------- the plan (fast)

def _check_plan(sizes, world):
    plan = plan_shards(sizes, world)
    owned = [plan.owned(r) for r in range(world)]
    flat = sorted(i for o in owned for i in o)
    assert flat == list(range(len(sizes)))  # every parameter owned exactly once
    assert all(len(o) > 0 for o in owned)
    loads = [plan.load(r) for r in range(world)]
    assert sum(loads) == sum(sizes)
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first bound
    assert plan == plan_shards(sizes, world)  # deterministic: every rank computes the same plan
    return plan, loads


def test_plan_owns_every_parameter_once_and_balances():
    # equal sizes split exactly
    _, loads = _check_plan([10] * 8, 2)
    assert loads == [40, 40]
    _, loads = _check_plan([10] * 9, 3)
    assert loads == [30, 30, 30]
    # by hand, largest first to the lighter rank: 7 -> r0, 5 -> r1, 4 -> r1 (5 < 7), 3 -> r0 (7 < 9), 1 -> r1 (9 < 10)
    plan, loads = _check_plan([3, 7, 1, 5, 4], 2)
    assert plan.owners == (0, 0, 1, 1, 1) and loads == [10, 10]
    # many uneven sizes (a transformer's mix of matrices, vectors and tables): near-perfect halves
    rng = np.random.default_rng(0)
    sizes = list(rng.choice([1152, 1152 * 6, 1152 * 1152, 1152 * 3456, 1152 * 4608, 4096 * 1152], size=600))
    _, loads = _check_plan(sizes, 2)
    assert abs(loads[0] - loads[1]) / sum(loads) < 0.005
    _, loads = _check_plan(sizes, 8)
    assert max(loads) / (sum(loads) / 8) < 1.01
    # one parameter dominating: it alone goes to one rank, everything else to the other
    plan, loads = _check_plan([1000, 1, 1, 1], 2)
    assert plan.owned(0) == (0,) and loads == [1000, 3]


def test_plan_needs_a_parameter_per_rank():
    with pytest.raises(ValueError, match=r"parallel=zero: 3 trainable parameters .* over 4 ranks"):
        plan_shards([5, 5, 5], 4)
    _check_plan([0, 0, 7], 3)  # empty parameters still go one per rank


def _tiny_model():
    import mindspore as ms

    from opensora.model import STDiT

    ms.set_seed(0)
    return STDiT(input_size=(4, 8, 8), in_channels=3, hidden_size=32, depth=1, num_heads=2, caption_channels=64,
                 model_max_length=8)


def test_sharded_state_layout_is_the_unsharded_optimizers():
    """Each rank's AdamW over its own parameters, described by ZeroState, gives exactly the keys, shapes
    and dtypes the unsharded AdamW has (what `single`/`data` checkpoints hold); the ranks' own keys
    partition them, and each holds about half of the bytes."""
    from mindspore.experimental.optim import AdamW

    from opensora.train.state import optimizer_state

    model = _tiny_model()
    params = dict(model.parameters_and_names())
    names = [n for n, p in params.items() if p.requires_grad]
    weights = [params[n] for n in names]
    full = optimizer_state(AdamW(weights, lr=1e-3), weights)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in full.items()}

    world = 2
    plan = plan_shards([w.size for w in weights], world)
    per_rank, local_bytes = [], []
    for rank in range(world):
        zero = ZeroState(plan, rank, names, weights)
        local = optimizer_state(AdamW([weights[i] for i in zero.own], lr=1e-3), weights)
        entries, shared = zero.optimizer_entries(local)
        assert shared == ["state_step"]
        described = {e.key: e.shape for e in entries}
        described.update({k: tuple(local[k].shape) for k in shared})
        assert described == {k: s for k, (s, _) in layout.items()}
        assert {e.key for e in entries if e.owner == rank} == set(local) - set(shared)
        assert all(np.dtype(e.dtype) == np.float32 for e in entries)
        per_rank.append(set(local) - set(shared))
        nbytes, total = zero.state_bytes(local)
        assert total == sum(int(v.size) * int(v.itemsize) for v in full.values())
        local_bytes.append(nbytes)
        assert 0.45 < nbytes / total < 0.55
        ema_local, ema_total = zero.ema_bytes({n: params[n] for n in zero.own_names})
        assert ema_total == sum(int(w.size) * 4 for w in weights) and 0.45 < ema_local / ema_total < 0.55
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(full) - {"state_step"}


def test_zero_start_up_checks_name_the_setting_and_world_size(monkeypatch):
    for key in ("MS_ROLE", "MS_WORKER_NUM", "RANK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match=r"parallel=zero .*started by msrun.*world size 1"):
        init_parallel(OmegaConf.create({"mode": "zero", "device_target": "CPU"}))
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "1")
    with pytest.raises(RuntimeError, match=r"parallel=zero shards .* world size is 1 \(msrun --worker_num=1\)"):
        init_parallel(OmegaConf.create({"mode": "zero", "device_target": "CPU"}))


def test_sync_ranks_waits_past_the_collectives_limit_and_times_out_naming_the_setting(tmp_path, monkeypatch):
    """The file barrier used where a rank can be far behind: rank 0 (this process) waits for rank 1's
    file however late it comes, fails after parallel.sync_timeout_s naming the missing rank, and removes
    the previous barrier's files (and earlier jobs') once all ranks have passed the next one."""
    import threading

    monkeypatch.setattr(parallel, "_SYNCED", [])
    monkeypatch.setattr(parallel, "_CONTEXT", ParallelContext("zero", 0, 2, job=7, sync_timeout_s=5.0))
    (tmp_path / "3-old-rank0").touch()  # another job's leftover
    late = threading.Timer(0.6, lambda: (tmp_path / "7-a-rank1").touch())
    late.start()
    t0 = time.monotonic()
    sync_ranks(tmp_path, "a")
    assert time.monotonic() - t0 >= 0.5
    late.join()
    (tmp_path / "7-b-rank1").touch()
    sync_ranks(tmp_path, "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7-b-rank0", "7-b-rank1"]

    monkeypatch.setattr(parallel, "_CONTEXT", ParallelContext("zero", 0, 2, job=7, sync_timeout_s=0.3))
    with pytest.raises(TimeoutError, match=r"rank 0 waited 0.3 s \(parallel.sync_timeout_s\) at 'c' for rank\(s\) \[1\]"):
        sync_ranks(tmp_path, "c")
    monkeypatch.setattr(parallel, "_CONTEXT", ParallelContext())
    sync_ranks(tmp_path / "unused", "d")  # one process: nothing to wait for, nothing written
    assert not (tmp_path / "unused").exists()


# ---------------------------------------------------------------- real 2-rank jobs (slow)

# caption dropout on (drawn on the host for the global batch), a constant LR (the demo's cosine depends on
# task.max_steps, which the resumed runs change) and clipping that is active.
ZERO_ARGS = [*SMALL, "model.class_dropout_prob=0.5", "optim/lr_schedule=constant", "optim.grad_clip=0.05",
             "task.ckpt_every=1", "task.keep_last=10"]


@pytest.mark.alone
@pytest.mark.slow
def test_zero_resumes_across_rank_counts_and_equals_one_process(tmp_path):
    """One run, three legs: 1 process (steps 1-3) -> 2 ranks under zero (4-5) -> 1 process (6-7),
    against one uninterrupted process (1-7) on the same global batch of 4, with caption dropout 0.5.
    Proves: zero's update (sharded AdamW + EMA, all-gathered weights, global-norm clipping) equals the
    unsharded one; an unsharded checkpoint resumes under zero and a zero checkpoint in one process;
    each rank holds about half of the optimizer state and EMA."""
    ref = tmp_path / "reference"
    run_cli([*ZERO_ARGS, "data.batch_size=4", "task.max_steps=7", f"hydra.run.dir={ref}"], tmp_path)
    run = tmp_path / "run"
    run_cli([*ZERO_ARGS, "data.batch_size=4", "task.max_steps=3", f"hydra.run.dir={run}"], tmp_path)

    # resumed from the run's directory: only what changes is given (the mode, the per-rank batch, the length)
    proc, logs = run_msrun([str(ROOT / "run.py"), f"resume={run}", "parallel=zero", "data.batch_size=2",
                            "task.max_steps=5"], tmp_path)
    assert proc.returncode == 0, msrun_output(proc, logs)
    log0 = logs["worker_0.log"]
    assert "resumed from" in log0 and "step_000003 at step 3" in log0
    assert "step 5: weights identical on all 2 ranks" in (run / "run.log").read_text()
    for what in ("optimizer state", "EMA"):
        sizes = {int(r): (float(x), float(y)) for r, x, y in
                 re.findall(rf"{what} on rank (\d): ([\d.]+) MB of ([\d.]+) MB", log0)}
        assert sorted(sizes) == [0, 1], log0[-3000:]
        for r, (mine, total) in sizes.items():
            assert 0.45 < mine / total < 0.55, (what, r, mine, total)
    for step in (4, 5):
        assert_same_training_state(run / "checkpoints" / f"step_{step:06d}", ref / "checkpoints" / f"step_{step:06d}",
                                   rng=True)

    run_cli([f"resume={run}", "parallel=single", "data.batch_size=4", "task.max_steps=7"], tmp_path)
    for step in (6, 7):
        assert_same_training_state(run / "checkpoints" / f"step_{step:06d}", ref / "checkpoints" / f"step_{step:06d}",
                                   rng=True)


FAIL_ON_RANK_1 = '''"""Runs run.py with rank 1 raising at its 3rd train step (written by tests/test_zero.py)."""
import runpy
import sys
import time

sys.path.insert(0, {root!r})
import opensora.train.batch as batch
from opensora.parallel import get_parallel

draw = batch.draw_step
calls = []


def failing(*args, **kwargs):
    calls.append(1)
    if get_parallel().rank == 1 and len(calls) == 3:
        with open({stamp!r}, "w") as f:
            f.write(str(time.time()))
        raise RuntimeError("injected failure on rank 1 at step 3")
    return draw(*args, **kwargs)


batch.draw_step = failing  # the train feed's per-step draw (opensora/train/batch.py)
sys.argv[0] = {run!r}
runpy.run_path({run!r}, run_name="__main__")
'''


@pytest.mark.alone
@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_its_error(tmp_path):
    """Rank 1 raises mid-training while rank 0 waits in the step's AllReduce: msrun must end the whole
    job non-zero soon after (it kills the other workers; its scheduler notices the lost node within
    ~30 s), and the rank's error must be in that rank's log."""
    stamp = tmp_path / "failed_at"
    script = tmp_path / "fail_rank1.py"
    script.write_text(FAIL_ON_RANK_1.format(root=str(ROOT), stamp=str(stamp), run=str(ROOT / "run.py")))
    proc, logs = run_msrun([str(script), "parallel=zero", *SMALL, "data.batch_size=2", "task.max_steps=20",
                            "task.ckpt_every=null", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=600)
    ended = time.time()
    assert proc.returncode != 0
    assert stamp.is_file(), "rank 1 never reached its 3rd step:\n" + "\n".join(v[-3000:] for v in logs.values())
    assert ended - float(stamp.read_text()) < 120, "the job took too long to stop after the failure"
    assert "RuntimeError: injected failure on rank 1 at step 3" in logs["worker_1.log"]
    assert "injected failure" not in logs["worker_0.log"]
