"""pytest's settings for the application's tests (test_dizo.py needs none: it travels alone with dizo.py)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of many seconds, started first (below)")


def pytest_collection_modifyitems(items):
    """The slow tests first: under -n auto they then run beside the others, not alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
