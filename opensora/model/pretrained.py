"""Loading pretrained weights into a diffusion model (`model.pretrained=PATH`).

Reads, by file suffix:
    .pth / .pt / .bin   torch pickles (hpcai-tech OpenSora-v1-*.pth, PixArt-XL-2-*.pth), with
                        torch.load(weights_only=True); needs torch (`pip install -e .[torch]`)
    .safetensors        read directly, no torch
    .ckpt               MindSpore checkpoints (`task=convert` output, the train task's files)
    a directory         a Hugging Face model folder (config.json + model.safetensors, e.g.
                        hpcai-tech/OpenSora-STDiT-v2-stage3 as downloaded): its config.json must agree
                        with the model on the keys the model lists in `hf_config_defaults` (else refused,
                        naming each key); or a train-task checkpoint (run dir, checkpoints/, .../latest,
                        step_*): ema.ckpt if present, else model.ckpt

A torch file whose dict has an "ema" entry loads from it, else from "state_dict", else "model",
else the dict itself; in flat files (.safetensors, .ckpt) the keys under the prefix ("ema.",
"module.", ... or none) with which most names match the model are loaded, the prefix removed.
Parameter names are the original torch keys, so loading copies by name, with these adaptations:
    x_embedder.proj.weight  a 2-D patch conv [C, in, ph, pw] (PixArt, DiT) gets the time axis
                            of the 3-D one, [C, in, 1, ph, pw]
    y_embedder.y_embedding  a null caption of another length is cut, or extended by repeating
                            its last row (as the original does)
    pos_embed, pos_embed_temporal   recomputed by the model, never loaded
(STDiT2's fixed RoPE frequencies `rope.freqs` are a frozen parameter: loaded by name like the rest.)
Missing parameters (e.g. the temporal attention of a PixArt file) keep their initial values.
A file of which fewer than half of the model's tensors match by name and shape is refused before
anything is copied.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

import mindspore as ms

from opensora.utils.tensor_files import SUFFIXES, TensorFile, UnreadableTensorFile, UnsafeCheckpointError, \
    open_tensors

log = logging.getLogger(__name__)

RECOMPUTED = ("pos_embed", "pos_embed_temporal")
# Prefixes a flat state dict may carry (EMA copies, DistributedDataParallel, training wrappers), in
# order of preference; "" (no prefix) comes right after "ema.".
PREFIXES = ("ema.", "", "state_dict.", "model.", "module.", "network.", "_backbone.")
TEMPORAL_MARKERS = ("attn_temp.", "norm_temp.", "temporal")
MIN_MATCH_FRACTION = 0.5
PATCH_KEY = "x_embedder.proj.weight"
NULL_CAPTION_KEY = "y_embedder.y_embedding"
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"


class CheckpointMismatchError(ValueError):
    """The file's tensors do not fit the model (another model, or another size), or it cannot be read."""


TensorSource = TensorFile  # the file's {name: lazily read tensor} (opensora/utils/tensor_files.py)


def read_tensors(path: str | os.PathLike, use_ema: bool = True) -> TensorFile:
    """The tensors of a checkpoint file (see the module docstring for formats); `use_ema`: take a torch file's
    "ema" entry when it has one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if p.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{p}: unknown checkpoint format {p.suffix.lower()!r}; expected one of {list(SUFFIXES)} or "
                         "a train-task checkpoint directory")
    try:
        return open_tensors(p, use_ema)
    except UnsafeCheckpointError:
        raise
    except UnreadableTensorFile as e:
        raise CheckpointMismatchError(str(e)) from None


# ================================================================
# Matching a file to a model
# ================================================================


@dataclass
class LoadReport:
    """What load_pretrained did. `adapted`: loaded after a reshape (patch conv, null caption length);
    `missing`: model parameters not in the file (left as initialised); `unexpected`: file tensors the
    model has no place for; `mismatched`: (name, file shape, model shape), not loaded; `recomputed`:
    position embeddings in the file that the model computes itself; `skipped`: file entries that are
    not tensors, or outside the selected entry/prefix."""

    path: str = ""
    entry: str = ""
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self):
        where = f"{self.path}" + (f" [{self.entry}]" if self.entry else "")
        return (f"{where}: loaded {len(self.loaded)} tensors ({len(self.adapted)} adapted), missing "
                f"{len(self.missing)}, unexpected {len(self.unexpected)}, shape mismatches {len(self.mismatched)}, "
                f"recomputed {self.recomputed}")

    def log(self, logger: logging.Logger = log) -> None:
        logger.info("pretrained weights %s", self)
        for a in self.adapted:
            logger.info("  adapted %s", a)
        temporal = [n for n in self.missing if any(m in n for m in TEMPORAL_MARKERS)]
        other = [n for n in self.missing if n not in temporal]
        if temporal:
            logger.info("  %d temporal parameters not in the file, left at initialisation: %s", len(temporal),
                        _short(temporal))
        if other:
            logger.warning("  missing (left at initialisation): %s", _short(other))
        if self.unexpected:
            logger.warning("  unexpected (not loaded): %s", _short(self.unexpected))
        for name, got, want in self.mismatched:
            logger.warning("  shape mismatch, not loaded: %s file %s, model %s", name, list(got), list(want))
        if self.skipped:
            logger.info("  skipped %d non-tensor / unselected entries: %s", len(self.skipped), _short(self.skipped))


def _short(names: Iterable[str], n: int = 12) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _adapt_shape(name: str, got: tuple, want: tuple) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """A reshape making a file tensor fit the model, or None."""
    if name == PATCH_KEY and len(got) == 4 and len(want) == 5 and want[2] == 1 and got == want[:2] + want[3:]:
        return lambda a: a[:, :, None]  # [C, in, ph, pw] -> [C, in, 1, ph, pw]
    if name == NULL_CAPTION_KEY and len(got) == 2 and len(want) == 2 and got[1] == want[1] and got[0] != want[0]:
        def fit(a):
            if a.shape[0] > want[0]:
                return a[: want[0]]
            return np.concatenate([a, np.repeat(a[-1:], want[0] - a.shape[0], axis=0)], axis=0)
        return fit
    return None


def _choose_prefix(source: TensorSource, names: set, use_ema: bool = True) -> TensorSource:
    """Strip the wrapper prefix ("ema.", "module.", ...) under which most names match the model
    (ties: the earlier in PREFIXES)."""
    best, best_count = "", -1
    for prefix in PREFIXES:
        if prefix == "ema." and not use_ema:
            continue
        count = sum(k[len(prefix):] in names for k in source.shapes if k.startswith(prefix))
        if count > best_count:
            best, best_count = prefix, count
    return source.renamed(best) if best else source


def plan_load(params: Mapping[str, ms.Parameter], source: TensorSource) -> tuple[LoadReport, dict]:
    """Match file tensors to parameters by name: (report, {param name: reshape fn or None})."""
    report = LoadReport(path=source.path, entry=source.entry, skipped=list(source.skipped))
    plan = {}
    for key, got in source.shapes.items():
        if key in RECOMPUTED:
            report.recomputed.append(key)
            continue
        if key not in params:
            report.unexpected.append(key)
            continue
        want = tuple(params[key].shape)
        got = tuple(got)
        if got == want:
            plan[key] = None
            report.loaded.append(key)
            continue
        fit = _adapt_shape(key, got, want)
        if fit is None:
            report.mismatched.append((key, got, want))
            continue
        plan[key] = fit
        report.loaded.append(key)
        report.adapted.append(f"{key}: {list(got)} -> {list(want)}")
    report.missing = [n for n in params if n not in plan]
    return report, plan


def _mismatch_message(params: Mapping[str, ms.Parameter], source_shapes: Mapping[str, tuple],
                      report: LoadReport) -> str:
    n = 6
    lines = [f"{report.path} does not fit this model: only {len(report.loaded)} of its {len(params)} parameter "
             f"tensors match by name and shape (at least {MIN_MATCH_FRACTION:.0%} needed). Is it a checkpoint of "
             "another model (VAE, text encoder), or of another size (compare model=stdit_tiny / stdit_xl2 and "
             "model.hidden_size, depth, patch_size, in_channels, caption_channels)?"]
    if report.mismatched:
        lines.append("  shape mismatches (name: file -> model): " + "; ".join(
            f"{k}: {list(g)} -> {list(w)}" for k, g, w in report.mismatched[:n]))
    if report.unexpected:
        lines.append("  file tensors the model does not have: " + "; ".join(
            f"{k} {list(source_shapes[k])}" for k in report.unexpected[:n]))
    missing = set(report.missing)
    expected = [k for k in params if k in missing][:n]
    if expected:
        lines.append("  the model expects e.g.: " + "; ".join(f"{k} {list(params[k].shape)}" for k in expected))
    return "\n".join(lines)


def _same(a, b) -> bool:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def hf_folder_weights(model, folder: Path, logger: Optional[logging.Logger] = log) -> Path:
    """The weights file of a Hugging Face model folder, after checking its config.json against the model:
    every key of `model.hf_config_defaults` (a key the file omits stands for the default given there) must
    equal the model's attribute of that name, else CheckpointMismatchError names each differing key."""
    config_file, weights = folder / HF_CONFIG, folder / HF_WEIGHTS
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{config_file} could not be read as JSON: {e}") from None
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has a config.json but no {HF_WEIGHTS}: download the folder completely "
                                f"(config.json and {HF_WEIGHTS}), or point model.pretrained at a weights file")
    defaults = getattr(model, "hf_config_defaults", None)
    if defaults is None:
        if logger is not None:
            logger.warning("%s: %s does not compare a config.json with its settings; loading %s by name only",
                           folder, type(model).__name__, weights.name)
        return weights
    bad = [(k, config.get(k, d), getattr(model, k)) for k, d in defaults.items()
           if not _same(config.get(k, d), getattr(model, k))]
    if bad:
        raise CheckpointMismatchError(
            f"{config_file} describes another model than the configured one:\n" + "\n".join(
                f"  {k}: {v!r} in the file{'' if k in config else ' (its default: the key is absent)'}, "
                f"model.{k}={m!r}; set model.{k}={json.dumps(v)}" for k, v, m in bad))
    if logger is not None:
        ignored = sorted(k for k in config if k not in defaults)
        logger.info("%s agrees with the model on %s; not compared (training, kernel and file settings): %s",
                    config_file, ", ".join(defaults), ", ".join(ignored) or "none")
    return weights


def load_pretrained(model, path: str | os.PathLike, strict: bool = False, use_ema: bool = True,
                    logger: Optional[logging.Logger] = log) -> LoadReport:
    """Copy the tensors of `path` into `model`'s parameters (names = original torch keys).

    Raises CheckpointMismatchError, before changing the model, when fewer than half of the model's
    tensors match (or, with `strict`, when any parameter is missing or mismatched, or a tensor is
    unexpected). A directory with a config.json is a Hugging Face folder (see `hf_folder_weights`), another
    a train-task checkpoint. `use_ema`: prefer the EMA weights (a
    torch file's "ema" entry, "ema."-prefixed keys, a checkpoint directory's ema.ckpt)."""
    p = Path(path)
    if p.is_dir() and (p / HF_CONFIG).is_file():
        p = hf_folder_weights(model, p, logger)
    elif p.is_dir() or (p.name == "latest" and p.is_file()):
        from opensora.utils.checkpoint import resolve_checkpoint_dir

        ckpt = resolve_checkpoint_dir(p)
        p = ckpt / ("ema.ckpt" if use_ema and (ckpt / "ema.ckpt").is_file() else "model.ckpt")
    params = dict(model.parameters_and_names())
    source = _choose_prefix(read_tensors(p, use_ema), set(params), use_ema)
    report, plan = plan_load(params, source)
    if len(report.loaded) < MIN_MATCH_FRACTION * len(params):
        raise CheckpointMismatchError(_mismatch_message(params, source.shapes, report))
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointMismatchError(
            f"{p} does not match the model exactly (strict): missing {_short(report.missing)}; unexpected "
            f"{_short(report.unexpected)}; shape mismatches {report.mismatched[:6]}")
    for name, fit in plan.items():
        arr = source.read(name)
        if fit is not None:
            arr = fit(arr)
        param = params[name]
        param.set_data(ms.Tensor(np.ascontiguousarray(arr), param.dtype))
    if logger is not None:
        report.log(logger)
    return report
