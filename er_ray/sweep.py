"""Ray Tune chooses the cut layer and the adapter per task.

A sweep is a grid of trials over tasks x cut layer k x adapter kind and size x learning rate. Each trial is one
Ray Train + DeepSpeed run (`train.fit_run`) launched from a Tune function trainable, the Train V2 + Tune pattern:
Train's `TuneReportCallback` forwards every epoch's report to Tune, and ASHA stops weak trials on the dev metric.
All the cut layers a corpus needs are encoded up front in one multi-layer pass; every trial reads them.

Trials are named by their configuration (no timestamps): re-running a sweep restores the Tuner, and a trial whose
run already finished is reported from its metrics.json instead of being trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import storage
from .console import fmt_score, fmt_seconds, say, verbose
from .defaults import sweep_learning_rates
from .options import SweepOptions, TrainOptions

SWEEP_COLUMNS = ["trial", "task", "model", "metric", "cut_layer", "adapter", "adapter_size", "learning_rate",
                 "status", "dev", "test", "epochs_run", "train_seconds", "trainable_parameters", "seed"]


def default_cut_layers(num_layers: int, task_types=()) -> list[int]:
    """About L/3, L/2 and 2L/3; with question answering also L/4 (rounded down), the paper's cut for QA, where
    er_ray's SQuAD runs pick it too (BENCHMARKS.md)."""
    from .encoders import default_cut_layer

    quarter = {default_cut_layer(num_layers, "question_answering")} if "question_answering" in task_types else set()
    return sorted({max(1, round(num_layers * f)) for f in (1 / 3, 1 / 2, 2 / 3)} | quarter)


def grid(opts: SweepOptions, num_layers: int, task_type: str) -> list[dict[str, Any]]:
    """Every trial's point on a task of this type: (cut layer, adapter, size, learning rate), without duplicates
    (full has no size). Without --learning-rate, each adapter kind's rates for the task type (defaults.py)."""
    from .encoders import check_cut_layer

    layers = opts.cut_layer or ([opts.train.cut_layer] if opts.train.cut_layer is not None else
                                default_cut_layers(num_layers, [task_type]))
    for k in layers:
        check_cut_layer(k, num_layers, opts.train.model)
    points = []
    for k in sorted(set(layers)):
        for adapter in dict.fromkeys(opts.adapter):
            for size in ([None] if adapter == "full" else sorted(set(opts.adapter_size))):
                for lr in (opts.learning_rate or sweep_learning_rates(adapter, task_type)):
                    points.append({"cut_layer": k, "adapter": adapter, "adapter_size": size, "learning_rate": lr})
    return points


def trial_name(task: str, p: dict[str, Any], seed: int) -> str:
    size = "" if p["adapter"] == "full" else str(p["adapter_size"])
    return f"{task}-k{p['cut_layer']}-{p['adapter']}{size}-lr{p['learning_rate']:g}-s{seed}"


# ---------------------------------------------------------------------------------------------------------------
# The trial: a Tune function trainable that runs one TorchTrainer


def _trial_options(config: dict[str, Any]) -> TrainOptions:
    """The sweep's train options with the trial's grid point put in."""
    p = config["point"]
    return TrainOptions(**dict(config["train"], task=[config["task"]], cut_layer=p["cut_layer"],
                               adapter=p["adapter"], adapter_size=p["adapter_size"] or 16,
                               learning_rate=p["learning_rate"], cache=config["cache"], full_finetune=False))


def _data_key(config: dict[str, Any]) -> str:
    return f"{config['task']}|k={config['point']['cut_layer']}"


def _trial(config: dict[str, Any], data: dict[str, Any] | None = None) -> None:
    import ray.data
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import fit_run, plan_run

    config = _flatten(config)
    name = config["name"]
    # Many trials at once: Ray Data's per-dataset progress bars would bury Tune's status table in the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run = storage.join(config["train"]["output"], "runs", name)
    if _finished(run, config):  # in an earlier, interrupted sweep: report it, do not train again
        m = storage.read_json(storage.join(run, "metrics.json"))
        tune.report({"dev_score": m["dev"], "final": True, "dev": m["dev"], "test": m["test"], "reused": True})
        return
    opts = _trial_options(config)
    plan = plan_run(opts, config["task"], name=name, data=(data or {}).get(_data_key(config)))
    fit_run(plan, opts, concurrent_workers=config["concurrent_workers"], callbacks=[TuneReportCallback()])
    _mark_finished(run, config)


def _trial_key(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("task", "point", "train", "cache")}


def _finished(run: str, config: dict[str, Any]) -> bool:
    """A run counts as this trial's only if it finished with the very same settings (epochs, examples, ...)."""
    marker = storage.join(run, "trial.json")
    if not (storage.exists(storage.join(run, "metrics.json")) and storage.exists(marker)):
        return False
    had = storage.read_json(marker)
    had.get("train", {}).setdefault("warmup", None)  # trials from before --warmup had the default
    if had != json.loads(json.dumps(_trial_key(config))):
        return False
    from .train import settings_changed

    # (a sweep saved by an older er_ray and restored by Tune has trial configs without the task's type)
    if (task_type := config.get("task_type")) is None:
        from . import tasks

        task_type = tasks.load_task(config["task"]).type
    # the trial key holds the options as given; "the default" warm-up or head rate can change: the run's record
    # of what it resolved them to decides (train.finished_run's rule)
    return settings_changed(storage.read_json(storage.join(run, "metrics.json")), _trial_options(config),
                            task_type) == []


def _mark_finished(run: str, config: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(run, "trial.json"), json.dumps(_trial_key(config), indent=1).encode())


def per_task_asha(**kwargs):
    """ASHA with one set of rungs per task: dev scores of different tasks are not comparable (a good model of a
    hard task would lose to a weak model of an easy one), so each task's trials compete only with each other.
    (Built here, not at import: importing Tune costs `er-ray --help` two seconds.)"""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    class _PerTask(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self._by_task: dict[str, ASHAScheduler] = {}
            self._search: dict[str, str] = {}

        def set_search_properties(self, metric, mode, **spec) -> bool:
            self._search = {"metric": metric, "mode": mode}  # TuneConfig's, handed to each task's ASHA
            return True

        def _for(self, trial) -> ASHAScheduler:
            task = _flatten(trial.config)["task"]
            if task not in self._by_task:
                self._by_task[task] = ASHAScheduler(**kwargs, **self._search)
            return self._by_task[task]

        def on_trial_add(self, tc, trial):
            self._for(trial).on_trial_add(tc, trial)

        def on_trial_result(self, tc, trial, result):
            return self._for(trial).on_trial_result(tc, trial, result)

        def on_trial_complete(self, tc, trial, result):
            self._for(trial).on_trial_complete(tc, trial, result)

        def on_trial_remove(self, tc, trial):
            self._for(trial).on_trial_remove(tc, trial)

        def debug_string(self) -> str:
            return "; ".join(f"{t}: {s.debug_string()}" for t, s in self._by_task.items())

    return _PerTask()


def trial_lines():
    """A Tune callback (on this driver) that tells each trial's epochs, stops and ends in er_ray's lines, in place
    of Tune's status tables (those come back with --verbose)."""
    from ray.tune import Callback

    from .metrics import learned_nothing

    class TrialLines(Callback):
        last, ended = 0.0, 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("reused"):
                say("sweep", f"{_flatten(trial.config)['name']}: finished in an earlier run, dev "
                             f"{fmt_score(result.get('dev'))}")
            elif "epoch" in result:
                say("sweep", f"{_flatten(trial.config)['name']}: epoch {result['epoch']}/{result['epochs']}, "
                             f"dev {result['metric']} {fmt_score(result['dev_score'])}, "
                             f"{fmt_seconds(result['train_seconds'])}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended += 1
            config = _flatten(trial.config)
            say("sweep", f"{config['name']}: ended ({self.ended}/{len(trials)} trials)")
            # the trial's own warning went to its worker's log: tell it here (a trial ASHA stopped has no metrics)
            metrics = storage.join(config["train"]["output"], "runs", config["name"], "metrics.json")
            if storage.exists(metrics) and (warning := learned_nothing(storage.read_json(metrics))):
                say("sweep", f"{config['name']}: {warning}")
            self._release()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended += 1
            say("sweep", f"{_flatten(trial.config)['name']}: failed ({self.ended}/{len(trials)} trials): "
                         f"{_trial_error(trial)}")
            self._release()

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last > 10:  # a stopped trial's controller may die after its trial ends
                self._release()

        def _release(self):
            from .cluster import release_orphaned_placement_groups

            self.last = time.monotonic()
            if n := release_orphaned_placement_groups():
                say("sweep", f"released the CPUs of {n} ended trial(s)' worker group(s) that Ray Train had not")

    return TrialLines()


def _trial_error(trial) -> str:
    """An er_ray error of a failed trial in its own words (one waiting for CPUs names what holds them); anything
    else is pointed at."""
    from .errors import ErRayError

    try:
        err = trial.get_pickled_error()
        cause = getattr(err, "cause", err)  # a RayTaskError wraps the trial's own exception
        if isinstance(cause, ErRayError):
            return str(cause)
    except Exception:
        pass
    return "its error is in " + (trial.error_file or "Tune's logs")


# ---------------------------------------------------------------------------------------------------------------
# The driver


def _concurrency(opts: SweepOptions, trials: int) -> int:
    from .cluster import cluster_cpus, cluster_gpus

    if opts.max_concurrent_trials:
        return opts.max_concurrent_trials
    gpus, workers = cluster_gpus(), opts.train.workers
    # A trial's workers take a GPU each where there are GPUs; on CPUs, one core per worker keeps each trial's
    # matrix multiplies fed (more trials than cores only adds switching).
    slots = gpus // workers if gpus else int(cluster_cpus()) // workers
    return max(1, min(trials, slots))


def sweep(opts: SweepOptions) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {"trials": rows, "best": best row per task}."""
    from ray import tune

    from . import tasks
    from .cache_build import cache_root, ensure_cache
    from .cluster import connect
    from .pretrained import fingerprint
    from .train import run_data

    train = opts.train
    train.require_task()
    storage.writable_folder(train.output)
    loaded = {t: tasks.load_task(t) for t in train.task}  # a task given as a spec file is named by its spec
    train = train.for_task_types(t.type for t in loaded.values())
    fp = fingerprint(train.model, train.max_length)
    # A bad option fails here, before Ray starts. The points differ by task only in default learning rates.
    points = {t: grid(opts, fp["num_layers"], task.type) for t, task in loaded.items()}
    # Tune over Ray Train needs the dashboard (State API): without it a trial stopped by ASHA keeps its workers'
    # placement group and the next trial waits for resources forever.
    connect(dashboard=True)
    out = storage.absolute(train.output)  # a location every trial's process can use
    train_base = dataclasses.asdict(dataclasses.replace(train, output=str(out)))

    # Caches first: one multi-layer pass per corpus covers every k of the grid; trials only read.
    layers = sorted({p["cut_layer"] for ps in points.values() for p in ps})
    caches, corpus_seconds = {}, {}  # the seconds per corpus: a study charges each corpus's tasks its own cost
    # Every task, not only a corpus's first: tasks over one corpus need not hold the same documents (built-in
    # clothing_department lacks 13 of clothing_rating's reviews; subsets as spec files differ more); each call
    # encodes only what the cache still lacks.
    for task in loaded.values():
        root = cache_root(storage.absolute(opts.caches or out), task.spec.corpus, fp["model"], train.max_length)
        t0 = time.perf_counter()
        caches[task.spec.corpus] = ensure_cache(task, root, train.model, train.max_length, train.dtype, layers)
        corpus_seconds[task.spec.corpus] = corpus_seconds.get(task.spec.corpus, 0.0) + time.perf_counter() - t0
    cache_seconds = sum(corpus_seconds.values())
    trials = [{"task": t, "task_name": loaded[t].name, "task_type": loaded[t].type, "point": p,
               "name": trial_name(loaded[t].name, p, train.seed), "cache": caches[loaded[t].spec.corpus]}
              for t in train.task for p in points[t]]
    concurrent = _concurrency(opts, len(trials))
    for t in trials:
        t.update(train=train_base, concurrent_workers=concurrent * train.workers)
    per_task = len(points[train.task[0]])
    say("sweep", f"{len(trials)} trials ({len(train.task)} task(s) x {per_task} points), {concurrent} at a time; "
                 f"caches at layers {layers} ready in {fmt_seconds(cache_seconds)}")

    scheduler = (per_task_asha(time_attr="training_iteration", max_t=train.epochs, grace_period=opts.grace_period,
                             reduction_factor=opts.reduction_factor, stop_last_trials=False)
                 if opts.scheduler == "asha" else None)
    t0 = time.perf_counter()
    # A trial's labelled rows depend only on its task and cut layer: cut them from the cache once, here, and share
    # them (materialized, in the object store) with every trial that trains on them; each trial would otherwise
    # read the whole corpus's cache for its few thousand rows. Finished trials need none.
    data: dict[str, Any] = {}
    for t in trials:
        if _data_key(t) not in data and not _finished(storage.join(out, "runs", t["name"]), t):
            data[_data_key(t)] = run_data(_trial_options(t), t["task"])
    say("sweep", f"labelled rows of {len(data)} (task, cut layer) pair(s) ready in "
                 f"{fmt_seconds(time.perf_counter() - t0)}")
    # A trial's own process only waits on its TorchTrainer: it needs a sliver of CPU, not a core
    # (0 is refused by Tune's resource request).
    trainable = tune.with_resources(tune.with_parameters(_trial, data=data), {"cpu": 0.05})
    # The Tune experiment is named by its grid: the same command restores it; changed options start a new one
    # (whose trials still reuse every run that finished with identical settings).
    tune_path, tune_fs = storage.ray_storage(storage.join(out, "tune"))
    tune_name = "trials-" + hashlib.sha256(json.dumps([_trial_key(t) for t in trials], sort_keys=True)
                                           .encode()).hexdigest()[:10]
    param_space = {"trial": tune.grid_search(trials)}
    experiment = f"{tune_path}/{tune_name}"
    resumed = tune.Tuner.can_restore(experiment, storage_filesystem=tune_fs)
    if resumed:
        say("sweep", "resuming the sweep found in " + storage.join(out, "tune", tune_name))
        tuner = tune.Tuner.restore(experiment, trainable, param_space=param_space, resume_errored=True,
                                   storage_filesystem=tune_fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="dev_score", mode="max", scheduler=scheduler,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=tune_name, storage_path=tune_path, storage_filesystem=tune_fs,
                                      verbose=1 if verbose() else 0, callbacks=[trial_lines()],
                                      failure_config=tune.FailureConfig(max_failures=1)))
    # Ctrl-C: Tune would catch it, stop, and return as if done (a study then went on and failed on a sweep that
    # "finished no trial"); let it reach the caller instead, as in every verb. Tune's state is saved as it goes.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    grid_result = tuner.fit()
    from .cluster import release_ended_groups

    if n := release_ended_groups():  # the last trials' controllers die after Tune has ended
        say("sweep", f"released the CPUs of {n} ended trial(s)' worker group(s) that Ray Train had not")
    sweep_seconds = time.perf_counter() - t0
    rows = collect(grid_result, out, fp["model"])
    best = write_sweep(rows, out, cache_seconds=cache_seconds, sweep_seconds=sweep_seconds, resumed=resumed)
    return {"trials": rows, "best": best, "caches": caches, "cache_seconds": cache_seconds,
            "cache_seconds_per_corpus": corpus_seconds, "sweep_seconds": sweep_seconds}


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    # Tune hands the trainable {"trial": {...}}: unwrap it so the trainable sees one trial's fields
    return config["trial"] if "trial" in config else config


def collect(grid_result, out: str, model: str) -> list[dict[str, Any]]:
    """One row per trial. A finished trial's metrics.json is the truth (dev and test of its best epoch); a trial
    ASHA stopped has only its reported epochs: its best dev, no test. A finished trial whose process was stopped
    before it copied its outputs gets them from its last checkpoint."""
    import ray.train

    from .train import publish_run

    rows = []
    for r in grid_result:
        cfg = _flatten(r.config)
        name, p = cfg["name"], cfg["point"]
        run = storage.join(out, "runs", name)
        metrics = storage.join(run, "metrics.json")
        last = r.metrics or {}
        ckpt = last.get("checkpoint_path")  # a path on the filesystem of the trial's runs, as Ray Train has it
        if not storage.exists(metrics) and last.get("final") and ckpt and \
                publish_run(ray.train.Checkpoint(ckpt, filesystem=storage.resolve(out)[0]), run) is not None:
            _mark_finished(run, cfg)
        row = {"trial": name, "task": cfg["task_name"], "model": model, "seed": cfg["train"]["seed"], **p}
        if storage.exists(metrics):
            m = storage.read_json(metrics)
            row.update(status="done", metric=m["metric"], dev=m["dev"], test=m["test"], epochs_run=m["epochs_run"],
                       train_seconds=m["train_seconds"], trainable_parameters=m["trainable_parameters"])
        else:
            hist = r.metrics_dataframe
            devs = hist["dev_score"].dropna().tolist() if hist is not None and "dev_score" in hist else []
            row.update(status="error" if r.error else "stopped", metric=None, dev=max(devs) if devs else None,
                       test=None, epochs_run=len(devs),
                       train_seconds=float(hist["train_seconds"].sum()) if devs else None,
                       trainable_parameters=last.get("trainable_parameters"))
        rows.append(row)
    metric_of = {r["task"]: r["metric"] for r in rows if r["metric"]}
    for r in rows:
        r["metric"] = r["metric"] or metric_of.get(r["task"])
    return sorted(rows, key=lambda r: (r["task"], r["cut_layer"], r["adapter"], r["adapter_size"] or 0,
                                       r["learning_rate"]))


def best_per_task(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chosen on dev among trials that finished (so they have a test score), reported on test."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] == "done" and r["dev"] is not None:
            if r["task"] not in best or r["dev"] > best[r["task"]]["dev"]:
                best[r["task"]] = r
    return [best[t] for t in sorted(best)]


def write_sweep(rows: list[dict[str, Any]], out: str, cache_seconds: float, sweep_seconds: float,
                resumed: bool = False) -> list[dict]:
    import pyarrow as pa

    from .report import format_table

    best = best_per_task(rows)
    table = [{c: r.get(c) for c in SWEEP_COLUMNS} for r in rows]
    storage.write_parquet(storage.join(out, "sweep.parquet"), pa.Table.from_pylist(table))
    with tempfile.TemporaryDirectory() as tmp:  # drawn here, then copied to OUTPUT/plots (local or remote)
        plots = plot_sweep(rows, Path(tmp))
        storage.upload(tmp, storage.join(out, "plots"))
    cols = ["task", "metric", "cut_layer", "adapter", "adapter_size", "learning_rate", "dev", "test",
            "train_seconds", "trainable_parameters"]
    md = [f"# Sweep: {len(rows)} trials", "",
          # Trap: a resumed sweep rewrites this file; its times are the resume's, not the sweep's (seen: "trials
          # ran in 35 s" over a sweep that took 895 s). Say so rather than pass them off as the whole.
          ("Resumed: trials finished before were read, not run; this run's times only. " if resumed else "")
          + f"Caches ready in {cache_seconds:.0f} s (built, extended or found built); "
          f"trials ran in {sweep_seconds:.0f} s.", "",
          "## Best per task (chosen on dev, reported on test)", "", format_table(best, cols, markdown=True), "",
          "## Every trial", "", format_table(table, SWEEP_COLUMNS, markdown=True), "", "## Plots", ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    storage.write_bytes(storage.join(out, "sweep.md"), ("\n".join(md) + "\n").encode())
    print(format_table(best, cols))
    say("sweep", f"{len(rows)} trials: {sum(r['status'] == 'done' for r in rows)} finished, "
         f"{sum(r['status'] == 'stopped' for r in rows)} stopped early -> {storage.join(out, 'sweep.md')}")
    return best


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score (higher), by rising cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_sweep(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Per task: dev metric against k, one line per adapter and size (the best over learning rates); dev metric
    against training cost with the Pareto front."""
    from .report import figure, save_figure

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["dev"] is not None]
        if not mine:
            continue
        metric = mine[0]["metric"] or "dev"
        fig, ax = figure()
        for key in sorted({(r["adapter"], r["adapter_size"] or 0) for r in mine}):
            best_at: dict[int, float] = {}  # cut layer -> best dev over learning rates
            for r in mine:
                if (r["adapter"], r["adapter_size"] or 0) == key:
                    best_at[r["cut_layer"]] = max(r["dev"], best_at.get(r["cut_layer"], r["dev"]))
            ks = sorted(best_at)
            label = key[0] if key[0] == "full" else f"{key[0]} {key[1]}"
            ax.plot(ks, [best_at[k] for k in ks], marker="o", label=label)
        ax.set(xlabel="cut layer k", ylabel=f"dev {metric}", title=f"{task}: dev {metric} against the cut layer")
        ax.legend()
        written.append(save_figure(fig, folder / f"{task}-dev-vs-k.png"))

        costed = [r for r in mine if r["train_seconds"]]
        if costed:
            fig, ax = figure()
            xy = [(r["train_seconds"], r["dev"]) for r in costed]
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=["C0" if r["status"] == "done" else "C7"
                                                                  for r in costed])
            for r, (x, y) in zip(costed, xy):
                ax.annotate(f"k{r['cut_layer']} {r['adapter']}{r['adapter_size'] or ''} lr{r['learning_rate']:g}",
                            (x, y), fontsize=7)
            front = [xy[i] for i in pareto_front(xy)]
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", label="Pareto front")
            ax.set(xlabel="training seconds", ylabel=f"dev {metric}", title=f"{task}: dev {metric} against cost")
            ax.legend()
            written.append(save_figure(fig, folder / f"{task}-pareto.png"))
    return written

