"""Generated clips of coloured shapes moving in a straight line: the built-in demo's data.

A clip shows one shape ("square" or "circle") of one saturated colour on a dark background,
moving a whole number of pixels per frame left, right, up or down, and is captioned
"a red square moving left". Some (colour, shape, direction) combinations are held out of
training so that sampling them tests composition, and `opensora.eval.shapes` scores such
samples from their pixels.
"""
from __future__ import annotations

import itertools
import re
from typing import Optional, Sequence

import numpy as np

# Corners of the RGB cube: every pair is at least 1.0 apart, so nearest-colour is unambiguous.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
# (dx, dy) per frame; x grows to the right, y grows downwards (image row index).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
SHAPES: tuple[str, ...] = ("square", "circle")

Triple = tuple[str, str, str]  # (colour, shape, direction)

_CAPTION_RE = re.compile(r"^\s*an?\s+([a-z]+)\s+([a-z]+)\s+moving\s+([a-z]+)\s*\.?\s*$", re.IGNORECASE)


def caption(color: str, shape: str, direction: str) -> str:
    """("red", "square", "left") -> "a red square moving left"."""
    return f"a {color} {shape} moving {direction}"


def parse_caption(text: str) -> Triple:
    """Inverse of `caption` (case and surrounding blanks ignored); ValueError naming the text otherwise."""
    m = _CAPTION_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"cannot parse caption {text!r}: expected 'a <colour> <shape> moving <direction>'")
    color, shape, direction = (g.lower() for g in m.groups())
    checks = ((color, COLORS, "colour"), (shape, SHAPES, "shape"), (direction, DIRECTIONS, "direction"))
    for value, known, what in checks:
        if value not in known:
            raise ValueError(f"cannot parse caption {text!r}: unknown {what} {value!r} (known: {', '.join(known)})")
    return color, shape, direction


def _names(values: Optional[Sequence[str]], known, what: str) -> list[str]:
    names = list(known) if values is None else list(values)
    if not names:
        raise ValueError(f"need at least one {what}")
    unknown = [v for v in names if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown} (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {what} in {names}")
    return names


def split_prompts(colors: Optional[Sequence[str]] = None, shapes: Optional[Sequence[str]] = None,
                  directions: Optional[Sequence[str]] = None, num_heldout: int = 8,
                  seed: int = 0) -> tuple[list[Triple], list[Triple]]:
    """Split all (colour, shape, direction) triples into (train, held-out), held-out never trained on.

    Every pair of attributes of a held-out triple still occurs in training (its colour with its shape,
    its colour with its direction, its shape with its direction; a pair is exempt only when the third
    attribute has a single value, where the pair is the triple itself), so held-out prompts test
    composition of seen parts. Held-out colours, directions and shapes are balanced (counts differ by at
    most one), hence every colour and every direction is held out at least once when `num_heldout` is at
    least their number. Deterministic in `seed`; both lists follow the order of the full product.
    """
    colors = _names(colors, COLORS, "colour")
    shapes = _names(shapes, SHAPES, "shape")
    directions = _names(directions, DIRECTIONS, "direction")
    triples = list(itertools.product(colors, shapes, directions))
    if not 0 <= num_heldout < len(triples):
        raise ValueError(f"num_heldout={num_heldout} must be in [0, {len(triples)}) for {len(triples)} combinations")
    axes = (colors, shapes, directions)
    # pair (i, j) of attribute axes must survive in training unless the remaining axis has one value
    pairs = [(i, j) for i, j in ((0, 1), (0, 2), (1, 2)) if len(axes[3 - i - j]) > 1]

    def pair_counts(selected: set) -> dict:
        counts: dict = {}
        for t in triples:
            if t not in selected:
                for i, j in pairs:
                    counts[(i, j, t[i], t[j])] = counts.get((i, j, t[i], t[j]), 0) + 1
        return counts

    rng = np.random.default_rng(seed)
    for _ in range(2000):
        held: list[Triple] = []
        used = [dict.fromkeys(a, 0) for a in axes]
        train_pairs = pair_counts(set())
        while len(held) < num_heldout:
            # triples whose removal keeps all their pairs in training
            ok = [t for t in triples if t not in held and all(train_pairs[(i, j, t[i], t[j])] > 1 for i, j in pairs)]
            if not ok:
                break
            # prefer the least-used colour/direction/shape, ties broken at random
            load = np.array([[used[k][t[k]] for k in (0, 2, 1)] for t in ok])
            key = load.max(1) * 1000 + load.sum(1) * 10 + rng.random(len(ok))
            t = ok[int(np.argmin(key))]
            held.append(t)
            for k in range(3):
                used[k][t[k]] += 1
            for i, j in pairs:
                train_pairs[(i, j, t[i], t[j])] -= 1
        if len(held) == num_heldout and all(max(u.values()) - min(u.values()) <= 1 for u in used):
            chosen = set(held)
            return [t for t in triples if t not in chosen], [t for t in triples if t in chosen]
    raise ValueError(f"cannot hold out {num_heldout} of {len(triples)} combinations with every attribute pair "
                     f"still in training and balanced counts; lower data.dataset.num_heldout")


def _default_size(image_size: int) -> tuple[int, int]:
    lo = max(4, round(image_size / 4))
    return lo, max(lo, round(image_size * 3 / 8))


def render_clip(color: str, shape: str, direction: str, num_frames: int, image_size: int,
                rng: np.random.Generator, size: Optional[int] = None, speed: Optional[float] = None,
                background=0.0, jitter: Optional[int] = None) -> np.ndarray:
    """One clip [T, H, W, 3] float32 in [0, 1] (H = W = image_size).

    The shape occupies a `size` x `size` box (circle: the pixels whose centres lie within size/2 of the
    box centre) whose top-left corner moves by round(speed * t) pixels along `direction` at frame t;
    the start is random among those keeping the box fully inside the frame for the whole clip.
    `size` defaults to a random integer in [image_size/4, 3 image_size/8] (at least 4), `speed` to a
    random integer in [1, max(2, image_size/16)] px/frame, both capped to what fits. `background` is a
    grey level or an RGB triple. `jitter` (px) narrows the start to the centred path +- jitter on each
    axis (None: anywhere that fits), which makes position nearly a function of the caption.
    """
    if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"unknown attribute in ({color!r}, {shape!r}, {direction!r})")
    if num_frames < 1 or image_size < 1:
        raise ValueError(f"num_frames={num_frames} and image_size={image_size} must be >= 1")
    steps = num_frames - 1
    if size is None:
        lo, hi = _default_size(image_size)
        hi = min(hi, image_size - steps)  # leave room for >= 1 px/frame
        size = int(rng.integers(lo, hi + 1)) if hi >= lo else max(1, min(lo, image_size))
    size = int(size)
    if not 1 <= size <= image_size:
        raise ValueError(f"shape size {size} does not fit a {image_size}x{image_size} frame")
    room = image_size - size  # how far the box may travel
    if speed is None:
        top = min(max(2, round(image_size / 16)), room // steps) if steps else 1
        speed = int(rng.integers(1, top + 1)) if top >= 1 else (room / steps if steps else 0.0)
    offsets = np.round(np.arange(num_frames) * float(speed)).astype(int)  # [T] px along the direction
    travel = int(offsets[-1])
    if speed < 0 or travel > room:
        raise ValueError(f"speed {speed} px/frame over {num_frames} frames moves a {size}px shape "
                         f"out of a {image_size}px frame")
    dx, dy = DIRECTIONS[direction]
    # start (top-left) so that start + d * offsets stays within [0, room] on the moving axis
    lo_along, hi_along = (travel, room) if (dx + dy) < 0 else (0, room - travel)
    lo_across, hi_across = 0, room
    if jitter is not None:
        mid_along, mid_across = (lo_along + hi_along) // 2, room // 2
        lo_along, hi_along = max(lo_along, mid_along - jitter), min(hi_along, mid_along + jitter)
        lo_across, hi_across = max(0, mid_across - jitter), min(room, mid_across + jitter)
    along = int(rng.integers(lo_along, hi_along + 1))
    across = int(rng.integers(lo_across, hi_across + 1))
    x0, y0 = (along, across) if dx else (across, along)

    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    else:
        c = np.arange(size) + 0.5 - size / 2
        mask = c[:, None] ** 2 + c[None, :] ** 2 <= (size / 2) ** 2 + 1e-9
    bg = np.broadcast_to(np.asarray(background, dtype=np.float32), (3,))
    video = np.empty((num_frames, image_size, image_size, 3), dtype=np.float32)
    video[:] = bg
    rgb = np.asarray(COLORS[color], dtype=np.float32)
    for t, off in enumerate(offsets):
        x, y = x0 + dx * off, y0 + dy * off
        video[t, y:y + size, x:x + size][mask] = rgb
    return video


class SyntheticVideoDataset:
    """Map-style dataset of `render_clip` videos with captions, over the training combinations only.

    Item i shows combination `triples[i % len(triples)]` (so combinations are equally frequent) with
    random size, speed and start drawn from `default_rng([seed, i])` (`size`, `speed` and `jitter`
    fix or narrow them, see `render_clip`); returns
    (video [3, T, H, W] float32 in [-1, 1], caption).
    """

    def __init__(self, num_samples: int = 2048, num_frames: int = 8, image_size: int = 16,
                 colors: Optional[Sequence[str]] = None, shapes: Optional[Sequence[str]] = None,
                 directions: Optional[Sequence[str]] = None, num_heldout: int = 8, seed: int = 0,
                 size: Optional[int] = None, speed: Optional[float] = None, jitter: Optional[int] = None):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        self.num_samples, self.num_frames, self.image_size = int(num_samples), int(num_frames), int(image_size)
        self.seed = int(seed)
        self.render_kwargs = {"size": size, "speed": speed, "jitter": jitter}
        self.triples, self.heldout = split_prompts(colors, shapes, directions, num_heldout, seed)
        self.captions = [caption(*t) for t in self.triples]
        render_clip(*self.triples[0], self.num_frames, self.image_size, np.random.default_rng(0),
                    **self.render_kwargs)  # fail early

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        """{"video": [3, T, H, W] float32 in [-1, 1], "caption": str} (the item format of every dataset)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        i %= self.num_samples
        t = self.triples[i % len(self.triples)]
        clip = render_clip(*t, self.num_frames, self.image_size, np.random.default_rng([self.seed, i]),
                           **self.render_kwargs)
        video = np.ascontiguousarray(clip.transpose(3, 0, 1, 2)) * 2.0 - 1.0  # [T, H, W, 3] -> [3, T, H, W]
        return {"video": video.astype(np.float32), "caption": caption(*t)}

    def heldout_prompts(self) -> list[str]:
        return [caption(*t) for t in self.heldout]
