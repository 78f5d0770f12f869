"""Inference-time conditioning of Open-Sora 1.1: the `mask_strategy` grammar and how it writes reference
latents into the initial noise and builds the per-frame float mask the sampler reads.

Grammar (one string per prompt, as the original inference-long.py):
    strategy  := insertion (";" insertion)*
    insertion := 1 to 6 comma-separated fields, right-padded with the defaults
                 loop_id, ref_id, ref_start, target_start, length, edit_ratio  <-  0, 0, 0, 0, 1, 0
e.g. "0" = "0,0,0,0,1,0" (image-to-video: reference 0's first frame at frame 0, kept),
"0,0,0,-8,8" (the first 8 reference frames into the last 8 positions), "0;0,1,0,-1,1" (reference 0 at the
first frame, reference 1 at the last), "0,0,0,0,32,0.4" (edit 32 frames with ratio 0.4).
- loop_id: the loop iteration the insertion applies to; ref_id: index into the prompt's references
  (its reference paths, then the clips appended by loop generation); ref_start / target_start: first
  reference / target latent frame, negative = from the end (T + v); length: frames copied;
  edit_ratio: the mask value of the copied frames (0 keep, 1 regenerate, r: released at step r * steps).
- A 1-frame reference (an image) fills every frame of its target range, as the original.

Decisions where the original raises an unhelpful error or silently mis-copies (all raise
`MaskStrategyError` naming the prompt index, the insertion and the field):
- an empty strategy string or an empty insertion (";;", a trailing ";"): the original fails in int("");
  no conditioning is `None`, not "".
- more than 6 fields (the original asserts), a field that is not a number (int fields must be integers:
  "1.0" is refused, as int("1.0") in the original).
- length < 1: the original copies nothing without a word (e.g. eval/vbench_i2v's "0,0,0,1,0").
- edit_ratio outside [0, 1] (values above 1 act as 1, negatives hold the frame forever in the original).
- a negative ref_id (the original would index from the end), a ref_id with no reference.
- a target range past the clip (the original truncates the copy and the mask silently, or raises on a
  shape mismatch), a start before the clip (-v > T), a reference range past a video reference's end
  (the original raises, or copies one frame into the whole range when exactly one is left).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

FIELDS = ("loop_id", "ref_id", "ref_start", "target_start", "length", "edit_ratio")
DEFAULTS = ("0", "0", "0", "0", "1", "0")


class MaskStrategyError(ValueError):
    """A mask strategy that cannot be applied; the message names the prompt, insertion and field."""


@dataclass(frozen=True)
class MaskInsertion:
    """One `;`-separated part of a mask strategy (negative starts are resolved against the clip / reference)."""

    loop_id: int = 0
    ref_id: int = 0
    ref_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0
    text: str = ""  # as written, for error messages

    def to_string(self) -> str:
        return ",".join(str(v) for v in (self.loop_id, self.ref_id, self.ref_start, self.target_start,
                                          self.length, self.edit_ratio))


Strategy = Union[None, str, Sequence[MaskInsertion]]


def _where(prompt_index: int, insertion_index: int, text: str) -> str:
    return f"mask strategy of prompt {prompt_index}, insertion {insertion_index} ({text!r})"


def parse_mask_strategy(strategy: Optional[str], prompt_index: int = 0) -> list[MaskInsertion]:
    """`"0;0,1,0,-1,1"` -> [MaskInsertion(...), ...]; None -> [] (no conditioning)."""
    if strategy is None:
        return []
    if not isinstance(strategy, str):
        raise MaskStrategyError(f"mask strategy of prompt {prompt_index} must be a string such as '0' or "
                                f"'0,0,0,-8,8', got {strategy!r}")
    if not strategy.strip():
        raise MaskStrategyError(f"mask strategy of prompt {prompt_index} is empty; use null (None) for no "
                                "conditioning, or e.g. '0' to condition frame 0 on reference 0")
    insertions = []
    for j, text in enumerate(strategy.split(";")):
        where = _where(prompt_index, j, text)
        fields = [f.strip() for f in text.split(",")]
        if not text.strip() or any(f == "" for f in fields):
            raise MaskStrategyError(f"{where}: empty field; each insertion is 1-6 comma-separated numbers "
                                    f"({', '.join(FIELDS)})")
        if len(fields) > len(FIELDS):
            raise MaskStrategyError(f"{where}: {len(fields)} fields, at most {len(FIELDS)} ({', '.join(FIELDS)})")
        fields = fields + list(DEFAULTS[len(fields):])
        values = {}
        for name, value in zip(FIELDS, fields):
            try:
                values[name] = float(value) if name == "edit_ratio" else int(value)
            except ValueError:
                kind = "a number" if name == "edit_ratio" else "an integer"
                raise MaskStrategyError(f"{where}: field {name} = {value!r} is not {kind}") from None
        ins = MaskInsertion(**values, text=text)
        if ins.loop_id < 0:
            raise MaskStrategyError(f"{where}: field loop_id = {ins.loop_id} must be >= 0")
        if ins.ref_id < 0:
            raise MaskStrategyError(f"{where}: field ref_id = {ins.ref_id} must be >= 0 (an index into the "
                                    "prompt's references)")
        if ins.length < 1:
            raise MaskStrategyError(f"{where}: field length = {ins.length} must be >= 1 (a length of 0 copies "
                                    "nothing)")
        if not (math.isfinite(ins.edit_ratio) and 0.0 <= ins.edit_ratio <= 1.0):
            raise MaskStrategyError(f"{where}: field edit_ratio = {ins.edit_ratio} must lie in [0, 1] "
                                    "(0 keeps the reference, 1 regenerates it)")
        insertions.append(ins)
    return insertions


def as_insertions(strategy: Strategy, prompt_index: int = 0) -> list[MaskInsertion]:
    """A strategy given as a string, None or already parsed -> list of insertions."""
    if strategy is None or isinstance(strategy, str):
        return parse_mask_strategy(strategy, prompt_index)
    return list(strategy)


def resolve_insertion(ins: MaskInsertion, num_frames: int, ref_frames: int, prompt_index: int = 0,
                      insertion_index: int = 0) -> tuple[int, int]:
    """(ref_start, target_start) with negatives counted from the end, checked against a clip of
    `num_frames` latent frames and a reference of `ref_frames` (1 = an image: fills the target range)."""
    where = _where(prompt_index, insertion_index, ins.text or ins.to_string())
    ts = ins.target_start + num_frames if ins.target_start < 0 else ins.target_start
    if not 0 <= ts < num_frames:
        raise MaskStrategyError(f"{where}: field target_start = {ins.target_start} is outside the clip of "
                                f"{num_frames} latent frames (valid: -{num_frames}..{num_frames - 1})")
    if ts + ins.length > num_frames:
        raise MaskStrategyError(f"{where}: field length = {ins.length} runs past the clip: frames {ts}.."
                                f"{ts + ins.length - 1} of {num_frames} latent frames (at most "
                                f"{num_frames - ts} from target_start {ts})")
    rs = ins.ref_start + ref_frames if ins.ref_start < 0 else ins.ref_start
    if not 0 <= rs < ref_frames:
        raise MaskStrategyError(f"{where}: field ref_start = {ins.ref_start} is outside reference {ins.ref_id} "
                                f"of {ref_frames} latent frame(s) (valid: -{ref_frames}..{ref_frames - 1})")
    if ref_frames > 1 and rs + ins.length > ref_frames:
        raise MaskStrategyError(f"{where}: field length = {ins.length} runs past reference {ins.ref_id}: its "
                                f"frames {rs}..{rs + ins.length - 1} of {ref_frames} (at most "
                                f"{ref_frames - rs} from ref_start {rs})")
    return rs, ts


def apply_mask_strategy(z: np.ndarray, refs: Sequence[Optional[Sequence[np.ndarray]]],
                        strategies: Sequence[Strategy], loop_i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the reference frames of loop `loop_i`'s insertions into the initial latents and build the mask.

    :param z: [B, C, T, H, W] initial noise.
    :param refs: per prompt, its reference latents, each [C, T_ref, H, W] (None or [] for none).
    :param strategies: per prompt, a mask strategy (string, None, or parsed insertions).
    :return: (z with the reference frames written [B, C, T, H, W] float32 (a copy),
              mask [B, T] float32: 1 = generate, the insertion's edit_ratio on copied frames).
    Insertions apply in order, a later one overwriting an earlier one's frames.
    """
    z = np.array(z, dtype=np.float32, copy=True)
    if z.ndim != 5:
        raise ValueError(f"latents must be [B, C, T, H, W], got shape {z.shape}")
    b, c, t, h, w = z.shape
    if len(strategies) != b or len(refs) != b:
        raise ValueError(f"{b} latents but {len(strategies)} mask strategies and {len(refs)} reference lists: "
                         "give one of each per prompt")
    mask = np.ones((b, t), dtype=np.float32)
    for i in range(b):
        prompt_refs = list(refs[i] or [])
        for j, ins in enumerate(as_insertions(strategies[i], i)):
            if ins.loop_id != loop_i:
                continue
            where = _where(i, j, ins.text or ins.to_string())
            if ins.ref_id >= len(prompt_refs):
                raise MaskStrategyError(f"{where}: field ref_id = {ins.ref_id} but prompt {i} has "
                                        f"{len(prompt_refs)} reference(s) in loop {loop_i}")
            ref = np.asarray(prompt_refs[ins.ref_id])
            if ref.ndim != 4 or (ref.shape[0], ref.shape[2], ref.shape[3]) != (c, h, w):
                raise MaskStrategyError(f"{where}: reference {ins.ref_id} has latent shape {ref.shape}, expected "
                                        f"[{c}, T_ref, {h}, {w}] (encode it at the sampled image size)")
            rs, ts = resolve_insertion(ins, t, ref.shape[1], i, j)
            n = ins.length
            if ref.shape[1] == 1:  # an image: its frame fills the whole target range
                z[i, :, ts:ts + n] = ref[:, :1]
            else:
                z[i, :, ts:ts + n] = ref[:, rs:rs + n]
            mask[i, ts:ts + n] = ins.edit_ratio
    return z, mask
