"""pytest set-up: tests/helpers.py (what the tests share) is importable as `helpers`; W&B stays silent."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

from helpers import compose_cfg  # noqa: E402


@pytest.fixture
def compose_config():
    return compose_cfg


@pytest.fixture
def graph_mode():
    """MindSpore graph mode for one test (compiled cells, as training runs them), PyNative afterwards."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
