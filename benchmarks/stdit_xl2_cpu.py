"""STDiT-XL/2 on CPU at 16x256x256 (latent [B, 4, 16, 32, 32], 120 T5-shaped text tokens of 4096):
graph compile and forward times, and a training step (IDDPM loss + grads + clip + AdamW, the
train task's TrainStep) when memory allows.

    python benchmarks/stdit_xl2_cpu.py                  # the whole benchmark (several minutes)
    python benchmarks/stdit_xl2_cpu.py --measure forward --mode graph --depth 2   # one measurement

Every measurement runs in its own process (so its peak RSS, from getrusage, is its own) and
prints one JSON line. The benchmark first measures depth 1 and 2 (the same blocks as XL/2), fits
time and peak RSS as linear in depth, and extrapolates to depth 28. A depth-28 run is started
only when the extrapolated peak fits in MemAvailable minus a margin; otherwise the reason is
printed (depth 2 itself is run only when twice the depth-1 peak fits). The graph-mode forward
that does not fit is then run in PyNative mode, which frees intermediates as it goes. Each
measurement process also has a watchdog that ends it when MemAvailable falls under
--min-free-gib, so the machine is never driven out of memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3
XL_DEPTH = 28


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


class Watchdog(threading.Thread):
    """Ends the process (exit code 3) when MemAvailable drops below `min_free` bytes."""

    def __init__(self, min_free: int):
        super().__init__(daemon=True)
        self.min_free = min_free

    def run(self):
        while True:
            free = mem_available()
            if free < self.min_free:
                print(json.dumps({"aborted": f"MemAvailable fell to {free / GIB:.2f} GiB", "peak_rss_gib":
                                  round(peak_rss_gib(), 2)}), flush=True)
                os._exit(3)
            time.sleep(0.2)


# ================================================================
# One measurement (in its own process)
# ================================================================


def measure(args) -> dict:
    import mindspore as ms

    mode = ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE
    ms.set_context(mode=mode, device_target="CPU", jit_config={"jit_level": "O0"})
    ms.set_seed(0)
    Watchdog(int(args.min_free_gib * GIB)).start()
    from opensora.model import STDiT, count_parameters

    res = {"what": args.measure, "mode": args.mode, "depth": args.depth}
    t0 = time.perf_counter()
    model = STDiT(input_size=(args.frames, args.latent_size, args.latent_size), in_channels=4, patch_size=(1, 2, 2),
                  hidden_size=1152, depth=args.depth, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1,
                  pred_sigma=True, caption_channels=4096, model_max_length=args.text_len, space_scale=0.5,
                  time_scale=1.0)
    res["params"] = count_parameters(model)
    res["build_s"] = time.perf_counter() - t0
    res["rss_build_gib"] = peak_rss_gib()

    rng = np.random.default_rng(0)
    b = args.batch
    shape = (b, 4, args.frames, args.latent_size, args.latent_size)
    x = ms.Tensor(rng.standard_normal(shape), ms.float32)
    t = ms.Tensor(rng.integers(0, 1000, (b,)), ms.int32)
    y = ms.Tensor(rng.standard_normal((b, 1, args.text_len, 4096)) * 0.2, ms.float32)  # T5-XXL-like scale
    mask = np.zeros((b, args.text_len), np.int32)
    mask[:, :40] = 1  # a 40-token caption padded to 120
    mask = ms.Tensor(mask)

    if args.measure == "forward":
        model.set_train(False)
        net, inputs = model, (x, t, y, mask)
    else:
        from opensora.scheduler import IDDPM
        from opensora.tasks.train import DiffusionLoss, TrainStep
        from mindspore.experimental.optim import AdamW  # as conf/optim/adamw.yaml

        optimizer = AdamW(model.trainable_params(), lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        net = TrainStep(DiffusionLoss(model, IDDPM(num_sampling_steps=None)), optimizer, grad_clip=1.0, ema=None,
                        ema_decay=0.0)
        net.set_train(True)
        inputs = (x, t, ms.Tensor(rng.standard_normal(shape), ms.float32), y, mask)
    if args.mode == "graph":
        t0 = time.perf_counter()
        net.compile(*inputs)
        res["compile_s"] = time.perf_counter() - t0
        res["rss_compile_gib"] = peak_rss_gib()
    for i in range(1, args.runs + 1):
        t0 = time.perf_counter()
        out = net(*inputs)
        (out if args.measure == "forward" else out[0]).asnumpy()
        res[f"run{i}_s"] = time.perf_counter() - t0
    res["peak_rss_gib"] = peak_rss_gib()
    return res


# ================================================================
# The benchmark: depth 1 and 2, extrapolation, depth 28 when it fits
# ================================================================


def run_measurement(args, what: str, mode: str, depth: int, runs: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", what, "--mode", mode, "--depth", str(depth),
           "--runs", str(runs), "--batch", str(args.batch), "--frames", str(args.frames),
           "--latent-size", str(args.latent_size), "--text-len", str(args.text_len),
           "--min-free-gib", str(args.min_free_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1])
    if "aborted" in res:
        print(f"  ABORTED {what} {mode} depth {depth}: {res['aborted']} (peak RSS {res['peak_rss_gib']} GiB)")
    else:
        times = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in res.items() if k.endswith("_s"))
        print(f"  {what:<7s} {mode:<8s} depth {depth:2d} ({res['params']:,} params): {times}; "
              f"peak RSS {res['peak_rss_gib']:.2f} GiB", flush=True)
    return res


def extrapolate(r1: dict, r2: dict, key: str, depth: int = XL_DEPTH) -> float:
    """Linear in depth through depth 1 and 2 (not below the depth-2 value: timings are noisy)."""
    return max(r2[key], r1[key] + (r2[key] - r1[key]) * (depth - 1))


def stage(args, what: str, mode: str) -> None:
    print(f"{what} ({mode} mode):", flush=True)
    r1 = run_measurement(args, what, mode, 1, 2)
    free = mem_available() / GIB
    if "aborted" not in r1 and 2 * r1["peak_rss_gib"] > free - args.min_free_gib:
        print(f"  SKIPPED depth 2 and {XL_DEPTH}: depth 1 peaked at {r1['peak_rss_gib']:.1f} GiB, so depth 2 may need "
              f"up to twice that; MemAvailable is {free:.1f} GiB", flush=True)
        return
    r2 = run_measurement(args, what, mode, 2, 2) if "aborted" not in r1 else r1
    if "aborted" in r1 or "aborted" in r2:
        print(f"  SKIPPED depth {XL_DEPTH}: the small runs already ran out of memory")
        return
    need = extrapolate(r1, r2, "peak_rss_gib")
    per_block = r2["peak_rss_gib"] - r1["peak_rss_gib"]
    parts = [f"run {extrapolate(r1, r2, 'run2_s'):.0f} s"]
    if mode == "graph":
        parts.insert(0, f"compile {extrapolate(r1, r2, 'compile_s'):.0f} s")
    print(f"  extrapolated to depth {XL_DEPTH}: " + ", ".join(parts) + f", peak RSS {need:.1f} GiB "
          f"({per_block:.2f} GiB per block)", flush=True)
    free = mem_available() / GIB
    if need > free - args.margin_gib:
        print(f"  SKIPPED depth {XL_DEPTH} {what} in {mode} mode: it needs ~{need:.1f} GiB, MemAvailable is "
              f"{free:.1f} GiB (margin {args.margin_gib:.1f} GiB)", flush=True)
        if what == "forward" and mode == "graph" and not args.no_pynative:
            stage_pynative_forward(args)
        return
    run_measurement(args, what, mode, XL_DEPTH, 2)


def stage_pynative_forward(args) -> None:
    # PyNative frees intermediates as it goes: weights (~3 GiB for XL/2) plus about one block's working set.
    print("forward (pynative mode), the full model:", flush=True)
    run_measurement(args, "forward", "pynative", XL_DEPTH, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16, help="latent frames")
    ap.add_argument("--latent-size", type=int, default=32, help="latent height = width (256 px / 8)")
    ap.add_argument("--text-len", type=int, default=120)
    ap.add_argument("--no-train", action="store_true", help="forward only")
    ap.add_argument("--no-pynative", action="store_true", help="no PyNative fallback for the forward")
    ap.add_argument("--margin-gib", type=float, default=2.0, help="memory an extrapolated run must leave free")
    ap.add_argument("--min-free-gib", type=float, default=1.0, help="watchdog threshold of every measurement")
    ap.add_argument("--measure", choices=["forward", "train"], help="run one measurement and print it as JSON")
    ap.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    ap.add_argument("--depth", type=int, default=XL_DEPTH)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    if args.measure:
        print(json.dumps(measure(args)), flush=True)
        return 0

    import mindspore as ms

    print(f"STDiT-XL/2 benchmark: latent [{args.batch}, 4, {args.frames}, {args.latent_size}, {args.latent_size}] "
          f"({args.frames * (args.latent_size // 2) ** 2} tokens), text [{args.batch}, 1, {args.text_len}, 4096]; "
          f"fp32; MindSpore {ms.__version__}; CPU cores visible: {os.cpu_count()}; "
          f"MemAvailable {mem_available() / GIB:.1f} GiB", flush=True)
    t0 = time.perf_counter()
    stage(args, "forward", "graph")
    if not args.no_train:
        stage(args, "train", "graph")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
