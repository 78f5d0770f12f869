"""Sequence parallelism (opensora/parallel/sequence.py): frame bookkeeping, the all-to-all emulation,
both temporal attentions on "virtual ranks" in one process, start-up checks, and (slow) real msrun
jobs on CPU: forward and gradients of a tiny STDiT equal to one process (2 ranks; 4 ranks = 2 groups
x 2), and train steps of `run.py parallel=sequence` equal to one process."""
from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from helpers import ROOT, assert_same_training_state, compose_cfg, msrun_output, run_cli, run_msrun
from opensora.model.stdit import Attention
from opensora.parallel import ParallelContext
from opensora.parallel.sequence import (
    GatherKVAttention,
    UlyssesAttention,
    alltoall_from_gathered,
    check_sequence_parallel,
    frame_range,
    frame_shard,
    resolve_attention,
)


# ---------------------------------------------------------------- frames of each rank


def test_ranks_of_a_group_hold_consecutive_frames_and_groups_split_the_batch():
    ctxs = [ParallelContext("sequence", r, 4, 2) for r in range(4)]
    assert [(c.data_rank, c.sequence_rank, c.data_size) for c in ctxs] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert ParallelContext("data", 3, 4).data_rank == 3 and ParallelContext("data", 3, 4).data_size == 4
    video = np.arange(2 * 3 * 8 * 2 * 2).reshape(2, 3, 8, 2, 2)
    parts = [frame_shard(video, c) for c in ctxs[:2]]
    assert [p.shape[2] for p in parts] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(parts, axis=2), video)
    np.testing.assert_array_equal(parts[1], video[:, :, 4:])
    assert frame_shard(video, ParallelContext("data", 1, 2)) is video
    assert frame_range(12, 3, 2) == (8, 12)
    with pytest.raises(ValueError, match="6 frames cannot be split evenly over 4 ranks"):
        frame_range(6, 4, 0)


# ---------------------------------------------------------------- all-to-all emulation


def _alltoall_reference(inputs, split_dim, concat_dim):
    """All-to-all by its definition: rank r receives part r of every rank's input, in rank order."""
    sp = len(inputs)
    return [np.concatenate([np.split(x, sp, axis=split_dim)[r] for x in inputs], axis=concat_dim) for r in range(sp)]


@pytest.mark.parametrize("sp,split_dim,concat_dim", [(2, 2, 3), (2, 2, 1), (3, 1, 0), (2, 0, 2)])
def test_alltoall_from_gathered_is_alltoall(sp, split_dim, concat_dim):
    rng = np.random.default_rng(sp)
    inputs = [rng.standard_normal((6, 6, 6, 2, 4)).astype(np.float32) for _ in range(sp)]
    gathered = ms.Tensor(np.concatenate(inputs))  # what AllGather along axis 0 gives every rank
    expected = _alltoall_reference(inputs, split_dim, concat_dim)
    for r in range(sp):
        got = alltoall_from_gathered(gathered, sp, r, split_dim, concat_dim).asnumpy()
        np.testing.assert_array_equal(got, expected[r])


def test_ulysses_exchanges_are_inverse():
    """frames -> heads ([3, B*S, H, T/sp, D]: split heads, concat frames) then heads -> frames (split
    frames, concat heads) gives every rank its own q back."""
    sp, rng = 2, np.random.default_rng(0)
    q = [rng.standard_normal((5, 4, 3, 2)).astype(np.float32) for _ in range(sp)]  # [B*S, H, T/sp, D] per rank
    gathered = ms.Tensor(np.concatenate([a[None] for a in q]))  # [sp * 1, B*S, H, T/sp, D]
    to_heads = [alltoall_from_gathered(gathered, sp, r, *UlyssesAttention.TO_HEADS)[0] for r in range(sp)]
    assert to_heads[0].shape == (5, 2, 6, 2)  # [B*S, H/sp, T, D]
    back = [alltoall_from_gathered(ops.concat(to_heads), sp, r, *UlyssesAttention.TO_FRAMES).asnumpy()
            for r in range(sp)]
    for r in range(sp):
        np.testing.assert_array_equal(back[r], q[r])


# ---------------------------------------------------------------- both attentions on virtual ranks


class StackedAllToAll(nn.Cell):
    """All-to-all among `sp` virtual ranks whose tensors are stacked along `stack_axis` of one tensor
    (one process runs all of them at once)."""

    def __init__(self, sp, split_dim, concat_dim, stack_axis):
        super().__init__()
        self.sp, self.split_dim, self.concat_dim, self.stack_axis = sp, split_dim, concat_dim, stack_axis

    def construct(self, x):
        ranks = ops.split(x, x.shape[self.stack_axis] // self.sp, axis=self.stack_axis)
        gathered = ops.concat(ranks, axis=0)
        out = [alltoall_from_gathered(gathered, self.sp, r, self.split_dim, self.concat_dim) for r in range(self.sp)]
        return ops.concat(out, axis=self.stack_axis)


class StackedGather(nn.Cell):
    """AllGather along axis 0 among virtual ranks stacked along axis 1."""

    def __init__(self, sp):
        super().__init__()
        self.sp = sp

    def construct(self, x):
        ranks = ops.split(x, x.shape[1] // self.sp, axis=1)
        return ops.tile(ops.concat(ranks, axis=0), (1, self.sp) + (1,) * (x.ndim - 2))


@pytest.mark.parametrize("kind", ["ulysses", "allgather"])
def test_temporal_attention_on_virtual_ranks_equals_attention_over_all_frames(kind):
    from opensora.parallel.sequence import ConcatGathered

    sp, Bs, T, C, H = 2, 3, 6, 16, 4
    attn = Attention(C, num_heads=H, qkv_bias=True)
    rng = np.random.default_rng(1)
    for p in attn.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    x = rng.standard_normal((Bs, T, C)).astype(np.float32)
    full = attn(ms.Tensor(x)).asnumpy()  # [B*S, T, C]
    stacked = np.concatenate(np.split(x, sp, axis=1))  # rank r's frames in rows [r*Bs, (r+1)*Bs)
    if kind == "ulysses":
        cell = UlyssesAttention(attn, StackedAllToAll(sp, *UlyssesAttention.TO_HEADS, stack_axis=1),
                                StackedAllToAll(sp, *UlyssesAttention.TO_FRAMES, stack_axis=0))
    else:
        cell = GatherKVAttention(attn, ConcatGathered(StackedGather(sp), sp, axis=3))
    out = cell(ms.Tensor(stacked)).asnumpy()
    np.testing.assert_allclose(np.concatenate(np.split(out, sp), axis=1), full, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- start-up checks


def _cfg(tmp_path, *overrides):
    return compose_cfg(["parallel=sequence", "model.hidden_size=32", "model.patch_size=[1,3,3]", *overrides], tmp_path)


def test_start_up_checks_name_both_settings(tmp_path):
    cfg = _cfg(tmp_path)  # demo: 8 frames, 4 heads
    assert check_sequence_parallel(cfg, 2) == 2
    assert check_sequence_parallel(_cfg(tmp_path, "parallel.sequence_size=2"), 4) == 2
    with pytest.raises(RuntimeError, match=r"parallel=sequence .* msrun .*not started by msrun"):
        check_sequence_parallel(cfg, None)
    with pytest.raises(ValueError, match=r"parallel.sequence_size=3 must divide .* \(--worker_num=4\)"):
        check_sequence_parallel(_cfg(tmp_path, "parallel.sequence_size=3"), 4)
    with pytest.raises(ValueError, match=r"parallel.sequence_size=4 does not divide the 6 frames after patching "
                                         r"\(model.input_size\[0\]=6 .*data.num_frames=6, / model.patch_size\[0\]=1\)"):
        check_sequence_parallel(_cfg(tmp_path, "data.num_frames=6"), 4)
    with pytest.raises(ValueError, match=r"sequence_size=2 does not divide the 3 frames after patching"):
        check_sequence_parallel(_cfg(tmp_path, "data.num_frames=6", "model.patch_size=[2,3,3]"), 2)
    odd_heads = ("model.num_heads=2",)
    with pytest.raises(ValueError, match=r"model.num_heads=2 is not divisible by parallel.sequence_size=4: Ulysses"):
        check_sequence_parallel(_cfg(tmp_path, *odd_heads, "parallel.sequence_attention=ulysses",
                                     "data.num_frames=8"), 4)
    # the gathered keys/values need no head split; auto is allgather on CPU and ulysses on Ascend
    assert check_sequence_parallel(_cfg(tmp_path, *odd_heads, "data.num_frames=8"), 4) == 4
    with pytest.raises(ValueError, match=r"model.num_heads=2 .*parallel.sequence_attention=auto on Ascend"):
        check_sequence_parallel(_cfg(tmp_path, *odd_heads, "device.target=Ascend"), 4)
    assert resolve_attention("auto", "CPU") == "allgather" and resolve_attention("auto", "Ascend") == "ulysses"
    with pytest.raises(ValueError, match="parallel.sequence_attention='ring'"):
        resolve_attention("ring", "CPU")
    from hydra.errors import ConfigCompositionException  # the typed section refuses it at compose time

    with pytest.raises(ConfigCompositionException, match="sequence_attention=ring"):
        _cfg(tmp_path, "parallel.sequence_attention=ring")
    with pytest.raises(ValueError, match=r"parallel=sequence is implemented for task=train only.*sample"):
        check_sequence_parallel(_cfg(tmp_path, "task=sample"), 2)


# ---------------------------------------------------------------- real msrun jobs (slow)


@pytest.mark.alone
@pytest.mark.slow
@pytest.mark.parametrize("workers,sequence_size", [(2, 2), (4, 2)])
def test_msrun_forward_and_gradients_equal_one_process(tmp_path, workers, sequence_size):
    """Tiny STDiT (hidden 32, depth 2, 4 frames, 2 heads) with random weights: the reassembled output,
    the input gradient and every parameter gradient (mean over ranks) equal one process on the whole
    batch, for Ulysses (emulated AlltoAll) and allgather attention (with recompute). 4 ranks: two
    data-parallel groups of 2 (CPU emulates the groups on the world group)."""
    out = tmp_path / "result"
    proc, logs = run_msrun([str(ROOT / "tests" / "sequence_parallel_worker.py"), str(out), str(sequence_size),
                            "pynative"], tmp_path, workers=workers)
    assert proc.returncode == 0, msrun_output(proc, logs)
    result = json.loads((out / "result.json").read_text())
    assert (result["world"], result["sequence_size"]) == (workers, sequence_size)
    for case in ("ulysses_recompute_None", "allgather_recompute_all"):
        r = result[case]
        assert r["names_kept"] and r["n_grads"] == 53
        # fp32, the same per-element maths on smaller tensors. Not bitwise: the CPU kernels (oneDNN) may
        # pick other code paths for a rank's smaller matmuls and sums than for the whole batch, and ranks
        # add partial gradients in another order. Measured with ONEDNN_MAX_CPU_ISA=AVX2 (the AVX-512 path
        # gives 0): output 1.5e-6 of its scale; input and parameter gradients up to 1.5e-4 relative (the
        # sharp random-weight softmax amplifies rounding in the backward pass). A real error (a frame
        # lost or misplaced, a missing or doubled reduction) is O(1) in all of them.
        assert r["out_max_abs_err"] <= 1e-5 * r["out_scale"], (case, r)
        # the loss is mean(out * R) with |R| ~ 1: bounded by the output's tolerance
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * r["out_scale"], (case, r)
        assert r["gx_rel_err"] < 1e-3, (case, r)
        assert r["grad_rel_err_max"] < 1e-3, (case, r)


SMALL = ["model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]", "model.num_heads=2",
         "model.class_dropout_prob=0.5",  # every rank of the group must drop the same captions
         "data.num_frames=4", "data.image_size=8", "data.dataset.speed=1", "data.dataset.num_samples=64", "data.batch_size=2",
         "task.max_steps=3", "task.ckpt_every=3", "task.log_every=1", "task.eval=null", "logger=none"]


@pytest.mark.alone
@pytest.mark.slow
def test_msrun_sequence_parallel_training_equals_one_process(tmp_path):
    """`run.py parallel=sequence` on 2 ranks (each holds 2 of the 4 frames, Ulysses attention with the
    emulated AlltoAll; graph mode) trains the same weights as one process in 3 steps, caption dropout on."""
    proc, logs = run_msrun([str(ROOT / "run.py"), "parallel=sequence", "parallel.sequence_attention=ulysses", *SMALL],
                           tmp_path)
    assert proc.returncode == 0, msrun_output(proc, logs)
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # one run directory for both ranks
    log_text = (runs[0] / "run.log").read_text()
    assert "this rank holds frames [0, 2) of 4 (after patching), ulysses temporal attention" in log_text
    assert "step 3: weights identical on all 2 ranks" in log_text
    sp = runs[0] / "checkpoints" / "step_000003"

    single = tmp_path / "single"
    run_cli([*SMALL, f"hydra.run.dir={single}"], tmp_path)
    assert_same_training_state(sp, single / "checkpoints" / "step_000003", position=6)


@pytest.mark.alone
@pytest.mark.slow
def test_bad_sequence_settings_stop_msrun_at_start_up(tmp_path):
    proc, logs = run_msrun([str(ROOT / "run.py"), "parallel=sequence", "data.num_frames=3", "model.patch_size=[1,3,3]",
                            "logger=none"], tmp_path)
    assert proc.returncode != 0
    text = proc.stdout + "".join(logs.values())
    assert "parallel.sequence_size=2 does not divide the 3 frames after patching" in text
    assert "data.num_frames=3" in text
