"""A sweep's first step, timed: cutting each (task, cut layer) pair's labelled rows out of the caches before the
first trial (issue 17: 12 pairs over caches of 3,000-5,000 documents took a user 147 s; asked: <= 20 s).

    for t in clothing_rating clothing_recommended clothing_department; do
        .venv/bin/python bench/subset_task.py $t --train 3500 --dev 500 --test 1000 --corpus clothing_5000 \\
            --out /tmp/rows; done
    .venv/bin/python bench/subset_task.py trec --train 3500 --dev 500 --test 500 --out /tmp/rows
    .venv/bin/python bench/sweep_rows.py --task /tmp/rows/clothing_rating_5000.yaml,...,/tmp/rows/trec_4500.yaml \\
        --cut-layer 2,3,4 --out bench/results/sweep_rows.json

The caches are built first, every layer in one pass per corpus (untimed: `er-ray sweep` reports them apart), in
their own Ray; then a fresh local Ray starts (timed apart) and the step runs as `er-ray sweep` runs it: the same
`run_data` call per pair, on the same options (`sweep._trial_options`), timed one by one and in all. A second
pass repeats it in the same Ray (a sweep resumed in one process). Options at a sweep's defaults otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="comma-separated task names or spec files")
    ap.add_argument("--cut-layer", default="2,3,4")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-length", type=int, default=None, help="default: the task type's (128; QA 384)")
    ap.add_argument("--work", default="/tmp/er_ray_sweep_rows", help="where the caches are built (kept, reused)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from er_ray import console, tasks
    from er_ray.cache_build import cache_root, ensure_cache
    from er_ray.cluster import connect
    from er_ray.options import TrainOptions
    from er_ray.sweep import _trial_options
    from er_ray.train import run_data

    console.configure()
    names, layers = a.task.split(","), [int(k) for k in a.cut_layer.split(",")]
    loaded = {t: tasks.load_task(t) for t in names}
    train = TrainOptions(task=names, model=a.model, output=a.work, max_length=a.max_length)
    train = train.for_task_types(t.type for t in loaded.values())
    caches = {}
    for t, task in loaded.items():  # every task: tasks over one corpus may hold different documents
        root = cache_root(a.work, task.spec.corpus, a.model, train.max_length)
        caches[t] = ensure_cache(task, root, a.model, train.max_length, train.dtype, layers)
    import ray

    ray.shutdown()  # the timed step starts in a fresh Ray, as a new `er-ray sweep` process does
    t0 = time.perf_counter()
    connect(dashboard=True)
    ray_start = time.perf_counter() - t0
    passes = []
    for _ in range(2):
        pairs, t_all = [], time.perf_counter()
        for t in names:
            for k in layers:
                config = {"train": dataclasses.asdict(train), "task": t, "cache": caches[t],
                          "point": {"cut_layer": k, "adapter": "lora", "adapter_size": 16, "learning_rate": None}}
                t1 = time.perf_counter()
                data = run_data(_trial_options(config), t)
                pairs.append({"task": loaded[t].name, "cut_layer": k, "seconds": round(time.perf_counter() - t1, 2),
                              "rows": data["rows"]})
        passes.append({"seconds": round(time.perf_counter() - t_all, 2), "pairs": pairs})
        print(f"{len(pairs)} pairs in {passes[-1]['seconds']:.1f} s "
              f"(slowest {max(p['seconds'] for p in pairs):.1f} s)", file=sys.stderr)
    result = {"args": vars(a), "ray_start_seconds": round(ray_start, 2), "passes": passes,
              "cache_bytes": {t: sum(p.stat().st_size for p in Path(c).rglob("*.parquet")) for t, c in caches.items()}}
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
