"""Scoring a CSV of clips row by row (the data tools' `aes`, `match` columns): resumable, with worker processes.

    rows of the input CSV --(worker processes: decode + preprocess)--> payloads
        --(this process, batched: the model)--> one score per row --> output CSV (input columns + score)

Every input column is kept as read (strings, unchanged). Rows with the same key (the path, or the
path and the caption) are scored once. Scores are appended to the output CSV as they come, so a
killed run loses at most the batch in flight; running the same command again skips the rows the
output already scores (task.overwrite=true starts over), and at the end the output is rewritten in
the input's row order. A row whose file cannot be read is logged, counted and listed, with the
reason, in `<output>_failed.csv`; it is not written to the output and is tried again by the next run.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from opensora.data.loader import BadSampleError, map_ordered, worker_process_setup

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "video")
TEXT_COLUMNS = ("text", "caption")


class RateMeter:
    """Items per second after the first batch (whose time includes compiling the model), for the log."""

    def __init__(self, unit: str = "clips"):
        self.unit, self.start, self.n, self.first = unit, time.perf_counter(), 0, None

    def update(self, n: int) -> None:
        self.n += n
        if self.first is None:
            self.first = (time.perf_counter(), self.n)

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        text = f"{self.n} {self.unit} in {total:.1f} s"
        if self.first is not None and self.n > self.first[1]:
            rate = (self.n - self.first[1]) / max(time.perf_counter() - self.first[0], 1e-9)
            text += f"; {rate:.3g} {self.unit}/s after the first batch (which includes compiling the model)"
        return text


def read_table(csv_path, config_key: str, task_name: str, need_text: bool = False) -> tuple[pd.DataFrame, str,
                                                                                            Optional[str]]:
    """(the CSV as strings, its path column, its text column or None). Errors name the file, the missing
    column and where it comes from."""
    if not csv_path:
        raise ValueError(f"{config_key} is not set: point it at a CSV of clips with a 'path' column")
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{config_key}={csv_path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    has = ", ".join(df.columns) or "none"
    path_col = next((c for c in PATH_COLUMNS if c in df.columns), None)
    if path_col is None:
        raise ValueError(f"{path}: no 'path' column (or 'video'), which task={task_name} needs; it has: {has}. "
                         "A CSV of clips with their paths is what task=scan_videos writes")
    text_col = None
    if need_text:
        text_col = next((c for c in TEXT_COLUMNS if c in df.columns), None)
        if text_col is None:
            raise ValueError(f"{path}: no 'text' column (or 'caption'), which task={task_name} needs (the caption "
                             f"each clip is matched against); it has: {has}. Captions come from the captioning step "
                             "of the data pipeline")
    return df, path_col, text_col


def resolve(path: str, folder: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else folder / p)


def default_output(csv_path, suffix: str) -> Path:
    """<input>_<suffix>.csv beside the input (the original data tools' naming)."""
    p = Path(csv_path)
    return p.with_name(f"{p.stem}_{suffix}{p.suffix or '.csv'}")


class SafeCall:
    """Picklable `(key, args) -> (key, fn(*args), None)`, or `(key, None, reason)` when fn raises: a row's
    failure (BadSampleError or any other) is that row's, not the run's. For map_ordered's workers."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item):
        key, args = item
        try:
            return key, self.fn(*args), None
        except BadSampleError as e:
            return key, None, e.reason
        except Exception as e:  # noqa: BLE001
            return key, None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _read_done(output: Path, keys: Sequence[str], column: str) -> dict:
    """{key tuple: score} of an earlier run's output (rows cut by a kill, or without a score, ignored)."""
    try:
        done = pd.read_csv(output, dtype=str, keep_default_na=False, on_bad_lines="skip", engine="python")
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return {}
    if column not in done.columns or any(k not in done.columns for k in keys):
        raise ValueError(f"{output} exists but is not this task's output (it lacks {column!r} or {list(keys)}): "
                         "move it away, set task.output_csv to another file, or task.overwrite=true")
    scores = [_parse(s) for s in done[column]]  # Python's parser: exact round trip of what was written
    return {tuple(row): s for row, s in zip(done[list(keys)].itertuples(index=False, name=None), scores)
            if np.isfinite(s)}


def _parse(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):  # empty, or a line cut short by a kill
        return float("nan")


def _write(df: pd.DataFrame, row_keys: list, scores: dict, column: str, output: Path) -> None:
    """The rows of df whose key is scored, in df's order, with the score column; atomically."""
    kept = [i for i, k in enumerate(row_keys) if k in scores]
    out = df.iloc[kept].copy()
    out[column] = [repr(scores[row_keys[i]]) for i in kept]
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    out.to_csv(tmp, index=False)
    os.replace(tmp, output)


def score_csv(df: pd.DataFrame, keys: Sequence[str], column: str, output: Path, load: Callable, load_args: Callable,
              score: Callable[[list], Sequence[float]], batch_size: int, num_workers: int = 0,
              overwrite: bool = False, desc: str = "score") -> dict:
    """Score every distinct key of `df` and write `output` (df's columns + `column`).

    `load_args(row) -> args` (in this process) and `load(*args) -> payload` (in a worker; raise
    BadSampleError for an unreadable row); `score([(key, payload), ...]) -> one float each` (in this
    process, called with up to `batch_size` rows). Returns {"scored", "skipped", "failed", "failures",
    "output", "failed_csv"}."""
    keys = list(keys)
    if column in df.columns:
        log.warning("the input already has a %r column: it is replaced by the new scores", column)
        df = df.drop(columns=[column])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {} if overwrite or not output.is_file() else _read_done(output, keys, column)
    if overwrite and output.is_file():
        output.unlink()
    row_keys = list(df[keys].itertuples(index=False, name=None))
    first = {}
    for i, k in enumerate(row_keys):
        first.setdefault(k, i)
    todo = [k for k in first if k not in done]
    skipped = len(first) - len(todo)
    if skipped:
        log.info("%s: %d of %d rows already scored in %s, %d to go", desc, skipped, len(first), output, len(todo))
    failures: dict = {}
    scores: dict = dict(done)
    # the output starts as the rows already scored, in this input's columns (also drops a line cut by a kill)
    _write(df, row_keys, scores, column, output)
    items = [(k, load_args(df.iloc[first[k]])) for k in todo]

    with open(output, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)

        meter = RateMeter("rows")

        def flush(batch):
            values = score(batch)
            for (k, _), v in zip(batch, values):
                scores[k] = float(v)
                writer.writerow(list(df.iloc[first[k]]) + [repr(float(v))])
            f.flush()
            meter.update(len(batch))

        batch: list = []
        with tqdm(total=len(todo), desc=desc, dynamic_ncols=True) as bar:
            for k, payload, reason in map_ordered(SafeCall(load), items, int(num_workers),
                                                  initializer=worker_process_setup):
                if reason is not None:
                    failures[k] = reason
                    log.warning("%s: cannot score %s: %s (%d failed so far)", desc, k[0], reason, len(failures))
                else:
                    batch.append((k, payload))
                    if len(batch) >= batch_size:
                        flush(batch)
                        batch = []
                bar.update(1)
            if batch:
                flush(batch)

    _write(df, row_keys, scores, column, output)
    failed_csv = output.with_name(f"{output.stem}_failed{output.suffix}")
    if failures:
        bad = [i for i, k in enumerate(row_keys) if k in failures]
        rows = df.iloc[bad].copy()
        rows["error"] = [failures[row_keys[i]] for i in bad]
        rows.to_csv(failed_csv, index=False)
    elif failed_csv.is_file():
        failed_csv.unlink()
    values = np.array([scores[k] for k in first if k in scores], np.float64)
    if len(values):
        log.info("%s: %s over %d clips: mean %.4g, min %.4g, max %.4g", desc, column, len(values), values.mean(),
                 values.min(), values.max())
    log.info("%s: scored %d, already scored %d, failed %d -> %s%s", desc, len(todo) - len(failures), skipped,
             len(failures), output, f" (failures: {failed_csv})" if failures else "")
    log.info("%s: %s", desc, meter.summary())
    return {"scored": len(todo) - len(failures), "skipped": skipped, "failed": len(failures),
            "failures": {k[0]: r for k, r in failures.items()}, "output": str(output),
            "failed_csv": str(failed_csv) if failures else None,
            "mean": float(values.mean()) if len(values) else float("nan")}
