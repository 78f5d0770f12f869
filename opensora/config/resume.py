"""Runs rebuilt from their own directory: `resume=<run>` and `task=sample task.run=<run>`.

A run directory records the config it ran with (`.hydra/config.yaml`, and `resumes/<time>/.hydra/config.yaml` for
each resume, newest last). Continuing or sampling a run starts from that record, not from the defaults:

- `python run.py resume=outputs/runs/<run> [overrides]`: every section comes from the run's newest record, except
  those whose group is chosen again now (e.g. `parallel=data`); key overrides given now (`task.max_steps=5000`)
  are applied on top. A change of architecture or data shape (`REFUSED`) is refused naming the keys; other
  changes are logged and recorded in `resumes/<time>/changes.yaml`. Nothing of the first record is rewritten.
- `python run.py task=sample task.run=outputs/runs/<run> [overrides]`: the model, text encoder (with a tokenizer
  the run trained), VAE, data sizes and scheduler come from the run (`FROM_RUN`), the weights from its latest
  checkpoint unless task.ckpt_path says otherwise.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

RECORD = ".hydra/config.yaml"
# Keys (prefixes) a resumed run may not change: they define the model, the data it sees and the training maths.
REFUSED = ("model.", "vae._target_", "vae.from_pretrained", "vae.latent_channels", "vae.downsample",
           "vae.scale_factor", "text_encoder._target_", "text_encoder.from_pretrained", "text_encoder.config.",
           "text_encoder.model_max_length", "text_encoder.clean_caption", "data.num_frames", "data.image_size",
           "data.frame_interval", "data.ar_condition", "data.fps_condition", "scheduler.diffusion_steps", "scheduler.noise_schedule",
           "scheduler.predict_xstart", "scheduler.learn_sigma", "seed")
# ... except these, which change how the same model runs, not what it is.
ALLOWED_IN_REFUSED = ("model.pretrained", "model.recompute_blocks", "model.enable_flashattn", "model.dtype")
# Sections `task.run` takes from the training run.
FROM_RUN = ("model", "text_encoder", "vae", "data", "scheduler")


def run_records(run: Path) -> list[Path]:
    """The run's config records, oldest first."""
    records = [run / RECORD] if (run / RECORD).is_file() else []
    records += sorted((run / "resumes").glob("*/.hydra/config.yaml")) if (run / "resumes").is_dir() else []
    return records


def resume_problem(resume: str) -> Optional[str]:
    """Why `resume=<resume>` cannot continue a run (None when it can)."""
    from opensora.config.resolvers import run_dir_of

    given = Path(resume)
    run = Path(run_dir_of(resume))
    if not run.is_dir():
        return f"resume={resume}: no such folder; give a run directory such as outputs/runs/<run>"
    if not run_records(run):
        return (f"resume={resume}: {run} is not a run directory (it has no {RECORD}); give the folder a training run "
                "wrote, e.g. outputs/runs/<run> or outputs/stages/<stage>")
    ckpts = run / "checkpoints"
    if given != run and given.name not in ("checkpoints", "latest"):
        if not (given / "model.ckpt").is_file():
            return f"resume={resume}: not a checkpoint folder (no model.ckpt in it)"
        return None
    if not ckpts.is_dir() or not any(p.is_dir() for p in ckpts.glob("step_*")):
        return (f"resume={resume}: {run} holds no checkpoint (the run stopped before its first one, every "
                "task.ckpt_every steps); start a new run instead")
    return None


def _flat(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """{dotted key: resolved value} of `cfg` (keys whose interpolation cannot be resolved yet are left out)."""
    out = {}
    container = OmegaConf.to_container(cfg, resolve=False)
    for key, _ in _flat(container):
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:  # noqa: BLE001 - e.g. ${hydra:runtime.output_dir} before the job starts
            continue
    return out


def _parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _split_overrides(overrides: list[str], groups: set[str]) -> tuple[set[str], list]:
    """(sections whose group is chosen in `overrides`, the key overrides)."""
    chosen, keys = set(), []
    for o in _parse_overrides(overrides):
        name = o.key_or_group
        if name.split("/")[0] in groups or name in ("experiment", "debug", "hparams_search"):
            chosen.add(name.split("/")[0])
        elif not name.startswith("hydra."):
            keys.append(o)
    return chosen, keys


def _apply_key_overrides(cfg: DictConfig, overrides: list, sections: Iterable[str]) -> None:
    sections = set(sections)
    for o in overrides:
        key = o.key_or_group
        if key.split(".")[0] not in sections:
            continue
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and leaf in node:
                with open_dict(node):
                    del node[leaf]
        else:
            OmegaConf.update(cfg, key, o.value(), merge=False, force_add=True)


def _replace_sections(cfg: DictConfig, source: DictConfig, sections: Iterable[str]) -> list[str]:
    taken = []
    with read_write(cfg), open_dict(cfg):
        for name in sections:
            if name in source:
                cfg[name] = source[name]
                taken.append(name)
    return taken


def resume_overrides(run: Path, now: list[str]) -> list[str]:
    """The overrides that rebuild `run` with the overrides given `now`: the run's own (from its newest record, which
    already holds every earlier resume's), minus Hydra's settings, minus those `now` sets again, then `now`."""
    record = run_records(run)[-1].parent / "overrides.yaml"
    before = [str(o) for o in OmegaConf.load(record)] if record.is_file() else []
    now_parsed = _parse_overrides(now)
    given = {o.key_or_group for o in now_parsed}
    kept = [text for text, o in zip(before, _parse_overrides(before))
            if o.key_or_group not in given and not o.key_or_group.startswith("hydra") and o.key_or_group != "resume"]
    return kept + list(now)


def rebuild_for_resume(cfg: DictConfig, overrides: list[str]) -> dict:
    """Rebuild `cfg` in place as the resumed run's own composition (its recorded overrides) plus `overrides` given
    now (see `resume_overrides`); Hydra then records exactly that in resumes/<time>/.hydra.

    Returns {"changes": {key: [recorded, now]}, "overrides": [...]} against the run's newest resolved record;
    raises ValueError naming the keys when an architecture or data-shape key (`REFUSED`) changed."""
    from hydra import compose

    from opensora.config.resolvers import run_dir_of

    run = Path(run_dir_of(str(cfg.resume)))
    combined = resume_overrides(run, [o for o in overrides if not o.startswith(("resume=", "hydra."))])
    composed = compose(config_name="config", overrides=combined + [f"resume={cfg.resume}"],
                       return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        for key in list(cfg.keys()):
            if key != "hydra" and key not in composed:
                del cfg[key]
        for key in composed.keys():
            if key != "hydra":
                cfg[key] = composed[key]
        cfg.hydra.overrides.task = combined + [f"resume={cfg.resume}"]
        cfg.hydra.runtime.choices = composed.hydra.runtime.choices
    saved_file = run_records(run)[-1].parent.parent / "config_resolved.yaml"
    saved = resolved(OmegaConf.load(saved_file)) if saved_file.is_file() else {}
    now = resolved(cfg)
    skip = ("resume", "paths.output_dir", "logger.dir", "hydra")
    # keys that resolve on both sides (an interpolation on Hydra's runtime, e.g. paths.output_dir, cannot yet)
    changed = {k: [saved[k], now[k]] for k in sorted(saved.keys() & now.keys())
               if saved[k] != now[k] and not k.startswith(skip)}
    refused = [k for k in changed if (k.startswith(REFUSED) or k in REFUSED) and not k.startswith(ALLOWED_IN_REFUSED)]
    if refused:
        shown = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused[:8])
        raise ValueError(f"resume={cfg.resume}: a resumed run cannot change how the model is built, the data shape or "
                         f"the training maths ({shown}{' ...' if len(refused) > 8 else ''}); drop those overrides, "
                         f"or start a new run initialised from its weights (model.pretrained={run}/checkpoints/latest)")
    return {"changes": changed, "overrides": combined}


def rebuild_for_sampling(cfg: DictConfig, overrides: list[str], groups: set[str]) -> dict:
    """`task=sample task.run=<run>`: take FROM_RUN sections from the run's resolved config (so its tokenizer and
    files are the run's), unless their group is chosen now; key overrides given now apply on top."""
    run = Path(str(cfg.task.run))
    resolved_file = run / "config_resolved.yaml"
    if not resolved_file.is_file():
        raise ValueError(f"task.run={run}: not a training run directory (no config_resolved.yaml in it)")
    saved = OmegaConf.load(resolved_file)
    chosen, keys = _split_overrides(overrides, groups)
    sections = [s for s in FROM_RUN if s not in chosen]
    taken = _replace_sections(cfg, saved, sections)
    _apply_key_overrides(cfg, keys, taken)
    te = cfg.get("text_encoder")
    folder = run / "text_encoder"
    if "text_encoder" in taken and te is not None and te.get("from_pretrained") is None and \
            (folder / "config.json").is_file():
        with open_dict(cfg.text_encoder):  # the encoder (and the tokenizer it trained) the run saved
            cfg.text_encoder.from_pretrained = str(folder)
            cfg.text_encoder.config = None
            cfg.text_encoder.tokenizer_path = None
    with open_dict(cfg.task):
        if cfg.task.get("ckpt_path") is None:
            cfg.task.ckpt_path = str(run / "checkpoints" / "latest")
    return {"from_run": taken}
