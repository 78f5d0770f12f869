"""Unit tests of the train task's parts: timestep sampling, LR schedule, loader state, checkpoints."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest

from opensora.data.loader import BatchLoader
from opensora.optim import ConstantLR, CosineLR
from opensora.scheduler.timestep_sampler import PowerTimesteps, UniformTimesteps
from opensora.utils.checkpoint import CheckpointManager, load_params_into, load_state, resolve_checkpoint_dir


def test_timestep_sampling():
    rng = np.random.default_rng(0)
    t = UniformTimesteps()(rng, 200_000, 1000)
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999
    assert abs(t.mean() - 499.5) < 3
    t = PowerTimesteps(2.0)(np.random.default_rng(0), 200_000, 1000)
    # u^(1/2) has mean 2/3 -> E[t] ~ 1000*2/3 - 0.5
    assert abs(t.mean() - (1000 * 2 / 3 - 0.5)) < 3 and t.max() == 999
    with pytest.raises(ValueError, match="timestep_sampling.power"):
        PowerTimesteps(0.0)


def test_lr_schedule_values():
    f = dict(base_lr=1e-3, max_steps=100)
    assert ConstantLR(**f, warmup_steps=10)(0) == pytest.approx(1e-4)
    assert ConstantLR(**f, warmup_steps=10)(9) == pytest.approx(1e-3)
    assert ConstantLR(**f)(50) == 1e-3
    assert CosineLR(**f, warmup_steps=10, min_lr=1e-4)(10) == pytest.approx(1e-3)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.5))
    assert CosineLR(**f, warmup_steps=10, min_lr=1e-4)(55) == pytest.approx(mid)
    assert CosineLR(**f, min_lr=1e-4)(100) == pytest.approx(1e-4)


class Items:
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"video": np.full((1,), i, np.float32), "caption": f"c{i}"}


def test_loader_resumes_exactly_mid_epoch():
    full = BatchLoader(Items(), 3, seed=5)
    it = iter(full)
    ref = [next(it)["caption"] for _ in range(7)]  # crosses the epoch boundary (3 batches of 3 per epoch)
    part = BatchLoader(Items(), 3, seed=5)
    it = iter(part)
    first = [next(it)["caption"] for _ in range(4)]
    resumed = BatchLoader(Items(), 3, seed=5)
    resumed.load_state(part.state())
    it = iter(resumed)
    assert first + [next(it)["caption"] for _ in range(3)] == ref
    # every epoch visits distinct samples; epochs are shuffled differently
    assert len(set(sum(ref[:3], []))) == 9 and ref[:3] != ref[3:6]
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(Items(), 11)


def test_checkpoints_atomic_pruned_and_loadable(tmp_path):
    w = {"a.weight": ms.Parameter(ms.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), name="x.a.weight")}
    opt = {"exp_avg.a.weight": ms.Parameter(ms.Tensor(np.ones((2, 3), np.float32)), name="exp_avg.a.weight")}
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, w, w, opt, {"data": {"epoch": 0, "position": step}})
    assert [p.name for p in mgr.list()] == ["step_000002", "step_000003"]
    assert mgr.latest().name == "step_000003" and load_state(mgr.latest())["data"]["position"] == 3
    # a half-written checkpoint (crash before the rename) is never picked up
    (tmp_path / "checkpoints" / ".tmp-step_000004").mkdir()
    assert mgr.latest().name == "step_000003"
    assert resolve_checkpoint_dir(tmp_path) == mgr.latest()
    assert resolve_checkpoint_dir(tmp_path / "checkpoints" / "latest") == mgr.latest()
    target = {"a.weight": ms.Parameter(ms.Tensor(np.zeros((2, 3), np.float32)), name="other")}
    load_params_into(target, mgr.latest() / "model.ckpt")
    np.testing.assert_array_equal(target["a.weight"].asnumpy(), np.arange(6).reshape(2, 3))
    bad = {"a.weight": ms.Parameter(ms.Tensor(np.zeros((3, 2), np.float32)), name="b")}
    with pytest.raises(ValueError, match=r"a.weight has shape \(2, 3\), expected \(3, 2\)"):
        load_params_into(bad, mgr.latest() / "model.ckpt")
    with pytest.raises(KeyError, match="lacks 1 parameters"):
        load_params_into({"nope": bad["a.weight"]}, mgr.latest() / "model.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_checkpoint_dir(tmp_path / "elsewhere" / "checkpoints")
