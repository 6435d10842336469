"""Losing a node (its raylet and every worker on it, not one process) mid-cache and mid-training: the cache
completes byte-identical to an uninterrupted build, the training run resumes from its checkpoint. Each scenario
runs a three-node `ray.cluster_utils.Cluster` in a process of its own (tests/node_faults.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from er_ray import tasks
from er_ray.cache import open_cache
from er_ray.cache_build import build_cache
from er_ray.options import CacheOptions

SCRIPT = str(Path(__file__).with_name("node_faults.py"))
pytestmark = pytest.mark.slow


def scenario(*args) -> dict:
    out = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def test_a_cache_build_that_loses_its_encoders_node_ends_byte_identical(ray_local, tmp_path):
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(tasks.load_task("trec").documents().slice(0, 160), corpus)
    reference = tmp_path / "reference"
    build_cache(CacheOptions(corpus=[str(corpus)], output=str(reference), cut_layer=[3], max_length=64,
                             shard_rows=16, batch_size=16))
    result = scenario("cache", corpus, tmp_path / "faulted")
    assert result == {"removed": True, "rows": 160, "shards": 10}, result
    got, want = (open_cache(tmp_path / d, 3).manifest.shards for d in ("faulted", "reference"))
    assert [(s["file"], s["sha256"]) for s in got] == [(s["file"], s["sha256"]) for s in want]


def test_a_training_run_that_loses_its_workers_node_resumes_from_its_checkpoint(tmp_path):
    # sms_spam cut to 400 training, 200 dev and 200 test messages: a cache of 800 documents, not 4,837
    rows = [r | {"split": s} for s, t in tasks.load_task("sms_spam").splits.items()
            for r in t.slice(0, 400 if s == "train" else 200).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sms.parquet")
    (tmp_path / "sms.yaml").write_text("name: sms_small\nfiles: sms.parquet\n")
    result = scenario("train", tmp_path / "sms.yaml", tmp_path / "runs")
    assert result["removed"] and result["epochs_run"] == 3, result
    assert result["resumed"].count(True) == 1 and result["resumed"][0] is False, result  # once, from a checkpoint
    assert result["test"] > 0.9, result  # sms_spam's majority class is 0.868
    assert result["one_machine"] is False, result
