"""N identical recycled runs at once on one local Ray: do they give one result, and what MFU does each print?

The demo starts four runs on two cores; each worker measures its matmul peak at its start, while the others start
too. This runs the same recycled command (one seed) N times side by side, each into a folder of its own, and
prints each run's test and dev scores, per-epoch training loss and MFU.

    .venv/bin/python bench/concurrent_runs.py --cache demo-output/caches/clothing-minilm-64 \\
        --task clothing_recommended --runs 4 --max-train-examples 600 --epochs 2 --max-length 64 --out /tmp/cr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--max-train-examples", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", required=True, help="a folder for the runs (r0, r1, ...)")
    a = ap.parse_args()

    import ray

    from er_ray.options import TrainOptions
    from er_ray.train import run_all

    out = Path(a.out)
    ray.init(num_cpus=a.cpus, include_dashboard=False)
    opts = [(TrainOptions(task=[a.task], cache=a.cache, output=str(out / f"r{i}"), seed=a.seed, epochs=a.epochs,
                          max_train_examples=a.max_train_examples, max_length=a.max_length), a.task)
            for i in range(a.runs)]
    for m in run_all(opts, out, max_concurrent=a.runs):
        print("RESULT", json.dumps({"test": m["test"], "dev": m["dev"],
                                    "loss": [h["train_loss"] for h in m["history"]],
                                    "mfu": [round(h["mfu"], 3) for h in m["history"]]}), flush=True)


if __name__ == "__main__":
    main()
