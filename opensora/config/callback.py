"""The Hydra callback that turns a composed config into one that can run, before Hydra writes anything.

Registered in conf/config.yaml. Before a single run's directory exists (`on_run_start`), and for every job of a
multirun (`on_job_start`):
1. `resume=<run>`: rebuild the run's own config plus the overrides given now (opensora/config/resume.py);
   `task.run=<run>` (sampling): take the run's model, text encoder, VAE, data sizes and scheduler.
2. `validate` the whole config (opensora/config/validate.py).
A refusal prints every problem and exits with status 2; nothing is written (a multirun job's directory already
exists and says FAILED). When a job fails later, its `run.log` ends with the error and a `FAILED` file holds it,
so a failed run is never mistaken for a finished one.
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from opensora.config.resolvers import claim_dirs

log = logging.getLogger("opensora.config")

FAILED = "FAILED"
# What the start-up pass found, logged by the task once logging is set up (opensora/tasks/__init__.py).
NOTES: dict[str, Any] = {"warnings": [], "resume_changes": {}}


def prepare(config: DictConfig) -> None:
    """Rebuild (resume / task.run) and validate `config` in place; raises ConfigError or ValueError."""
    from opensora.config.resume import rebuild_for_resume, rebuild_for_sampling
    from opensora.config.validate import task_name, validate

    NOTES["warnings"], NOTES["resume_changes"] = [], {}
    overrides = [str(o) for o in config.hydra.overrides.task]
    if config.get("resume") is not None:
        from opensora.config.resume import resume_problem

        problem = resume_problem(str(config.resume))
        if problem:
            raise ValueError(problem)
        NOTES["resume_changes"] = rebuild_for_resume(config, overrides)["changes"]
    elif task_name(config) in ("sample", "eval_loss") and config.task.get("run"):
        rebuild_for_sampling(config, overrides, set(config.hydra.runtime.choices.keys()))
    NOTES["warnings"] = validate(config)
    if task_name(config) == "train" and config.get("resume") is None and config.hydra.mode == RunMode.RUN:
        from opensora.tasks.train import earlier_run_message, existing_checkpoints

        out = str(config.hydra.run.dir)
        earlier = existing_checkpoints(out)
        if earlier:  # before Hydra writes into it
            raise ValueError(earlier_run_message(out, earlier))


def _refuse(err: Exception) -> None:
    text = str(err)
    sys.stderr.write(("error: " + text if not text.startswith("the configuration") else "error: " + text) + "\n")
    sys.stderr.flush()
    raise SystemExit(2)


class PrepareRun(Callback):
    """See the module docstring."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            prepare(config)
        except ValueError as e:  # ConfigError included
            _refuse(e)
        claim_dirs(lambda: config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = claim_dirs(lambda: config.hydra.sweep.dir)
        # Jobs a launcher runs in other processes (submitit) compose their config again: give them this launch's
        # directory itself, not the resolver that names a new one per process.
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={sweep_dir}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        try:
            prepare(config)
        except ValueError as e:
            Path(HydraConfig.get().runtime.output_dir, FAILED).write_text(str(e) + "\n")
            _refuse(e)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        status = getattr(job_return.status, "name", str(job_return.status))
        if status != "FAILED":
            return
        err = job_return._return_value
        text = "".join(traceback.format_exception(err)) if isinstance(err, BaseException) else str(err)
        logging.getLogger("opensora").error("the run failed:\n%s", text.rstrip())
        try:
            Path(HydraConfig.get().runtime.output_dir, FAILED).write_text(text)
        except OSError:
            pass
