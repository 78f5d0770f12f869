"""The video-text data pipeline on real files made in tmp_path: CSV reading, Open-Sora 1.0 frame sampling,
resize + center crop (against torch's interpolate), bad-sample handling, the loader (workers, sharding,
resume), the embedding caches (round trip, refusal of other settings) and task=scan_videos.

Videos are H.264 mp4s whose frame i is a uniform grey of level 16 + 4 i, so the index of every decoded
frame can be read back from its pixels (H.264 keeps such frames within +-1 level).
"""
from __future__ import annotations

import logging
import os

import mindspore as ms  # noqa: F401 - before decord (see opensora.utils.video_io)
import numpy as np
import pandas as pd
import pytest

from helpers import BAD, VIDEOS, compose_cfg, frame_ids, make_media, still_image
from opensora.data.cache import check_meta, load_text_embedding, read_index, read_meta, text_cache_settings, \
    video_cache_settings
from opensora.data.loader import BadSampleError, BatchLoader, TooManyBadSamples, collate
from opensora.data.video import VideoTextDataset, read_video_csv, resize_crop, resize_crop_geometry, \
    sample_frame_indices

NUM_FRAMES, INTERVAL, SIZE = 8, 3, 32


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return make_media(root)


def dataset(csv, **kw):
    return VideoTextDataset(str(csv), num_frames=kw.pop("num_frames", NUM_FRAMES), frame_interval=INTERVAL,
                            image_size=kw.pop("image_size", SIZE), seed=kw.pop("seed", 3), **kw)


def good_rows(ds):
    return [i for i, v in enumerate(ds.videos) if v not in BAD]


# ================================================================
# CSV
# ================================================================


def test_csv_columns_and_errors_name_row_and_column(tmp_path):
    (tmp_path / "a.csv").write_text("path,text,fps\nx.mp4,a cat,24\ny.png, a dog \n")
    df = read_video_csv(tmp_path / "a.csv")
    assert df["video"].tolist() == ["x.mp4", "y.png"] and df["caption"].tolist() == ["a cat", "a dog"]
    (tmp_path / "b.csv").write_text("video,text\nx.mp4,a cat\n")
    with pytest.raises(ValueError, match=r"b\.csv: missing column\(s\) caption.*video,caption.*has: video, text"):
        read_video_csv(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("video,caption\nx.mp4,a cat\ny.mp4,\nz.mp4,a dog\n")
    with pytest.raises(ValueError, match=r"c\.csv: empty 'caption' in row 2 \(line 3 of the file"):
        read_video_csv(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("path,text\nx.mp4,a\n  ,b\n")
    with pytest.raises(ValueError, match=r"empty 'path' in row 2"):
        read_video_csv(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="data.csv_path=.*nope.csv does not exist"):
        read_video_csv(tmp_path / "nope.csv")


# ================================================================
# Frame sampling and transforms
# ================================================================


class FixedStart:
    """An RNG stub whose integers(lo, hi) returns `start` and records the range asked for."""

    def __init__(self, start):
        self.start, self.asked = start, None

    def integers(self, lo, hi):
        self.asked = (lo, hi)
        return self.start


def test_frame_indices_follow_open_sora_1_0():
    rng = FixedStart(5)
    # 100 frames, 16 x interval 3: window 48, start in [0, 100 - 48 - 1] (randint inclusive), linspace(5, 52, 16)
    assert sample_frame_indices(100, 16, 3, rng).tolist() == [5, 8, 11, 14, 17, 20, 23, 26, 30, 33, 36, 39, 42,
                                                               45, 48, 52]
    assert rng.asked == (0, 52)
    # shorter than the window: start 0, the window is cut at the end (linspace(0, 19, 16))
    assert sample_frame_indices(20, 16, 3, FixedStart(0)).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15,
                                                                        16, 17, 19]
    # a video of exactly window + 1 frames still always starts at 0 (the original's off-by-one kept)
    starts = {sample_frame_indices(49, 16, 3, np.random.default_rng(s))[0] for s in range(50)}
    assert starts == {0}
    starts = {sample_frame_indices(60, 16, 3, np.random.default_rng(s))[0] for s in range(400)}
    assert min(starts) == 0 and max(starts) == 11
    with pytest.raises(ValueError, match="10 frames, fewer than num_frames=16"):
        sample_frame_indices(10, 16, 3, np.random.default_rng(0))


def test_dataset_decodes_exactly_the_sampled_frames(media):
    ds = dataset(media)
    for i in good_rows(ds):
        if ds.videos[i].endswith(".png"):
            continue
        total = VIDEOS[ds.videos[i]][0]
        for epoch in (0, 1, 7):
            frames, indices = ds.read_clip(i, epoch)
            expected = sample_frame_indices(total, NUM_FRAMES, INTERVAL, np.random.default_rng([3, epoch, i, 0]))
            assert indices.tolist() == expected.tolist()
            assert frame_ids(frames) == expected.tolist(), ds.videos[i]
            video = ds.video(i, epoch)  # uniform frames stay uniform through resize + crop
            assert frame_ids(np.round((video.transpose(1, 2, 3, 0) + 1) * 127.5)) == expected.tolist()
    # the window moves with the epoch and is the same whoever loads it
    wide = ds.videos.index("clips/wide.mp4")
    starts = {ds.read_clip(wide, e)[1][0] for e in range(12)}
    assert len(starts) > 3 and max(starts) <= 50 - NUM_FRAMES * INTERVAL - 1
    np.testing.assert_array_equal(ds.video(wide, 4), dataset(media).video(wide, 4))


def test_resize_crop_geometry_by_hand():
    # 48 x 80 -> 32: scale 2/3, resized 32 x 53, left offset round(21 / 2) = 10 (round half to even)
    g = resize_crop_geometry(48, 80, 32)
    assert g["resized"] == (32, 53) and g["offset"] == (0, 10) and g["scale"] == pytest.approx(2 / 3)
    # portrait 96 x 48 -> 32: scale 2/3, resized 64 x 32, top offset 16
    assert resize_crop_geometry(96, 48, 32)["resized"] == (64, 32) and resize_crop_geometry(96, 48, 32)["offset"] == (16, 0)
    # upscaling 20 x 30 -> 32: scale 1.6, 32 x 48, left 8; non-square target [16, 32] of 48 x 80: scale 0.4
    assert resize_crop_geometry(20, 30, 32) == {"scale": 1.6, "resized": (32, 48), "offset": (0, 8)}
    assert resize_crop_geometry(48, 80, [16, 32])["resized"] == (19, 32)
    # 360 x 640 -> 256: 256 x 455, left offset round(99.5) = 100
    assert resize_crop_geometry(360, 640, 256)["offset"] == (0, 100)


@pytest.mark.parametrize("shape,size", [((2, 48, 80), 32), ((3, 96, 48), 32), ((1, 33, 47), 16), ((2, 20, 30), 32),
                                        ((1, 32, 32), 32), ((2, 360, 640), 256)])
def test_resize_crop_matches_torch_interpolate(shape, size):
    """Against Open-Sora's transform written with torch (ToTensorVideo, interpolate(scale_factor=short side
    ratio, bilinear, align_corners=False), center crop with round(), Normalize(0.5, 0.5)); tolerance 1e-5."""
    torch = pytest.importorskip("torch")
    frames = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    scale = size / min(shape[1], shape[2])
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    i, j = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    ref = ((x[..., i:i + size, j:j + size] - 0.5) / 0.5).permute(0, 2, 3, 1).numpy()
    out = resize_crop(frames, size)
    assert out.shape == ref.shape == (shape[0], size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_image_is_cropped_exactly_and_repeated_over_frames(media):
    ds = dataset(media)
    i = ds.videos.index("stills/still.png")
    video = ds.video(i)
    assert video.shape == (3, NUM_FRAMES, SIZE, SIZE) and video.dtype == np.float32
    # 32 x 50 -> 32: no resize (scale 1), columns 9 .. 40 (offset round(18 / 2))
    expected = still_image()[:, 9:41].astype(np.float32) / 127.5 - 1.0
    for t in range(NUM_FRAMES):
        np.testing.assert_allclose(video[:, t].transpose(1, 2, 0), expected, atol=1e-6)


def test_items_shapes_and_value_range(media):
    ds = dataset(media)
    for i in good_rows(ds):
        item = ds.load(i, 0)
        assert set(item) == {"video", "caption"} and item["caption"] == ds.captions[i]
        v = item["video"]
        assert v.shape == (3, NUM_FRAMES, SIZE, SIZE) and v.dtype == np.float32
        assert v.min() >= -1.0 and v.max() <= 1.0
    levels = ds.video(ds.videos.index("clips/wide.mp4"))
    assert levels.min() >= (16 / 127.5 - 1) - 0.01  # darkest grey level 16 -> -0.875


def test_bad_files_raise_bad_sample_error_naming_the_path(media):
    ds = dataset(media)
    reasons = {"clips/short.mp4": "too short: 3 frames, fewer than num_frames=8", "clips/corrupt.mp4": "unreadable video",
               "clips/truncated.mp4": "", "clips/missing.mp4": "file not found"}
    for name, reason in reasons.items():
        with pytest.raises(BadSampleError) as e:
            ds.load(ds.videos.index(name), 0)
        assert e.value.path == str(media.parent / name) and reason in e.value.reason


# ================================================================
# Loader: bad samples, workers, sharding, resume
# ================================================================


def test_loader_skips_counts_and_logs_bad_samples(media, caplog):
    ds = dataset(media)
    loader = BatchLoader(ds, 2, seed=0, max_bad_fraction=0.6)
    caplog.set_level(logging.WARNING, logger="opensora.data.loader")
    it = iter(loader)
    batches = [next(it) for _ in range(8)]  # 2 epochs of 4 batches
    good_captions = {ds.captions[i] for i in good_rows(ds)}
    for b in batches:
        assert b["video"].shape == (2, 3, NUM_FRAMES, SIZE, SIZE) and set(b["caption"]) <= good_captions
    assert sorted(loader.bad_samples) == sorted(str(media.parent / p) for p in BAD) and loader.num_bad_samples == 4
    for p in BAD:  # one log line per bad file, naming it
        assert sum(str(media.parent / p) in r.getMessage() for r in caplog.records) == 1
    state = loader.state()
    assert (state["epoch"], state["position"], state["num_bad_samples"]) == (1, 8, 4)
    resumed = BatchLoader(ds, 2, seed=0, max_bad_fraction=0.6)
    resumed.load_state(state)
    assert resumed.num_bad_samples == 4


def test_loader_stops_above_max_bad_fraction(media):
    loader = BatchLoader(dataset(media), 2, seed=0, max_bad_fraction=0.25)
    with pytest.raises(TooManyBadSamples, match=r"4 of the 8 distinct samples read so far are bad \(50%.*"
                                                 r"data.max_bad_fraction=0.25.*First: "):
        for _ in zip(range(50), loader):
            pass
    # every sample bad: the slot gives up after max_retries with the paths
    (media.parent / "all_bad.csv").write_text("video,caption\nclips/corrupt.mp4,a\nclips/missing.mp4,b\n")
    loader = BatchLoader(dataset(media.parent / "all_bad.csv"), 1, seed=0, max_bad_fraction=None, max_retries=3)
    with pytest.raises(TooManyBadSamples, match=r"4 samples in a row were bad.*clips/(corrupt|missing)\.mp4"):
        next(iter(loader))


class Indexed:
    """Items {"index": i}; indices 3 and 10 are bad."""

    def __init__(self, n=24, bad=(3, 10)):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def load(self, i, epoch):
        if i in self.bad:
            raise BadSampleError(f"item{i}", "bad on purpose")
        return {"index": np.int64(i), "caption": f"c{i}"}


def test_sharding_over_two_ranks_is_disjoint_and_complete():
    ds = Indexed(bad=())
    per_rank = []
    for rank in (0, 1):
        it = iter(BatchLoader(ds, 3, seed=9, rank=rank, world_size=2))
        per_rank.append([next(it)["index"].tolist() for _ in range(8)])  # 2 epochs of 4 global batches
    for epoch in (0, 1):
        a = sum(per_rank[0][4 * epoch:4 * epoch + 4], [])
        b = sum(per_rank[1][4 * epoch:4 * epoch + 4], [])
        assert not set(a) & set(b) and sorted(a + b) == list(range(24))
        # together the ranks see what one process with the global batch size sees
        single = iter(BatchLoader(ds, 6, seed=9))
        ref = [next(single)["index"].tolist() for _ in range(8)]
        assert [x + y for x, y in zip(per_rank[0], per_rank[1])] == ref
    assert per_rank[0][:4] != per_rank[0][4:]  # epochs are shuffled differently


def test_resume_mid_epoch_continues_at_the_next_sample():
    ds = Indexed()
    full = BatchLoader(ds, 4, seed=2, max_bad_fraction=None)
    it = iter(full)
    ref = [next(it)["index"].tolist() for _ in range(9)]  # 6 batches per epoch: crosses into epoch 1
    part = BatchLoader(ds, 4, seed=2, max_bad_fraction=None)
    it = iter(part)
    first = [next(it)["index"].tolist() for _ in range(4)]
    assert part.state()["epoch"] == 0 and part.state()["position"] == 16
    resumed = BatchLoader(ds, 4, seed=2, max_bad_fraction=None)
    resumed.load_state(part.state())
    it = iter(resumed)
    assert first + [next(it)["index"].tolist() for _ in range(5)] == ref
    # the first epoch saw every good sample once; bad ones were replaced by seeded draws
    epoch0 = sum(ref[:6], [])
    assert {i for i in range(24) if i not in (3, 10)} <= set(epoch0) and not {3, 10} & set(epoch0)


def test_worker_processes_give_the_same_batches(media):
    """2 spawned workers with prefetch give exactly the in-process batches (bad samples included), and a
    loader resumed with workers continues like the in-process one."""
    ds = dataset(media, image_size=16)
    ref_loader = BatchLoader(ds, 2, seed=4, max_bad_fraction=0.6)
    it = iter(ref_loader)
    ref = [next(it) for _ in range(6)]
    loader = BatchLoader(ds, 2, seed=4, num_workers=2, prefetch=2, max_bad_fraction=0.6)
    try:
        it = iter(loader)
        got = [next(it) for _ in range(3)]
        state = loader.state()
    finally:
        loader.close()
    resumed = BatchLoader(ds, 2, seed=4, num_workers=2, max_bad_fraction=0.6)
    resumed.load_state(state)
    try:
        it = iter(resumed)
        got += [next(it) for _ in range(3)]
    finally:
        resumed.close()
    for a, b in zip(ref, got):
        assert a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["video"], b["video"])
    assert (state["epoch"], state["position"]) == (0, 6)
    assert (resumed.epoch, resumed.position) == (ref_loader.epoch, ref_loader.position) == (1, 4)
    assert resumed.bad_samples.keys() == ref_loader.bad_samples.keys()


def test_the_bad_share_is_judged_only_after_enough_reads(media):
    """A 4-clip CSV with one corrupt file: 25% bad, judged only once all 4 were read (not after the first 2)."""
    (media.parent / "one_bad.csv").write_text("video,caption\nclips/wide.mp4,a\nclips/tall.mp4,b\n"
                                             "clips/sub/small.mp4,c\nclips/corrupt.mp4,d\n")
    loader = BatchLoader(dataset(media.parent / "one_bad.csv"), 1, seed=0, max_bad_fraction=0.3)
    batches = [b for _, b in zip(range(12), loader)]  # 3 epochs: the bad file is read, replaced, counted
    assert len(batches) == 12 and loader.num_bad_samples == 1
    strict = BatchLoader(dataset(media.parent / "one_bad.csv"), 1, seed=0, max_bad_fraction=0.2)
    read = []
    with pytest.raises(TooManyBadSamples, match=r"1 of the 4 distinct samples read so far are bad"):
        for b in strict:
            read.append(b)
    assert len(read) >= 2  # it did not stop at the first bad read


def test_collate_and_model_inputs():
    from opensora.train.batch import model_inputs

    batch = collate([{"video": np.zeros((3, 2, 4, 4), np.float32), "caption": "a"},
                     {"video": np.ones((3, 2, 4, 4), np.float32), "caption": "b"}])
    vid, cap = batch["video"], batch["caption"]
    assert vid.shape == (2, 3, 2, 4, 4) and vid.dtype == np.float32 and cap == ["a", "b"]
    items = [{"latent": np.full((4, 2, 2, 2), k, np.float32), "caption": f"c{k}", "text_emb": np.full((5, 6), k),
              "mask": np.arange(5) < 2 + k} for k in range(3)]
    x, emb = model_inputs(collate(items), None, None)  # nothing to encode: no VAE, no text encoder needed
    assert x.shape == (3, 4, 2, 2, 2) and emb["y"].shape == (3, 1, 5, 6) and emb["mask"].dtype == np.int32
    assert emb["mask"].sum(1).tolist() == [2, 3, 4] and emb["y"][2, 0, 0, 0] == 2

    class Doubler:
        def encode(self, v):
            return np.asarray(v) * 2

    class Lengths:
        def encode(self, captions):
            return {"y": np.zeros((len(captions), 1, 1, 1)), "mask": np.array([[len(c)] for c in captions])}

    x, emb = model_inputs({"video": np.ones((1, 3, 1, 2, 2)), "caption": ["abc"]}, Doubler(), Lengths())
    assert x.max() == 2 and emb["mask"].tolist() == [[3]]
    with pytest.raises(ValueError, match="no text encoder"):
        model_inputs({"latent": np.ones((1, 1)), "caption": ["a"]}, None, None)


# ================================================================
# Caches
# ================================================================


def cfg_for(media, tmp_path, *extra):
    return compose_cfg(["data=video_csv", f"data.csv_path={media}", f"data.num_frames={NUM_FRAMES}",
                        f"data.frame_interval={INTERVAL}", "data.image_size=16", "data.num_workers=0",
                        "logger=none", *extra], tmp_path)


def test_text_cache_round_trip_and_refusal(media, tmp_path):
    from opensora.tasks.embed_text import run
    from opensora.text_encoder import T5Embedder

    folder = tmp_path / "t5"
    cfg = cfg_for(media, tmp_path / "run", f"data.text_embed_folder={folder}", "task=embed_text")
    assert run(cfg) == {"embed_text/captions": 8}
    index = read_index(folder)
    assert index["video"].tolist() == read_video_csv(media)["video"].tolist()
    assert index["path"].tolist()[:3] == ["clips/wide.npz", "clips/tall.npz", "clips/sub/small.npz"]
    meta = read_meta(folder)
    assert meta["kind"] == "text" and meta["settings"]["model_max_length"] == 8 and meta["settings"]["output_dim"] == 64
    encoder = T5Embedder(from_pretrained=str(tmp_path / "run" / "text_encoder"), model_max_length=8, clean_caption=False)
    ref = encoder.encode(["a tall grey clip"])
    emb, mask = load_text_embedding(folder / "clips/tall.npz")
    np.testing.assert_allclose(emb, ref["y"][0, 0], atol=1e-5)
    np.testing.assert_array_equal(mask, ref["mask"][0])
    # the dataset serves it, checked against the configured text encoder
    ds = dataset(media, text_embed_folder=str(folder), text_cache_settings=text_cache_settings(cfg.text_encoder))
    item = ds.load(ds.videos.index("clips/tall.mp4"))
    np.testing.assert_array_equal(item["text_emb"], emb)
    assert item["mask"].dtype == np.int32 and "video" in item
    # the same through the config (settings pass through hydra.utils.instantiate as config nodes)
    from opensora.data import build_dataset

    built = build_dataset(cfg_for(media, tmp_path / "run", f"data.text_embed_folder={folder}"))
    np.testing.assert_array_equal(built.text_embedding(built.videos.index("clips/tall.mp4"))[0], emb)
    # another max length is refused, naming the setting
    other = cfg_for(media, tmp_path / "run", "text_encoder.model_max_length=16").text_encoder
    with pytest.raises(ValueError, match=r"data.text_embed_folder=.*model_max_length: cache 8 vs config 16.*"
                                         r"task=embed_text"):
        dataset(media, text_embed_folder=str(folder), text_cache_settings=text_cache_settings(other))
    # the encoder is identified by its content, not its folder's name: another run's T5, also saved in a folder
    # called text_encoder, with a tokenizer trained on other captions, is refused
    from opensora.text_encoder import train_sentencepiece

    other_run = tmp_path / "other" / "text_encoder"
    train_sentencepiece([f"another caption number {i}" for i in range(30)], str(other_run), vocab_size=40)
    T5Embedder(config=dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
               tokenizer_path=str(other_run / "spiece.model"), model_max_length=8).save_pretrained(str(other_run))
    folder_cfg = {"_target_": "opensora.text_encoder.T5Embedder", "from_pretrained": str(other_run),
                  "model_max_length": 8, "output_dim": 64, "clean_caption": False}
    with pytest.raises(ValueError, match=r"text_encoder_fingerprint: cache '\w+' vs config '\w+' \(the weights or "
                                         r"tokenizer differ"):
        dataset(media, text_embed_folder=str(folder), text_cache_settings=text_cache_settings(folder_cfg))
    same = {**folder_cfg, "from_pretrained": str(tmp_path / "run" / "text_encoder")}
    assert text_cache_settings(same)["text_encoder_fingerprint"] == read_meta(folder)["settings"][
        "text_encoder_fingerprint"]  # the folder the cache was built with (as t5_folder) matches
    # a missing file costs that sample only
    os.remove(folder / "clips/sub/small.npz")
    with pytest.raises(BadSampleError, match=r"small\.npz: text embedding file missing"):
        ds.load(ds.videos.index("clips/sub/small.mp4"))


def test_embed_text_from_prompts_writes_numbered_files(tmp_path):
    from opensora.tasks.embed_text import run
    from opensora.tasks.sample import CachedTextEmbeddings

    cfg = compose_cfg(["task=embed_text", f"task.output_dir={tmp_path / 'e'}", "logger=none"], tmp_path / "run")
    cfg.task.prompts = ["a red square moving left", "a blue circle, moving up"]
    assert run(cfg) == {"embed_text/captions": 2}
    assert read_index(tmp_path / "e")["path"].tolist() == ["000000.npz", "000001.npz"]
    cache = CachedTextEmbeddings(str(tmp_path / "e"), caption_channels=64, model_max_length=8)
    assert cache.encode(["a blue circle, moving up"])["y"].shape == (1, 1, 8, 64)


def test_video_cache_round_trip_and_refusal(media, tmp_path):
    from opensora.tasks.embed_video import run

    folder = tmp_path / "vae"
    cfg = cfg_for(media, tmp_path / "run", f"data.video_embed_folder={folder}", "task=embed_video")
    assert run(cfg) == {"embed_video/videos": 4}  # 3 videos + 1 image; the 4 bad files are skipped and listed
    bad = pd.read_csv(folder / "bad_videos.csv")
    assert sorted(bad["path"]) == sorted(str(media.parent / p) for p in BAD)
    index = read_index(folder)
    assert index["path"].tolist() == ["clips/wide.npz", "clips/tall.npz", "clips/sub/small.npz", "stills/still.npz"]
    settings = video_cache_settings(cfg.data, cfg.vae)
    assert settings["image_size"] == [16, 16] and settings["vae"]["target"] == "opensora.vae.IdentityVAE"
    ds = VideoTextDataset(str(media), num_frames=NUM_FRAMES, frame_interval=INTERVAL, image_size=16, seed=cfg.seed,
                          video_embed_folder=str(folder), video_cache_settings=settings)
    pixels = VideoTextDataset(str(media), num_frames=NUM_FRAMES, frame_interval=INTERVAL, image_size=16, seed=cfg.seed)
    for i in good_rows(ds):
        item = ds.load(i, epoch=5)  # a cached clip is the epoch-0 clip, whatever the epoch
        assert set(item) == {"latent", "caption"}
        np.testing.assert_array_equal(item["latent"], pixels.video(i, 0))  # identity VAE
        with np.load(folder / index["path"][index["video"] == ds.videos[i]].iloc[0]) as f:
            assert f["frame_indices"].tolist() == pixels.read_clip(i, 0)[1].tolist()
    with pytest.raises(BadSampleError, match=r"corrupt\.mp4: no video latent in .*index\.csv"):
        ds.load(ds.videos.index("clips/corrupt.mp4"))
    # other sampling settings are refused
    with pytest.raises(ValueError, match=r"image_size: cache \[16, 16\] vs config \[32, 32\]"):
        check_meta(folder, "video", video_cache_settings({**settings, "image_size": 32, "num_frames": NUM_FRAMES,
                                                           "frame_interval": INTERVAL}, cfg.vae), "data.video_embed_folder")
    sd_vae = {"_target_": "opensora.vae.VideoAutoencoderKL", "from_pretrained": "/models/sd-vae-ft-ema",
              "scale_factor": 0.18215, "sample_posterior": True}
    with pytest.raises(ValueError, match=r"vae: cache \{.*IdentityVAE.*\} vs config \{.*VideoAutoencoderKL.*"
                                         r"sd-vae-ft-ema.*scale_factor: cache None vs config 0.18215; sample_posterior"):
        check_meta(folder, "video", video_cache_settings(cfg.data, sd_vae), "data.video_embed_folder")
    with pytest.raises(ValueError, match=r"frame_interval: cache 3 vs config 2"):
        VideoTextDataset(str(media), num_frames=NUM_FRAMES, image_size=16, video_embed_folder=str(folder),
                         video_cache_settings={**settings, "frame_interval": 2})


def test_cached_posterior_is_sampled_per_epoch(media, tmp_path):
    """A VAE that samples its posterior caches the scaled mean and std; reading draws mean + std * eps
    from the sample's (seed, epoch, index) RNG."""
    from opensora.data.cache import save_video_latent, write_index, write_meta
    from opensora.tasks.embed_video import _encode

    class Dist:
        def __init__(self, x):
            self.mean, self.std = x[:, :2] * 2, np.full_like(x[:, :2], 0.5)

    class PosteriorVAE:
        sample_posterior, scale_factor, shift_factor = True, 0.5, 0.1

        def latent_dist(self, x):
            return Dist(np.asarray(x))

    x = np.random.default_rng(0).standard_normal((1, 3, 2, 4, 4)).astype(np.float32)
    mean, std = _encode(PosteriorVAE(), x)
    np.testing.assert_allclose(mean, (x[:, :2] * 2 - 0.1) * 0.5, atol=1e-6)
    np.testing.assert_allclose(std, 0.25)
    folder = tmp_path / "c"
    save_video_latent(folder / "clips/wide.npz", mean[0], latent_std=std[0])
    write_index(folder, pd.DataFrame({"caption": ["w"], "path": ["clips/wide.npz"], "video": ["clips/wide.mp4"]}))
    write_meta(folder, "video", {})
    ds = dataset(media, video_embed_folder=str(folder), video_cache_settings={})
    i = ds.videos.index("clips/wide.mp4")
    eps = np.random.default_rng([3, 2, i, 1]).standard_normal(mean[0].shape, dtype=np.float32)
    np.testing.assert_allclose(ds.load(i, 2)["latent"], mean[0] + std[0] * eps, atol=1e-6)
    assert not np.allclose(ds.load(i, 2)["latent"], ds.load(i, 3)["latent"])


# ================================================================
# task=scan_videos
# ================================================================


def test_scan_videos_measures_and_filters(media, tmp_path):
    from opensora.tasks.scan_videos import run

    folder = media.parent
    cfg = compose_cfg(["task=scan_videos", f"task.folder={folder}", "task.csv_path=null", "task.num_workers=0",
                       "task.filters.min_frames=8", "task.filters.min_height=32", "logger=none"], tmp_path)
    kept = run(cfg)
    scan = pd.read_csv(tmp_path / "scan.csv").set_index("path")
    assert "videos.csv" not in scan.index  # only media files
    for name, (t, h, w, fps) in VIDEOS.items():
        row = scan.loc[name]
        assert (row.num_frames, row.height, row.width, row.fps) == (t, h, w, fps) and bool(row.readable)
        assert row.aspect_ratio == pytest.approx(h / w) and row.duration == pytest.approx(t / fps)
    for name in ("clips/corrupt.mp4", "clips/truncated.mp4"):
        assert not scan.loc[name].readable and scan.loc[name].error and not scan.loc[name].keep
    assert scan.loc["stills/still.png"][["num_frames", "height", "width"]].tolist() == [1, 32, 50]
    out = pd.read_csv(tmp_path / "videos.csv")
    # short.mp4 (3 frames) fails min_frames; the image is exempt from frame filters
    assert sorted(out["path"]) == ["clips/sub/small.mp4", "clips/tall.mp4", "clips/wide.mp4", "stills/still.png"]
    assert kept == {"scan_videos/kept": 4} and "readable" not in out.columns
    # exactly the training columns (a folder has no captions: empty text)
    assert list(out.columns) == ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]
    assert out["text"].isna().all()
    # CSV mode keeps the captions, so its output trains directly
    cfg = compose_cfg(["data=video_csv", f"data.csv_path={media}", "task=scan_videos", "task.num_workers=0",
                       f"task.output_csv={tmp_path / 'ok.csv'}", "logger=none"], tmp_path)
    run(cfg)
    ok = read_video_csv(tmp_path / "ok.csv")
    assert sorted(ok["video"]) == sorted(set(read_video_csv(media)["video"]) - set(BAD) | {"clips/short.mp4"})
    assert ok.set_index("video").loc["clips/wide.mp4", "caption"] == "a wide grey clip"
    assert list(pd.read_csv(tmp_path / "ok.csv").columns) == ["path", "text", "num_frames", "height", "width",
                                                              "aspect_ratio", "fps"]
    assert (tmp_path / "ok_scan.csv").is_file()
    with pytest.raises(ValueError, match="unknown keys"):
        from opensora.tasks.scan_videos import apply_filters

        apply_filters(out, {"min_frame": 3}, out["num_frames"] > 1)
