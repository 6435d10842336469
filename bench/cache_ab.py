"""`er-ray cache` as a user runs it, one checkout of er_ray against another: whole commands, wall time from start
to exit, a new cache each time, the checkouts alternated in every round (this machine is noisy); then the caches'
states compared row by row, so a change of speed is not a change of result.

    .venv/bin/python bench/cache_ab.py --corpus /tmp/e2e/clothing_recommended_5000.yaml \\
        --code new=. --code old=/tmp/wt_old --rounds 2 --out bench/results/cache_ab.json

`--code LABEL=PATH` (repeatable): the er_ray put on PYTHONPATH (e.g. a worktree of an older commit). Every other
option of the command is its default but those given after `--` (e.g. `-- --cut-layer 3 --dtype fp32`).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkouts import ER_RAY, codes_from, command_env  # noqa: E402


def build(code: str, corpus: str, out: Path, extra: list[str]) -> float:
    """One whole `er-ray cache` command on its own local Ray; its wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    env = command_env(code)
    t0 = time.perf_counter()
    proc = subprocess.run([*ER_RAY, "cache", "--corpus", corpus, "--output", str(out), *extra],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"er-ray cache failed under {code}:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - t0, 2)


def states(root: Path) -> dict[int, dict[str, np.ndarray]]:
    """cut layer -> id -> float32 states, for every layer built under `root`."""
    from er_ray.cache import open_cache

    return {int(d.name.split("=")[1]): open_cache(root, int(d.name.split("=")[1])).activations()
            for d in sorted(root.glob("layer=*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="a built-in task, a task spec, or corpus files")
    ap.add_argument("--code", action="append", required=True, help="LABEL=PATH of an er_ray checkout (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/er_ray_cache_ab")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "cache_ab.json"))
    ap.add_argument("extra", nargs="*", help="after --: more `er-ray cache` options, the same for every checkout")
    args = ap.parse_args()
    codes = codes_from(ap, args.code, {})
    work = Path(args.work)
    walls: dict[str, list[float]] = {label: [] for label in codes}
    for r in range(args.rounds):
        for label, code in codes.items():
            walls[label].append(build(code, args.corpus, work / label, args.extra))
            print(f"round {r + 1}, {label}: {walls[label][-1]} s", flush=True)
    first, *others = codes
    ref = states(work / first)
    agreement = {}
    for other in others:
        got = states(work / other)
        for k, rows in ref.items():
            assert set(rows) == set(got[k]), (other, k, "different documents")
            diff = max(float(np.abs(rows[i] - got[k][i]).max()) for i in rows)
            agreement[f"{other} vs {first}, layer {k}: max |state difference|"] = diff
    mean = {label: round(sum(v) / len(v), 2) for label, v in walls.items()}
    summary = {f"{other} / {first} wall": round(mean[other] / mean[first], 3) for other in others}
    out = {"corpus": args.corpus, "codes": codes, "extra": args.extra, "rounds": args.rounds, "wall_seconds": walls,
           "mean": mean, "summary": summary, "agreement": agreement}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({**mean, **summary, **agreement}, indent=1))


if __name__ == "__main__":
    main()
