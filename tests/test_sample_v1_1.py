"""Open-Sora 1.1 generation through task=sample (STDiT2): named sizes and floor latents, the references' resize
against torch / PIL, the size conditioning the model receives, conditioning, loops, prompt-named resumable
generation, the recipes, and the bad-input errors before any model is built.

Fast tests run in-process on a tiny STDiT2 (hidden 24, one block, random weights perturbed so that every layer
matters); the end-to-end `run.py` runs are marked slow.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import CONF, compose_cfg, run_cli, write_mp4

T5_DIM, T5_LEN = 16, 8
CAPTIONS = ["a red square moving left", "a blue circle moving up", "a sunset over the sea", "a dog runs"]


def perturbed(model, seed):
    """Every parameter + N(0, 0.05^2): the zero-initialised layers (final layer, temporal projections, gates)
    then carry the inputs through, so a wrong conditioning value changes the output."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for _, p in model.parameters_and_names():
        p.set_data(ms.Tensor(p.asnumpy() + 0.05 * rng.standard_normal(p.shape).astype(np.float32)))
    return model


def tiny_stdit2(in_channels=3, seed=0):
    from opensora.model import STDiT2

    return perturbed(STDiT2(in_channels=in_channels, hidden_size=24, depth=1, num_heads=2, caption_channels=T5_DIM,
                            model_max_length=T5_LEN, input_sq_size=32), seed)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny T5 folder, tiny STDiT2 checkpoints for pixel space (3 channels) and for a tiny SD VAE (4 channels,
    factor 2; written by VideoAutoencoderKL.save_checkpoint with its config.json), a reference image and video."""
    import mindspore as ms
    from PIL import Image

    from opensora.text_encoder import T5Embedder, train_sentencepiece
    from opensora.vae import VideoAutoencoderKL

    out = tmp_path_factory.mktemp("assets11")
    spiece = train_sentencepiece(CAPTIONS * 4, str(out / "tok"), vocab_size=40)
    T5Embedder(config=dict(vocab_size=40, d_model=T5_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
               tokenizer_path=spiece, model_max_length=T5_LEN, clean_caption=False).save_pretrained(str(out / "t5"))
    for name, channels in (("stdit2.ckpt", 3), ("stdit2_c4.ckpt", 4)):
        ms.save_checkpoint([{"name": n, "data": p} for n, p in tiny_stdit2(channels).parameters_and_names()],
                           str(out / name))
    vae = VideoAutoencoderKL(config=dict(in_channels=3, out_channels=3, block_out_channels=[8, 16],
                                         layers_per_block=1, norm_num_groups=4, latent_channels=4,
                                         down_block_types=["DownEncoderBlock2D"] * 2,
                                         up_block_types=["UpDecoderBlock2D"] * 2), seed=3)
    vae.save_checkpoint(out / "vae" / "vae.ckpt")
    r, c = np.mgrid[0:30, 0:52]
    Image.fromarray(np.stack([4 * c, 8 * r, np.full_like(r, 90)], -1).astype(np.uint8)).save(out / "ref.png")
    frames = np.random.default_rng(5).integers(0, 256, (6, 30, 50, 3), np.uint8)
    write_mp4(out / "ref.mp4", frames, 8)
    (out / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    return out


def tiny_args(assets: Path, vae: bool = False) -> list[str]:
    """The tiny STDiT2 / T5 (pixel space, or the tiny SD VAE), 3 IDDPM steps, no tracking; the weights as
    model.pretrained (task.ckpt_path's default), so the same list serves task=embed_text and task=decode."""
    args = ["data=prompts", "data.prompt_file=null", "model=stdit2_tiny", "model.hidden_size=24",
            "model.depth=1", "model.num_heads=2", f"model.caption_channels={T5_DIM}",
            f"model.model_max_length={T5_LEN}", "text_encoder=t5_folder", f"text_encoder.from_pretrained={assets}/t5",
            f"text_encoder.output_dim={T5_DIM}", f"text_encoder.model_max_length={T5_LEN}", "scheduler=iddpm",
            "scheduler.num_sampling_steps=3", "logger=none"]
    if vae:
        return args + ["vae=sd_vae_ft_ema", f"vae.from_pretrained={assets}/vae/vae.ckpt", "vae.downsample=[1,2,2]",
                       "vae.micro_batch_size=null", f"model.pretrained={assets}/stdit2_c4.ckpt"]
    return args + ["vae=identity", f"model.pretrained={assets}/stdit2.ckpt", "scheduler.clip_denoised=true"]


# ================================================================
# Sizes, recipes
# ================================================================


def test_named_sizes_floor_latents_and_the_recipe(tmp_path):
    from hydra.utils import instantiate

    from opensora.config import latent_size

    cfg = compose_cfg(["experiment=sample_v1_1", "paths.pretrained_dir=/weights"], tmp_path)
    assert list(cfg.data.image_size) == [240, 426] and list(cfg.model.input_size) == [16, 30, 53]
    assert cfg.model._target_ == "opensora.model.STDiT2" and cfg.model.pretrained == "/weights/OpenSora-STDiT-v2-stage3"
    assert cfg.task.ckpt_path == cfg.model.pretrained and cfg.model.input_sq_size == 512
    assert (cfg.data.fps, cfg.data.frame_interval, cfg.task.fps) == (24, 3, 8)  # saved at fps // frame_interval
    assert (cfg.text_encoder.model_max_length, cfg.model.model_max_length) == (200, 200)
    assert cfg.text_encoder.from_pretrained == "/weights/t5-v1_1-xxl"
    assert cfg.vae.from_pretrained == "/weights/sd-vae-ft-ema"
    s = cfg.scheduler
    assert (s.num_sampling_steps, s.cfg_scale, s.cfg_channel, s.clip_denoised, s.exact_conditioning) == \
        (100, 7.0, 3, False, False)
    assert len(instantiate(s).timestep_map) == 100 and cfg.seed == 42 and cfg.precision.dtype == "fp32"
    for extra, size, latent in ((["data.resolution=480p", "data.aspect_ratio=1:1"], [640, 640], [16, 80, 80]),
                                (["data.aspect_ratio=0.75"], [276, 368], [16, 34, 46]),
                                (["data.resolution=null", "data.image_size=[24,40]", "data.num_frames=1"], [24, 40],
                                 [1, 3, 5])):
        cfg = compose_cfg(["experiment=sample_v1_1", *extra], tmp_path)
        assert list(cfg.data.image_size) == size and list(cfg.model.input_size) == latent, extra
    # STDiT keeps its refusal; STDiT2 floors as the original's get_latent_size
    assert latent_size(16, [240, 426], [1, 8, 8], "floor") == [16, 30, 53]
    with pytest.raises(ValueError, match="not divisible"):
        latent_size(16, [240, 426], [1, 8, 8])
    cfg = compose_cfg(["experiment=sample_v1_1", "data.aspect_ratio=7:5"], tmp_path)
    with pytest.raises(Exception, match="not in the 240p table"):
        list(cfg.data.image_size)
    # the conditioning recipes: their keys, and their default references exist
    cfg = compose_cfg(["experiment=sample_v1_1_i2v"], tmp_path)
    assert cfg.task.mask_strategy == "0" and Path(cfg.task.reference_path).is_file() and cfg.task.prompt_file is None
    cfg = compose_cfg(["experiment=sample_v1_1_extend"], tmp_path)
    assert cfg.task.mask_strategy == "0,0,-4,0,4" and Path(cfg.task.reference_path).suffix == ".mp4"
    cfg = compose_cfg(["experiment=sample_v1_1_loop"], tmp_path)
    assert (cfg.task.loop, cfg.task.condition_frame_length) == (3, 4) and cfg.task.prompts[0].startswith("|0|")
    for name in ("sample_v1_1", "sample_v1_1_i2v", "sample_v1_1_extend", "sample_v1_1_loop"):
        assert f"#   python run.py experiment={name}\n" in (CONF / "experiment" / f"{name}.yaml").read_text()


def test_size_conditions_are_the_original_inference_values():
    from opensora.model.stdit2_conditions import size_conditions

    c = size_conditions(2, 16, 240, 426, 24)
    assert {k: v.tolist() for k, v in c.items()} == {"num_frames": [16.0] * 2, "height": [240.0] * 2,
                                                     "width": [426.0] * 2, "ar": [np.float32(240 / 426)] * 2,
                                                     "fps": [24.0] * 2}
    assert size_conditions(1, 1, 1024, 1024, 24)["fps"].tolist() == [120.0]  # images: IMG_FPS
    assert size_conditions(1, 16, 240, 426, 24, ar=426 / 240)["ar"][0] == np.float32(426 / 240)  # training's W/H


# ================================================================
# References: the original's resize_crop
# ================================================================


@pytest.mark.parametrize("src,dst", [((30, 50), (24, 40)), ((48, 80), (20, 43)), ((90, 40), (32, 32)),
                                     ((17, 23), (40, 60))])
def test_fill_crop_video_matches_torch_interpolate(src, dst):
    """The original's video path: ToTensorVideo, F.interpolate(size, bilinear, align_corners=False), crop at
    int(round(s - t) / 2.0), Normalize(0.5, 0.5). fp32 against fp32: the weights come from float64 here and
    float32 in torch, ~1e-6 of the [-1, 1] range."""
    torch = pytest.importorskip("torch")
    from opensora.data.fill_crop import fill_crop_video, fill_geometry

    frames = np.random.default_rng(0).integers(0, 256, (3, *src, 3), np.uint8)
    (sh, sw), (i, j), _ = fill_geometry(*src, dst)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
    ref = ((x[:, :, i:i + dst[0], j:j + dst[1]] - 0.5) / 0.5).permute(0, 2, 3, 1).numpy()
    got = fill_crop_video(frames, dst)
    assert got.shape == (3, *dst, 3) and np.abs(got - ref).max() < 1e-5


def test_fill_crop_image_is_pil_bicubic_with_rounded_offsets():
    from PIL import Image

    from opensora.data.fill_crop import fill_crop_image, fill_geometry

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 52, 3), np.uint8))
    (sh, sw), video_off, (i, j) = fill_geometry(30, 52, (24, 40))
    assert (sh, sw) == (24, round(52 * 24 / 30)) == (24, 42) and (i, j) == (0, 1) and video_off == (0, 1)
    ref = np.asarray(img.resize((sw, sh), Image.BICUBIC), np.float32)[i:i + 24, j:j + 40] / 255.0 * 2 - 1
    np.testing.assert_allclose(fill_crop_image(img, (24, 40))[0], ref, atol=1e-6)
    # 240p from a 1280x720 frame: width 426.67 -> 427, the video crop floors the offset, the image rounds it
    assert fill_geometry(720, 1280, (240, 426))[:2] == ((240, 427), (0, 0))
    assert fill_geometry(720, 1280, (240, 426))[2] == (0, 0)
    assert fill_geometry(30, 54, (24, 40))[1:] == ((0, 1), (0, 2))  # 43 - 40 = 3: floor(1.5) vs round(1.5)


def test_sd_vae_encodes_sizes_its_factor_does_not_divide_as_diffusers(tmp_path):
    """240 x 426 references: diffusers' AutoencoderKL takes any size (each downsampling pads one row / column and
    halves with floor); VideoAutoencoderKL(strict_size=False) gives the same latents (fp32: ~1e-6 of their scale),
    and by default still refuses such sizes."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from opensora.vae import VideoAutoencoderKL

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[8, 16, 16], layers_per_block=1,
                                  norm_num_groups=4, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 3,
                                  up_block_types=["UpDecoderBlock2D"] * 3).eval()
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 2, 30, 53)).astype(np.float32)  # factor 4: 7 x 13
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(x[:, :, 0])).latent_dist.mean.numpy()
    vae = VideoAutoencoderKL(from_pretrained=str(tmp_path / "vae"))
    got = vae.latent_dist(x, strict_size=False).mean
    assert got.shape == (1, 4, 2, 7, 13) and np.abs(got[:, :, 0] - want).max() < 1e-5 * max(1.0, np.abs(want).max())
    with pytest.raises(ValueError, match="not divisible"):
        vae.encode(x)


def test_references_read_only_their_frames_and_errors_name_the_file(assets):
    from opensora.sampling.conditioning import MaskStrategyError, parse_mask_strategy
    from opensora.sampling.references import ReferenceError, encode_references, read_references
    from opensora.vae import IdentityVAE

    ins = parse_mask_strategy("0,0,-2,0,2;0,1,0,3,1")
    refs = read_references([str(assets / "ref.mp4"), str(assets / "ref.png")], ins, (24, 40), 4)
    assert [(r.num_frames, r.frames) for r in refs] == [(6, [4, 5]), (1, [0])]
    z = encode_references(refs, IdentityVAE(), (24, 40))
    assert z[0].shape == (3, 6, 24, 40) and not z[0][:, :4].any() and z[0][:, 4:].any()
    with pytest.raises(MaskStrategyError, match=r"prompt 2, insertion 0 .*field length = 3 runs past reference 0"):
        read_references([str(assets / "ref.mp4")], parse_mask_strategy("0,0,4,0,3"), (24, 40), 4, prompt_index=2)
    with pytest.raises(ReferenceError, match=r"reference 0 of prompt 1 \(.*corrupt.mp4\): cannot be read"):
        read_references([str(assets / "corrupt.mp4")], parse_mask_strategy("0"), (24, 40), 4, prompt_index=1)
    with pytest.raises(ReferenceError, match="is a URL: nothing is downloaded"):
        read_references(["https://example.com/a.mp4"], parse_mask_strategy("0"), (24, 40), 4)


# ================================================================
# Bad input: refused by the validation pass, before anything is built or written
# ================================================================

BAD = [
    (["task.prompts=[a,b]", "task.mask_strategy=[null,'0,x']"],
     "task.mask_strategy: mask strategy of prompt 1, insertion 0 ('0,x'): field ref_id = 'x' is not an integer"),
    (["task.prompts=[a,b]", "task.mask_strategy=[null,'0,0,0,1,4']", "task.reference_path={ref}"],
     "mask strategy of prompt 1, insertion 0 ('0,0,0,1,4'): field length = 4 runs past the clip"),
    (["task.prompts=[a]", "task.mask_strategy='0;0,1'", "task.reference_path={ref}"],
     "task.mask_strategy: mask strategy of prompt 0, insertion 1 ('0,1'): field ref_id = 1 but prompt 0 has 1 "
     "reference path(s)"),
    (["task.prompts=[a]", "task.mask_strategy='0,0,0,0,1,2'", "task.reference_path={ref}"],
     "field edit_ratio = 2.0 must lie in [0, 1]"),
    (["task.prompts=[a]", "task.mask_strategy=0", "task.reference_path=nowhere/x.png"],
     "task.reference_path: reference 0 of prompt 0 (nowhere/x.png): no such file"),
    (["task.prompts=[a]", "task.mask_strategy=0", "task.reference_path=https://x.org/a.png"],
     "is a URL: nothing is downloaded at run time"),
    (["task.prompts=[a,b]", "task.mask_strategy=[0,0,0]"], "task.mask_strategy has 3 entries for 2 prompts"),
    (["task.prompts=[a]", "task.loop=2", "task.condition_frame_length=2"],
     "task.condition_frame_length=2: loop generation (task.loop=2)"),
    (["task.prompts=['b{\"mask_strategy\": \"0,0,0,0,1,0,0\"}']"],
     "task.mask_strategy: mask strategy of prompt 0, insertion 0 ('0,0,0,0,1,0,0'): 7 fields, at most 6"),
    (["task.prompts=['|0|a|3|b']", "task.loop=2"], "task.prompts: prompt 0: segment |3| starts at loop 3"),
    (["task.prompts=[a/b]", "task.name_by_prompt=true"], "task.name_by_prompt: prompt 0 holds a '/'"),
    (["task.prompts=[a]", "task.name_by_prompt=true", "task.save_latents=true"],
     "task.name_by_prompt=true names the decoded videos, but task.save_latents=true"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_requests_are_refused_naming_prompt_and_field(assets, tmp_path, extra, message):
    from opensora.config import ConfigError, validate

    extra = [e.replace("{ref}", str(assets / "ref.png")) for e in extra]
    cfg = compose_cfg(["task=sample", *tiny_args(assets), "data.num_frames=2", "data.image_size=[24,40]", *extra],
                      tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_a_good_request_validates_and_stdit_refuses_conditioning(assets, tmp_path):
    from opensora.config import ConfigError, validate
    from opensora.tasks.sample import refuse_conditioning

    good = ["task=sample", *tiny_args(assets), "data.num_frames=4", "data.image_size=[24,40]", "task.prompts=[a,b]",
            f"task.reference_path=['{assets}/ref.png;{assets}/ref.mp4',null]",
            "task.mask_strategy=['0;0,1,-2,2,2',null]",
            "task.loop=2", "task.condition_frame_length=1"]
    validate(compose_cfg(good, tmp_path))
    cfg = compose_cfg(["experiment=sample_16x256x256", "task.mask_strategy=0", "task.loop=2"], tmp_path)
    with pytest.raises(ValueError, match="task.mask_strategy, task.loop: conditioning and loop generation are Open-"):
        refuse_conditioning(cfg)
    # STDiT 1.0 names videos after prompts too: the recipe's long prompts cannot be file names
    cfg = compose_cfg(["experiment=sample_16x256x256", "task.name_by_prompt=true"], tmp_path)
    with pytest.raises(ConfigError, match=r"task.name_by_prompt: prompt 0 is \d+ bytes, too long for a file name"):
        validate(cfg)


# ================================================================
# In-process: what the model receives, conditioning, loops (tiny STDiT2, pixel space)
# ================================================================


class TextStub:
    """encode(texts) -> fixed random embeddings per text (the model's caption input)."""

    def encode(self, texts):
        y = np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal((1, T5_LEN, T5_DIM)) for t in texts])
        return {"y": y.astype(np.float32), "mask": np.ones((len(texts), T5_LEN), np.int32)}


class Spy:
    """Wraps the model: records the size conditions and x_mask of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.in_channels = model.in_channels

    def set_train(self, mode):
        self.model.set_train(mode)

    def get_null_y(self):
        return self.model.get_null_y()

    def __call__(self, x, t, **kw):
        self.calls.append({k: (None if v is None else v.asnumpy()) for k, v in kw.items() if k not in ("y", "mask")}
                          | {"t": t.asnumpy()})
        return self.model(x, t, **kw)


def _items(prompts, strategies, refs, loop=1):
    from opensora.sampling.generation import SampleItem
    from opensora.sampling.prompts import plan_prompts

    paths = [";".join(f"ref{i}.png" for i in range(len(r))) or None for r in refs]
    plans = plan_prompts(prompts, loop, paths, strategies)
    return [SampleItem(i, p, r) for i, (p, r) in enumerate(zip(plans, refs))]


@pytest.fixture(scope="module")
def model():
    return tiny_stdit2(3, seed=7)


def test_the_model_gets_the_original_conditioning_and_the_frame_mask(model):
    """T2V at 2 x 24 x 40 (batch of 2, CFG doubles it): height 24, width 40, ar 0.6, frames 2, fps 24 per row;
    an edit-ratio prompt: its frames are conditioning (x_mask False) until released at int(0.5 * 4) = 2."""
    from opensora.sampling.generation import ClipSpec, sample_batches
    from opensora.scheduler import IDDPM

    spec = ClipSpec(2, 24, 40, (3, 2, 24, 40), 24.0)
    spy = Spy(model)
    ref = np.random.default_rng(0).uniform(-1, 1, (3, 2, 24, 40)).astype(np.float32)
    items = _items(["a dog runs", "a red square moving left"], [None, "0,0,0,0,2,0.5"], [[], [ref]])
    out = list(sample_batches(spy, TextStub(), IDDPM(num_sampling_steps=4, cfg_scale=4.0), items, spec, 2, 0,
                              progress=False))
    assert len(out) == 1 and out[0].latents.shape == (2, 3, 2, 24, 40) and out[0].videos is None
    c = spy.calls
    assert [k["t"].tolist() for k in c] == [[t] * 4 for t in (999, 666, 333, 0)]  # 4 respaced steps
    for k in c:
        assert k["height"].tolist() == [24] * 4 and k["width"].tolist() == [40] * 4
        assert k["num_frames"].tolist() == [2] * 4 and k["fps"].tolist() == [24] * 4
        np.testing.assert_array_equal(k["ar"], np.float32(0.6))
    xm = [k["x_mask"] for k in c]
    assert all(m.shape == (4, 2) and m[[0, 2]].all() for m in xm)  # prompt 0 (and its CFG twin): generated
    assert [bool(m[1].any()) for m in xm] == [False, False, True, True] and all((m[1] == m[3]).all() for m in xm)


def test_no_frame_mask_without_conditioning_and_one_frame_images(model):
    from opensora.sampling.generation import ClipSpec, sample_batches
    from opensora.scheduler import IDDPM

    spy = Spy(model)
    spec = ClipSpec(1, 24, 40, (3, 1, 24, 40), 24.0)
    out = list(sample_batches(spy, TextStub(), IDDPM(num_sampling_steps=2), _items(["a dog runs"], [None], [[]]),
                              spec, 1, 0, progress=False))
    assert out[0].latents.shape == (1, 3, 1, 24, 40)
    assert all(k.get("x_mask") is None and k["fps"].tolist() == [120, 120] for k in spy.calls)


@pytest.mark.parametrize("exact", [False, True])
def test_image_to_video_keeps_the_reference_frame(model, exact):
    """Mask 0 at frame 0: with exact_conditioning it comes out as the reference; the original (exact False)
    re-noises it at t = 0 and denoises once, leaving it within sqrt(1/abar_0 - 1) |eps - eps_model| =
    0.01 |eps - eps_model| (eps_model ~ N(0, 1)-sized here: well under 0.1) - but not equal."""
    from opensora.sampling.generation import ClipSpec, sample_batches
    from opensora.scheduler import IDDPM

    spec = ClipSpec(3, 24, 40, (3, 3, 24, 40), 24.0)
    image = np.random.default_rng(1).uniform(-1, 1, (3, 1, 24, 40)).astype(np.float32)
    out = next(sample_batches(model, TextStub(), IDDPM(num_sampling_steps=4, exact_conditioning=exact),
                              _items(["a sunset over the sea"], ["0"], [[image]]), spec, 1, 0, progress=False))
    diff = np.abs(out.latents[0, :, 0] - image[:, 0]).max()
    assert (diff == 0) if exact else (0 < diff < 0.1)
    assert np.abs(out.latents[0, :, 1:] - image).mean() > 0.1  # the other frames are generated


def test_loops_continue_the_previous_clip_in_latent_space(model):
    """2 loops of 3 frames sharing 1: 5 frames; with exact conditioning and the sampled latents as the condition
    (loop_reencode=false) clip 1 starts exactly with clip 0's last frame, held once in the video; per-loop texts."""
    from opensora.sampling.generation import ClipSpec, sample_batches
    from opensora.scheduler import IDDPM

    spec = ClipSpec(3, 24, 40, (3, 3, 24, 40), 24.0)
    text = TextStub()
    seen = []
    text.encode = lambda texts, enc=text.encode: seen.append(list(texts)) or enc(texts)
    out = next(sample_batches(model, text, IDDPM(num_sampling_steps=3, exact_conditioning=True),
                              _items(["|0|a dog runs|1|a sunset over the sea"], [None], [[]], loop=2), spec, 1, 0,
                              loop=2, condition_frame_length=1, reencode=False, progress=False))
    assert out.latents.shape == (1, 3, 2 * (3 - 1) + 1, 24, 40) and len(out.clips) == 2
    assert seen == [["a dog runs"], ["a sunset over the sea"]]
    assert [m[0].tolist() for m in out.masks] == [[1, 1, 1], [0, 1, 1]]
    np.testing.assert_array_equal(out.clips[1][:, :, 0], out.clips[0][:, :, -1])
    np.testing.assert_array_equal(out.latents[:, :, :3], out.clips[0])
    np.testing.assert_array_equal(out.latents[:, :, 3:], out.clips[1][:, :, 1:])
    assert np.abs(out.clips[1][:, :, 1:] - out.clips[0][:, :, 1:]).mean() > 0.1  # new frames, not copies


# ================================================================
# End to end: python run.py
# ================================================================


def _run(assets, tmp_path, name, *extra, vae=False, check=True, task="sample"):
    return run_cli([f"task={task}", *tiny_args(assets, vae), *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path,
                   check=check)


def _latents(folder: Path) -> list[np.ndarray]:
    from opensora.data.cache import load_video_latent

    return [load_video_latent(p) for p in sorted(folder.glob("*.npz"))]


@pytest.mark.slow
def test_cli_text_to_image_and_staged_sampling(assets, tmp_path):
    """T2I (1 frame: png, fps conditioning 120), and the same through embed_text -> latents -> decode."""
    from PIL import Image

    size = ["data.num_frames=1", "data.image_size=[24,40]"]
    args = [*size, "task.prompts=[a dog runs,|0|a blue circle moving up]"]
    proc = _run(assets, tmp_path, "t2i", *args)
    pngs = sorted((tmp_path / "t2i" / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["000-a-dog-runs.png", "001-0-a-blue-circle-moving-up.png"]
    assert np.asarray(Image.open(pngs[0])).shape == (24, 40, 3)
    log = proc.stdout + proc.stderr
    assert "fps conditioning 120), latent 1 x 24 x 40, output 1 x 24 x 40 image (png)" in log
    assert log.count("is not a trained Open-Sora 1.1 size") == 1
    _run(assets, tmp_path, "embed", *args, f"task.output_dir={tmp_path / 'emb'}", task="embed_text")
    _run(assets, tmp_path, "lat", *args, f"task.text_embed_folder={tmp_path / 'emb'}", "task.save_latents=true",
         "text_encoder._target_=no.such.Encoder")
    _run(assets, tmp_path, "dec", *size, f"task.latents_dir={tmp_path / 'lat' / 'latents'}",
         "model._target_=no.such.Model", "text_encoder._target_=no.such.Encoder", task="decode")
    staged = sorted((tmp_path / "dec" / "samples").glob("*.png"))
    assert [p.name for p in staged] == [p.name for p in pngs]
    for a, b in zip(pngs, staged):  # the same numbers up to T5 batching noise: rare 1-level rounding flips
        assert np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int)).max() <= 1


@pytest.mark.slow
def test_cli_text_to_video_non_square_with_a_vae_factor_that_does_not_divide(assets, tmp_path):
    """4 x 20 x 43 with a factor-2 VAE: latent 4 x 10 x 21 (floor; STDiT2 pads 21 to 22 and crops), the video
    4 x 20 x 42, and the log line says so."""
    from opensora.utils.video_io import read_video

    proc = _run(assets, tmp_path, "t2v", "data.num_frames=4", "data.image_size=[20,43]", "task.prompts=[a dog runs]",
                vae=True)
    videos = sorted((tmp_path / "t2v" / "samples").glob("*.mp4"))
    assert read_video(videos[0]).shape == (4, 20, 42, 3)
    assert "latent 4 x 10 x 21, output 4 x 20 x 42 video at 8 fps" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cli_image_to_video_extension_and_loop(assets, tmp_path):
    """One run, 3 loops of 3 frames sharing 1 (7 frames), per-prompt conditioning of loop 0: an image at frame 0
    (task.reference_path / task.mask_strategy lists), a video's last 2 frames at frames 0-1 (JSON options in
    the prompt). Exact conditioning in pixel space (latents are pixels): the saved latents hold the references
    exactly as read; the loop clips are re-encoded (identity VAE) as the original."""
    from PIL import Image

    from opensora.data.fill_crop import fill_crop_image, fill_crop_video
    from opensora.utils.video_io import read_video

    video = (f'|0|a dog runs|2|a sunset over the sea{{"reference_path": "{assets}/ref.mp4", '
             '"mask_strategy": "0,0,-2,0,2"}')
    proc = _run(assets, tmp_path, "cond", "data.num_frames=3", "data.image_size=[24,40]",
                "scheduler.exact_conditioning=true", "task.save_latents=true", "task.loop=3",
                "task.condition_frame_length=1", f"task.prompts=[a sunset over the sea,'{video}']",
                f"task.reference_path=[{assets}/ref.png,null]", "task.mask_strategy=[0,null]")
    assert "output 7 x 24 x 40 video at 8 fps (3 loops of 3 latent frames, 1 shared)" in proc.stdout + proc.stderr
    image, ext = _latents(tmp_path / "cond" / "latents")
    assert image.shape == ext.shape == (3, 3 * (3 - 1) + 1, 24, 40)
    np.testing.assert_array_equal(image[:, 0], fill_crop_image(Image.open(assets / "ref.png"), (24, 40))[0]
                                  .transpose(2, 0, 1))
    np.testing.assert_array_equal(ext[:, :2], fill_crop_video(read_video(assets / "ref.mp4")[-2:], (24, 40))
                                  .transpose(3, 0, 1, 2))
    assert np.abs(image[:, 1:] - image[:, :1]).mean() > 0.1  # the rest is generated


@pytest.mark.slow
def test_cli_prompt_named_generation_resumes_after_a_kill(assets, tmp_path):
    """VBench layout (<prompt>-<k>.mp4): a run killed after its first videos, run again, ends with every video,
    each the same as in an uninterrupted run (batch size 1: a sample depends only on its seed and position)."""
    from opensora.utils.video_io import read_video

    prompts = ["a dog runs", "a red square moving left", "a blue circle moving up"]
    args = ["task=sample", *tiny_args(assets), "data.num_frames=2", "data.image_size=[24,40]",
            f"task.prompts=[{','.join(prompts)}]",
            "task.num_samples_per_prompt=2", "task.name_by_prompt=true", "task.batch_size=1",
            "scheduler.num_sampling_steps=8"]
    names = sorted(f"{p}-{k}.mp4" for p in prompts for k in range(2))
    run_cli([*args, f"task.save_dir={tmp_path / 'whole'}", f"hydra.run.dir={tmp_path / 'r0'}"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == names
    part = tmp_path / "vbench"
    proc = run_cli([*args, f"task.save_dir={part}", f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path, popen=True)
    deadline = time.monotonic() + 300
    while not (part.is_dir() and any(p.suffix == ".mp4" for p in part.iterdir())) and time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "background.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in part.iterdir())
    assert 1 <= len(done) < 6 and all(n in names for n in done), done  # no half-written file
    stamps = {n: (part / n).stat().st_mtime_ns for n in done}
    again = run_cli([*args, f"task.save_dir={part}", f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert f"{len(done)} of 6 videos already in {part}: skipped" in again.stdout + again.stderr
    assert sorted(p.name for p in part.iterdir()) == names
    assert all((part / n).stat().st_mtime_ns == s for n, s in stamps.items())  # not made again
    for n in names:
        np.testing.assert_array_equal(read_video(part / n), read_video(tmp_path / "whole" / n), err_msg=n)


def test_prompt_named_outputs_skip_existing_files_and_repeated_prompts(tmp_path):
    from opensora.tasks.sample import missing_outputs, plan_outputs

    outs = plan_outputs(3, 2, ["a dog", "a cat", "a dog"])  # prompt 2 repeats prompt 0: made once
    assert [(o.index, o.prompt, o.k, o.name) for o in outs] == [(0, 0, 0, "a dog-0"), (1, 0, 1, "a dog-1"),
                                                                (2, 1, 0, "a cat-0"), (3, 1, 1, "a cat-1")]
    (tmp_path / "a dog-1.mp4").write_bytes(b"x")
    (tmp_path / "a cat-0.png").write_bytes(b"x")  # another suffix: not this run's file
    assert [o.name for o in missing_outputs(outs, tmp_path, ".mp4")] == ["a dog-0", "a cat-0", "a cat-1"]
    assert [o.index for o in plan_outputs(2, 2)] == [0, 1, 2, 3] and missing_outputs(plan_outputs(1, 1), tmp_path,
                                                                                       ".mp4")


@pytest.mark.slow
def test_cli_bad_input_is_refused_before_any_model_is_built(assets, tmp_path):
    base = ["data.num_frames=2", "data.image_size=[24,40]", "task.prompts=[a,b]"]
    proc = _run(assets, tmp_path, "bad1", *base, "task.mask_strategy=[0,'0,0,0,1,4']",
                f"task.reference_path={assets}/ref.png", check=False)
    assert proc.returncode == 2 and not (tmp_path / "bad1").exists()
    assert "prompt 1, insertion 0 ('0,0,0,1,4'): field length = 4 runs past the clip" in proc.stderr
    proc = _run(assets, tmp_path, "bad2", *base, "task.mask_strategy=0", f"task.reference_path={assets}/corrupt.mp4",
                check=False)
    assert proc.returncode != 0 and "model opensora.model.STDiT2" not in proc.stdout + proc.stderr
    assert f"reference 0 of prompt 0 ({assets}/corrupt.mp4): cannot be read as a video" in proc.stdout + proc.stderr


def test_the_shipped_vbench_prompt_list_names_its_videos():
    """assets/texts/vbench/all_dimension.txt: 946 prompts, every one a valid file name with '-<k>.mp4', 2 repeated:
    944 x 5 videos in VBench's layout."""
    from opensora.sampling.request import prompt_name
    from opensora.tasks.sample import plan_outputs

    folder = CONF.parent / "assets" / "texts" / "vbench"
    prompts = [ln.strip() for ln in (folder / "all_dimension.txt").read_text().splitlines() if ln.strip()]
    assert len(prompts) == 946 and (folder / "LICENSE").read_text().lstrip().startswith("Apache License")
    names = [prompt_name(p, i) for i, p in enumerate(prompts)]
    outs = plan_outputs(len(prompts), 5, names)
    assert len(outs) == 944 * 5 and outs[0].name == f"{prompts[0]}-0" and outs[4].name == f"{prompts[0]}-4"
