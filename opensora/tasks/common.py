"""Pieces shared by the tasks: building components from config, and text-to-video generation."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def run_dir(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def record_dir(out: Path) -> Path:
    """Where this launch's record goes: the run directory, or resumes/<time>/ beside the first run's record when
    the run was resumed (Hydra's output_subdir, see conf/config.yaml)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sub = HydraConfig.get().output_subdir
    except Exception:  # noqa: BLE001 - outside a Hydra app
        sub = None
    return out / Path(sub).parent if sub else out


def record_run(cfg: DictConfig, out: Path) -> Path:
    """Write what reproduces the run next to its outputs: the resolved config, the git commit and, for a resumed
    run, the settings it changes. Returns the folder written to."""
    folder = record_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config_resolved.yaml", resolve=True)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    (folder / "git_sha.txt").write_text((sha or "unknown") + ("-dirty" if dirty else "") + "\n")
    if cfg.get("resume") is not None:
        from opensora.config.callback import NOTES

        changes = {k: {"recorded": v[0], "now": v[1]} for k, v in NOTES.get("resume_changes", {}).items()}
        OmegaConf.save(OmegaConf.create({"resume": str(cfg.resume), "changes": changes}), folder / "changes.yaml")
    return folder


def build_text_encoder(cfg: DictConfig, captions: Optional[Sequence[str]] = None):
    """The configured text encoder. A tiny demo encoder whose tokenizer does not exist yet gets one
    trained on `captions` (the training set's), then the whole encoder is saved beside it."""
    te = cfg.text_encoder
    tok = te.get("tokenizer_path")
    if te.get("from_pretrained") is None and tok and not Path(tok).is_file():
        from opensora.text_encoder import train_sentencepiece

        if not captions:
            raise FileNotFoundError(f"text_encoder.tokenizer_path={tok} does not exist and there are no captions to "
                                    "train one on: point it at a spiece.model or use text_encoder.from_pretrained")
        folder = Path(tok).parent
        folder.mkdir(parents=True, exist_ok=True)
        trained = train_sentencepiece(list(captions), str(folder), vocab_size=int(te.config.vocab_size))
        if Path(trained) != Path(tok):
            os.replace(trained, tok)
        log.info("trained a SentencePiece tokenizer on %d captions: %s", len(captions), tok)
    encoder = instantiate(te)
    if te.get("from_pretrained") is None and tok:
        encoder.save_pretrained(str(Path(tok).parent))
    return encoder


def build_model(cfg: DictConfig, with_pretrained: bool = True):
    """The configured model, with the weights of `model.pretrained` (a checkpoint file or a train-task
    checkpoint; see opensora/model/pretrained.py) loaded when set and `with_pretrained`."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    pretrained = spec.pop("pretrained", None)
    model = instantiate(spec)
    from opensora.model import count_parameters

    log.info("model %s: %s parameters", cfg.model._target_, f"{count_parameters(model):,}")
    if pretrained and with_pretrained:
        from opensora.model.pretrained import load_pretrained

        if not Path(pretrained).exists():
            raise FileNotFoundError(
                f"model.pretrained={pretrained} does not exist: put the downloaded weights there, or, if it is an "
                "earlier training stage's output (stage.init_from), run that stage first (its recipe is "
                "conf/experiment/train_<stage>.yaml), or point model.pretrained at another checkpoint (null: random "
                "initialisation)")
        load_pretrained(model, pretrained)
    elif with_pretrained:
        log.info("model.pretrained is null: the model starts from its random initialisation")
    return model


def batched(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def sample_latents(model, text_encoder, diffusion, prompts: Sequence[str], latent_shape: Sequence[int],
                   batch_size: int, seed: int, progress: bool = True, indices: Optional[Sequence[int]] = None,
                   model_kwargs: Optional[dict] = None):
    """Sample one latent per prompt, batch by batch: yields [n, C, T, H, W] float32 arrays.

    `latent_shape` is [C, T, H, W]; `text_encoder` is anything with `encode(prompts) -> {"y", "mask"}`
    (a T5Embedder, or cached embeddings). Noise for prompt i is drawn from `default_rng(seed + i)`,
    so a sample does not depend on which other prompts share its batch; `indices` gives each prompt's i
    (default 0, 1, ...; a resumed run passes the positions of the samples it still has to make). Batches are
    padded to `batch_size` so the compiled model graph is reused. `model_kwargs`: further model inputs of every
    batch (arrays with batch_size rows, e.g. STDiT2's `size_conditions`), doubled for guidance by the sampler.
    """
    model.set_train(False)
    null = model.get_null_y()
    extra = {k: ms.Tensor(np.asarray(v)) for k, v in (model_kwargs or {}).items()} or None
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        padded = chunk + [chunk[-1]] * (batch_size - n)
        emb = text_encoder.encode(padded)
        ids = indices[start:start + n]
        ids = ids + [ids[-1]] * (batch_size - n)
        noise = np.stack([np.random.default_rng(seed + i).standard_normal(tuple(latent_shape))
                          for i in ids]).astype(np.float32)
        z = diffusion.sample(model, shape=noise.shape, y=ms.Tensor(emb["y"]), mask=ms.Tensor(emb["mask"]),
                             y_null=null, noise=ms.Tensor(noise), progress=progress,
                             **({"model_kwargs": extra} if extra else {}))
        z = z.asnumpy() if hasattr(z, "asnumpy") else np.asarray(z)
        yield z[:n].astype(np.float32)


def generate(model, text_encoder, vae, diffusion, prompts: Sequence[str], latent_size: Sequence[int],
             batch_size: int, seed: int, progress: bool = True,
             model_kwargs: Optional[dict] = None) -> list[np.ndarray]:
    """Sample one video per prompt (`sample_latents`, then `vae.decode` per batch); returns
    [C, T, H, W] float arrays in [-1, 1]. `latent_size` is [T, H, W]; model_kwargs: see sample_latents."""
    videos = []
    shape = [vae.latent_channels, *latent_size]
    for z in sample_latents(model, text_encoder, diffusion, prompts, shape, batch_size, seed, progress,
                            model_kwargs=model_kwargs):
        videos.extend(np.asarray(vae.decode(z), dtype=np.float32))
    return videos


def save_samples(videos: Sequence[np.ndarray], prompts: Sequence[str], out_dir: Path, fps: int, upscale: int,
                 logger=None, step: Optional[int] = None, prefix: str = "samples",
                 still_as_png: bool = False) -> list[Path]:
    """One mp4 per video (a png per 1-frame video with `still_as_png`, as Open-Sora 1.1 saves images), a grid
    GIF of all; logged to W&B when a logger is given."""
    from opensora.utils.video_io import save_grid, save_image, save_video, to_uint8_frames

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = [to_uint8_frames(v) for v in videos]
    paths = []
    for i, (f, p) in enumerate(zip(frames, prompts)):
        slug = "".join(ch if ch.isalnum() else "-" for ch in p.lower())[:60].strip("-")
        if still_as_png and f.shape[0] == 1:
            paths.append(Path(save_image(f[0], out_dir / f"{i:03d}-{slug}.png", upscale=upscale)))
        else:
            paths.append(Path(save_video(f, out_dir / f"{i:03d}-{slug}.mp4", fps=fps, upscale=upscale)))
    grid = Path(save_grid(frames, out_dir / "grid.gif", fps=fps, upscale=upscale))
    with open(out_dir / "prompts.json", "w") as f:
        json.dump([{"prompt": p, "video": v.name} for p, v in zip(prompts, paths)], f, indent=1)
    if logger is not None:
        logger.log_video(f"{prefix}/grid", str(grid), caption=" | ".join(prompts), step=step, fps=fps)
        for p, v in zip(prompts, paths):
            if v.suffix == ".png":
                logger.log_image(f"{prefix}/image", str(v), caption=p, step=step)
            else:
                logger.log_video(f"{prefix}/video", str(v), caption=p, step=step, fps=fps)
    log.info("saved %d videos and %s", len(paths), grid)
    return paths


def read_prompts(prompts: Optional[Sequence[str]], prompt_file: Optional[str]) -> list[str]:
    out = list(prompts or [])
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"task.prompt_file={prompt_file} does not exist")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    out = [p for p in out if p and p.strip()]
    if not out:
        raise ValueError("no prompts: set task.prompts='[a red square moving left]' or task.prompt_file=FILE "
                         "(one prompt per line)")
    return out


def score_samples(cfg: DictConfig, videos: Sequence[np.ndarray], prompts: Sequence[str], out_dir: Path,
                  logger=None, step: Optional[int] = None) -> dict:
    """Score videos against their prompts with `data.evaluator`; writes scores.json, logs eval/* metrics."""
    from opensora.utils.video_io import to_uint8_frames

    scores = instantiate(cfg.data.evaluator)([to_uint8_frames(v) for v in videos], list(prompts))
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=1, default=str))
    result = {f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if logger is not None:
        logger.log(result, step=step)
    print("\nevaluation: " + ", ".join(f"{k[5:]} {v:.3g}" for k, v in result.items()), flush=True)
    return result


def publish_samples(cfg: DictConfig, videos: Sequence[np.ndarray], prompts: Sequence[str], out: Path, fps: int,
                    upscale: int, logger, evaluate: bool, still_as_png: bool = False,
                    folder: Optional[Path] = None) -> dict:
    """Save (and log) the videos of a sample/decode run in `folder` (default <out>/samples); with `evaluate`,
    score them, put the scores in the run summary and return them ({} otherwise)."""
    folder = out / "samples" if folder is None else Path(folder)
    save_samples(videos, prompts, folder, fps, upscale, logger, still_as_png=still_as_png)
    if not evaluate:
        return {}
    result = score_samples(cfg, videos, prompts, folder, logger)
    logger.summary(result)
    return result
