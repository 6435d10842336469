"""Where a whole er_ray command's CPU goes: every process on the machine sampled every 0.1 s while one command runs,
its CPU seconds summed by the name Ray gives it (`ray::TrainController`, `ray::SplitCoordinator`, ...), for
one or more checkouts side by side, rounds alternated. CPU seconds are far steadier than wall time on this noisy
machine, and on 2 cores every CPU second a helper process spends is time the training worker waits for.

    .venv/bin/python bench/command_processes.py --rounds 3 --code new=. --code old=/tmp/wt_old \\
        --out bench/results/command_processes.json -- \\
        train --task /tmp/e2e/clothing_recommended_5000.yaml --output /tmp/e2e_out --max-train-examples 512 --epochs 2

Each command runs with RAY_ADDRESS="" (its own local Ray) and PYTHONPATH set to the checkout; OUTPUT/runs and
OUTPUT/ray are deleted before each command (the cache is kept: build it first). The run's timeline from
metrics.json is recorded beside the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_processes import Sampler  # noqa: E402
from checkouts import ER_RAY, codes_from, command_env  # noqa: E402


def one(code: str, args: list[str]) -> dict:
    out = Path(args[args.index("--output") + 1])
    for d in ("runs", "ray"):
        shutil.rmtree(out / d, ignore_errors=True)
    env = command_env(code)
    sampler = Sampler()
    t0 = time.perf_counter()
    proc = subprocess.run([*ER_RAY, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    time.sleep(0.3)
    procs = sampler.stop()
    procs.pop(os.path.basename(sys.argv[0]), None)  # this sampler's own process
    if proc.returncode != 0:
        raise SystemExit(f"er-ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = [json.loads(p.read_text()) for p in (out / "runs").glob("*/metrics.json")]
    return {"wall": round(wall, 2), "cpu_s": round(sum(r["cpu_s"] for r in procs.values()), 2),
            "processes": procs, "timeline": metrics[0].get("timeline") if len(metrics) == 1 else None,
            "test": metrics[0].get("test") if len(metrics) == 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code", action="append", default=None, help="LABEL=PATH of an er_ray checkout (repeatable)")
    ap.add_argument("--out", default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the er-ray verb and its options")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if "--output" not in command[:-1]:
        ap.error("the command needs --output DIR (its runs are deleted before each round)")
    codes = codes_from(ap, args.code, {"this": "."})
    rows = []
    for r in range(args.rounds):
        for label, code in codes.items():
            row = {"round": r + 1, "code": label, **one(code, command)}
            rows.append(row)
            top = ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in list(row["processes"].items())[:8])
            print(f"round {r + 1} {label}: wall {row['wall']} s, CPU {row['cpu_s']} s, test {row['test']}; {top}",
                  flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"command": command, "codes": codes, "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
