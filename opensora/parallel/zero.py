"""Optimizer-state sharding (ZeRO stage 1) over the ranks msrun starts: `parallel=zero`.

Every rank holds the whole model and computes the gradients of its own slice of the global batch, as
with `parallel=data`. What is sharded is the training state kept besides the weights: each trainable
parameter is owned by exactly one rank (`plan_shards`, balanced by size), and only its owner keeps its
AdamW moments and its EMA copy and updates them. One step:

    loss and grads of the local batch -> one flat AllReduce, mean over the ranks (`MeanOverRanks`; the
        gradient in full: ReduceScatter does not exist on CPU)
    -> global-norm clip over the whole gradient (identical to `data`)
    -> each rank: AdamW and EMA on the parameters it owns (state only for those)
    -> AllGather of the owned, updated weights -> every rank writes the parameters the others own

so every rank ends each step with the weights `parallel=data` would have. Gradients are not sharded
(that would be ZeRO-2 and needs ReduceScatter); the AdamW moments (and the EMA) are.

Checkpoints are written in the layout `single` and `data` write: at a save the owners' moments and
EMA values are all-gathered bucket by bucket (`gather_owned`) and rank 0 writes full files. A
checkpoint therefore resumes under any mode and on any number of ranks: each rank loads the entries
of the parameters it owns in its own plan.

On Ascend, MindSpore's parallel optimizer does the sharding instead (`configure_native`): weights and
optimizer state are sliced by the framework. That path is not exercised by this repository's tests
(no Ascend device here).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from opensora.parallel.strategy import ReplicatedStrategy, Update, make_ema
from opensora.utils.tensor_files import to_numpy

log = logging.getLogger(__name__)

# Elements all-gathered per collective when a checkpoint is assembled (256 MB of float32 per rank).
GATHER_BUCKET = 1 << 26


@dataclass(frozen=True)
class ShardPlan:
    """Which rank owns each trainable parameter (in the optimiser's parameter order)."""

    owners: tuple[int, ...]
    sizes: tuple[int, ...]
    world_size: int

    def owned(self, rank: int) -> tuple[int, ...]:
        """Indices of the parameters `rank` owns, in parameter order."""
        return tuple(i for i, o in enumerate(self.owners) if o == rank)

    def load(self, rank: int) -> int:
        """Number of elements `rank` owns."""
        return sum(s for s, o in zip(self.sizes, self.owners) if o == rank)


def plan_shards(sizes: Sequence[int], world_size: int) -> ShardPlan:
    """Give each parameter (by element count) to one of `world_size` ranks, balancing the elements.

    Largest first, each to the rank with the fewest elements so far (ties: fewer parameters, then the
    lower rank); deterministic, so every rank computes the same plan. The heaviest rank exceeds the
    lightest by at most one parameter's size.
    """
    sizes = tuple(int(s) for s in sizes)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(sizes) < world_size:
        raise ValueError(f"parallel=zero: {len(sizes)} trainable parameters cannot be shared out over {world_size} "
                         "ranks (each rank must own at least one); use fewer ranks or parallel=data")
    loads, counts, owners = [0] * world_size, [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], counts[r], r))
        owners[i] = r
        loads[r] += sizes[i]
        counts[r] += 1
    return ShardPlan(tuple(owners), sizes, world_size)


class MeanOverRanks(nn.Cell):
    """(loss, grads) averaged over the ranks with one AllReduce of one flat float32 buffer.

    Under zero the ranks compile different graphs (each updates other parameters), and on CPU the
    collectives of a graph must run in the same order on every rank or they exchange mismatched
    buffers. One AllReduce here, and one AllGather after the update that depends on it
    (`ShareWeights`), keep that order fixed. The arithmetic is `parallel=data`'s: the loss sum divided
    by the number of ranks, each gradient sum multiplied by its reciprocal.
    """

    def __init__(self, weights: Sequence, world_size: int):
        super().__init__()
        spans, start = [], 1  # element 0 carries the loss
        for p in weights:
            spans.append((start, int(p.size), tuple(p.shape)))
            start += int(p.size)
        self.spans = tuple(spans)
        self.allreduce = ops.AllReduce()
        self.world = float(world_size)
        self.recip = ms.Tensor(1.0 / world_size, ms.float32)

    def construct(self, loss, grads):
        flat = ops.concat([loss.reshape(1)] + [g.reshape(-1) for g in grads])
        total = self.allreduce(flat)
        grads = tuple([total[start:start + size].reshape(shape) * self.recip for start, size, shape in self.spans])
        return total[0] / self.world, grads


class ShareWeights(nn.Cell):
    """All-gathers the weights each rank updated and writes the parameters other ranks own.

    Each rank packs the parameters it owns into one flat float32 buffer of `width` elements (the
    largest rank's share; shorter shares are zero-padded), one AllGather makes the [world * width]
    buffer, and every parameter owned elsewhere is cut out of it at a fixed offset. Called after the
    owners' update, it leaves every rank with identical weights.
    """

    def __init__(self, weights: Sequence, plan: ShardPlan, rank: int):
        super().__init__()
        for p in weights:
            if p.dtype != ms.float32:
                raise TypeError(f"parallel=zero expects float32 master weights, {p.name} is {p.dtype}")
        self.weights = ms.ParameterTuple(weights)
        self.own = plan.owned(rank)
        width = max(plan.load(r) for r in range(plan.world_size))
        pad = width - plan.load(rank)
        self.padding = ms.Tensor(np.zeros(pad, np.float32)) if pad else None
        recv = []  # (parameter index, start in the gathered buffer, size, shape) of what the others own
        for r in range(plan.world_size):
            start = r * width
            for i in plan.owned(r):
                if r != rank:
                    recv.append((i, start, int(plan.sizes[i]), tuple(weights[i].shape)))
                start += plan.sizes[i]
        self.recv = tuple(recv)
        self.gather = ops.AllGather()

    def construct(self):
        parts = [self.weights[i].reshape(-1) for i in self.own]
        if self.padding is not None:
            parts.append(self.padding)
        gathered = self.gather(ops.concat(parts))  # [world * width]
        for i, start, size, shape in self.recv:
            ops.assign(self.weights[i], gathered[start:start + size].reshape(shape))
        return True


@dataclass(frozen=True)
class Entry:
    """One tensor of a sharded state: its checkpoint key, owner rank, shape and numpy dtype."""

    key: str
    owner: int
    shape: tuple[int, ...]
    dtype: np.dtype


class ZeroState:
    """This rank's share of the optimiser state and EMA, and how to assemble the full state.

    names: the trainable parameters' checkpoint keys in optimiser order; params: those Parameters.
    Build it together with the optimiser: the optimiser names a parameter's state after the
    Parameter's `.name` at that moment, which MindSpore may prefix later when cells are nested.
    """

    def __init__(self, plan: ShardPlan, rank: int, names: Sequence[str], params: Sequence):
        self.plan, self.rank = plan, rank
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self.param_names = [p.name for p in params]
        self.own = plan.owned(rank)
        self.own_names = [self.names[i] for i in self.own]

    # ------------------------------------------------------------------ layouts
    def ema_entries(self, ema: Mapping) -> list[Entry]:
        """EMA: one fp32 copy per trainable parameter, under the parameter's key."""
        dtype = np.float32 if not ema else _np_dtype(next(iter(ema.values())))
        return [Entry(n, self.plan.owners[i], self.shapes[i], dtype) for i, n in enumerate(self.names)]

    def optimizer_entries(self, opt_state: Mapping) -> tuple[list[Entry], list[str]]:
        """(per-parameter state entries of all ranks, keys of the replicated entries such as the step count).

        The optimiser names a parameter's state `<prefix>.<parameter name>` (AdamW: exp_avg, exp_avg_sq,
        max_exp_avg_sq); the prefixes are read off this rank's own optimiser, whose keys must then be
        exactly the owned parameters' state plus the replicated entries.
        """
        by_name = sorted(((n, i) for i, n in enumerate(self.param_names)), key=lambda x: -len(x[0]))
        prefixes: list[str] = []
        shared: list[str] = []
        dtypes: dict[str, np.dtype] = {}
        for key, value in opt_state.items():
            match = next(((n, i) for n, i in by_name if key.endswith("." + n)), None)
            if match is None:
                shared.append(key)
                continue
            n, i = match
            if self.plan.owners[i] != self.rank:
                raise RuntimeError(f"parallel=zero: rank {self.rank}'s optimiser holds {key}, the state of a parameter "
                                   f"rank {self.plan.owners[i]} owns")
            prefix = key[: -len(n) - 1]
            if prefix not in prefixes:
                prefixes.append(prefix)
            dtypes.setdefault(prefix, _np_dtype(value))
        entries = [Entry(f"{prefix}.{n}", self.plan.owners[i], self.shapes[i], dtypes[prefix])
                   for i, n in enumerate(self.param_names) for prefix in prefixes]
        expected = {e.key for e in entries if e.owner == self.rank} | set(shared)
        if expected != set(opt_state):
            raise RuntimeError("parallel=zero: this rank's optimiser state does not match its shard; unexpected "
                               f"{sorted(set(opt_state) - expected)[:5]}, missing {sorted(expected - set(opt_state))[:5]}")
        return entries, shared

    # ------------------------------------------------------------------ gathering (collective)
    def full_ema(self, ema: Mapping, keep: bool = True) -> dict:
        """The whole EMA {key: Tensor} (all ranks must call; ranks with keep=False take part but keep
        nothing)."""
        return _as_tensors(gather_owned(ema, self.ema_entries(ema), self.rank, self.plan.world_size, keep=keep))

    def full_optimizer_state(self, opt_state: Mapping, keep: bool = True) -> dict:
        """The whole optimiser state {key: Tensor} in the unsharded layout (all ranks must call; ranks
        with keep=False take part but keep nothing)."""
        entries, shared = self.optimizer_entries(opt_state)
        full = gather_owned(opt_state, entries, self.rank, self.plan.world_size, keep=keep)
        if not keep:
            return {}
        out = {k: opt_state[k] for k in shared}
        out.update(_as_tensors(full))
        return out

    # ------------------------------------------------------------------ memory report
    def state_bytes(self, opt_state: Mapping) -> tuple[int, int]:
        """(bytes of optimiser state on this rank, bytes the whole unsharded state takes)."""
        entries, shared = self.optimizer_entries(opt_state)
        shared_bytes = sum(_nbytes(opt_state[k]) for k in shared)
        local = sum(_nbytes(v) for v in opt_state.values())
        total = shared_bytes + sum(math.prod(e.shape) * np.dtype(e.dtype).itemsize for e in entries)
        return local, total

    def ema_bytes(self, ema: Mapping) -> tuple[int, int]:
        """(bytes of EMA on this rank, bytes of the whole EMA)."""
        return (sum(_nbytes(v) for v in ema.values()),
                sum(math.prod(e.shape) * np.dtype(e.dtype).itemsize for e in self.ema_entries(ema)))


def gather_owned(local: Mapping, entries: Sequence[Entry], rank: int, world_size: int,
                 keep: bool = True, bucket: int = GATHER_BUCKET) -> dict[str, np.ndarray]:
    """Assemble tensors each held by one rank: {key: array} of every entry (all ranks must call).

    `local` holds this rank's entries (owner == rank). Entries are sent in order, in buckets of about
    `bucket` elements: in each, every rank packs its own entries into a float32 buffer padded to the
    largest rank's share, and one AllGather delivers all of them. Values come back in each entry's dtype
    (exactly: float16 and float32 survive the float32 buffer; bfloat16, which numpy lacks, comes back
    as float32); float32 values are views of the received buffers, not copies.
    """
    allgather = ops.AllGather()
    out: dict[str, np.ndarray] = {}
    for group in _buckets(entries, bucket):
        shares = [[e for e in group if e.owner == r] for r in range(world_size)]
        width = max(sum(math.prod(e.shape) for e in s) for s in shares)
        if width == 0:
            continue
        buf = np.zeros(width, np.float32)
        offset = 0
        for e in shares[rank]:
            value = to_numpy(local[e.key]).astype(np.float32).reshape(-1)
            buf[offset:offset + value.size] = value
            offset += value.size
        gathered = allgather(ms.Tensor(buf)).asnumpy().reshape(world_size, width)
        if not keep:
            continue
        for r, share in enumerate(shares):
            offset = 0
            for e in share:
                n = math.prod(e.shape)
                value = gathered[r, offset:offset + n].reshape(e.shape)
                out[e.key] = value if value.dtype == e.dtype else value.astype(e.dtype)
                offset += n
    return out


def _buckets(entries: Sequence[Entry], size: int):
    group, n = [], 0
    for e in entries:
        k = math.prod(e.shape)
        if group and n + k > size:
            yield group
            group, n = [], 0
        group.append(e)
        n += k
    if group:
        yield group


def _np_dtype(value) -> np.dtype:
    """numpy dtype of a MindSpore tensor's values (bfloat16, which numpy lacks, as float32)."""
    return np.dtype(np.float32) if value.dtype == ms.bfloat16 else np.dtype(ms.dtype_to_nptype(value.dtype))


def _nbytes(value) -> int:
    return int(value.size) * int(value.itemsize)


def _as_tensors(arrays: Mapping[str, np.ndarray]) -> dict:
    """{key: Tensor} sharing the arrays' memory (no copy of a gathered state)."""
    return {k: ms.Tensor.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def log_state_sizes(local_bytes: int, total_bytes: int, what: str, rank: int, world_size: int) -> list[float]:
    """All-gather every rank's state size and log one line per rank on rank 0 (collective)."""
    mb = ops.AllGather()(ms.Tensor(np.array([local_bytes / 2**20], np.float32))).asnumpy()
    for r in range(world_size):
        log.info("%s on rank %d: %.3f MB of %.3f MB", what, r, float(mb[r]), total_bytes / 2**20)
    return [float(x) for x in mb]


# ---------------------------------------------------------------------- Ascend: the native parallel optimizer
#
# Not exercised here (no Ascend device in this repository's CI). MindSpore shards the optimizer state
# itself in (semi-)auto parallel mode: with `enable_parallel_optimizer` each weight and its optimizer
# state are sliced along dim 0 over the data-parallel ranks; the forward all-gathers the weight, the
# backward reduce-scatters its gradient, and `ops.clip_by_global_norm` all-reduces the norm. Each rank
# feeds its own batch slice (`dataset_strategy="data_parallel"`). Saving goes through MindSpore's
# integrated save, which all-gathers the slices (`native_full_values`). Unverified for lack of a device:
# whether the train step's logged grad_norm (its own sum of squares) is aggregated over the slices the
# way clip_by_global_norm's is.

def configure_native(world_size: int) -> None:
    """Ascend only: semi-auto parallel with MindSpore's parallel optimizer (ZeRO-1, 'level1')."""
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL, device_num=world_size,
                                 gradients_mean=True, dataset_strategy="data_parallel",
                                 enable_parallel_optimizer=True,
                                 parallel_optimizer_config={"optimizer_level": "level1",
                                                            "parallel_optimizer_threshold": 0})


def native_full_values(step_cell, groups: Sequence[Mapping], scratch: str) -> list[dict]:
    """Ascend only: whole values of sliced parameters, for checkpoints (all ranks must call).

    MindSpore's integrated save of the compiled train step all-gathers every sliced parameter; the file
    is read back and its entries mapped to the given {key: Parameter} groups by Parameter name.
    """
    ms.save_checkpoint(step_cell, scratch, integrated_save=True)
    saved = ms.load_checkpoint(scratch)
    os.remove(scratch)
    return [{k: saved[p.name] for k, p in group.items()} for group in groups]



# ---------------------------------------------------------------------- the strategy


class ZeroParallel(ReplicatedStrategy):
    """parallel=zero: data parallel with the optimizer state and EMA sharded (see the module docstring)."""

    @property
    def native(self) -> bool:
        return self.ctx.native_zero

    def build_update(self, names, weights, make_optimizer, ema_decay, params) -> Update:
        if self.native:  # Ascend: MindSpore slices the state itself and inserts the gradient communication
            optimizer = make_optimizer(list(weights))
            from opensora.parallel.strategy import IdentitySync

            return Update(list(weights), optimizer, make_ema(params) if ema_decay else None, IdentitySync())
        ctx = self.ctx
        plan = plan_shards([p.size for p in weights], ctx.world_size)
        zero = ZeroState(plan, ctx.rank, names, weights)  # with the optimiser: records Parameter names
        optimizer = make_optimizer([weights[i] for i in zero.own])
        ema = make_ema(params, zero.own_names) if ema_decay else None
        return Update(list(weights), optimizer, ema, MeanOverRanks(weights, ctx.world_size), own=zero.own,
                      share=ShareWeights(weights, plan, ctx.rank), zero_state=zero, sharded=True)

    def report_state(self, update, opt_state) -> None:
        if update.zero_state is None:
            return
        ctx = self.ctx
        log_state_sizes(*update.zero_state.state_bytes(opt_state), "optimizer state", ctx.rank, ctx.world_size)
        if update.ema is not None:
            log_state_sizes(*update.zero_state.ema_bytes(update.ema), "EMA", ctx.rank, ctx.world_size)

    def full_state(self, update, step_fn, model_params, opt_state, scratch, keep=True):
        if self.native:  # MindSpore's slices, merged by its integrated save
            groups = native_full_values(step_fn, [model_params, update.ema or {}, opt_state or {}],
                                        str(scratch / f".tmp-gather-rank{self.ctx.rank}.ckpt"))
            return (groups[0], groups[1] if update.ema is not None else None,
                    groups[2] if opt_state is not None else None)
        zero = update.zero_state
        ema = zero.full_ema(update.ema, keep=keep) if update.ema is not None else None
        opt = zero.full_optimizer_state(opt_state, keep=keep) if opt_state is not None else None
        if not keep:  # took part in the collectives; keeps its own values
            return model_params, update.ema, opt_state
        return model_params, ema, opt

    def check_in_sync(self, params, step) -> None:
        if not self.native:
            super().check_in_sync(params, step)
