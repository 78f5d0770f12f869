"""Prompt syntax of Open-Sora 1.1 inference: JSON options appended to a prompt and per-loop prompts.

- Options: a JSON object that ends the prompt overrides that prompt's settings, e.g.
  `A breathtaking sunrise scene.{"reference_path": "wave.png", "mask_strategy": "0"}`.
  Keys: `reference_path` (a ";"-separated string, or a list, of reference images / videos) and
  `mask_strategy` (see opensora.sampling.conditioning).
- Per-loop prompts: `|0|text A|2|text B` = text A for loops 0-1, text B from loop 2 on (loop generation).
  The options, if any, follow the last text and apply to every loop.

Decisions where the original (inference-long.py) fails:
- Only a JSON object at the end of the prompt is an option block. The original splits at the first
  `{` or `[` anywhere, so `a [red] cat` or `a {red} cat` fails to decode; here brackets elsewhere are
  plain text. A prompt that ends with `}` after a `{` but holds no valid JSON object there is an error
  (the decoder's message and the prompt index), since that is this syntax gone wrong.
- Unknown option keys are an error listing the known ones (the original ignores them).
- Per-loop segments must start at |0|, increase, and stay below `loop`; a text may not be empty. The
  original asserts when the segments do not cover `loop` and treats a prompt starting at `|1|` as
  plain text (its `|1|` included); here that is an error too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from opensora.sampling.conditioning import MaskInsertion, parse_mask_strategy

OPTION_KEYS = ("reference_path", "mask_strategy")
_LOOP_PREFIX = re.compile(r"^\|\s*-?\d+\s*\|")


class PromptSyntaxError(ValueError):
    """A prompt whose options or per-loop segments cannot be read; the message names the prompt index."""


def split_prompt_options(prompt: str, index: int = 0) -> tuple[str, dict]:
    """'text{"mask_strategy": "0"}' -> ('text', {"mask_strategy": "0"}); a prompt without a trailing JSON
    object -> (prompt, {})."""
    stripped = prompt.rstrip()
    if not stripped.endswith("}") or "{" not in stripped:
        if re.search(r'\{\s*"(%s)"' % "|".join(OPTION_KEYS), prompt):
            raise PromptSyntaxError(f"prompt {index}: options must end the prompt (after the last per-loop text), "
                                    f"found them inside it: {prompt!r}")
        return prompt, {}
    decoder = json.JSONDecoder()
    error = None
    for pos in (i for i, ch in enumerate(stripped) if ch == "{"):
        try:
            obj, end = decoder.raw_decode(stripped, pos)
        except json.JSONDecodeError as e:
            error = error or e
            continue
        if end == len(stripped) and isinstance(obj, dict):
            check_options(obj, index)
            return stripped[:pos].rstrip(), obj
    raise PromptSyntaxError(f"prompt {index} ends with '}}' but holds no JSON object of options there "
                            f"({error}); write options as {{\"reference_path\": \"...\", \"mask_strategy\": "
                            f"\"0\"}} at the end of the prompt, or avoid a closing brace at its end: {prompt!r}")


def check_options(options: dict, index: int = 0) -> None:
    unknown = [k for k in options if k not in OPTION_KEYS]
    if unknown:
        raise PromptSyntaxError(f"prompt {index}: unknown option(s) {unknown}; known: {list(OPTION_KEYS)}")
    ref = options.get("reference_path")
    if ref is not None and not (isinstance(ref, str) or (isinstance(ref, list)
                                                         and all(isinstance(r, str) for r in ref))):
        raise PromptSyntaxError(f"prompt {index}: reference_path must be a string ('a.png;b.mp4') or a list of "
                                f"strings, got {ref!r}")
    ms = options.get("mask_strategy")
    if ms is not None and not isinstance(ms, str):
        raise PromptSyntaxError(f"prompt {index}: mask_strategy must be a string such as '0', got {ms!r}")


def split_loop_prompts(text: str, loop: int, index: int = 0) -> list[str]:
    """The prompt of each of `loop` iterations: '|0|A|2|B' with loop 4 -> [A, A, B, B]; plain text -> [text] * loop."""
    if loop < 1:
        raise ValueError(f"loop must be >= 1, got {loop}")
    if not _LOOP_PREFIX.match(text):
        return [text] * loop
    parts = text.split("|")[1:]  # [k0, text0, k1, text1, ...]
    if len(parts) % 2:
        raise PromptSyntaxError(f"prompt {index}: per-loop prompts are |k|text pairs, and a '|' inside a text is "
                                f"not allowed: {text!r}")
    starts = []
    for k in parts[0::2]:
        try:
            starts.append(int(k))
        except ValueError:
            raise PromptSyntaxError(f"prompt {index}: per-loop segment start {k!r} is not an integer "
                                    f"(|k|text pairs): {text!r}") from None
    texts = [s.strip() for s in parts[1::2]]
    if starts[0] != 0:
        raise PromptSyntaxError(f"prompt {index}: per-loop prompts must start at |0|, got |{starts[0]}|: {text!r}")
    for a, b in zip(starts, starts[1:]):
        if b <= a:
            raise PromptSyntaxError(f"prompt {index}: per-loop starts must increase, got |{a}| then |{b}|")
    if starts[-1] >= loop:
        raise PromptSyntaxError(f"prompt {index}: segment |{starts[-1]}| starts at loop {starts[-1]} but loop="
                                f"{loop} runs loops 0..{loop - 1}")
    if any(not s for s in texts):
        raise PromptSyntaxError(f"prompt {index}: a per-loop segment has an empty text: {text!r}")
    out = []
    for k, (start, t) in enumerate(zip(starts, texts)):
        end = starts[k + 1] if k + 1 < len(starts) else loop
        out.extend([t] * (end - start))
    return out


def split_reference_paths(value: Union[None, str, Sequence[str]]) -> list[str]:
    """'a.png;b.mp4' or ['a.png', 'b.mp4'] -> ['a.png', 'b.mp4']; None -> []."""
    if value is None:
        return []
    items = value.split(";") if isinstance(value, str) else list(value)
    return [str(p).strip() for p in items if str(p).strip()]


@dataclass
class PromptPlan:
    """One prompt ready for generation: its text per loop, its reference paths and mask strategy."""

    texts: list[str]
    reference_paths: list[str] = field(default_factory=list)
    mask_strategy: Optional[str] = None
    insertions: list[MaskInsertion] = field(default_factory=list)


def plan_prompts(prompts: Sequence[str], loop: int = 1, reference_paths: Optional[Sequence] = None,
                 mask_strategies: Optional[Sequence[Optional[str]]] = None) -> list[PromptPlan]:
    """Parse every prompt (options first, then per-loop segments, as the original) and check its
    strategy against its references: an insertion of loop k may use the prompt's references plus the k
    clips that loop generation appends (one per earlier loop), and loop_id must be < loop.

    :param reference_paths / mask_strategies: one entry per prompt (None: none for all); a prompt's JSON
        options override its entry.
    """
    n = len(prompts)
    for name, value in (("reference_path", reference_paths), ("mask_strategy", mask_strategies)):
        if value is not None and len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts: give one per prompt (null for none)")
    plans = []
    for i, raw in enumerate(prompts):
        text, options = split_prompt_options(raw, i)
        refs = options["reference_path"] if "reference_path" in options else (
            reference_paths[i] if reference_paths is not None else None)
        strategy = options["mask_strategy"] if "mask_strategy" in options else (
            mask_strategies[i] if mask_strategies is not None else None)
        paths = split_reference_paths(refs)
        insertions = parse_mask_strategy(strategy, i)
        for j, ins in enumerate(insertions):
            if ins.loop_id >= loop:
                raise PromptSyntaxError(f"mask strategy of prompt {i}, insertion {j} ({ins.text!r}): field loop_id = "
                                        f"{ins.loop_id} but loop={loop} runs loops 0..{loop - 1}")
            available = len(paths) + ins.loop_id
            if ins.ref_id >= available:
                raise PromptSyntaxError(f"mask strategy of prompt {i}, insertion {j} ({ins.text!r}): field ref_id = "
                                        f"{ins.ref_id} but prompt {i} has {len(paths)} reference path(s)"
                                        + (f" and {ins.loop_id} generated clip(s) by loop {ins.loop_id}"
                                           if ins.loop_id else ""))
        plans.append(PromptPlan(split_loop_prompts(text, loop, i), paths, strategy, insertions))
    return plans
