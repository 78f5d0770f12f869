"""Processes: which rank this process is, collective set-up under msrun, and the helpers every parallel
mode shares (rank 0's weights on every rank, a gradient reducer, barriers that outlast CPU collectives).

One strategy object per mode (`conf/parallel/*.yaml` -> `_target_`), which is all the train loop talks to:
`single.SingleProcess`, `data.DataParallel`, `zero.ZeroParallel` (optimizer-state sharding) and
`sequence.SequenceParallel` (frames split over ranks); their common interface is `strategy.ParallelStrategy`.

Ranks are started by MindSpore's launcher, never by this project:

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=outputs/msrun --join=True \\
        run.py parallel=data        # or parallel=zero, parallel=sequence
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelContext:
    """This process's place among the ranks. Under parallel=sequence the ranks form groups of
    `sequence_size` consecutive ranks that share one batch and split its frames (`sequence_rank`: the
    position in the group); the groups are data parallel (`data_rank` of `data_size`). In the other modes
    sequence_size is 1, so data_rank/data_size are rank/world_size."""

    mode: str = "single"
    rank: int = 0
    world_size: int = 1
    sequence_size: int = 1
    # parallel=zero on Ascend: MindSpore's own parallel optimizer shards the state (opensora.parallel.zero)
    native_zero: bool = False
    # the same number on every rank of one job, different between jobs (names `sync_ranks` files)
    job: int = 0
    # how long `sync_ranks` waits for the other ranks (parallel.sync_timeout_s)
    sync_timeout_s: float = 1800.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence_size

    @property
    def data_size(self) -> int:
        return self.world_size // self.sequence_size


_CONTEXT = ParallelContext()


def get_parallel() -> ParallelContext:
    """The context set by `init_parallel` (single process until then)."""
    return _CONTEXT


def msrun_role() -> Optional[str]:
    """MS_WORKER (a training rank) or MS_SCHED (msrun's scheduler, which runs the same script) under
    msrun; None otherwise."""
    role = os.environ.get("MS_ROLE")
    return role if role in ("MS_WORKER", "MS_SCHED") else None


def msrun_world_size() -> int:
    """Number of workers msrun started (1 when not launched by msrun)."""
    if msrun_role() is None:
        return 1
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)


def init_parallel(parallel) -> ParallelContext:
    """Set up `parallel.mode` (after ms.set_context; the device is MindSpore's device_target); returns and
    remembers the context. `parallel`: anything with `mode` and optionally `sequence_size`,
    `sequence_attention`, `sync_timeout_s` (a ParallelStrategy, or a config section).

    msrun's scheduler process runs this script too: it serves the cluster inside `init()` and exits
    when the job ends, never reaching the task.
    """
    global _CONTEXT
    import mindspore as ms

    role = msrun_role()
    if parallel.mode == "single":
        if role is not None:
            raise RuntimeError(f"started by msrun ({msrun_world_size()} workers) but parallel=single: use "
                               "parallel=data (or parallel=zero) to train on all of them, or run without msrun")
        _CONTEXT = ParallelContext("single", 0, 1)
        return _CONTEXT
    if parallel.mode in ("data", "zero", "sequence"):
        mode = parallel.mode
        if role is None:
            raise RuntimeError(f"parallel={mode} runs one process per device started by msrun, e.g. `msrun "
                               "--worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=outputs/msrun "
                               f"--join=True run.py parallel={mode}`; this process was not started by msrun "
                               "(MS_ROLE is not set, world size 1)")
        if mode == "zero" and msrun_world_size() < 2:
            raise RuntimeError(_zero_world_error(msrun_world_size()))
        from mindspore.communication import get_group_size, get_rank, init

        if not _CONTEXT.distributed:
            init()
        if role == "MS_SCHED":  # the scheduler's init() returns only when the job is over
            raise SystemExit(0)
        rank, world = get_rank(), get_group_size()
        if mode == "zero" and world < 2:
            raise RuntimeError(_zero_world_error(world))
        job = _job_number(rank)
        native = mode == "zero" and ms.get_context("device_target") == "Ascend"
        # Gradients are averaged over all ranks in every mode (see opensora/parallel/sequence.py for why
        # that is also the right scale when ranks hold parts of the same videos).
        ms.reset_auto_parallel_context()
        if native:
            from opensora.parallel.zero import configure_native

            configure_native(world)
        else:
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                         device_num=world)
        if mode == "sequence":
            from opensora.parallel.sequence import init_sequence_groups

            ctx = init_sequence_groups(parallel, rank, world)
        else:
            ctx = ParallelContext(mode, rank, world, native_zero=native)
        _CONTEXT = replace(ctx, job=job, sync_timeout_s=float(getattr(parallel, "sync_timeout_s", None) or 1800.0))
        if rank != 0:  # rank 0 alone reports; the others only warn
            logging.getLogger().setLevel(logging.WARNING)
        if mode == "zero":
            log.info("optimizer-state sharding (zero): rank %d of %d, %s", rank, world,
                     "MindSpore's parallel optimizer" if native else "AdamW state and EMA per owned parameter, "
                     "weights all-gathered after each update")
        elif mode == "data":
            log.info("data parallel: rank %d of %d", rank, world)
        return _CONTEXT
    raise ValueError(f"parallel.mode={parallel.mode!r} is not one of: single, data, zero, sequence")


def _job_number(rank: int) -> int:
    """A random number drawn by rank 0 and given to every rank (an AllReduce of it and zeros)."""
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    mine = int.from_bytes(os.urandom(3), "little") if rank == 0 else 0  # < 2**24: exact in float32
    return int(ops.AllReduce()(ms.Tensor(np.array([mine], np.float32))).asnumpy()[0])


def _zero_world_error(world: int) -> str:
    return (f"parallel=zero shards the optimizer state over the ranks, but the world size is {world} (msrun "
            f"--worker_num={world}): start msrun with --worker_num=2 or more, or use parallel=single on one device")


def broadcast_params(params: Iterable) -> None:
    """Give every rank rank 0's parameter values (no-op on one process).

    Done as an AllReduce-sum of rank 0's values and zeros elsewhere: that collective exists on every
    backend, including CPU where Broadcast does not.
    """
    ctx = get_parallel()
    if not ctx.distributed:
        return
    import mindspore as ms
    from mindspore import ops

    reduce = ops.AllReduce()
    for p in params:
        value = p.data if ctx.is_main else ops.zeros_like(p.data)
        if value.dtype == ms.bool_:
            raise TypeError(f"cannot broadcast boolean parameter {p.name}")
        p.set_data(reduce(value).astype(p.dtype))


def ranks_in_sync(params: Iterable) -> bool:
    """True when every parameter is bitwise identical on all ranks (always True on one process).

    Each rank hashes each parameter's bytes (crc32, sent as two exact 16-bit halves) and the hashes
    are all-gathered and compared. Every rank must call it (collective).
    """
    ctx = get_parallel()
    if not ctx.distributed:
        return True
    import zlib

    import mindspore as ms
    import numpy as np
    from mindspore import ops

    crcs = [zlib.crc32(np.ascontiguousarray(p.asnumpy()).tobytes()) for p in params]
    halves = np.array([[c & 0xFFFF, c >> 16] for c in crcs], np.float32).reshape(-1)
    gathered = ops.AllGather()(ms.Tensor(halves)).asnumpy().reshape(ctx.world_size, -1)
    return bool((gathered == gathered[:1]).all())


def barrier() -> None:
    """Wait until every rank gets here (an AllReduce of one number; no-op on one process).

    On CPU a collective fails when a rank is more than 30 s late; use `sync_ranks` where one can be."""
    if not get_parallel().distributed:
        return
    import mindspore as ms
    from mindspore import ops

    ops.AllReduce()(ms.Tensor([1.0], ms.float32)).asnumpy()


_SYNCED: list = []  # files of the previous sync_ranks call


def sync_ranks(folder, tag: str) -> None:
    """Wait until every rank has reached `tag` (a name used once per job), for up to
    parallel.sync_timeout_s; no-op on one process.

    MindSpore's CPU collectives give up when a peer is more than 30 s late (measured: an AllReduce
    fails after 30.0 s), which rank-0-only work (building the text encoder, writing a checkpoint,
    evaluating) and uneven graph compilation exceed easily. This barrier goes through empty files in
    `folder`, which every rank must see (the run directory), so it can wait as long as needed. Rank 0
    removes the previous barrier's files (every rank has left it once all reach this one).
    """
    ctx = get_parallel()
    if not ctx.distributed:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{ctx.job}-{tag}-rank{r}" for r in range(ctx.world_size)]
    files[ctx.rank].touch()
    deadline = time.monotonic() + ctx.sync_timeout_s
    while True:
        missing = [r for r, f in enumerate(files) if not f.exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {ctx.rank} waited {ctx.sync_timeout_s:g} s (parallel.sync_timeout_s) at "
                               f"'{tag}' for rank(s) {missing}, which never got there (files in {folder}); raise "
                               "parallel.sync_timeout_s if they are only slow")
        time.sleep(0.05)
    if ctx.is_main:
        if not _SYNCED:  # first sync of this job: files of earlier jobs in this folder
            _SYNCED.extend(f for f in folder.iterdir() if not f.name.startswith(f"{ctx.job}-"))
        for f in _SYNCED:
            f.unlink(missing_ok=True)
        _SYNCED[:] = files
