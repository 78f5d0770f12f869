"""Open-Sora 1.1's buckets: the (resolution, frames, aspect ratio) size each clip trains at.

    data.bucket_config = {resolution: {num_frames: [keep_prob, batch_size]}}
    e.g. {"240p": {16: [0.3, 2], 32: [0.3, 1], 64: [0.0, null]}, "512": {1: [0.4, 12]}}

A bucket is (resolution, t, ar): a named resolution of opensora/data/aspect.py (or of `data.resolutions`, tables
of one's own: {name: {pixels: N, ratios: {"h/w": [H, W]}}}), t frames (1 = images) and the
aspect-ratio key of that resolution's table nearest to the clip's height / width; it trains at the table's
(H, W) with the configured batch size per rank. `[0.0, null]` (or `[0.0, 0]`) disables a (resolution, t).

Which bucket a clip goes to (v1.1.0 `Bucket.get_bucket_id`, SPEC-1.1 §1.3), from the CSV's num_frames T,
height H and width W, resolutions taken largest first:
1. a resolution is tried only if H * W >= 0.8 * its pixels;
2. an image (T = 1) tries that resolution's t = 1 bucket, if it has one;
3. a video tries only the largest t != 1 with T > t * frame_interval (strict);
4. the candidate is kept with its keep probability (one draw); rejected -> the next smaller resolution (not
   a smaller t at the same resolution);
5. no candidate kept anywhere -> the clip is dropped for that epoch.
The draws are made again every epoch. `seeding="original"` reproduces v1.1.0's draws exactly:
`default_rng(seed + epoch + row * num_buckets + pair_id).random()`, num_buckets counting (resolution, t, ar)
triples and pair_id the running index of the (resolution, t) pair, so epoch e + 1 repeats some of epoch e's
draws one pair later. `seeding="independent"` (default) draws every (epoch, pair) stream on its own:
`default_rng([seed, epoch, pair_id]).random(rows)[row]`, vectorised, and stable for rows when the CSV grows
at its end.

Why a clip is dropped is counted by reason (`DROP_REASONS`), so "0 samples" is never a mystery.
Choices where v1.1.0 crashes: `seed=None` (its default, a TypeError once a candidate passes) does not exist
here; a keep probability > 0 with a null batch size, an unknown resolution, a probability outside [0, 1]
or a frame count < 1 are refused naming the entry.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import numpy as np

from opensora.data.aspect import ASPECT_RATIOS
from opensora.data.cache import _plain

# The pixel tolerance of step 1 (a clip may be 20% smaller than the resolution it trains at).
APPROX = 0.8

# Why a row gets no bucket (in the order the report lists them).
DROP_REASONS = {
    "size_unknown": "num_frames/height/width missing or not a number in the CSV",
    "too_small": "height x width below 0.8 x the smallest configured resolution",
    "too_few_frames": "a video with num_frames <= t x frame_interval for every video bucket of the resolutions "
                      "it fits",
    "no_image_bucket": "an image, and no resolution it fits has a 1-frame bucket",
    "disabled": "every bucket it could go to is disabled ([0.0, null])",
    "keep_prob": "rejected by the keep-probability draws at every resolution it fits (drawn again each epoch)",
}


def parse_resolutions(resolutions, key: str = "data.resolutions") -> dict[str, tuple[int, dict]]:
    """Named resolutions of one's own, {name: {pixels: N, ratios: {"h/w": [H, W]}}}, in the form of
    `ASPECT_RATIOS` ((pixels, {key: (H, W)})); None -> {}. A name of the built-in tables, a key that is not a
    number or a size that is not two positive integers is refused naming it."""
    config = _plain(resolutions) or {}
    if not isinstance(config, Mapping):
        raise ValueError(f"{key} must map names to {{pixels: N, ratios: {{h/w: [H, W]}}}}, got {resolutions!r}")
    out = {}
    for name, spec in config.items():
        name, where = str(name), f"{key}.{name}"
        if name in ASPECT_RATIOS:
            raise ValueError(f"{where}: {name!r} is a built-in resolution (opensora/data/aspect.py); choose another name")
        if not isinstance(spec, Mapping) or set(spec) != {"pixels", "ratios"}:
            raise ValueError(f"{where} must be {{pixels: N, ratios: {{h/w: [H, W]}}}}, got {spec!r}")
        pixels, ratios = spec["pixels"], spec["ratios"]
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
            raise ValueError(f"{where}.pixels must be an integer >= 1, got {pixels!r}")
        if not isinstance(ratios, Mapping) or not ratios:
            raise ValueError(f"{where}.ratios must map aspect-ratio keys (h/w, e.g. '0.75') to [H, W], got {ratios!r}")
        table = {}
        for ar, size in ratios.items():
            try:
                float(str(ar))
            except ValueError:
                raise ValueError(f"{where}.ratios: key {ar!r} is not a height/width number") from None
            if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2 or \
                    not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
                raise ValueError(f"{where}.ratios.{ar} must be [H, W] in pixels, got {size!r}")
            table[str(ar)] = (int(size[0]), int(size[1]))
        out[name] = (int(pixels), table)
    return out


def parse_bucket_config(bucket_config, key: str = "data.bucket_config",
                        tables=ASPECT_RATIOS) -> dict[str, dict[int, tuple]]:
    """{resolution: {t: (keep_prob, batch_size or None)}} from the config, every entry checked against the named
    resolutions `tables`; raises ValueError naming the entry that is wrong."""
    config = _plain(bucket_config)
    if not isinstance(config, Mapping) or not config:
        raise ValueError(f"{key} must be a non-empty mapping {{resolution: {{num_frames: [keep_prob, batch_size]}}}}, "
                         f"got {bucket_config!r}")
    out: dict[str, dict[int, tuple]] = {}
    for res, frames in config.items():
        res = str(res)
        if res not in tables:
            raise ValueError(f"{key}: unknown resolution {res!r}; known resolutions: {', '.join(tables)} (or define "
                             "your own in data.resolutions)")
        if not isinstance(frames, Mapping) or not frames:
            raise ValueError(f"{key}.{res} must map num_frames to [keep_prob, batch_size], got {frames!r}")
        out[res] = {}
        for t, value in frames.items():
            where = f"{key}.{res}.{t}"
            try:
                n = int(str(t))
            except ValueError:
                raise ValueError(f"{where}: num_frames must be an integer >= 1, got {t!r}") from None
            if n < 1:
                raise ValueError(f"{where}: num_frames must be >= 1, got {n}")
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
                raise ValueError(f"{where} must be [keep_prob, batch_size] (e.g. [1.0, 4], or [0.0, null] to "
                                 f"disable it), got {value!r}")
            prob, bs = value
            if isinstance(prob, (list, tuple)):
                raise ValueError(f"{where}: keep_prob {prob!r} is a pair (Open-Sora 1.2's (p_resolution, p_frames)); "
                                 "Open-Sora 1.1 buckets take one probability")
            if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0 \
                    or not math.isfinite(float(prob)):
                raise ValueError(f"{where}: keep_prob must be a probability in [0, 1], got {prob!r}")
            if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 0):
                raise ValueError(f"{where}: batch_size must be an integer >= 1 (or null / 0 with keep_prob 0), "
                                 f"got {bs!r}")
            if float(prob) > 0 and not bs:
                raise ValueError(f"{where}: keep_prob {prob} with batch_size {bs!r}: a bucket that takes clips needs "
                                 "a batch size >= 1 ([0.0, null] disables it)")
            if n in out[res]:
                raise ValueError(f"{where}: num_frames {n} given twice for {res}")
            out[res][n] = (float(prob), int(bs) if bs else None)
    return out


class Bucket:
    """The buckets of one `bucket_config` and the assignment rule (see the module docstring).

    Orders as v1.1.0: resolutions by pixel count descending, frame counts descending within one; `pair_id`
    numbers the (resolution, t) pairs in that order; `num_buckets` counts (resolution, t, ar) triples,
    disabled ones included (stage 1: 359, stage 2: 729, stage 3: 848). `buckets` lists every triple in that
    order, the table's aspect-ratio order last.
    """

    def __init__(self, bucket_config, key: str = "data.bucket_config", resolutions=None):
        self.tables = {**ASPECT_RATIOS, **parse_resolutions(resolutions)}
        self.config = parse_bucket_config(bucket_config, key, self.tables)
        self.resolutions = sorted(self.config, key=lambda r: self.tables[r][0], reverse=True)
        self.frames = {r: sorted(self.config[r], reverse=True) for r in self.resolutions}
        self.pair_id: dict[tuple[str, int], int] = {}
        self.buckets: list[tuple[str, int, str]] = []
        for r in self.resolutions:
            for t in self.frames[r]:
                self.pair_id[(r, t)] = len(self.pair_id)
                self.buckets.extend((r, t, ar) for ar in self.table(r))
        self.num_buckets = len(self.buckets)
        self.index = {b: i for i, b in enumerate(self.buckets)}

    # ------------------------------------------------------------ lookups
    def table(self, res: str) -> dict[str, tuple[int, int]]:
        """The aspect-ratio table {"h/w": (H, W)} of a resolution."""
        return self.tables[res][1]

    def keep_prob(self, res: str, t: int) -> float:
        return self.config[res][t][0]

    def batch_size(self, bucket) -> Optional[int]:
        """The batch size per rank of a bucket (resolution, t[, ar]); None when disabled."""
        return self.config[bucket[0]][bucket[1]][1]

    def get_thw(self, bucket) -> tuple[int, int, int]:
        """(frames, H, W) in pixels of a bucket (resolution, t, ar)."""
        res, t, ar = bucket
        h, w = self.table(res)[ar]
        return int(t), int(h), int(w)

    def enabled(self) -> list[tuple[str, int]]:
        """(resolution, t) pairs that take clips (keep_prob > 0), in bucket order."""
        return [(r, t) for r in self.resolutions for t in self.frames[r] if self.keep_prob(r, t) > 0]

    # ------------------------------------------------------------ the rule
    def candidate(self, res: str, num_frames: int, frame_interval: int) -> Optional[int]:
        """The t a clip of `num_frames` frames tries at `res` (steps 2-3 of the rule), or None."""
        ts = self.frames[res]
        if num_frames == 1:
            return 1 if 1 in ts else None
        for t in ts:
            if t != 1 and num_frames > t * frame_interval:
                return t
        return None

    def get_bucket_id(self, num_frames: int, height: int, width: int, frame_interval: int = 1,
                      draw=None) -> Optional[tuple[str, int, str]]:
        """The bucket of one clip, or None. `draw(res, t) -> u in [0, 1)` gives the keep-probability draw of a
        candidate (default: `original_draw(seed=0, epoch=0, row=0)`)."""
        draw = draw or self.original_draw(0, 0, 0)
        pixels = int(height) * int(width)
        for res in self.resolutions:
            if pixels < self.tables[res][0] * APPROX:
                continue
            t = self.candidate(res, int(num_frames), int(frame_interval))
            if t is None:
                continue
            prob = self.keep_prob(res, t)
            if prob >= 1.0 or (prob > 0.0 and draw(res, t) < prob):
                return res, t, self.closest_ratio(res, height, width)
        return None

    def original_draw(self, seed: int, epoch: int, row: int):
        """v1.1.0's draw of one candidate: default_rng(seed + epoch + row * num_buckets + pair_id).random()."""
        base = int(seed) + int(epoch) + int(row) * self.num_buckets
        return lambda res, t: float(np.random.default_rng(base + self.pair_id[(res, t)]).random())

    def closest_ratio(self, res: str, height: float, width: float) -> str:
        """The aspect-ratio key of `res`'s table nearest to height / width (the first on a tie)."""
        keys = list(self.table(res))
        values = np.array([float(k) for k in keys])
        return keys[int(np.argmin(np.abs(values - float(height) / float(width))))]

    def assign(self, num_frames, height, width, frame_interval: int, seed: int, epoch: int,
               seeding: str = "independent", rows: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """The rule for a whole table: (bucket index into `buckets` per row, -1 when dropped; reason code per row,
        '' when assigned). `rows` are the rows' indices in the CSV (their seeds; default 0..n-1); a row whose
        num_frames, height or width is NaN or below 1 is 'size_unknown'."""
        T = np.asarray(num_frames, np.float64)
        H = np.asarray(height, np.float64)
        W = np.asarray(width, np.float64)
        n = len(T)
        rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        out = np.full(n, -1, np.int64)
        reason = np.full(n, "", dtype=object)
        known = np.isfinite(T) & np.isfinite(H) & np.isfinite(W) & (T >= 1) & (H >= 1) & (W >= 1)
        reason[~known] = "size_unknown"
        Ti = np.where(known, T, 0).astype(np.int64)
        pixels = np.where(known, H * W, 0.0)
        open_ = known.copy()  # rows still looking for a bucket
        fits_any = np.zeros(n, bool)  # passed the pixel test somewhere
        had_candidate = np.zeros(n, bool)
        had_live = np.zeros(n, bool)  # had a candidate with keep_prob > 0
        for res in self.resolutions:
            ok = open_ & (pixels >= self.tables[res][0] * APPROX)
            fits_any |= ok
            tried = np.zeros(n, np.int64)
            for t in self.frames[res]:
                if t == 1:
                    tried[ok & (Ti == 1) & (tried == 0)] = 1
                else:
                    tried[ok & (Ti != 1) & (tried == 0) & (Ti > t * int(frame_interval))] = t
            for t in self.frames[res]:
                members = np.flatnonzero(tried == t)
                if len(members) == 0:
                    continue
                had_candidate[members] = True
                prob = self.keep_prob(res, t)
                if prob >= 1.0:
                    kept = members
                elif prob <= 0.0:
                    kept = members[:0]
                else:
                    u = self._uniforms(res, t, rows[members], seed, epoch, seeding)
                    kept = members[u < prob]
                if prob > 0.0:
                    had_live[members] = True
                if len(kept):
                    ars = self._closest_many(res, H[kept], W[kept])
                    first = self.index[(res, t, next(iter(self.table(res))))]
                    out[kept] = first + ars
                    open_[kept] = False
        dropped = known & (out < 0)
        images = Ti == 1
        reason[dropped & ~fits_any] = "too_small"
        no_cand = dropped & fits_any & ~had_candidate
        reason[no_cand & images] = "no_image_bucket"
        reason[no_cand & ~images] = "too_few_frames"
        reason[dropped & had_candidate & ~had_live] = "disabled"
        reason[dropped & had_live] = "keep_prob"
        reason[out >= 0] = ""
        return out, reason

    def _closest_many(self, res: str, height: np.ndarray, width: np.ndarray) -> np.ndarray:
        values = np.array([float(k) for k in self.table(res)])
        return np.argmin(np.abs(values[None, :] - (height / width)[:, None]), axis=1)

    def _uniforms(self, res: str, t: int, rows: np.ndarray, seed: int, epoch: int, seeding: str) -> np.ndarray:
        pair = self.pair_id[(res, t)]
        if seeding == "original":
            base = int(seed) + int(epoch)
            return np.array([np.random.default_rng(base + int(r) * self.num_buckets + pair).random() for r in rows])
        if seeding != "independent":
            raise ValueError(f"data.bucket_seeding={seeding!r}: expected 'independent' or 'original'")
        if len(rows) == 0:
            return np.zeros(0)
        stream = np.random.default_rng([int(seed), int(epoch), pair]).random(int(rows.max()) + 1)
        return stream[rows]

    def possible(self, num_frames: int, height: int, width: int, frame_interval: int) -> list[tuple[str, int, str]]:
        """Every bucket the rule can give this clip in some epoch (its candidates with keep_prob > 0, down to the
        first certain one), largest resolution first."""
        out = []
        pixels = int(height) * int(width)
        for res in self.resolutions:
            if pixels < self.tables[res][0] * APPROX:
                continue
            t = self.candidate(res, int(num_frames), int(frame_interval))
            if t is None or self.keep_prob(res, t) <= 0:
                continue
            out.append((res, t, self.closest_ratio(res, height, width)))
            if self.keep_prob(res, t) >= 1.0:
                break
        return out
