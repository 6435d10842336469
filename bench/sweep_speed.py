"""Issue 5's figure: a sweep of 3 cut layers x 2 adapter sizes on MiniLM for the 3 clothing tasks at once (18 trials,
ASHA per task, trials concurrent), against the same 18 trials run one by one to the end (what one does by hand).

    .venv/bin/python bench/sweep_speed.py --max-train-examples 1000 --epochs 2 --max-length 64

Both arms read the same caches (built once, first, and timed on their own); the sweep arm runs first. Reports
wall time of each arm, trials finished and stopped, and the best configuration per task each arm found.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray.cluster import connect  # noqa: E402
from er_ray.options import CLOTHING  # noqa: E402
from er_ray.flags import build  # noqa: E402
from er_ray.options import SweepOptions  # noqa: E402
from er_ray.sweep import sweep  # noqa: E402


def main() -> None:
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--cut-layer", default="2,3,4")
    ap.add_argument("--adapter-size", default="8,32")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train-examples", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default="bench/results/sweep_minilm.json")
    a = ap.parse_args()
    connect(dashboard=True)
    work = Path(tempfile.mkdtemp(prefix="er_ray_sweep_bench_"))
    common = dict(task=list(CLOTHING), model=a.model, cut_layer=[int(x) for x in a.cut_layer.split(",")],
                  adapter=["lora"], adapter_size=[int(x) for x in a.adapter_size.split(",")], epochs=a.epochs,
                  max_train_examples=a.max_train_examples, max_length=a.max_length, caches=str(work))
    arms = {}
    for arm, extra in (("sweep_concurrent_asha", {}),
                       ("one_by_one", dict(max_concurrent_trials=1, scheduler="fifo"))):
        t0 = time.perf_counter()
        res = sweep(build(SweepOptions, **common, **extra, output=str(work / arm)))
        wall = time.perf_counter() - t0
        arms[arm] = {"wall_seconds": wall, "cache_seconds": res["cache_seconds"],
                     "trial_seconds": res["sweep_seconds"], "trials": len(res["trials"]),
                     "finished": sum(r["status"] == "done" for r in res["trials"]),
                     "stopped": sum(r["status"] == "stopped" for r in res["trials"]),
                     "best": {b["task"]: {k: b[k] for k in ("cut_layer", "adapter_size", "dev", "test")}
                              for b in res["best"]}}
        print(json.dumps({arm: arms[arm]}, indent=1), flush=True)
    result = {"command": " ".join(sys.argv), "args": vars(a), "arms": arms,
              "ratio_one_by_one_over_sweep": arms["one_by_one"]["trial_seconds"]
              / arms["sweep_concurrent_asha"]["trial_seconds"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
