"""A built-in task cut to N rows per split (a fixed sample: the ids that hash lowest), as a task spec (YAML +
Parquet) that every er_ray command takes.

    .venv/bin/python bench/subset_task.py clothing_department --train 3000 --dev 500 --test 1000 --out /tmp/mpc
    # -> /tmp/mpc/clothing_department_4500.yaml (corpus `clothing_4500`: its own, smaller cache)
    .venv/bin/python bench/subset_task.py clothing_rating --train 1000 --dev 400 --test 800 --corpus clothing_sub \
        --out /tmp/sub    # tasks over one corpus given one --corpus name share one cache (the union of their rows)

For benchmarks of the big model, where evaluating the whole dev and test splits every run would cost more than the
training being measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml  # ray depends on PyYAML

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import tasks  # noqa: E402


def _id_hash(doc_id: str) -> str:
    return hashlib.sha256(str(doc_id).encode()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task")
    for split in ("train", "dev", "test"):
        ap.add_argument(f"--{split}", type=int, required=True, help=f"rows of the {split} split to keep")
    ap.add_argument("--out", required=True, help="folder for the spec and its Parquet file")
    ap.add_argument("--corpus", help="the subset's corpus name (default: CORPUS_ROWS); give tasks over one corpus "
                                     "the same name to share one cache, which then holds the union of their rows")
    a = ap.parse_args()
    task = tasks.load_task(a.task)
    sizes = {"train": a.train, "dev": a.dev, "test": a.test}
    # Not the first N rows: a split is stored in its source's order, and movie_sentiment's source is sorted by
    # sentiment (its first 1,000 train rows: 972 positive). The rows whose ids hash lowest are a sample that
    # ignores the order, and tasks over one corpus (the clothing three) pick mostly the same documents.
    rows = [r | {"split": s} for s, n in sizes.items()
            for r in sorted(task.splits[s].to_pylist(), key=lambda r: _id_hash(r["id"]))[:n]]
    name = f"{task.spec.name}_{len(rows)}"
    spec = dataclasses.replace(task.spec, name=name, files=f"{name}.parquet",
                               corpus=a.corpus or f"{task.spec.corpus}_{len(rows)}",
                               description=f"{a.task}, {a.train} train / {a.dev} dev / {a.test} test rows "
                                           "(a benchmark subset)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / spec.files)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(tasks.spec_dict(spec), sort_keys=False))
    print(out / f"{name}.yaml", tasks.load_task(out / f"{name}.yaml").sizes())


if __name__ == "__main__":
    main()
