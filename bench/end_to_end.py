"""The speed a user feels: whole `er-ray train` (recycled) and `er-ray finetune` commands, timed from the shell,
side by side, rounds alternated (this machine is noisy: compare ratios within a round).

    .venv/bin/python bench/subset_task.py clothing_recommended --train 3500 --dev 500 --test 1000 --out /tmp/e2e
    .venv/bin/python bench/end_to_end.py --task /tmp/e2e/clothing_recommended_5000.yaml --rounds 3 \\
        --code new=. --code old=/tmp/wt_old --out bench/results/end_to_end.json

Each round runs, for every `--code` checkout (LABEL=PATH: the er_ray on PYTHONPATH, e.g. a worktree of an older
commit), `er-ray train` and `er-ray finetune` with every option at its default but `--max-train-examples` and
`--epochs` (a new user's small budget), each its own process and its own local Ray, into one output folder whose
cache is built once before the rounds (untimed) and whose runs are deleted before each command. Recorded per
command: the wall time, the run's test score and seconds per epoch, and the timeline er_ray writes in
metrics.json (when the checkout writes one).
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

ER_RAY = str(Path(sys.executable).with_name("er-ray"))


def command(verb: str, code: str, task: str, out: Path, args: argparse.Namespace) -> dict:
    for d in ("runs", "ray", "results.parquet", "results.md"):
        p = out / d
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(Path(code).resolve())}
    cmd = [ER_RAY, verb, "--task", task, "--output", str(out), "--max-train-examples", str(args.max_train_examples),
           "--epochs", str(args.epochs), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (metrics,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*/metrics.json")]
    return {"verb": verb, "wall": round(wall, 2), "test": metrics["test"], "dev": metrics["dev"],
            "seconds_per_epoch": round(metrics["seconds_per_epoch"], 2), "epochs_run": metrics["epochs_run"],
            "timeline": {k: round(v, 2) for k, v in metrics.get("timeline", {}).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code", action="append", default=None, help="LABEL=PATH of an er_ray checkout (repeatable)")
    ap.add_argument("--max-train-examples", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/er_ray_end_to_end")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    codes = dict(c.split("=", 1) for c in (args.code or ["this=."]))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    outs = {label: work / label for label in codes}
    for label, code in codes.items():  # the cache, built once per checkout, untimed (a user's earlier command)
        print(f"warm-up {label}: {command('train', code, args.task, outs[label], args)['wall']} s", flush=True)
    rounds = []
    for r in range(args.rounds):
        row = {}
        for label, code in codes.items():
            for verb in ("train", "finetune"):
                row[f"{label} {verb}"] = m = command(verb, code, args.task, outs[label], args)
                print(f"round {r + 1} {label} {verb}: wall {m['wall']} s, test {m['test']:.4f}, "
                      f"{m['seconds_per_epoch']} s/epoch, timeline {m['timeline']}", flush=True)
            row[f"{label} finetune / train, wall"] = round(row[f"{label} finetune"]["wall"] /
                                                          row[f"{label} train"]["wall"], 3)
            print(f"round {r + 1} {label}: finetune / train wall {row[f'{label} finetune / train, wall']}", flush=True)
        rounds.append(row)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
