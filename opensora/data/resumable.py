"""Resumable per-row work of the data tools: a function over the rows of a table, in worker processes,
with a progress bar, every result appended to a log beside the output as soon as it is known.

    <output>.progress.jsonl   line 1: {"settings": {...}}; then one {"key", "ok", "value", "error"} per row

A run killed at any point restarts where it stopped: rows whose key (the row's path) has a result in the
log are not computed again; rows that failed are tried again. The log was made with certain settings
(those that change the results); a run with other settings is refused, naming them, rather than mixing
results. A cut-off last line (a kill mid-write) is dropped.

`map_rows` computes a row wholly in the workers; `map_rows_batched` is for work with a model: the workers
load and preprocess, and the model runs here on batches of rows.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence

from tqdm import tqdm

from opensora.data.loader import map_ordered

log = logging.getLogger(__name__)


def progress_path(output) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".progress.jsonl")


def _call(fn: Callable, item) -> tuple[bool, object, str]:
    """(ok, value, error) of fn(item): an exception is a failed row, never a failed run."""
    try:
        return True, fn(item), ""
    except Exception as e:  # noqa: BLE001 - one bad row must not stop the others
        return False, None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _read_log(path: Path, settings: dict) -> dict:
    """{key: (ok, value, error)} from an existing log (the last record per key wins)."""
    done: dict = {}
    text = path.read_text()
    lines = text.split("\n")
    good_end, header = 0, None
    for i, line in enumerate(lines):
        if not line.strip():
            good_end += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1:]):
                break  # a cut-off last line
            raise ValueError(f"{path}: line {i + 1} is not JSON; delete the file to start again")
        if header is None:
            header = record.get("settings")
            if header is None:
                raise ValueError(f"{path}: no settings line; delete the file to start again")
            _check_settings(path, header, settings)
        else:
            done[record["key"]] = (bool(record["ok"]), record.get("value"), record.get("error", ""))
        good_end += len(line) + 1
    if good_end < len(text):  # drop the cut-off line so appended records start on a line of their own
        with open(path, "r+") as f:
            f.truncate(min(good_end, len(text)))
    if header is None:
        return {}
    return done


def _check_settings(path: Path, old: dict, new: dict) -> None:
    diff = [f"{k}: log {old.get(k)!r} vs now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"{path} holds results made with other settings ({'; '.join(diff)}): delete it (and the "
                         "output CSV) to start again with the new settings, or choose another task.output_csv")


def _pending(keys: Sequence[Hashable], items: Sequence, output, settings: dict, desc: str):
    """(log path, settings as JSON reads them back, {key: result} already logged, {key: first item},
    [(key, item)] still to compute, whether the log is new) of a run over `keys`."""
    path = progress_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings))  # as it reads back
    done = _read_log(path, settings) if path.is_file() else {}
    first: dict = {}
    for key, item in zip(keys, items):
        first.setdefault(key, item)
    todo = [(k, it) for k, it in first.items() if not done.get(k, (False,))[0]]
    if len(first) > len(todo):
        log.info("%s: %d of %d rows already done (%s), %d to go", desc, len(first) - len(todo), len(first), path,
                 len(todo))
    return path, settings, done, first, todo, not path.is_file() or path.stat().st_size == 0


def map_rows(fn: Callable, keys: Sequence[Hashable], items: Sequence, output, settings: dict, num_workers: int = 0,
             initializer: Optional[Callable] = None, initargs: tuple = (), desc: str = "rows") -> dict:
    """{key: (ok, value, error)} for every distinct key: fn(item) of the first item of each key, computed in
    `num_workers` spawned processes (0: here) unless the progress log of `output` already holds a success
    for it. `fn` must be a module-level function (workers import it); its value must be JSON-serialisable."""
    path, settings, done, first, todo, new_log = _pending(keys, items, output, settings, desc)
    reused = len(first) - len(todo)
    with open(path, "a") as f:
        if new_log:
            f.write(json.dumps({"settings": settings}) + "\n")
            f.flush()
        results = map_ordered(functools.partial(_call, fn), [it for _, it in todo], int(num_workers),
                              initializer=initializer, initargs=initargs)
        bar = tqdm(total=len(first), initial=reused, desc=desc, dynamic_ncols=True)
        for (key, _), (ok, value, error) in zip(todo, results):
            done[key] = (ok, value, error)
            f.write(json.dumps({"key": key, "ok": ok, "value": value, "error": error}) + "\n")
            f.flush()
            bar.update(1)
        bar.close()
    return {k: done[k] for k in first}


def map_safely(fn: Callable, items: Sequence, num_workers: int = 0, initializer: Optional[Callable] = None,
                initargs: tuple = ()):
    """(ok, value, error) of fn(item) for each item in order, in `num_workers` spawned processes (0: here): an
    item's exception is its failure, never the run's. A generator (`map_ordered`)."""
    return map_ordered(functools.partial(_call, fn), items, int(num_workers), initializer=initializer,
                       initargs=initargs)


class RateMeter:
    """Items per second after the first batch (whose time includes compiling the model), for the log."""

    def __init__(self, unit: str = "rows"):
        self.unit, self.start, self.n, self.first = unit, time.perf_counter(), 0, None

    def update(self, n: int) -> None:
        self.n += n
        if self.first is None:
            self.first = (time.perf_counter(), self.n)

    def summary(self) -> str:
        text = f"{self.n} {self.unit} in {time.perf_counter() - self.start:.1f} s"
        if self.first is not None and self.n > self.first[1]:
            rate = (self.n - self.first[1]) / max(time.perf_counter() - self.first[0], 1e-9)
            text += f"; {rate:.3g} {self.unit}/s after the first batch (which includes compiling the model)"
        return text


def map_rows_batched(load: Callable, score: Callable[[list], Sequence], keys: Sequence[Hashable], items: Sequence,
                     output, settings: dict, batch_size: int, num_workers: int = 0,
                     initializer: Optional[Callable] = None, initargs: tuple = (), desc: str = "rows") -> dict:
    """`map_rows` for work in two stages: `load(item)` (a module-level function, in the workers: decoding,
    preprocessing) gives a payload; `score([(key, payload), ...])` (here, on up to `batch_size` rows at a time: a
    model) gives one JSON-serialisable value per row. A row whose load fails is logged as failed (and tried again
    by the next run); a failing `score` stops the run (it is the model's failure, not the row's). The log and
    the resume are `map_rows`'; the steady rate is logged at the end."""
    path, settings, done, first, todo, new_log = _pending(keys, items, output, settings, desc)
    reused = len(first) - len(todo)
    meter = RateMeter("rows")
    with open(path, "a") as f:
        if new_log:
            f.write(json.dumps({"settings": settings}) + "\n")
            f.flush()

        def record(key, ok, value, error):
            done[key] = (ok, value, error)
            f.write(json.dumps({"key": key, "ok": ok, "value": value, "error": error}) + "\n")

        def flush(batch):
            for (key, _), value in zip(batch, score(batch)):
                record(key, True, value, "")
            f.flush()
            meter.update(len(batch))
            bar.update(len(batch))

        loaded = map_safely(load, [it for _, it in todo], num_workers, initializer, initargs)
        bar = tqdm(total=len(first), initial=reused, desc=desc, dynamic_ncols=True)
        batch: list = []
        for (key, _), (ok, payload, error) in zip(todo, loaded):
            if not ok:
                record(key, False, None, error)
                f.flush()
                bar.update(1)
                continue
            batch.append((key, payload))
            if len(batch) >= int(batch_size):
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        bar.close()
    if todo:
        log.info("%s: %s", desc, meter.summary())
    return {k: done[k] for k in first}
