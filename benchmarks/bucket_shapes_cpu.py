"""Variable shapes in graph mode on CPU: the train task's step for a tiny STDiT2 (SizedDiffusionLoss with frame
masks and size conditioning, gradients, clip, AdamW, EMA; opensora/train/step.py) over the micro-batch shapes of a
bucket config, compiled (a) once per shape (task.shapes=per_shape: MindSpore keeps a graph per input shape) or
(b) once with dynamic dims (task.shapes=dynamic: `set_inputs` with None for batch, frames, height, width).

    python benchmarks/bucket_shapes_cpu.py                 # both modes, each in its own process
    python benchmarks/bucket_shapes_cpu.py --mode dynamic  # one

The shapes are those of the bucket config below (tiny resolutions of one's own, pixel space, 3 channels), run
round-robin `--rounds` times as training alternates buckets: the first round compiles (per_shape: every shape;
dynamic: the first call only), later rounds only run. Prints one JSON line per mode (first-call seconds and mean
later-call seconds per shape, total compile seconds, peak RSS) and a table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RESOLUTIONS = {"px32": {"pixels": 1024, "ratios": {"0.56": [24, 42], "1.00": [32, 32], "1.78": [42, 24]}}}
BUCKETS = {"px32": {1: [1.0, 8], 8: [1.0, 2], 16: [1.0, 1]}}
# (batch, frames, H, W) of the micro-batches the plan gives, in bucket order
SHAPES = [(8, 1, 32, 32), (2, 8, 32, 32), (1, 16, 32, 32), (8, 1, 24, 42), (2, 8, 24, 42), (2, 8, 42, 24)]


def measure(mode: str, rounds: int, hidden: int, depth: int) -> dict:
    import mindspore as ms

    from helpers import compose_cfg
    from opensora.parallel.single import SingleProcess
    from opensora.tasks.common import build_model
    from opensora.train.batch import StepInputs
    from opensora.train.step import StepRunner, build_train_step
    from hydra.utils import instantiate

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    csv = Path("/tmp/bucket_shapes_bench.csv")
    csv.write_text("path,text,num_frames,height,width\na.mp4,a,100,32,32\n")
    cfg = compose_cfg(["task=train", "data=variable_csv", f"data.csv_path={csv}", "model=stdit2_tiny",
                       "scheduler=iddpm", "vae=identity", "text_encoder=t5_tiny", f"model.hidden_size={hidden}",
                       f"model.depth={depth}", "model.num_heads=4", "model.input_sq_size=32", f"task.shapes={mode}",
                       "data.mask_ratios={mask_no: 0.5, mask_image_head: 0.5}", "logger=none"])
    model = build_model(cfg, with_pretrained=False)
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
    strategy = SingleProcess()
    step_fn, _, _ = build_train_step(cfg, model, diffusion, strategy)
    runner = StepRunner(step_fn, strategy, Path("/tmp"), mode)
    L, D = int(cfg.text_encoder.model_max_length), int(cfg.model.caption_channels)
    rng = np.random.default_rng(0)

    def inputs(b, t, h, w):
        x = rng.standard_normal((b, 3, t, h, w)).astype(np.float32)
        x_mask = np.ones((b, t), bool)
        x_mask[:, 0] = t == 1
        cond = [np.full(b, v, np.float32) for v in (t, h, w, w / h, 24.0)]
        return (x, rng.integers(0, 1000, b).astype(np.int32), rng.standard_normal(x.shape).astype(np.float32),
                rng.standard_normal((b, 1, L, D)).astype(np.float32), np.ones((b, L), np.int32),
                np.zeros(b, np.int32), x_mask, *cond, np.float32(1.0))

    keys = [list(s) for s in SHAPES]
    first, later = {}, {str(s): [] for s in SHAPES}
    for r in range(rounds):
        for s in SHAPES:
            batch = StepInputs([inputs(*s)], s[0], [tuple(s)])
            start = time.perf_counter()
            loss = runner(batch, r)[0]
            float(loss.asnumpy())
            seconds = time.perf_counter() - start
            (later[str(s)].append(seconds) if r else first.__setitem__(str(s), seconds))
    return {"mode": mode, "hidden": hidden, "depth": depth, "shapes": keys, "first_call_s": first,
            "later_call_s": {k: float(np.mean(v)) for k, v in later.items() if v},
            "compile_s": runner.compile_seconds, "graphs": len(runner.local),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["per_shape", "dynamic"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.rounds, args.hidden, args.depth)), flush=True)
        return
    results = []
    for mode in ("per_shape", "dynamic"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--rounds", str(args.rounds), "--hidden",
                              str(args.hidden), "--depth", str(args.depth)], capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not line:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(f"{mode} failed")
        print(line[-1], flush=True)
        results.append(json.loads(line[-1]))
    head = " | ".join(f"{r['mode']} first call s | {r['mode']} later s" for r in results)
    print(f"\n| shape (B, T, H, W) | {head} |")
    for s in SHAPES:
        cells = [f"{r['first_call_s'][str(s)]:.1f} | {r['later_call_s'].get(str(s), float('nan')):.3f}"
                 for r in results]
        print(f"| {s} | {' | '.join(cells)} |")
    for r in results:
        print(f"{r['mode']}: {r['graphs']} graph(s), compile {r['compile_s']:.1f} s in all, peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
