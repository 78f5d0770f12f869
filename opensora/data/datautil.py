"""Table operations of task=datautil (Open-Sora 1.1's tools/datasets/datautil.py), each a function of a
DataFrame with `path` (and `text`) columns. Rows are keyed by `path`.

Deliberate differences from the original: a caption of only whitespace counts as empty (the training
CSV reader refuses it); a caption prefix that leaves nothing behind gives an empty caption instead of
an IndexError; a missing column raises naming the task that adds it instead of a bare assert.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from opensora.data.table import TRAIN_COLUMNS, require_columns

# --refine-llm-caption: the openings LLaVA puts before what it sees (the original's list).
LLM_PREFIXES = ("The video shows", "The video captures", "The video features", "The video depicts",
                "The video presents", "The video is ", "In the video,", "The image shows", "The image captures",
                "The image features", "The image depicts", "The image presents", "The image is ",
                "The image portrays", "In the image,")
# --merge-cmotion: the sentence appended for each camera-motion label (None: nothing).
CMOTION_TEXT = {"static": "The camera is static.", "dynamic": "The camera is moving.", "unknown": None,
                "zoom in": "The camera is zooming in.", "zoom out": "The camera is zooming out.",
                "pan left": "The camera is panning left.", "pan right": "The camera is panning right.",
                "tilt up": "The camera is tilting up.", "tilt down": "The camera is tilting down.",
                "pan/tilt": "The camera is panning."}
URL_RE = r"https?://[^\s]+"


# ================================================================
# Sets of rows
# ================================================================


def difference(df: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Rows of df whose path is not in other."""
    return df[~df["path"].isin(set(other["path"]))]


def intersection(df: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Rows of df whose path is in other, with other's columns that df lacks added (an inner join on
    path; how a captioner's path,text output gets its size columns back)."""
    extra = ["path"] + [c for c in other.columns if c not in df.columns]
    return df.merge(other[extra].drop_duplicates(subset=["path"]), on="path", how="inner")


def shard(df: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    """n consecutive parts of (nearly) equal size (numpy's array_split)."""
    if n < 1:
        raise ValueError(f"shard count {n} must be >= 1")
    return [df.iloc[idx] for idx in np.array_split(np.arange(len(df)), n)]


def train_columns_only(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if c in TRAIN_COLUMNS + ["resolution", "text_len"]]]


# ================================================================
# Captions
# ================================================================


def empty_text(text: pd.Series) -> pd.Series:
    return text.isna() | text.astype(str).str.strip().eq("")


def remove_llm_prefix(caption: str) -> str:
    """Drop a LLaVA opening ("The video shows ...") and capitalise what follows."""
    for prefix in LLM_PREFIXES:
        if caption.startswith(prefix) or caption.startswith(prefix.lower()):
            caption = caption[len(prefix):].strip()
            return caption[:1].upper() + caption[1:]
    return caption


def merge_cmotion(caption: str, cmotion: str) -> str:
    text = CMOTION_TEXT.get(str(cmotion))
    return f"{caption} {text}" if text else caption


# ================================================================
# Filters
# ================================================================

# filter name -> (column, comparison)
FILTERS = {"fmin": ("num_frames", ">="), "fmax": ("num_frames", "<="), "hwmin": ("resolution", ">="),
           "hwmax": ("resolution", "<="), "aesmin": ("aes", ">="), "matchmin": ("match", ">="),
           "flowmin": ("flow", ">=")}


def resolution(df: pd.DataFrame) -> pd.Series:
    """height * width (the original's `resolution` column), from the column when it exists."""
    if "resolution" in df.columns:
        return pd.to_numeric(df["resolution"], errors="coerce")
    return pd.to_numeric(df["height"], errors="coerce") * pd.to_numeric(df["width"], errors="coerce")


def filter_rows(df: pd.DataFrame, csv, **thresholds: Optional[float]) -> tuple[pd.DataFrame, dict]:
    """Rows passing every threshold that is not None (see FILTERS); a NaN score fails. Returns the rows and
    {filter: rows it removed}."""
    removed = {}
    for name, value in thresholds.items():
        if value is None:
            continue
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}; known: {', '.join(FILTERS)}")
        col, op = FILTERS[name]
        if col == "resolution":
            if "resolution" not in df.columns:
                require_columns(df, ["height", "width"], csv, f"task.{name}")
            values = resolution(df)
        else:
            require_columns(df, [col], csv, f"task.{name}")
            values = pd.to_numeric(df[col], errors="coerce")
        ok = (values >= float(value)) if op == ">=" else (values <= float(value))
        removed[name] = int((~ok).sum())
        df = df[ok.fillna(False)]
    return df, removed


# ================================================================
# Paths
# ================================================================


def relpath(paths: Sequence[str], root: str) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def abspath(paths: Sequence[str], root: str) -> list[str]:
    return [os.path.join(root, p) for p in paths]


def has_url(text: pd.Series) -> pd.Series:
    return text.astype(str).str.contains(URL_RE, regex=True)
