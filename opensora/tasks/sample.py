"""Sample task: prompts -> text embeddings -> diffusion sampling with CFG -> decode -> videos.

STDiT (Open-Sora 1.0) samples text-to-video at the configured size. STDiT2 (Open-Sora 1.1) adds any size
(data.resolution + data.aspect_ratio or data.image_size, data.num_frames; 1 frame = text-to-image), the size /
aspect-ratio / fps conditioning, reference images and videos with mask strategies, per-loop prompts and loop
generation (opensora/sampling/). Either model can name videos after their prompts (task.name_by_prompt,
VBench's layout) and skip the ones that exist, so a long generation resumes after a kill.

Staged (one model in memory at a time): `task=embed_text` writes the embeddings, this task reads
them (task.text_embed_folder) and saves latents (task.save_latents), `task=decode` decodes them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Output:
    """One video a run makes: its position in the run's list of samples (its noise seeds), its prompt and sample
    number, and its file stem when videos are named after prompts."""

    index: int
    prompt: int
    k: int
    name: Optional[str] = None


def plan_outputs(num_prompts: int, num_samples: int, names: Optional[Sequence[str]] = None) -> list[Output]:
    """Every (prompt, k) in order, index = prompt * num_samples + k; with `names`, stems "<name>-<k>" (VBench's
    `-0`, `-1`, ...), a repeated prompt kept once."""
    outs, seen = [], set()
    for j in range(num_prompts):
        for k in range(num_samples):
            name = None if names is None else f"{names[j]}-{k}"
            if name is not None and name in seen:
                continue
            seen.add(name)
            outs.append(Output(j * num_samples + k, j, k, name))
    dropped = num_prompts * num_samples - len(outs)
    if dropped:
        log.info("%d samples of repeated prompts dropped (they would have the same file names)", dropped)
    return outs


def missing_outputs(outs: Sequence[Output], folder: Path, suffix: str) -> list[Output]:
    """The named outputs whose file `folder` does not hold yet (all of them when unnamed)."""
    todo = [o for o in outs if o.name is None or not (folder / f"{o.name}{suffix}").is_file()]
    if len(todo) < len(outs):
        log.info("%d of %d videos already in %s: skipped (delete them to make them again)", len(outs) - len(todo),
                 len(outs), folder)
    return todo


def save_named(videos: Sequence[np.ndarray], outs: Sequence[Output], folder: Path, fps: int, upscale: int,
               still_as_png: bool) -> list[Path]:
    """Save each video as <folder>/<name>.mp4 (a 1-frame one as .png with still_as_png); each file appears
    whole (written under a temporary name, then renamed), so a kill leaves none half-written."""
    from opensora.utils.video_io import save_image, save_video, to_uint8_frames

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for v, o in zip(videos, outs):
        frames = to_uint8_frames(v)
        if still_as_png and frames.shape[0] == 1:
            paths.append(Path(save_image(frames[0], folder / f"{o.name}.png", upscale=upscale)))
        else:
            paths.append(Path(save_video(frames, folder / f"{o.name}.mp4", fps=fps, upscale=upscale)))
    return paths


def refuse_conditioning(cfg: DictConfig) -> None:
    """Settings only STDiT2 takes, given for another model: an error naming them."""
    task = cfg.task
    given = [k for k in ("reference_path", "mask_strategy") if task.get(k) is not None]
    if int(task.get("loop", 1)) != 1:
        given.append("loop")
    if given:
        raise ValueError(f"{', '.join('task.' + k for k in given)}: conditioning and loop generation are Open-Sora "
                         f"1.1's and need an STDiT2 model (model=stdit2_xl2, e.g. experiment=sample_v1_1); "
                         f"model={cfg.model._target_} takes none of them")


def run(cfg: DictConfig) -> dict:
    """Sample videos; with task.text_embed_folder the text encoder is not built (cached embeddings),
    with task.save_latents the VAE is not built (latents saved for task=decode)."""
    from opensora.sampling.request import is_stdit2

    task = cfg.task
    embed_folder = task.get("text_embed_folder")
    keep_latents = bool(task.get("save_latents", False))
    if keep_latents and task.evaluate:
        raise ValueError("task.evaluate=true needs decoded videos but task.save_latents=true skips decoding: "
                         "evaluate in task=decode instead")
    if is_stdit2(cfg.model._target_):
        from opensora.tasks.sample_stdit2 import run_stdit2

        return run_stdit2(cfg)
    refuse_conditioning(cfg)
    out = run_dir(cfg)
    record_run(cfg, out)
    folder = Path(task.save_dir) if task.get("save_dir") else out / "samples"
    if embed_folder:
        text_encoder = CachedTextEmbeddings(embed_folder, cfg.model.caption_channels, cfg.model.model_max_length,
                                            text_cache_settings(cfg.text_encoder))
        prompts = text_encoder.select(task.prompts, task.prompt_file)
    else:
        prompts = read_prompts(task.prompts, task.prompt_file)
    by_prompt = bool(task.get("name_by_prompt", False))
    if by_prompt:
        from opensora.sampling.request import prompt_name

        outs = plan_outputs(len(prompts), int(task.num_samples_per_prompt),
                            [prompt_name(p, j) for j, p in enumerate(prompts)])
        outs = missing_outputs(outs, folder, ".mp4")
        if not outs:
            log.info("every video is in %s: nothing to sample", folder)
            return {}
    if not embed_folder:
        text_encoder = build_text_encoder(cfg)
    vae = None if keep_latents else instantiate(cfg.vae)
    model = build_model(cfg, with_pretrained=False)
    loaded = load_model_weights(model, task.ckpt_path, bool(task.use_ema))
    log.info("weights from %s", loaded)
    sampler = instantiate(cfg.scheduler)
    shape = [int(model.in_channels), *(int(v) for v in cfg.model.input_size)]  # [C, T, H, W]

    logger = build_logger(cfg)
    exit_code = 1
    try:
        metric = {}
        if by_prompt:  # each batch saved as it is done, so a killed run keeps what it made
            todo = [prompts[o.prompt] for o in outs]
            batches = sample_latents(model, text_encoder, sampler, todo, shape, int(task.batch_size), int(cfg.seed),
                                     indices=[o.index for o in outs])
            start = 0
            for batch in batches:
                chunk = outs[start:start + len(batch)]
                start += len(batch)
                save_named([np.asarray(v, np.float32) for v in vae.decode(batch)], chunk, folder, int(task.fps),
                           int(task.upscale), still_as_png=False)
            log.info("saved %d videos in %s", len(outs), folder)
            exit_code = 0
            return metric
        prompts = [p for p in prompts for _ in range(int(task.num_samples_per_prompt))]
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
                                     bool(task.evaluate), folder=folder)
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return metric
