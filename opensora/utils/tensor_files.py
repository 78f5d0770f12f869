"""Tensor files: the formats weights arrive in, the dtype names configs use, and atomic writes.

One home for what the model, text-encoder and VAE loaders, the convert task, the caches and the checkpoints
share:
    .safetensors        read directly (no torch), tensor by tensor, bf16 widened to float32
    .pth / .pt / .bin   torch pickles read with torch.load(weights_only=True) (needs torch); a file that holds
                        pickled objects besides tensors is refused, naming the file, never unpickled
    .ckpt               MindSpore checkpoints
and `atomic_write` / `atomic_write_text` / `atomic_savez` / `save_ms_checkpoint`, which write to a temporary
file beside the target and rename it into place, so a kill never leaves a half-written file under its name.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".ckpt")
# Entries of a torch checkpoint dict that hold the state dict, in order of preference.
WRAPPERS = ("ema", "state_dict", "model")

# Compute dtypes: config names (and the long names some checkpoints' configs use) -> MindSpore dtype names.
# (MindSpore is imported only where a tensor is touched, so processes that only decode video or write files, e.g.
# data-loading workers, never load it.)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
          "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
CONFIG_DTYPES = ("fp32", "fp16", "bf16")


def resolve_dtype(dtype, setting: str = "dtype"):
    """"fp32" / "fp16" / "bf16" (or "float32", ..., or a MindSpore dtype) -> the MindSpore dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{setting}={dtype!r} is not one of: {', '.join(CONFIG_DTYPES)}")
        import mindspore as ms

        return getattr(ms, DTYPES[dtype])
    return dtype


class UnsafeCheckpointError(ValueError):
    """A torch file that holds pickled objects other than tensors: it is not loaded."""


class UnreadableTensorFile(ValueError):
    """A file that cannot be read as the tensor format its name says."""


def to_numpy(t) -> np.ndarray:
    """A MindSpore or torch tensor (or numpy array) as numpy; bfloat16, which numpy lacks, widened to float32."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "asnumpy"):  # a MindSpore tensor or parameter
        import mindspore as ms
        from mindspore import ops

        return (ops.cast(t, ms.float32) if t.dtype == ms.bfloat16 else t).asnumpy()
    import torch  # a torch tensor: torch is installed

    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# ================================================================
# Reading: {name: lazily read tensor}
# ================================================================


class TensorFile:
    """The names and shapes of a file's tensors; `read(name)` returns one as numpy (bf16 widened to float32).
    `entry`: the wrapper entry the tensors came from (e.g. "ema"); `skipped`: entries that are not tensors."""

    def __init__(self, path: str, shapes: dict[str, tuple], read: Callable[[str], np.ndarray], entry: str = "",
                 skipped: Optional[list[str]] = None):
        self.path, self.shapes, self._read, self.entry = str(path), shapes, read, entry
        self.skipped = skipped or []

    def read(self, name: str) -> np.ndarray:
        return self._read(name)

    def load(self, keys: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        """{name: array} of every tensor (or of those in `keys`)."""
        keys = None if keys is None else set(keys)
        return {k: self.read(k) for k in self.shapes if keys is None or k in keys}

    def renamed(self, prefix: str) -> "TensorFile":
        """The tensors whose name starts with `prefix`, with it removed; the others are skipped."""
        shapes = {k[len(prefix):]: s for k, s in self.shapes.items() if k.startswith(prefix)}
        others = [k for k in self.shapes if not k.startswith(prefix)]
        return TensorFile(self.path, shapes, lambda k: self._read(prefix + k), prefix.rstrip("."),
                          self.skipped + others)


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def open_safetensors(path) -> TensorFile:
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableTensorFile(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, MemoryError, OverflowError) as e:
            raise UnreadableTensorFile(f"{path} is not a safetensors file (bad header: {e})") from None
    start = 8 + n
    header = {k: v for k, v in header.items() if k != "__metadata__"}

    def read(name):
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise UnreadableTensorFile(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
        begin, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            arr = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
        if info["dtype"] == "BF16":  # bf16 = upper half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.reshape(info["shape"])

    return TensorFile(path, {k: tuple(v["shape"]) for k, v in header.items()}, read)


def _unpickler_reason(err: Exception) -> str:
    """What torch's weights-only unpickler stopped at (the text after "WeightsUnpickler error:")."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()) or type(err).__name__


def open_torch(path, use_ema: bool = True, unwrap: bool = True) -> TensorFile:
    """A torch checkpoint (torch.load with weights_only=True). With `unwrap`, a dict holding an "ema" entry (when
    `use_ema`), else "state_dict", else "model" yields that entry's tensors."""
    path = str(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a torch checkpoint and reading it needs torch: pip install -e '.[torch]'. Or convert it "
            "once where torch is installed (python run.py task=convert ...) and use the .ckpt, which loads without "
            "torch.") from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler stopped: never retried unsafely
        reason = _unpickler_reason(e)
        if "GLOBAL" not in reason and "global" not in reason:
            raise UnreadableTensorFile(f"{path} could not be read as a torch checkpoint (the weights-only "
                                       f"unpickler stopped at: {reason}); is the file damaged?") from None
        raise UnsafeCheckpointError(
            f"{path} was not loaded: besides tensors it holds pickled Python objects, and unpickling those can "
            f"run arbitrary code ({reason}). Only plain state dicts are read (torch.load with weights_only=True). "
            f"If you trust the file, re-save its tensors with torch, e.g. sd = torch.load(path, "
            f"weights_only=False); torch.save({{k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
            f"'clean.pth'), and load that.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UnreadableTensorFile(f"{path} could not be read as a torch checkpoint: {e}") from None
    if not isinstance(obj, Mapping):
        raise UnreadableTensorFile(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    state, entry = obj, ""
    if unwrap:
        for key in WRAPPERS:
            if (use_ema or key != "ema") and isinstance(obj.get(key), Mapping):
                state, entry = obj[key], key
                break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k in state if k not in tensors]
    return TensorFile(path, {k: tuple(v.shape) for k, v in tensors.items()}, lambda k: to_numpy(tensors[k]), entry,
                      skipped)


def open_ms_checkpoint(path) -> TensorFile:
    import mindspore as ms

    path = str(path)
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, TypeError) as e:
        raise UnreadableTensorFile(f"{path} could not be read as a MindSpore checkpoint: {e}") from None
    return TensorFile(path, {k: tuple(v.shape) for k, v in params.items()}, lambda k: to_numpy(params[k]))


def open_tensors(path, use_ema: bool = True, unwrap: bool = True) -> TensorFile:
    """The tensors of a weights file, by its suffix (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return open_torch(p, use_ema, unwrap)
    if suffix == ".safetensors":
        return open_safetensors(p)
    if suffix == ".ckpt":
        return open_ms_checkpoint(p)
    raise ValueError(f"{p}: unknown weights format {suffix!r}; expected one of {list(SUFFIXES)}")


# ================================================================
# Atomic writes
# ================================================================


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary file beside `path` (same folder, so the rename is atomic; same suffix, so
    writers that pick the format by suffix do), then rename it to `path`. A failed write leaves no file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Text written and fsynced before the rename (a pointer such as checkpoints/latest)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_savez(path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def save_ms_checkpoint(tensors: Mapping, path) -> Path:
    """{name: Parameter | Tensor | array} as a MindSpore .ckpt, atomically."""
    import mindspore as ms

    items = [{"name": n, "data": v if isinstance(v, (ms.Parameter, ms.Tensor)) else ms.Tensor(v)}
             for n, v in tensors.items()]
    return atomic_write(path, lambda tmp: ms.save_checkpoint(items, str(tmp)))
