"""Cached VAE latents for bucketed training (task=embed_video with data=variable_csv): one latent per video per
bucket size it can train at, so the VAE need not run during training (the MindSpore port could not combine its
latent cache with buckets).

    <folder>/<T>x<H>x<W>/<video>.npz   latent [C, T, H/8, W/8] (the scaled posterior mean, + latent_std when the VAE
                                       samples its posterior), fps, frame_indices (epoch 0's window)
    <folder>/index.csv                 caption, path, video, num_frames, height, width
    <folder>/cache_meta.json           the bucket config, resolutions, frame interval, VAE: training must match

A video's sizes are every bucket the rule can give it (`Bucket.possible`: each resolution it fits with a
candidate of keep_prob > 0, down to the first certain one); images have one frame per size. Unreadable files
are skipped, logged and listed in bad_videos.csv.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from opensora.data.bucket import Bucket
from opensora.data.cache import save_video_latent, write_index
from opensora.data.loader import BadSampleError, map_ordered, worker_process_setup
from opensora.data.variable import SampleKey, size_dir
from opensora.data.video import cache_name

log = logging.getLogger(__name__)

_DATASET: dict = {}


def _init(dataset) -> None:
    worker_process_setup()
    _DATASET["d"] = dataset


def _load(task):
    key = task
    try:
        video, indices, fps = _DATASET["d"].sized_clip(key, 0)
        return key, video, (indices, fps)
    except BadSampleError as e:
        return key, None, (e.path, e.reason)


def bucket_sizes(dataset, bucket: Bucket, frame_interval: int) -> list[SampleKey]:
    """(row, T, H, W) of every latent to cache: each distinct video at each bucket size it can get."""
    keys, seen = [], set()
    s = dataset.sizes
    for row in range(len(dataset)):
        video = dataset.videos[row]
        if not (np.isfinite(s.num_frames[row]) and np.isfinite(s.height[row]) and np.isfinite(s.width[row])):
            continue
        for b in bucket.possible(s.num_frames[row], s.height[row], s.width[row], frame_interval):
            t, h, w = bucket.get_thw(b)
            if (video, t, h, w) not in seen:
                seen.add((video, t, h, w))
                keys.append(SampleKey(row, t, h, w))
    return keys


def embed_bucket_latents(dataset, bucket: Bucket, frame_interval: int, vae, encode, folder: Path, batch_size: int,
                         num_workers: int, overwrite: bool) -> dict:
    """Write the cache (see the module docstring); `encode(vae, videos) -> (latent, std or None)`."""
    keys = bucket_sizes(dataset, bucket, frame_interval)
    taken: dict = {}
    names = {}
    for k in keys:
        sub = size_dir(k.num_frames, k.height, k.width)
        names[k] = f"{sub}/{cache_name(dataset.videos[k.row], taken.setdefault(sub, set()))}"
    todo = [k for k in keys if overwrite or not (folder / names[k]).is_file()]
    log.info("%d latents for %d videos at %d bucket sizes (%d already in %s)", len(keys),
             len({k.row for k in keys}), len({names[k].split('/')[0] for k in keys}), len(keys) - len(todo), folder)
    by_size: dict = {}
    for k in todo:  # one VAE batch holds one size
        by_size.setdefault((k.num_frames, k.height, k.width), []).append(k)
    bad: dict = {}
    bar = tqdm(total=len(todo), desc="embed_video (buckets)", dynamic_ncols=True)
    for size, group in by_size.items():
        loaded = map_ordered(_load, group, num_workers, initializer=_init, initargs=(dataset,))
        for start in range(0, len(group), batch_size):
            good = []
            for _ in group[start:start + batch_size]:
                key, video, extra = next(loaded)
                if video is None:
                    bad[extra[0]] = extra[1]
                    log.warning("skipping bad video %s at %s: %s", extra[0], size_dir(*size), extra[1])
                else:
                    good.append((key, video, extra))
            if good:
                latent, std = encode(vae, np.stack([v for _, v, _ in good]))
                for j, (key, _, (indices, fps)) in enumerate(good):
                    arrays = {"frame_indices": np.asarray(indices, np.int64), "fps": np.float32(fps)}
                    if std is not None:
                        arrays["latent_std"] = std[j]
                    save_video_latent(folder / names[key], latent[j], **arrays)
            bar.update(len(group[start:start + batch_size]))
    bar.close()
    kept = [k for k in keys if (folder / names[k]).is_file()]
    write_index(folder, pd.DataFrame({"caption": [dataset.captions[k.row] for k in kept],
                                      "path": [names[k] for k in kept], "video": [dataset.videos[k.row] for k in kept],
                                      "num_frames": [k.num_frames for k in kept],
                                      "height": [k.height for k in kept], "width": [k.width for k in kept]}))
    if bad:
        pd.DataFrame(list(bad.items()), columns=["path", "reason"]).to_csv(folder / "bad_videos.csv", index=False)
        log.warning("%d videos could not be read (listed in %s)", len(bad), folder / "bad_videos.csv")
    log.info("%d bucket latents in %s", len(kept), folder)
    return {"embed_video/latents": len(kept), "embed_video/videos": len({k.row for k in kept})}
