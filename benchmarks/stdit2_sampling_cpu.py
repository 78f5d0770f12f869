"""Open-Sora 1.1 sampling (STDiT2 + IDDPM with classifier-free guidance, as task=sample runs it) on CPU: graph
compile time and time per sampling step, text-to-video and with a frame mask (image-to-video), at two sizes:

    tiny: the tests' STDiT2 (hidden 24, depth 1) on a 2 x 24 x 40 pixel-space clip (latent 3 x 2 x 24 x 40),
          8 caption tokens of 16, in graph mode (as task=sample runs)
    mid:  hidden 384, depth 4, 6 heads, 16 x 240 x 426 with the SD VAE's factor 8 (latent 4 x 16 x 30 x 53,
          padded to 30 x 54 tokens of 2 x 2: 6,480 tokens), 200 caption tokens of 4096 (T5-XXL-shaped), in
          graph mode too (3 GiB; before STDiT2 moved heads and frames without Transpose kernels and broadcast
          explicitly, the compiled graph kept those kernels' buffers and needed more than 14 GiB)

    python benchmarks/stdit2_sampling_cpu.py [--sizes tiny mid] [--steps 4]

Random weights (timing does not depend on them). Each size runs in its own process (its own peak RSS) and prints
one JSON line. A sampling step is one guided model call on the doubled batch [2B] plus the IDDPM update; "first"
includes compiling the graph (graph mode) or the first-call set-up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": dict(model=dict(hidden_size=24, depth=1, num_heads=2, caption_channels=16, model_max_length=8,
                            input_sq_size=32), latent=(3, 2, 24, 40), pixels=(2, 24, 40), mode="graph"),
    "mid": dict(model=dict(hidden_size=384, depth=4, num_heads=6, caption_channels=4096, model_max_length=200,
                           input_sq_size=512), latent=(4, 16, 30, 53), pixels=(16, 240, 426), mode="graph"),
}


def measure(name: str, steps: int) -> dict:
    import mindspore as ms

    from opensora.model import STDiT2
    from opensora.model.stdit2_conditions import size_conditions
    from opensora.scheduler import IDDPM

    spec = SIZES[name]
    ms.set_context(mode=ms.GRAPH_MODE if spec["mode"] == "graph" else ms.PYNATIVE_MODE)
    c, t, h, w = spec["latent"]
    model = STDiT2(in_channels=c, **spec["model"])
    model.set_train(False)
    L, D = spec["model"]["model_max_length"], spec["model"]["caption_channels"]
    rng = np.random.default_rng(0)
    y = ms.Tensor(rng.standard_normal((1, 1, L, D)).astype(np.float32))
    mask = ms.Tensor(np.ones((1, L), np.int32))
    kwargs = {k: ms.Tensor(v) for k, v in size_conditions(1, *spec["pixels"], 24.0).items()}
    noise = ms.Tensor(rng.standard_normal((1, c, t, h, w)).astype(np.float32))
    frame_mask = np.ones((1, t), np.float32)
    frame_mask[0, 0] = 0.0
    result = {"size": name, "latent": [c, t, h, w], "hidden": spec["model"]["hidden_size"],
              "depth": spec["model"]["depth"], "mode": spec["mode"], "steps": steps}
    for case, fm in (("t2v", None), ("i2v", ms.Tensor(frame_mask))):
        def run(n):
            sampler = IDDPM(num_sampling_steps=n, cfg_scale=7.0, cfg_channel=3)
            start = time.perf_counter()
            sampler.sample(model, noise.shape, y, mask, model.get_null_y(), noise=noise, progress=False,
                           model_kwargs=kwargs, frame_mask=fm).asnumpy()
            return time.perf_counter() - start

        first = run(1)  # graph compile + one step
        total = run(steps)
        result[f"{case}_first_step_s"] = round(first, 2)
        result[f"{case}_step_s"] = round(total / steps, 3)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--measure", choices=list(SIZES), help="run one size in this process")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps)), flush=True)
        return
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    for name in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--measure", name, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else json.dumps({"size": name, "exit_code": proc.returncode,
                                                  "error": proc.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main()
