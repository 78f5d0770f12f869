"""What the tests share: composing configs like run.py, one CLI runner, one msrun launcher, one tiny-override list,
checkpoint comparison, and media files made in tmp_path. Test modules import from here, never from each other."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from opensora.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register_configs()

# A tiny, fast training setup on the demo's data: one block of hidden 32, 4 frames of 8x8 pixels moving 1 px per
# frame, 64 clips, batch 4, 3 sampling steps, one held-out sample per prompt.
TINY = ["model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]", "model.num_heads=2", "data.num_frames=4",
        "data.image_size=8", "data.dataset.speed=1", "data.batch_size=4", "data.dataset.num_samples=64",
        "scheduler.num_sampling_steps=3", "task.eval.num_samples_per_prompt=1", "task.eval.batch_size=8",
        "task.eval.upscale=2"]


def compose_cfg(overrides: Sequence[str] = (), output_dir=None):
    """Compose conf/config.yaml as run.py would; `paths.output_dir` pinned (no Hydra runtime here)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or ROOT / "outputs" / "pytest")
    return cfg


def cli_env(cwd: Path, **extra) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PROJECT_ROOT": str(cwd),
            "HYDRA_FULL_ERROR": "1", **extra}


def run_cli(args: Sequence[str], cwd: Path, check: bool = True, timeout: float = 600, popen: bool = False,
            env: Optional[dict] = None):
    """`python run.py ARGS` in `cwd` (outputs under cwd/outputs) as a user would type it. check: raise with the
    output when it fails. popen: start it in the background, in its own process group, output to a file."""
    env = env or cli_env(cwd)
    cmd = [sys.executable, str(ROOT / "run.py"), *args]
    if popen:  # a full pipe would block it
        log = open(Path(cwd) / "background.log", "w")
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _cores(exclusive: bool):
    """A readers-writer lock on the machine's cores between the xdist workers of one run (two files in the temp
    folder, named by the run's id): tests hold it shared, msrun jobs exclusively. The `gate` makes it
    writer-preferring: an exclusive holder keeps the gate while it waits, so no new test starts beside it and it
    waits at most for the test running on the other worker. Outside xdist: no lock."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield
        return
    stem = Path(tempfile.gettempdir()) / f"opensora-pytest-{run}"
    with open(f"{stem}.gate", "a") as gate, open(f"{stem}.cores", "a") as cores:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(cores, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(cores, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)


def cores_shared():
    """What every test but the `alone` ones holds (tests/conftest.py)."""
    return _cores(exclusive=False)


def cores_alone():
    """Around an msrun job: no other test runs meanwhile, because CPU collectives give up when one rank is more
    than 30 s late, which a test compiling on the same cores can cause. Only in a test marked
    `@pytest.mark.alone`, which holds no shared lock (one that did would wait for itself)."""
    if "PYTEST_XDIST_WORKER" in os.environ and "OPENSORA_TEST_ALONE" not in os.environ:
        raise AssertionError("a test that starts msrun must be marked @pytest.mark.alone, so that its msrun jobs "
                             "can run with no other test beside them (tests/conftest.py)")
    return _cores(exclusive=True)


def run_msrun(args: Sequence[str], cwd: Path, workers: int = 2, log_dir: Optional[Path] = None,
              timeout: float = 900, extra: Sequence[str] = ()):
    """`msrun --worker_num=W --local_worker_num=W ... ARGS` in `cwd`, with the cores to itself (`cores_alone`);
    returns (process, {log name: text})."""
    log_dir = log_dir or Path(cwd) / "msrun"
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    env = cli_env(cwd, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [msrun, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
           f"--log_dir={log_dir}", "--join=True", *extra, *args]
    with cores_alone():
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    logs = {p.name: p.read_text() for p in Path(log_dir).glob("*.log")}
    return proc, logs


def msrun_output(proc, logs) -> str:
    return proc.stdout[-2000:] + "\n".join(v[-3000:] for v in logs.values())


def load_ckpt(path) -> dict:
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def assert_same_training_state(got: Path, ref: Path, position: Optional[int] = None, rng: bool = False) -> None:
    """Two checkpoint directories hold the same model, EMA, optimiser state, data position and loss average.

    The same maths summed in a different order (a mean of 2 rank means vs one mean of 4) differs by fp32 rounding
    only, hence the tolerances (relative 1e-5 of each value, 1e-6 absolute for values near 0)."""
    for name in ("model.ckpt", "ema.ckpt", "optimizer.ckpt"):
        a, b = load_ckpt(got / name), load_ckpt(ref / name)
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{k}")
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (got, ref))
    assert sa["data"] == sb["data"]
    if position is not None:
        assert sa["data"] == {"epoch": 0, "position": position}
    if rng:
        assert sa["rng"] == sb["rng"]
    assert abs(sa["loss_avg"] - sb["loss_avg"]) < 1e-5 * abs(sb["loss_avg"])


# ================================================================
# Media files
# ================================================================

# name: (frames, height, width, fps); "tall" has width 48, which decord returns with padded rows.
VIDEOS = {"clips/wide.mp4": (50, 48, 80, 24), "clips/tall.mp4": (40, 96, 48, 30),
          "clips/sub/small.mp4": (24, 32, 40, 12), "clips/short.mp4": (3, 40, 40, 24)}
BAD = ["clips/short.mp4", "clips/corrupt.mp4", "clips/truncated.mp4", "clips/missing.mp4"]


def write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """H.264 mp4 of uint8 frames [T, H, W, 3] (near-lossless, crf 12)."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                         pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
                                         ffmpeg_log_level="error", output_params=["-crf", "12", "-movflags", "+faststart"])
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()


def grey_clip(t: int, h: int, w: int) -> np.ndarray:
    """Frame i is a uniform grey of level 16 + 4 i, so decoded frames can be identified by their pixels."""
    return np.broadcast_to((16 + 4 * np.arange(t, dtype=np.uint8))[:, None, None, None], (t, h, w, 3)).copy()


def frame_ids(frames_uint8: np.ndarray) -> list[int]:
    """Frame indices read back from grey levels (uint8 frames [T, H, W, 3])."""
    return [int(round((float(f.mean()) - 16) / 4)) for f in frames_uint8]


def still_image() -> np.ndarray:
    """32 x 50 RGB pattern: R = 5 * column, G = 7 * row, B = 200."""
    r, c = np.mgrid[0:32, 0:50]
    return np.stack([5 * c, 7 * r, np.full_like(r, 200)], -1).astype(np.uint8)


def make_media(root: Path) -> Path:
    """Good videos of several sizes, fps and lengths, one too short, one corrupt, one truncated, one image and
    one missing file, listed in root/videos.csv (paths relative to root)."""
    import pandas as pd
    from PIL import Image

    for name, (t, h, w, fps) in VIDEOS.items():
        write_mp4(root / name, grey_clip(t, h, w), fps)
    (root / "clips/corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    rng = np.random.default_rng(1)
    write_mp4(root / "clips/full.mp4", rng.integers(0, 256, (30, 32, 32, 3), np.uint8), 24)
    data = (root / "clips/full.mp4").read_bytes()
    (root / "clips/truncated.mp4").write_bytes(data[:int(len(data) * 0.6)])
    (root / "clips/full.mp4").unlink()
    (root / "stills").mkdir()
    Image.fromarray(still_image()).save(root / "stills/still.png")
    rows = [("clips/wide.mp4", "a wide grey clip"), ("clips/tall.mp4", "a tall grey clip"),
            ("clips/sub/small.mp4", "a small grey clip"), ("clips/short.mp4", "a short clip"),
            ("clips/corrupt.mp4", "a corrupt file"), ("clips/truncated.mp4", "a truncated clip"),
            ("stills/still.png", "a still image"), ("clips/missing.mp4", "a missing clip")]
    pd.DataFrame(rows, columns=["video", "caption"]).to_csv(root / "videos.csv", index=False)
    return root / "videos.csv"


# Camera clips: a smooth random texture (Gaussian-blurred noise, sigma 3 px) seen through a 64 x 48 window that
# moves 0.3 px per frame (pans, tilts) or scales by 0.6 % per frame (zooms): 4.5 px between the frames 15 apart
# that the camera-motion detector compares, well inside what Farneback tracks on such frames.
H, W = 48, 64
SPEED, ZOOM = 0.3, 1.006  # px per frame, scale per frame
# camera motion -> how the window moves over the texture (dx, dy px per frame; zoom per frame). A camera
# panning right sees the content move left: the window moves right (+x) over the texture.
MOTIONS = {"pan right": dict(dx=SPEED), "pan left": dict(dx=-SPEED), "tilt up": dict(dy=-SPEED),
           "tilt down": dict(dy=SPEED), "zoom in": dict(zoom=ZOOM), "zoom out": dict(zoom=1 / ZOOM), "static": {}}


def texture(seed: int, h: int = 300, w: int = 400) -> np.ndarray:
    """[h, w, 3] uint8: Gaussian-blurred (sigma 3) uniform noise stretched to 0..255."""
    import cv2

    t = cv2.GaussianBlur(np.random.default_rng(seed).random((h, w, 3)).astype(np.float32), (0, 0), 3)
    return np.round((t - t.min()) / (t.max() - t.min()) * 255).astype(np.uint8)


def camera_clip(seed: int, frames: int, h: int = H, w: int = W, dx: float = 0.0, dy: float = 0.0,
                zoom: float = 1.0) -> np.ndarray:
    """[frames, h, w, 3] uint8: the window of a texture, centred, moved by (dx, dy) px and scaled by zoom per frame."""
    import cv2

    tex = texture(seed, max(300, 2 * h), max(400, 2 * w))
    cy, cx = tex.shape[0] / 2, tex.shape[1] / 2
    out = []
    for i in range(frames):
        s = zoom ** i  # output pixel (x, y) shows texture pixel (cx + (x - w/2) / s + dx*i, cy + ...)
        m = np.array([[1 / s, 0, cx - w / 2 / s + dx * i], [0, 1 / s, cy - h / 2 / s + dy * i]], np.float32)
        out.append(cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


def scenes_video(path, lengths, motions, fps=24, h=H, w=W, seed=0):
    """An mp4 of hard cuts: scene i has lengths[i] frames of its own texture moving as motions[i]."""
    from opensora.utils.video_io import save_video

    clips = [camera_clip(seed + i, n, h, w, **MOTIONS[m]) for i, (n, m) in enumerate(zip(lengths, motions))]
    save_video(np.concatenate(clips), path, fps=fps)
    return path


# ================================================================
# Tiny CLIP and LPIPS models (evaluation tests)
# ================================================================
# What the evaluation tests share: tiny random CLIP folders, and a PyTorch LPIPS reference.
#
# CLIP folders are written like Hugging Face's (save_pretrained of transformers'
# CLIPModel, CLIPTokenizerFast and CLIPImageProcessor) on a vocabulary built in the folder:
# the 256 byte symbols, their "</w>" forms, 40 merges learned by the `tokenizers` BPE trainer on a few
# captions, and the two special tokens. Every parameter (LayerNorm affines and biases too) is perturbed
# by N(0, 0.2^2), which makes attention far from uniform and the position embeddings as large as the
# token embeddings.
#
# Two layouts:
# vit_b32  patch 8 on 32 px, quick_gelu, legacy eos_token_id 2 (argmax pooling), safetensors
# vit_l14  patch 7 on 28 px, gelu, eos_token_id = the real EOS id (first-EOS pooling), pytorch_model.bin

from opensora.eval.clip_processing import BOS, EOS, SPLIT_PATTERN  # noqa: E402

CORPUS = ["a photo of a cat", "a dog running on the beach", "the red square moves left", "a cat and a dog",
          "two dogs play with a red ball", "a photo of the beach at sunset"]
MAX_LEN = 16
LAYOUTS = {
    "vit_b32": dict(patch_size=8, image_size=32, act="quick_gelu", legacy_eos=True, text=(32, 4, 48), vision=(24, 3, 40),
                    projection=16, safetensors=True),
    "vit_l14": dict(patch_size=7, image_size=28, act="gelu", legacy_eos=False, text=(24, 2, 40), vision=(32, 4, 56),
                    projection=20, safetensors=False),
}


def write_vocab(folder: Path) -> dict:
    """CLIP-style vocab.json + merges.txt in `folder`; returns the vocab."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(CORPUS * 3, trainer)
    merges = json.loads(trainer_tok.to_str())["model"]["merges"][:40]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab


def make_clip_folder(folder: Path, layout: str, tok_folder: Path, seed: int = 0):
    """A tiny CLIP of `layout` saved in `folder` with the tokenizer of `tok_folder` (write_vocab);
    returns the transformers CLIPModel."""
    import torch
    import transformers

    spec = LAYOUTS[layout]
    vocab = json.loads((tok_folder / "vocab.json").read_text())
    torch.manual_seed(seed)
    (th, tn, ti), (vh, vn, vi) = spec["text"], spec["vision"]
    eos = 2 if spec["legacy_eos"] else vocab[EOS]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=th, num_attention_heads=tn, intermediate_size=ti,
                         num_hidden_layers=2, max_position_embeddings=MAX_LEN, hidden_act=spec["act"],
                         bos_token_id=vocab[BOS], eos_token_id=eos, pad_token_id=vocab[EOS]),
        vision_config=dict(hidden_size=vh, num_attention_heads=vn, intermediate_size=vi, num_hidden_layers=2,
                           image_size=spec["image_size"], patch_size=spec["patch_size"], hidden_act=spec["act"]),
        projection_dim=spec["projection"])
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=spec["safetensors"])
    fast = transformers.CLIPTokenizerFast(vocab_file=str(tok_folder / "vocab.json"),
                                          merges_file=str(tok_folder / "merges.txt"), model_max_length=MAX_LEN)
    fast.save_pretrained(folder)
    s = spec["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(folder)
    return model


def hf_pipeline(folder: Path):
    """transformers' (CLIPTokenizerFast, CLIPImageProcessor) of a folder."""
    import transformers

    return (transformers.CLIPTokenizerFast.from_pretrained(folder),
            transformers.CLIPImageProcessor.from_pretrained(folder))


def tiny_clip(tmp_path_factory, layout: str, seed: int = 0):
    """(transformers CLIPModel, folder) of a tiny CLIP with its own vocabulary, in fresh tmp folders."""
    tok = tmp_path_factory.mktemp("vocab")
    write_vocab(tok)
    folder = tmp_path_factory.mktemp(f"clip_{layout}")
    return make_clip_folder(folder, layout, tok, seed=seed), folder


# ================================================================
# LPIPS reference in PyTorch, written from the lpips package's code (lpips/lpips.py: ScalingLayer,
# normalize_tensor, NetLinLayer, spatial_average; pretrained_networks.alexnet: torchvision's AlexNet.features
# cut after relu1..relu5). The package itself needs torchvision, which is not installed.
# ================================================================


def torch_alexnet_features():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 2))


def torch_lpips(features, heads, x0, x1):
    """lpips.LPIPS(net='alex', version='0.1', spatial=False).forward(x0, x1) for inputs in [-1, 1]."""
    import torch

    shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
    scale = torch.tensor([.458, .448, .450])[None, :, None, None]
    slices = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]

    def feats(x):
        h, outs = (x - shift) / scale, []
        for a, b in slices:
            for i in range(a, b):
                h = features[i](h)
            outs.append(h)
        return outs

    def norm(t):
        return t / (torch.sqrt(torch.sum(t ** 2, dim=1, keepdim=True)) + 1e-10)

    val = 0
    for k, (a, b) in enumerate(zip(feats(x0), feats(x1))):
        diff = (norm(a) - norm(b)) ** 2
        val = val + torch.nn.functional.conv2d(diff, heads[f"lin{k}.model.1.weight"]).mean([2, 3], keepdim=True)
    return val.flatten()


def lpips_files(folder: Path, seed: int = 0, head_scale: float = 1.0):
    """(features module, heads dict, alexnet.pth, alex.pth): random AlexNet features saved as torchvision names
    them (with a classifier tensor, which is not used) and random LPIPS heads."""
    import torch

    from opensora.eval.lpips import CHANNELS

    torch.manual_seed(seed)
    features = torch_alexnet_features().eval()
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.1.weight"] = torch.randn(8, 4)
    torch.save(sd, folder / "alexnet.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * head_scale for k, c in enumerate(CHANNELS)}
    torch.save(heads, folder / "alex.pth")
    return features, heads, folder / "alexnet.pth", folder / "alex.pth"
