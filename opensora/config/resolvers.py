"""OmegaConf resolvers the configs use: derived sizes, values read from model folders, and run directories
that never collide."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence


def latent_size(num_frames: int, image_size: Any, downsample: Any, rounding: str = "exact") -> list[int]:
    """[T, H, W] of the latent video for a clip of `num_frames` x `image_size` pixels.

    rounding "exact" (STDiT: its patches tile the latent exactly) refuses a size the VAE factor does not divide;
    "floor" (STDiT2, as Open-Sora 1.1's `get_latent_size`) takes size // factor, e.g. 240 x 426 -> 30 x 53 with
    the SD VAE (the VAE then decodes 240 x 424)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    dt, dh, dw = (1, downsample, downsample) if isinstance(downsample, int) else tuple(downsample)
    if rounding not in ("exact", "floor"):
        raise ValueError(f"latent_size rounding {rounding!r}: expected 'exact' or 'floor'")
    for name, size, factor in (("height", h, dh), ("width", w, dw), ("frames", num_frames, dt)):
        if size % factor and rounding == "exact":
            raise ValueError(f"data {name} {size} is not divisible by the VAE downsample factor {factor}")
        if size < factor:
            raise ValueError(f"data {name} {size} is smaller than the VAE downsample factor {factor}")
    return [num_frames // dt, h // dh, w // dw]


def named_image_size(resolution: Any, aspect_ratio: Any, default: Any) -> Any:
    """data.image_size from data.resolution + data.aspect_ratio (Open-Sora 1.1's tables, opensora/data/aspect.py:
    240p + "9:16" -> [240, 426]); `default` when no resolution is named."""
    if resolution is None:
        return default
    if aspect_ratio is None:
        raise ValueError(f"data.resolution={resolution} needs data.aspect_ratio (an H:W name such as 9:16 for "
                         "240 x 426, or a table key such as 0.56 or 1.0)")
    from opensora.data.aspect import get_image_size

    return list(get_image_size(str(resolution), aspect_ratio))


def hf_config_value(folder: str, key: str) -> Any:
    """`key` from `<folder>/config.json` (a Hugging Face model folder), for use in configs."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: text_encoder.from_pretrained must be a folder "
                                "with config.json, spiece.model and the weights")
    config = json.loads(path.read_text())
    if key not in config:
        raise KeyError(f"{path} has no {key!r}")
    return config[key]


# ================================================================
# Launch identity and run directories
# ================================================================

_LAUNCH: dict = {}


def under_msrun() -> bool:
    """True in a process msrun started (a rank or its scheduler)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def _launch() -> tuple[float, str]:
    """(start time, id) of this launch: the same on every process of one msrun job (msrun's own start time and
    pid: all ranks and the scheduler are its children), unique per process otherwise."""
    if not _LAUNCH:
        if under_msrun():
            try:
                import psutil

                parent = psutil.Process(os.getppid())
                start, ident = parent.create_time(), f"msrun-{parent.pid}-{parent.create_time():.3f}"
            except Exception as e:  # noqa: BLE001 - named in the error
                raise RuntimeError(f"under msrun, every rank takes the run directory's name from the msrun process "
                                   f"(its parent), but reading it failed ({type(e).__name__}: {e}); pass the same "
                                   "hydra.run.dir=... to every rank instead") from e
        else:
            start, ident = time.time(), f"pid-{os.getpid()}-{time.time():.6f}"
        _LAUNCH.update(start=start, id=ident)
    return _LAUNCH["start"], _LAUNCH["id"]


def launch_time(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """This launch's start time, formatted (the same on every rank of an msrun job)."""
    return time.strftime(fmt, time.localtime(_launch()[0]))


LAUNCH_FILE = ".launch"
_CLAIMED: dict = {}
_ASKED: list = []  # unique_dir keys evaluated while claim_dirs collects them
_COLLECT = [False]


def _candidates(parent: str, name_fmt: str):
    base = Path(parent) / launch_time(name_fmt)
    yield base
    for n in range(1, 10000):
        yield base.with_name(f"{base.name}_{n}")


def _ours_or_free(folder: Path, ident: str) -> bool:
    return not folder.exists() or _launch_of(folder, wait_s=0.0) == ident


def unique_dir(parent: str, name_fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """`<parent>/<launch time>`, or `<parent>/<launch time>_N` when another launch took that name first.

    Side-effect free (OmegaConf may evaluate a resolver while merging configs): it returns the directory this
    launch claimed (`claim_unique_dir`), or else the first name that is free or already this launch's."""
    key = (str(parent), name_fmt)
    if _COLLECT[0]:
        _ASKED.append(key)
    if key in _CLAIMED:
        return _CLAIMED[key]
    _, ident = _launch()
    return str(next(c for c in _candidates(parent, name_fmt) if _ours_or_free(c, ident)))


def claim_unique_dir(parent: str, name_fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """Claim `unique_dir(parent, name_fmt)` atomically: mkdir, then a `.launch` file naming this launch. Two runs
    started in the same second get two directories; the ranks of one msrun job share one (a rank that finds the
    directory claimed by its own launch uses it). Later `unique_dir` calls return the claimed directory. On
    several nodes, give every rank the same hydra.run.dir instead."""
    key = (str(parent), name_fmt)
    if key in _CLAIMED:
        return _CLAIMED[key]
    _, ident = _launch()
    for cand in _candidates(parent, name_fmt):
        try:
            cand.mkdir(parents=True)
        except FileExistsError:
            if _launch_of(cand) == ident:  # another rank of this msrun job claimed it
                break
            continue
        tmp = cand / f".tmp{LAUNCH_FILE}-{os.getpid()}"
        tmp.write_text(ident)
        os.replace(tmp, cand / LAUNCH_FILE)
        break
    _CLAIMED[key] = str(cand)
    return str(cand)


def _launch_of(folder: Path, wait_s: float = 10.0) -> Optional[str]:
    """The launch id recorded in `folder` (waiting up to `wait_s` for its claimer to write it); None for a folder
    that no launch claimed (e.g. made by hand, or by an older version)."""
    deadline = time.monotonic() + wait_s
    while True:
        f = folder / LAUNCH_FILE
        if f.is_file():
            return f.read_text().strip()
        if time.monotonic() >= deadline or not folder.is_dir() or any(
                p.name != LAUNCH_FILE and not p.name.startswith(".tmp") for p in folder.iterdir()):
            return None
        time.sleep(0.02)


# ================================================================
# Resume
# ================================================================


def run_dir_of(path: Optional[str]) -> Optional[str]:
    """The run directory of `resume=`: the path itself, or the run that holds a `checkpoints`, `checkpoints/latest`
    or `checkpoints/step_N` path given instead."""
    if path is None:
        return None
    p = Path(path)
    if p.name == "checkpoints" or p.parent.name == "checkpoints":
        p = p.parent if p.name == "checkpoints" else p.parent.parent
    return str(p)


def new_or_resumed(resume: Optional[str], parent: str) -> str:
    """hydra.run.dir: the resumed run's directory, or a new unique one under `parent` (`unique_dir`)."""
    return run_dir_of(resume) if resume is not None else unique_dir(parent)


def claim_dirs(resolve) -> str:
    """Evaluate `resolve()` (e.g. `lambda: cfg.hydra.run.dir`) and claim every `unique_dir` it used
    (`claim_unique_dir`), so that what Hydra creates next is this launch's own directory; returns the path."""
    _ASKED.clear()
    _COLLECT[0] = True
    try:
        resolve()
    finally:
        _COLLECT[0] = False
    for key in list(_ASKED):
        claim_unique_dir(*key)
    return str(resolve())


def resume_subdir(resume: Optional[str]) -> str:
    """Where Hydra records this launch's config: `.hydra` for a new run; `resumes/<launch time>/.hydra` for a
    resumed one, so the first run's record is never overwritten."""
    return ".hydra" if resume is None else f"resumes/{launch_time()}/.hydra"


def sweep_name() -> Optional[str]:
    """In a multirun job, the sweep directory's name (used as the W&B group); else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return None


def debug_model(data_choice: str, experiment_choice: Any = None) -> str:
    """The tiny model of debug=fast: STDiT2 for an Open-Sora 1.1 recipe (an experiment named *v1_1*, whose
    model is STDiT2) or bucketed data (variable_csv, whose size conditioning only STDiT2 takes), STDiT
    otherwise. (The defaults list cannot read the model choice it replaces, hence the recipe's name.)"""
    is_v1_1 = "v1_1" in str(experiment_choice or "")
    return "stdit2_tiny" if is_v1_1 or str(data_choice) == "variable_csv" else "stdit_tiny"


def debug_hidden_size(model_target: str) -> int:
    """debug=fast's model width: 32, or 48 for STDiT2 (divisible by 3 for its size conditioning and by 4 for
    its 2-D position embedding)."""
    from opensora.sampling.request import is_stdit2

    return 48 if is_stdit2(model_target) else 32


def _as_list(x: Any) -> Any:
    return list(x) if isinstance(x, Sequence) and not isinstance(x, str) else x


RESOLVERS = {
    "latent_size": lambda t, s, d, rounding="exact": latent_size(int(t), _as_list(s), _as_list(d), str(rounding)),
    "named_image_size": lambda r, a, d: named_image_size(r, a, _as_list(d)),
    "floordiv": lambda a, b: int(a) // int(b),
    "hf_config": hf_config_value,
    "if_null": lambda value, default: default if value is None else value,
    "debug_model": debug_model,
    "debug_hidden_size": debug_hidden_size,
    "launch_time": launch_time,
    "unique_dir": unique_dir,
    "run_dir_of": run_dir_of,
    "new_or_resumed": new_or_resumed,
    "resume_subdir": resume_subdir,
    "sweep_name": sweep_name,
}
