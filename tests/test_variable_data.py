"""Variable-size video-text data (opensora/data/variable.py) and its bucketed loader (opensora/data/bucket_loader.py)
on real mp4 files and images: the CSV's size columns required (the message names task=scan_videos), 1.1's
resize-crop against torch, images one frame at fps 120, frames sampled over T * frame_interval, the size
conditioning conventions, bad files replaced from their own bucket, two ranks' micro-batches, exact resume."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import frame_ids, grey_clip, write_mp4
from opensora.data.bucket_loader import BucketBatchLoader
from opensora.data.loader import BadSampleError
from opensora.data.sampler import PlanRecords
from opensora.data.variable import SampleKey, VariableVideoTextDataset
from opensora.data.video import resize_crop_to_fill

RES = {"px16": {"pixels": 256, "ratios": {"0.75": [12, 16], "1.00": [16, 16], "1.33": [16, 12]}},
       "px8": {"pixels": 64, "ratios": {"1.00": [8, 8]}}}
BUCKETS = {"px16": {1: [1.0, 1], 4: [1.0, 1]}, "px8": {1: [1.0, 2], 4: [1.0, 2]}}
# name: (frames, height, width, fps); images have 1 frame
FILES = {"a.mp4": (20, 24, 32, 30), "b.mp4": (26, 16, 16, 24), "c.mp4": (40, 18, 24, 25), "d.mp4": (16, 8, 8, 24),
         "e.mp4": (30, 32, 24, 30), "f.mp4": (14, 12, 16, 24), "p.png": (1, 16, 16, 0), "q.png": (1, 30, 40, 0),
         "r.png": (1, 9, 9, 0), "s.png": (1, 20, 15, 0)}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("variable")
    rng = np.random.default_rng(0)
    rows = []
    for name, (t, h, w, fps) in FILES.items():
        if name.endswith(".mp4"):
            write_mp4(root / name, grey_clip(t, h, w), fps)
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / name)
        rows.append((name, f"caption of {name}", t, h, w, h / w, fps or 120))
    pd.DataFrame(rows, columns=["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]).to_csv(
        root / "videos.csv", index=False)
    return root


def dataset(root, **kw) -> VariableVideoTextDataset:
    return VariableVideoTextDataset(str(root / "videos.csv"), frame_interval=3, seed=5, **kw)


def test_a_csv_without_sizes_names_scan_videos(tmp_path):
    (tmp_path / "c.csv").write_text("video,caption\na.mp4,a clip\n")
    with pytest.raises(ValueError, match=r"no column\(s\) num_frames, height, width.*task=scan_videos"):
        VariableVideoTextDataset(str(tmp_path / "c.csv"))


@pytest.mark.parametrize("shape,size", [((2, 24, 32), (12, 16)), ((3, 18, 24), (16, 16)), ((1, 30, 20), (16, 12)),
                                        ((2, 240, 426), (144, 256)), ((1, 720, 1280), (416, 554)),
                                        ((2, 10, 10), (16, 12))])
def test_resize_crop_to_fill_matches_torch(shape, size):
    """Against v1.1.0's resize_crop_to_fill written with torch (interpolate(size=(sh, sw)), bilinear,
    align_corners=False, the longer-scaled side round(side * scale), crop at int(round(sw - tw) / 2.0)).
    Both form the source coordinates in float32; tolerance 1e-5 of the [-1, 1] range (the blend of the two taps
    is summed in another order)."""
    torch = pytest.importorskip("torch")
    frames = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    h, w = shape[1:]
    th, tw = size
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        i, j = 0, int(round(sw - tw) / 2.0)
    else:
        sh, sw = round(h * rw), tw
        i, j = int(round(sh - th) / 2.0), 0
    x = torch.nn.functional.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
    ref = ((x[..., i:i + th, j:j + tw] - 0.5) / 0.5).permute(0, 2, 3, 1).numpy()
    out = resize_crop_to_fill(frames, size)
    assert out.shape == ref.shape == (shape[0], th, tw, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_video_item_frames_sizes_and_conditions(media):
    ds = dataset(media)
    row = ds.videos.index("c.mp4")  # 40 frames of 18x24 at 25 fps
    key = SampleKey(row, 4, 12, 16)
    item = ds.load(key, epoch=2)
    assert item["video"].shape == (3, 4, 12, 16) and item["video"].dtype == np.float32
    assert item["caption"] == "caption of c.mp4"
    # the frames are those of Open-Sora's window: linspace over 4 * 3 frames at a start drawn for (seed, epoch, row)
    start = np.random.default_rng([5, 2, row, 0]).integers(0, 40 - 12 - 1 + 1)
    want = np.linspace(start, start + 11, 4, dtype=int)
    grey = (item["video"][0].mean(axis=(1, 2)) + 1) * 127.5  # grey level of each frame
    assert frame_ids(np.repeat(grey[:, None, None, None], 3, -1).astype(np.uint8)) == want.tolist()
    # v1.1.0's conditions: the bucket's size, ar = W / H, the container's fps
    assert (item["num_frames"], item["height"], item["width"]) == (4, 12, 16)
    assert item["ar"] == pytest.approx(16 / 12) and item["fps"] == pytest.approx(25.0)
    fixed = dataset(media, ar_condition="height/width", fps_condition="video/interval").load(key, 2)
    assert fixed["ar"] == pytest.approx(12 / 16) and fixed["fps"] == 8.0  # 25 // 3


def test_image_item_is_one_frame_at_fps_120(media):
    from PIL import Image

    ds = dataset(media, fps_condition="video/interval")
    row = ds.videos.index("q.png")  # 30x40 -> 12x16: scale 0.4 both ways, no crop
    item = ds.load(SampleKey(row, 1, 12, 16))
    assert item["video"].shape == (3, 1, 12, 16) and item["fps"] == 120.0
    with Image.open(media / "q.png") as im:
        want = np.asarray(im.convert("RGB").resize((16, 12), Image.BICUBIC), np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(item["video"][:, 0].transpose(1, 2, 0), want, atol=1e-6)
    # 20x15 (portrait) -> 16x16: height scale 0.8 < width scale 16/15: resized 21x16, rows from round(5 / 2) = 2
    row = ds.videos.index("s.png")
    with Image.open(media / "s.png") as im:
        want = np.asarray(im.convert("RGB").resize((16, 21), Image.BICUBIC), np.float32)[2:18] / 127.5 - 1.0
    np.testing.assert_allclose(ds.load(SampleKey(row, 1, 16, 16))["video"][:, 0].transpose(1, 2, 0), want, atol=1e-6)


def test_bad_samples_raise_naming_the_file(media, tmp_path):
    ds = dataset(media)
    with pytest.raises(BadSampleError, match="d.mp4: too short for 32 frames"):  # it has 16
        ds.load(SampleKey(ds.videos.index("d.mp4"), 32, 8, 8))
    with pytest.raises(TypeError, match="SampleKey"):
        ds.load(3)


def loader(media, rank=0, ranks=1, **kw) -> BucketBatchLoader:
    return BucketBatchLoader(dataset(media), BUCKETS, 3, seed=1, rank=rank, ranks=ranks, resolutions=RES,
                             max_bad_fraction=None, **kw)


def shapes(step) -> list:
    return [tuple(mb["video"].shape) for mb in step.micro_batches]


def test_two_ranks_train_their_slots_of_every_step(media):
    l0, l1 = loader(media, 0, 2), loader(media, 1, 2)
    plan = l0.plan()
    assert plan.num_steps >= 2
    seen = []
    for (s0, s1, step) in zip(iter(l0), iter(l1), plan.steps):
        assert s0.slot_keys == s1.slot_keys and (s0.first_slot, s1.first_slot) == (0, 1)
        for got, mb in zip((s0, s1), step):
            t, h, w = l0.sampler.bucket.get_thw(mb.bucket)
            assert shapes(got) == [(len(mb.rows), 3, t, h, w)]
            assert got.micro_batches[0]["caption"] == [f"caption of {l0.dataset.videos[r]}" for r in mb.rows]
            seen.extend(mb.rows.tolist())
        if l0.position == plan.num_steps:
            break
    assert len(seen) == len(set(seen)) == sum(plan.trained().values())


def test_resume_mid_epoch_is_exact_and_accumulation_takes_consecutive_slots(media, tmp_path):
    a = loader(media, micro_batches=2, records=PlanRecords(tmp_path))
    it = iter(a)
    next(it)
    state = a.state()
    want = [shapes(next(it)) for _ in range(2)]
    b = loader(media, micro_batches=2, records=PlanRecords(tmp_path))
    b.load_state(state)
    assert [shapes(s) for s, _ in zip(iter(b), range(2))] == want
    step = next(iter(b))
    assert len(step.micro_batches) == 2 and step.first_slot == 0 and len(step.slot_keys) == 2


def test_a_bad_file_is_replaced_by_a_sample_of_its_bucket(media, tmp_path):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(media, root)
    (root / "b.mp4").write_bytes(b"not a video")
    l = loader(root)
    for step in l.plan().steps:  # find the micro-batch holding b.mp4
        if l.dataset.videos.index("b.mp4") in step[0].rows:
            break
    batches = iter(l)
    for _ in range(l.plan().steps.index(step) + 1):
        got = next(batches)
    t, h, w = l.sampler.bucket.get_thw(step[0].bucket)
    assert shapes(got) == [(len(step[0].rows), 3, t, h, w)]
    assert "caption of b.mp4" not in got.micro_batches[0]["caption"]
    assert l.num_bad_samples == 1 and str(root / "b.mp4") in l.bad_samples
