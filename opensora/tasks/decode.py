"""Decode task: latents saved by `task=sample task.save_latents=true` -> VAE decode -> videos.

The last stage of staged sampling; only the VAE is built. Reads <latents_dir>/index.csv
(caption, path), one latent [C, T, H, W] per .npz, and cache_meta.json (kind "video"), whose
recorded VAE settings must match the configured VAE.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opensora.data.cache import INDEX, META, load_video_latent, read_index, read_meta
from opensora.logger import build_logger
from opensora.tasks.common import publish_samples, record_run, run_dir

log = logging.getLogger(__name__)

# VAE settings that change what a latent means: a mismatch is an error. Others (e.g. the folder the
# weights are read from, micro-batch size) are reported as warnings.
VAE_KEYS_MUST_MATCH = ("_target_", "latent_channels", "downsample", "scaling_factor", "scale_factor")


def check_latents_meta(folder: Path, vae_cfg: DictConfig, config_key: str = "task.latents_dir") -> dict:
    """The folder's recorded settings, after checking it holds video latents made for this VAE."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{config_key}={folder} does not exist: write it with task=sample "
                                "task.save_latents=true (it lands in <run>/latents)")
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{config_key}={folder} has no {META}: it was not written by task=sample "
                                "task.save_latents=true")
    if meta.get("kind") != "video":
        raise ValueError(f"{config_key}={folder} is a {meta.get('kind')!r} cache, expected video latents")
    settings = meta.get("settings", {})
    saved = settings.get("vae")
    if saved is None:
        log.warning("%s records no VAE settings: cannot check that vae=%s is the VAE it was made for",
                    folder / META, vae_cfg.get("_target_"))
        return settings
    current = OmegaConf.to_container(vae_cfg, resolve=True)
    diffs = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)}
    errors = [f"vae.{k}: latents {a!r} vs config {b!r}" for k, (a, b) in diffs.items() if k in VAE_KEYS_MUST_MATCH]
    if errors:
        raise ValueError(f"{config_key}={folder} was sampled for another VAE ({'; '.join(errors)}): decode it with "
                         "the VAE it was made for (set vae=... to match)")
    for k, (a, b) in diffs.items():
        log.warning("vae.%s differs from the one the latents were sampled for: %r (latents) vs %r (config)", k, a, b)
    return settings


def _batches(shapes: list[tuple], batch_size: int):
    """Index ranges of consecutive latents with one shape, at most batch_size long."""
    start = 0
    while start < len(shapes):
        end = start + 1
        while end < len(shapes) and end - start < batch_size and shapes[end] == shapes[start]:
            end += 1
        yield start, end
        start = end


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    folder = Path(task.latents_dir)
    settings = check_latents_meta(folder, cfg.vae)
    index = read_index(folder)
    if len(index) == 0:
        raise ValueError(f"{folder / INDEX} lists no latents")
    prompts = [str(c) for c in index["caption"]]
    files = [folder / str(p) for p in index["path"]]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} (listed in {folder / INDEX}) does not exist")
    fps = int(task.fps if task.fps is not None else settings.get("fps", 8))
    upscale = int(task.upscale if task.upscale is not None else settings.get("upscale", 1))
    out = run_dir(cfg)
    record_run(cfg, out)
    vae = instantiate(cfg.vae)

    logger = build_logger(cfg)
    exit_code = 1
    try:
        latents = [load_video_latent(f) for f in files]
        for f, z in zip(files, latents):
            if z.shape[0] != vae.latent_channels:
                raise ValueError(f"{f}: latent with {z.shape[0]} channels, but vae={cfg.vae._target_} has "
                                 f"latent_channels={vae.latent_channels}")
        videos = []
        for start, end in _batches([z.shape for z in latents], int(task.batch_size)):
            x = vae.decode(np.stack(latents[start:end]))  # [n, C, T, H, W] -> [n, 3, T', H', W']
            videos.extend(np.asarray(x, dtype=np.float32))
        log.info("decoded %d latents from %s", len(videos), folder)
        metric = publish_samples(cfg, videos, prompts, out, fps, upscale, logger, bool(task.evaluate),
                                 still_as_png=bool(settings.get("still_as_png", False)))  # 1.1: images as png
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return metric
