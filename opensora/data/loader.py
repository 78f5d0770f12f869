"""A resumable, seeded batch loader over a map-style dataset, with worker processes and bad-sample handling.

Every dataset yields items as dicts: "video" [C, T, H, W] float32 pixels or "latent" (a cached VAE latent),
and "caption" (str) or "text_emb" + "mask" (a cached text embedding), plus any extra arrays. Batches stack each
key (strings as lists). How a batch becomes the train step's inputs is the train task's business
(opensora/train/batch.py).
"""
from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)


# Distinct samples read before the share of bad ones is judged (or the whole dataset, if smaller).
MIN_READS = 50


class BadSampleError(Exception):
    """A sample that cannot be used (missing, unreadable, truncated or too-short file, missing cache
    entry). Datasets raise it; the loader logs, counts and replaces the sample."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), str(reason)


class TooManyBadSamples(RuntimeError):
    """More bad samples than data.max_bad_fraction allows, or a batch slot found no good sample."""


# ================================================================
# Loading one slot (in a worker process or in the main one)
# ================================================================

_WORKER: dict = {}


def worker_process_setup() -> None:
    """In a spawned worker process (not the main one): decord is used without loading MindSpore."""
    if multiprocessing.parent_process() is not None:
        from opensora.utils import video_io

        video_io.DECORD_WITHOUT_MINDSPORE = True


def _init_worker(dataset) -> None:
    worker_process_setup()
    _WORKER["dataset"] = dataset
    _WORKER["bad"] = set()


def _get(dataset, index: int, epoch: int):
    return dataset.load(index, epoch) if hasattr(dataset, "load") else dataset[index]


def load_slot(dataset, epoch: int, slot: int, index, seed: int, max_retries: int, known_bad: set):
    """(item, attempts) for one batch slot. A bad sample is replaced by another index drawn from
    default_rng([seed, epoch, slot]) (from `dataset.replacement(index, rng)` when the dataset has it, e.g. a
    sample of the same bucket), up to `max_retries` times; rows in `known_bad` are not read
    again but still use up a draw, so the result does not depend on what this process has seen.
    attempts: [(index, None | (path, reason))] for every sample read."""
    attempts, failures, rng = [], [], None
    n = len(dataset)
    row_of = getattr(dataset, "row_of", None)
    for _ in range(int(max_retries) + 1):
        row = index if row_of is None else row_of(index)
        if row not in known_bad:
            try:
                item = _get(dataset, index, epoch)
                attempts.append((index, None))
                return item, attempts
            except BadSampleError as e:
                known_bad.add(row)
                attempts.append((index, (e.path, e.reason)))
                failures.append(f"{e.path} ({e.reason})")
        if rng is None:
            rng = np.random.default_rng([int(seed), int(epoch), int(slot), 1])
        index = dataset.replacement(index, rng) if hasattr(dataset, "replacement") else int(rng.integers(n))
    raise TooManyBadSamples(f"{max_retries + 1} samples in a row were bad (or already known bad) for one batch slot; "
                            f"last: {'; '.join(failures[-3:]) or 'all previously known bad'}. Check the data "
                            "(task=scan_videos lists unreadable files)")


def _worker_slot(epoch: int, slot: int, index: int, seed: int, max_retries: int):
    return load_slot(_WORKER["dataset"], epoch, slot, index, seed, max_retries, _WORKER["bad"])


# ================================================================
# Batching
# ================================================================


def collate(items: list) -> dict:
    """Dict items -> one dict: arrays stacked along a new batch axis, strings as lists."""
    out = {}
    for key, value in items[0].items():
        values = [it[key] for it in items]
        out[key] = list(values) if isinstance(value, str) else np.stack(values)
    return out


class BatchLoader:
    """Shuffled, seeded batches; `state()` / `load_state()` make resume exact.

    Epoch e visits the dataset in the order of `default_rng(seed + e).permutation(len)`;
    the state is (epoch, position in that order), so a resumed run continues with the very next
    sample, neither repeating nor skipping any. Incomplete final batches are dropped.

    Data parallel: with `world_size` ranks every rank walks the same order in global batches of
    batch_size * world_size samples and yields its own slice [rank * batch_size, (rank + 1) * batch_size),
    so the ranks together see exactly what one process with the global batch size would.

    Workers: with `num_workers` > 0 samples are loaded by that many processes (spawned; each holds a
    copy of the dataset), `prefetch` batches ahead of the one being used (at least enough to give
    every worker a sample). Items do not depend on the worker count (datasets draw their randomness
    from (seed, epoch, index)).

    Bad samples: a sample whose loading raises BadSampleError is logged once (with its path),
    counted, and replaced by another drawn from a seeded RNG of (epoch, slot), so resumed and
    uninterrupted runs still see the same batches. When more than `max_bad_fraction` of the distinct
    samples read so far are bad, TooManyBadSamples stops the run - judged only once `MIN_READS` distinct
    samples (or the whole dataset, if smaller) were read, so one unlucky first batch stops nothing.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, prefetch: int = 2,
                 max_bad_fraction: Optional[float] = 0.1, max_retries: int = 10):
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than data.batch_size={batch_size}"
                             + (f" x {world_size} ranks" if world_size > 1 else ""))
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0 and data.prefetch={prefetch} >= 1")
        if max_bad_fraction is not None and not 0 <= float(max_bad_fraction) <= 1:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction} must be in [0, 1] (or null: never stop)")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.num_workers, self.prefetch = int(num_workers), int(prefetch)
        self.max_bad_fraction = None if max_bad_fraction is None else float(max_bad_fraction)
        self.max_retries = int(max_retries)
        self.epoch, self.position = 0, 0
        n = len(dataset)
        self._seen = np.zeros(n, bool)
        self._bad = np.zeros(n, bool)
        self.bad_samples: dict[str, str] = {}  # path -> reason, in the order found
        self._resumed_bad = 0  # bad samples found before a resume beyond those listed in the state
        self._known_bad: set = set()
        self._pool: Optional[ProcessPoolExecutor] = None

    # ------------------------------------------------------------ state

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)

    def state(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position}
        if self.bad_samples:  # carried over a resume so the run's summary counts them all
            state["bad_samples"] = dict(list(self.bad_samples.items())[:1000])
            state["num_bad_samples"] = len(self.bad_samples)
        return state

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.bad_samples = dict(state.get("bad_samples", {}))
        self._resumed_bad = int(state.get("num_bad_samples", len(self.bad_samples))) - len(self.bad_samples)

    @property
    def num_bad_samples(self) -> int:
        """Distinct bad samples found by this loader (this rank), including before a resume."""
        return len(self.bad_samples) + self._resumed_bad

    # ------------------------------------------------------------ iteration

    def _plan(self) -> Iterator[tuple[tuple[int, int], list[tuple[int, int, int]]]]:
        """((epoch, position) after the batch, [(epoch, slot, index)] of this rank's samples)."""
        epoch, position = self.epoch, self.position
        step = self.batch_size * self.world_size
        while True:
            order = self._order(epoch)
            while position + step <= len(order):
                start = position + self.rank * self.batch_size
                tasks = [(epoch, s, int(order[s])) for s in range(start, start + self.batch_size)]
                position += step
                yield (epoch, position), tasks
            epoch, position = epoch + 1, 0

    def _row(self, index) -> int:
        """The dataset row of a sample index (datasets indexed by other keys say which: `row_of`)."""
        return self.dataset.row_of(index) if hasattr(self.dataset, "row_of") else index

    def _record(self, attempts) -> None:
        for index, bad in attempts:
            index = self._row(index)
            self._seen[index] = True
            if bad is None:
                continue
            self._known_bad.add(index)
            path, reason = bad
            if not self._bad[index]:
                self._bad[index] = True
                self.bad_samples[path] = reason
                log.warning("skipping bad sample %s: %s (%d bad so far)", path, reason, self.num_bad_samples)
        self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        if self.max_bad_fraction is None:
            return
        bad, seen, n = int(self._bad.sum()), int(self._seen.sum()), len(self.dataset)
        if bad == 0:
            return
        if seen >= min(MIN_READS, n) and bad > self.max_bad_fraction * seen:
            first = "; ".join(f"{p} ({r})" for p, r in list(self.bad_samples.items())[:3])
            raise TooManyBadSamples(
                f"{bad} of the {seen} distinct samples read so far are bad ({bad / max(seen, 1):.0%}; the dataset "
                f"has {n}), more than data.max_bad_fraction={self.max_bad_fraction}. First: {first}. Fix or drop "
                "them (task=scan_videos writes a CSV of the readable videos) or raise data.max_bad_fraction")

    def _load_sync(self, tasks):
        items = []
        for epoch, slot, index in tasks:
            item, attempts = load_slot(self.dataset, epoch, slot, index, self.seed, self.max_retries, self._known_bad)
            self._record(attempts)
            items.append(item)
        return items

    def _start_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.dataset,))
        return self._pool

    def _advance(self, after) -> None:
        """The loader's position once a batch planned by `_plan` is yielded."""
        self.epoch, self.position = after

    def _assemble(self, after, items: list):
        """What the loader yields for one planned batch (its items, in task order)."""
        return collate(items)

    def __iter__(self) -> Iterator:
        plan = self._plan()
        if self.num_workers == 0:
            for after, tasks in plan:
                items = self._load_sync(tasks)
                self._advance(after)
                yield self._assemble(after, items)
            return
        pool = self._start_pool()
        pending: deque = deque()
        depth = max(self.prefetch, -(-self.num_workers // self.batch_size) + 1)  # enough to keep every worker busy

        def submit():
            after, tasks = next(plan)
            pending.append((after, [pool.submit(_worker_slot, e, s, i, self.seed, self.max_retries)
                                    for e, s, i in tasks]))

        try:
            while True:
                while len(pending) < depth:
                    submit()
                after, futures = pending.popleft()
                items = []
                for f in futures:
                    item, attempts = f.result()
                    self._record(attempts)
                    items.append(item)
                self._advance(after)
                yield self._assemble(after, items)
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def map_ordered(fn, items, num_workers: int = 0, initializer=None, initargs=(), ahead: int = 4):
    """`fn` over `items` in order, in `num_workers` spawned processes (0: here), with at most
    `ahead` * num_workers results waiting; a generator."""
    if num_workers <= 0:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
