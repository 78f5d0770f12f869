"""The weight-free data tools on clips generated in tmp_path: scene detection (cuts at known frames),
cutting (durations, sizes, frame-accurate starts), camera-motion labels of generated pans / tilts /
zooms / static shots, the Farneback flow score, the resumable per-row runner and the table utilities.

Clips come from helpers.camera_clip: a smooth random texture seen through a moving 64 x 48 window.
"""
from __future__ import annotations

import json

import mindspore as ms  # noqa: F401 - before decord (see opensora.utils.video_io)
import numpy as np
import pandas as pd
import pytest

from helpers import MOTIONS, camera_clip, compose_cfg, scenes_video, texture
from opensora.utils.video_io import read_video, save_video

# ================================================================
# Scene detection and cutting
# ================================================================


@pytest.fixture(scope="module")
def cuts_video(tmp_path_factory):
    """174 frames at 24 fps, cuts at frames 30, 70 and 125 (none on a whole second)."""
    path = tmp_path_factory.mktemp("scenes") / "cuts.mp4"
    return scenes_video(path, [30, 40, 55, 49], ["pan right", "static", "zoom in", "tilt up"])


def test_scene_detection_finds_cuts_within_one_frame(cuts_video):
    from opensora.data.scenes import detect_scenes, format_timestamp, parse_timestamp, timecode_frames

    scenes = detect_scenes(str(cuts_video))
    frames = [(timecode_frames(s, 24), timecode_frames(e, 24)) for s, e in scenes]
    assert len(frames) == 4, scenes
    for (start, end), (ref_start, ref_end) in zip(frames, [(0, 30), (30, 70), (70, 125), (125, 174)]):
        assert abs(start - ref_start) <= 1 and abs(end - ref_end) <= 1, frames
    cell = format_timestamp(scenes)
    assert cell.startswith("[('00:00:00.000', '00:00:01.2") and parse_timestamp(cell) == scenes


def test_a_video_without_cuts_is_one_scene(tmp_path):
    from opensora.data.scenes import detect_scenes

    path = scenes_video(tmp_path / "one.mp4", [40], ["pan left"])
    assert detect_scenes(str(path)) == [("00:00:00.000", "00:00:01.667")]  # start_in_scene=True
    assert detect_scenes(str(path), start_in_scene=False) == []


def test_timestamp_parsing_refuses_code_and_junk():
    from opensora.data.scenes import parse_timestamp

    for bad in ["__import__('os').getcwd()", "[('00:00:00.000',)]", "", "[1, 2]", "nan"]:
        with pytest.raises(ValueError, match="not a list of"):
            parse_timestamp(bad)


def test_cut_plan_is_frame_exact_with_min_and_max_seconds():
    from opensora.data.scenes import plan_cuts

    scenes = [("00:00:00.000", "00:00:01.250"), ("00:00:01.250", "00:00:02.917"), ("00:00:02.917", "00:00:05.208")]
    # the original reads these at 1 fps (1.25 s -> 1 s, 2.917 s -> 3 s); here they fall on frames 30, 70, 125
    assert plan_cuts(scenes, 24) == [(0, 0, 30), (1, 30, 40), (2, 70, 55)]
    assert plan_cuts(scenes, 24, min_seconds=1.5) == [(1, 30, 40), (2, 70, 55)]
    assert plan_cuts(scenes, 24, max_seconds=1.5) == [(0, 0, 30), (1, 30, 36), (2, 70, 36)]


def test_scale_filter_keeps_even_sizes_and_refuses_odd():
    from opensora.data.scenes import scale_filter

    assert scale_filter(720) == "scale='if(gt(iw,ih),-2,720)':'if(gt(iw,ih),720,-2)'"  # the original's
    with pytest.raises(ValueError, match="shorter_size=33 must be a positive even number"):
        scale_filter(33)


@pytest.mark.parametrize("opts, frames, size", [
    (dict(target_fps=None, shorter_size=None), [40, 55, 49], (48, 64)),
    (dict(target_fps=12, shorter_size=32), [20, 28, 25], (32, 42)),           # 64 * 32 / 48 = 42.7 -> even 42
    (dict(target_fps=None, shorter_size=720, upscale=False), [40, 55, 49], (48, 64)),
    (dict(target_fps=None, shorter_size=96, max_seconds=2.0), [40, 48, 48], (96, 128)),
])
def test_cut_clips_have_the_planned_frames_and_sizes(cuts_video, tmp_path, opts, frames, size):
    from opensora.data.media_info import probe
    from opensora.data.scenes import cut_scenes, detect_scenes

    scenes = detect_scenes(str(cuts_video))
    clips = cut_scenes(str(cuts_video), "cuts.mp4", scenes, 24.0, str(tmp_path), min_seconds=1.5, **opts)
    assert [c["clip"] for c in clips] == ["cuts_scene-1.mp4", "cuts_scene-2.mp4", "cuts_scene-3.mp4"]  # 0: 1.25 s
    for clip, n in zip(clips, frames):
        info = probe(str(tmp_path / clip["clip"]))
        assert (info["num_frames"], info["height"], info["width"]) == (n, *size)
        assert info["fps"] == pytest.approx(opts["target_fps"] or 24)
    assert (clips[0]["scene_start"], clips[1]["scene_start"]) == (pytest.approx(30 / 24), pytest.approx(70 / 24))
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_cut_starts_on_the_cut_frame(cuts_video, tmp_path):
    """Each clip's first frame is the source's first frame of the scene (H.264 both sides: within a few grey
    levels), not the frame before (another texture: tens of levels away)."""
    from opensora.data.scenes import cut_scenes, detect_scenes

    source = read_video(cuts_video).astype(np.float32)
    clips = cut_scenes(str(cuts_video), "cuts.mp4", detect_scenes(str(cuts_video)), 24.0, str(tmp_path),
                       target_fps=None, shorter_size=None)
    for clip, start in zip(clips, [0, 30, 70, 125]):
        first = read_video(tmp_path / clip["clip"])[0].astype(np.float32)
        assert np.abs(first - source[start]).mean() < 3
        if start:
            assert np.abs(first - source[start - 1]).mean() > 15


def test_portrait_clip_scales_its_width(tmp_path):
    from opensora.data.media_info import probe
    from opensora.data.scenes import cut_scenes

    path = scenes_video(tmp_path / "tall.mp4", [30], ["static"], h=64, w=48)
    (clip,) = cut_scenes(str(path), "tall.mp4", [("00:00:00.000", "00:00:01.250")], 24.0, str(tmp_path / "c"),
                         target_fps=None, shorter_size=32)
    info = probe(str(tmp_path / "c" / clip["clip"]))
    assert (info["height"], info["width"], info["num_frames"]) == (42, 32, 30)


# ================================================================
# Camera motion
# ================================================================


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_camera_motion_labels_generated_clips(motion, tmp_path):
    from opensora.data.motion import camera_motion

    path = save_video(camera_clip(7, 48, **MOTIONS[motion]), tmp_path / "clip.mp4", fps=24)
    assert camera_motion(path)["cmotion"] == motion


def test_the_originals_first_frame_reference_loses_pans(tmp_path):
    """Why reference="previous" is the default: against frame 0 the displacement grows to 13.5 px by frame 45
    and the labels break (the original's code), while consecutive sampled frames stay at 4.5 px."""
    from opensora.data.motion import camera_motion

    path = save_video(camera_clip(7, 48, **MOTIONS["pan left"]), tmp_path / "clip.mp4", fps=24)
    assert camera_motion(path, reference="previous")["cmotion"] == "pan left"
    assert camera_motion(path, reference="first")["cmotion"] != "pan left"


def test_short_clip_is_unknown(tmp_path):
    from opensora.data.motion import camera_motion

    path = save_video(camera_clip(7, 15, **MOTIONS["pan left"]), tmp_path / "clip.mp4", fps=24)
    assert camera_motion(path)["cmotion"] == "unknown"  # one sampled frame, no pair (the original: "pan/tilt")


def test_pair_labels_and_vote_follow_the_original_thresholds():
    from opensora.data.motion import pair_motion, vote

    assert pair_motion(0.99, 0, 0.5) == "static" and pair_motion(1.0, 0, 0.5) == "pan left"
    assert pair_motion(2, 0, 0.39) == "zoom out" and pair_motion(2, 0, 0.61) == "zoom in"
    assert pair_motion(2, 0, 0.4) == "pan left" and pair_motion(2, 0, 0.6) == "pan left"
    assert [pair_motion(2, a, 0.5) for a in (44.9, 45, 134.9, 135, 224.9, 225, 314.9, 315, 359.9)] == [
        "pan left", "tilt up", "tilt up", "pan right", "pan right", "tilt down", "tilt down", "pan left", "pan left"]
    assert pair_motion(2, float("nan"), 0.5) == "unknown"
    assert vote(["pan left", "pan left", "static"]) == "pan left"
    assert vote(["pan left", "static"]) == "unknown"  # no majority, a static pair
    assert vote(["pan left", "tilt up"]) == "pan/tilt"  # no majority, no zoom
    assert vote(["pan left", "zoom in"]) == "dynamic"
    assert vote([]) == "unknown"


def test_zoom_in_factor_by_hand():
    from opensora.data.motion import zoom_in_factor

    h, w = 8, 10
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    assert zoom_in_factor(np.zeros((h, w, 2), np.float32)) == 1.0  # zero flow counts as ">="
    outward = np.stack([(xs - w / 2) * 0.1, (ys - h / 2) * 0.1], -1)
    assert zoom_in_factor(outward) == 1.0
    assert zoom_in_factor(-outward) == pytest.approx(1 / (h * w))  # only the centre pixel (distance 0) stays
    shift = np.zeros((h, w, 2), np.float32)
    shift[..., 0] = 1.0  # moving right by 1: pixels with x - w/2 >= -0.5 get farther, i.e. columns 5..9
    assert zoom_in_factor(shift) == pytest.approx(5 / 10)


# ================================================================
# Flow score
# ================================================================


def test_resize_matches_torch_align_corners():
    torch = pytest.importorskip("torch")
    from opensora.data.motion import resize_align_corners

    x = np.random.default_rng(0).random((37, 101)).astype(np.float32) * 255
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(320, 576), mode="bilinear",
                                          align_corners=True)[0, 0].numpy()
    # torch computes the source coordinates in fp32, scipy in fp64: ~1e-3 on the 255 scale (4e-6 relative)
    np.testing.assert_allclose(resize_align_corners(x, (320, 576)), ref, rtol=0, atol=5e-3)


@pytest.fixture(scope="module")
def flow_clips(tmp_path_factory):
    """31-frame clips at the scorer's own size (576 x 320; no resize): static, a 0.5 px/frame pan, the same
    scene transposed (a portrait tilt), and a 21-frame pan."""
    root = tmp_path_factory.mktemp("flow")
    pan = camera_clip(3, 31, 320, 576, dx=0.5)
    return {"static": save_video(camera_clip(3, 31, 320, 576), root / "static.mp4", fps=24),
            "pan": save_video(pan, root / "pan.mp4", fps=24),
            "portrait": save_video(pan.transpose(0, 2, 1, 3), root / "portrait.mp4", fps=24),
            "short": save_video(pan[:21], root / "short.mp4", fps=24)}


def test_flow_score_measures_the_motion(flow_clips):
    """A 0.5 px/frame pan moves 5 px between frames 10 apart: |dx| = 5, dy = 0, so the mean |flow component|
    is 2.5 (Farneback reads ~5% less near the borders: 10% tolerance). Portrait frames are transposed, so the
    transposed clip scores the same. A 21-frame clip reads frame 20 twice (indices clamped): 2 of 3 pairs move."""
    from opensora.data.motion import flow_score

    scores = {k: flow_score(str(p))["flow"] for k, p in flow_clips.items()}
    assert scores["static"] < 0.05
    assert scores["pan"] == pytest.approx(2.5, rel=0.1)
    assert scores["portrait"] == pytest.approx(scores["pan"], rel=0.02)
    assert scores["short"] == pytest.approx(scores["pan"] * 2 / 3, rel=0.05)


# ================================================================
# Measuring, the resumable runner, tables
# ================================================================


def test_images_are_one_frame_at_120_fps_without_motion_or_scenes(tmp_path):
    from PIL import Image

    from opensora.data.media_info import probe
    from opensora.data.motion import camera_motion, flow_score
    from opensora.data.scenes import detect_scenes

    Image.fromarray(texture(0, 30, 50)).save(tmp_path / "a.png")
    info = probe(str(tmp_path / "a.png"))
    assert (info["num_frames"], info["height"], info["width"], info["fps"]) == (1, 30, 50, 120.0)
    assert info["aspect_ratio"] == pytest.approx(30 / 50)
    assert camera_motion(str(tmp_path / "a.png")) == {"cmotion": "unknown"}
    assert flow_score(str(tmp_path / "a.png")) == {"flow": 0.0}
    with pytest.raises(ValueError, match="an image, not a video"):
        detect_scenes(str(tmp_path / "a.png"))


CALLS: list = []


def _square(x):
    CALLS.append(x)
    if x == 3:
        raise ValueError("three is bad")
    return {"sq": x * x}


def test_map_rows_resumes_after_a_kill_and_refuses_other_settings(tmp_path):
    from opensora.data.resumable import map_rows, progress_path

    out = tmp_path / "out.csv"
    keys = ["a", "b", "c", "d", "b"]
    items = [1, 2, 3, 4, 2]
    CALLS.clear()
    res = map_rows(_square, keys, items, out, {"k": 1})
    assert res == {"a": (True, {"sq": 1}, ""), "b": (True, {"sq": 4}, ""),
                   "c": (False, None, "ValueError: three is bad"), "d": (True, {"sq": 16}, "")}
    assert CALLS == [1, 2, 3, 4]  # a repeated key is computed once
    log = progress_path(out)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:7])  # killed while writing row c: a, b done
    CALLS.clear()
    res = map_rows(_square, keys, items, out, {"k": 1})
    assert CALLS == [3, 4] and res["d"] == (True, {"sq": 16}, "")  # the failed row is tried again
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the cut-off line is gone
    CALLS.clear()
    map_rows(_square, keys, items, out, {"k": 1})
    assert CALLS == [3]
    with pytest.raises(ValueError, match=r"other settings \(k: log 1 vs now 2\).*delete it"):
        map_rows(_square, keys, items, out, {"k": 2})


def test_read_table_names_and_training_order(tmp_path):
    from opensora.data.table import read_table, require_columns, training_order

    (tmp_path / "a.csv").write_text("fps,caption,video,aes\n24,a cat,x.mp4,5.5\n30,,y.mp4,4\n")
    df = read_table(tmp_path / "a.csv")
    assert list(training_order(df).columns) == ["path", "text", "fps", "aes"] and df["text"].tolist() == ["a cat", ""]
    with pytest.raises(ValueError, match=r"no column 'match' \(needed for task.matchmin\): run task=score_match"):
        require_columns(df, ["match"], tmp_path / "a.csv", "task.matchmin")
    with pytest.raises(FileNotFoundError, match="task.csv_path=.*nope.csv does not exist"):
        read_table(tmp_path / "nope.csv")


def test_datautil_operations():
    from opensora.data import datautil as du

    a = pd.DataFrame({"path": ["x", "y", "z"], "text": ["one", " ", "three"], "num_frames": [10, 20, 30]})
    b = pd.DataFrame({"path": ["y", "z", "w"], "text": ["Y", "Z", "W"], "height": [48, 96, 10], "width": [64, 128, 10]})
    assert du.difference(a, b)["path"].tolist() == ["x"]
    inter = du.intersection(a, b)
    assert inter.to_dict("list") == {"path": ["y", "z"], "text": [" ", "three"], "num_frames": [20, 30],
                                     "height": [48, 96], "width": [64, 128]}  # a's text kept, b's sizes added
    assert du.empty_text(a["text"]).tolist() == [False, True, False]
    assert [len(s) for s in du.shard(pd.concat([a] * 3), 4)] == [3, 2, 2, 2]
    kept, removed = du.filter_rows(inter, "t.csv", fmin=25, hwmin=None, hwmax=96 * 128)
    assert kept["path"].tolist() == ["z"] and removed == {"fmin": 1, "hwmax": 0}
    kept, removed = du.filter_rows(inter, "t.csv", hwmax=96 * 128 - 1)
    assert kept["path"].tolist() == ["y"] and removed == {"hwmax": 1}
    with pytest.raises(ValueError, match=r"no column 'aes' \(needed for task.aesmin\): run task=score_aesthetic"):
        du.filter_rows(a, "t.csv", aesmin=5)
    with pytest.raises(ValueError, match=r"no column 'flow' \(needed for task.flowmin\): run task=flow_score"):
        du.filter_rows(a, "t.csv", flowmin=1)
    assert du.remove_llm_prefix("The video shows a dog running.") == "A dog running."
    assert du.remove_llm_prefix("the image is ") == "" and du.remove_llm_prefix("A cat.") == "A cat."
    assert du.merge_cmotion("A dog.", "pan left") == "A dog. The camera is panning left."
    assert du.merge_cmotion("A dog.", "unknown") == "A dog."
    assert du.relpath(["/data/v/a.mp4"], "/data") == ["v/a.mp4"] and du.abspath(["v/a.mp4"], "/d") == ["/d/v/a.mp4"]
    assert du.has_url(pd.Series(["see https://x.org/a now", "no url"])).tolist() == [True, False]


def test_datautil_task_info_filters_and_names(tmp_path):
    from opensora.tasks.datautil import run

    save_video(camera_clip(0, 20), tmp_path / "v" / "a.mp4", fps=24)
    save_video(camera_clip(1, 40, h=32, w=32), tmp_path / "v" / "b.mp4", fps=12)
    (tmp_path / "v" / "bad.mp4").write_bytes(b"not a video")
    pd.DataFrame({"video": ["v/a.mp4", "v/b.mp4", "v/bad.mp4", "v/a.mp4"],
                  "caption": ["The video shows <b>A</b> clip", "b clip", "bad", "again"],
                  "aes": [6.0, 4.0, 7.0, 6.0]}).to_csv(tmp_path / "meta.csv", index=False)

    def datautil(*overrides):
        cfg = compose_cfg(["task=datautil", f"task.csv_path={tmp_path / 'meta.csv'}", "task.num_workers=0",
                           "logger=none", *overrides], tmp_path / "run")
        return run(cfg)

    assert datautil("task.info=all", "task.fmin=1", "task.remove_path_duplication=true") == {"datautil/rows": 2}
    out = pd.read_csv(tmp_path / "meta_info_noduppath_fmin1.csv")  # the original's naming
    assert list(out.columns) == ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "aes",
                                 "resolution"]
    assert out[["path", "num_frames", "height", "width", "fps"]].values.tolist() == [
        ["v/a.mp4", 20, 48, 64, 24.0], ["v/b.mp4", 40, 32, 32, 12.0]]
    assert out["aspect_ratio"].tolist() == [0.75, 1.0] and out["resolution"].tolist() == [48 * 64, 32 * 32]
    failed = pd.read_csv(tmp_path / "meta_info_noduppath_fmin1_failed.csv")
    assert failed["path"].tolist() == ["v/bad.mp4"] and "unreadable" in failed["error"][0]

    assert datautil("task.aesmin=5", "task.refine_llm_caption=true", "task.clean_caption=true",
                    f"task.output_csv={tmp_path / 'sub' / 'clean.csv'}") == {"datautil/rows": 2}
    clean = pd.read_csv(tmp_path / "sub" / "clean.csv")
    assert clean["path"].tolist() == ["../v/a.mp4", "../v/a.mp4"]  # relative to the output's folder
    assert clean["text"].tolist() == ["a clip", "again"] and clean["num_frames"].tolist() == [20, 20]

    datautil("task.shard=2", "task.info=none")
    assert [len(pd.read_csv(tmp_path / f"meta_{i}.csv")) for i in range(2)] == [2, 2]
    with pytest.raises(ValueError, match="would overwrite an input"):
        datautil("task.info=none")
    with pytest.raises(ValueError, match=r"no column 'match' \(needed for task.matchmin\): run task=score_match"):
        datautil("task.matchmin=20", "task.info=none", "task.output_csv=x.csv")


def test_row_tools_skip_and_list_bad_files_and_name_missing_columns(tmp_path):
    """A missing and a corrupt file are left out of camera_motion's output and listed with their errors;
    the good row gets its size columns measured (the input had none). scene_cut without a timestamp column
    names the task that adds it."""
    from opensora.tasks.camera_motion import run as camera_motion
    from opensora.tasks.scene_cut import run as scene_cut

    save_video(camera_clip(0, 48, **MOTIONS["pan left"]), tmp_path / "good.mp4", fps=24)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 500)
    pd.DataFrame({"path": ["good.mp4", "missing.mp4", "corrupt.mp4"], "text": ["a", "b", "c"]}).to_csv(
        tmp_path / "m.csv", index=False)
    base = [f"task.csv_path={tmp_path / 'm.csv'}", "task.num_workers=0", "logger=none"]
    assert camera_motion(compose_cfg(["task=camera_motion", *base], tmp_path / "run")) == {"camera_motion/clips": 1}
    out = pd.read_csv(tmp_path / "m_cmotion.csv")
    assert out.values.tolist() == [["good.mp4", "a", 48, 48, 64, 0.75, 24.0, "pan left"]]
    failed = pd.read_csv(tmp_path / "m_cmotion_failed.csv")
    assert failed["path"].tolist() == ["missing.mp4", "corrupt.mp4"]
    assert "file not found" in failed["error"][0]
    with pytest.raises(ValueError, match=r"no column 'timestamp' \(needed for task=scene_cut\): run task=scene_detect"):
        scene_cut(compose_cfg(["task=scene_cut", *base], tmp_path / "run"))
