"""pytest's settings for the application's tests (test_dizo.py needs none: it travels alone with dizo.py)."""

import gc
import os
import sys

import pytest

# The workers share the cores: an OpenMP thread that waits sleeps rather than spins (read when torch loads, later).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of many seconds, started first (below)")


def pytest_collection_modifyitems(items):
    """The slow tests first: under -n auto they then run beside the others, not alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Imported modules' objects never become garbage. Frozen, they are not walked again by each gc.collect() (train.py runs
# one per method, to measure its peak memory), which would cost 0.05-0.1 s each once torch.compile's modules are in.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After a test that imported modules (matplotlib, peft, torch.compile's backends, ...), what is alive is frozen."""
    modules = len(sys.modules)
    yield
    if len(sys.modules) > modules:
        gc.collect()
        gc.freeze()
