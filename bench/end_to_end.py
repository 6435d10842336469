"""The speed a user feels: whole `er-ray train` (recycled) and `er-ray finetune` commands, timed from the shell,
side by side, rounds alternated (this machine is noisy: compare ratios within a round).

    .venv/bin/python bench/subset_task.py clothing_recommended --train 3500 --dev 500 --test 1000 --out /tmp/e2e
    .venv/bin/python bench/end_to_end.py --task /tmp/e2e/clothing_recommended_5000.yaml --rounds 3 \\
        --code new=. --code old=/tmp/wt_old --out bench/results/end_to_end.json
    # question answering at two cuts against fine-tuning, at the study's window length:
    .venv/bin/python bench/end_to_end.py --task /tmp/squad_sub/squad_1200.yaml --rounds 1 --epochs 1 \\
        --max-train-examples 800 --args="--max-length 128" --train k1="--cut-layer 1" --train k3="--cut-layer 3" \\
        --out bench/results/end_to_end_squad1200.json

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
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from checkouts import ER_RAY, codes_from, command_env


def command(verb: str, code: str, task: str, out: Path, args: argparse.Namespace, extra: str = "",
            max_train_examples: int | None = None, epochs: int | None = None) -> dict:
    for d in ("runs", "ray", "results.parquet", "results.md"):
        p = out / d
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    env = command_env(code)
    cmd = [*ER_RAY, verb, "--task", task, "--output", str(out),
           "--max-train-examples", str(max_train_examples or args.max_train_examples),
           "--epochs", str(epochs or args.epochs), "--seed", str(args.seed),
           *shlex.split(args.args), *shlex.split(extra)]
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
    ap.add_argument("--args", default="", help="options added to every command, e.g. --args='--max-length 128'")
    ap.add_argument("--train", action="append", default=None, metavar='LABEL="OPTIONS"',
                    help="an `er-ray train` arm with its own options (repeatable; default: one arm, train=\"\")")
    args = ap.parse_args()
    if bad := [g for g in args.train or [] if "=" not in g]:
        ap.error(f"--train takes LABEL=VALUE, got {bad[0]!r}")
    arms = dict(a.split("=", 1) for a in (args.train or ["train="]))
    codes = codes_from(ap, args.code, {"this": "."})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    outs = {label: work / label for label in codes}
    for label, code in codes.items():  # the caches, built once per checkout, untimed (a user's earlier command)
        for arm, extra in arms.items():
            m = command("train", code, args.task, outs[label], args, extra, max_train_examples=16, epochs=1)
            print(f"warm-up {label} {arm}: {m['wall']} s", flush=True)
    rounds = []
    for r in range(args.rounds):
        row = {}
        for label, code in codes.items():
            for arm, (verb, extra) in [*((a, ("train", x)) for a, x in arms.items()), ("finetune", ("finetune", ""))]:
                row[f"{label} {arm}"] = m = command(verb, code, args.task, outs[label], args, extra)
                print(f"round {r + 1} {label} {arm}: wall {m['wall']} s, test {m['test']:.4f}, "
                      f"{m['seconds_per_epoch']} s/epoch, timeline {m['timeline']}", flush=True)
            for arm in arms:
                ft, rec = row[f"{label} finetune"], row[f"{label} {arm}"]
                row[f"{label} finetune / {arm}, wall"] = w = round(ft["wall"] / rec["wall"], 3)
                row[f"{label} finetune / {arm}, s per epoch"] = e = round(ft["seconds_per_epoch"] /
                                                                         rec["seconds_per_epoch"], 3)
                print(f"round {r + 1} {label}: finetune / {arm}: wall {w}, s/epoch {e}", flush=True)
        rounds.append(row)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
