"""Resumable per-row work of the data tools: a function over the rows of a table, in worker processes,
with a progress bar, every result appended to a log beside the output as soon as it is known.

    <output>.progress.jsonl   line 1: {"settings": {...}}; then one {"key", "ok", "value", "error"} per row

A run killed at any point restarts where it stopped: rows whose key (the row's path) has a result in the
log are not computed again; rows that failed are tried again. The log was made with certain settings
(those that change the results); a run with other settings is refused, naming them, rather than mixing
results. A cut-off last line (a kill mid-write) is dropped.
"""
from __future__ import annotations

import functools
import json
import logging
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


def map_rows(fn: Callable, keys: Sequence[Hashable], items: Sequence, output, settings: dict, num_workers: int = 0,
             initializer: Optional[Callable] = None, initargs: tuple = (), desc: str = "rows") -> dict:
    """{key: (ok, value, error)} for every distinct key: fn(item) of the first item of each key, computed in
    `num_workers` spawned processes (0: here) unless the progress log of `output` already holds a success
    for it. `fn` must be a module-level function (workers import it); its value must be JSON-serialisable."""
    path = progress_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings))  # as it reads back
    done = _read_log(path, settings) if path.is_file() else {}
    first: dict = {}
    for key, item in zip(keys, items):
        first.setdefault(key, item)
    todo = [(k, it) for k, it in first.items() if not done.get(k, (False,))[0]]
    reused = len(first) - len(todo)
    if reused:
        log.info("%s: %d of %d rows already done (%s), %d to go", desc, reused, len(first), path, len(todo))
    new_log = not path.is_file() or path.stat().st_size == 0
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
