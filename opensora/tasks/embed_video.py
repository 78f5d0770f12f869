"""Embed-video task: cache VAE latents of the videos of a CSV, so that training need not run the VAE.

One .npz per distinct video, mirroring the video folder (`clips/a.mp4` -> `clips/a.npz`), holding
`latent` [C, T, h, w] of one clip sampled as training samples it (data.num_frames,
data.frame_interval, data.image_size; the window drawn with epoch 0's RNG) and the `frame_indices`
used. With a VAE that samples its posterior (vae.sample_posterior) the file holds the scaled
posterior mean as `latent` and its std as `latent_std`, and training draws a fresh sample each
epoch. Unreadable videos are skipped, logged and listed in bad_videos.csv. index.csv has caption,
path, video; cache_meta.json the sampling and VAE settings, which training must match
(data.video_embed_folder).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from opensora.data.cache import INDEX, check_meta, read_meta, save_video_latent, video_cache_settings, write_index, \
    write_meta
from opensora.data.loader import BadSampleError, map_ordered, worker_process_setup
from opensora.data.video import VideoTextDataset, cache_name, unique_videos
from opensora.tasks.common import batched, record_run, run_dir

log = logging.getLogger(__name__)

_DATASET: dict = {}


def _init(dataset) -> None:
    worker_process_setup()
    _DATASET["d"] = dataset


def _load(i: int):
    """(i, video [3, T, H, W], frame indices) or (i, None, (path, reason))."""
    d = _DATASET["d"]
    try:
        return (i, *d.clip(i, 0))
    except BadSampleError as e:
        return i, None, (e.path, e.reason)


def _encode(vae, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(latent, std or None): the posterior's scaled mean and std when the VAE samples its posterior."""
    if getattr(vae, "sample_posterior", False) and hasattr(vae, "latent_dist"):
        dist = vae.latent_dist(videos)
        mean = (np.asarray(dist.mean, np.float32) - vae.shift_factor) * vae.scale_factor
        return mean.astype(np.float32), (np.asarray(dist.std, np.float32) * vae.scale_factor).astype(np.float32)
    return np.asarray(vae.encode(videos), np.float32), None


def run(cfg: DictConfig) -> dict:
    task, data = cfg.task, cfg.data
    if not task.get("output_dir"):
        raise ValueError("task=embed_video needs task.output_dir (or data.video_embed_folder): the cache folder to write")
    if not data.get("csv_path"):
        raise ValueError("task=embed_video reads the videos of data.csv_path: use data=video_csv data.csv_path=...")
    folder = Path(task.output_dir)
    out = run_dir(cfg)
    record_run(cfg, out)
    settings = video_cache_settings(data, cfg.vae)
    if read_meta(folder) is not None and not task.overwrite:
        check_meta(folder, "video", settings, "task.output_dir")
    # the training dataset (same sampling, seed and decoding), reading pixels
    dataset = instantiate(data.dataset, text_embed_folder=None, video_embed_folder=None)
    if not isinstance(dataset, VideoTextDataset):
        raise TypeError(f"task=embed_video reads a VideoTextDataset (data=video_csv), data.dataset is {type(dataset)}")
    vae = instantiate(cfg.vae)
    write_meta(folder, "video", {**settings, "seed": int(cfg.seed), "csv_path": str(data.csv_path),
                                 "vae_from_pretrained": OmegaConf.select(cfg, "vae.from_pretrained"),
                                 "posterior": "latent = mean, latent_std = std (sampled when read)"
                                 if getattr(vae, "sample_posterior", False) and hasattr(vae, "latent_dist")
                                 else "latent as encoded"})

    from opensora.data.variable import VariableVideoTextDataset

    if isinstance(dataset, VariableVideoTextDataset):  # bucketed data: one latent per video per bucket size
        from opensora.data.bucket import Bucket
        from opensora.data.bucket_cache import embed_bucket_latents

        return embed_bucket_latents(dataset, Bucket(data.bucket_config, resolutions=data.get("resolutions")),
                                    int(data.frame_interval), vae, _encode, folder, int(task.batch_size),
                                    int(task.num_workers), bool(task.overwrite))
    firsts = unique_videos(dataset.videos)
    taken: set = set()
    names = {i: cache_name(dataset.videos[i], taken) for i in firsts}
    todo = [i for i in firsts if task.overwrite or not (folder / names[i]).is_file()]
    if len(todo) < len(firsts):
        log.info("%d of %d latents already in %s (task.overwrite=true recomputes them)", len(firsts) - len(todo),
                 len(firsts), folder)
    bad: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), desc="embed_video", dynamic_ncols=True)
    loaded = map_ordered(_load, todo, int(task.num_workers), initializer=_init, initargs=(dataset,))
    for chunk in batched(list(range(len(todo))), int(task.batch_size)):
        good = []
        for _ in chunk:
            i, video, extra = next(loaded)
            if video is None:
                bad.append(extra)
                log.warning("skipping bad video %s: %s", *extra)
            else:
                good.append((i, video, extra))
        if good:
            latent, std = _encode(vae, np.stack([v for _, v, _ in good]))
            for k, (i, _, indices) in enumerate(good):
                arrays = {"frame_indices": np.asarray(indices, np.int64)}
                if std is not None:
                    arrays["latent_std"] = std[k]
                save_video_latent(folder / names[i], latent[k], **arrays)
        bar.update(len(chunk))
    bar.close()
    bad_paths = {p for p, _ in bad}
    kept = [i for i in firsts if str(dataset.path_of(i)) not in bad_paths and (folder / names[i]).is_file()]
    write_index(folder, pd.DataFrame({"caption": [dataset.captions[i] for i in kept],
                                      "path": [names[i] for i in kept],
                                      "video": [dataset.videos[i] for i in kept]}))
    if bad:
        pd.DataFrame(bad, columns=["path", "reason"]).to_csv(folder / "bad_videos.csv", index=False)
        log.warning("%d of %d videos could not be read and have no latent (listed in %s)", len(bad), len(firsts),
                    folder / "bad_videos.csv")
    log.info("latents of %d videos in %s (%s; settings %s)", len(kept), folder, INDEX, settings)
    return {"embed_video/videos": len(kept)}
