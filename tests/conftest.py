import os

# No hub, no telemetry: these machines reach only the package registries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole run (ray.init costs ~4 s; worker start-up 5-10 s)."""
    import ray

    from er_ray.cluster import connect

    connect(num_cpus=2, dashboard=True)  # Tune over Ray Train needs the State API (sweep tests)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm():
    from er_ray import pretrained

    return pretrained.load_encoder("minilm")


def all_cpus_free(timeout: float = 30.0) -> bool:
    """True once no task or actor holds a CPU of the local Ray (a failed pipeline must release its actors)."""
    import time

    import ray

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.5)
    return False


def pytest_collection_modifyitems(config, items):
    """The fast tier (`pytest -m "not slow"`) is what needs no Ray: a test that starts or joins one (any fixture
    on `ray_local` or the jobs' `head`) is slow, and so is one on the 110M-parameter mpnet."""
    for item in items:
        if {"ray_local", "head"} & set(item.fixturenames) or "mpnet" in item.name:
            item.add_marker(pytest.mark.slow)
