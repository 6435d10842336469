"""The paper's study as one command: full fine-tuning against recycled models, accuracy and time side by side.

Per model: a sweep over cut layers and adapters picks, per task, the best configuration on dev (and the best at
k = L/2, the paper's 50% cut); then full fine-tuning, recycled at L/2 and the sweep's best are trained once per
seed, and REPORT.md sets mean and spread of their test scores, their time per epoch and the cache's cost
(amortised over the tasks sharing it) side by side. Every number in the report is read from a run's
metrics.json; study.parquet holds them all. Re-running resumes: finished runs are read, not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from . import storage
from .console import say
from .options import StudyOptions
from .sweep import default_cut_layers, sweep
from .train import run_all

PAPER = ("Saad-Falcon et al. (arXiv 2207.04993), DeBERTa-v2 XL on a GPU, 50% cut: training >= 1.9x faster, "
         "inference 1.87-1.91x faster, accuracy within about a point of full fine-tuning on classification tasks.")
VARIANTS = ("finetune", "recycled k=L/2", "recycled best")


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)  # one seed: no spread


def study(opts: StudyOptions) -> dict[str, Any]:
    from . import tasks
    from .cluster import cluster_gpus, connect
    from .encoders import default_cut_layer
    from .pretrained import fingerprint

    train, grid = opts.train, opts.sweep
    train.require_task()
    storage.writable_folder(train.output)
    loaded = {t: tasks.load_task(t) for t in train.task}  # read once: names and corpora of built-ins or spec files
    fps = {model: fingerprint(model, train.max_length) for model in opts.model}  # bad names fail before Ray starts
    connect(dashboard=True)  # the sweeps need it (Tune over Ray Train)
    out = storage.absolute(train.output)
    runs: list[dict[str, Any]] = []
    caches: dict[str, dict[str, Any]] = {}
    for model, fp in fps.items():
        half = default_cut_layer(fp["num_layers"])
        layers = sorted(set(grid.cut_layer or default_cut_layers(fp["num_layers"])) | {half})
        say("study", f"{model}: sweep over k in {layers}, adapters {grid.adapter} x {grid.adapter_size}")
        # The sweep of this model: the study's options, with this model, the first seed and its own folder.
        model_train = dataclasses.replace(train, model=model, seed=opts.seed[0], output=storage.join(out, model))
        sw = sweep(dataclasses.replace(grid, cut_layer=layers, caches=grid.caches or out,
                                       train=dataclasses.replace(model_train,
                                                                 output=storage.join(out, model, "sweep"))))
        caches[model] = _cache_cost(storage.join(out, model, "cache.json"), sw)
        chosen = {task: choose(sw["trials"], loaded[task].name, half, model) for task in train.task}
        pairs, labels = [], []
        for seed in opts.seed:
            base = dataclasses.replace(model_train, seed=seed, patience=None)
            for task in train.task:
                pairs.append((dataclasses.replace(base, task=[task], full_finetune=True), task))
                labels.append(["finetune"])
                configs: dict[tuple, list[str]] = {}
                for variant, r in chosen[task].items():  # the L/2 best may be the best: train it once
                    key = (r["cut_layer"], r["adapter"], r["adapter_size"], r["learning_rate"])
                    configs.setdefault(key, []).append(variant)
                for (k, adapter, size, lr), variants in configs.items():
                    pairs.append((dataclasses.replace(base, task=[task], cut_layer=k, adapter=adapter,
                                                      adapter_size=size or 16, learning_rate=lr,
                                                      cache=sw["caches"][loaded[task].spec.corpus]), task))
                    labels.append(variants)
        width = opts.max_concurrent_runs or max(1, cluster_gpus())
        say("study", f"{model}: {len(pairs)} runs ({len(opts.seed)} seed(s)), {width} at a time")
        metrics = run_all(pairs, storage.join(out, model), max_concurrent=width, skip_done=True)
        corpus = {t.name: t.spec.corpus for t in loaded.values()}
        for m, variants in zip(metrics, labels):
            for v in variants:
                runs.append({**{c: m.get(c) for c in RUN_COLUMNS}, "model": model, "variant": v,
                             "corpus": corpus[m["task"]]})
    return write_report(runs, caches, opts, out)


def choose(trials: list[dict[str, Any]], task: str, half: int, model: str) -> dict[str, dict[str, Any]]:
    """The sweep's configurations a study trains per seed: the best on dev, and the best on dev at k = L/2.

    Trap: ASHA may stop every trial at k = L/2 after an epoch (seen: sms_spam, where the shallower cut won),
    and the paper's 50% cut must still be reported. A finished trial beats a stopped one (its dev score saw
    every epoch); a stopped trial's best dev score still ranks the L/2 configurations, and the seed runs
    train the chosen one to the end either way."""
    mine = [r for r in trials if r["task"] == task and r["status"] in ("done", "stopped") and r["dev"] is not None]
    done = [r for r in mine if r["status"] == "done"]
    at_half = [r for r in mine if r["cut_layer"] == half]
    if not done or not at_half:
        raise RuntimeError(f"{model} {task}: the sweep " + ("finished no trial" if not done else
                           f"has no trial at k = L/2 = {half} with a dev score (all failed?)"))
    return {"recycled k=L/2": max(at_half, key=lambda r: (r["status"] == "done", r["dev"])),
            "recycled best": max(done, key=lambda r: r["dev"])}


RUN_COLUMNS = ["model", "task", "variant", "seed", "metric", "dev", "test", "cut_layer", "adapter", "adapter_size",
               "learning_rate", "seconds_per_epoch", "epochs_run", "trainable_parameters", "run"]


def _cache_cost(path: str, sw: dict[str, Any]) -> dict[str, Any]:
    """The cache's build time, kept from the run that built it (a resumed study finds its caches built)."""
    if storage.exists(path):
        return storage.read_json(path)
    cost = {"seconds": sw["cache_seconds"], "corpora": sorted(sw["caches"]),
            "seconds_per_corpus": sw["cache_seconds_per_corpus"]}
    storage.write_bytes(path, json.dumps(cost).encode())
    return cost


def summarise(runs: list[dict[str, Any]], caches: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task): each variant's mean and spread over seeds, its speed-up over fine-tuning, and
    the cache's cost per task in epochs of fine-tuning."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        tasks = list(dict.fromkeys(r["task"] for r in mine))
        corpora = {r["task"]: r["corpus"] for r in mine}
        sharing = {c: sum(1 for t in tasks if corpora[t] == c) for c in corpora.values()}
        # Each corpus's own build time (a cache.json from before it was recorded: an equal share of the total)
        per_corpus = caches[model].get("seconds_per_corpus") or \
            {c: caches[model]["seconds"] / max(len(caches[model]["corpora"]), 1) for c in caches[model]["corpora"]}
        for task in tasks:
            row: dict[str, Any] = {"model": model, "task": task}
            ft_epoch = None
            for v in VARIANTS:
                rs = [r for r in mine if r["task"] == task and r["variant"] == v]
                mean, sd = _mean_sd([r["test"] for r in rs])
                epoch_s, _ = _mean_sd([r["seconds_per_epoch"] for r in rs])
                row.update({f"{v} test": mean, f"{v} sd": sd, f"{v} s/epoch": epoch_s, "seeds": len(rs),
                            "metric": rs[0]["metric"] if rs else None})
                if v == "finetune":
                    ft_epoch = epoch_s
                else:
                    row[f"{v} speedup"] = ft_epoch / epoch_s if ft_epoch and epoch_s else None
                    if rs:
                        r = rs[0]
                        row[f"{v} config"] = f"k={r['cut_layer']} {r['adapter']}" + \
                            ("" if r["adapter"] == "full" else f" {r['adapter_size']}") + f" lr {r['learning_rate']:g}"
            cache_s = per_corpus[corpora[task]] / sharing[corpora[task]]
            row["cache s per task"] = cache_s
            row["cache cost (finetune epochs)"] = cache_s / ft_epoch if ft_epoch else None
            rows.append(row)
    return rows


def _fmt(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")  # seeds that agree show ± 0.0000


def write_report(runs: list[dict[str, Any]], caches: dict[str, dict[str, Any]], opts: StudyOptions,
                 out: str) -> dict[str, Any]:
    import pyarrow as pa

    from .report import format_table

    storage.write_parquet(storage.join(out, "study.parquet"), pa.Table.from_pylist(runs))
    summary = summarise(runs, caches)
    table = []
    for s in summary:
        row = {"model": s["model"], "task": s["task"], "metric": s["metric"], "seeds": s["seeds"],
               "finetune": _fmt(s["finetune test"], s["finetune sd"])}
        for v in VARIANTS[1:]:
            row[v] = _fmt(s[f"{v} test"], s[f"{v} sd"])
            row[f"{v}: config"] = s.get(f"{v} config", "")
            row[f"{v}: speedup"] = f"{s[f'{v} speedup']:.2f}x" if s.get(f"{v} speedup") else ""
        row["cache cost (finetune epochs)"] = s["cache cost (finetune epochs)"]
        table.append(row)
    with tempfile.TemporaryDirectory() as tmp:  # drawn here, then copied to OUTPUT/plots (local or remote)
        plots = plot_study(summary, Path(tmp))
        storage.upload(tmp, storage.join(out, "plots"))
    md = ["# er_ray study: full fine-tuning against embedding recycling", "",
          f"Models {', '.join(opts.model)}; tasks {', '.join(opts.train.task)}; seeds {opts.seed}; "
          f"{opts.train.epochs} epoch(s), batch {opts.train.batch_size}, max length {opts.train.max_length}"
          + (f", at most {opts.train.max_train_examples} training examples" if opts.train.max_train_examples else "")
          + ".",
          "", "Test scores are the mean (± standard deviation) over seeds of the epoch chosen on dev. Speed-up is "
          "fine-tuning's seconds per epoch over the recycled model's. The cache is built once per corpus and model; "
          "its cost is shared by the tasks over that corpus, in epochs of fine-tuning."
          # Trap: the study times only what its sweep encoded; a cache built elsewhere would look free.
          + (f" The caches came from {opts.sweep.caches} (--caches): a corpus already cached there is charged only "
             "the time this study took to check or extend its cache, not what building it cost."
             if opts.sweep.caches else ""),
          "",
          f"**The paper's headline**: {PAPER}", "", format_table(table, list(table[0]) if table else [], markdown=True),
          "", "Per-task sweeps (every trial, plots of the metric against k and against cost): "
          + ", ".join(f"[{m}]({m}/sweep/sweep.md)" for m in opts.model) + ".", ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    md += ["", "Raw results, one row per run and variant: `study.parquet`."]
    storage.write_bytes(storage.join(out, "REPORT.md"), ("\n".join(md) + "\n").encode())
    print(format_table(table))
    say("study", f"report -> {storage.join(out, 'REPORT.md')}")
    return {"runs": runs, "summary": summary}


def plot_study(summary: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Per model, accuracy and time side by side: each variant's test score per task (seed spread as error bars)
    above its seconds per training epoch (the speed-up over fine-tuning written on the recycled bars)."""
    from .report import figure, save_figure

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model in dict.fromkeys(s["model"] for s in summary):
        mine = [s for s in summary if s["model"] == model]
        fig, (score, cost) = figure(2, 1, size=(max(5, 1.6 * len(mine)), 7))
        width = 0.8 / len(VARIANTS)
        for j, v in enumerate(VARIANTS):
            xs = [i + (j - 1) * width for i in range(len(mine))]
            score.bar(xs, [s[f"{v} test"] or 0 for s in mine], width, yerr=[s[f"{v} sd"] or 0 for s in mine],
                      label=v, capsize=3)
            bars = cost.bar(xs, [s[f"{v} s/epoch"] or 0 for s in mine], width, label=v)
            if v != "finetune":
                cost.bar_label(bars, [f"{s[f'{v} speedup']:.1f}x" if s.get(f"{v} speedup") else "" for s in mine],
                               fontsize=7)
        for ax in (score, cost):
            ax.set_xticks(range(len(mine)), [s["task"] for s in mine], rotation=20)
        score.set(ylabel="test score", title=f"{model}: fine-tuning against recycled", ylim=(0, 1))
        cost.set(ylabel="seconds per training epoch")
        score.legend(fontsize=8)
        written.append(save_figure(fig, folder / f"{model}-study.png"))
    return written
