"""Sweep bookkeeping: each multirun job's returned metric, and the best one printed at the end.

Registered in conf/config.yaml as a Hydra callback, so every `python run.py -m ...` (grid, ablation or Optuna
search, conf/hparams_search/) ends with a line like

    sweep best: eval/color_acc = 1 (maximize) at job 1: optim.lr=0.001 [2 jobs, outputs/multiruns/.../sweep_results.json]

The metric and its direction are the sweep definition's (`optimized_metric`, `optimized_direction`); a job whose
task did not return that metric fails, naming it (opensora/tasks/__init__.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULT_FILE = "job_result.json"


def best_job(results: list[dict], direction: str) -> Optional[dict]:
    """The result with the best finite `value` (None when there is none)."""
    finite = [r for r in results if isinstance(r.get("value"), (int, float)) and math.isfinite(r["value"])]
    if not finite:
        return None
    pick = min if direction == "minimize" else max
    return pick(finite, key=lambda r: r["value"])


def _is_main_rank() -> bool:
    return os.environ.get("RANK_ID", "0") in ("", "0")


class SweepBestCallback(Callback):
    """Writes each multirun job's metric to `<job dir>/job_result.json`; at the end reads them all back
    from the sweep directory, writes `sweep_results.json` there and prints the best.

    The metric and direction are each job's `optimized_metric` / `optimized_direction`.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN or not _is_main_rank():
            return
        status = getattr(job_return.status, "name", str(job_return.status))
        value = job_return.return_value if status == "COMPLETED" else None
        record = {"job": hc.job.num, "overrides": list(hc.overrides.task), "status": status,
                  "metric": config.get("optimized_metric"),
                  "direction": str(config.get("optimized_direction") or "minimize"),
                  "value": float(value) if isinstance(value, (int, float)) else None}
        out = Path(hc.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).write_text(json.dumps(record, indent=1))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_main_rank():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        results = []
        for path in sorted(sweep_dir.glob(f"*/{RESULT_FILE}")):
            results.append(json.loads(path.read_text()))
        results.sort(key=lambda r: r["job"])
        if not results:
            print(f"sweep best: no job results in {sweep_dir}", flush=True)
            return
        metric, direction = results[0]["metric"], results[0]["direction"]
        if metric is None:
            print(f"sweep best: no optimized_metric set ({len(results)} jobs, {sweep_dir}); choose one with "
                  "hparams_search=... or optimized_metric=KEY optimized_direction=minimize|maximize", flush=True)
            return
        best = best_job(results, direction)
        summary = {"metric": metric, "direction": direction, "best": best, "jobs": results}
        (sweep_dir / "sweep_results.json").write_text(json.dumps(summary, indent=1))
        if best is None:
            print(f"sweep best: no job returned a finite {metric} ({len(results)} jobs, {sweep_dir})", flush=True)
            return
        print(f"sweep best: {metric} = {best['value']:.6g} ({direction}) at job {best['job']}: "
              f"{' '.join(best['overrides']) or '(no overrides)'} "
              f"[{len(results)} jobs, {sweep_dir / 'sweep_results.json'}]", flush=True)
