"""Recipe arms side by side, from finished runs' metrics.json (a grid or study cut short still has its runs): per
arm (learning rate, warm-up) and task, the test score of each seed, the paired difference to a baseline arm on the
(task, seed) pairs both have, and the runs that collapsed (test within 2 points of the majority class, or span F1
under 0.05; recipe_grid.py's rule).

    python bench/recipe_table.py /work/grid/minilm-512x2 --baseline 0.003/0.06
    python bench/recipe_table.py /work/grid64/minilm-1000x2 bench/results/study15_minilm_seeds012_partial \\
        --cut-layer 3 --baseline 0.003/0.06

Every metrics.json under the folders counts (recycled LoRA runs at --cut-layer; fine-tuning and time-budgeted
runs are left out). A run from before --warmup existed warmed up over 6% of its steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipe_grid import collapsed, majority  # noqa: E402

OLD_WARMUP = 0.06  # every run before the option


def arms_of(folders: list[str], cut_layer: int) -> dict[str, dict[str, dict[int, float]]]:
    """arm ("lr/warm-up") -> task -> seed -> test score."""
    arms: dict[str, dict[str, dict[int, float]]] = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("metrics.json")):
            m = json.loads(f.read_text())
            if m.get("full_finetune") or m.get("budget_seconds") or m.get("cut_layer") != cut_layer \
                    or m.get("adapter") != "lora" or m.get("test") is None:
                continue
            arm = f"{m['learning_rate']:g}/{m.get('settings', {}).get('warmup', OLD_WARMUP):g}"
            arms.setdefault(arm, {}).setdefault(m["task"], {})[m["seed"]] = m["test"]
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--cut-layer", type=int, default=3)
    ap.add_argument("--baseline", default="0.003/0.06", help="the arm others are compared with: lr/warm-up")
    a = ap.parse_args()
    arms = arms_of(a.folders, a.cut_layer)
    tasks = sorted({t for arm in arms.values() for t in arm})
    floors = {t: majority(t) for t in tasks}
    base = arms.get(a.baseline, {})
    print("| lr / warm-up | " + " | ".join(tasks) + f" | paired diff to {a.baseline} (points, mean / worst) "
          "| collapsed |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for arm in sorted(arms):
        cells, diffs, fell, n = [], [], 0, 0
        for t in tasks:
            got = arms[arm].get(t, {})
            cells.append(" ".join(f"{got[s]:.4f}" for s in sorted(got)) + (f" (s{','.join(map(str, sorted(got)))})"
                                                                            if got else "") or "-")
            diffs += [100 * (got[s] - base[t][s]) for s in got if s in base.get(t, {})]
            fell += sum(collapsed(x, floors[t]) for x in got.values())
            n += len(got)
        d = f"{statistics.fmean(diffs):+.2f} / {min(diffs):+.2f} ({len(diffs)} pairs)" if diffs and arm != a.baseline \
            else "-"
        print(f"| {arm} | " + " | ".join(cells) + f" | {d} | {fell}/{n} |")


if __name__ == "__main__":
    main()
