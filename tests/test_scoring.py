"""Frame selection, the batched resumable row runner, and the data tools' CLIP scores (task=score_aesthetic ->
`aes`, task=score_match -> `match`) against an independent computation: frames decoded with
read_video, chosen by the original's rule, transformers' CLIPImageProcessor / CLIPTokenizerFast /
CLIPModel, and the LAION head as the original's torch nn.Sequential (a tiny random one saved as .pth).

Tolerance: 1e-4 relative to the score scale (float32 CLIP + head; measured ~1e-6).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import compose_cfg, frame_ids, grey_clip, still_image, tiny_clip, write_mp4
from opensora.config import ConfigError, validate
from opensora.data.frames import at_points, evenly_spaced, first_window, read_frames_at
from opensora.data.loader import BadSampleError
from opensora.data.resumable import map_rows_batched, progress_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# name: (frames, height, width); grey level of frame i = 16 + 4 i (test_data.grey_clip)
VIDEOS = {"clips/wide.mp4": (50, 48, 80), "clips/tall.mp4": (40, 72, 40), "clips/short.mp4": (3, 40, 40)}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Videos, an image, a corrupt file and a missing one, in clips.csv (path,text + info columns; the
    `num_frames` of wide.mp4 says 20 of its 50, which the aesthetic scorer must use, as the original)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("scoring_media")
    for name, (t, h, w) in VIDEOS.items():
        write_mp4(root / name, grey_clip(t, h, w), 24)
    (root / "clips/corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    (root / "stills").mkdir()
    Image.fromarray(still_image()).save(root / "stills/still.png")
    rows = [("clips/wide.mp4", "a photo of a cat", "20", "48", "80", "0.6", "24.0"),
            ("clips/tall.mp4", "a dog running on the beach", "40", "72", "40", "1.8", "24.0"),
            ("clips/short.mp4", "the red square moves left", "3", "40", "40", "1.0", "24.0"),
            ("stills/still.png", "a photo of the beach at sunset", "1", "32", "50", "0.64", "0"),
            ("clips/corrupt.mp4", "a cat and a dog", "10", "40", "40", "1.0", "24.0"),
            ("clips/missing.mp4", "two dogs play with a red ball", "10", "40", "40", "1.0", "24.0"),
            ("clips/wide.mp4", "a dog running on the beach", "20", "48", "80", "0.6", "24.0")]
    cols = ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]
    pd.DataFrame(rows, columns=cols).to_csv(root / "clips.csv", index=False)
    return root


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory, "vit_l14", seed=1)


class TorchHead(torch.nn.Module):
    """The original's MLP (tools/scoring/aesthetic/inference.py), with smaller layers."""

    def __init__(self, sizes):
        super().__init__()
        d, a, b, c, e, _ = sizes
        self.layers = torch.nn.Sequential(torch.nn.Linear(d, a), torch.nn.Dropout(0.2), torch.nn.Linear(a, b),
                                          torch.nn.Dropout(0.2), torch.nn.Linear(b, c), torch.nn.Dropout(0.1),
                                          torch.nn.Linear(c, e), torch.nn.Linear(e, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    torch.manual_seed(3)
    model = TorchHead((20, 12, 10, 8, 6, 1)).eval()
    path = tmp_path_factory.mktemp("head") / "aesthetic.pth"
    torch.save(model.state_dict(), path)
    return model, path


# ================================================================
# Frames
# ================================================================


def test_frame_selection_follows_the_original(media):
    wide = media / "clips/wide.mp4"
    frames, idx = read_frames_at(wide, at_points((0.1, 0.5, 0.9)))
    assert idx.tolist() == [5, 25, 45] and frame_ids(frames) == [5, 25, 45]
    assert read_frames_at(wide, at_points((0.1, 0.5, 0.9), num_frames=20))[1].tolist() == [2, 10, 18]
    assert read_frames_at(wide, at_points((0.1, 0.5, 0.9), num_frames=100))[1].tolist() == [10, 49, 49]
    assert read_frames_at(wide, evenly_spaced(4))[1].tolist() == [0, 16, 33, 49]
    assert read_frames_at(wide, evenly_spaced(None))[1].tolist() == list(range(50))
    assert read_frames_at(wide, first_window(4, 3))[1].tolist() == [0, 3, 6, 9]
    image, idx = read_frames_at(media / "stills/still.png", at_points((0.1, 0.5, 0.9)))
    assert image.shape == (1, 32, 50, 3) and idx.tolist() == [0] and (image[0] == still_image()).all()
    with pytest.raises(BadSampleError, match="too short"):
        read_frames_at(media / "clips/short.mp4", first_window(4, 1))
    with pytest.raises(BadSampleError, match="unreadable video"):
        read_frames_at(media / "clips/corrupt.mp4", evenly_spaced(2))
    with pytest.raises(BadSampleError, match="file not found"):
        read_frames_at(media / "clips/missing.mp4", evenly_spaced(2))


# ================================================================
# The batched resumable runner (no model)
# ================================================================


def _load_or_fail(path):
    if "x" in path:
        raise BadSampleError(path, "cannot read")
    return float(len(path))


def test_map_rows_batched_scores_in_batches_resumes_and_keeps_failures(tmp_path):
    keys = ["a", "bb", "x1", "ccc", "bb"]
    calls = []

    def score(rows):
        calls.append([p for _, p in rows])
        return [p * 10 for _, p in rows]

    out = tmp_path / "out.csv"
    res = map_rows_batched(_load_or_fail, score, keys, keys, out, {"model": "m1"}, batch_size=2)
    assert res == {"a": (True, 10.0, ""), "bb": (True, 20.0, ""), "x1": (False, None, res["x1"][2]),
                   "ccc": (True, 30.0, "")}
    assert "cannot read" in res["x1"][2]
    assert calls == [[1.0, 2.0], [3.0]]  # batches of up to 2 rows; "bb" twice in the input, loaded once
    # the next run computes only what failed, and refuses a log made with other settings
    calls.clear()
    res = map_rows_batched(lambda p: 7.0, score, keys, keys, out, {"model": "m1"}, batch_size=8)
    assert calls == [[7.0]] and res["x1"] == (True, 70.0, "") and res["a"] == (True, 10.0, "")
    with pytest.raises(ValueError, match=r"other settings \(model: log 'm1' vs now 'm2'\)"):
        map_rows_batched(_load_or_fail, score, keys, keys, out, {"model": "m2"}, batch_size=8)
    assert progress_path(out).is_file()


# ================================================================
# The tasks, against transformers + torch
# ================================================================


def _reference_pixels(folder, media, path, points, count=None):
    from opensora.utils.video_io import read_video

    _, proc = transformers.CLIPTokenizerFast.from_pretrained(folder), transformers.CLIPImageProcessor.from_pretrained(folder)
    if path.endswith(".png"):
        frames = [still_image()]
    else:
        video = read_video(media / path)
        n = count or len(video)
        frames = [video[min(max(int(p * n), 0), n - 1, len(video) - 1)] for p in points]
    return torch.from_numpy(proc(frames, return_tensors="np")["pixel_values"])


def _cfg(clip_folder, media, tmp_path, task, *extra):
    return compose_cfg([f"task={task}", f"task.csv_path={media / 'clips.csv'}", f"clip.from_pretrained={clip_folder}",
                        "clip.batch_size=4", "task.batch_size=2", "task.num_workers=0", "logger=none",
                        f"task.output_csv={media / 'out' / tmp_path.name / 'out.csv'}", *extra], tmp_path)


def _out(media, tmp_path):
    return media / "out" / tmp_path.name / "out.csv"


# paths as the output (in <media>/out/<test>/) finds them
GOOD = [f"../../{p}" for p in ("clips/wide.mp4", "clips/tall.mp4", "clips/short.mp4", "stills/still.png",
                               "clips/wide.mp4")]


def test_score_aesthetic_matches_clip_and_the_original_head(clip_folder, head, media, tmp_path):
    from opensora.tasks.score_aesthetic import run

    model, folder = clip_folder
    torch_head, head_path = head
    metrics = run(_cfg(folder, media, tmp_path, "score_aesthetic", f"task.head_path={head_path}"))
    got = pd.read_csv(_out(media, tmp_path), dtype=str, keep_default_na=False)
    assert got.columns.tolist() == ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "aes"]
    assert got["path"].tolist() == GOOD
    counts = dict(zip(got["path"], got["num_frames"]))
    want = []
    with torch.no_grad():
        for p in got["path"]:
            x = _reference_pixels(folder, media, p[len("../../"):], (0.1, 0.5, 0.9), int(float(counts[p])))
            f = torch.nn.functional.normalize(model.get_image_features(pixel_values=x), dim=-1)
            want.append(float(torch_head(f).mean()))
    aes = got["aes"].astype(float).to_numpy()
    np.testing.assert_allclose(aes, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert np.ptp(aes) > 1e-3 and metrics["score_aesthetic/clips"] == 5
    assert metrics["score_aesthetic/mean"] == pytest.approx(aes.mean(), rel=1e-6)
    failed = pd.read_csv(_out(media, tmp_path).with_name("out_failed.csv"))
    assert sorted(failed["path"]) == ["clips/corrupt.mp4", "clips/missing.mp4"]

    # the second run finds everything scored in its progress log (and retries the two failures only)
    run(_cfg(folder, media, tmp_path, "score_aesthetic", f"task.head_path={head_path}"))
    assert pd.read_csv(_out(media, tmp_path), dtype=str)["aes"].tolist() == got["aes"].tolist()


def test_score_match_matches_clip(clip_folder, media, tmp_path):
    from opensora.tasks.score_match import run

    model, folder = clip_folder
    run(_cfg(folder, media, tmp_path, "score_match", "task.num_workers=1"))
    got = pd.read_csv(_out(media, tmp_path), dtype=str, keep_default_na=False)
    assert got.columns.tolist()[-1] == "match" and got["path"].tolist() == GOOD
    tok = transformers.CLIPTokenizerFast.from_pretrained(folder)
    want = []
    with torch.no_grad():
        for p, t in zip(got["path"], got["text"]):
            x = _reference_pixels(folder, media, p[len("../../"):], (0.5,))  # the middle of the video's own count
            ids = tok([t], padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, pixel_values=x)
            want.append(float(out.logits_per_image[0, 0]))  # logit_scale.exp() * cos
    match = got["match"].astype(float).to_numpy()
    np.testing.assert_allclose(match, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert match[0] != match[-1]  # one video, two captions: two scores


def test_scoring_errors_name_the_column_file_and_key(clip_folder, head, media, tmp_path):
    from opensora.tasks import score_aesthetic, score_match

    _, folder = clip_folder
    _, head_path = head
    (tmp_path / "nopath.csv").write_text("file,text\na.mp4,a cat\n")
    (tmp_path / "notext.csv").write_text("path,fps\na.mp4,24\n")
    with pytest.raises(ValueError, match=r"no 'path' \(or 'video'\) column; it has: file, text"):
        score_aesthetic.run(_cfg(folder, media, tmp_path, "score_aesthetic", f"task.head_path={head_path}",
                                 f"task.csv_path={tmp_path / 'nopath.csv'}"))
    with pytest.raises(ValueError, match=r"no column 'text' \(needed for task=score_match .*\): run a captioner"):
        score_match.run(_cfg(folder, media, tmp_path, "score_match", f"task.csv_path={tmp_path / 'notext.csv'}"))
    # missing files and folders are named, with their keys, before anything runs
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tmp_path / "noclip", media, tmp_path, "score_aesthetic", f"task.head_path={tmp_path / 'h.pth'}",
                      f"task.csv_path={tmp_path / 'none.csv'}"))
    text = str(err.value)
    assert "task.csv_path=" in text and "none.csv: no such file" in text
    assert "task.head_path=" in text and "h.pth: no such file" in text
    assert "clip.from_pretrained=" in text and "noclip does not exist" in text
    validate(_cfg(folder, media, tmp_path, "score_match"))  # a good config passes
    # a head for other embeddings than this CLIP's
    torch.save(TorchHead((8, 4, 4, 4, 4, 1)).state_dict(), tmp_path / "small_head.pth")
    with pytest.raises(ValueError, match="takes 8-d embeddings.*gives 20-d"):
        score_aesthetic.run(_cfg(folder, media, tmp_path, "score_aesthetic",
                                 f"task.head_path={tmp_path / 'small_head.pth'}"))
