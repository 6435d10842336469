"""Losing a node mid-run, on one machine: a `ray.cluster_utils.Cluster` of three raylets ("nodes"), the node that
runs the work removed (its raylet and workers killed) once the work is under way. Run as its own process by
tests/test_node_faults.py (a process holds one Ray, and the test session already has one):

    python tests/node_faults.py cache CORPUS OUT      # an `er-ray cache` build loses its encoder's node
    python tests/node_faults.py train TASK OUT        # an `er-ray train` run loses its training worker's node

The head gets no CPU, each worker node two (logical CPUs, on a 2-core machine): the work lands on a worker node,
and after that node is gone it goes on on the other. Prints one JSON line: what was removed and what the run returned.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

# Dead nodes are noticed in about 3 s instead of 30 (the default health check), as a cloud cluster would tune it.
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


CLUSTERS: list[Cluster] = []


def start() -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    CLUSTERS.append(cluster)
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster, workers


def node_running(workers, marker: str, timeout: float = 300):
    """The worker node whose raylet is the parent of a process whose command line holds `marker`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in psutil.process_iter():
            try:
                if marker in " ".join(p.cmdline()):
                    for node in workers:
                        if p.ppid() == node.all_processes["raylet"][0].process.pid:
                            return node
            except psutil.Error:
                pass
        time.sleep(0.5)
    raise AssertionError(f"no process {marker!r} on a worker node")


def remove_when(cluster, workers, marker: str, ready, removed: dict):
    def watch():
        while not ready():
            time.sleep(0.2)
        node = node_running(workers, marker)
        removed.update(node=node.unique_id, at=time.time())
        cluster.remove_node(node, allow_graceful=False)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def cache(corpus: str, out: str) -> dict:
    from er_ray.cache_build import build_cache
    from er_ray.options import CacheOptions

    cluster, workers = start()
    manifest = Path(out) / "layer=3" / "manifest.json"
    removed: dict = {}
    # once the first shard is committed, the encoder's node goes
    watcher = remove_when(cluster, workers, "ShardEncoder",
                          lambda: manifest.exists() and json.loads(manifest.read_text())["shards"], removed)
    m = build_cache(CacheOptions(corpus=[corpus], output=out, cut_layer=[3], max_length=64, shard_rows=16,
                                 batch_size=16))[3]
    watcher.join(timeout=1)
    return {"removed": bool(removed), "rows": m.rows, "shards": len(m.shards)}


def train(task: str, out: str) -> dict:
    from er_ray.options import TrainOptions
    from er_ray.train import train as train_tasks

    cluster, workers = start()
    removed: dict = {}
    snapshots = Path(out) / "ray"
    watcher = remove_when(cluster, workers, "RayTrainWorker",  # after epoch 1's checkpoint is registered
                          lambda: any("checkpoint_" in f.read_text() for f in snapshots.rglob(
                              "checkpoint_manager_snapshot.json")), removed)
    m = train_tasks(TrainOptions(task=[task], output=out, epochs=3, patience=None, batch_size=16, max_length=48,
                                 max_train_examples=400, cpus_per_worker=1, max_failures=2))[0]
    watcher.join(timeout=1)
    from er_ray.cluster import on_one_machine

    return {"removed": bool(removed), "epochs_run": m["epochs_run"], "test": m["test"],
            "one_machine": on_one_machine(),  # three raylets: not one machine to Ray (predict uses its actors)
            "resumed": [h["resumed"] for h in m["history"]]}


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    what, arg, out = sys.argv[1:4]
    try:
        print("RESULT " + json.dumps((cache if what == "cache" else train)(arg, out)), flush=True)
    finally:
        ray.shutdown()
        CLUSTERS[0].shutdown() if CLUSTERS else None
