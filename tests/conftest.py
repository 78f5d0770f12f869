"""Shared fixtures: Hydra composition without a running app, and the repo root."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from opensora.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_SILENT", "true")
register_configs()


def compose_cfg(overrides=(), output_dir=None):
    """Compose conf/config.yaml like run.py would; `paths.output_dir` pinned (no Hydra runtime here)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or ROOT / "outputs" / "pytest")
    return cfg


@pytest.fixture
def compose_config():
    return compose_cfg
