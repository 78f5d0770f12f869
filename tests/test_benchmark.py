"""Benchmark task: the STDiT matmul-FLOP formula against a hand count and against the matmuls the
model really executes; (slow) `task=benchmark` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from helpers import ROOT
from opensora.model import STDiT, layers
from opensora.tasks.benchmark import model_flops, stdit_matmul_flops


def test_flops_formula_equals_hand_count():
    # T=2 frames of S=4 patches (4x4 px, patch 2x2): N=8 tokens; C=8, F=32, L=3 caption tokens of width 6,
    # patch input P=1*2*2*3=12, output O=1*2*2*6=24.
    hand = (
        2 * 8 * 12 * 8  # patch embedding: 1536
        + 2 * (256 * 8 + 8 * 8) + 2 * 8 * 48  # timestep MLP 4224 + t_block 768
        + 2 * 3 * (6 * 8 + 8 * 8)  # caption MLP: 672
        # block: spatial attn (qkv 3072, q k^T + p v over 2 frames of 4 tokens: 2 * 2*4*4*8 = 1024, proj 1024)
        + 3072 + 1024 + 1024
        # temporal attn (qkv 3072, 4 positions x 2 frames: 2 * 2*4*2*2*8/2 = 512, proj 1024)
        + 3072 + 512 + 1024
        # cross attn (q 1024, kv 2*3*8*16 = 768, scores + values 2 * 2*8*3*8 = 768, proj 1024)
        + 1024 + 768 + 768 + 1024
        + 2 * 8 * 8 * 32 * 2  # MLP: 8192
        + 2 * 8 * 8 * 24  # final layer: 3072
    )
    assert hand == 31776
    got = stdit_matmul_flops(1, (2, 4, 4), (1, 2, 2), 3, 6, 8, 1, 4.0, 6, 3)
    assert got == hand
    assert stdit_matmul_flops(5, (2, 4, 4), (1, 2, 2), 3, 6, 8, 1, 4.0, 6, 3) == 5 * hand


def test_flops_formula_equals_the_matmuls_the_model_executes(monkeypatch):
    """Every MatMul/BatchMatMul STDiT runs (patch conv, Linear, attention) is intercepted in PyNative
    mode and its 2 m n k summed."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    total = [0]

    def counting(op):
        def call(a, b):
            out = op(a, b)
            k = a.shape[-1] if not getattr(op, "transpose_a", False) else a.shape[-2]
            total[0] += 2 * int(np.prod(out.shape)) * int(k)
            return out
        return call

    model = STDiT(input_size=(3, 4, 6), in_channels=2, patch_size=(1, 2, 2), hidden_size=16, depth=2, num_heads=2,
                  mlp_ratio=3.0, caption_channels=5, model_max_length=7, class_dropout_prob=0.0)
    for _, cell in model.cells_and_names():
        if hasattr(cell, "matmul_nt"):
            cell.matmul_nt = counting(cell.matmul_nt)
    monkeypatch.setattr(layers, "_BMM", counting(layers._BMM))
    monkeypatch.setattr(layers, "_BMM_NT", counting(layers._BMM_NT))
    B = 2
    rng = np.random.default_rng(0)
    model.set_train(False)
    model(ms.Tensor(rng.standard_normal((B, 2, 3, 4, 6)).astype(np.float32)), ms.Tensor(np.array([1, 500], np.int32)),
          ms.Tensor(rng.standard_normal((B, 1, 7, 5)).astype(np.float32)), ms.Tensor(np.ones((B, 7), np.int32)))
    assert total[0] > 0 and total[0] == model_flops(model, B, 7)


@pytest.mark.slow
def test_benchmark_task_prints_table_and_appends_json(tmp_path):
    results = tmp_path / "bench.jsonl"
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1"}
    args = ["task=benchmark", "logger=none", "model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]",
            "model.num_heads=2", "data.num_frames=4", "data.image_size=8", "data.dataset.speed=1", "data.batch_size=2", "task.steps=2",
            "task.warmup_steps=1", "task.matmul_size=256", f"task.results_file={results}"]
    for run in range(2):
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| train step (s, median)" in proc.stdout and "| train MFU" in proc.stdout
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 2  # appended, not overwritten
    r = lines[-1]
    assert r["tokens_per_sample"] == 4 * 4 * 4 and r["batch_size_per_rank"] == 2 and r["world_size"] == 1
    assert r["train_flops_per_step"] == 3 * stdit_matmul_flops(2, (4, 8, 8), (1, 2, 2), 3, 3, 32, 1, 4.0, 64, 8)
    for key in ("train_step_s", "sample_step_s", "train_compile_s", "matmul_peak_flops_per_s", "peak_host_memory_mib"):
        assert r[key] > 0, key
    assert r["train_samples_per_s"] == pytest.approx(2 / r["train_step_s"])
    assert r["train_mfu"] == pytest.approx(r["train_flops_per_s"] / r["matmul_peak_flops_per_s"])
    assert r["peak_device_memory_mib"] is None  # CPU
