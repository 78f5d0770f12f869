"""Loop generation (SPEC-1.1 §3.5) with a numpy sampler, then conditioning through the real IDDPM sampler
with a dummy model (few respaced steps): output length, continuity in latent space, per-loop prompts,
the appended strategy strings, mask-0 frames exact and released edit ratios."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from opensora.scheduler import IDDPM
from opensora.sampling.conditioning import apply_mask_strategy
from opensora.sampling.loop import append_strategy, generate_loop, loop_strategy, loop_video_length
from opensora.sampling.prompts import plan_prompts

B, C, T, H, W = 2, 4, 8, 3, 3


class KeepSampler:
    """sample_clip stand-in: frames of mask 0 come out as given, the others are fresh numbers; records calls."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def __call__(self, z, mask, prompts):
        self.calls.append(dict(z=z.copy(), mask=mask.copy(), prompts=list(prompts)))
        fresh = self.rng.standard_normal(z.shape).astype(np.float32)
        return np.where((mask == 0)[:, None, :, None, None], z, fresh)


def noise_fn(seed=1):
    return lambda loop_i: np.random.default_rng(seed + loop_i).standard_normal((B, C, T, H, W)).astype(np.float32)


def decode(z):  # a per-frame "VAE": 3 colour channels at twice the size
    return np.repeat(np.repeat(np.tanh(z[:, :3]), 2, axis=3), 2, axis=4)


def encode(x):  # not the inverse of decode: re-encoding changes the latents, as a real VAE round trip does
    small = x[:, :, :, ::2, ::2]
    return np.concatenate([small, small.mean(axis=1, keepdims=True)], axis=1).astype(np.float32)


def test_length_continuity_prompts_and_strategies_reencoded():
    image = np.random.default_rng(2).standard_normal((C, 1, H, W)).astype(np.float32)
    plans = plan_prompts(["|0|text A|2|text B", "text C"], loop=3, reference_paths=[None, "x.png"],
                         mask_strategies=[None, "0"])
    sampler = KeepSampler()
    out = generate_loop(sampler, noise_fn(), [p.texts for p in plans], [[], [image]],
                        [p.mask_strategy for p in plans], loop=3, condition_frame_length=3,
                        decode=decode, encode=encode)
    length = loop_video_length(3, T, 3)
    assert length == 3 * (T - 3) + 3 == 18
    assert out.latents.shape == (B, C, 18, H, W) and out.video.shape == (B, 3, 18, 2 * H, 2 * W)
    assert [c["prompts"] for c in sampler.calls] == [["text A", "text C"], ["text A", "text C"],
                                                     ["text B", "text C"]]
    # the strategy strings the original builds: "{k},{len(refs)-1},-{cfl},0,{cfl}" appended per loop
    assert out.strategies == ["1,0,-3,0,3;2,1,-3,0,3", "0;1,1,-3,0,3;2,2,-3,0,3"]
    assert loop_strategy(1, 0, 3) == "1,0,-3,0,3" and append_strategy(None, "x") == "x"
    # loop 0: the user's image at frame 0 of prompt 1; later loops: the first 3 frames conditioned
    assert out.masks[0].tolist() == [[1.0] * T, [0.0] + [1.0] * (T - 1)]
    for m in out.masks[1:]:
        assert m.tolist() == [[0.0] * 3 + [1.0] * (T - 3)] * 2
    np.testing.assert_array_equal(out.clips[0][1, :, 0], image[:, 0])
    # reencode (the original): clip k+1 starts with the last frames of encode(decode(clip k))
    for k in range(2):
        np.testing.assert_array_equal(out.clips[k + 1][:, :, :3], encode(decode(out.clips[k]))[:, :, -3:])
        assert np.abs(out.clips[k + 1][:, :, :3] - out.clips[k][:, :, -3:]).max() > 1e-3
    # the joined latents / video: clip 0, then each later clip without its first cfl frames
    np.testing.assert_array_equal(out.latents[:, :, :T], out.clips[0])
    np.testing.assert_array_equal(out.latents[:, :, T:T + 5], out.clips[1][:, :, 3:])
    np.testing.assert_array_equal(out.video[:, :, T + 5:], decode(out.clips[2])[:, :, 3:])


def test_continuity_in_latent_space_without_reencoding():
    refs, strategies = [[], []], [None, None]
    out = generate_loop(KeepSampler(), noise_fn(), [["a"] * 4, ["b"] * 4], refs, strategies, loop=4,
                        condition_frame_length=2, reencode=False)
    assert out.latents.shape[2] == loop_video_length(4, T, 2) == 26 and out.video is None
    for k in range(3):
        np.testing.assert_array_equal(out.clips[k + 1][:, :, :2], out.clips[k][:, :, -2:])
    assert refs == [[], []] and strategies == [None, None]  # the caller's lists are not grown
    one = generate_loop(KeepSampler(), noise_fn(), [["a"], ["b"]], [[], []], [None, None], loop=1)
    assert one.latents.shape[2] == T and one.strategies == [None, None]


def test_loop_errors():
    args = (KeepSampler(), noise_fn(), [["a"] * 2, ["b"] * 2], [[], []], [None, None])
    with pytest.raises(ValueError, match=r"condition_frame_length must be in 1..7"):
        generate_loop(*args, loop=2, condition_frame_length=0, reencode=False)
    with pytest.raises(ValueError, match=r"condition_frame_length must be in 1..7"):
        generate_loop(*args, loop=2, condition_frame_length=8, reencode=False)
    with pytest.raises(ValueError, match="needs the VAE's encode and decode"):
        generate_loop(*args, loop=2, condition_frame_length=2)
    with pytest.raises(ValueError, match="text for each of the 3 loops"):
        generate_loop(*args, loop=3, condition_frame_length=2, reencode=False)
    with pytest.raises(ValueError, match="field length = 0 must be >= 1"):
        generate_loop(KeepSampler(), noise_fn(), [["a"], ["b"]], [[], []], ["0,0,0,0,0", None])


# ----------------------------------------------------------------------------- through the real sampler
def eps_model(x, t, y=None, mask=None, x_mask=None):
    """CFG-batch dummy: eps = 0.1 x, v = 0 (float32)."""
    return ms.ops.cat([0.1 * x, ms.ops.zeros_like(x)], axis=1)


def iddpm_clip(diff):
    y = ms.Tensor(np.ones((B, 1, 3, 5), np.float32))
    y_null = ms.Tensor(np.zeros((1, 1, 3, 5), np.float32))

    def sample_clip(z, mask, prompts):
        return diff.sample(eps_model, z.shape, y, None, y_null, noise=ms.Tensor(z), progress=False,
                           frame_mask=mask).asnumpy()
    return sample_clip


@pytest.fixture(scope="module")
def exact():
    return IDDPM(num_sampling_steps=5, exact_conditioning=True)


def test_reference_frames_exact_through_iddpm(exact):
    """Image-to-video and video extension: mask-0 frames come out exactly as given (exact_conditioning);
    with the original rule they are within 0.01 |eps - eps_model| of it."""
    rng = np.random.default_rng(3)
    image = rng.standard_normal((C, 1, H, W)).astype(np.float32)
    video = rng.standard_normal((C, 6, H, W)).astype(np.float32)
    z = rng.standard_normal((B, C, T, H, W)).astype(np.float32)
    z_cond, mask = apply_mask_strategy(z, [[image], [video]], ["0", "0,0,0,-4,4"])
    ms.set_seed(0)
    out = iddpm_clip(exact)(z_cond, mask, ["a", "b"])
    np.testing.assert_array_equal(out[0, :, 0], image[:, 0])
    np.testing.assert_array_equal(out[1, :, 4:], video[:, :4])
    assert np.abs(out[0, :, 1:] - z[0, :, 1:]).max() > 1e-2  # the other frames were generated
    ms.set_seed(0)
    orig = iddpm_clip(IDDPM(num_sampling_steps=5))(z_cond, mask, ["a", "b"])
    dev = np.abs(orig[0, :, 0] - image[:, 0]).max()
    assert 0 < dev < 0.1


def test_edit_ratio_and_loop_through_iddpm(exact):
    """An edit ratio 0.4 of 5 steps releases the reference at step 2: the frame is the reference while
    t > 2 and regenerated afterwards; loop continuity holds exactly in latent space."""
    rng = np.random.default_rng(4)
    video = rng.standard_normal((C, T, H, W)).astype(np.float32)
    seen = []

    def recording(x, t, y=None, mask=None, x_mask=None):
        seen.append((int(t.asnumpy()[0]), x.asnumpy()[0].copy(), x_mask.asnumpy()[0].copy()))
        return eps_model(x, t)

    z = rng.standard_normal((1, C, T, H, W)).astype(np.float32)
    z_cond, mask = apply_mask_strategy(z, [[video]], ["0,0,0,0,8,0.4"])
    np.testing.assert_allclose(mask[0], np.float32(0.4))
    exact.sample(recording, z.shape, ms.Tensor(np.ones((1, 1, 3, 5), np.float32)), None,
                 ms.Tensor(np.zeros((1, 1, 3, 5), np.float32)), noise=ms.Tensor(z_cond), progress=False,
                 frame_mask=mask)
    timesteps = exact.timestep_map  # the model sees original timesteps; step index k = 4 .. 0
    assert [s[0] for s in seen] == timesteps[::-1]
    for k, (_, x, x_mask) in zip(range(4, -1, -1), seen):
        assert x_mask.tolist() == [k < 2] * T  # int(0.4 * 5) = 2: conditioning until step 2
        if k > 2:
            np.testing.assert_array_equal(x, video)
        else:
            assert np.abs(x - video).max() > 1e-3  # re-noised at step 2, then denoised
    # loop: 3 clips through the sampler, latents reused
    out = generate_loop(iddpm_clip(exact), noise_fn(5), [["a"] * 3, ["b"] * 3], [[], []], [None, None], loop=3,
                        condition_frame_length=2, reencode=False)
    assert out.latents.shape == (B, C, loop_video_length(3, T, 2), H, W)
    for k in range(2):
        np.testing.assert_array_equal(out.clips[k + 1][:, :, :2], out.clips[k][:, :, -2:])
