"""pytest set-up: tests/helpers.py (what the tests share) is importable as `helpers`; W&B stays silent; under
pytest-xdist (pyproject's `-n 2`), tests marked `alone` run with no other test beside them."""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
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


# Files in the order the two workers should take them (the rest follow in collection order): first those whose
# msrun tests run alone, while both workers are still busy with them (an msrun job keeps both cores busy), then
# the longest end-to-end chains, so that the end of the run is many short tests spread over both workers instead
# of one long file on one worker. From the durations of a CI run (pytest --durations).
FIRST = ("test_zero.py", "test_sequence_parallel.py", "test_parallel.py", "test_bucket_training.py",
         "test_vae_training.py", "test_train_recipes.py", "test_train_v1_1.py", "test_cli.py", "test_data_pipeline.py",
         "test_staged_sampling.py", "test_sample_v1_1.py", "test_stdit2.py", "test_data_cli.py", "test_benchmark.py",
         "test_sweeps.py", "test_recompute.py")


def pytest_collection_modifyitems(session, config, items):
    """Files in FIRST's order, each file's tests kept together and in order (pyproject: --no-loadscope-reorder,
    so xdist hands out files in this order)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


@contextlib.contextmanager
def _cpu_share(alone: bool):
    """A readers-writer lock between xdist workers, in two files shared by one run's workers: every test holds
    `cpus` shared, an `alone` test holds it exclusively. The `gate` makes it writer-preferring: an `alone` test
    keeps the gate while it waits, so no new test starts beside it and it waits at most for the one running."""
    run = os.environ["PYTEST_XDIST_TESTRUNUID"]
    stem = Path(tempfile.gettempdir()) / f"opensora-pytest-{run}"
    with open(f"{stem}.gate", "a") as gate, open(f"{stem}.cpus", "a") as cpus:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(cpus, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        if alone:
            os.environ["OPENSORA_TEST_ALONE"] = "1"
        try:
            yield
        finally:
            os.environ.pop("OPENSORA_TEST_ALONE", None)
            fcntl.flock(cpus, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Wraps set-up, call and tear-down, so module fixtures (often CLI runs themselves) are inside the lock too."""
    if "PYTEST_XDIST_TESTRUNUID" not in os.environ:
        yield
        return
    with _cpu_share(item.get_closest_marker("alone") is not None):
        yield
