"""Inference conditioning of Open-Sora 1.1: the mask-strategy grammar (every example of SPEC-1.1 §3.3 and
§3.5), apply_mask_strategy on hand-made latents, the prompt syntax (JSON options, per-loop prompts) and
their errors. Pure numpy: values are copied, so equality is exact."""
from __future__ import annotations

import numpy as np
import pytest

from opensora.sampling.conditioning import MaskInsertion, MaskStrategyError, apply_mask_strategy, \
    parse_mask_strategy
from opensora.sampling.prompts import PromptSyntaxError, plan_prompts, split_loop_prompts, split_prompt_options


def fields(strategy):
    return [(i.loop_id, i.ref_id, i.ref_start, i.target_start, i.length, i.edit_ratio)
            for i in parse_mask_strategy(strategy)]


# ----------------------------------------------------------------------------- grammar
def test_spec_examples_parse():
    assert fields("0") == [(0, 0, 0, 0, 1, 0.0)]  # image-to-video
    assert fields("0,0,0,-8,8") == [(0, 0, 0, -8, 8, 0.0)]  # video extension
    assert fields("0;0,1,0,-1,1") == [(0, 0, 0, 0, 1, 0.0), (0, 1, 0, -1, 1, 0.0)]  # connect two images
    assert fields("0,0,0,0,32,0.4") == [(0, 0, 0, 0, 32, 0.4)]  # video-to-video editing
    assert fields("0,0,0,0,8,0.3") == [(0, 0, 0, 0, 8, 0.3)]  # sample-ref.py
    assert fields("0,0,0,0,16") == [(0, 0, 0, 0, 16, 0.0)]  # the long-video example's reference
    assert fields("0,0,0,0,1;0,0,0,-1,1") == [(0, 0, 0, 0, 1, 0.0), (0, 0, 0, -1, 1, 0.0)]  # docs/config.md
    assert fields("1,1,-4,0,4") == [(1, 1, -4, 0, 4, 0.0)]  # what loop generation appends
    assert parse_mask_strategy(None) == []


def test_right_padding_with_defaults():
    assert fields("2") == [(2, 0, 0, 0, 1, 0.0)]
    assert fields("1,2") == [(1, 2, 0, 0, 1, 0.0)]
    assert fields("1,2,3") == [(1, 2, 3, 0, 1, 0.0)]
    assert fields("1,2,3,4") == [(1, 2, 3, 4, 1, 0.0)]
    assert fields("1,2,3,4,5") == [(1, 2, 3, 4, 5, 0.0)]
    assert fields(" 1, 2 ,3,4,5, 0.25 ") == [(1, 2, 3, 4, 5, 0.25)]
    ins = parse_mask_strategy("0,0,0,-8,8")[0]
    assert isinstance(ins, MaskInsertion) and ins.text == "0,0,0,-8,8"
    assert all(isinstance(v, int) for v in (ins.loop_id, ins.ref_id, ins.ref_start, ins.target_start, ins.length))
    assert isinstance(ins.edit_ratio, float)


@pytest.mark.parametrize("strategy, match", [
    ("", r"prompt 3 is empty; use null"),
    ("   ", r"prompt 3 is empty"),
    ("0;;1", r"prompt 3, insertion 1 \(''\): empty field"),
    ("0;", r"prompt 3, insertion 1 \(''\): empty field"),
    ("0,,1", r"prompt 3, insertion 0 \('0,,1'\): empty field"),
    ("1,2,3,4,5,6,7", r"insertion 0 .*: 7 fields, at most 6"),
    ("a", r"field loop_id = 'a' is not an integer"),
    ("0,0,0,0,1.5", r"field length = '1.5' is not an integer"),
    ("0,0,0,0,1,x", r"field edit_ratio = 'x' is not a number"),
    ("0;0,0,0,0,0", r"prompt 3, insertion 1 .*field length = 0 must be >= 1"),
    ("0,0,0,0,1,1.5", r"field edit_ratio = 1.5 must lie in \[0, 1\]"),
    ("0,0,0,0,1,-0.1", r"field edit_ratio = -0.1 must lie in \[0, 1\]"),
    ("0,-1", r"field ref_id = -1 must be >= 0"),
    ("-1", r"field loop_id = -1 must be >= 0"),
])
def test_malformed_strategies(strategy, match):
    with pytest.raises(MaskStrategyError, match=match):
        parse_mask_strategy(strategy, prompt_index=3)


# ----------------------------------------------------------------------------- apply
C, T, H, W = 2, 16, 3, 4


@pytest.fixture
def lat():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, C, T, H, W)).astype(np.float32)
    image = rng.standard_normal((C, 1, H, W)).astype(np.float32)
    image2 = rng.standard_normal((C, 1, H, W)).astype(np.float32)
    video = rng.standard_normal((C, 10, H, W)).astype(np.float32)
    return z, image, image2, video


def test_image_to_video_and_none(lat):
    z, image, _, _ = lat
    z0 = z.copy()
    out, mask = apply_mask_strategy(z, [[image], None], ["0", None])
    np.testing.assert_array_equal(out[0, :, 0], image[:, 0])
    np.testing.assert_array_equal(out[0, :, 1:], z[0, :, 1:])
    np.testing.assert_array_equal(out[1], z[1])  # no strategy: untouched, mask 1
    assert mask.dtype == np.float32 and mask.shape == (2, T)
    assert mask[0].tolist() == [0.0] + [1.0] * 15 and mask[1].tolist() == [1.0] * 16
    np.testing.assert_array_equal(z, z0)  # the caller's noise is not written into


def test_extension_connect_edit(lat):
    z, image, image2, video = lat
    out, mask = apply_mask_strategy(z, [[video], [image, image2]], ["0,0,0,-8,8", "0;0,1,0,-1,1"])
    np.testing.assert_array_equal(out[0, :, 8:], video[:, :8])  # first 8 reference frames -> last 8 positions
    np.testing.assert_array_equal(out[0, :, :8], z[0, :, :8])
    assert mask[0].tolist() == [1.0] * 8 + [0.0] * 8
    np.testing.assert_array_equal(out[1, :, 0], image[:, 0])
    np.testing.assert_array_equal(out[1, :, -1], image2[:, 0])
    assert mask[1].tolist() == [0.0] + [1.0] * 14 + [0.0]
    # editing: all frames copied with edit ratio 0.4 (a reference as long as the clip)
    long_video = np.random.default_rng(1).standard_normal((C, T, H, W)).astype(np.float32)
    out, mask = apply_mask_strategy(z[:1], [[long_video]], ["0,0,0,0,16,0.4"])
    np.testing.assert_array_equal(out[0], long_video)
    np.testing.assert_allclose(mask[0], np.float32(0.4))
    # sample-ref.py: the first 8 frames of a video, edit 0.3; negative ref_start counts from the end
    out, mask = apply_mask_strategy(z[:1], [[video]], ["0,0,0,0,8,0.3;0,0,-4,12,4"])
    np.testing.assert_array_equal(out[0, :, :8], video[:, :8])
    np.testing.assert_array_equal(out[0, :, 12:], video[:, 6:])
    np.testing.assert_allclose(mask[0], [0.3] * 8 + [1.0] * 4 + [0.0] * 4)


def test_image_fills_range_overwrite_order_and_loop_filter(lat):
    z, image, image2, video = lat
    out, mask = apply_mask_strategy(z[:1], [[image]], ["0,0,0,0,16,0.4"])  # 1-frame reference fills the range
    np.testing.assert_array_equal(out[0], np.repeat(image, T, axis=1))
    out, mask = apply_mask_strategy(z[:1], [[image]], ["0,0,0,0,1;0,0,0,-1,1"])  # docs/config.md example
    np.testing.assert_array_equal(out[0, :, 0], image[:, 0])
    np.testing.assert_array_equal(out[0, :, -1], image[:, 0])
    # later insertions overwrite earlier ones
    out, mask = apply_mask_strategy(z[:1], [[video, image2]], ["0,0,0,0,4,0.5;0,1,0,2,1"])
    np.testing.assert_array_equal(out[0, :, :2], video[:, :2])
    np.testing.assert_array_equal(out[0, :, 2], image2[:, 0])
    np.testing.assert_array_equal(out[0, :, 3], video[:, 3])
    assert mask[0, :5].tolist() == [0.5, 0.5, 0.0, 0.5, 1.0]
    # only this loop's insertions apply
    out, mask = apply_mask_strategy(z[:1], [[video, image]], ["0;1,1,0,3,1"], loop_i=1)
    np.testing.assert_array_equal(out[0, :, 3], image[:, 0])
    np.testing.assert_array_equal(np.delete(out[0], 3, axis=1), np.delete(z[0], 3, axis=1))
    assert mask[0].tolist() == [1.0] * 3 + [0.0] + [1.0] * 12
    # parsed insertions are accepted as well
    a = apply_mask_strategy(z[:1], [[video]], [parse_mask_strategy("0,0,0,-8,8")])
    b = apply_mask_strategy(z[:1], [[video]], ["0,0,0,-8,8"])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("strategy, refs, match", [
    ("0,1", "video", r"prompt 0, insertion 0 \('0,1'\): field ref_id = 1 but prompt 0 has 1 reference"),
    ("0", None, r"field ref_id = 0 but prompt 0 has 0 reference"),
    ("0,0,0,10,8", "video", r"field length = 8 runs past the clip: frames 10..17 of 16 .*at most 6"),
    ("0,0,0,0,32,0.4", "image", r"field length = 32 runs past the clip"),
    ("0,0,0,-17,1", "video", r"field target_start = -17 is outside the clip of 16"),
    ("0,0,0,16,1", "video", r"field target_start = 16 is outside the clip"),
    ("0,0,5,0,8", "video", r"field length = 8 runs past reference 0: its frames 5..12 of 10 .*at most 5"),
    ("0,0,-11,0,1", "video", r"field ref_start = -11 is outside reference 0 of 10"),
    ("0,0,1,0,1", "image", r"field ref_start = 1 is outside reference 0 of 1"),
    ("0", "wide", r"reference 0 has latent shape \(2, 1, 3, 5\), expected \[2, T_ref, 3, 4\]"),
])
def test_bad_references_and_ranges(lat, strategy, refs, match):
    z, image, _, video = lat
    ref = {"video": [video], "image": [image], "wide": [np.zeros((C, 1, H, W + 1), np.float32)], None: None}[refs]
    with pytest.raises(MaskStrategyError, match=match):
        apply_mask_strategy(z[:1], [ref], [strategy])
    with pytest.raises(ValueError, match="one of each per prompt"):
        apply_mask_strategy(z, [[video]], ["0"])


# ----------------------------------------------------------------------------- prompts
def test_prompt_options():
    text, opts = split_prompt_options(
        'A breathtaking sunrise scene.{"reference_path": "assets/images/condition/wave.png","mask_strategy": "0"}')
    assert text == "A breathtaking sunrise scene."
    assert opts == {"reference_path": "assets/images/condition/wave.png", "mask_strategy": "0"}
    assert split_prompt_options("a [red] cat") == ("a [red] cat", {})  # the original crashes on '['
    assert split_prompt_options("a {red} cat on a mat") == ("a {red} cat on a mat", {})
    assert split_prompt_options('a {red} cat {"mask_strategy": "0"} ') == ("a {red} cat", {"mask_strategy": "0"})
    assert split_prompt_options('two [1, 2] {"reference_path": ["a.png", "b.mp4"]}')[1] == {
        "reference_path": ["a.png", "b.mp4"]}
    with pytest.raises(PromptSyntaxError, match=r"prompt 2 ends with '}' but holds no JSON object"):
        split_prompt_options("a cat {playing}", 2)
    with pytest.raises(PromptSyntaxError, match=r"prompt 1: unknown option\(s\) \['seed'\]"):
        split_prompt_options('a cat {"seed": 3}', 1)
    with pytest.raises(PromptSyntaxError, match="mask_strategy must be a string"):
        split_prompt_options('a cat {"mask_strategy": 0}')
    with pytest.raises(PromptSyntaxError, match="reference_path must be a string"):
        split_prompt_options('a cat {"reference_path": 3}')
    with pytest.raises(PromptSyntaxError, match="options must end the prompt"):
        split_prompt_options('|0|a {"mask_strategy": "0"}|1|b')


def test_loop_prompts():
    assert split_loop_prompts("|0|text A|2|text B", 4) == ["text A", "text A", "text B", "text B"]
    assert split_loop_prompts("|0|only", 3) == ["only"] * 3
    assert split_loop_prompts("plain | text", 2) == ["plain | text"] * 2
    assert split_loop_prompts("|x| not a segment", 1) == ["|x| not a segment"]
    # the long-video example of docs/commands.md: 8 prompts over 16 loops, JSON options at the end
    segs = ["forest", "desert", "mountain", "city", "river", "lake", "sky", "universe"]
    raw = "".join(f"|{2 * k}|a jeep in the {s}." for k, s in enumerate(segs)) + \
        '{"reference_path": "https://cdn.openai.com/tmp/s/interp/d0.mp4", "mask_strategy": "0,0,0,0,16"}'
    text, opts = split_prompt_options(raw)
    texts = split_loop_prompts(text, 16)
    assert texts == [f"a jeep in the {s}." for s in segs for _ in range(2)] and opts["mask_strategy"] == "0,0,0,0,16"
    for bad, match in [("|1|a", r"prompt 5: per-loop prompts must start at \|0\|, got \|1\|"),
                       ("|0|a|0|b", r"starts must increase, got \|0\| then \|0\|"),
                       ("|0|a|4|b", r"segment \|4\| starts at loop 4 but loop=4 runs loops 0..3"),
                       ("|0|a|b", r"\|k\|text pairs"),
                       ("|0||2|b", "empty text"),
                       ("|0|a|two|b", r"start 'two' is not an integer")]:
        with pytest.raises(PromptSyntaxError, match=match):
            split_loop_prompts(bad, 4, 5)


def test_plan_prompts_sample_ref_config():
    """configs/opensora-v1-1/inference/sample-ref.py: 3 prompts, one with JSON options, loop 2."""
    prompts = ["A car driving on the ocean.",
               'Drone view of waves.{"reference_path": "assets/images/condition/cliff.png", "mask_strategy": "0"}',
               "In an ornate, historical hall, a massive tidal wave peaks."]
    plans = plan_prompts(prompts, loop=2,
                         reference_paths=["https://cdn.openai.com/tmp/s/interp/d0.mp4", None,
                                          "assets/images/condition/wave.png"],
                         mask_strategies=["0,0,0,0,8,0.3", None, "0"])
    assert [p.texts for p in plans] == [[prompts[0]] * 2, ["Drone view of waves."] * 2, [prompts[2]] * 2]
    assert [p.reference_paths for p in plans] == [["https://cdn.openai.com/tmp/s/interp/d0.mp4"],
                                                  ["assets/images/condition/cliff.png"],
                                                  ["assets/images/condition/wave.png"]]
    assert [p.mask_strategy for p in plans] == ["0,0,0,0,8,0.3", "0", "0"]
    assert plans[0].insertions[0].length == 8
    two = plan_prompts(['x {"reference_path": "a.png;b.png", "mask_strategy": "0;0,1,0,-1,1"}'])[0]
    assert two.reference_paths == ["a.png", "b.png"] and len(two.insertions) == 2
    assert plan_prompts(["plain"])[0].insertions == [] and plan_prompts(["plain"])[0].reference_paths == []
    # ref ids: loop k may use the k clips loop generation appends
    assert plan_prompts(["a"], loop=3, mask_strategies=["2,1,0,0,1"])[0].insertions[0].ref_id == 1
    with pytest.raises(PromptSyntaxError, match=r"prompt 0, insertion 0 .*field ref_id = 2 but prompt 0 has 0 "
                                                 r"reference path\(s\) and 2 generated clip"):
        plan_prompts(["a"], loop=3, mask_strategies=["2,2"])
    with pytest.raises(PromptSyntaxError, match=r"prompt 1, insertion 1 .*field ref_id = 1 but prompt 1 has 1"):
        plan_prompts(["a", "b"], reference_paths=[None, "x.png"], mask_strategies=[None, "0;0,1"])
    with pytest.raises(PromptSyntaxError, match=r"field loop_id = 2 but loop=2 runs loops 0..1"):
        plan_prompts(["a"], loop=2, reference_paths=["x.png"], mask_strategies=["2"])
    with pytest.raises(ValueError, match="reference_path has 1 entries for 2 prompts"):
        plan_prompts(["a", "b"], reference_paths=["x.png"])
