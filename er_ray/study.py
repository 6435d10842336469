"""The paper's study as one command: full fine-tuning against recycled models, accuracy and time side by side.

Per model: a sweep over cut layers and adapters picks, per task, the best configuration on dev, and at k = L/2
(the paper's 50% cut) the best of each adapter kind: LoRA, the bottleneck adapter (the paper's v3 headline) and
the whole upper layers (`full`: v1's "freeze the lower half, fine-tune the rest"). Then full fine-tuning and each
chosen configuration are trained once per seed, and REPORT.md gives a row per configuration: mean and spread of
its test score, its distance to fine-tuning, its time per epoch and the cache's cost (amortised over the tasks
sharing it). Every number in the report is read from a run's
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
from .console import fmt_score, say
from .defaults import finetune_lr_grid
from .options import StudyOptions
from .sweep import default_cut_layers, sweep
from .train import run_all

PAPER = ("Saad-Falcon et al. (arXiv 2207.04993), DeBERTa-v2 XL on a GPU, 50% cut: training >= 1.9x faster, "
         "inference 1.87-1.91x faster, accuracy within about a point of full fine-tuning on classification tasks.")
FINETUNE, BEST, EQUAL_TIME = "finetune", "recycled best", "recycled best, finetune's time"
# An equal-time run may train up to this many times the study's epochs: recycled epochs cost 2-3.7x less here.
EQUAL_TIME_EPOCHS = 4


def at_half(adapter: str) -> str:
    """The variant name of an adapter kind's best configuration at k = L/2."""
    return f"recycled k=L/2 {adapter}"


def _lrs(lrs: list[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)


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
    train = train.for_task_types(t.type for t in loaded.values())
    opts = dataclasses.replace(opts, sweep=dataclasses.replace(grid, train=train))  # what the report states
    fps = {model: fingerprint(model, train.max_length) for model in opts.model}  # bad names fail before Ray starts
    connect(dashboard=True)  # the sweeps need it (Tune over Ray Train)
    out = storage.absolute(train.output)
    runs: list[dict[str, Any]] = []
    caches: dict[str, dict[str, Any]] = {}
    for model, fp in fps.items():
        half = default_cut_layer(fp["num_layers"])
        types = {t.type for t in loaded.values()}
        layers = sorted(set(grid.cut_layer or default_cut_layers(fp["num_layers"], types)) | {half})
        say("study", f"{model}: sweep over k in {layers}, adapters {grid.adapter} x {grid.adapter_size}")
        # The sweep of this model: the study's options, with this model, the first seed and its own folder.
        model_train = dataclasses.replace(train, model=model, seed=opts.seed[0], output=storage.join(out, model))
        sw = sweep(dataclasses.replace(grid, cut_layer=layers, caches=grid.caches or out,
                                       train=dataclasses.replace(model_train,
                                                                 output=storage.join(out, model, "sweep"))))
        caches[model] = _cache_cost(storage.join(out, model, "cache.json"), sw)
        chosen = {task: choose(sw["trials"], loaded[task].name, half, model) for task in train.task}
        width = opts.max_concurrent_runs or max(1, cluster_gpus())
        finetune_lr = pick_finetune_lr(dataclasses.replace(model_train, patience=None),
                                       {t: opts.finetune_learning_rate or finetune_lr_grid(loaded[t].type)
                                        for t in train.task}, storage.join(out, model), width)
        pairs, labels = [], []
        for seed in opts.seed:
            base = dataclasses.replace(model_train, seed=seed, patience=None)
            for task in train.task:
                pairs.append((dataclasses.replace(base, task=[task], full_finetune=True,
                                                  learning_rate=finetune_lr[task]), task))
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
        say("study", f"{model}: {len(pairs)} runs ({len(opts.seed)} seed(s)), {width} at a time")
        metrics = run_all(pairs, storage.join(out, model), max_concurrent=width, skip_done=True)
        if opts.match_finetune_time:
            more, more_labels = equal_time_runs(pairs, labels, metrics)
            say("study", f"{model}: {len(more)} runs of the sweep's pick for fine-tuning's training time")
            metrics += run_all(more, storage.join(out, model), max_concurrent=width, skip_done=True)
            labels += more_labels
        corpus = {t.name: t.spec.corpus for t in loaded.values()}
        for m, variants in zip(metrics, labels):
            for v in variants:
                runs.append({**{c: m.get(c) for c in RUN_COLUMNS}, "model": model, "variant": v,
                             "corpus": corpus[m["task"]]})
    return write_report(runs, caches, opts, out)


def pick_finetune_lr(base, grids: dict[str, list[float]], out: str, width: int) -> dict[str, float]:
    """Fine-tuning done well: per task, its learning rate picked on dev from its grid with the first seed, as the
    sweep picks the recycled configurations (the winner's run is that seed's fine-tuning run: not trained twice)."""
    if all(len(lrs) == 1 for lrs in grids.values()):
        return {t: lrs[0] for t, lrs in grids.items()}
    pairs = [(dataclasses.replace(base, task=[t], full_finetune=True, learning_rate=lr), t)
             for t, lrs in grids.items() for lr in lrs]
    shown = sorted({_lrs(lrs) for lrs in grids.values()})
    say("study", f"fine-tuning's learning rate, picked on dev from {' or '.join(shown)}: "
                 f"{len(pairs)} runs (seed {base.seed})")
    metrics = run_all(pairs, out, max_concurrent=width, skip_done=True)
    best: dict[str, tuple[float, float]] = {}
    for (opts, t), m in zip(pairs, metrics):
        if t not in best or m["dev"] > best[t][1]:
            best[t] = (opts.learning_rate, m["dev"])
    say("study", "fine-tuning's learning rates: " + ", ".join(f"{m_task} {lr:g} (dev {fmt_score(dev)})"
                                                               for m_task, (lr, dev) in best.items()))
    return {t: lr for t, (lr, _) in best.items()}


def equal_time_runs(pairs: list, labels: list[list[str]], metrics: list[dict[str, Any]]) -> tuple[list, list]:
    """For each (seed, task): the sweep's pick again, budgeted to that seed's fine-tuning's training seconds (the
    second phase: the budget is known only once fine-tuning ran). Whole seconds, so a resumed study finds the
    run by its name."""
    finetune = {(m["task"], m["seed"]): m["train_seconds"] for m, v in zip(metrics, labels) if FINETUNE in v}
    more = []
    for (opts, task), m, v in zip(pairs, metrics, labels):
        if BEST in v:
            budget = float(max(1, round(finetune[m["task"], m["seed"]])))
            more.append((dataclasses.replace(opts, budget_seconds=budget, epochs=EQUAL_TIME_EPOCHS * opts.epochs),
                         task))
    return more, [[EQUAL_TIME]] * len(more)


def choose(trials: list[dict[str, Any]], task: str, half: int, model: str) -> dict[str, dict[str, Any]]:
    """The sweep's configurations a study trains per seed: the best on dev at k = L/2 of each adapter kind the
    sweep tried (in the sweep's order), and the best on dev of all.

    Trap: ASHA may stop every trial at k = L/2 after an epoch (seen: sms_spam, where the shallower cut won),
    and the paper's 50% cut must still be reported. A finished trial beats a stopped one (its dev score saw
    every epoch); a stopped trial's best dev score still ranks the L/2 configurations, and the seed runs
    train the chosen one to the end either way."""
    mine = [r for r in trials if r["task"] == task and r["status"] in ("done", "stopped") and r["dev"] is not None]
    done = [r for r in mine if r["status"] == "done"]
    half_trials = [r for r in mine if r["cut_layer"] == half]
    if not done or not half_trials:
        raise RuntimeError(f"{model} {task}: the sweep " + ("finished no trial" if not done else
                           f"has no trial at k = L/2 = {half} with a dev score (all failed?)"))
    chosen = {}
    for adapter in dict.fromkeys(r["adapter"] for r in half_trials):
        kind = [r for r in half_trials if r["adapter"] == adapter]
        chosen[at_half(adapter)] = max(kind, key=lambda r: (r["status"] == "done", r["dev"]))
    return {**chosen, BEST: max(done, key=lambda r: r["dev"])}


RUN_COLUMNS = ["model", "task", "variant", "seed", "metric", "dev", "test", "cut_layer", "adapter", "adapter_size",
               "learning_rate", "seconds_per_epoch", "epochs_run", "train_seconds", "trainable_parameters", "run"]


def _cache_cost(path: str, sw: dict[str, Any]) -> dict[str, Any]:
    """The cache's build time, kept from the run that built it (a resumed study finds its caches built)."""
    if storage.exists(path):
        return storage.read_json(path)
    cost = {"seconds": sw["cache_seconds"], "corpora": sorted(sw["caches"]),
            "seconds_per_corpus": sw["cache_seconds_per_corpus"]}
    storage.write_bytes(path, json.dumps(cost).encode())
    return cost


def variants(runs: list[dict[str, Any]]) -> list[str]:
    """The variants in report order: fine-tuning, each adapter kind at L/2 (in the sweep's order), the best."""
    seen = list(dict.fromkeys(r["variant"] for r in runs))
    last = [BEST] + ([EQUAL_TIME] if EQUAL_TIME in seen else [])
    return [FINETUNE] + [v for v in seen if v not in (FINETUNE, *last)] + last


def summarise(runs: list[dict[str, Any]], caches: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, variant): its test score's mean and spread over seeds, its distance to
    fine-tuning in points, its speed-up over fine-tuning per epoch, and the cache's cost per task in epochs of
    fine-tuning."""
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
            ft_test = ft_epoch = None
            cache_s = per_corpus[corpora[task]] / sharing[corpora[task]]
            for v in variants(mine):
                rs = [r for r in mine if r["task"] == task and r["variant"] == v]
                if not rs:
                    continue
                mean, sd = _mean_sd([r["test"] for r in rs])
                epoch_s, _ = _mean_sd([r["seconds_per_epoch"] for r in rs])
                epochs, _ = _mean_sd([r.get("epochs_run") for r in rs])
                train_s, _ = _mean_sd([r.get("train_seconds") for r in rs])
                r = rs[0]
                row = {"model": model, "task": task, "variant": v, "metric": r["metric"], "seeds": len(rs),
                       "test": mean, "sd": sd, "epochs": epochs, "train s": train_s, "s/epoch": epoch_s,
                       "config": None, "vs finetune": None, "speedup": None, "cache s per task": cache_s,
                       "cache cost (finetune epochs)": None}
                if v == FINETUNE:
                    ft_test, ft_epoch = mean, epoch_s
                    row["config"] = f"lr {r['learning_rate']:g}"
                else:
                    row["config"] = f"k={r['cut_layer']} {r['adapter']}" + \
                        ("" if r["adapter"] == "full" else f" {r['adapter_size']}") + f" lr {r['learning_rate']:g}"
                    if ft_test is not None and mean is not None:
                        row["vs finetune"] = 100 * (mean - ft_test)  # points
                    row["speedup"] = ft_epoch / epoch_s if ft_epoch and epoch_s else None
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
    table = [{"model": r["model"], "task": r["task"], "metric": r["metric"], "variant": r["variant"],
              "config": r["config"] or "", "seeds": r["seeds"], "test": _fmt(r["test"], r["sd"]),
              "vs finetune": "" if r["vs finetune"] is None else f"{r['vs finetune']:+.2f}",
              "epochs": r["epochs"], "train s": r["train s"], "s/epoch": r["s/epoch"],
              "speedup": f"{r['speedup']:.2f}x" if r["speedup"] else "",
              "cache cost (finetune epochs)": r["cache cost (finetune epochs)"]} for r in summary]
    with tempfile.TemporaryDirectory() as tmp:  # drawn here, then copied to OUTPUT/plots (local or remote)
        plots = plot_study(summary, Path(tmp))
        storage.upload(tmp, storage.join(out, "plots"))
    md = ["# er_ray study: full fine-tuning against embedding recycling", "",
          f"Models {', '.join(opts.model)}; tasks {', '.join(opts.train.task)}; seeds {opts.seed}; "
          f"{opts.train.epochs} epoch(s), batch {opts.train.batch_size}, max length {opts.train.max_length}"
          + (f", at most {opts.train.max_train_examples} training examples" if opts.train.max_train_examples else "")
          + ".",
          "", "A row per configuration: fine-tuning (its learning rate picked on dev from "
          + (_lrs(opts.finetune_learning_rate) or f"{_lrs(finetune_lr_grid(None))} (question answering: "
                                                   f"{_lrs(finetune_lr_grid('question_answering'))})")
          + " with the first seed); at k = L/2, the "
          "best on dev of each adapter kind the sweep tried (lora, bottleneck, full: the whole upper layers); the "
          "sweep's best of all. Test scores are the mean "
          "(± standard deviation) over seeds of the epoch chosen on dev; `vs finetune` is the difference of means in "
          "points. Speed-up is fine-tuning's seconds per epoch over the recycled model's."
          + (f" `{EQUAL_TIME}`: the sweep's pick trained for as many epochs as fit fine-tuning's training seconds "
             f"(up to {EQUAL_TIME_EPOCHS}x the epochs), its epochs column says how many."
             if opts.match_finetune_time else "") + " The cache is built once "
          "per corpus and model; its cost is shared by the tasks over that corpus, in epochs of fine-tuning."
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
        tasks = list(dict.fromkeys(s["task"] for s in mine))
        names = variants(mine)
        at = {(s["task"], s["variant"]): s for s in mine}
        fig, (score, cost) = figure(2, 1, size=(max(5, 0.5 * len(names) * len(tasks)), 7))
        width = 0.8 / len(names)
        for j, v in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(tasks))]
            got = [at.get((t, v), {}) for t in tasks]
            score.bar(xs, [g.get("test") or 0 for g in got], width, yerr=[g.get("sd") or 0 for g in got],
                      label=v, capsize=3)
            bars = cost.bar(xs, [g.get("s/epoch") or 0 for g in got], width, label=v)
            if v != FINETUNE:
                cost.bar_label(bars, [f"{g['speedup']:.1f}x" if g.get("speedup") else "" for g in got], fontsize=7)
        for ax in (score, cost):
            ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        score.set(ylabel="test score", title=f"{model}: fine-tuning against recycled", ylim=(0, 1))
        cost.set(ylabel="seconds per training epoch")
        score.legend(fontsize=8)
        written.append(save_figure(fig, folder / f"{model}-study.png"))
    return written
