"""Sample task: prompts -> text embeddings -> diffusion sampling with CFG -> decode -> videos.

Staged (one model in memory at a time): `task=embed_text` writes the embeddings, this task reads
them (task.text_embed_folder) and saves latents (task.save_latents), `task=decode` decodes them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opensora.data.cache import INDEX, check_meta, load_text_embedding, read_index, read_meta, save_video_latent, \
    text_cache_settings, write_index, write_meta
from opensora.logger import build_logger
from opensora.tasks.common import build_model, build_text_encoder, read_prompts, record_run, run_dir, \
    publish_samples, sample_latents
from opensora.model.pretrained import HF_CONFIG, SUFFIXES, load_pretrained
from opensora.utils.checkpoint import resolve_checkpoint_dir

log = logging.getLogger(__name__)


def load_model_weights(model, path: str, use_ema: bool = True) -> str:
    """Load weights from a train-task checkpoint directory (EMA if asked and present; every parameter
    must be in it), a checkpoint file (.ckpt, .safetensors, torch .pth) or a Hugging Face model folder
    (config.json + model.safetensors; opensora/model/pretrained.py)."""
    p = Path(path)
    if p.suffix.lower() in SUFFIXES or (p / HF_CONFIG).is_file():
        load_pretrained(model, p, use_ema=use_ema)
        return str(p)
    ckpt = resolve_checkpoint_dir(p)
    f = ckpt / ("ema.ckpt" if use_ema and (ckpt / "ema.ckpt").is_file() else "model.ckpt")
    load_pretrained(model, f, strict=True)
    return str(f)


class CachedTextEmbeddings:
    """Caption embeddings read from a folder written by `task=embed_text` (index.csv + one .npz per
    caption), with the text encoder's `encode(prompts) -> {"y": [B, 1, L, D], "mask": [B, L]}`.

    `settings` (`text_cache_settings` of the configured text encoder) must equal the folder's recorded
    ones; every embedding must be [model_max_length, caption_channels] of the model it feeds.
    """

    def __init__(self, folder: str, caption_channels: int, model_max_length: int, settings: Optional[dict] = None,
                 config_key: str = "task.text_embed_folder"):
        self.folder = Path(folder)
        self.config_key = config_key
        self.expected = (int(model_max_length), int(caption_channels))
        check_meta(self.folder, "text", settings or {}, config_key)
        self.settings = read_meta(self.folder).get("settings", {})
        index = read_index(self.folder)
        if len(index) == 0:
            raise ValueError(f"{self.folder / INDEX} lists no captions")
        self.captions = [str(c) for c in index["caption"]]
        self.paths: dict[str, Path] = {}
        for caption, path in zip(self.captions, index["path"]):
            self.paths.setdefault(caption, self.folder / str(path))
        self._loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._load(self.captions[0])  # a cache for another model fails here, before any model is built
        log.info("text embeddings of %d captions from %s (settings: %s)", len(self.paths), self.folder,
                 self.settings)

    def select(self, prompts: Optional[Sequence[str]], prompt_file: Optional[str]) -> list[str]:
        """The prompts to sample: those given (each must be in the cache), else every cached caption."""
        if not prompts and not prompt_file:
            return list(self.captions)
        wanted = read_prompts(prompts, prompt_file)
        missing = [p for p in wanted if p not in self.paths]
        if missing:
            raise KeyError(f"{len(missing)} of {len(wanted)} prompts have no embedding in {self.folder / INDEX}, "
                           f"first: {missing[:3]}; embed them with task=embed_text, or leave task.prompts and "
                           "task.prompt_file unset to sample every cached caption")
        return wanted

    def _load(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        if caption not in self._loaded:
            path = self.paths[caption]
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {self.folder / INDEX}) does not exist")
            emb, mask = load_text_embedding(path)
            if emb.shape != self.expected:
                raise ValueError(
                    f"{path}: text embedding of shape {list(emb.shape)}, but the model takes "
                    f"[model_max_length={self.expected[0]}, caption_channels={self.expected[1]}]: {self.config_key} "
                    "was built with another text encoder; rebuild it with task=embed_text and this text_encoder, "
                    "or set text_encoder (or model.caption_channels / model.model_max_length) to match it")
            self._loaded[caption] = (emb, mask)
        return self._loaded[caption]

    def encode(self, prompts: Sequence[str]) -> dict:
        rows = [self._load(str(p)) for p in prompts]
        return {"y": np.stack([r[0] for r in rows])[:, None],  # [B, 1, L, D]
                "mask": np.stack([r[1] for r in rows]).astype(np.int32)}  # [B, L]


def _plain(value):
    """A config value as plain Python (lists for list nodes)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def write_latents(folder: Path, latents: Sequence[np.ndarray], prompts: Sequence[str], settings: dict) -> None:
    """One .npz per sample (000000.npz, ...) + index.csv (caption, path) + cache_meta.json (kind "video")."""
    rows = []
    for i, (z, prompt) in enumerate(zip(latents, prompts)):
        name = f"{i:06d}.npz"
        save_video_latent(folder / name, z)
        rows.append({"caption": prompt, "path": name})
    write_index(folder, pd.DataFrame(rows, columns=["caption", "path"]))
    write_meta(folder, "video", settings)
    log.info("saved %d latents %s to %s", len(rows), list(latents[0].shape) if len(latents) else [], folder)


def run(cfg: DictConfig) -> dict:
    """Sample videos; with task.text_embed_folder the text encoder is not built (cached embeddings),
    with task.save_latents the VAE is not built (latents saved for task=decode)."""
    task = cfg.task
    embed_folder = task.get("text_embed_folder")
    keep_latents = bool(task.get("save_latents", False))
    if keep_latents and task.evaluate:
        raise ValueError("task.evaluate=true needs decoded videos but task.save_latents=true skips decoding: "
                         "evaluate in task=decode instead")
    out = run_dir(cfg)
    record_run(cfg, out)
    if embed_folder:
        text_encoder = CachedTextEmbeddings(embed_folder, cfg.model.caption_channels, cfg.model.model_max_length,
                                            text_cache_settings(cfg.text_encoder))
        prompts = text_encoder.select(task.prompts, task.prompt_file)
    else:
        prompts = read_prompts(task.prompts, task.prompt_file)
        text_encoder = build_text_encoder(cfg)
    vae = None if keep_latents else instantiate(cfg.vae)
    model = build_model(cfg, with_pretrained=False)
    loaded = load_model_weights(model, task.ckpt_path, bool(task.use_ema))
    log.info("weights from %s", loaded)
    sampler = instantiate(cfg.scheduler)
    shape = [int(model.in_channels), *(int(v) for v in cfg.model.input_size)]  # [C, T, H, W]
    prompts = [p for p in prompts for _ in range(int(task.num_samples_per_prompt))]

    logger = build_logger(cfg)
    exit_code = 1
    try:
        metric = {}
        batches = sample_latents(model, text_encoder, sampler, prompts, shape, int(task.batch_size), int(cfg.seed))
        if keep_latents:
            latents = [z for batch in batches for z in batch]
            settings = {
                "source": "task=sample",
                "latent_shape": shape,
                "vae": OmegaConf.to_container(cfg.vae, resolve=True),
                "num_frames": _plain(cfg.data.get("num_frames")),
                "image_size": _plain(cfg.data.get("image_size")),
                "fps": int(task.fps),
                "upscale": int(task.upscale),
                "seed": int(cfg.seed),
                "ckpt_path": str(task.ckpt_path),
                "text_embed_folder": str(embed_folder) if embed_folder else None,
                "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
            }
            write_latents(out / "latents", latents, prompts, settings)
        else:
            videos = [np.asarray(v, dtype=np.float32) for batch in batches for v in vae.decode(batch)]
            metric = publish_samples(cfg, videos, prompts, out, int(task.fps), int(task.upscale), logger,
                                     bool(task.evaluate))
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return metric
