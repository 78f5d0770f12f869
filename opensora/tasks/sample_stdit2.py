"""task=sample with an STDiT2 model (Open-Sora 1.1): any size and length, size / fps conditioning, reference
images and videos with mask strategies, per-loop prompts and loop generation, as the original inference-long.py.

Order of work, so that a bad request fails before any model is built: prompts and their options are parsed and
every mask strategy checked against the clip (the validation pass did this too), the references are read and
checked against their strategies, then the VAE (when needed), the text encoder and STDiT2 are built.

Sizes: the clip is data.num_frames x data.image_size pixels (data.resolution + data.aspect_ratio name a table
entry); the latent is floor(size / VAE factor) (model.input_size), so 240 x 426 samples 30 x 53 latents and the
VAE decodes 240 x 424 videos, as the original. The size conditioning uses the requested pixels (opensora/model/
stdit2_conditions.py), the fps conditioning data.fps (120 for one frame; without data.fps, task.fps *
data.frame_interval); videos are saved at task.fps (data.fps // data.frame_interval), single frames as png.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opensora.data.cache import text_cache_settings
from opensora.data.aspect import as_size
from opensora.logger import build_logger
from opensora.sampling.loop import loop_video_length
from opensora.sampling.prompts import split_prompt_options
from opensora.tasks.common import build_model, build_text_encoder, publish_samples, read_prompts, record_run, run_dir
from opensora.tasks.sample import (CachedTextEmbeddings, _plain, load_model_weights, missing_outputs, plan_outputs,
                                   save_named, write_latents)

log = logging.getLogger(__name__)


def clip_spec(cfg: DictConfig):
    """The ClipSpec of the run: pixel frames and size, latent shape, conditioning fps."""
    from opensora.sampling.generation import ClipSpec

    t = int(cfg.data.num_frames)
    h, w = as_size(OmegaConf.to_container(cfg.data.image_size) if OmegaConf.is_config(cfg.data.image_size)
                   else cfg.data.image_size)
    latent = [int(cfg.model.in_channels), *(int(v) for v in cfg.model.input_size)]  # [C, T, h, w]
    resolution = OmegaConf.select(cfg, "data.resolution", default=None)
    if resolution is not None:
        from opensora.config.resolvers import named_image_size

        named = named_image_size(resolution, OmegaConf.select(cfg, "data.aspect_ratio", default=None), None)
        if list(named) != [h, w]:
            log.warning("data.image_size=[%d, %d] is given: it replaces data.resolution=%s data.aspect_ratio=%s (%s)",
                        h, w, resolution, cfg.data.get("aspect_ratio"), named)
    fps = OmegaConf.select(cfg, "data.fps", default=None)
    if fps is None:
        fps = int(cfg.task.fps) * int(OmegaConf.select(cfg, "data.frame_interval", default=1) or 1)
    return ClipSpec(num_frames=t, height=h, width=w, latent_shape=tuple(latent), fps=float(fps))


def describe(cfg: DictConfig, spec, loop: int, cfl: int) -> str:
    """The log line of what comes out: requested size, latent, decoded video size and frame rate."""
    down = cfg.vae.downsample
    dt, dh, dw = (1, down, down) if isinstance(down, int) else (int(d) for d in down)
    _, lt, lh, lw = spec.latent_shape
    frames = loop_video_length(loop, lt, cfl) * dt if loop > 1 else spec.num_frames
    from opensora.model.stdit2_conditions import conditioning_fps

    kind = "image (png)" if frames == 1 else f"video at {int(cfg.task.fps)} fps"
    return (f"Open-Sora 1.1 sampling: {spec.num_frames} x {spec.height} x {spec.width} pixels asked (fps "
            f"conditioning {conditioning_fps(spec.num_frames, spec.fps):g}), latent {lt} x {lh} x {lw}, output "
            f"{frames} x {lh * dh} x {lw * dw} {kind}" + (f" ({loop} loops of {lt} latent frames, {cfl} shared)"
                                                          if loop > 1 else ""))


def run_stdit2(cfg: DictConfig) -> dict:
    from opensora.data.aspect import untrained_size_warning
    from opensora.sampling.generation import SampleItem, sample_batches
    from opensora.sampling.references import encode_references, read_references
    from opensora.sampling.request import check_clip, plan_name, plan_request

    task = cfg.task
    embed_folder = task.get("text_embed_folder")
    keep_latents = bool(task.get("save_latents", False))
    by_prompt = bool(task.get("name_by_prompt", False))
    loop, cfl, reencode = int(task.loop), int(task.condition_frame_length), bool(task.loop_reencode)
    spec = clip_spec(cfg)
    lt, lh, lw = spec.latent_shape[1:]
    if loop > 1 and not 1 <= cfl < lt:
        raise ValueError(f"task.condition_frame_length={cfl} must be in 1..{lt - 1} for loop generation with clips of "
                         f"{lt} latent frames")
    out = run_dir(cfg)
    record_run(cfg, out)
    folder = Path(task.save_dir) if task.get("save_dir") else out / "samples"

    # 1. prompts and their options, strategies against the clip (before any model)
    cache = None
    if embed_folder:
        cache = CachedTextEmbeddings(embed_folder, cfg.model.caption_channels, cfg.model.model_max_length,
                                     text_cache_settings(cfg.text_encoder))
    given = task.prompts or task.prompt_file
    prompts = read_prompts(task.prompts, task.prompt_file) if given or cache is None else list(cache.captions)
    plans = plan_request(prompts, loop, _plain(task.reference_path), _plain(task.mask_strategy))
    check_clip(plans, lt)
    if cache is not None:
        missing = sorted({t for p in plans for t in p.texts if t not in cache.paths})
        if missing:
            raise KeyError(f"{len(missing)} prompt texts have no embedding in {cache.folder}, first: {missing[:3]}; "
                           "embed them with task=embed_text and the same prompts (it embeds each per-loop text "
                           "without the JSON options)")
    warning = untrained_size_warning(spec.height, spec.width)
    if warning:
        log.warning(warning)
    log.info(describe(cfg, spec, loop, cfl))
    shown = [split_prompt_options(raw, j)[0] for j, raw in enumerate(prompts)]  # the texts, options removed

    # 2. what to make (named videos that exist are skipped)
    still = spec.num_frames == 1 and loop == 1
    suffix = ".png" if still else ".mp4"
    outs = plan_outputs(len(prompts), int(task.num_samples_per_prompt),
                        [plan_name(raw, j) for j, raw in enumerate(prompts)] if by_prompt else None)
    outs = missing_outputs(outs, folder, suffix)
    if not outs:
        log.info("every video is in %s: nothing to sample", folder)
        return {}

    # 3. references: read (and checked against their strategies) before any model is built
    wanted = sorted({o.prompt for o in outs})
    pixels = {j: read_references(plans[j].reference_paths, plans[j].insertions, (spec.height, spec.width), lt, j)
              for j in wanted}
    has_refs = any(r for r in pixels.values())

    # 4. models
    decode_clips = not keep_latents or (loop > 1 and reencode)
    vae = instantiate(cfg.vae) if decode_clips or has_refs else None
    if vae is not None and keep_latents:
        log.info("task.save_latents=true, but the VAE is built to %s", "encode the references" if not decode_clips
                 else "condition each loop on the re-encoded previous clip (task.loop_reencode)")
    refs = {j: encode_references(pixels[j], vae, (lh, lw)) if pixels[j] else [] for j in wanted}
    text_encoder = cache if cache is not None else build_text_encoder(cfg)
    model = build_model(cfg, with_pretrained=False)
    log.info("weights from %s", load_model_weights(model, task.ckpt_path, bool(task.use_ema)))
    sampler = instantiate(cfg.scheduler)
    items = [SampleItem(o.index, plans[o.prompt], refs[o.prompt]) for o in outs]

    logger = build_logger(cfg)
    exit_code = 1
    try:
        latents, videos, made = [], [], []
        for batch in sample_batches(model, text_encoder, sampler, items, spec, int(task.batch_size), int(cfg.seed),
                                    vae=vae if decode_clips else None, loop=loop, condition_frame_length=cfl,
                                    reencode=reencode):
            chunk = outs[len(made):len(made) + len(batch.items)]
            made.extend(chunk)
            if by_prompt:  # saved as each batch is done: a killed run keeps what it made
                save_named(batch.videos, chunk, folder, int(task.fps), int(task.upscale), still_as_png=True)
            elif keep_latents:
                latents.extend(batch.latents)
            else:
                videos.extend(batch.videos)
        metric = {}
        texts = [shown[o.prompt] for o in made]
        if by_prompt:
            log.info("saved %d videos in %s", len(made), folder)
        elif keep_latents:
            settings = {
                "source": "task=sample", "model": "STDiT2", "latent_shape": list(latents[0].shape),
                "vae": OmegaConf.to_container(cfg.vae, resolve=True), "num_frames": spec.num_frames,
                "image_size": [spec.height, spec.width], "fps": int(task.fps), "upscale": int(task.upscale),
                "still_as_png": True, "seed": int(cfg.seed), "ckpt_path": str(task.ckpt_path), "loop": loop,
                "condition_frame_length": cfl, "text_embed_folder": str(embed_folder) if embed_folder else None,
                "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
            }
            write_latents(out / "latents", latents, texts, settings)
        else:
            metric = publish_samples(cfg, videos, texts, out, int(task.fps), int(task.upscale), logger,
                                     bool(task.evaluate), still_as_png=True, folder=folder)
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return metric
