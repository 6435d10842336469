"""Training task models: recycled (from the layer-k cache) or full fine-tuning (from text), on Ray Train + DeepSpeed.

Every run is a `TorchTrainer` whose workers wrap the task model in a DeepSpeed engine (ZeRO stage 0/1/2; fp32 or
bf16 on CPU, fp16 or bf16 on GPU). Data comes through Ray Data (`get_dataset_shard`), ragged cache rows are
bucketed by length and padded per batch. Dev metric every epoch, early stopping, checkpoints of the trainable
weights and optimizer state (never the frozen model), resume after a worker dies. Several tasks train at once,
each its own TorchTrainer, sharing the cluster.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from . import storage
from .errors import ErRayError, OptionsError
from .model import ADAPTERS, Adapter

IGNORE = -100
# The bottleneck adapter at 2 epochs (BENCHMARKS.md): 3e-3 gets within a point of fine-tuning where 1e-3 trails by
# 1.6-3.2 points (MiniLM TREC and clothing, mpnet TREC), but collapsed to the majority class on one of three mpnet
# clothing seeds. A default must not do that: 1e-3 stays, and a sweep over --learning-rate finds the rest.
DEFAULT_LR = {"lora": 1e-3, "bottleneck": 1e-3, "full": 1e-4}


class TrainError(ErRayError):
    pass


@dataclass
class TrainOptions:
    task: list[str]
    """task(s): built-in names or spec files; several train concurrently over one cache"""
    model: str = "minilm"
    """packaged model name, local folder, or hub id"""
    cut_layer: int | None = None
    """cut layer k: the task model runs layers k+1..L (default: half the layers)"""
    adapter: Adapter = "lora"
    """lora (PEFT, size = rank), bottleneck (Houlsby, size = width) or full (upper layers fully trained)"""
    adapter_size: int = 16
    """LoRA rank or bottleneck width"""
    cache: str | None = None
    """cache directory (default: OUTPUT/caches/<corpus>, built if missing: tasks sharing a corpus share it)"""
    output: str = "runs"
    """where runs, caches and the results table go"""
    epochs: int = 3
    """passes over the training data at most (early stopping may end sooner)"""
    patience: int = 2
    """stop after this many epochs without a better dev metric"""
    batch_size: int = 32
    """examples per step per worker"""
    learning_rate: float | None = None
    """peak learning rate (default: 1e-3 for lora and bottleneck, 1e-4 for full)"""
    max_length: int = 128
    """tokens per document at most (must match the cache)"""
    workers: int = 1
    """Ray Train workers per task (data parallel)"""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves per worker (default: a share that leaves room for Ray Data and concurrent tasks)"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: fp32 on CPU, bf16 (or fp16 where bf16 is missing) on GPU; fp16 needs a GPU"""
    seed: int = 0
    """seed for the head, adapters and data order"""
    max_train_examples: int | None = None
    """train on at most this many examples (quick runs); dev and test stay whole"""
    max_failures: int = 2
    """times a run restarts from its last checkpoint after a worker dies"""
    dtype: Literal["fp32", "fp16", "bf16", "int8"] = "fp16"
    """cache dtype when er_ray builds the cache"""
    full_finetune: bool = False
    """train the whole model from text (the baseline), instead of a recycled model from the cache"""
    from_text: bool = False
    """run layers 1..k on raw text every step instead of reading the cache (with --cut-layer 0 and --adapter
    lora: PEFT LoRA on every layer, what a PEFT user does without er_ray)"""

    def __post_init__(self):
        if isinstance(self.task, str):
            self.task = [self.task]
        if not self.task:
            raise OptionsError("name at least one --task")
        if self.adapter not in ADAPTERS:
            raise OptionsError(f"--adapter must be one of {', '.join(ADAPTERS)}")
        if self.zero_stage not in (0, 1, 2):
            raise OptionsError("--zero-stage must be 0, 1 or 2 (ZeRO-3 is not supported: it partitions the frozen "
                               "weights too and makes adapter checkpoints costly)")
        for name in ("epochs", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.full_finetune:
            self.adapter = "full"

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LR[self.adapter]


def _log(msg: str) -> None:
    print(f"[er_ray train] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entity spans of a BIO sequence as seqeval (default mode) / conlleval read it: an I- without a matching
    open entity starts a new one."""
    spans, start, kind = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, typ = t.partition("-")
        if start is not None and (prefix in ("O", "B") or typ != kind):
            spans.add((kind, start, i))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return spans


def span_counts(gold: list[str], pred: list[str]) -> tuple[int, int, int]:
    g, p = bio_spans(gold), bio_spans(pred)
    return len(g & p), len(p - g), len(g - p)


def f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Batches: ragged rows -> bucketed, padded tensors


def batches(ds_iter, spec: dict, batch_size: int, shuffle_seed: int | None, tokenizer=None, max_length: int = 128):
    """Yield (inputs, mask, labels, word_ids | None) from a Ray Data shard iterator of Arrow batches.

    Rows are read in chunks of 8 batches, sorted by length within the chunk (little padding) and the batch order
    shuffled; the chunking also bounds memory."""
    import torch

    from .batching import length_batches, pad_rows
    from .cache import decode_rows

    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    for chunk in ds_iter.iter_batches(batch_size=batch_size * 8, batch_format="pyarrow",
                                      local_shuffle_buffer_size=batch_size * 32 if rng is not None else None,
                                      local_shuffle_seed=shuffle_seed):
        n = chunk.num_rows
        if spec["source"] == "cache":
            rows = decode_rows(chunk, spec["cache_dtype"], spec["hidden"])
        else:
            words = chunk.column("text").to_pylist()
            enc = tokenizer(words, truncation=True, max_length=max_length,
                            is_split_into_words=spec["task_type"] == "token_classification")
            rows = [np.asarray(x, np.int64) for x in enc["input_ids"]]
        if spec["task_type"] == "token_classification":
            wids = (chunk.column("word_ids").to_pylist() if spec["source"] == "cache"
                    else [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(n)])
            labels = chunk.column("label").to_pylist()
        else:
            wids, labels = None, chunk.column("label").to_pylist()
        groups = length_batches([len(r) for r in rows], batch_size)
        if rng is not None:
            rng.shuffle(groups)
        for g in groups:
            x, mask = pad_rows([rows[i] for i in g], spec["pad_id"] if spec["source"] == "text" else 0)
            T = mask.shape[1]
            if wids is None:
                y = torch.tensor([labels[i] for i in g])
                w = None
            else:
                from .model import token_labels

                y = torch.full((len(g), T), IGNORE, dtype=torch.long)
                for j, i in enumerate(g):
                    y[j, :len(rows[i])] = torch.tensor(token_labels(wids[i], labels[i]))
                w = [wids[i] for i in g]
            yield torch.from_numpy(x), torch.from_numpy(mask), y, w


# ---------------------------------------------------------------------------------------------------------------
# The loop every Ray Train worker runs


def _deepspeed_config(batch_size: int, world: int, zero: int, precision: str) -> dict:
    return {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": batch_size * world, "zero_optimization": {"stage": zero},
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
            "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _init_deepspeed(model, optimizer, scheduler, cfg: dict, cpu: bool):
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    # On CPU DeepSpeed JIT-compiles a shared-memory collective op (~50 s, at every start) unless told not to; we
    # use plain gloo. `import deepspeed.comm.torch as m` would bind the real torch module: patch via sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")  # wraps the group Ray Train made
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    return engine


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from . import encoders
    from .model import ModelSpec, TaskModel

    started_at = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    cpu = device.type == "cpu"
    enc = encoders.load_encoder(config["model"])
    spec = ModelSpec(**config["model_spec"])
    model = TaskModel(enc.model, spec).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.01)
    steps_per_epoch = max(1, -(-config["train_rows"] // (config["batch_size"] * world)))
    total = steps_per_epoch * config["epochs"]
    warmup = max(1, int(0.06 * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    engine = _init_deepspeed(model, optimizer, scheduler,
                             _deepspeed_config(config["batch_size"], world, config["zero_stage"],
                                               config["precision"]), cpu)
    data_spec = dict(config["data_spec"], pad_id=enc.tokenizer.pad_token_id or 0)
    tok = enc.tokenizer if spec.source == "text" else None

    start_epoch, best, best_state, stale, history, stopped = 0, -1.0, None, 0, [], False
    best_dev: dict = {}  # the best epoch's dev scores: the final report reuses them instead of evaluating again
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume after a failure: DeepSpeed state (trainable weights, optimizer, scheduler) + our bookkeeping
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="latest_ds", load_module_strict=False)
            state = json.loads((Path(d) / "loop.json").read_text())
            start_epoch, best, stale, history = state["epoch"] + 1, state["best"], state["stale"], state["history"]
            stopped = state.get("stopped", False)  # a finished run is not trained again
            best_dev = state.get("best_dev", {})
            if rank == 0:
                print(f"[er_ray train] {config['task']}: resuming after epoch {start_epoch}", flush=True)
            best_state = torch.load(Path(d) / "best.pt", weights_only=True) if (Path(d) / "best.pt").exists() \
                else None

    def evaluate(split: str) -> dict:
        engine.eval()
        correct = tp = fp = fn = tokens_ok = tokens_all = 0
        with torch.no_grad():
            for x, mask, y, wids in batches(ray.train.get_dataset_shard(split), data_spec, config["batch_size"],
                                            None, tok, config["max_length"]):
                logits = engine(x.to(device), mask.to(device)).float().cpu()
                pred = logits.argmax(-1)
                if wids is None:
                    correct += int((pred == y).sum())
                    tokens_all += len(y)
                else:
                    keep = y != IGNORE
                    tokens_ok += int((pred[keep] == y[keep]).sum())
                    tokens_all += int(keep.sum())
                    names = config["labels"]
                    for j in range(len(y)):
                        g = [names[t] for t in y[j][keep[j]].tolist()]
                        p = [names[t] for t in pred[j][keep[j]].tolist()]
                        a, b, c = span_counts(g, p)
                        tp, fp, fn = tp + a, fp + b, fn + c
        counts = torch.tensor([correct, tp, fp, fn, tokens_ok, tokens_all], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        correct, tp, fp, fn, tokens_ok, tokens_all = counts.tolist()
        engine.train()
        if spec.task_type == "classification":
            return {"accuracy": correct / max(tokens_all, 1), "examples": int(tokens_all)}
        return {"span_f1": f1(tp, fp, fn), "token_accuracy": tokens_ok / max(tokens_all, 1),
                "examples": int(tokens_all)}

    metric = config["metric"]
    live = _LiveMetrics(config) if rank == 0 else None
    engine.train()
    for epoch in range(start_epoch, config["epochs"] if not stopped else 0):
        t0 = time.perf_counter()
        data_s = step_s = 0.0
        loss_sum, n_steps, n_ex = 0.0, 0, 0
        it = batches(ray.train.get_dataset_shard("train"), data_spec, config["batch_size"],
                     config["seed"] * 1000 + epoch, tok, config["max_length"])
        while True:
            td = time.perf_counter()
            nxt = next(it, None)
            data_s += time.perf_counter() - td
            if nxt is None:
                break
            x, mask, y, _ = nxt
            ts = time.perf_counter()
            logits = engine(x.to(device), mask.to(device))
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     y.to(device).reshape(-1), ignore_index=IGNORE)
            engine.backward(loss)
            engine.step()
            step_s += time.perf_counter() - ts
            loss_sum += loss.detach().item()
            n_steps += 1
            n_ex += len(y)
            if live and n_steps % 10 == 0:
                live.step(loss_sum / n_steps, n_ex * world / max(time.perf_counter() - t0, 1e-9))
        train_s = time.perf_counter() - t0
        dev = evaluate("dev")
        improved = dev[metric] > best
        if improved:
            best, best_dev, stale = dev[metric], dev, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}
        else:
            stale += 1
        row = {"epoch": epoch + 1, "resumed": bool(ckpt) and epoch == start_epoch,
               "train_loss": loss_sum / max(n_steps, 1), f"dev_{metric}": dev[metric],
               "dev_score": dev[metric],  # one name for every task's metric: what a sweep's scheduler compares
               "trainable_parameters": model.num_trainable(),
               "train_seconds": train_s, "examples_per_second": n_ex * world / max(train_s, 1e-9),
               "data_seconds": data_s, "step_seconds": step_s, "data_stall": data_s / max(train_s, 1e-9)}
        history.append(row)
        if live:
            live.epoch(epoch + 1, row["train_loss"], dev[metric])
        stop = stale >= config["patience"] or epoch + 1 == config["epochs"]
        with tempfile.TemporaryDirectory() as d:
            # every rank saves (ZeRO partitions optimizer state); frozen weights are left out
            engine.save_checkpoint(d, tag="latest_ds", exclude_frozen_parameters=True)
            if rank == 0:
                (Path(d) / "loop.json").write_text(json.dumps({"epoch": epoch, "best": best, "best_dev": best_dev,
                                                               "stale": stale, "history": history,
                                                               "stopped": stop}))
                if best_state is not None:
                    torch.save(best_state, Path(d) / "best.pt")
            if stop:
                final = _finish(model, best_state, best_dev, evaluate, history, config, spec, enc, Path(d), rank,
                                {"world_size": world, "global_steps": engine.global_steps,
                                 "zero_stage": engine.zero_optimization_stage(),
                                 "optimizer": type(engine.optimizer).__name__,
                                 "started_at": started_at})
                row.update(final)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        if stop:
            break


class _LiveMetrics:
    """Loss, throughput, epoch and dev metric per run, through Ray's metrics API: the dashboard's Metrics view
    (and Prometheus/Grafana where the cluster has them) shows every concurrent task side by side."""

    def __init__(self, config: dict):
        from ray.util import metrics

        tags = ("run", "task", "metric")
        self.tags = {"run": config["run"], "task": config["task"], "metric": config["metric"]}
        self.loss = metrics.Gauge("er_ray_train_loss", "mean training loss of the epoch so far", tags)
        self.speed = metrics.Gauge("er_ray_train_examples_per_second", "training examples per second", tags)
        self.dev = metrics.Gauge("er_ray_train_dev_metric", "dev metric after the last epoch", tags)
        self.epochs = metrics.Gauge("er_ray_train_epoch", "epochs finished", tags)

    def step(self, loss: float, speed: float) -> None:
        self.loss.set(loss, tags=self.tags)
        self.speed.set(speed, tags=self.tags)

    def epoch(self, epoch: int, loss: float, dev: float) -> None:
        self.loss.set(loss, tags=self.tags)
        self.dev.set(dev, tags=self.tags)
        self.epochs.set(epoch, tags=self.tags)

    def final(self, metrics: dict) -> None:
        """The finished run's dev metric and epochs, set again by the process that publishes the run. Trap: Ray
        exports a process's metrics every few seconds, and a training worker exits soon after its last epoch, so
        its last values could leave with it (seen: a dev metric never reached the dashboard)."""
        if metrics.get("dev") is not None:
            self.dev.set(metrics["dev"], tags=self.tags)
        self.epochs.set(metrics["epochs_run"], tags=self.tags)


def _finish(model, best_state, best_dev, evaluate, history, config, spec, enc, d: Path, rank: int,
            ds: dict) -> dict:
    """Best weights back in, dev and test scores, and the exported model (rank 0) inside the last checkpoint."""
    import torch

    if best_state is not None:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in best_state.items():
                named[k].copy_(v)
    # dev: the best epoch's own scores (the same weights, evaluated then); test: once, now
    dev, test = best_dev or evaluate("dev"), evaluate("test") if config["has_test"] else {}
    metric = config["metric"]
    train_s = sum(h["train_seconds"] for h in history)
    metrics = {"run": config["run"], "task": config["task"], "model": config["model"], "metric": metric,
               "dev": dev.get(metric), "test": test.get(metric), "dev_all": dev, "test_all": test,
               "cut_layer": spec.cut_layer, "adapter": spec.adapter,
               "adapter_size": None if spec.adapter == "full" else spec.adapter_size,
               "recycled": spec.source == "cache", "full_finetune": spec.full_finetune,
               "train_seconds": train_s, "epochs_run": len(history),
               "seconds_per_epoch": train_s / max(len(history), 1),
               "examples_per_second": float(np.mean([h["examples_per_second"] for h in history])),
               "data_stall": float(np.mean([h["data_stall"] for h in history])),
               "trainable_parameters": model.num_trainable(), "learning_rate": config["lr"],
               "batch_size": config["batch_size"], "workers": config["workers"], "precision": config["precision"],
               "zero_stage": config["zero_stage"], "seed": config["seed"], "history": history,
               "started_at": ds.pop("started_at"), "finished_at": time.time(), "deepspeed": ds}
    if rank == 0:
        from safetensors.torch import save_file

        out = d / "model"
        out.mkdir()
        save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, out / "trainable.safetensors")
        (out / "task.json").write_text(json.dumps({"spec": spec.to_json(), "labels": config["labels"],
                                                   "model": config["model"], "weights_sha256": enc.weights_sha256,
                                                   "max_length": config["max_length"],
                                                   "cache_dtype": config["data_spec"].get("cache_dtype")},
                                                  indent=1))
        if model.peft is not None:  # loadable with plain transformers + peft
            model.peft.save_pretrained(str(out / "peft_adapter"))
        (d / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"final": True, "dev": dev.get(metric), "test": test.get(metric)}


# ---------------------------------------------------------------------------------------------------------------
# The driver


def _label_index(task) -> dict[str, Any]:
    """id -> label index (classification) or list of tag indices (token classification), per split."""
    index = {y: i for i, y in enumerate(task.labels)}
    out = {}
    for split, t in task.splits.items():
        if task.type == "classification":
            out[split] = dict(zip(t.column("id").to_pylist(), (index[y] for y in t.column("label").to_pylist())))
        else:
            out[split] = dict(zip(t.column("id").to_pylist(),
                                  ([index[y] for y in tags] for tags in t.column("tags").to_pylist())))
    return out


def _attach_labels(batch: pa.Table, labels: dict[str, dict[str, Any]], token: bool) -> pa.Table:
    """Keep the rows that a split labels, with `split` and `label` columns (a document in two splits is kept twice)."""
    ids = batch.column("id").to_pylist()
    keep, split, ys = [], [], []
    for name, lab in labels.items():
        for i, x in enumerate(ids):
            if x in lab:
                keep.append(i), split.append(name), ys.append(lab[x])
    batch = batch.take(pa.array(keep, pa.int64()))
    return (batch.append_column("split", pa.array(split, pa.string()))
            .append_column("label", pa.array(ys, pa.list_(pa.int32()) if token else pa.int32())))


def _select_split(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])


def split_datasets(task, cache_obj, source: str, max_train: int | None, seed: int) -> dict[str, Any]:
    """Ray Datasets per split: cache rows (or texts) of the split's documents with their labels, materialized.
    (Quietly: these few small reads would print Ray Data's progress lines every few seconds, per task.)"""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        return _split_datasets(task, cache_obj, source, max_train, seed)
    finally:
        ctx.enable_progress_bars = shown


def _split_datasets(task, cache_obj, source: str, max_train: int | None, seed: int) -> dict[str, Any]:
    import ray.data

    labels = _label_index(task)
    if max_train and len(labels["train"]) > max_train:
        rng = np.random.default_rng(seed)
        keep = sorted(str(i) for i in rng.choice(sorted(labels["train"]), size=max_train, replace=False))
        labels["train"] = {k: labels["train"][k] for k in keep}
    token = task.type == "token_classification"
    if source == "cache":
        # One read of the cache for all splits (decompressing every shard's states is the expensive part), then
        # each split is cut from the small materialized result.
        cols = ["id", "length", "hidden"] + (["scale"] if cache_obj.manifest.dtype == "int8" else []) + \
               (["word_ids"] if token else [])
        labelled = cache_obj.dataset(columns=cols).map_batches(
            _attach_labels, fn_kwargs={"labels": labels, "token": token}, batch_format="pyarrow",
            num_cpus=0.25).materialize()
    else:
        texts = pa.concat_tables(task.splits[s].select(["id", task.input_column]).rename_columns(["id", "text"])
                                 for s in labels)
        labelled = ray.data.from_arrow(_attach_labels(texts, labels, token)).materialize()
    out = {split: labelled.map_batches(_select_split, fn_kwargs={"split": split}, batch_format="pyarrow",
                                       num_cpus=0.25).materialize() for split in labels}
    if any(out[split].count() < len(lab) for split, lab in labels.items()):
        # only a cache can lack documents; name them (reading all its ids is fine on this error path)
        have = set(cache_obj.ids())
        missing = [i for split in labels.values() for i in split if i not in have]
        raise TrainError(f"task {task.name}: {len(missing):,} of its documents are missing from the cache "
                         f"{cache_obj.path} (e.g. {missing[0]!r}); build the cache over the task's corpus")
    return {"datasets": out, "rows": {s: len(v) for s, v in labels.items()}}


def cache_root(output: str | Path, corpus: str, model: str, max_length: int) -> str:
    """Where a corpus's cache lives by default (a location under OUTPUT): one per (corpus, model, max length),
    shared by every task and sweep trial over that corpus."""
    return storage.join(output, "caches", f"{corpus}-{model}-{max_length}")


def ensure_cache(opts: TrainOptions, task, fp: dict[str, Any], layers: list[int]) -> str:
    """Build the default cache of the task's corpus at these cut layers (one pass for all), or extend it with the
    documents or layers it lacks: nothing already encoded is encoded again."""
    from . import cache

    root = cache_root(opts.output, task.spec.corpus, fp["model"], opts.max_length)
    cache.build_cache(cache.CacheOptions(corpus=[_corpus_file(task)], output=root, model=opts.model,
                                         cut_layer=sorted(set(layers)), dtype=opts.dtype,
                                         max_length=opts.max_length, text_column=task.input_column))
    return root


def _open_run_cache(opts: TrainOptions, task, fp: dict[str, Any], k: int):
    """The cache a recycled run reads: --cache as given (a task whose documents are missing from it is an
    error), else the default cache, built or extended first."""
    from . import cache

    expect = {f: fp[f] for f in cache.KEY_FIELDS if f in fp}
    root = opts.cache or ensure_cache(opts, task, fp, [k])
    return cache.open_cache(root, k, expect=expect)


def _corpus_file(task) -> str:
    if isinstance(task.spec.files, str) and task.spec.id_column == "id":
        return task.spec.files
    from .assets import home

    path = home() / "corpora" / f"{task.spec.corpus}.parquet"  # a user task's documents, normalised
    path.parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(task.documents(), path)
    return str(path)


def _default_name(opts: TrainOptions, task: str) -> str:
    """task-finetune-s0, task-k3-lora16-s0, task-k0-lora16-text-s0, task-k3-lora16-lr0.002-s0. A learning rate
    other than the adapter's default is in the name: runs that differ only in it would otherwise share a folder,
    and the second would replace the first."""
    k = opts.cut_layer
    if k is None:
        from .encoders import fingerprint

        k = fingerprint(opts.model, opts.max_length)["num_layers"] // 2
    kind = "finetune" if opts.full_finetune else f"k{k}-{opts.adapter}" + \
        ("" if opts.adapter == "full" else f"{opts.adapter_size}") + ("-text" if opts.from_text else "")
    lr = "" if opts.lr == DEFAULT_LR[opts.adapter] else f"-lr{opts.lr:g}"
    return f"{task}-{kind}{lr}-s{opts.seed}"


def _run_layout(opts: TrainOptions, task_name: str):
    """(task, model fingerprint, cut layer, source) of a run, checked."""
    from . import encoders, tasks

    task = tasks.load_task(task_name)
    fp = encoders.fingerprint(opts.model, opts.max_length)
    k = fp["num_layers"] // 2 if opts.cut_layer is None else opts.cut_layer
    if opts.full_finetune:
        k = 0
    if not 0 <= k <= fp["num_layers"]:
        raise OptionsError(f"--cut-layer {k} out of range: {fp['model']} has layers 0..{fp['num_layers']}")
    return task, fp, k, "text" if opts.full_finetune or opts.from_text else "cache"


def run_data(opts: TrainOptions, task_name: str) -> dict[str, Any]:
    """A run's labelled, materialized Ray Datasets per split (from its cache, or texts) and the cache's dtype.
    Runs that differ only in adapter or learning rate can share one (a sweep does: one cache read per task and k)."""
    return _run_data(opts, *_run_layout(opts, task_name))


def _run_data(opts: TrainOptions, task, fp: dict[str, Any], k: int, source: str) -> dict[str, Any]:
    cache_obj = _open_run_cache(opts, task, fp, k) if source == "cache" else None
    data = split_datasets(task, cache_obj, source, opts.max_train_examples, opts.seed)
    return dict(data, cache_dtype=cache_obj.manifest.dtype if cache_obj else None)


def plan_run(opts: TrainOptions, task_name: str, name: str | None = None,
             data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a run needs, resolved on the driver: task, cache, datasets, the worker config. `name` (default:
    task, cut layer, adapter and seed) names the run's folder and its Ray Train run: deterministic, so a re-run
    resumes it. `data`: `run_data`'s result for these options, if the caller already has it."""
    from . import encoders

    task, fp, k, source = _run_layout(opts, task_name)
    data = data or _run_data(opts, task, fp, k, source)
    if "dev" not in data["datasets"]:
        raise TrainError(f"task {task.name} has no dev split: early stopping and model choice need one")
    token = task.type == "token_classification"
    pooling = encoders.pooling_of(Path(fp["folder"]))  # how the encoder was trained to pool
    spec = {"cut_layer": k, "adapter": opts.adapter, "adapter_size": opts.adapter_size,
            "task_type": task.type, "num_labels": len(task.labels), "pooling": pooling, "source": source,
            "full_finetune": opts.full_finetune}
    name = name or _default_name(opts, task.name)
    config = {"run": name, "task": task.name, "model": opts.model, "model_spec": spec, "labels": task.labels,
              "metric": "span_f1" if token else "accuracy", "lr": opts.lr, "epochs": opts.epochs,
              "patience": opts.patience, "batch_size": opts.batch_size, "zero_stage": opts.zero_stage,
              "precision": opts.precision, "seed": opts.seed, "max_length": opts.max_length,
              "workers": opts.workers, "train_rows": data["rows"]["train"], "has_test": "test" in data["datasets"],
              "data_spec": {"source": source, "task_type": task.type, "hidden": fp["hidden_size"],
                            "cache_dtype": data["cache_dtype"]}}
    return {"name": name, "task": task, "config": config, "datasets": data["datasets"], "rows": data["rows"]}


def _resources(opts: TrainOptions, concurrent_workers: int) -> tuple[float, int | None, bool]:
    from .cluster import cluster_cpus, cluster_gpus

    gpus = cluster_gpus()
    cpus = cluster_cpus()
    # Ray Train reserves a CPU per worker by default; on a small machine that starves Ray Data's read tasks and
    # the run hangs silently. Reserve a share that leaves a quarter of the CPUs free.
    per = opts.cpus_per_worker or max(0.1, min(1.0, 0.75 * cpus / max(concurrent_workers, 1)))
    threads = None if gpus else max(1, int(cpus // max(concurrent_workers, 1)))
    return per, threads, gpus > 0


def fit_run(plan: dict[str, Any], opts: TrainOptions, concurrent_workers: int, callbacks=()) -> dict[str, Any]:
    """One TorchTrainer run; returns metrics.json's content and writes the run's outputs under OUTPUT/runs/."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    per, threads, use_gpu = _resources(opts, concurrent_workers)
    config = dict(plan["config"], threads=threads)
    precision = opts.precision
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    if precision == "fp16" and not use_gpu:
        raise OptionsError("--precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    config["precision"] = precision
    _start_afresh_if_changed(storage.join(opts.output, "ray", plan["name"]), config)
    storage_path, storage_fs = storage.ray_storage(storage.join(opts.output, "ray"))
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": per, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=plan["name"], storage_path=storage_path, storage_filesystem=storage_fs,
                                       failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       callbacks=list(callbacks)),
        datasets=plan["datasets"])
    _log(f"{plan['name']}: {plan['rows']} rows, {opts.workers} worker(s) x {per:.2f} CPU, {precision}")
    result = trainer.fit()
    if result.error:
        raise TrainError(f"{plan['name']} failed: {result.error}")
    out = storage.join(opts.output, "runs", plan["name"])
    metrics = publish_run(result.checkpoint, out)
    if metrics is None:
        raise TrainError(f"{plan['name']}: the last checkpoint has no metrics.json")
    _LiveMetrics(config).final(metrics)
    _log(f"{plan['name']}: dev {metrics['metric']} {metrics['dev']:.4f}, test {metrics['test']}, "
         f"{metrics['seconds_per_epoch']:.1f} s/epoch -> {out}")
    return metrics


def _start_afresh_if_changed(ray_dir: str, config: dict[str, Any]) -> None:
    """Ray Train resumes a run from the checkpoints in its folder (named by the run): right after a failure, wrong
    when the run's settings (learning rate, epochs, examples, ...) or er_ray itself changed since. Keep the
    settings beside the checkpoints and clear them when they differ."""
    from . import __version__

    settings = storage.join(ray_dir, "er_ray_settings.json")
    key = json.loads(json.dumps({"er_ray": __version__, **{k: v for k, v in config.items() if k != "threads"}}))
    if storage.exists(ray_dir) and (not storage.exists(settings) or storage.read_json(settings) != key):
        _log(f"{config['run']}: its settings changed since the checkpoints in {ray_dir} were made: starting afresh")
        storage.delete(ray_dir)
    storage.write_json(settings, key)


def publish_run(checkpoint, out: str) -> dict[str, Any] | None:
    """A finished run's model/ and metrics.json, from its last checkpoint (a `ray.train.Checkpoint`), to the
    location `out` (local or remote), replacing what was there; returns the metrics, or None if the checkpoint
    is not a finished run's. metrics.json is the commit point readers check: it goes first and comes back last,
    so a reader never takes a half-written model/ for a run (no rename needed, as on object stores)."""
    with checkpoint.as_directory() as d:
        if not os.path.exists(os.path.join(d, "metrics.json")):
            return None
        storage.delete(storage.join(out, "metrics.json"))
        storage.delete(out)
        storage.upload(os.path.join(d, "model"), storage.join(out, "model"))
        metrics = json.loads(Path(d, "metrics.json").read_text())
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    return metrics


def train(opts: TrainOptions) -> list[dict[str, Any]]:
    """Train one task model per task, all at once, each a Ray Train + DeepSpeed run; writes a results table."""
    return run_all([(opts, t) for t in opts.task], opts.output)


def run_all(runs: list[tuple[TrainOptions, str]], output: str | Path, max_concurrent: int | None = None,
            skip_done: bool = False) -> list[dict[str, Any]]:
    """Fit several (options, task) runs concurrently (at most `max_concurrent` at once; default all), sharing the
    cluster; one failed run does not lose the others. With `skip_done`, a run whose metrics.json exists is read,
    not trained again (how a study resumes). Returns metrics in the order given; writes the results table."""
    from .cluster import connect
    from .tasks import load_task

    connect()
    results: dict[int, Any] = {}
    todo = []
    for i, (opts, task) in enumerate(runs):
        done = storage.join(opts.output, "runs", _default_name(opts, load_task(task).name), "metrics.json")
        if skip_done and storage.exists(done):
            results[i] = storage.read_json(done)
        else:
            todo.append(i)
    plans = {i: plan_run(runs[i][0], runs[i][1]) for i in todo}
    width = min(len(todo), max_concurrent or len(todo)) or 1
    gate = threading.Semaphore(width)
    errors: dict[str, BaseException] = {}

    def run(i):
        opts = runs[i][0]
        with gate:
            try:
                results[i] = fit_run(plans[i], opts, concurrent_workers=width * opts.workers)
            except BaseException as e:  # reported after the others finish: one failed task does not lose the rest
                errors[plans[i]["name"]] = e

    threads = [threading.Thread(target=run, args=(i,), name=plans[i]["name"]) for i in todo]
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
    print(format_table(rows, ["task", "metric", "dev", "test", "cut_layer", "adapter", "adapter_size",
                              "seconds_per_epoch", "trainable_parameters"]))
