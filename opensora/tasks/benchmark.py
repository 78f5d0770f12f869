"""Benchmark task: speed, memory, FLOP/s and MFU of the configured train step and sample step.

    python run.py task=benchmark                                   # the demo config
    python run.py task=benchmark model.hidden_size=384 model.depth=8 model.num_heads=6 \\
        model.patch_size=[1,2,2] data.num_frames=16 data.image_size=32 data.batch_size=1

The train step is the train task's own compiled step (AdamW, clipping, EMA, precision, loss
scale, data-parallel all-reduce) fed random inputs of the configured shapes, so text encoding, the
VAE and data loading are not timed. The sample step is one model forward on the classifier-free
guidance batch [cond; null] (2 x data.batch_size), as each sampling step runs it.

FLOPs count matmuls only (2 m n k each; see `stdit_matmul_flops`); a train step counts 3x the
forward (backward = 2x forward), whether or not blocks are recomputed. MFU is achieved FLOP/s over
the peak of one large matmul in the model's compute dtype, timed in the same process.
"""
from __future__ import annotations

import json
import logging
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from hydra.utils import instantiate
from mindspore import nn
from omegaconf import DictConfig

from opensora.runtime import get_strategy
from opensora.tasks.common import build_model, run_dir
from opensora.train.step import build_train_step

log = logging.getLogger(__name__)


def stdit_matmul_flops(batch: int, input_size, patch_size, in_channels: int, out_channels: int, hidden_size: int,
                       depth: int, mlp_ratio: float, caption_channels: int, text_len: int,
                       frequency_embedding_size: int = 256) -> int:
    """Matmul FLOPs (2 per multiply-add) of one STDiT forward of `batch` samples.

    With T x S = N tokens (T frames of S patches), hidden C, MLP width F = int(C * mlp_ratio),
    L caption tokens of width Cc, patch input P = prod(patch) * in_channels and output
    O = prod(patch) * out_channels, per sample:
      patch embedding            2 N P C
      timestep MLP + t_block     2 (256 C + C C) + 2 C 6C
      caption MLP                2 L (Cc C + C C)
      each block:
        spatial attention        2 N C 3C (qkv) + 4 T S^2 C (q k^T, p v) + 2 N C C (proj)
        temporal attention       2 N C 3C       + 4 S T^2 C                + 2 N C C
        cross attention          2 N C C (q) + 2 L C 2C (kv) + 4 N L C + 2 N C C (proj)
        MLP                      2 N C F + 2 N F C
      final layer                2 N C O
    """
    pt, ph, pw = (int(p) for p in patch_size)
    T = int(input_size[0]) // pt
    S = (int(input_size[1]) // ph) * (int(input_size[2]) // pw)
    N, C, L, Cc = T * S, int(hidden_size), int(text_len), int(caption_channels)
    F = int(hidden_size * mlp_ratio)
    P, O = pt * ph * pw * int(in_channels), pt * ph * pw * int(out_channels)
    per_sample = 2 * N * P * C
    per_sample += 2 * (frequency_embedding_size * C + C * C) + 2 * C * 6 * C
    per_sample += 2 * L * (Cc * C + C * C)
    block = (2 * N * C * 3 * C + 4 * T * S * S * C + 2 * N * C * C) \
        + (2 * N * C * 3 * C + 4 * S * T * T * C + 2 * N * C * C) \
        + (2 * N * C * C + 2 * L * C * 2 * C + 4 * N * L * C + 2 * N * C * C) \
        + (2 * N * C * F + 2 * N * F * C)
    per_sample += depth * block + 2 * N * C * O
    return int(batch) * per_sample


def model_flops(model, batch: int, text_len: int) -> int:
    """`stdit_matmul_flops` for a built STDiT."""
    return stdit_matmul_flops(batch, model.input_size, model.patch_size, model.in_channels, model.out_channels,
                              model.hidden_size, model.depth, model.mlp_ratio,
                              model.y_embedder.y_embedding.shape[1], text_len)


def _sync(x=None) -> None:
    """Wait for `x` (and, on an accelerator, everything queued) to be computed."""
    if x is not None and hasattr(x, "asnumpy"):
        x.asnumpy()
    if ms.get_context("device_target") != "CPU":  # CPU ops are synchronous
        ms.runtime.synchronize()


def matmul_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` [size x size] @ [size x size] matmuls in `dtype`."""
    from mindspore import ops

    rng = np.random.default_rng(0)
    a = ms.Tensor(rng.standard_normal((size, size), dtype=np.float32)).astype(dtype)
    b = ms.Tensor(rng.standard_normal((size, size), dtype=np.float32)).astype(dtype)
    mm = ops.MatMul()
    _sync(mm(a, b))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = mm(a, b)
        _sync(c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def peak_host_memory_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_memory_mib(device_target: str) -> Optional[float]:
    """Peak memory MindSpore allocated on the device; None on CPU (host memory is the device's)."""
    if device_target == "CPU":
        return None
    try:
        return float(ms.runtime.max_memory_allocated()) / 2 ** 20
    except (RuntimeError, AttributeError):
        return None


def _timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - t0)
    return times


class _CfgForward(nn.Cell):
    """One sampling step's model call: forward on [cond; null] (classifier-free guidance batch)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x, t, y, mask):
        return self.model(x, t, y, mask)


def run(cfg: DictConfig) -> dict:
    task, strategy = cfg.task, get_strategy()
    par = strategy.ctx
    out = run_dir(cfg)
    model = build_model(cfg)
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
    strategy.prepare_model(model)
    step_fn, _, _ = build_train_step(cfg, model, diffusion, strategy)

    B = int(cfg.data.batch_size)
    C = int(model.in_channels)
    T, H, W = (int(s) for s in model.input_size)
    L = int(model.y_embedder.y_embedding.shape[0])
    Cc = int(model.y_embedder.y_embedding.shape[1])
    rng = np.random.default_rng(int(cfg.seed) + par.rank)
    x = ms.Tensor(rng.standard_normal((B, C, T, H, W)).astype(np.float32))
    t = ms.Tensor(rng.integers(0, diffusion.num_timesteps, B).astype(np.int32))
    noise = ms.Tensor(rng.standard_normal((B, C, T, H, W)).astype(np.float32))
    y = ms.Tensor(rng.standard_normal((B, 1, L, Cc)).astype(np.float32))
    mask = ms.Tensor(np.ones((B, L), np.int32))

    def train_step():
        return step_fn(x, t, noise, y, mask)[0]

    # train step: first call compiles; then warmup, then timed steps
    t0 = time.perf_counter()
    _sync(train_step())
    train_compile_s = time.perf_counter() - t0
    _timed(train_step, int(task.warmup_steps))
    train_times = _timed(train_step, int(task.steps))

    # sample step: the model's forward (eval mode) on the guidance batch
    model.set_train(False)
    fwd = _CfgForward(model)
    fwd.set_train(False)
    x2, t2 = ms.Tensor(np.concatenate([x.asnumpy()] * 2)), ms.Tensor(np.concatenate([t.asnumpy()] * 2))
    y2, mask2 = ms.Tensor(np.concatenate([y.asnumpy()] * 2)), ms.Tensor(np.concatenate([mask.asnumpy()] * 2))

    def sample_step():
        return fwd(x2, t2, y2, mask2)

    t0 = time.perf_counter()
    _sync(sample_step())
    sample_compile_s = time.perf_counter() - t0
    _timed(sample_step, int(task.warmup_steps))
    sample_times = _timed(sample_step, int(task.steps))

    dtype = model.dtype
    peak = matmul_peak(dtype, int(task.matmul_size), int(task.matmul_repeats))
    peak_fp32 = peak if dtype == ms.float32 else matmul_peak(ms.float32, int(task.matmul_size),
                                                             int(task.matmul_repeats))

    world = par.world_size
    train_s = statistics.median(train_times)
    sample_s = statistics.median(sample_times)
    tokens_per_sample = model.num_patches
    train_flops = 3 * model_flops(model, B, L)  # per rank
    sample_flops = model_flops(model, 2 * B, L)
    result = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "device_target": str(cfg.device.target),
        "parallel": str(cfg.parallel.mode),
        "world_size": world,
        "precision": str(cfg.precision.dtype),
        "loss_scale": None if cfg.precision.get("loss_scale") is None else str(cfg.precision.loss_scale),
        "recompute_blocks": int(model.recompute_blocks),
        "model": {"hidden_size": model.hidden_size, "depth": model.depth, "num_heads": model.num_heads,
                  "patch_size": list(model.patch_size), "input_size": [T, H, W], "in_channels": C,
                  "params": int(sum(p.size for p in model.trainable_params()))},
        "batch_size_per_rank": B,
        "tokens_per_sample": tokens_per_sample,
        "text_tokens": L,
        "train_compile_s": train_compile_s,
        "train_step_s": train_s,
        "train_step_s_mean": statistics.fmean(train_times),
        "train_step_s_std": statistics.pstdev(train_times),
        "train_samples_per_s": B * world / train_s,
        "train_tokens_per_s": B * world * tokens_per_sample / train_s,
        "sample_compile_s": sample_compile_s,
        "sample_step_s": sample_s,
        "sample_step_s_mean": statistics.fmean(sample_times),
        "sample_samples_per_s": B * world / sample_s,
        "train_flops_per_step": train_flops * world,
        "train_flops_per_s": train_flops * world / train_s,
        "sample_flops_per_step": sample_flops * world,
        "sample_flops_per_s": sample_flops * world / sample_s,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_dtype": str(cfg.precision.dtype),
        "matmul_peak_fp32_flops_per_s": peak_fp32,
        "train_mfu": train_flops / train_s / peak,
        "sample_mfu": sample_flops / sample_s / peak,
        "peak_host_memory_mib": peak_host_memory_mib(),
        "peak_device_memory_mib": peak_device_memory_mib(str(cfg.device.target)),
        "warmup_steps": int(task.warmup_steps),
        "steps": int(task.steps),
        "overrides": _overrides(),
        "run_dir": str(out),
    }
    if par.is_main:
        print(format_table(result), flush=True)
        path = Path(task.results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
        (out / "benchmark.json").write_text(json.dumps(result, indent=1))
        log.info("appended the result to %s", path)
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return []


def format_table(r: dict) -> str:
    m = r["model"]
    gf = 1e9

    def row(name, value):
        return f"| {name:<32} | {value:>24} |"

    dev = "n/a" if r["peak_device_memory_mib"] is None else f"{r['peak_device_memory_mib']:.0f}"
    lines = [
        f"benchmark: STDiT hidden {m['hidden_size']} depth {m['depth']} heads {m['num_heads']} patch "
        f"{m['patch_size']}, latent {m['in_channels']}x{'x'.join(map(str, m['input_size']))}, "
        f"{r['precision']}, batch {r['batch_size_per_rank']} x {r['world_size']} rank(s), {r['device_target']}",
        row("metric", "value"), row("-" * 32, "-" * 24),
        row("parameters", f"{m['params']:,}"),
        row("tokens per sample", f"{r['tokens_per_sample']:,}"),
        row("train compile + first step (s)", f"{r['train_compile_s']:.2f}"),
        row("train step (s, median)", f"{r['train_step_s']:.4f} +- {r['train_step_s_std']:.4f}"),
        row("train samples/s", f"{r['train_samples_per_s']:.3f}"),
        row("train tokens/s", f"{r['train_tokens_per_s']:,.0f}"),
        row("train GFLOP/step (3 x fwd)", f"{r['train_flops_per_step'] / gf:,.2f}"),
        row("train GFLOP/s", f"{r['train_flops_per_s'] / gf:,.2f}"),
        row("sample compile + first step (s)", f"{r['sample_compile_s']:.2f}"),
        row("sample step (s, CFG batch)", f"{r['sample_step_s']:.4f}"),
        row("sample GFLOP/s", f"{r['sample_flops_per_s'] / gf:,.2f}"),
        row(f"matmul peak GFLOP/s ({r['matmul_peak_dtype']})", f"{r['matmul_peak_flops_per_s'] / gf:,.2f}"),
        row("train MFU", f"{100 * r['train_mfu']:.1f}%"),
        row("sample MFU", f"{100 * r['sample_mfu']:.1f}%"),
        row("peak host memory (MiB)", f"{r['peak_host_memory_mib']:.0f}"),
        row("peak device memory (MiB)", dev),
    ]
    return "\n".join(lines)
