"""Sweeps (conf/hparams_search/*.yaml): each composes with its sweeper and names its metric and direction; W&B
runs are grouped by sweep; the best job is picked in the right direction; a metric the task does not return fails
naming it; (slow) a 2-point learning-rate sweep runs and prints its best."""
from __future__ import annotations

import copy
import json

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from helpers import CONF, compose_cfg, run_cli
from opensora.sweeps import best_job
from opensora.tasks import optimized_value

SWEEPS = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))


def test_sweep_files_compose_with_their_sweepers(tmp_path):
    assert {"lr_grid", "ablate_precision_depth", "optuna_lr"} <= set(SWEEPS)
    expect = {"lr_grid": ("BasicSweeper", {"optim.lr"}, "eval/color_acc", "maximize"),
              "ablate_precision_depth": ("BasicSweeper", {"precision", "model.depth"}, "train/final_loss_avg",
                                         "minimize"),
              "optuna_lr": ("OptunaSweeper", {"optim.lr", "optim.lr_schedule.warmup_steps", "optim.ema_decay"},
                            "eval/color_acc", "maximize")}
    for name in SWEEPS:
        proc = run_cli([f"hparams_search={name}", "--cfg", "hydra"], tmp_path, timeout=120)
        hydra = yaml.safe_load(proc.stdout)["hydra"]
        target, params, metric, direction = expect[name]
        assert hydra["sweeper"]["_target_"].endswith(target) and set(hydra["sweeper"]["params"]) == params
        assert f"/multiruns,{name}_" in hydra["sweep"]["dir"]  # the sweep directory carries its name
        assert hydra["callbacks"]["sweep_best"]["_target_"] == "opensora.sweeps.SweepBestCallback"
        job = compose_cfg([f"hparams_search={name}"], tmp_path)
        assert (job.optimized_metric, str(job.optimized_direction)) == (metric, direction)


def test_wandb_group_is_the_sweep_name_in_multirun_only():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.sweep.dir = "outputs/multiruns/lr_grid_2026-01-01_00-00-00"
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = "outputs/multiruns/lr_grid_2026-01-01_00-00-00/0"
        cfg.hydra.job.num = 0
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        run_cfg.hydra.mode = RunMode.RUN
    try:
        HydraConfig.instance().set_config(cfg)
        assert cfg.logger.group == "lr_grid_2026-01-01_00-00-00"
        HydraConfig.instance().set_config(run_cfg)
        assert run_cfg.logger.group is None
    finally:
        HydraConfig.instance().cfg = None


def test_best_job_direction():
    jobs = [{"job": 0, "value": 0.5}, {"job": 1, "value": float("nan")}, {"job": 2, "value": 0.25},
            {"job": 3, "value": None}]
    assert best_job(jobs, "minimize")["job"] == 2 and best_job(jobs, "maximize")["job"] == 0
    assert best_job([{"job": 0, "value": None}], "minimize") is None


def test_a_missing_metric_is_named_with_what_exists(tmp_path):
    cfg = compose_cfg(["hparams_search=lr_grid", "task.eval=null"], tmp_path)
    with pytest.raises(KeyError, match=r"optimized_metric=eval/color_acc is not among the metrics this run returned "
                                       r"\(data/bad_samples, train/final_loss_avg\)"):
        optimized_value(cfg, {"train/final_loss_avg": 0.5, "data/bad_samples": 0})
    assert optimized_value(cfg, {"eval/color_acc": 0.75}) == 0.75
    assert optimized_value(compose_cfg([], tmp_path), {"eval/color_acc": 0.75}) is None  # no sweep: no metric


TINY = ["model.hidden_size=32", "model.depth=1", "model.patch_size=[1,2,2]", "model.num_heads=2",
        "data.num_frames=4", "data.image_size=8", "data.dataset.speed=1", "data.dataset.num_samples=64", "task.eval=null",
        "optimized_metric=train/final_loss_avg", "optimized_direction=minimize"]


@pytest.mark.slow
def test_two_point_lr_sweep_runs_with_one_command_and_prints_the_best(tmp_path):
    proc = run_cli(["-m", "hparams_search=lr_grid", "debug=fast", "logger=none", *TINY], tmp_path, timeout=900)
    (sweep,) = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert sweep.name.startswith("lr_grid_")
    results = json.loads((sweep / "sweep_results.json").read_text())
    jobs = results["jobs"]
    assert [[o for o in j["overrides"] if o.startswith("optim.lr=")] for j in jobs] == [["optim.lr=0.0003"],
                                                                                       ["optim.lr=0.001"]]
    assert all(j["status"] == "COMPLETED" and j["value"] > 0 for j in jobs)
    best = min(jobs, key=lambda j: j["value"])
    assert results["direction"] == "minimize" and results["best"] == best
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("sweep best:")]
    assert line == [f"sweep best: train/final_loss_avg = {best['value']:.6g} (minimize) at job {best['job']}: "
                    f"{' '.join(best['overrides'])} [2 jobs, {sweep / 'sweep_results.json'}]"]
    # each job returned the train task's metric: the final smoothed loss, also in its last checkpoint
    for j in jobs:
        ckpts = sweep / str(j["job"]) / "checkpoints"
        state = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "state.json").read_text())
        assert state["loss_avg"] == pytest.approx(j["value"], rel=1e-12)


@pytest.mark.slow
def test_sweep_through_the_submitit_launcher_keeps_one_sweep_directory(tmp_path):
    """hydra/launcher=submitit_local runs each job in a process of its own (as on a Slurm cluster): the jobs still
    land in this launch's one sweep directory, each with its own W&B run, and the best is printed."""
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "debug=fast", "optim.lr=1e-4,3e-4", *TINY], tmp_path,
                   timeout=900)
    (sweep,) = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    runs = [list((sweep / j / "wandb").glob("offline-run-*")) for j in ("0", "1")]
    assert all(len(r) == 1 for r in runs) and runs[0][0].name != runs[1][0].name
    assert "sweep best: train/final_loss_avg = " in proc.stdout
    slurm = compose_cfg_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.partition == "gpu"


def compose_cfg_with_hydra(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
