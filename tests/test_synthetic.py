"""The demo's synthetic data, its pixel-space evaluator, and video writing/reading."""
from __future__ import annotations

import itertools
import re

import imageio.v3 as iio
import numpy as np
import pytest

from opensora.data.synthetic import (COLORS, DIRECTIONS, SHAPES, SyntheticVideoDataset, caption, parse_caption,
                                     render_clip, split_prompts)
from opensora.eval.shapes import detect_color, detect_direction, evaluate_samples
from opensora.utils.video_io import read_video, save_grid, save_grid_png, save_video, to_uint8_frames

ALL = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
# hand-counted pixels of a size-s circle (pixel centres within s/2 of the box centre)
CIRCLE_PIXELS = {4: 12, 5: 21, 6: 32}


def _fg(clip):  # [T, H, W, 3] on black -> bool [T, H, W]
    return clip.max(-1) > 0


def _noisy(clip, rng, sigma=0.1):
    return np.clip(clip + sigma * rng.standard_normal(clip.shape), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- captions and split

def test_caption_round_trip_and_errors():
    for t in ALL:
        assert parse_caption(caption(*t)) == t
    assert caption("red", "square", "left") == "a red square moving left"
    assert parse_caption("  A Blue Circle moving UP. ") == ("blue", "circle", "up")
    for bad in ["a red square", "a purple square moving left", "a red cube moving left", ""]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_caption(bad)


def _check_split(train, held, colors, shapes, directions, n):
    full = set(itertools.product(colors, shapes, directions))
    assert len(held) == n and set(train) | set(held) == full and not set(train) & set(held)
    axes = (colors, shapes, directions)
    for k, axis in enumerate(axes):
        counts = [sum(t[k] == a for t in held) for a in axis]
        assert max(counts) - min(counts) <= 1, (k, counts)  # balanced
        assert {t[k] for t in train} == set(axis)  # every value still trained
    for t in held:  # every pair of a held-out triple is seen in training (unless the third axis is trivial)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            if len(axes[3 - i - j]) > 1:
                assert any(u[i] == t[i] and u[j] == t[j] for u in train), (t, i, j)


def test_split_default_disjoint_balanced_deterministic():
    train, held = split_prompts()
    _check_split(train, held, list(COLORS), list(SHAPES), list(DIRECTIONS), 8)
    # 8 of 4 colours x 2 shapes x 4 directions: exactly 2 per colour and direction, 4 per shape
    assert sorted(c for c, _, _ in held) == sorted(list(COLORS) * 2)
    assert sorted(d for _, _, d in held) == sorted(list(DIRECTIONS) * 2)
    assert split_prompts(seed=0) == (train, held)
    assert any(split_prompts(seed=s)[1] != held for s in (1, 2, 3))


@pytest.mark.parametrize("kw, n", [(dict(num_heldout=6), 6), (dict(num_heldout=4, shapes=["square"]), 4),
                                   (dict(num_heldout=12, seed=5), 12), (dict(colors=["red", "blue"]), 8)])
def test_split_variants(kw, n):
    colors, shapes, directions = kw.get("colors", list(COLORS)), kw.get("shapes", list(SHAPES)), list(DIRECTIONS)
    train, held = split_prompts(**kw)
    _check_split(train, held, colors, shapes, directions, n)
    if n >= max(len(colors), len(directions)):
        assert {t[0] for t in held} == set(colors) and {t[2] for t in held} == set(directions)


def test_split_rejects_impossible():
    with pytest.raises(ValueError, match="num_heldout"):
        split_prompts(num_heldout=32)
    with pytest.raises(ValueError, match="unknown colour"):
        split_prompts(colors=["red", "mauve"])


# ---------------------------------------------------------------- rendering

@pytest.mark.parametrize("image_size", [16, 32])
def test_render_clip_geometry_exact(image_size):
    rng = np.random.default_rng(0)
    for (color, shape, direction), size, speed in itertools.product(ALL, (4, 5, 6), (1, 2)):
        if (image_size - size) < 7 * speed:
            continue
        clip = render_clip(color, shape, direction, 8, image_size, rng, size=size, speed=speed)
        assert clip.shape == (8, image_size, image_size, 3) and clip.dtype == np.float32
        fg = _fg(clip)
        want = size * size if shape == "square" else CIRCLE_PIXELS[size]
        assert (fg.sum((1, 2)) == want).all(), "shape clipped by the frame border"  # fully inside every frame
        np.testing.assert_array_equal(clip[fg], np.broadcast_to(COLORS[color], (fg.sum(), 3)))
        assert (clip[~fg] == 0).all()
        ys, xs = np.nonzero(fg[0])
        assert xs.max() - xs.min() + 1 == size and ys.max() - ys.min() + 1 == size
        dx, dy = DIRECTIONS[direction]
        for t in range(8):
            ys_t, xs_t = np.nonzero(fg[t])
            # centroid moves exactly speed * t px along (dx, dy)
            assert xs_t.mean() - xs.mean() == pytest.approx(speed * t * dx, abs=1e-9)
            assert ys_t.mean() - ys.mean() == pytest.approx(speed * t * dy, abs=1e-9)


@pytest.mark.parametrize("image_size, sizes", [(16, (4, 6)), (32, (8, 12))])
def test_render_clip_random_defaults_visible(image_size, sizes):
    """Random size/speed/start: always fully inside, 1-2 px/frame, sizes in the documented range."""
    rng = np.random.default_rng(1)
    seen_sizes = set()
    for i in range(100):
        color, shape, direction = ALL[i % len(ALL)]
        fg = _fg(render_clip(color, "square", direction, 8, image_size, rng))
        n = fg.sum((1, 2))
        size = int(round(np.sqrt(n[0])))
        seen_sizes.add(size)
        assert (n == size * size).all() and sizes[0] <= size <= sizes[1]
        c = np.array([[np.nonzero(f)[1].mean(), np.nonzero(f)[0].mean()] for f in fg])  # [T, (x, y)]
        step = np.diff(c, axis=0) @ np.array(DIRECTIONS[direction])  # px/frame along the direction
        assert (step >= 1).all() and (step <= 2).all() and len(set(step)) == 1
    assert len(seen_sizes) > 1


def test_render_clip_rejects_infeasible():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="out of"):
        render_clip("red", "square", "left", 8, 16, rng, size=6, speed=2)
    with pytest.raises(ValueError):
        render_clip("red", "hexagon", "left", 8, 16, rng)


def test_render_clip_background():
    clip = render_clip("blue", "square", "down", 4, 16, np.random.default_rng(0), size=4, speed=1,
                       background=(0.1, 0.2, 0.3))
    assert np.isclose(clip[0].reshape(-1, 3), [0.1, 0.2, 0.3]).all(-1).sum() == 16 * 16 - 16


# ---------------------------------------------------------------- dataset

def test_dataset_items_deterministic_in_range():
    a = SyntheticVideoDataset(num_samples=64, num_frames=8, image_size=16, seed=3)
    b = SyntheticVideoDataset(num_samples=64, num_frames=8, image_size=16, seed=3)
    assert len(a) == 64 and len(a.triples) == 24 and len(a.heldout) == 8
    assert a.captions == [caption(*t) for t in a.triples] and len(set(a.captions)) == 24
    assert not set(a.heldout_prompts()) & set(a.captions)
    for i in (0, 5, 63, -1):
        (va, ca), (vb, cb) = (a[i]["video"], a[i]["caption"]), (b[i]["video"], b[i]["caption"])
        assert va.shape == (3, 8, 16, 16) and va.dtype == np.float32
        assert va.min() >= -1 and va.max() <= 1 and va.min() == -1 and va.max() == 1
        np.testing.assert_array_equal(va, vb)
        assert ca == cb and ca in a.captions
        # the caption describes the pixels
        assert evaluate_samples([to_uint8_frames(va)], [ca])["per_sample"][0]["color_ok"]
    assert not np.array_equal(a[0]["video"], a[24]["video"])  # same combination, different random placement
    assert a[0]["caption"] == a[24]["caption"]
    c = SyntheticVideoDataset(num_samples=64, seed=4)
    assert not all(np.array_equal(a[i]["video"], c[i]["video"]) for i in range(4))
    with pytest.raises(IndexError):
        a[64]


# ---------------------------------------------------------------- evaluator

@pytest.mark.parametrize("image_size", [16, 32])
def test_evaluator_perfect_on_ground_truth(image_size):
    rng = np.random.default_rng(image_size)
    clips = [render_clip(*t, 8, image_size, rng) for t in ALL]
    prompts = [caption(*t) for t in ALL]
    for videos in (clips, [_noisy(v, rng) for v in clips], [to_uint8_frames(_noisy(v, rng)) for v in clips]):
        scores = evaluate_samples(videos, prompts)
        assert scores["n"] == len(ALL)
        assert scores["color_acc"] == 1.0 and scores["direction_acc"] == 1.0 and scores["joint_acc"] == 1.0, \
            [s for s in scores["per_sample"] if not (s["color_ok"] and s["direction_ok"])]


def test_evaluator_rejects_wrong_samples():
    rng = np.random.default_rng(7)
    names = list(COLORS)
    static = [_noisy(render_clip(c, "square", "left", 8, 16, rng, speed=0), rng) for c in names]
    assert all(detect_direction(v) is None for v in static)
    assert detect_direction(render_clip("red", "square", "left", 8, 16, rng, speed=0.2)) is None  # 1 px drift
    assert [detect_color(v) for v in static] == names
    scores = evaluate_samples(static, [caption(c, "square", "left") for c in names])
    assert scores["color_acc"] == 1.0 and scores["direction_acc"] == 0.0

    moving = [render_clip(c, "circle", "right", 8, 16, rng) for c in names]
    swapped = [caption(names[(i + 1) % len(names)], "circle", "right") for i in range(len(names))]
    scores = evaluate_samples(moving, swapped)
    assert scores["color_acc"] == 0.0 and scores["direction_acc"] == 1.0 and scores["joint_acc"] == 0.0
    assert not any(s["color_ok"] for s in scores["per_sample"])

    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for d in DIRECTIONS:  # played backwards, the motion is the opposite one
        assert detect_direction(render_clip("red", "square", d, 8, 16, rng)[::-1]) == opposite[d]

    blank, noise = np.zeros((8, 16, 16, 3), np.float32), _noisy(np.zeros((8, 16, 16, 3)), rng, 0.3)
    assert detect_color(blank) is None and detect_direction(blank) is None
    assert detect_direction(noise) is None
    jumping = np.concatenate([render_clip("red", "square", "left", 1, 16, rng) for _ in range(8)])
    scores = evaluate_samples([blank, noise, jumping], ["a red square moving left"] * 3)
    assert scores["per_sample"][0] == {"prompt": "a red square moving left", "color": None, "direction": None,
                                       "color_ok": False, "direction_ok": False}
    with pytest.raises(ValueError, match="a red thing"):
        evaluate_samples([blank], ["a red thing"])


# ---------------------------------------------------------------- video files

def test_to_uint8_frames_layouts():
    model = np.stack([np.full((2, 2, 2), v, np.float32) for v in (-1.0, 0.0, 1.0)])  # [C=3, T, H, W]
    out = to_uint8_frames(model)
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8 and (out[0, 0, 0] == [0, 128, 255]).all()
    assert (to_uint8_frames(np.full((2, 2, 2, 3), 2.0)) == 255).all()  # [T, H, W, C] in [0, 1], clipped
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    np.testing.assert_array_equal(to_uint8_frames(u8), u8)
    assert to_uint8_frames(np.zeros((1, 2, 4, 4))).shape == (2, 4, 4, 3)  # grey model-space -> RGB


@pytest.mark.parametrize("size, upscale", [((16, 16), 1), ((15, 17), 1), ((16, 16), 2)])
def test_mp4_round_trip(tmp_path, size, upscale):
    import imageio_ffmpeg

    h, w = size
    rng = np.random.default_rng(0)
    clip = np.zeros((8, h, w, 3), np.float32)
    clip[:, :14, :14] = render_clip("yellow", "square", "down", 8, 14, rng, size=5, speed=1)
    frames = to_uint8_frames(clip)
    path = save_video(frames, tmp_path / "sub" / "a.mp4", fps=8, upscale=upscale)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.mp4"]  # temp file renamed away
    got = read_video(path)
    hh, ww = h * upscale, w * upscale
    assert got.shape == (8, hh + hh % 2, ww + ww % 2, 3)  # padded to even sizes
    ref = frames.repeat(upscale, 1).repeat(upscale, 2)
    err = np.abs(got[:, :hh, :ww].astype(int) - ref)
    assert err.mean() < 8  # H.264 + 4:2:0 chroma is lossy: mean abs error in uint8 units
    assert evaluate_samples([got], ["a yellow square moving down"])["joint_acc"] == 1.0
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    reader.close()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 8


def test_gif_grid(tmp_path):
    rng = np.random.default_rng(0)
    videos = [to_uint8_frames(render_clip(*ALL[i], 8, 16, rng)) for i in range(4)]
    videos.append(videos[0][:5])  # shorter video holds its last frame
    labels = [caption(*ALL[i]) for i in range(5)]
    path = save_grid(videos, tmp_path / "grid.gif", fps=8, upscale=2, labels=labels)
    gif = iio.imread(path, index=None)
    assert gif.shape[0] == 8
    assert gif.shape[2] == 3 * 32 + 4 * 2  # ceil(sqrt(5)) = 3 columns of 16*2 px, 2 px gaps
    assert gif.shape[1] > 2 * 32 + 3 * 2  # 2 rows plus label strips
    png = iio.imread(save_grid_png(videos, tmp_path / "grid.png", nrow=5, upscale=1))
    assert png.shape[:2] == (16 + 2 * 2, 2 * (5 * 16 + 6 * 2) + 4 * 2)


def test_jitter_keeps_the_path_centred():
    from opensora.data.synthetic import render_clip

    for direction in ("left", "right", "up", "down"):
        starts = set()
        for k in range(40):
            clip = render_clip("red", "square", direction, 8, 16, np.random.default_rng(k), size=5, speed=1, jitter=1)
            ys, xs = np.nonzero(clip[0, :, :, 0] > 0.5)
            starts.add((int(xs.min()), int(ys.min())))
        # room = 11, travel = 7: the moving axis starts at 2 +- 1 (or 9 +- 1 going back), the other at 5 +- 1
        along = {1, 2, 3} if direction in ("right", "down") else {8, 9, 10}
        axis = 0 if direction in ("left", "right") else 1
        assert {s[axis] for s in starts} <= along and len({s[axis] for s in starts}) > 1
        assert {s[1 - axis] for s in starts} <= {4, 5, 6}
