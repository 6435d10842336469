"""Training task models, the driver: recycled (from the layer-k cache) or full fine-tuning (from text).

Every run is a Ray Train `TorchTrainer` running `er_ray.train_loop` on its workers (DeepSpeed ZeRO 0/1/2; fp32 or
bf16 on CPU, fp16 or bf16 on GPU), fed with `er_ray.train_data`'s labelled rows. Several runs train at once, each
its own TorchTrainer, sharing the cluster; one failed run does not lose the others.

    plan_run(opts, task)   -> the run's name, datasets and worker config, resolved here (before any worker starts)
    fit_run(plan, opts)    -> trains it; OUTPUT/runs/<name>/{metrics.json, model/}
    run_all([...])         -> several at once, and OUTPUT/results.parquet + results.md
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import storage
from .console import LiveMetrics, epoch_relay, fmt_count, fmt_score, fmt_seconds, say
from .errors import ErRayError, OptionsError
from .defaults import WARMUP, default_adapter, default_head_learning_rate, default_learning_rate, default_warmup
from .metrics import learned_nothing
from .options import TrainOptions
from .train_loop import LoopConfig, train_loop


class TrainError(ErRayError):
    pass


def train(opts: TrainOptions) -> list[dict[str, Any]]:
    """Train one task model per task, all at once, each a Ray Train + DeepSpeed run; writes a results table and
    prints it (the demo and the study print their own tables over run_all's results)."""
    from .report import format_table

    opts.require_task()
    storage.writable_folder(opts.output)
    rows = run_all([(dataclasses.replace(opts, task=[t]), t) for t in opts.task], opts.output)
    print(format_table(rows, ["task", "metric", "dev", "test", "cut_layer", "adapter", "adapter_size",
                              "seconds_per_epoch", "trainable_parameters"]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Planning a run (driver side, before Ray Train starts)


def run_name(opts: TrainOptions, task: str, num_layers: int, task_type: str) -> str:
    """task-finetune-s0, task-k3-lora16-s0, task-k0-lora16-text-s0, task-k3-lora16-lr0.002-s0,
    task-k3-lora16-120s-s0, task-k3-full-head0.003-s0. A learning rate other than the adapter's default (the
    head's own, if given), and a time budget, are in the name:
    runs that differ only in them would otherwise share a folder, and the second would replace the first."""
    from .encoders import default_cut_layer

    k = default_cut_layer(num_layers, task_type) if opts.cut_layer is None else opts.cut_layer
    adapter = opts.adapter_for(task_type)
    kind = "finetune" if opts.full_finetune else f"k{k}-{adapter}" + \
        ("" if adapter == "full" else f"{opts.adapter_size}") + ("-text" if opts.from_text else "")
    lr = opts.lr(task_type)
    lr_part = "" if lr == default_learning_rate(opts.kind_for(task_type), task_type) else f"-lr{lr:g}"
    head = opts.head_lr(task_type)
    lr_part += "" if head == default_head_learning_rate(opts.kind_for(task_type), task_type) else f"-head{head:g}"
    budget = "" if opts.budget_seconds is None else f"-{opts.budget_seconds:g}s"
    wu = opts.warmup_share(task_type)
    warmup = "" if wu == default_warmup(opts.kind_for(task_type), task_type) else f"-wu{wu:g}"
    return f"{task}-{kind}{lr_part}{budget}{warmup}-s{opts.seed}"


def layout(opts: TrainOptions, task_name: str):
    """(options, task, model fingerprint, cut layer, source) of a run, checked. The options come back resolved
    for the task's type (its max length: 384 for question answering, else 128; its adapter kind: full for
    question answering, else lora; unless given): the one place a run's options are resolved, so every later step
    reads the same value."""
    from . import tasks
    from .encoders import check_cut_layer, default_cut_layer
    from .pretrained import fingerprint

    task = tasks.load_task(task_name)
    opts = opts.for_task_types([task.type])
    fp = fingerprint(opts.model, opts.max_length)
    k = 0 if opts.full_finetune else default_cut_layer(fp["num_layers"], task.type) if opts.cut_layer is None else \
        check_cut_layer(opts.cut_layer, fp["num_layers"], fp["model"], allow_last=opts.adapter == "full")
    return opts, task, fp, k, "text" if opts.full_finetune or opts.from_text else "cache"


def open_run_cache(opts: TrainOptions, task, fp: dict[str, Any], k: int):
    """The cache a recycled run reads: --cache as given (a task whose documents are missing from it is an
    error), else the default cache under OUTPUT, built or extended first."""
    from .cache import KEY_FIELDS, CacheMismatch, open_cache
    from .cache_build import cache_root, ensure_cache, shard_ids, stale_shards
    from .corpus import doc_hashes

    root = opts.cache or ensure_cache(task, cache_root(opts.output, task.spec.corpus, fp["model"], opts.max_length),
                                      opts.model, opts.max_length, opts.dtype, [k])
    cache = open_cache(root, k, expect={f: fp[f] for f in KEY_FIELDS if f in fp})
    if opts.cache:  # a cache given as is, not built here: its texts must be this task's (ensure_cache re-encodes)
        if stale := stale_shards(cache.manifest, shard_ids(cache.path, cache.manifest), doc_hashes(task.corpus())):
            raise CacheMismatch(f"--cache {opts.cache}: {len(stale)} of its shards were built from other texts of "
                                f"task {task.name}'s documents (e.g. {next(iter(stale))}, holding "
                                f"{next(iter(stale.values()))!r}); rebuild it over the task's corpus, or leave out "
                                f"--cache to let er_ray build and extend its own")
    return cache


def run_data(opts: TrainOptions, task_name: str) -> dict[str, Any]:
    """A run's labelled, materialized Ray Datasets per split (from its cache, or texts) and the cache's dtype.
    Runs that differ only in adapter or learning rate can share one (a sweep does: one cache read per task and k)."""
    return _run_data(*layout(opts, task_name))


def _run_data(opts: TrainOptions, task, fp: dict[str, Any], k: int, source: str) -> dict[str, Any]:
    from .train_data import split_datasets

    cache_obj = open_run_cache(opts, task, fp, k) if source == "cache" else None
    data = split_datasets(task, cache_obj, source, opts.max_train_examples, opts.seed,
                          tokenizer=(fp["folder"], opts.max_length))
    return dict(data, cache_dtype=cache_obj.manifest.dtype if cache_obj else None)


def plan_run(opts: TrainOptions, task_name: str, name: str | None = None, data: dict[str, Any] | None = None,
             checked: tuple | None = None) -> dict[str, Any]:
    """Everything a run needs, resolved on the driver: task, cache, datasets, the worker config. `name` (default:
    task, cut layer, adapter and seed) names the run's folder and its Ray Train run: deterministic, so a re-run
    resumes it. `data`: `run_data`'s result for these options, `checked`: `layout`'s, if the caller already has
    them."""
    from .pretrained import pooling_of

    opts, task, fp, k, source = checked or layout(opts, task_name)
    data = data or _run_data(opts, task, fp, k, source)
    splits = data["tables"] or data["datasets"]  # the rows of each split, one way or the other (train_data)
    if "dev" not in splits:
        raise TrainError(f"task {task.name} has no dev split: early stopping and model choice need one")
    spec = {"cut_layer": k, "adapter": opts.adapter, "adapter_size": opts.adapter_size, "task_type": task.type,
            "num_labels": len(task.labels), "pooling": pooling_of(Path(fp["folder"])), "source": source,
            "full_finetune": opts.full_finetune}
    name = name or run_name(opts, task.name, fp["num_layers"], task.type)
    config = LoopConfig(run=name, task=task.name, model=opts.model, spec=spec, labels=task.labels,
                        metric=METRICS[task.type], learning_rate=opts.lr(task.type), epochs=opts.epochs,
                        patience=opts.patience, batch_size=opts.batch_size, zero_stage=opts.zero_stage,
                        precision=opts.precision, seed=opts.seed, max_length=opts.max_length, workers=opts.workers,
                        train_rows=data["rows"]["train"], has_test="test" in splits, source=source,
                        hidden=fp["hidden_size"], cache_dtype=data["cache_dtype"], budget_seconds=opts.budget_seconds,
                        max_train_examples=opts.max_train_examples, warmup=opts.warmup_share(task.type),
                        head_learning_rate=opts.head_lr(task.type), tables=data["tables"] or None)
    return {"name": name, "task": task, "config": config, "datasets": data["datasets"], "rows": data["rows"],
            "num_layers": fp["num_layers"]}


ADAPTER_WORDS = {"lora": "LoRA of rank {size}", "bottleneck": "bottleneck adapters of width {size}",
                 "full": "the whole upper layers"}


def recipe_line(plan: dict[str, Any], opts: TrainOptions) -> str | None:
    """What a recycled run trains, when where it is cut or what of it trains is its task type's default (a QA run
    is `full` at L/4 where a classifier is LoRA at L/2): the console says what that is and which choices were the
    defaults, not only the run's name. None for fine-tuning, and when neither the cut nor the adapter is the
    default. (The options here are already resolved per task type: a default is recognised by its value.)"""
    from .encoders import default_cut_layer

    cfg, spec = plan["config"], plan["config"].spec
    ttype, adapter, k, n = spec["task_type"], spec["adapter"], spec["cut_layer"], plan["num_layers"]
    defaults = {"cut layer": k == default_cut_layer(n, ttype), "adapter": adapter == default_adapter(ttype),
                "learning rate": cfg.learning_rate == default_learning_rate(adapter, ttype)
                and cfg.head_learning_rate == default_head_learning_rate(adapter, ttype),
                "warm-up": cfg.warmup == default_warmup(adapter, ttype)}
    if opts.full_finetune or not (defaults["cut layer"] or defaults["adapter"]):
        return None
    what = ADAPTER_WORDS[adapter].format(size=spec["adapter_size"])
    chosen = ", ".join(d for d, is_default in defaults.items() if is_default)
    below = f"the layer-{k} cache" if spec.get("source", "cache") == "cache" else f"layers 1..{k} run from text"
    head = "" if cfg.head_learning_rate is None else f" (the head {cfg.head_learning_rate:g})"
    return (f"{plan['name']}: layers {k + 1}..{n} over {below}, {what}, peak learning rate "
            f"{cfg.learning_rate:g}{head} after {cfg.warmup:.0%} of the steps: {chosen} at "
            f"{spec['task_type'].replace('_', ' ')}'s default (er-ray train --help; BENCHMARKS.md)")


# The dev metric each task type is judged and early-stopped by (question answering: SQuAD's F1, as a fraction)
METRICS = {"classification": "accuracy", "token_classification": "span_f1", "question_answering": "f1"}


# ---------------------------------------------------------------------------------------------------------------
# Fitting runs


def _resources(opts: TrainOptions, concurrent_workers: int) -> tuple[float, int | None, bool]:
    from .cluster import cluster_cpus, cluster_gpus

    gpus = cluster_gpus()
    cpus = cluster_cpus()
    # Ray Train reserves a CPU per worker by default; on a small machine that starves Ray Data's read tasks and
    # the run hangs silently. Reserve a share that leaves a quarter of the CPUs free.
    per = opts.cpus_per_worker or max(0.1, min(1.0, 0.75 * cpus / max(concurrent_workers, 1)))
    threads = None if gpus else max(1, int(cpus // max(concurrent_workers, 1)))
    return per, threads, gpus > 0


@functools.cache
def _bf16_peaks() -> tuple[float, float]:
    from .flops import cpu_bf16_peaks

    return cpu_bf16_peaks()


def _warn_if_bf16_is_slow(name: str) -> None:
    """bf16 on a CPU is fast only where the CPU has it natively (AMX, AVX512-BF16); elsewhere PyTorch emulates it
    at a hundredth of fp32's speed. Measured here, on the driver's CPU (a local Ray's workers share it; a CPU
    cluster's nodes are usually of the driver's kind)."""
    bf16, fp32 = _bf16_peaks()
    if bf16 < fp32:
        say("train", f"{name}: warning: --precision bf16 on a CPU without native bf16: matmuls run at "
                     f"{bf16 / 1e9:,.1f} GFLOP/s against {fp32 / 1e9:,.1f} in fp32, so this run will be much slower "
                     "than with --precision fp32 (the default on CPUs)")


def fit_run(plan: dict[str, Any], opts: TrainOptions, concurrent_workers: int, callbacks=None,
            before: dict[str, float] | None = None) -> dict[str, Any]:
    """One TorchTrainer run; returns metrics.json's content and writes the run's outputs under OUTPUT/runs/.
    `callbacks`: Ray Train callbacks (default: each epoch told on this process's console). `before`: the seconds
    the run's command spent before it (starting Ray, reading its data): the first entries of its timeline."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    per, threads, use_gpu = _resources(opts, concurrent_workers)
    precision = opts.precision
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    if precision == "fp16" and not use_gpu:
        raise OptionsError("--precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    if precision == "bf16" and not use_gpu:
        _warn_if_bf16_is_slow(plan["name"])
    config = dataclasses.replace(plan["config"], threads=threads, precision=precision)
    _start_afresh_if_changed(storage.join(opts.output, "ray", plan["name"]), config)
    storage_path, storage_fs = storage.ray_storage(storage.join(opts.output, "ray"))
    retries = _bounded_resource_wait(opts.resource_wait)
    # Ray Train's controller looks at its workers every 2 s by default, and each report, checkpoint and the end
    # of the run waits for that look: on a small run, seconds of nothing. Polling one worker group every 0.5 s
    # costs nothing measurable. (Set in this process's environment: Ray Train hands it to its controller.)
    os.environ.setdefault(HEALTH_CHECK_INTERVAL, "0.5")
    trainer = TorchTrainer(
        train_loop, train_loop_config=dataclasses.asdict(config),
        scaling_config=ray.train.ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": per, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=plan["name"], storage_path=storage_path, storage_filesystem=storage_fs,
                                       failure_config=ray.train.FailureConfig(max_failures=opts.max_failures,
                                                                                      controller_failure_limit=retries),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       callbacks=list(callbacks if callbacks is not None else [epoch_relay()])),
        datasets=plan["datasets"])
    rows = ", ".join(f"{s} {fmt_count(n)}" for s, n in plan["rows"].items())
    say("train", f"{plan['name']}: {rows} examples; {opts.workers} worker(s) x {per:.2f} CPU, {precision}")
    if line := recipe_line(plan, opts):
        say("train", line)
    fit_started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        if _waited_for_workers(e):
            from .cluster import who_holds

            raise TrainError(
                f"{plan['name']}: its {opts.workers} worker(s) ({per:.2f} CPU{' + 1 GPU' if use_gpu else ''} each) "
                f"found no room in {opts.resource_wait:g} s. {who_holds('GPU' if use_gpu else 'CPU')}. Free them, "
                f"add nodes, or wait longer (--resource-wait SECONDS, 0 for ever)") from None
        raise
    if result.error:
        raise TrainError(f"{plan['name']} failed: {result.error}")
    out = storage.join(opts.output, "runs", plan["name"])
    metrics = publish_run(result.checkpoint, out, amend=lambda m: complete_timeline(m, before or {}, fit_started))
    if metrics is None:
        raise TrainError(f"{plan['name']}: the last checkpoint has no metrics.json")
    LiveMetrics(config).final(metrics)
    say("train", f"{plan['name']}: dev {metrics['metric']} {fmt_score(metrics['dev'])}, test "
                 f"{fmt_score(metrics['test'])}, {fmt_seconds(metrics['seconds_per_epoch'])} per epoch -> {out}")
    say("train", f"{plan['name']}: {fmt_timeline(metrics['timeline'])}")
    if warning := learned_nothing(metrics):
        say("train", f"{plan['name']}: {warning}")
    return metrics


# The phases of a run, in order: what the driver spent before Ray Train (Ray, the data), Ray Train starting the
# worker group, the worker's setup, its epochs (training, dev evaluation, checkpoints), its finish (test, export)
# and the driver's publishing (the last report, Ray Train's shutdown, copying the model out).
PHASES = {"ray_start": "Ray", "data": "data", "workers_start": "workers", "model_setup": "model setup",
          "train": "training", "evaluate": "dev", "checkpoint": "checkpoints", "finish": "test+export",
          "publish": "publish", "restored": "read back (an earlier command trained it)"}


def complete_timeline(metrics: dict[str, Any], before: dict[str, float], fit_started: float) -> None:
    """Add the driver's phases to the worker's timeline in metrics.json, and its total. (Wall clocks of two
    processes, maybe two nodes: a phase across them is as good as the nodes' clocks agree, well under a second.)"""
    worker = metrics.get("timeline", {})
    now = time.time()
    if metrics["finished_at"] < fit_started:
        # Ray Train found the run finished in its storage (an output folder whose runs/ was deleted, ray/ kept) and
        # trained nothing: the worker's phases are an earlier command's. Seen: "workers 0.0 s, ..., publish 52.7 s"
        # under "23.7 s in all". This command only read the checkpoint back; the earlier phases are kept apart
        # (every entry of a timeline is seconds of this command).
        metrics["timeline"] = {**{k: before.get(k, 0.0) for k in ("ray_start", "data")},
                               "restored": now - fit_started}
        metrics["earlier_timeline"] = worker
    else:
        metrics["timeline"] = {**{k: before.get(k, 0.0) for k in ("ray_start", "data")},
                               "workers_start": max(0.0, metrics["started_at"] - fit_started), **worker,
                               "publish": max(0.0, now - metrics["finished_at"])}
    metrics["timeline"]["total"] = sum(before.values()) + now - fit_started


def fmt_timeline(timeline: dict[str, float]) -> str:
    parts = [f"{label} {fmt_seconds(timeline[k])}" for k, label in PHASES.items() if k in timeline]
    return f"{fmt_seconds(timeline['total'])} in all: " + ", ".join(parts)


# Ray Train waits for a worker group 60 s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S), then its controller retries,
# by default for ever: a sweep whose CPUs were held by a stopped trial's worker group waited 20 minutes, silently.
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_START_TIMEOUT = float(os.environ.get(WORKER_GROUP_START_TIMEOUT) or 60.0)  # the user's, or Ray's default


def _bounded_resource_wait(seconds: float) -> int:
    """Ray Train's start timeout and controller retries that wait `seconds` in all (0: for ever); returns the
    retries. The timeout is set in this process's environment, which Ray Train hands to its controller."""
    if not seconds:
        return -1
    attempt = min(seconds, _START_TIMEOUT)
    os.environ[WORKER_GROUP_START_TIMEOUT] = f"{attempt:g}"
    return max(0, math.ceil(seconds / attempt) - 1)


def _waited_for_workers(e: BaseException) -> bool:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(e, WorkerGroupStartupTimeoutError) or \
        isinstance(getattr(e, "controller_failure", None), WorkerGroupStartupTimeoutError)


def _start_afresh_if_changed(ray_dir: str, config: LoopConfig) -> None:
    """Ray Train resumes a run from the checkpoints in its folder (named by the run): right after a failure, wrong
    when the run's settings (learning rate, epochs, examples, ...) or er_ray itself changed since. Keep the
    settings beside the checkpoints and clear them when they differ."""
    from . import __version__

    settings = storage.join(ray_dir, "er_ray_settings.json")
    key = json.loads(json.dumps({"er_ray": __version__, **config.settings()}))
    if storage.exists(ray_dir) and (not storage.exists(settings) or storage.read_json(settings) != key):
        say("train", f"{config.run}: its settings changed since the checkpoints in {ray_dir} were made: "
                     f"starting afresh")
        storage.delete(ray_dir)
    storage.write_json(settings, key)


def publish_run(checkpoint, out: str, amend=None) -> dict[str, Any] | None:
    """A finished run's model/ and metrics.json, from its last checkpoint (a `ray.train.Checkpoint`), to the
    location `out` (local or remote), replacing what was there; returns the metrics, or None if the checkpoint
    is not a finished run's. metrics.json is the commit point readers check: it goes first and comes back last,
    so a reader never takes a half-written model/ for a run (no rename needed, as on object stores). `amend`
    changes the metrics in place before they are written."""
    with checkpoint.as_directory() as d:
        if not os.path.exists(os.path.join(d, "metrics.json")):
            return None
        storage.delete(storage.join(out, "metrics.json"))
        storage.delete(out)
        storage.upload(os.path.join(d, "model"), storage.join(out, "model"))
        metrics = json.loads(Path(d, "metrics.json").read_text())
    if amend is not None:
        amend(metrics)
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    return metrics


def finished_run(opts: TrainOptions, name: str, task_type: str) -> dict[str, Any] | None:
    """The metrics of run `name` if it finished with these options' settings, else None. The name does not say
    everything (a default learning rate, the epochs, the examples are not in it; the token-classification default
    changed once), so a resumed study compares the settings its metrics.json records before reusing a run."""
    done = storage.join(opts.output, "runs", name, "metrics.json")
    if not storage.exists(done):
        return None
    metrics = storage.read_json(done)
    changed = settings_changed(metrics, opts, task_type)
    if changed is None:
        say("train", f"{name}: its finished run records no settings (an older er_ray made it): training it again")
    elif changed:
        say("train", f"{name}: its finished run had other settings ({', '.join(changed)}): training it again")
    return None if changed or changed is None else metrics


def resolved_settings(opts: TrainOptions, task_type: str) -> dict[str, Any]:
    """What a run with `opts` on `task_type` records in its metrics.json's `settings` (defaults resolved), for the
    check that a finished run is this run. A precision of "auto" is left out: the cluster resolved it."""
    want = {"model": opts.model, "learning_rate": opts.lr(task_type), "epochs": opts.epochs,
            "patience": opts.patience, "batch_size": opts.batch_size, "zero_stage": opts.zero_stage,
            "precision": opts.precision, "seed": opts.seed, "max_length": opts.max_length, "workers": opts.workers,
            "budget_seconds": opts.budget_seconds, "max_train_examples": opts.max_train_examples,
            "warmup": opts.warmup_share(task_type), "head_learning_rate": opts.head_lr(task_type)}
    if opts.precision == "auto":  # (fp32 on CPUs): whatever it was is "auto"
        del want["precision"]
    return want


def settings_changed(metrics: dict[str, Any], opts: TrainOptions, task_type: str) -> list[str] | None:
    """How the settings a finished run's metrics.json records differ from what `opts` resolve to on `task_type`
    ("epochs 2 -> 3"; empty: the same run), or None if it records none. Resolved, not as given: a default rate or
    warm-up can change between er_ray versions, and a run trained under the old one is not this run."""
    have = metrics.get("settings")
    if have is None:
        return None
    # runs from before --warmup warmed up over 6% of their steps, and before --head-learning-rate had one rate
    have = {"warmup": WARMUP, "head_learning_rate": None, **have}
    return [f"{k} {have.get(k)} -> {v}" for k, v in resolved_settings(opts, task_type).items() if have.get(k) != v]


def run_all(runs: list[tuple[TrainOptions, str]], output: str | Path, max_concurrent: int | None = None,
            skip_done: bool = False) -> list[dict[str, Any]]:
    """Fit several (options, task) runs concurrently (at most `max_concurrent` at once; default all), sharing the
    cluster; one failed run does not lose the others. With `skip_done`, a run whose metrics.json exists is read,
    not trained again (how a study resumes). Returns metrics in the order given; writes the results table."""
    from .cluster import connect

    results: dict[int, Any] = {}
    todo, layouts, runs = [], {}, list(runs)
    for i, (opts, task) in enumerate(runs):  # tasks, models and cut layers checked before Ray starts
        layouts[i] = layout(opts, task)
        opts, t, fp = layouts[i][:3]
        runs[i] = (opts, task)  # resolved for its task type (its max length)
        name = run_name(opts, t.name, fp["num_layers"], t.type)
        finished = finished_run(opts, name, t.type) if skip_done else None
        if finished is not None:
            results[i] = finished
        else:
            todo.append(i)
    t = time.time()
    connect()
    ray_start = time.time() - t  # nothing when this process's Ray is already up (a study's second verb)
    plans, before = {}, {}
    for i in todo:
        t = time.time()
        plans[i] = plan_run(runs[i][0], runs[i][1], checked=layouts[i])
        before[i] = {"ray_start": ray_start, "data": time.time() - t}
    width = min(len(todo), max_concurrent or len(todo)) or 1
    gate = threading.Semaphore(width)
    errors: dict[str, BaseException] = {}

    def run(i):
        opts = runs[i][0]
        with gate:
            try:
                results[i] = fit_run(plans[i], opts, concurrent_workers=width * opts.workers, before=before[i])
            except BaseException as e:  # reported after the others finish: one failed task does not lose the rest
                errors[plans[i]["name"]] = e

    # daemon: on Ctrl-C the command ends (its runs' checkpoints are kept) instead of waiting for them
    threads = [threading.Thread(target=run, args=(i,), name=plans[i]["name"], daemon=True) for i in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [results[i] for i in range(len(runs)) if i in results]
    write_results(rows, output)
    if errors:
        name, e = next(iter(errors.items()))
        raise TrainError(f"{len(errors)} of {len(todo)} runs failed; {name}: {e}") from e
    return rows


RESULT_COLUMNS = ["run", "task", "model", "metric", "dev", "test", "cut_layer", "adapter", "adapter_size", "recycled",
                  "full_finetune", "train_seconds", "seconds_per_epoch", "examples_per_second", "epochs_run",
                  "trainable_parameters", "learning_rate", "seed", "data_stall"]


def write_results(rows: list[dict[str, Any]], output: str | Path) -> None:
    from .report import format_table

    if not rows:
        return
    table = [{c: r.get(c) for c in RESULT_COLUMNS} for r in rows]
    results = storage.join(output, "results.parquet")
    if storage.exists(results):  # earlier runs into the same OUTPUT stay in the table
        names = {r["run"] for r in table}
        old = [r for r in storage.read_parquet(results).to_pylist() if r.get("run") not in names]
        table = old + table
    storage.write_parquet(results, pa.Table.from_pylist(table))
    storage.write_bytes(storage.join(output, "results.md"),
                        (format_table(table, RESULT_COLUMNS, markdown=True) + "\n").encode())
