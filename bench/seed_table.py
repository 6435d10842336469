"""Aggregate a study's finished runs (runs/*/metrics.json) per task and variant over seeds: the table for #15.

    python bench/seed_table.py /work/study15/out/minilm/runs   # or bench/results/study15_minilm_seeds012_partial
"""
import json
import statistics
import sys
from pathlib import Path

runs = Path(sys.argv[1])
PICK = {"movie_sentiment": 2, "clothing_rating": 2, "wnut16": 4}  # the sweep's pick where it is not L/2 (k = 3)
rows = {}
for f in sorted(runs.glob("*/metrics.json")):
    m = json.loads(f.read_text())
    if m.get("budget_seconds") or (m["full_finetune"] and abs(m["learning_rate"] - 1e-4) > 1e-12):
        continue  # equal-time runs, and fine-tuning at the losing rate
    v = "finetune" if m["full_finetune"] else f"k{m['cut_layer']}"
    rows.setdefault((m["task"], v), {})[m["seed"]] = m["test"]
tasks = sorted({t for t, _ in rows})
print("| task | fine-tuning (1e-4) | k = 3 (L/2) | diff | the pick | diff |")
print("|---|---|---|---|---|---|")
for t in tasks:
    ft = rows.get((t, "finetune"), {})
    l2 = rows.get((t, "k3"), {})
    pk = rows.get((t, f"k{PICK.get(t, 3)}"), {})
    def fmt(d):
        xs = [d[s] for s in sorted(d)]
        return (f"{statistics.fmean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")
                + f" ({len(xs)}: " + ", ".join(f"{x:.4f}" for x in xs) + ")") if xs else "-"
    def diff(a, b):
        common = sorted(set(a) & set(b))
        return f"{100 * statistics.fmean(a[s] - b[s] for s in common):+.2f} (seeds {common})" if common else "-"
    print(f"| {t} | {fmt(ft)} | {fmt(l2)} | {diff(l2, ft)} | {fmt(pk)} | {diff(pk, ft)} |")
