"""Embed-text task: cache T5 embeddings so that training / sampling need not hold the text encoder.

From a video CSV (task.csv_path, default data.csv_path): one .npz per (video, caption) mirroring the
video folder (`clips/a.mp4` -> `clips/a.npz`; a second caption of the same video -> `clips/a.1.npz`),
read by training with data.text_embed_folder. From prompts (task.prompts / task.prompt_file):
numbered files (000000.npz, ...), read by task=sample with task.text_embed_folder. Either way the
folder gets index.csv (caption, path[, video]) and cache_meta.json (the text encoder settings, which
a user of the cache must match).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from opensora.data.cache import INDEX, check_meta, read_meta, save_text_embedding, text_cache_settings, \
    write_index, write_meta
from opensora.tasks.common import batched, build_text_encoder, read_prompts, record_run, run_dir

log = logging.getLogger(__name__)


def text_entries(task: DictConfig, prompt_syntax: bool = False) -> tuple[pd.DataFrame, str]:
    """(rows with caption, path [, video], source description) of what to embed. With `prompt_syntax` (an STDiT2
    run: Open-Sora 1.1 prompts), each prompt's per-loop texts without its JSON options."""
    if task.get("prompts") or task.get("prompt_file"):
        prompts = read_prompts(task.prompts, task.prompt_file)
        if prompt_syntax:
            from opensora.sampling.request import prompt_texts

            prompts = [t for j, p in enumerate(prompts) for t in prompt_texts(p, j)]
        prompts = list(dict.fromkeys(prompts))
        rows = pd.DataFrame({"caption": prompts, "path": [f"{i:06d}.npz" for i in range(len(prompts))]})
        return rows, "prompts"
    csv = task.get("csv_path")
    if not csv:
        raise ValueError("task=embed_text needs captions: task.csv_path (or data.csv_path with data=video_csv), "
                         "task.prompts='[...]' or task.prompt_file=FILE")
    from opensora.data.video import cache_name, read_video_csv

    df = read_video_csv(csv)
    pairs = list(dict.fromkeys(zip(df["video"], df["caption"])))  # distinct (video, caption), CSV order
    taken: set = set()
    by_video: dict[str, str] = {}
    paths = []
    for video, _ in pairs:
        base = by_video.get(video)
        if base is None:
            name = by_video[video] = cache_name(video, taken)
        else:  # another caption of the same video: clips/a.1.npz, clips/a.2.npz, ...
            stem, k = base[:-len(".npz")], 1
            while f"{stem}.{k}.npz" in taken:
                k += 1
            name = f"{stem}.{k}.npz"
            taken.add(name)
        paths.append(name)
    rows = pd.DataFrame({"caption": [c for _, c in pairs], "path": paths, "video": [v for v, _ in pairs]})
    return rows, f"csv:{csv}"


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    if not task.get("output_dir"):
        raise ValueError("task=embed_text needs task.output_dir (or data.text_embed_folder): the cache folder to write")
    folder = Path(task.output_dir)
    out = run_dir(cfg)
    record_run(cfg, out)
    from opensora.sampling.request import is_stdit2

    rows, source = text_entries(task, is_stdit2(OmegaConf.select(cfg, "model._target_")))
    text_encoder = build_text_encoder(cfg, captions=rows["caption"].tolist())
    settings = text_cache_settings(cfg.text_encoder)  # now that its files (a trained tokenizer) exist
    if read_meta(folder) is not None and not task.overwrite:
        check_meta(folder, "text", settings, "task.output_dir")  # adding to a cache of the same encoder only
    info = {**settings, "from_pretrained": OmegaConf.select(cfg, "text_encoder.from_pretrained"),
            "dtype": OmegaConf.select(cfg, "text_encoder.dtype"), "source": source}
    write_meta(folder, "text", info)

    todo = [r for r in rows.itertuples(index=False) if task.overwrite or not (folder / r.path).is_file()]
    if len(todo) < len(rows):
        log.info("%d of %d embeddings already in %s (task.overwrite=true recomputes them)", len(rows) - len(todo),
                 len(rows), folder)
    bar = tqdm(total=len(todo), desc="embed_text", dynamic_ncols=True)
    for chunk in batched(todo, int(task.batch_size)):
        emb = text_encoder.encode([r.caption for r in chunk])
        for k, r in enumerate(chunk):
            save_text_embedding(folder / r.path, emb["y"][k, 0], emb["mask"][k])
        bar.update(len(chunk))
    bar.close()
    write_index(folder, rows)
    log.info("text embeddings of %d captions in %s (%s; settings %s)", len(rows), folder, INDEX, settings)
    return {"embed_text/captions": len(rows)}
