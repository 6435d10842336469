"""Recipe arms side by side, from finished runs' metrics.json (a grid or study cut short still has its runs): per
arm (learning rate, warm-up) and task, the test score of each seed, the paired difference to a baseline arm on the
(task, seed) pairs both have, and the runs that collapsed (test within 2 points of the majority class, or span F1
under 0.05; recipe_grid.py's rule).

    python bench/recipe_table.py /work/grid/minilm-512x2 --baseline 0.003/0.06
    python bench/recipe_table.py /work/grid64/minilm-1000x2 bench/results/study15_minilm_seeds012_partial \\
        --cut-layer 3 --baseline 0.003/0.06
    python bench/recipe_table.py /work/grid/minilm-512x2 --arm 0.003/0.25 \\
        --finetune bench/results/recipe_grid_minilm_512x2_finetune_s012.json

--finetune (a folder of runs, or a recipe_grid.py JSON) adds a table: an arm's mean over seeds per task beside
fine-tuning's at its default learning rate (1e-4), and the gap. With --pick-on-dev, fine-tuning is done well
(issue 15's fair baseline): per task and seed, the learning rate whose run scored best on dev, among every rate
run, and the table says which rates won.

    python bench/recipe_table.py bench/results/recipe_warmup_minilm/minilm-1000x2 --cut-layer 3 \
        --finetune /work/grid64/minilm-1000x2 --pick-on-dev

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
FINETUNE_LR = 1e-4  # fine-tuning's default


def arms_of(folders: list[str], cut_layer: int, adapter: str = "lora") -> dict[str, dict[str, dict[int, dict]]]:
    """arm ("lr/warm-up") -> task -> seed -> the run's dev and test scores, training seconds and epochs."""
    arms: dict[str, dict[str, dict[int, dict]]] = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("metrics.json")):
            m = json.loads(f.read_text())
            if m.get("full_finetune") or m.get("budget_seconds") or m.get("cut_layer") != cut_layer \
                    or m.get("adapter") != adapter or m.get("test") is None:
                continue
            arm = f"{m['learning_rate']:g}/{m.get('settings', {}).get('warmup', OLD_WARMUP):g}"
            arms.setdefault(arm, {}).setdefault(m["task"], {})[m["seed"]] = {
                "dev": m["dev"], "test": m["test"], "train_seconds": m.get("train_seconds"),
                "epochs": m.get("epochs_run"), "arm": arm}
    return arms


def finetune_runs(source: str) -> list[dict]:
    """Fine-tuning's finished runs (task, seed, learning rate, dev, test), from runs' metrics.json or a grid's
    JSON."""
    if source.endswith(".json"):
        return [r for r in json.loads(Path(source).read_text())["rows"]
                if r["arm"] == "finetune" and r.get("test") is not None]
    runs = []
    for f in sorted(Path(source).rglob("metrics.json")):
        m = json.loads(f.read_text())
        if m.get("full_finetune") and not m.get("budget_seconds") and m.get("test") is not None:
            runs.append({k: m.get(k) for k in ("task", "seed", "learning_rate", "dev", "test", "train_seconds",
                                               "epochs_run")})
    return runs


def finetune_of(source: str, pick_on_dev: bool = False) -> dict[str, dict[int, dict]]:
    """task -> seed -> fine-tuning's run: at its default rate, or (pick_on_dev) the rate best on dev."""
    got: dict[str, dict[int, dict]] = {}
    for r in finetune_runs(source):
        if not pick_on_dev and r["learning_rate"] != FINETUNE_LR:
            continue
        mine = got.setdefault(r["task"], {})
        if r["seed"] not in mine or r["dev"] > mine[r["seed"]]["dev"]:
            mine[r["seed"]] = r
    return got


def against_finetune(runs: dict[str, dict[int, dict]], finetune: dict[str, dict[int, dict]], arm: str,
                     picked: bool) -> None:
    """Test scores side by side, and training seconds: the arm's mean over its runs against fine-tuning's
    (the runs' own clocks: compare them only where both arms ran alike, e.g. two runs at a time)."""
    several = "," in arm  # a pick on dev among several arms: say which one each seed took
    which = "rate picked on dev" if picked else f"{FINETUNE_LR:g}"
    print(f"\n| task | fine-tuning ({which}), mean (seeds) | {arm}, mean (seeds) | gap (points) "
          "| worst seed's gap | train s: fine-tuning / arm (epochs) |"
          + (" rates picked (seed: rate) |" if picked else "") + (" arm picked (seed: arm) |" if several else ""))
    print("|---|---|---|---|---|---|" + ("---|" if picked else "") + ("---|" if several else ""))
    for t in sorted(runs):
        if t not in finetune:
            continue
        f, r = {s: run["test"] for s, run in finetune[t].items()}, {s: run["test"] for s, run in runs[t].items()}
        secs = [(finetune[t][s].get("train_seconds"), runs[t][s]["train_seconds"]) for s in r if s in f]
        secs = [(a, b) for a, b in secs if a and b]
        eps = sorted({run["epochs"] for run in runs[t].values()})
        sec = (f"{statistics.fmean(a for a, _ in secs):.0f} / {statistics.fmean(b for _, b in secs):.0f} "
               f"({'/'.join(map(str, eps))})") if secs else "-"
        worst = min((100 * (r[s] - f[s]) for s in r if s in f), default=None)
        rates = ", ".join(f"{s}: {finetune[t][s]['learning_rate']:g}" for s in sorted(f))
        print(f"| {t} | {statistics.fmean(f.values()):.4f} ({len(f)}) | {statistics.fmean(r.values()):.4f} "
              f"({len(r)}) | {100 * (statistics.fmean(r.values()) - statistics.fmean(f.values())):+.2f} | "
              + (f"{worst:+.2f} |" if worst is not None else "- |") + f" {sec} |" + (f" {rates} |" if picked else "")
              + (" " + ", ".join(f"{s}: {runs[t][s]['arm']}" for s in sorted(r)) + " |" if several else ""))


def picked_on_dev(arms: dict[str, dict[str, dict[int, dict]]], names: list[str]) -> dict[str, dict[int, dict]]:
    """task -> seed -> the run best on dev among the named arms' (one arm: its runs). Only (task, seed) pairs that
    every named arm ran count, so a pick is never made from fewer arms than asked."""
    runs: dict[str, dict[int, dict]] = {}
    for t in sorted({t for name in names for t in arms.get(name, {})}):
        seeds = set.intersection(*(set(arms.get(name, {}).get(t, {})) for name in names))
        for s in seeds:
            runs.setdefault(t, {})[s] = max((arms[name][t][s] for name in names), key=lambda r: r["dev"])
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--cut-layer", type=int, default=3)
    ap.add_argument("--baseline", default="0.003/0.06", help="the arm others are compared with: lr/warm-up")
    ap.add_argument("--finetune", help="fine-tuning's runs (a folder) or a recipe_grid.py JSON: compare --arm")
    ap.add_argument("--arm", default="0.003/0.25",
                    help="the arm compared with fine-tuning (lr/warm-up); several, comma-separated: per task and "
                         "seed the one best on dev (a sweep's pick over them)")
    ap.add_argument("--adapter", default="lora", help="the adapter kind whose runs count (lora, bottleneck, full)")
    ap.add_argument("--pick-on-dev", action="store_true",
                    help="fine-tuning at the rate best on dev per task and seed, not at its default")
    a = ap.parse_args()
    arms = arms_of(a.folders, a.cut_layer, a.adapter)
    tasks = sorted({t for arm in arms.values() for t in arm})
    floors = {t: majority(t) for t in tasks}
    base = arms.get(a.baseline, {})
    print("| lr / warm-up | " + " | ".join(tasks) + f" | paired diff to {a.baseline} (points, mean / worst) "
          "| collapsed |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for arm in sorted(arms):
        cells, diffs, fell, n = [], [], 0, 0
        for t in tasks:
            got = {s: run["test"] for s, run in arms[arm].get(t, {}).items()}
            cells.append(" ".join(f"{got[s]:.4f}" for s in sorted(got)) + (f" (s{','.join(map(str, sorted(got)))})"
                                                                            if got else "") or "-")
            diffs += [100 * (got[s] - base[t][s]["test"]) for s in got if s in base.get(t, {})]
            fell += sum(collapsed(x, floors[t]) for x in got.values())
            n += len(got)
        d = f"{statistics.fmean(diffs):+.2f} / {min(diffs):+.2f} ({len(diffs)} pairs)" if diffs and arm != a.baseline \
            else "-"
        print(f"| {arm} | " + " | ".join(cells) + f" | {d} | {fell}/{n} |")
    if a.finetune:
        against_finetune(picked_on_dev(arms, a.arm.split(",")), finetune_of(a.finetune, a.pick_on_dev), a.arm,
                         a.pick_on_dev)


if __name__ == "__main__":
    main()
