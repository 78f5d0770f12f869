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
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

import mindspore as ms
from mindspore import ops

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".ckpt")
RECOMPUTED = ("pos_embed", "pos_embed_temporal")
WRAPPERS = ("ema", "state_dict", "model")
# Prefixes a flat state dict may carry (EMA copies, DistributedDataParallel, training wrappers), in
# order of preference; "" (no prefix) comes right after "ema.".
PREFIXES = ("ema.", "", "state_dict.", "model.", "module.", "network.", "_backbone.")
TEMPORAL_MARKERS = ("attn_temp.", "norm_temp.", "temporal")
MIN_MATCH_FRACTION = 0.5
PATCH_KEY = "x_embedder.proj.weight"
NULL_CAPTION_KEY = "y_embedder.y_embedding"
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"


class UnsafeCheckpointError(ValueError):
    """A torch file that holds pickled objects other than tensors: it is not loaded."""


class CheckpointMismatchError(ValueError):
    """The file's tensors do not fit the model (another model, or another size)."""


# ================================================================
# Reading files into {name: lazily read tensor}
# ================================================================


class TensorSource:
    """Names and shapes of a file's tensors; `read(name)` returns one as a numpy array (bf16 widened
    to float32). `skipped`: entries that are not tensors (e.g. an epoch counter)."""

    def __init__(self, path: str, shapes: dict[str, tuple], read: Callable[[str], np.ndarray], entry: str = "",
                 skipped: Optional[list[str]] = None):
        self.path, self.shapes, self._read, self.entry = path, shapes, read, entry
        self.skipped = skipped or []

    def read(self, name: str) -> np.ndarray:
        return self._read(name)

    def renamed(self, prefix: str) -> "TensorSource":
        """The tensors whose name starts with `prefix`, with it removed; the others are skipped."""
        shapes = {k[len(prefix):]: s for k, s in self.shapes.items() if k.startswith(prefix)}
        others = [k for k in self.shapes if not k.startswith(prefix)]
        return TensorSource(self.path, shapes, lambda k: self._read(prefix + k), prefix.rstrip("."),
                            self.skipped + others)


def _unwrap(obj, path: str, use_ema: bool = True):
    """The state dict inside a loaded torch object: obj["ema"], obj["state_dict"], obj["model"] or obj."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    for key in WRAPPERS:
        if (use_ema or key != "ema") and isinstance(obj.get(key), Mapping):
            return obj[key], key
    return obj, ""


def _unpickler_reason(err: Exception) -> str:
    """What torch's weights-only unpickler stopped at (the text after "WeightsUnpickler error:")."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()) or type(err).__name__


def read_torch(path: str, use_ema: bool = True) -> TensorSource:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a torch checkpoint and reading it needs torch: pip install -e '.[torch]'. "
            f"Or convert it once where torch is installed (python run.py task=convert task.component=model "
            f"model.pretrained={path} task.output=OUT.ckpt) and use the .ckpt, which loads without torch."
        ) from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler stopped: never retried unsafely
        reason = _unpickler_reason(e)
        if "GLOBAL" not in reason and "global" not in reason:
            raise CheckpointMismatchError(f"{path} could not be read as a torch checkpoint (the weights-only "
                                          f"unpickler stopped at: {reason}); is the file damaged?") from None
        raise UnsafeCheckpointError(
            f"{path} was not loaded: besides tensors it holds pickled Python objects, and unpickling those can "
            f"run arbitrary code ({reason}). Only plain state dicts are read (torch.load with weights_only=True). "
            f"If you trust the file, re-save its tensors with torch, e.g. sd = torch.load(path, "
            f"weights_only=False); torch.save({{k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
            f"'clean.pth'), and load that."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointMismatchError(f"{path} could not be read as a torch checkpoint: {e}") from None
    state, entry = _unwrap(obj, path, use_ema)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k in state if k not in tensors]

    def read(name):
        t = tensors[name].detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()

    return TensorSource(path, {k: tuple(v.shape) for k, v in tensors.items()}, read, entry, skipped)


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> TensorSource:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointMismatchError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, MemoryError, OverflowError) as e:
            raise CheckpointMismatchError(f"{path} is not a safetensors file (bad header: {e})") from None
    start = 8 + n
    header = {k: v for k, v in header.items() if k != "__metadata__"}

    def read(name):
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
        begin, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            arr = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
        if info["dtype"] == "BF16":  # bf16 = upper half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.reshape(info["shape"])

    return TensorSource(path, {k: tuple(v["shape"]) for k, v in header.items()}, read)


def _ms_to_numpy(t) -> np.ndarray:
    if t.dtype == ms.bfloat16:
        t = ops.cast(t, ms.float32)
    return t.asnumpy()


def read_ms_checkpoint(path: str) -> TensorSource:
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointMismatchError(f"{path} could not be read as a MindSpore checkpoint: {e}") from None
    return TensorSource(path, {k: tuple(v.shape) for k, v in params.items()}, lambda k: _ms_to_numpy(params[k]))


def read_tensors(path: str | os.PathLike, use_ema: bool = True) -> TensorSource:
    """The tensors of a checkpoint file (see the module docstring for formats); `use_ema`: take a
    torch file's "ema" entry when it has one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return read_torch(str(p), use_ema)
    if suffix == ".safetensors":
        return read_safetensors(str(p))
    if suffix == ".ckpt":
        return read_ms_checkpoint(str(p))
    raise ValueError(f"{p}: unknown checkpoint format {suffix!r}; expected one of {list(SUFFIXES)} or a train-task "
                     "checkpoint directory")


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
