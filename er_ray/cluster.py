"""Connecting to Ray and sizing work to what the cluster has (a laptop, or GPU nodes)."""

from __future__ import annotations

import os

import ray


def connect(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local Ray once.

    A local Ray starts with its dashboard (on 127.0.0.1) by default: it is where a user watches jobs and metrics,
    and Ray Train V2 relies on its State API (without it Train's placement-group cleaner logs "State API may be
    temporarily unavailable" every few seconds, and Tune over Train hangs once a trial is stopped)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Credentials are not forwarded: a local Ray's workers inherit this process's environment (AWS_* included), and
    # a cluster's nodes have their own (an instance profile, cluster.yaml); forwarding keys in the runtime_env
    # would show them in the dashboard's job info.
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false",
                        **({"ER_RAY_HOME": os.environ["ER_RAY_HOME"]} if "ER_RAY_HOME" in os.environ else {})}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=env, log_to_driver=True)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))
