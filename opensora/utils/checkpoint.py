"""Training checkpoints: one directory per step, written atomically, newest named in `latest`.

    <run>/checkpoints/step_000200/{model.ckpt, ema.ckpt, optimizer.ckpt, state.json}
    <run>/checkpoints/latest        # text file: "step_000200"

A checkpoint directory is first written as `.tmp-step_000200` and renamed into place when
complete; `latest` is replaced atomically afterwards. An interrupted write therefore never
becomes the latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

import mindspore as ms

from opensora.utils.tensor_files import atomic_write_text, save_ms_checkpoint

log = logging.getLogger(__name__)

LATEST = "latest"


class CheckpointManager:
    """Writes, lists and loads the checkpoints of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model_params: Mapping[str, ms.Parameter],
             ema_params: Optional[Mapping[str, ms.Parameter]], optimizer_params: Mapping[str, ms.Parameter],
             state: dict) -> Path:
        """Write one checkpoint. Params are given as {name: Parameter}; EMA names are the model's. A failed write
        (permissions, a full disk) leaves the previous checkpoint as the latest and names the folder."""
        name = f"step_{step:06d}"
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_ms_checkpoint(model_params, tmp / "model.ckpt")
            if ema_params is not None:
                save_ms_checkpoint(ema_params, tmp / "ema.ckpt")
            save_ms_checkpoint(optimizer_params, tmp / "optimizer.ckpt")
            with open(tmp / "state.json", "w") as f:
                json.dump({**state, "step": step}, f, indent=1)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.dir / LATEST, name)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            raise OSError(f"could not write checkpoint {final} ({type(e).__name__}: {e}); "
                          + (f"{previous} is still the latest checkpoint" if previous else "there is no earlier one")
                          + f". Check that {self.dir} is writable and the disk has room") from e
        self._prune()
        return final

    def _prune(self) -> None:
        steps = self.list()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def list(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir())

    def candidates(self, resume: Optional[str] = None) -> list[Path]:
        """Checkpoints to resume from, in the order to try them: the one `resume` names when it is a step folder;
        otherwise the latest, then every older one (newest first), so a latest that does not load falls back to
        the newest intact one."""
        if resume is not None:
            p = Path(resume)
            if p.parent.name == "checkpoints" and p.name.startswith("step_"):
                return [p]
        latest = self.latest()
        rest = [p for p in reversed(self.list()) if latest is None or p.resolve() != latest.resolve()]
        return ([latest] if latest is not None else []) + rest

    def latest(self) -> Optional[Path]:
        pointer = self.dir / LATEST
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.is_dir():
                return path
        found = self.list()
        return found[-1] if found else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory, a checkpoints directory, `.../latest` or a step directory."""
    p = Path(path)
    if p.name == LATEST and p.is_file():
        p = p.parent / p.read_text().strip()
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / LATEST).is_file() or p.name == "checkpoints":
        latest = CheckpointManager(p.parent).latest()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {p}: train with task.ckpt_every set, or pick another run")
        p = latest
    if not (p / "model.ckpt").is_file():
        raise FileNotFoundError(f"{p} is not a checkpoint directory (no model.ckpt in it)")
    return p


def load_state(ckpt_dir: Path) -> dict:
    with open(Path(ckpt_dir) / "state.json") as f:
        return json.load(f)


def load_params_into(params: Mapping[str, ms.Parameter], ckpt_file: str | os.PathLike, strict: bool = True) -> None:
    """Copy values from a MindSpore .ckpt into {name: Parameter} matched by name; strict = every one must be found."""
    saved = ms.load_checkpoint(str(ckpt_file))
    missing = []
    for key, p in params.items():
        if key in saved:
            value = saved[key]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{ckpt_file}: {key} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.set_data(value.astype(p.dtype))
        else:
            missing.append(key)
    if missing and strict:
        raise KeyError(f"{ckpt_file} lacks {len(missing)} parameters, first: {missing[:5]}")
