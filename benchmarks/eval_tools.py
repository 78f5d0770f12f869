"""CPU throughput (clips/s) of the evaluation and scoring tasks at the real model sizes, with random weights.

    python benchmarks/eval_tools.py                            # every tool
    python benchmarks/eval_tools.py --tools score_aesthetic    # one of them
    python benchmarks/eval_tools.py --clips 4                  # quicker

Writes, in a temporary folder (or --folder): CLIP ViT-L/14 and ViT-B/32 folders in the Hugging Face layout
(openai's dimensions, random weights, a tokenizer from tests/eval_helpers.py - needs the dev extra), a LAION
head of the released size, H.264 source clips (moving gradients with noise), and 16-frame 256x256 clips
standing for task=sample's output, and the SD VAE (sd-vae-ft-ema's architecture, as a .ckpt). Each task runs
as `python run.py task=...` on --clips clips; printed: the steady rate the task logs (after its first
batch, which includes compiling the model), the overall rate including start-up, and the run's peak
resident memory (a run is stopped beyond --max-rss-gb).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

L14 = dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
           vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14), projection_dim=768)
B32 = dict(text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
           vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=32), projection_dim=512)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256)
TOOLS = ("score_aesthetic", "score_match", "eval_clip", "eval_vae")


def make_clip(folder: Path, dims: dict) -> Path:
    """A random CLIP of openai's dimensions in the HF layout (config.json, model.safetensors, tokenizer)."""
    from safetensors.numpy import save_file

    from opensora.eval.clip import CLIPConfig, CLIPModel
    from opensora.eval.clip_processing import EOS
    from eval_helpers import write_vocab

    if (folder / "model.safetensors").is_file():
        return folder
    vocab = write_vocab(folder)
    config = {"model_type": "clip", "projection_dim": dims["projection_dim"],
              "text_config": {**dims["text"], "vocab_size": 49408, "max_position_embeddings": 77,
                              "eos_token_id": vocab[EOS], "hidden_act": "quick_gelu"},
              "vision_config": {**dims["vision"], "image_size": 224, "hidden_act": "quick_gelu"}}
    (folder / "config.json").write_text(json.dumps(config))
    model = CLIPModel(CLIPConfig.from_dict(config))
    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    del model
    rng = np.random.default_rng(0)
    tensors = {n: (np.ones(s, np.float32) if n.endswith("norm1.weight") or n.endswith("norm2.weight")
                   else rng.normal(0, 0.02, s).astype(np.float32)) for n, s in shapes.items()}
    tensors["logit_scale"] = np.array(np.log(100.0), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def make_vae(folder: Path) -> Path:
    """sd-vae-ft-ema's architecture with random weights, as a .ckpt with config.json beside it."""
    from opensora.vae import VideoAutoencoderKL

    if not (folder / "vae.ckpt").is_file():
        VideoAutoencoderKL(config=SD_VAE, seed=0).save_checkpoint(folder / "vae.ckpt")
    return folder / "vae.ckpt"


def make_head(path: Path) -> Path:
    import torch

    if not path.is_file():
        sizes = (768, 1024, 128, 64, 16, 1)
        torch.manual_seed(0)
        sd = {}
        for (i, o), idx in zip(zip(sizes[:-1], sizes[1:]), (0, 2, 4, 6, 7)):
            sd[f"layers.{idx}.weight"] = torch.randn(o, i) * i ** -0.5
            sd[f"layers.{idx}.bias"] = torch.zeros(o)
        torch.save(sd, path)
    return path


def write_csv(folder: Path, names: list, n: int, name: str) -> Path:
    """n rows, each its own hard link of one of the clips (the scorers compute each distinct path once)."""
    import pandas as pd

    rows = []
    for i in range(n):
        target = folder / f"{name}_{i:03d}.mp4"
        if not target.exists():
            os.link(folder / names[i % len(names)], target)
        rows.append((target.name, f"a video of moving colours number {i}"))
    csv = folder / f"{name}_{n}.csv"
    pd.DataFrame(rows, columns=["path", "text"]).to_csv(csv, index=False)
    return csv


def run_task(args: list, cwd: Path, limit_gb: float) -> tuple[str, float, float]:
    """`python run.py ARGS` in a subprocess: (its output, wall seconds, peak resident GiB); stopped beyond
    `limit_gb` of resident memory (a shared machine)."""
    import subprocess

    import psutil

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PROJECT_ROOT": str(cwd)}
    t0 = time.perf_counter()
    with open(cwd / "task.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        ps, peak = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) / 2**30
            except psutil.Error:
                rss = 0.0
            peak = max(peak, rss)
            if rss > limit_gb:  # stop the run and its worker processes
                for p in [*ps.children(recursive=True), ps]:
                    p.kill()
                raise SystemExit(f"stopped {' '.join(args)}: {rss:.1f} GiB resident > --max-rss-gb {limit_gb}")
            time.sleep(0.2)
    out = (cwd / "task.log").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out[-3000:]}")
    return out, time.perf_counter() - t0, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--clips", type=int, default=8, help="clips per tool")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vae-frames", type=int, default=4)
    ap.add_argument("--vae-size", type=int, default=256)
    ap.add_argument("--folder", type=str, default=None)
    ap.add_argument("--max-rss-gb", type=float, default=6.0, help="stop a run whose resident memory grows beyond")
    args = ap.parse_args()

    import mindspore  # noqa: F401 - before decord

    from data_loader import make_videos

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="eval-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    src, samples = folder / "sources", folder / "samples"
    for f, (t, h, w) in ((src, (120, 360, 640)), (samples, (16, 256, 256))):
        f.mkdir(exist_ok=True)
        if not (f / "clips.csv").is_file():
            make_videos(f, 4, t, h, w, 30)
    names = sorted(p.name for p in src.glob("clip*.mp4"))
    sample_names = sorted(p.name for p in samples.glob("clip*.mp4"))
    l14, b32 = make_clip(folder / "clip-l14", L14), make_clip(folder / "clip-b32", B32)
    head = make_head(folder / "aesthetic.pth")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; sources 640x360, 120 frames @ 30 fps; "
          f"samples 256x256, 16 frames; {args.workers} worker processes", flush=True)

    def measure(tool, overrides, base, names_):
        csv = write_csv(base, names_, args.clips, tool)
        out = folder / "runs" / "_".join([tool, *(o.split("=")[-1].split("/")[-1] for o in overrides)])
        out.mkdir(parents=True, exist_ok=True)
        extra = [f"task.csv_path={csv}", f"task.num_workers={args.workers}", f"hydra.run.dir={out}"]
        if tool.startswith("score_"):  # rows per scoring batch: several batches, so a steady rate to report
            extra += [f"task.output_csv={out / 'scores.csv'}", "task.batch_size=2"]
            for old in out.glob("scores*"):  # an earlier measurement's output and progress log: start over
                old.unlink()
        log, wall, peak = run_task(["logger=none", f"task={tool}", *overrides, *extra], out,
                                   args.max_rss_gb)
        rate = re.findall(r"([0-9.e+-]+) (\w+)/s after the first batch", log)
        steady = f"{float(rate[-1][0]):.3g} {rate[-1][1]}/s" if rate else "n/a"
        shown = " ".join(o.split("/")[-1] for o in overrides)
        print(f"{tool:16s} {shown:55s} {args.clips} clips: {steady} after the first batch, "
              f"{args.clips / wall:.3g} clips/s overall ({wall:.0f} s incl. start-up); peak {peak:.1f} GiB", flush=True)

    if "score_aesthetic" in args.tools:
        measure("score_aesthetic", [f"clip.from_pretrained={l14}", f"task.head_path={head}"], src, names)
    if "score_match" in args.tools:
        measure("score_match", [f"clip.from_pretrained={l14}"], src, names)
    if "eval_clip" in args.tools:
        for clip, frames in ((l14, "4"), (b32, "null"), (l14, "null")):
            measure("eval_clip", [f"clip.from_pretrained={clip}", f"task.num_frames={frames}"], samples, sample_names)
    if "eval_vae" in args.tools:
        vae = make_vae(folder / "sd-vae")
        measure("eval_vae", ["vae=sd_vae_ft_ema", f"vae.from_pretrained={vae}", "vae.micro_batch_size=1",
                             f"task.num_frames={args.vae_frames}", f"task.image_size={args.vae_size}"],
                samples, sample_names)


if __name__ == "__main__":
    main()
