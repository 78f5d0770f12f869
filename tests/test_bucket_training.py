"""Bucketed training's step and evaluation pieces: STDiT2's sized, masked loss (opensora/train/step.py) equals the
masked IDDPM loss with x_mask in the model's kwargs, times its weight; the per-(seed, step, slot) draws
(opensora/train/batch.py); the validation loss per bucket and timestep (opensora/eval/loss.py): deterministic,
each sample counted once whatever the batch size; slow: 2 CPU ranks under msrun training different shapes in the
same step equal one process accumulating the same two micro-batches per step."""
from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pandas as pd
import pytest

from helpers import ROOT, assert_same_training_state, run_cli, run_msrun, write_mp4
from opensora.data.variable import VariableVideoTextDataset
from opensora.model.stdit2 import STDiT2
from opensora.scheduler import IDDPM

RES = {"px16": {"pixels": 256, "ratios": {"0.75": [12, 16], "1.00": [16, 16]}},
       "px8": {"pixels": 64, "ratios": {"1.00": [8, 8]}}}


def tiny_stdit2() -> STDiT2:
    ms.set_seed(0)
    return STDiT2(input_sq_size=16, in_channels=3, hidden_size=48, depth=1, num_heads=2, caption_channels=16,
                  model_max_length=8)


def loss_inputs(b=2, t=4, h=6, w=8, seed=0):
    r = np.random.default_rng(seed)
    x_mask = np.ones((b, t), bool)
    x_mask[0, :2] = False
    return [ms.Tensor(r.standard_normal((b, 3, t, h, w)).astype(np.float32)), ms.Tensor(np.array([5, 700][:b], np.int32)),
            ms.Tensor(r.standard_normal((b, 3, t, h, w)).astype(np.float32)),
            ms.Tensor(r.standard_normal((b, 1, 8, 16)).astype(np.float32)), ms.Tensor(np.ones((b, 8), np.int32)),
            ms.Tensor(np.zeros(b, np.int32)), ms.Tensor(x_mask),
            *[ms.Tensor(np.full(b, v, np.float32)) for v in (t, h, w, w / h, 24.0)]]


def test_sized_loss_is_the_masked_iddpm_loss_times_its_weight():
    from opensora.train.step import SizedDiffusionLoss

    model, diffusion = tiny_stdit2(), IDDPM(num_sampling_steps=None)
    model.set_train(True)
    x, t, noise, y, mask, drop, x_mask, nf, h, w, ar, fps = loss_inputs()
    kwargs = dict(y=y, mask=mask, force_drop_ids=drop, num_frames=nf, height=h, width=w, ar=ar, fps=fps)
    want = diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise=noise, mask=x_mask,
                                     pass_x_mask=True)["loss"].asnumpy().mean()
    got = SizedDiffusionLoss(model, diffusion, masked=True)(*loss_inputs(), ms.Tensor(np.float32(0.5)))
    np.testing.assert_allclose(float(got.asnumpy()), 0.5 * want, rtol=1e-6)
    plain = diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise=noise)["loss"].asnumpy().mean()
    got = SizedDiffusionLoss(model, diffusion, masked=False)(*loss_inputs(), ms.Tensor(np.float32(1.0)))
    np.testing.assert_allclose(float(got.asnumpy()), plain, rtol=1e-6)
    assert abs(plain - want) > 1e-4  # the mask matters here


def test_bucket_feed_draws_per_seed_step_and_slot():
    from types import SimpleNamespace

    from opensora.data.masks import MaskGenerator
    from opensora.scheduler.timestep_sampler import UniformTimesteps
    from opensora.train.batch import BucketFeed

    feed = BucketFeed(None, None, IDDPM(num_sampling_steps=None), UniformTimesteps(), 0.1, seed=4,
                      masks=MaskGenerator({"mask_no": 0.5, "mask_image_head": 0.5}, 4), micro_batch_weight="samples")

    def micro(b, t):
        return {"latent": np.zeros((b, 3, t, 4, 4), np.float32), "text_emb": np.zeros((b, 8, 16), np.float32),
                "mask": np.ones((b, 8), np.int32), "caption": ["c"] * b,
                **{k: np.ones(b, np.float32) for k in ("num_frames", "height", "width", "ar", "fps")}}

    step = SimpleNamespace(micro_batches=[micro(2, 4)], slot_keys=[(2, 4, 4, 4), (6, 1, 4, 4)], first_slot=0,
                           samples=8)
    a = feed(step, 7).micro[0]
    rng = np.random.default_rng([4, 7, 0, 1])
    np.testing.assert_array_equal(a[1], rng.integers(0, 1000, 2))  # timesteps, then noise, then dropout
    np.testing.assert_array_equal(a[2], rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32))
    np.testing.assert_array_equal(a[6], MaskGenerator({"mask_no": 0.5, "mask_image_head": 0.5}, 4).get_masks(2, 4, 7, 0))
    assert a[-1] == pytest.approx(2 * 2 / 8)  # "samples": b * slots / samples of the step
    # the same micro-batch as slot 1 (on another rank) draws slot 1's numbers, whatever else the step holds
    b = feed(type(step)(micro_batches=[micro(2, 4)], slot_keys=[(6, 1, 4, 4), (2, 4, 4, 4)], first_slot=1,
                        samples=8), 7).micro[0]
    assert not np.array_equal(a[2], b[2])
    np.testing.assert_array_equal(b[1], np.random.default_rng([4, 7, 1, 1]).integers(0, 1000, 2))


@pytest.fixture(scope="module")
def val_media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    rows = []
    for i, (t, h, w) in enumerate([(20, 16, 16), (26, 16, 20), (16, 8, 8), (14, 10, 10)]):
        write_mp4(root / f"v{i}.mp4", rng.integers(0, 256, (t, h, w, 3), np.uint8), 24)
        rows.append((f"v{i}.mp4", f"clip {i}", t, h, w))
    for i, (h, w) in enumerate([(16, 16), (8, 8)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"s{i}.png")
        rows.append((f"s{i}.png", f"image {i}", 1, h, w))
    pd.DataFrame(rows, columns=["path", "text", "num_frames", "height", "width"]).to_csv(root / "val.csv",
                                                                                       index=False)
    return root


class FixedText:
    """A text encoder stand-in: a fixed embedding per caption (hash-seeded)."""

    def encode(self, captions):
        y = np.stack([np.random.default_rng(sum(map(ord, c))).standard_normal((8, 16)) for c in captions])
        return {"y": y.astype(np.float32)[:, None], "mask": np.ones((len(captions), 8), np.int32)}


def evaluator(root, bs):
    from opensora.eval.loss import BucketLossEvaluator
    from opensora.vae import IdentityVAE

    ds = VariableVideoTextDataset(str(root / "val.csv"), frame_interval=3, seed=1)
    buckets = {"px16": {1: [1.0, bs], 4: [1.0, bs]}, "px8": {4: [1.0, bs]}}
    return BucketLossEvaluator(tiny_stdit2(), IDDPM(num_sampling_steps=None), ds, buckets, 3, FixedText(),
                               IdentityVAE(latent_channels=3, downsample=1), seed=2, num_timesteps=2,
                               resolutions=RES)


def test_validation_loss_per_bucket_is_deterministic_and_counts_each_sample_once(val_media, tmp_path):
    from opensora.eval.loss import eval_timesteps, format_table, save_results

    assert eval_timesteps(1000, 10) == [90, 181, 272, 363, 454, 545, 636, 727, 818, 909]
    a = evaluator(val_media, 2)
    first, second = a(), a()
    assert first == second
    assert [(r["resolution"], r["num_frames"]) for r in first] == [("px16", 4), ("px16", 1), ("px8", 4)]
    # each bucket alone takes what fits it: px16 x 4 the videos of >= 0.8 x 256 px and > 12 frames (v0, v1), px16
    # x 1 the image s0, px8 x 4 all four videos
    assert [r["samples"] for r in first] == [2, 1, 4]
    assert all(np.isfinite(r["mean"]) for r in first) and set(first[0]) >= {"t333", "t666"}
    # batch size 1 gives the same numbers: no sample's loss depends on its batch (repeats are not counted)
    one = evaluator(val_media, 1)()
    for r, s in zip(first, one):
        for k in ("t333", "t666", "mean"):
            assert r[k] == pytest.approx(s[k], rel=1e-5), (r["resolution"], r["num_frames"], k)
    metrics = a.metrics(first)
    assert set(metrics) >= {"val/loss", "val/loss/px16x4", "val/loss_t333"}
    text = format_table(first, a.timesteps)
    assert "px16 x 4" in text and len(text.splitlines()) == 4
    csv, png = save_results(first, a.timesteps, tmp_path, "validation loss")
    assert pd.read_csv(csv).shape == (3, 3 + 2 + 1) and png.stat().st_size > 1000


# ================================================================
# Data parallel with different shapes per rank
# ================================================================


@pytest.fixture(scope="module")
def train_media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):  # 16x16 and 8x8 clips of 20 frames: buckets px16 x 4 and px8 x 4
        h = 16 if i % 2 else 8
        write_mp4(root / f"v{i}.mp4", rng.integers(0, 256, (20, h, h, 3), np.uint8), 24)
        rows.append((f"v{i}.mp4", f"clip {i}", 20, h, h))
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(root / f"s{i}.png")
        rows.append((f"s{i}.png", f"image {i}", 1, 16, 16))
    pd.DataFrame(rows, columns=["path", "text", "num_frames", "height", "width"]).to_csv(root / "train.csv",
                                                                                       index=False)
    return root


@pytest.mark.alone
@pytest.mark.slow
def test_two_ranks_with_different_shapes_equal_one_process_accumulating_both(train_media, tmp_path):
    """msrun, 2 ranks, parallel=data: in each step the ranks train the plan's two micro-batches (of different
    shapes in some step); one process with task.grad_accumulation=2 trains both micro-batches of each step. The
    checkpoints agree: model, EMA, AdamW state, data position, loss average (fp32 rounding of a mean of 2 rank
    means vs one mean of the 2 micro-batches: the helper's tolerances)."""
    from opensora.data.bucket import Bucket
    from opensora.data.sampler import BucketSampler

    common = ["task=train", "data=variable_csv", "debug=fast", "scheduler=iddpm",
              f"data.csv_path={train_media / 'train.csv'}",
              "logger=none", "task.shapes=dynamic", "task.max_steps=2", "task.ckpt_every=2",
              "data.mask_ratios={mask_no: 0.5, mask_image_head: 0.25, mask_quarter_tail: 0.25}"]
    one = tmp_path / "one"
    run_cli([*common, "task.grad_accumulation=2", f"hydra.run.dir={one}"], tmp_path)
    two = tmp_path / "two"
    proc, logs = run_msrun([str(ROOT / "run.py"), *common, "parallel=data", f"hydra.run.dir={two}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(v[-3000:] for v in logs.values())
    assert_same_training_state(two / "checkpoints" / "step_000002", one / "checkpoints" / "step_000002")
    state = json.loads((one / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["data"]["step"] == 2
    # the plan both ran: in some step the two slots have different shapes
    from helpers import compose_cfg

    cfg = compose_cfg(common, tmp_path)
    ds = VariableVideoTextDataset(str(train_media / "train.csv"), frame_interval=3)
    plan = BucketSampler(Bucket(cfg.data.bucket_config, resolutions=cfg.data.resolutions), ds.sizes, 3, 42,
                         slots=2).plan(0)
    b = Bucket(cfg.data.bucket_config, resolutions=cfg.data.resolutions)
    assert any(b.get_thw(s[0].bucket) != b.get_thw(s[1].bucket) for s in plan.steps[:2])
