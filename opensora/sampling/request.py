"""What a sample run is asked for, checked before any model is built: the prompts with their Open-Sora 1.1
options (per-prompt references and mask strategies, JSON options, per-loop texts), loop generation, and
VBench-style file names. The validation pass (opensora/config/validate.py) and task=sample share it.

`task.reference_path` / `task.mask_strategy`: one value for every prompt (a string; Hydra reads `0` as a
number, which is taken as its text), or a list with one entry per prompt (null: none for that prompt).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from opensora.sampling.conditioning import MaskStrategyError, resolve_insertion
from opensora.sampling.prompts import PromptPlan, PromptSyntaxError, plan_prompts

# A file name is at most 255 bytes on the usual file systems; "-<k>.mp4" follows the prompt.
MAX_NAME_BYTES = 255


def is_stdit2(target: Any) -> bool:
    """Whether a model `_target_` builds STDiT2 (Open-Sora 1.1)."""
    name = str(target or "").rsplit(".", 1)[-1].lower()
    return name in ("stdit2", "stdit2_xl2")


def per_prompt(value: Any, n: int, key: str) -> Optional[list[Optional[str]]]:
    """`value` as one entry per prompt (see the module docstring); None when unset."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries for {n} prompts: give one per prompt (null for none), "
                             "or a single value (not a list) for all of them")
        return [None if v is None else _text(v, key) for v in value]
    return [_text(value, key)] * n


def _text(v: Any, key: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"{key}: entries must be strings, got {v!r}")
    return str(v)


def plan_request(prompts: Sequence[str], loop: int = 1, reference_path: Any = None,
                 mask_strategy: Any = None) -> list[PromptPlan]:
    """plan_prompts on the task's settings; errors are prefixed with the config key they come from."""
    n = len(prompts)
    refs = per_prompt(reference_path, n, "task.reference_path")
    strategies = per_prompt(mask_strategy, n, "task.mask_strategy")
    try:
        return plan_prompts(list(prompts), int(loop), refs, strategies)
    except MaskStrategyError as e:
        raise MaskStrategyError(f"task.mask_strategy: {e}") from None
    except PromptSyntaxError as e:  # plan_prompts' checks of strategies against loop and references included
        key = "task.mask_strategy" if str(e).startswith("mask strategy") else "task.prompts"
        raise PromptSyntaxError(f"{key}: {e}") from None


def prompt_texts(raw: str, index: int = 0) -> list[str]:
    """The distinct texts a prompt is encoded as: without its JSON options, each per-loop text once (what
    task=embed_text caches for an STDiT2 run)."""
    from opensora.sampling.prompts import split_loop_prompts, split_prompt_options

    text, _ = split_prompt_options(raw, index)
    loops = 1
    if text.lstrip().startswith("|"):
        starts = [int(k) for k in text.split("|")[1::2] if k.strip().lstrip("-").isdigit()]
        loops = max(starts, default=0) + 1
    return list(dict.fromkeys(split_loop_prompts(text, loops, index)))


def check_clip(plans: Sequence[PromptPlan], clip_frames: int) -> None:
    """Every insertion's target range lies inside a clip of `clip_frames` latent frames (MaskStrategyError;
    the reference ranges are checked when the references are read)."""
    for i, plan in enumerate(plans):
        for j, ins in enumerate(plan.insertions):
            try:
                resolve_insertion(ins, clip_frames, 1 << 40, i, j)  # any reference length: targets only
            except MaskStrategyError as e:
                raise MaskStrategyError(f"task.mask_strategy: {e}") from None


def reference_problems(plans: Sequence[PromptPlan]) -> list[str]:
    """Reference paths that cannot be read: missing, a URL, an unsupported suffix (each named)."""
    from opensora.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    problems = []
    for i, plan in enumerate(plans):
        for r, path in enumerate(plan.reference_paths):
            where = f"task.reference_path: reference {r} of prompt {i} ({path})"
            if "://" in path:
                problems.append(f"{where} is a URL: nothing is downloaded at run time; download it and give its "
                                "local path")
            elif not Path(path).is_file():
                problems.append(f"{where}: no such file")
            elif Path(path).suffix.lower() not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
                problems.append(f"{where}: unsupported file type; images {', '.join(IMAGE_EXTENSIONS)} or videos "
                                f"{', '.join(VIDEO_EXTENSIONS)}")
    return problems


def prompt_name(plan_text: str, index: int) -> str:
    """The file stem of a prompt for VBench-style names (the prompt itself); errors name the prompt."""
    name = plan_text.strip()
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name or "\0" in name:
        problem = "holds a '/' (or NUL), which a file name cannot"
    elif len(f"{name}-999.mp4".encode()) > MAX_NAME_BYTES:
        problem = f"is {len(name.encode())} bytes, too long for a file name (at most {MAX_NAME_BYTES - 8})"
    if problem:
        raise ValueError(f"task.name_by_prompt: prompt {index} {problem}: {name[:80]!r}; use short prompts (such "
                         "as VBench's) or task.name_by_prompt=false")
    return name


def plan_name(raw: str, index: int) -> str:
    """The name of a prompt's videos: its text without the JSON options (the whole |k| text for per-loop
    prompts), as the original's --prompt-as-path."""
    from opensora.sampling.prompts import split_prompt_options

    return prompt_name(split_prompt_options(raw, index)[0], index)


def request_problems(prompts: Sequence[str], loop: int, condition_frame_length: int, reference_path: Any,
                     mask_strategy: Any, clip_frames: Optional[int], name_by_prompt: bool) -> list[str]:
    """Every problem of a sample request (for the validation pass): options, strategies against the clip and the
    references' files, loop settings, file names."""
    problems = []
    if loop > 1 and clip_frames is not None and not 1 <= condition_frame_length < clip_frames:
        problems.append(f"task.condition_frame_length={condition_frame_length}: loop generation (task.loop={loop}) "
                        f"conditions each clip on the last frames of the previous one: must be in "
                        f"1..{clip_frames - 1} for clips of {clip_frames} latent frames")
    try:
        plans = plan_request(prompts, loop, reference_path, mask_strategy)
        if clip_frames is not None:
            check_clip(plans, clip_frames)
    except ValueError as e:  # MaskStrategyError, PromptSyntaxError, per_prompt's
        return problems + [str(e)]
    problems += reference_problems(plans)
    if name_by_prompt:
        for i, raw in enumerate(prompts):
            try:
                plan_name(raw, i)
            except ValueError as e:
                problems.append(str(e))
    return problems
