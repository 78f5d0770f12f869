"""pytest set-up: tests/helpers.py (what the tests share) is importable as `helpers`; W&B stays silent; under
pytest-xdist (pyproject's `-n 2`), the msrun jobs of tests marked `alone` run with no other test beside them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

from helpers import compose_cfg, cores_shared  # noqa: E402


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


# Files in the order the two workers should take them (the rest follow in collection order): first those with
# msrun jobs, which run alone (an msrun job keeps both cores busy), then the longest end-to-end chains, so that
# the end of the run is many short tests spread over both workers instead of one long file on one worker. From
# the durations of a CI run (pytest --durations).
FIRST = ("test_zero.py", "test_sequence_parallel.py", "test_parallel.py", "test_bucket_training.py",
         "test_vae_training.py", "test_train_recipes.py", "test_train_v1_1.py", "test_cli.py", "test_data_pipeline.py",
         "test_staged_sampling.py", "test_sample_v1_1.py", "test_stdit2.py", "test_data_cli.py", "test_benchmark.py",
         "test_sweeps.py", "test_recompute.py")


def pytest_collection_modifyitems(session, config, items):
    """Files in FIRST's order, each file's tests kept together and in order (pyproject: --no-loadscope-reorder,
    so xdist hands out files in this order)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, every test but those marked `alone` holds the cores shared for its set-up, call and tear-down
    (module fixtures, often CLI runs themselves, included); an `alone` test holds nothing, and its msrun jobs take
    the cores exclusively (helpers.cores_alone, in helpers.run_msrun)."""
    if "PYTEST_XDIST_TESTRUNUID" not in os.environ:
        yield
        return
    if item.get_closest_marker("alone") is not None:
        os.environ["OPENSORA_TEST_ALONE"] = "1"
        try:
            yield
        finally:
            os.environ.pop("OPENSORA_TEST_ALONE", None)
        return
    with cores_shared():
        yield
