"""Buckets (opensora/data/bucket.py) and their sampler (opensora/data/sampler.py): the assignment rule of SPEC-1.1
§1.3 against its worked example and hand-made tables, the drop reasons, bad configs named; the plan: determinism,
shape-uniform micro-batches, disjoint complete coverage across 2 ranks, exact resume mid-epoch, resume after the
CSV grew / shrank or the slots changed (re-planned, nothing trained twice in the epoch), an empty plan explained.
No MindSpore graph here: these are host-side tables."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from helpers import compose_cfg
from opensora.data.bucket import Bucket, parse_bucket_config
from opensora.data.sampler import BucketSampler, PlanRecords, SizeTable, report, resume_position

STAGES = {"train_v1_1_stage1": 359, "train_v1_1_stage2": 729, "train_v1_1_stage3": 848}


def stage_bucket(name: str) -> Bucket:
    return Bucket(compose_cfg([f"experiment={name}"]).data.bucket_config)


def uniform_draws(u: float):
    return lambda res, t: u


# ================================================================
# The rule
# ================================================================


@pytest.mark.parametrize("name", sorted(STAGES))
def test_bucket_counts_of_the_stage_configs(name):
    """Number of (resolution, frames, aspect ratio) buckets as v1.1.0 prints them (SPEC-1.1 §1.1)."""
    assert stage_bucket(name).num_buckets == STAGES[name]


def test_worked_example_of_stage_3():
    """720x1280, 300 frames, interval 3: 1024 has only images, 720p's largest fitting t (96) is disabled, 480p
    keeps t=64 with 0.6, then 512 (AR key 0.57) 0.5, 360p 0.5, 240p 0.5, 256 0.5, 144p always."""
    b = stage_bucket("train_v1_1_stage3")
    assert b.resolutions == ["1024", "720p", "480p", "512", "360p", "240p", "256", "144p"]
    tried = []

    def record(res, t):
        tried.append((res, t))
        return 0.99

    assert b.get_bucket_id(300, 720, 1280, 3, record) == ("144p", 64, "0.56")
    assert tried == [("480p", 64), ("512", 64), ("360p", 64), ("240p", 64), ("256", 64)]  # 720p: prob 0, no draw
    assert b.get_bucket_id(300, 720, 1280, 3, uniform_draws(0.0)) == ("480p", 64, "0.56")
    assert b.get_thw(("480p", 64, "0.56")) == (64, 480, 854) and b.batch_size(("480p", 64, "0.56")) == 1
    assert b.get_bucket_id(300, 720, 1280, 3, uniform_draws(0.59)) == ("480p", 64, "0.56")
    draws = {"480p": 0.6, "512": 0.4}
    assert b.get_bucket_id(300, 720, 1280, 3, lambda res, t: draws[res]) == ("512", 64, "0.57")
    assert b.get_thw(("512", 64, "0.57")) == (64, 384, 672)
    # frequencies over rows: 0.6 / 0.2 / 0.1 / 0.05 / 0.025 / 0.025, within 5 binomial standard deviations
    n = 20000
    ids, reason = b.assign(np.full(n, 300), np.full(n, 720), np.full(n, 1280), 3, seed=42, epoch=0)
    got = Counter(b.buckets[i][0] for i in ids)
    for res, p in {"480p": 0.6, "512": 0.2, "360p": 0.1, "240p": 0.05, "256": 0.025, "144p": 0.025}.items():
        assert abs(got[res] - n * p) < 5 * np.sqrt(n * p * (1 - p)), (res, got[res])
    assert set(reason) == {""}
    # a 1024x1024 image: 1024 w.p. 0.3, else 720p 0.4, else 480p 0.4, else 512 0.5, ... down to 144p
    assert b.get_bucket_id(1, 1024, 1024, 3, uniform_draws(0.2)) == ("1024", 1, "1.0")
    assert b.get_bucket_id(1, 1024, 1024, 3, uniform_draws(0.35)) == ("720p", 1, "1.00")
    assert b.get_bucket_id(1, 1024, 1024, 3, uniform_draws(0.99)) == ("144p", 1, "1.00")


def test_stage_1_puts_a_long_720p_clip_in_144p_96_frames():
    b = stage_bucket("train_v1_1_stage1")
    ids, _ = b.assign(np.full(100, 300), np.full(100, 720), np.full(100, 1280), 3, seed=0, epoch=3)
    assert {b.buckets[i] for i in ids} == {("144p", 96, "0.56")}


HAND = {"240p": {16: [1.0, 2], 32: [0.0, None]}, "144p": {1: [1.0, 4], 16: [1.0, 2]}}


@pytest.mark.parametrize("frames,h,w,expected", [
    (49, 240, 426, ("240p", 16, "0.56")),   # strict T > t * interval: 49 > 48
    (48, 240, 426, None),                   # 48 frames fit no video bucket at interval 3
    (100, 240, 426, ("144p", 16, "0.56")),  # 240p's largest fitting t (32) is disabled: next resolution, not t=16
    (1, 300, 300, ("144p", 1, "1.00")),     # an image: 240p has no 1-frame bucket
    (1, 10, 10, None),                      # too small for 144p (36864 * 0.8 pixels)
    (60, 240, 180, ("144p", 16, "1.33")),   # 43200 px: not 240p (0.8 * 102240), AR 0.75 -> 1.33 nearest
])
def test_hand_made_table(frames, h, w, expected):
    b = Bucket(HAND)
    assert b.get_bucket_id(frames, h, w, 3, uniform_draws(0.5)) == expected
    ids, _ = b.assign(np.array([frames]), np.array([h]), np.array([w]), 3, seed=0, epoch=0)
    assert (b.buckets[ids[0]] if ids[0] >= 0 else None) == expected


def test_pixel_tolerance_is_inclusive_and_own_resolutions():
    """H * W >= 0.8 * pixels passes (exactly 80 of 100), 79 does not; own tables work like the built-in ones."""
    b = Bucket({"r10": {1: [1.0, 1]}}, resolutions={"r10": {"pixels": 100, "ratios": {"1.00": [10, 10],
                                                                                       "0.50": [7, 14]}}})
    ids, reason = b.assign(np.array([1, 1, 1]), np.array([8, 1, 9]), np.array([10, 79, 18]), 3, seed=0, epoch=0)
    assert [b.buckets[i] if i >= 0 else r for i, r in zip(ids, reason)] == [("r10", 1, "1.00"), "too_small",
                                                                             ("r10", 1, "0.50")]
    assert b.get_thw(("r10", 1, "0.50")) == (1, 7, 14)


def test_drop_reasons():
    b = Bucket({"240p": {16: [1.0, 2], 32: [0.0, None]}, "144p": {16: [0.5, 2]}})
    T = np.array([np.nan, 100, 20, 1, 100] + [60] * 200)
    H = np.array([240, 10, 240, 240, 400] + [144] * 200)
    W = np.array([426, 10, 426, 426, 400] + [256] * 200)
    ids, reason = b.assign(T, H, W, 3, seed=1, epoch=0)
    assert list(reason[:4]) == ["size_unknown", "too_small", "too_few_frames", "no_image_bucket"]
    # 400x400, 100 frames: 240p's t=32 disabled, then 144p t=32 absent -> t=16 with 0.5
    assert reason[4] in ("", "keep_prob")
    kept = ids[5:] >= 0
    assert set(reason[5:][~kept]) == {"keep_prob"} and 60 < kept.sum() < 140  # 0.5 of 200
    only_disabled = Bucket({"240p": {16: [0.0, None]}})
    assert only_disabled.assign(np.array([100]), np.array([240]), np.array([426]), 3, 0, 0)[1][0] == "disabled"


def test_original_seeding_reproduces_v1_1_0_draws():
    """seeding=original: each candidate's draw is default_rng(seed + epoch + row * num_buckets + pair_id), as
    v1.1.0's sampler seeds Bucket.get_bucket_id; the vectorised rule equals the one-clip rule with those draws."""
    b = Bucket({"240p": {16: [0.5, 2]}, "144p": {16: [0.5, 2]}})
    rows, seed, epoch = np.arange(300), 7, 2
    T, H, W = np.full(300, 60), np.full(300, 240), np.full(300, 426)
    ids, _ = b.assign(T, H, W, 3, seed, epoch, seeding="original", rows=rows)
    for r in rows:
        one = b.get_bucket_id(60, 240, 426, 3, b.original_draw(seed, epoch, r))
        assert (b.buckets[ids[r]] if ids[r] >= 0 else None) == one
    # by hand for row 5: 240p is pair 0, 144p pair 1
    u240 = np.random.default_rng(seed + epoch + 5 * b.num_buckets + 0).random()
    u144 = np.random.default_rng(seed + epoch + 5 * b.num_buckets + 1).random()
    expected = ("240p", 16, "0.56") if u240 < 0.5 else ("144p", 16, "0.56") if u144 < 0.5 else None
    assert (b.buckets[ids[5]] if ids[5] >= 0 else None) == expected
    # the quirk: epoch e + 1's draw of pair k is epoch e's of pair k + 1
    assert b.original_draw(seed, epoch + 1, 5)("240p", 16) == b.original_draw(seed, epoch, 5)("144p", 16)


@pytest.mark.parametrize("config,message", [
    ({"999p": {1: [1.0, 2]}}, "unknown resolution '999p'"),
    ({"240p": {16: [1.5, 2]}}, r"data.bucket_config.240p.16: keep_prob must be a probability in \[0, 1\], got 1.5"),
    ({"240p": {16: [-0.1, 2]}}, "keep_prob must be a probability"),
    ({"240p": {16: [0.5, None]}}, "needs a batch size >= 1"),
    ({"240p": {16: [0.5]}}, "must be \\[keep_prob, batch_size\\]"),
    ({"240p": {0: [0.5, 2]}}, "num_frames must be >= 1"),
    ({"240p": {16: [[0.5, 0.5], 2]}}, "Open-Sora 1.2"),
    ({}, "non-empty mapping"),
])
def test_bad_bucket_configs_name_the_entry(config, message):
    with pytest.raises(ValueError, match=message):
        parse_bucket_config(config)


def test_disabled_entries_and_mindone_zero_batch():
    b = Bucket({"240p": {16: [0.0, None], 32: [0.0, 0]}, "144p": {1: [1.0, 3]}})
    assert b.enabled() == [("144p", 1)] and b.batch_size(("240p", 16, "0.56")) is None


# ================================================================
# Plans
# ================================================================


def table(n=120, seed=0, extra_rows=0) -> SizeTable:
    """Videos and images of a few sizes; keys from the row's index (as a path would give them)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    sizes = [(1, 16, 16), (1, 12, 16), (20, 16, 16), (30, 12, 16), (14, 8, 8), (1, 8, 8), (26, 16, 12)]
    pick = rng.integers(0, len(sizes), n + extra_rows)
    rows = [(f"clip{i}.mp4", f"caption {i}", *sizes[k]) for i, k in enumerate(pick)]
    df = pd.DataFrame(rows, columns=["video", "caption", "num_frames", "height", "width"]).astype(str)
    return SizeTable.from_frame(df)


RES = {"px16": {"pixels": 256, "ratios": {"0.75": [12, 16], "1.00": [16, 16], "1.33": [16, 12]}},
       "px8": {"pixels": 64, "ratios": {"1.00": [8, 8]}}}
CFG = {"px16": {1: [1.0, 3], 4: [0.7, 2]}, "px8": {1: [1.0, 2], 4: [1.0, 2]}}


def sampler(t: SizeTable, slots=1, seed=3) -> BucketSampler:
    return BucketSampler(Bucket(CFG, resolutions=RES), t, frame_interval=3, seed=seed, slots=slots)


def test_plan_is_deterministic_shape_uniform_and_redrawn_each_epoch():
    t = table()
    a, b = sampler(t).plan(0), sampler(t).plan(0)
    assert [[(m.bucket, m.rows.tolist()) for m in s] for s in a.steps] == \
        [[(m.bucket, m.rows.tolist()) for m in s] for s in b.steps]
    assert a.num_steps > 10
    bucket = Bucket(CFG, resolutions=RES)
    ids, _ = bucket.assign(t.num_frames, t.height, t.width, 3, seed=3, epoch=0)
    for step in a.steps:
        for mb in step:
            assert {bucket.buckets[i] for i in ids[mb.rows]} == {mb.bucket}  # one shape per micro-batch
            assert len(mb.rows) == bucket.batch_size(mb.bucket)
    other = sampler(t).plan(1)
    assert [m.rows.tolist() for s in other.steps for m in s] != [m.rows.tolist() for s in a.steps for m in s]


def test_two_ranks_see_disjoint_complete_micro_batches():
    t = table(200)
    plan = sampler(t, slots=2).plan(0)
    assert all(len(step) == 2 for step in plan.steps)
    rank0 = np.concatenate([s[0].rows for s in plan.steps])
    rank1 = np.concatenate([s[1].rows for s in plan.steps])
    assert not set(rank0) & set(rank1) and len(set(rank0)) == len(rank0) and len(set(rank1)) == len(rank1)
    trained = plan.trained()
    assert len(rank0) + len(rank1) == sum(trained.values())
    # everything assigned is trained but the dropped remainders, counted
    assert sum(plan.assigned.values()) - sum(trained.values()) == \
        plan.dropped["batch_remainder"] + plan.dropped["step_remainder"]
    # shapes may differ between the ranks within a step
    assert any(s[0].bucket[:2] != s[1].bucket[:2] for s in plan.steps)


def test_report_counts_every_bucket_and_every_dropped_row():
    t = table(120)
    s = sampler(t)
    plan = s.plan(0)
    text, rows = report(s, plan, ranks=1, per_rank=1)
    assert f"{sum(plan.trained().values())} of 120 rows trained in {plan.num_steps} steps" in text
    assert sum(r[6] for r in rows) == sum(plan.assigned.values())
    for reason, n in plan.dropped.items():
        assert f"{n} {reason} (" in text
    assert sum(plan.dropped.values()) + sum(plan.trained().values()) == 120


def consumed(s: BucketSampler, plan, steps) -> set:
    return set(s.table.keys[plan.rows_in(plan.steps[:steps])].tolist())


def test_exact_resume_keeps_the_plan(tmp_path):
    t = table()
    s = sampler(t)
    records = PlanRecords(tmp_path)
    records.keep(s)
    pos, message = resume_position(s, {"epoch": 0, "step": 5, "plan": s.fingerprint}, records)
    assert message is None and (pos.epoch, pos.step, pos.exclude) == (0, 5, None)


@pytest.mark.parametrize("change", ["grew", "shrank", "slots"])
def test_resume_after_the_csv_changed_replans_the_rest_of_the_epoch(change, tmp_path, caplog):
    old_table = table(120)
    old = sampler(old_table)
    records = PlanRecords(tmp_path)
    records.keep(old)
    done_steps = 7
    plan = old.plan(0)
    trained = consumed(old, plan, done_steps)
    if change == "grew":
        new_table = table(120, extra_rows=40)  # the same 120 rows, 40 appended
    elif change == "shrank":
        keep = np.arange(0, 120, 2)
        new_table = SizeTable(old_table.keys[keep], old_table.num_frames[keep], old_table.height[keep],
                              old_table.width[keep])
    else:
        new_table = old_table
    new = sampler(new_table, slots=2 if change == "slots" else 1)
    pos, message = resume_position(new, {"epoch": 0, "step": done_steps, "plan": old.fingerprint}, records)
    assert message and "re-planned" in message and (pos.epoch, pos.step) == (0, 0)
    if change != "slots":
        assert "rows 120 ->" in message
    rest = new.plan(0, pos.exclude)
    rest_keys = set(new_table.keys[rest.rows_in(rest.steps)].tolist())
    assert not rest_keys & trained  # nothing trained twice in the epoch
    assert rest_keys <= set(new_table.keys.tolist())  # removed rows never come back
    if change == "grew":
        assert rest_keys & set(new_table.keys[120:].tolist())  # new rows train in this very epoch
    # the re-planned epoch resumes exactly from its record
    again, message = resume_position(new, {"epoch": 0, "step": 2, "plan": new.fingerprint,
                                           "excluded": pos.excluded}, records)
    assert message is None and set(again.exclude.tolist()) == set(pos.exclude.tolist())


def test_resume_without_the_plan_record_starts_the_next_epoch(tmp_path):
    old, new = sampler(table(50)), sampler(table(60))
    pos, message = resume_position(new, {"epoch": 2, "step": 3, "plan": old.fingerprint}, PlanRecords(tmp_path))
    assert (pos.epoch, pos.step) == (3, 0) and "epoch 3 starts with the new table" in message
