"""CSV tables of the data tools: reading, the training columns, named errors for missing columns, writing.

Every tool reads a CSV with a `path` (or `video`) column, paths relative to a folder (default: the CSV's
folder) unless absolute, and writes a CSV whose first columns are the training columns

    path,text,num_frames,height,width,aspect_ratio,fps

(those the table has), then the input's other columns, so its output trains directly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

TRAIN_COLUMNS = ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]
INFO_COLUMNS = ["num_frames", "height", "width", "aspect_ratio", "fps"]

# The task that adds each column a tool may need (for the error when it is missing).
ADDED_BY = {
    **{c: "task=datautil task.info=true (or task=scan_videos)" for c in INFO_COLUMNS + ["resolution"]},
    "text": "a captioner, or give a CSV with a caption/text column",
    "timestamp": "task=scene_detect",
    "aes": "task=score_aesthetic",
    "match": "task=score_match",
    "flow": "task=flow_score",
    "cmotion": "task=camera_motion",
}


def read_table(csv_path, setting: str = "task.csv_path") -> pd.DataFrame:
    """The CSV with `video` / `caption` renamed to `path` / `text` (when those are absent); path and text
    are strings (a missing caption is ""). Raises naming `setting` and the file."""
    path = Path(str(csv_path))
    if not path.is_file():
        raise FileNotFoundError(f"{setting}={csv_path} does not exist")
    try:
        df = pd.read_csv(path, dtype={"path": str, "text": str, "video": str, "caption": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    renames = {old: new for old, new in (("video", "path"), ("caption", "text"))
               if old in df.columns and new not in df.columns}
    df = df.rename(columns=renames)
    if "path" not in df.columns:
        raise ValueError(f"{path}: no 'path' (or 'video') column; it has: {', '.join(df.columns) or 'none'}")
    empty = df["path"].isna() | df["path"].astype(str).str.strip().eq("")
    if empty.any():
        rows = ", ".join(str(i + 1) for i in empty.to_numpy().nonzero()[0][:5])
        raise ValueError(f"{path}: empty 'path' in row {rows}; every row needs a path")
    df["path"] = df["path"].astype(str).str.strip()
    if "text" in df.columns:
        df["text"] = df["text"].fillna("").astype(str)
    return df


def require_columns(df: pd.DataFrame, columns: Iterable[str], csv, purpose: str) -> None:
    """Raise naming the first missing column, what needs it and the task that adds it."""
    for col in columns:
        if col not in df.columns:
            adds = ADDED_BY.get(col, "the tool that writes it")
            raise ValueError(f"{csv}: no column {col!r} (needed for {purpose}): run {adds} first; "
                             f"the CSV has: {', '.join(df.columns)}")


def training_order(df: pd.DataFrame) -> pd.DataFrame:
    """The training columns the table has first, in their order, then the others as they were."""
    first = [c for c in TRAIN_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_table(df: pd.DataFrame, path) -> Path:
    """Write the table (training columns first) atomically: a killed write never leaves half a CSV."""
    from opensora.utils.tensor_files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: training_order(df).to_csv(tmp, index=False))
    return path


def media_folder(csv_path, folder: Optional[str]) -> Path:
    """The folder a CSV's relative paths are relative to: `folder`, else the CSV's own folder."""
    return Path(folder) if folder else Path(str(csv_path)).resolve().parent


def media_paths(df: pd.DataFrame, folder: Path) -> list[str]:
    """The files of the `path` column: absolute paths as they are, others joined to `folder`."""
    return [p if os.path.isabs(p) else str(folder / p) for p in df["path"]]


def rebase_paths(df: pd.DataFrame, folder: Path, output) -> pd.DataFrame:
    """Relative paths (relative to `folder`) made relative to the folder of the CSV `output`, so the
    written CSV finds its files from wherever it is; absolute paths stay."""
    out_dir, folder = Path(output).resolve().parent, Path(folder).resolve()
    if out_dir == folder:
        return df
    paths = [p if os.path.isabs(p) else Path(os.path.relpath(folder / p, out_dir)).as_posix() for p in df["path"]]
    return df.assign(path=paths)


def default_output(csv_path, suffix: str) -> Path:
    """`<folder>/<name>_<suffix>.csv` beside the input (the original tools' naming, e.g. meta_timestamp.csv)."""
    p = Path(str(csv_path))
    return p.with_name(f"{p.stem}_{suffix}.csv")
