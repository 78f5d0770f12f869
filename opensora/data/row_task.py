"""One measurement per row of a CSV (scene detection, camera motion, flow score, media info), resumable,
in worker processes, written as a CSV that trains directly.

`run_over_rows` reads task.csv_path, computes `fn(file)` (a dict of new columns) for every row's file
with `map_rows` (progress log beside the output, so a killed run continues), and writes the input's rows
with the new columns to task.output_csv (default `<input>_<suffix>.csv` beside the input). Rows that lack
the size columns (num_frames, height, width, aspect_ratio, fps) get them measured in the same pass, so
the output always has the training columns. Relative paths are rewritten relative to the output's
folder when it is another one. A row whose file fails is left out, counted, logged and
listed with its error in `<output>_failed.csv`; it never stops the run. `score_over_rows` does the same for
a score computed by a model in this process (the CLIP scores), the workers decoding and preprocessing.
"""
from __future__ import annotations

import functools
import json
import logging
import multiprocessing
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from opensora.data.loader import worker_process_setup
from opensora.data.resumable import map_rows
from opensora.data.table import INFO_COLUMNS, default_output, media_folder, media_paths, read_table, \
    rebase_paths, require_columns, write_table

log = logging.getLogger(__name__)


def init_tool_worker() -> None:
    """A tool's worker process: decord without MindSpore, one OpenCV thread (the processes are the parallelism)."""
    worker_process_setup()
    if multiprocessing.parent_process() is not None:
        import cv2

        cv2.setNumThreads(1)


def missing_info(df: pd.DataFrame) -> pd.Series:
    """Rows without a value in one of the size columns (all rows when a column is absent)."""
    missing = pd.Series(False, index=df.index)
    for col in INFO_COLUMNS:
        missing |= df[col].isna() if col in df.columns else True
    return missing


def media_info(path: str, check_decode: bool = False) -> dict:
    """The size columns of one file (opensora.data.media_info.probe); raises for an unreadable file."""
    from opensora.data.media_info import probe

    info = probe(path, check_decode)
    if not info["readable"]:
        raise ValueError(f"unreadable ({info['error']})")
    return {c: info[c] for c in INFO_COLUMNS}


def _measure(fn: Optional[Callable], check_decode: bool, item: tuple[str, bool]) -> dict:
    path, need_info = item
    out = media_info(path, check_decode) if need_info else {}
    if fn is not None:
        out.update(fn(path))
    return out


def write_failed(failed: Sequence[tuple[str, str]], output: Path) -> Optional[Path]:
    """List failed rows (path, error) in `<output>_failed.csv` (removed when none failed); logs each."""
    path = output.with_name(f"{output.stem}_failed.csv")
    for p, err in failed[:20]:
        log.warning("failed: %s (%s)", p, err)
    if len(failed) > 20:
        log.warning("... and %d more failed rows", len(failed) - 20)
    if not failed:
        if path.is_file():
            path.unlink()
        return None
    pd.DataFrame(list(failed), columns=["path", "error"]).to_csv(path, index=False)
    return path


def output_path(task, suffix: str) -> Path:
    return Path(task.output_csv) if task.get("output_csv") else default_output(task.csv_path, suffix)


def add_columns(df: pd.DataFrame, files: Sequence[str], fn: Optional[Callable], need_info: Sequence[bool], output,
                settings: dict, num_workers: int, check_decode: bool = False,
                desc: str = "rows") -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """df's rows with the columns of `fn(file)` added (and the size columns measured where `need_info`),
    computed with `map_rows` (resume log beside `output`); returns (rows that succeeded, [(path, error)] of
    those that failed)."""
    df = df.reset_index(drop=True)
    worker = functools.partial(_measure, fn, bool(check_decode))
    settings = {**settings, "check_decode": bool(check_decode)}
    results = map_rows(worker, files, list(zip(files, need_info)), output, settings, int(num_workers),
                       initializer=init_tool_worker, desc=desc)
    return merge_results(df, files, results)


def merge_results(df: pd.DataFrame, keys: Sequence, results: dict) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(df's rows whose key succeeded, with the columns of their value dicts added; [(path, error)] of the rows
    that failed), from `map_rows`' {key: (ok, value, error)}; row i's key is keys[i]."""
    keep, failed, new = [], [], []
    for i, key in enumerate(keys):
        ok, value, error = results[key]
        if ok:
            keep.append(i)
            new.append(value)
        else:
            failed.append((df.at[i, "path"], error))
    kept = df.iloc[keep].reset_index(drop=True)
    values = pd.DataFrame(new, index=kept.index)
    for col in values.columns:
        if col in INFO_COLUMNS and col in kept.columns:  # measured only where it was missing
            kept[col] = values[col].where(values[col].notna(), kept[col])
        else:
            kept[col] = values[col]
    return kept, failed


def _load_row(load: Callable, check_decode: bool, item: tuple) -> tuple:
    """(load(file, *args), the size columns when they are missing) of one row, in a worker."""
    path, need_info, args = item
    return load(path, *args), (media_info(path, check_decode) if need_info else {})


def score_over_rows(task, load: Callable, load_args: Callable, score: Callable, column: str, suffix: str,
                    settings: dict, desc: str, key_columns: Sequence[str] = ("path",), required: Sequence[str] = (),
                    purpose: str = "") -> tuple[pd.DataFrame, Path]:
    """`run_over_rows` for a score that needs a model: `load(file, *load_args(row))` in the workers (decode,
    preprocess), `score([(key, payload), ...]) -> [float]` here on task.batch_size rows at a time
    (`map_rows_batched`), written as the column `column`. Rows are keyed by their file and the other
    `key_columns` (e.g. the caption: one video with two captions is scored twice)."""
    from opensora.data.resumable import map_rows_batched

    csv, df, folder, files, out = _inputs(task, suffix, required, purpose or desc)
    keys = [json.dumps([f, *(str(df.at[i, c]) for c in key_columns if c != "path")]) for i, f in enumerate(files)]
    items = [(f, need, tuple(load_args(df.iloc[i]))) for i, (f, need) in enumerate(zip(files, missing_info(df)))]

    def score_rows(rows):
        values = score([(k, payload) for k, (payload, _) in rows])
        return [{column: float(v), **info} for (_, (_, info)), v in zip(rows, values)]

    results = map_rows_batched(functools.partial(_load_row, load, False), score_rows, keys, items, out, settings,
                               int(task.batch_size), int(task.num_workers), initializer=init_tool_worker, desc=desc)
    kept, failed = merge_results(df, keys, results)
    return finish(rebase_paths(kept, folder, out), failed, out, csv, desc), out


def finish(kept: pd.DataFrame, failed: Sequence[tuple[str, str]], out: Path, csv, desc: str) -> pd.DataFrame:
    """Write the table (an empty `text` column added when the input had no captions) and the failed rows."""
    if "text" not in kept.columns:
        kept = kept.assign(text="")
        log.warning("%s has no caption (text / caption) column: the output's text is empty; caption the clips "
                    "before training", csv)
    write_table(kept, out)
    failed_csv = write_failed(failed, out)
    log.info("%s: %d rows -> %s%s", desc, len(kept), out,
             f"; {len(failed)} failed (listed in {failed_csv})" if failed else "")
    return kept


def _inputs(task, suffix: str, required: Sequence[str], purpose: str):
    """(csv, its table, the folder of its relative paths, the row's files, the output path) of a row task."""
    csv = task.csv_path
    df = read_table(csv).reset_index(drop=True)
    require_columns(df, required, csv, purpose)
    folder = media_folder(csv, task.get("video_folder"))
    return csv, df, folder, media_paths(df, folder), output_path(task, suffix)


def run_over_rows(task, fn: Optional[Callable], suffix: str, settings: dict, desc: str,
                  required: Sequence[str] = (), purpose: str = "") -> tuple[pd.DataFrame, Path]:
    """Run `fn(file) -> {column: value}` over task.csv_path (see the module docstring); returns the written
    table and its path. `settings` (what changes the results) guard the resume log."""
    csv, df, folder, files, out = _inputs(task, suffix, required, purpose or desc)
    kept, failed = add_columns(df, files, fn, missing_info(df).tolist(), out, settings, int(task.num_workers),
                               desc=desc)
    return finish(rebase_paths(kept, folder, out), failed, out, csv, desc), out
