"""Aggregate a study's finished runs (runs/*/metrics.json) per task and configuration over seeds: issue 15's table
for a study that has not finished (a finished one writes the same figures to its REPORT.md).

    python bench/seed_table.py /work/study15full/out/minilm/runs   # or a kept copy under bench/results/

Fine-tuning's row is its learning rate picked on dev with the first seed (the study's rule); every recycled
configuration gets a row (cut layer, adapter, rate), and runs with a time budget (the study's "at fine-tuning's
time") one of their own. "diff" is the mean over the seeds both rows have of recycled - fine-tuning, in points.
"""
import json
import statistics
import sys
from pathlib import Path

runs = Path(sys.argv[1])
rows: dict[tuple[str, str], dict[int, dict]] = {}
for f in sorted(runs.glob("*/metrics.json")):
    m = json.loads(f.read_text())
    if m["full_finetune"]:
        config = f"finetune lr {m['learning_rate']:g}"
    else:
        size = "" if m["adapter"] == "full" else f" {m['adapter_size']}"
        config = f"k={m['cut_layer']} {m['adapter']}{size} lr {m['learning_rate']:g}"
        config += ", fine-tuning's time" if m.get("budget_seconds") else ""
    rows.setdefault((m["task"], config), {})[m["seed"]] = {"test": m["test"], "dev": m["dev"],
                                                          "epochs": m["epochs_run"]}


def fmt(d: dict[int, dict]) -> str:
    xs = [d[s]["test"] for s in sorted(d)]
    spread = f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""
    return f"{statistics.fmean(xs):.4f}{spread} ({', '.join(f'{x:.4f}' for x in xs)})"


def diff(a: dict[int, dict], b: dict[int, dict]) -> str:
    common = sorted(set(a) & set(b))
    if not common:
        return "-"
    gaps = [100 * (a[s]["test"] - b[s]["test"]) for s in common]
    return f"{statistics.fmean(gaps):+.2f} (worst {min(gaps):+.2f}; seeds {','.join(map(str, common))})"


print("| task | configuration | seeds | test: mean ± sd (per seed) | epochs | vs fine-tuning, points |")
print("|---|---|---|---|---|---|")
for task in sorted({t for t, _ in rows}):
    mine = {c: d for (t, c), d in rows.items() if t == task}
    tuned = {c: d for c, d in mine.items() if c.startswith("finetune")}
    first = min(s for d in tuned.values() for s in d) if tuned else None
    ft_config = max((c for c in tuned if first in tuned[c]), key=lambda c: tuned[c][first]["dev"], default=None)
    ft = mine.get(ft_config, {})
    for config, d in sorted(mine.items(), key=lambda kv: (not kv[0].startswith("finetune"), kv[0])):
        if config.startswith("finetune") and config != ft_config:
            continue  # the rate that lost on dev
        epochs = "/".join(str(d[s]["epochs"]) for s in sorted(d))
        gap = "" if config == ft_config else diff(d, ft)
        print(f"| {task} | {config}{' (picked on dev)' if config == ft_config else ''} | {len(d)} | {fmt(d)} | "
              f"{epochs} | {gap} |")
