"""Pool the seeds of several runs of one `er-ray study` (e.g. the same command at two commits): per task, the
recycled-minus-fine-tuning gap of every (study, seed) pair, for the sweep's pick and for k = L/2.

    python bench/study_pool.py bench/results/study15full_minilm_80257da bench/results/study15_minilm_56758f8

Each folder is a study's output (or a kept copy): its REPORT.md names the configuration of each variant (the
fine-tuning rate picked on dev, the sweep's pick, k = L/2); the runs' own metrics.json give the per-seed test
scores. A gap is paired within a study and seed (the same seed's fine-tuning run), then averaged over all pairs.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

VARIANTS = ("recycled best", "recycled k=L/2 full")
MINILM_HALF = 3  # L/2 of MiniLM's 6 layers (the studies pooled here are under minilm/)


def report_configs(study: Path) -> dict[tuple[str, str], str]:
    """(task, variant) -> the config cell of REPORT.md's table, e.g. "k=2 full lr 0.0003" or "lr 0.0001"."""
    if not (study / "REPORT.md").exists():
        return unfinished_configs(study)
    out = {}
    for line in (study / "REPORT.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 5 and cells[3] in ("finetune", *VARIANTS):
            out[(cells[1], cells[3])] = cells[4]
    return out


def unfinished_configs(study: Path) -> dict[tuple[str, str], str]:
    """The same for a study that has not written its REPORT.md yet, by the study's rules: fine-tuning's rate is the
    best on the first seed's dev, the sweep's pick is the first row of sweep.md (its best on dev), and k = L/2 is
    the `full` configuration at half the model's layers (`full` only: a study with other adapter kinds has one
    L/2 row per kind, which REPORT.md names)."""
    out = {}
    runs = [json.loads(f.read_text()) for f in (study / "minilm" / "runs").glob("*/metrics.json")]
    for task in {m["task"] for m in runs}:
        tuned = [r for r in runs if r["task"] == task and r["full_finetune"]]
        first = min(r["seed"] for r in tuned)
        best = max((r for r in tuned if r["seed"] == first), key=lambda r: r["dev"])
        out[(task, "finetune")] = f"lr {best['learning_rate']:g}"
        half = [r for r in runs if r["task"] == task and not r["full_finetune"] and r["adapter"] == "full"
                and r["cut_layer"] == MINILM_HALF and not r.get("budget_seconds")]
        if half:
            out[(task, "recycled k=L/2 full")] = f"k={MINILM_HALF} full lr {half[0]['learning_rate']:g}"
    for line in (study / "minilm" / "sweep" / "sweep.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2].isdigit() and (cells[0], "finetune") in out:
            out.setdefault((cells[0], "recycled best"), f"k={cells[2]} {cells[3]} lr {cells[5]}")
    return out


def seed_scores(study: Path, task: str, config: str) -> dict[int, float]:
    """The test score per seed of the runs (not time-budgeted) that match a REPORT.md config cell."""
    k = re.search(r"k=(\d+)", config)
    lr = float(re.search(r"lr ([0-9.e-]+)", config).group(1))
    scores = {}
    for f in (study / "minilm" / "runs").glob("*/metrics.json"):
        m = json.loads(f.read_text())
        if m["task"] != task or m.get("budget_seconds") or abs(m["learning_rate"] - lr) > 1e-12:
            continue
        if (k is None) == bool(m["full_finetune"]) and (k is None or m["cut_layer"] == int(k.group(1))):
            scores[m["seed"]] = m["test"]
    return scores


def main(studies: list[Path]) -> None:
    print("| task | variant | pairs | gap per (study, seed), points | mean gap | worst |")
    print("|---|---|---|---|---|---|")
    tasks = dict.fromkeys(t for s in studies for (t, v) in report_configs(s) if v == "finetune")
    for task in tasks:
        for variant in VARIANTS:
            gaps, cells = [], []
            for i, study in enumerate(studies):
                configs = report_configs(study)
                if (task, variant) not in configs or (task, "finetune") not in configs:
                    continue
                ft = seed_scores(study, task, configs[(task, "finetune")])
                rec = seed_scores(study, task, configs[(task, variant)])
                for seed in sorted(set(ft) & set(rec)):
                    gaps.append(100 * (rec[seed] - ft[seed]))
                    cells.append(f"{i}:{seed} {gaps[-1]:+.2f}")
            if gaps:
                print(f"| {task} | {variant} | {len(gaps)} | {', '.join(cells)} | {statistics.fmean(gaps):+.2f} | "
                      f"{min(gaps):+.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if missing := [p for p in sys.argv[1:] if not (Path(p) / "minilm" / "runs").is_dir()]:
        sys.exit(f"not a study's output (no minilm/runs in it): {', '.join(missing)}")
    main([Path(p) for p in sys.argv[1:]])
