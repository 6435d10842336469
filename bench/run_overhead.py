"""The fixed cost of one `er-ray train`: a tiny recycled run (64 TREC examples, 1 epoch) from a built cache, timed
end to end and per phase from the console's own lines, arms alternated in one invocation (this machine is noisy).

    .venv/bin/python bench/run_overhead.py --rounds 3 --arms default,RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2

An arm is `default` or NAME=VALUE environment settings joined by '+'. Phases: `start` (command start to the cache
line: imports, Ray start, fingerprints), `data` (to the train line: the labelled rows cut from the cache), `fit`
(to the epoch line: Ray Train's controller and worker group, the worker's set-up, the epoch, dev evaluation),
`finish` (test evaluation, export), `exit` (Ray's shutdown).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ER_RAY = str(Path(sys.executable).with_name("er-ray"))
# the run line ("<run>: train N, dev N, test N examples; ...") whatever the defaults name the run
MARKS = [("start", "[er_ray cache]"), ("data", "examples; "),
         ("fit", "epoch 1/1"), ("finish", "per epoch ->")]


def one_run(work: Path, env: dict[str, str]) -> dict[str, float]:
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "ray", ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([ER_RAY, "train", "--task", "trec", "--max-train-examples", "64", "--epochs", "1",
                             "--max-length", "32", "--output", str(work)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": "", **env})
    times, last = {}, 0.0
    for line in proc.stderr:
        for phase, mark in MARKS:
            if phase not in times and mark in line:
                now = time.perf_counter() - t0
                times[phase], last = round(now - last, 2), now
    if proc.wait() != 0:
        raise SystemExit(f"er-ray train failed with {env}")
    wall = time.perf_counter() - t0
    times["exit"] = round(wall - last, 2)
    times["wall"] = round(wall, 2)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default="default,RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2")
    ap.add_argument("--work", default="/tmp/er_ray_overhead")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "run_overhead.json"))
    args = ap.parse_args()
    arms = {a: dict(kv.split("=", 1) for kv in a.split("+")) if a != "default" else {} for a in args.arms.split(",")}
    work = Path(args.work)
    one_run(work, {})  # builds the cache once; not counted
    results = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm, env in arms.items():
            t = one_run(work, env)
            results[arm].append(t)
            print(f"round {r + 1} {arm}: {t}", flush=True)
    summary = {arm: {k: round(sum(t[k] for t in ts) / len(ts), 2) for k in ts[0]} for arm, ts in results.items()}
    for arm, s in summary.items():
        print(f"mean {arm}: {s}")
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": results, "mean": summary}, indent=1))


if __name__ == "__main__":
    main()
