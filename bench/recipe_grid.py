"""Issue 15's recipe grid: which learning rate (per adapter kind) makes a recycled model learn on every task, and
how fine-tuning done well (its learning rate also picked on dev) compares. Every default must come from evidence
across all the built-in tasks, never one.

    .venv/bin/python bench/recipe_grid.py --model minilm --max-train-examples 512 --epochs 2 --seeds 0
    # -> bench/results/recipe_grid_minilm_512x2.json and a table on stdout (also in the JSON)

Per seed: one `er-ray sweep` per adapter kind over every task at k = L/2 with that kind's learning rates (fifo:
every trial runs to the end), and full fine-tuning of every task at each of its learning rates (at most two runs
at once). Dev and test are the tasks' whole splits. A run "collapses" when its test score is within 2 points of
predicting the majority class (classification) or its span F1 is below 0.05 (token classification).

Resumable: runs are kept under --work by name, and a run that finished before is read, not trained again (a
sweep reads its finished trials; fine-tuning skips runs whose metrics.json exists), so seeds and arms can be
added one command at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import tasks as task_lib  # noqa: E402
from er_ray.options import BUILTIN_TASKS, SweepOptions, TrainOptions  # noqa: E402

COLLAPSE_MARGIN = 0.02


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def majority(name: str) -> float | None:
    task = task_lib.load_task(name)
    if task.type != "classification":
        return None
    labels = task.splits["test"].column("label").to_pylist()
    return max(labels.count(y) for y in set(labels)) / len(labels)


def collapsed(test: float | None, floor: float | None) -> bool:
    if test is None:
        return True
    return test <= floor + COLLAPSE_MARGIN if floor is not None else test < 0.05


def main():
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", action="append", help="a task (repeatable; default: every built-in task)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train-examples", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warmup", type=float, default=None, help="share of the steps warming up (default: er_ray's)")
    ap.add_argument("--adapters", default="lora,bottleneck,full")
    ap.add_argument("--lr-lora", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--lr-bottleneck", default="3e-4,1e-3,3e-3")
    ap.add_argument("--lr-full", default="3e-5,1e-4,3e-4")
    ap.add_argument("--lr-finetune", default="3e-5,1e-4,3e-4", help="fine-tuning's grid (empty: no baseline)")
    ap.add_argument("--work", default="/tmp/er_ray_grid")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()

    from er_ray.pretrained import fingerprint
    from er_ray.sweep import sweep
    from er_ray.train import run_all

    names = a.task or list(BUILTIN_TASKS)
    seeds = [int(s) for s in a.seeds.split(",")]
    half = fingerprint(a.model, a.max_length)["num_layers"] // 2
    wu = "" if a.warmup is None else f"-wu{a.warmup:g}"
    work = Path(a.work) / f"{a.model}-{a.max_train_examples}x{a.epochs}"
    floors = {t: majority(t) for t in names}
    base = dict(task=names, model=a.model, epochs=a.epochs, patience=None, max_length=a.max_length,
                max_train_examples=a.max_train_examples, **({} if a.warmup is None else {"warmup": a.warmup}))
    rows, t0 = [], time.perf_counter()
    ft_lrs = _floats(a.lr_finetune)
    for seed in seeds:
        for adapter in filter(None, a.adapters.split(",")):  # --adapters "": fine-tuning only
            lrs = _floats(getattr(a, f"lr_{adapter}"))
            out = str(work / f"{adapter}{wu}-s{seed}")  # another warm-up: other runs, in their own folder
            res = sweep(SweepOptions(train=TrainOptions(**base, seed=seed, output=out),
                                     cut_layer=[half], adapter=[adapter], adapter_size=[16], learning_rate=lrs,
                                     scheduler="fifo", caches=str(work / "caches")))
            rows += [{"arm": adapter + wu, "learning_rate": r["learning_rate"], "task": r["task"], "seed": seed,
                      "dev": r["dev"], "test": r["test"], "status": r["status"]} for r in res["trials"]]
        if ft_lrs:
            runs = [(TrainOptions(**dict(base, task=[t]), seed=seed, full_finetune=True, learning_rate=lr,
                                  output=str(work / f"finetune-s{seed}")), t) for t in names for lr in ft_lrs]
            for (opts, t), m in zip(runs, run_all(runs, work / f"finetune-s{seed}", max_concurrent=2,
                                                           skip_done=True)):
                rows.append({"arm": "finetune", "learning_rate": opts.learning_rate, "task": t, "seed": seed,
                             "dev": m["dev"], "test": m["test"], "status": "done"})
    report = summarise(rows, floors)
    report.update(model=a.model, cut_layer=half, epochs=a.epochs, max_train_examples=a.max_train_examples,
                  seeds=seeds, seconds=time.perf_counter() - t0, rows=rows, majority=floors)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    arms = "+".join(filter(None, [*a.adapters.split(","), "finetune" if ft_lrs else ""]))
    seeds_ = a.seeds.replace(",", "")
    path = Path(a.out) / f"recipe_grid_{a.model}_{a.max_train_examples}x{a.epochs}{wu}_{arms}_s{seeds_}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(report["table"])
    print(f"-> {path}")


def summarise(rows: list[dict], floors: dict[str, float | None]) -> dict:
    """Per (arm, learning rate): mean test over seeds per task, its gap to fine-tuning (fine-tuning's learning
    rate picked per task and seed on dev), and how many (task, seed) runs collapsed."""
    ft: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["task"], r["seed"])
        if r["arm"] == "finetune" and (key not in ft or r["dev"] > ft[key]["dev"]):
            ft[key] = r
    arms = sorted({(r["arm"], r["learning_rate"]) for r in rows})
    tasks_ = sorted({r["task"] for r in rows})
    lines = ["| arm | lr | " + " | ".join(tasks_) + " | mean gap to finetune (points) | worst gap | collapsed |",
             "|---|---|" + "---|" * (len(tasks_) + 3)]
    summary = []
    for arm, lr in arms:
        mine = [r for r in rows if r["arm"] == arm and r["learning_rate"] == lr]
        per_task, gaps = {}, []
        for t in tasks_:
            got = [r for r in mine if r["task"] == t and r["test"] is not None]
            if not got:
                continue
            per_task[t] = statistics.fmean(r["test"] for r in got)
            gaps += [100 * (r["test"] - ft[(t, r["seed"])]["test"]) for r in got if (t, r["seed"]) in ft]
        n_collapsed = sum(collapsed(r["test"], floors.get(r["task"])) for r in mine)
        entry = {"arm": arm, "learning_rate": lr, "test": per_task,
                 "mean_gap": statistics.fmean(gaps) if gaps else None,
                 "worst_gap": min(gaps) if gaps else None, "collapsed": n_collapsed, "runs": len(mine)}
        summary.append(entry)
        fmt = (lambda x: "" if x is None else f"{x:+.1f}")
        lines.append(f"| {arm} | {lr:g} | " + " | ".join(f"{per_task[t]:.4f}" if t in per_task else "" for t in tasks_)
                     + f" | {fmt(entry['mean_gap'])} | {fmt(entry['worst_gap'])} | {n_collapsed}/{len(mine)} |")
    won = {f"{t} s{s}": r["learning_rate"] for (t, s), r in sorted(ft.items())}
    return {"summary": summary, "finetune_lr_chosen_on_dev": won, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()
