"""The data-processing recipe of the README end to end through the real CLI, on generated raw videos with
hard cuts at known frames and known camera motion:

    scan_videos -> scene_detect -> scene_cut -> datautil (info) -> camera_motion -> flow_score
    -> datautil (filters, captions) -> train

Raw videos (made by helpers.scenes_video):
  a.mp4  24 fps, 64 x 48: pan right 48 frames | tilt up 60 | zoom in 52 | static 50   (cuts at 48, 108, 160)
  b.mp4  30 fps, 80 x 60: pan left 60 frames | zoom out 60 | static 20                (cuts at 60, 120)
  bad.mp4 not a video.
Cut at 24 fps, shorter side 48, scenes under 1.5 s dropped, longer than 2.25 s cut to 2.25 s.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import run_cli, scenes_video

pytestmark = pytest.mark.slow

TRAIN = ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]
A = ([48, 60, 52, 50], ["pan right", "tilt up", "zoom in", "static"])
B = ([60, 60, 20], ["pan left", "zoom out", "static"])
# clip -> (frames at 24 fps, camera motion)
CLIPS = {"a_scene-0.mp4": (48, "pan right"), "a_scene-1.mp4": (54, "tilt up"), "a_scene-2.mp4": (52, "zoom in"),
         "a_scene-3.mp4": (50, "static"), "b_scene-0.mp4": (48, "pan left"), "b_scene-1.mp4": (48, "zoom out")}
CAPTIONS = {"a.mp4": "A <b>sunny</b> day in the city https://example.com", "b.mp4": "a walk in the park",
            "bad.mp4": "a broken file"}


def frames_of(timecodes, fps):
    from opensora.data.scenes import parse_timestamp, timecode_frames

    return [(timecode_frames(s, fps), timecode_frames(e, fps)) for s, e in parse_timestamp(timecodes)]


def test_pipeline_recipe_from_raw_videos_to_training(tmp_path):
    raw = tmp_path / "raw"
    scenes_video(raw / "a.mp4", *A, fps=24, seed=10)
    scenes_video(raw / "b.mp4", *B, fps=30, h=60, w=80, seed=20)
    (raw / "bad.mp4").write_bytes(b"\x00" * 2000)
    pd.DataFrame({"video": list(CAPTIONS), "caption": list(CAPTIONS.values())}).to_csv(raw / "videos.csv",
                                                                                       index=False)

    def run(*args, **kw):
        return run_cli([*args, "logger=none", f"hydra.run.dir={tmp_path / 'runs' / args[0].split('=')[1]}"],
                       tmp_path, **kw)

    # 1. measure the raw videos, keep the readable ones (the bad file is counted, not fatal)
    proc = run("task=scan_videos", "task.csv_path=raw/videos.csv", "task.output_csv=raw/meta.csv")
    assert "1 unreadable" in proc.stdout + proc.stderr
    meta = pd.read_csv(raw / "meta.csv")
    assert list(meta.columns) == TRAIN and meta["path"].tolist() == ["a.mp4", "b.mp4"]

    # 2. scenes: every cut within 1 frame of where it was made
    run("task=scene_detect", "task.csv_path=raw/meta.csv")
    ts = pd.read_csv(raw / "meta_timestamp.csv").set_index("path")
    for name, (lengths, _), fps in (("a.mp4", A, 24), ("b.mp4", B, 30)):
        bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        found = frames_of(ts.loc[name, "timestamp"], fps)
        assert len(found) == len(lengths), (name, found)
        for (s, e), ref_s, ref_e in zip(found, bounds[:-1], bounds[1:]):
            assert abs(s - ref_s) <= 1 and abs(e - ref_e) <= 1, (name, found)

    # 3. cut: 24 fps, shorter side 48, 1.5 s <= scene, at most 2.25 s
    run("task=scene_cut", "task.csv_path=raw/meta_timestamp.csv", "task.min_seconds=1.5", "task.max_seconds=2.25",
        "task.target_fps=24", "task.shorter_size=48")
    clips = pd.read_csv(raw / "meta_timestamp_clips.csv")
    assert list(clips.columns[:7]) == TRAIN
    assert clips["path"].tolist() == [f"meta_timestamp_clips/{c}" for c in CLIPS]
    assert clips["num_frames"].tolist() == [n for n, _ in CLIPS.values()]
    assert (clips["height"] == 48).all() and (clips["width"] == 64).all() and (clips["fps"] == 24).all()
    assert clips["text"].tolist() == [CAPTIONS["a.mp4"]] * 4 + [CAPTIONS["b.mp4"]] * 2
    assert clips["source"].tolist() == ["a.mp4"] * 4 + ["b.mp4"] * 2
    # resume: the log says every video is done, nothing is cut again
    before = {p: (raw / p).stat().st_mtime_ns for p in clips["path"]}
    proc = run("task=scene_cut", "task.csv_path=raw/meta_timestamp.csv", "task.min_seconds=1.5",
               "task.max_seconds=2.25", "task.target_fps=24", "task.shorter_size=48")
    assert "2 of 2 rows already done" in proc.stdout + proc.stderr
    assert before == {p: (raw / p).stat().st_mtime_ns for p in clips["path"]}

    # 4. info of the clips, as the original's `datautil --info --fmin 1`
    run("task=datautil", "task.csv_path=raw/meta_timestamp_clips.csv", "task.info=all", "task.fmin=1")
    info = pd.read_csv(raw / "meta_timestamp_clips_info_fmin1.csv")
    pd.testing.assert_frame_equal(info[TRAIN], clips[TRAIN])

    # 5. camera motion: the label each scene was made with
    run("task=camera_motion", "task.csv_path=raw/meta_timestamp_clips_info_fmin1.csv")
    cm_csv = raw / "meta_timestamp_clips_info_fmin1_cmotion.csv"
    cm = pd.read_csv(cm_csv)
    assert cm["cmotion"].tolist() == [m for _, m in CLIPS.values()]
    # a kill after 5 of 6 clips (last record removed): the rerun computes one clip and writes the same CSV
    log = cm_csv.with_name(cm_csv.name + ".progress.jsonl")
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    proc = run("task=camera_motion", "task.csv_path=raw/meta_timestamp_clips_info_fmin1.csv")
    assert "5 of 6 rows already done" in proc.stdout + proc.stderr
    pd.testing.assert_frame_equal(pd.read_csv(cm_csv), cm)

    # 6. flow score (at the clips' own size: these smooth 64 x 48 textures upscaled 6.7x to 320 x 576 are too
    # flat for Farneback's polynomial fit, see the README); the static clip scores ~0
    run("task=flow_score", f"task.csv_path={cm_csv.relative_to(tmp_path)}", "task.size=[48,64]")
    flow = pd.read_csv(raw / "meta_timestamp_clips_info_fmin1_cmotion_flow.csv").set_index("cmotion")["flow"]
    assert flow["static"] < 0.05 and (flow.drop("static") > 0.5).all(), flow

    # 7. filter and clean: static clips out, captions cleaned with the camera motion appended
    run("task=datautil", "task.csv_path=raw/meta_timestamp_clips_info_fmin1_cmotion_flow.csv", "task.flowmin=0.3",
        "task.merge_cmotion=true", "task.clean_caption=true", "task.remove_empty_caption=true",
        "task.remove_url=false", "task.output_csv=train.csv")
    final = pd.read_csv(tmp_path / "train.csv")
    from opensora.data.datautil import merge_cmotion
    from opensora.text_encoder.clean import text_preprocessing

    moving = [(c, m) for c, (_, m) in CLIPS.items() if m != "static"]
    assert list(final.columns[:7]) == TRAIN
    assert final["path"].tolist() == [f"raw/meta_timestamp_clips/{c}" for c, _ in moving]  # relative to train.csv
    assert final["cmotion"].tolist() == [m for _, m in moving]
    texts = [CAPTIONS["a.mp4"]] * 3 + [CAPTIONS["b.mp4"]] * 2
    assert final["text"].tolist() == [text_preprocessing(merge_cmotion(t, m)) for t, (_, m) in zip(texts, moving)]
    assert final["text"][0] == "a sunny day in the city the camera is panning right."
    assert (final[["num_frames", "height", "width", "fps"]].values == clips[clips["path"].isin(
        [f"meta_timestamp_clips/{c}" for c, _ in moving])][["num_frames", "height", "width", "fps"]].values).all()

    # 8. it trains as it is
    run_dir = tmp_path / "runs" / "train"
    proc = run_cli(["task=train", "model=stdit_tiny", "data=video_csv", "data.csv_path=train.csv",
                    "data.num_frames=4", "data.frame_interval=2", "data.image_size=16", "data.batch_size=2",
                    "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "task.max_steps=2",
                    "task.ckpt_every=2", "task.eval=null", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path)
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["data"]["position"] == 4 and state["data"].get("num_bad_samples", 0) == 0
    assert "bad sample" not in proc.stdout + proc.stderr
