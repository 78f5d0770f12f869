"""Table-utilities task (Open-Sora 1.1's tools/datasets/datautil.py): media info, filters, caption
cleaning, duplicate removal, merge / intersection / difference of CSVs and sharding, in one pass.

    python run.py task=datautil task.csv_path=meta/clips.csv task.info=all task.fmin=1     # meta/clips_info_fmin1.csv
    python run.py task=datautil 'task.csv_path=[a.csv,b.csv]' task.output_csv=ab.csv        # merge (concatenate)
    python run.py task=datautil task.csv_path=captions.csv task.intersection=clips_info.csv  # columns back by path
    python run.py task=datautil task.csv_path=clips_aes.csv task.aesmin=5 task.shard=4

The steps run in the original's order (conf/task/datautil.yaml lists every option): inputs concatenated,
difference, intersection, train columns, info, exists, remove URL / empty caption / path duplicates,
relpath / abspath, merge camera motion, LLM-prefix removal, caption cleaning, sort, empty caption again,
the score filters, text duplicates, shard. The output keeps the training columns first. The default output
name is the original's: the inputs' names joined by "+" and a suffix per step, in the first input's folder.
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, ListConfig

from opensora.data import datautil as du
from opensora.data.row_task import add_columns, finish, missing_info, write_failed
from opensora.data.table import media_folder, media_paths, read_table, rebase_paths, require_columns, write_table
from opensora.tasks.common import record_run, run_dir

log = logging.getLogger(__name__)

INFO_MODES = ("missing", "all", "none")


def input_paths(csv_path) -> list[str]:
    """task.csv_path as a list of files: a path, a glob, or a list of either."""
    items = list(csv_path) if isinstance(csv_path, (list, tuple, ListConfig)) else [csv_path]
    paths = []
    for item in items:
        hits = sorted(glob.glob(str(item))) if any(ch in str(item) for ch in "*?[") else [str(item)]
        if not hits:
            raise FileNotFoundError(f"task.csv_path={item} matches no file")
        paths += hits
    return paths


def output_name(task, inputs: list[str]) -> Path:
    """The original's default output: <names joined by +>[-<difference name>]<suffixes>.csv."""
    name = "+".join(Path(p).stem for p in inputs)
    if task.difference:
        name += f"-{Path(task.difference).stem}"
    steps = [("sort", "_sort"), ("info", "_info"), ("exists", "_ext"), ("relpath", "_relpath"),
             ("abspath", "_abspath"), ("remove_empty_caption", "_noempty"), ("remove_url", "_nourl"),
             ("remove_path_duplication", "_noduppath"), ("remove_text_duplication", "_noduptext"),
             ("refine_llm_caption", "_llm"), ("clean_caption", "_clean"), ("merge_cmotion", "_cmcaption")]
    on = {key: str(task.info) == "all" if key == "info" else bool(task.get(key)) for key, _ in steps}
    suffix = "".join(tag for key, tag in steps if on[key])
    for key in du.FILTERS:
        if task.get(key) is not None:
            suffix += f"_{key}{task.get(key)}"
    return Path(inputs[0]).with_name(f"{name}{suffix}.csv")


def shard_path(out: Path, i: int) -> Path:
    return out.with_name(f"{out.stem}_{i}{out.suffix}")


def _info(df: pd.DataFrame, task, csv, out: Path) -> tuple[pd.DataFrame, list]:
    mode = str(task.info)
    if mode not in INFO_MODES:
        raise ValueError(f"task.info={task.info} must be missing, all or none")
    need = missing_info(df) if mode == "missing" else pd.Series(mode == "all", index=df.index)
    if not need.any():
        if mode == "none" and missing_info(df).any():
            log.warning("the output lacks size columns for %d rows (task.info=none): it cannot train before "
                        "task.info=missing measures them", int(missing_info(df).sum()))
        return df, []
    files = media_paths(df, media_folder(csv, task.get("video_folder")))
    kept, failed = add_columns(df, files, None, need.tolist(), out, {"info": mode}, int(task.num_workers),
                               check_decode=bool(task.check_decode), desc="datautil info")
    kept["resolution"] = pd.to_numeric(kept["height"]) * pd.to_numeric(kept["width"])
    return kept, failed


def _read(csv, first, task, setting: str = "task.csv_path") -> pd.DataFrame:
    """A CSV with its relative paths made relative to the first input's folder (unless task.video_folder
    says where they all are), so rows of CSVs in different folders compare and merge by path."""
    df = read_table(csv, setting)
    return df if task.get("video_folder") else rebase_paths(df, Path(csv).resolve().parent, first)


def _count(step: str, before: int, df: pd.DataFrame) -> pd.DataFrame:
    if len(df) != before:
        log.info("%s: %d -> %d rows", step, before, len(df))
    return df


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    record_run(cfg, run_dir(cfg))
    inputs = input_paths(task.csv_path)
    out = Path(task.output_csv) if task.get("output_csv") else output_name(task, inputs)
    written = [shard_path(out, i) for i in range(int(task.shard))] if task.shard else [out]
    if any(w.resolve() == Path(p).resolve() for w in written for p in inputs):
        raise ValueError(f"the output {out} would overwrite an input: set task.output_csv")
    frames = [_read(p, inputs[0], task) for p in inputs]
    df = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    csv = inputs[0] if len(inputs) == 1 else " + ".join(inputs)
    log.info("datautil: %d rows from %s", len(df), csv)

    if task.difference:
        other = _read(task.difference, inputs[0], task, "task.difference")
        df = _count("difference", len(df), du.difference(df, other))
    if task.intersection:
        other = _read(task.intersection, inputs[0], task, "task.intersection")
        df = _count("intersection", len(df), du.intersection(df, other))
    if task.train_columns_only:
        df = du.train_columns_only(df)
    df, failed = _info(df.reset_index(drop=True), task, inputs[0], out)
    if task.exists:
        files = media_paths(df, media_folder(inputs[0], task.get("video_folder")))
        df = _count("exists", len(df), df[[Path(f).exists() for f in files]])

    text_steps = ("remove_url", "remove_empty_caption", "remove_text_duplication", "refine_llm_caption",
                  "clean_caption", "merge_cmotion")
    if any(task.get(k) for k in text_steps):
        require_columns(df, ["text"], csv, "the caption options")
    if task.remove_url:
        df = _count("remove_url", len(df), df[~du.has_url(df["text"])])
    if task.remove_empty_caption:
        df = _count("remove_empty_caption", len(df), df[~du.empty_text(df["text"])])
    if task.remove_path_duplication:
        df = _count("remove_path_duplication", len(df), df.drop_duplicates(subset=["path"]))
    if task.relpath:
        df = df.assign(path=du.relpath(df["path"], str(task.relpath)))
    if task.abspath:
        df = df.assign(path=du.abspath(df["path"], str(task.abspath)))
    if not task.relpath and not task.abspath:  # the output finds the files from its own folder
        df = rebase_paths(df, media_folder(inputs[0], task.get("video_folder")), out)
    if task.merge_cmotion:
        require_columns(df, ["cmotion"], csv, "task.merge_cmotion")
        df = df.assign(text=[du.merge_cmotion(t, c) for t, c in zip(df["text"], df["cmotion"])])
    if task.refine_llm_caption:
        df = df.assign(text=df["text"].map(du.remove_llm_prefix))
    if task.clean_caption:
        from opensora.text_encoder.clean import text_preprocessing

        df = df.assign(text=df["text"].map(text_preprocessing))
    if task.sort:
        require_columns(df, [task.sort], csv, "task.sort")
        df = df.sort_values(by=task.sort, ascending=bool(task.sort_ascending), kind="stable")
    if task.remove_empty_caption:  # again: cleaning may have emptied captions
        df = _count("remove_empty_caption", len(df), df[~du.empty_text(df["text"])])
    df, removed = du.filter_rows(df, csv, **{k: task.get(k) for k in du.FILTERS})
    for name, n in removed.items():
        log.info("filter %s=%s removes %d rows", name, task.get(name), n)
    if task.remove_text_duplication:
        df = _count("remove_text_duplication", len(df), df.drop_duplicates(subset=["text"], keep="first"))

    if "text" not in df.columns:
        df = df.assign(text="")
    if task.shard:
        for i, part in enumerate(du.shard(df, int(task.shard))):
            path = shard_path(out, i)
            write_table(part, path)
            log.info("shard %d: %d rows -> %s", i, len(part), path)
        write_failed(failed, out)
    else:
        finish(df, failed, out, csv, "datautil")
    print(f"datautil: {len(df)} rows -> {out if not task.shard else f'{task.shard} shards beside {out}'}", flush=True)
    return {"datautil/rows": len(df)}
