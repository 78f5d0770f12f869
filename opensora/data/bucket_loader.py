"""The loader of bucketed training: each step, this rank's micro-batches of the bucket plan (opensora/data/sampler.py),
loaded by the batch loader's machinery (worker processes, prefetching, bad samples counted and replaced) from a
VariableVideoTextDataset.

A bad sample is replaced by a spare row of its own bucket (so the micro-batch keeps one shape), drawn from
default_rng([seed, epoch, slot]) as the fixed-size loader draws its replacements. The state in a checkpoint is
(epoch, step within it, the plan's fingerprint, the rows a re-planned epoch leaves out); see
opensora.data.sampler for what a resume does when the CSV or the bucket settings changed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from opensora.data.bucket import Bucket
from opensora.data.loader import BatchLoader, collate
from opensora.data.sampler import BucketSampler, PlanRecords, Position, empty_plan_message, report, resume_position
from opensora.data.variable import SampleKey

log = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """What the loader yields for one step on this rank: its micro-batches (collated dicts, in slot order), a key
    per slot of the step over all ranks ((batch, frames, height, width) of its bucket), this rank's first slot
    and the step's samples over all ranks."""

    micro_batches: list
    slot_keys: list
    first_slot: int
    samples: int


@dataclass(frozen=True)
class _After:
    position: Position
    slot_keys: tuple
    first_slot: int
    samples: int
    sizes: tuple  # this rank's micro-batch sizes


class BucketBatchLoader(BatchLoader):
    """This rank's micro-batches of each step, `micro_batches` per rank (task.grad_accumulation); `ranks` = the
    data-parallel ranks. `records` keeps the run's plan snapshots (re-planning after a CSV change)."""

    def __init__(self, dataset, bucket_config, frame_interval: int, seed: int = 0, rank: int = 0, ranks: int = 1,
                 micro_batches: int = 1, seeding: str = "independent", num_workers: int = 0, prefetch: int = 2,
                 max_bad_fraction: Optional[float] = 0.1, max_retries: int = 10,
                 records: Optional[PlanRecords] = None, resolutions=None):
        super().__init__(dataset, 1, seed=seed, rank=rank, world_size=ranks, num_workers=num_workers,
                         prefetch=prefetch, max_bad_fraction=max_bad_fraction, max_retries=max_retries)
        if micro_batches < 1:
            raise ValueError(f"task.grad_accumulation={micro_batches} must be >= 1")
        self.per_rank = int(micro_batches)
        self.sampler = BucketSampler(Bucket(bucket_config, resolutions=resolutions), dataset.sizes, frame_interval, seed,
                                     slots=ranks * self.per_rank, seeding=seeding, spares=max_retries)
        self.records = records or PlanRecords(None)
        self.records.keep(self.sampler)
        self.pos = Position(0, 0, self.sampler.fingerprint)

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        state = super().state()
        state.update(step=self.pos.step, plan=self.pos.plan, excluded=self.pos.excluded)
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.pos, message = resume_position(self.sampler, state, self.records)
        if message:
            log.warning(message)
        self.epoch, self.position = self.pos.epoch, self.pos.step

    def plan(self, epoch: Optional[int] = None):
        """The plan of `epoch` (default: the current one, as a resume re-planned it)."""
        if epoch is None or epoch == self.pos.epoch:
            return self.sampler.plan(self.pos.epoch, self.pos.exclude)
        return self.sampler.plan(epoch)

    def report(self) -> tuple[str, list]:
        """The bucket report of the current epoch: (text, table rows); see opensora.data.sampler.report."""
        return report(self.sampler, self.plan(), self.world_size, self.per_rank)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan().num_steps

    # ------------------------------------------------------------ iteration
    def _plan(self):
        pos = self.pos
        while True:
            plan = self.sampler.plan(pos.epoch, pos.exclude)
            if plan.num_steps == 0:
                if pos.exclude is None:
                    raise RuntimeError(empty_plan_message(self.sampler, plan, self.world_size, self.per_rank))
                log.info("data: nothing is left of re-planned epoch %d; epoch %d starts", pos.epoch, pos.epoch + 1)
            offsets = np.concatenate([[0], np.cumsum([sum(len(mb.rows) for mb in s) for s in plan.steps])])
            for i in range(pos.step, plan.num_steps):
                step = plan.steps[i]
                keys = tuple((self.sampler.bucket.batch_size(mb.bucket), *self.sampler.bucket.get_thw(mb.bucket))
                             for mb in step)
                first = self.rank * self.per_rank
                mine = step[first:first + self.per_rank]
                tasks, slot = [], int(offsets[i]) + sum(len(mb.rows) for mb in step[:first])
                for mb in mine:
                    t, h, w = self.sampler.bucket.get_thw(mb.bucket)
                    spares = tuple(int(r) for r in mb.spares)
                    for row in mb.rows:
                        tasks.append((pos.epoch, slot, SampleKey(int(row), t, h, w, spares)))
                        slot += 1
                after = _After(replace(pos, step=i + 1), keys, first, int(offsets[i + 1] - offsets[i]),
                               tuple(len(mb.rows) for mb in mine))
                yield after, tasks
            pos = Position(pos.epoch + 1, 0, self.sampler.fingerprint)
            nxt = self.sampler.plan(pos.epoch)
            log.info("data: epoch %d: %d steps, %d of %d rows trained", pos.epoch, nxt.num_steps,
                     sum(nxt.trained().values()), nxt.rows)

    def _advance(self, after: _After) -> None:
        self.pos = after.position
        self.epoch, self.position = self.pos.epoch, self.pos.step

    def _assemble(self, after: _After, items: list) -> StepBatch:
        micro, start = [], 0
        for n in after.sizes:
            micro.append(collate(items[start:start + n]))
            start += n
        return StepBatch(micro, list(after.slot_keys), after.first_slot, after.samples)


def build_bucket_loader(cfg, dataset, ctx, out: Optional[Path]) -> BucketBatchLoader:
    """The loader of `cfg.data` (bucket_config, frame_interval, bucket_seeding, workers) for this rank; plan
    records in `<out>/data` (rank 0 writes them)."""
    data = cfg.data
    return BucketBatchLoader(
        dataset, data.bucket_config, int(data.frame_interval), seed=int(cfg.seed), rank=ctx.data_rank,
        ranks=ctx.data_size, micro_batches=int(cfg.task.get("grad_accumulation") or 1),
        seeding=str(data.get("bucket_seeding", "independent")), num_workers=int(data.get("num_workers", 0)),
        prefetch=int(data.get("prefetch", 2)), max_bad_fraction=data.get("max_bad_fraction", 0.1),
        records=PlanRecords(None if out is None else Path(out) / "data", write=ctx.is_main),
        resolutions=data.get("resolutions"))
