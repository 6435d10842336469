"""The loop every Ray Train worker runs: a task model in a DeepSpeed engine, epochs, dev evaluation, checkpoints.

    train_loop(asdict(LoopConfig(...)))       # TorchTrainer's train_loop_per_worker

`LoopConfig` is everything the driver resolved (typed; it travels as a dict), `LoopState` what a checkpoint keeps
between epochs, `Worker` the model, engine and data of one worker with one method per step: `train_epoch`,
`evaluate`, `save`, `finish`. Checkpoints hold the trainable weights and optimizer state only (never the frozen
model); a run resumes from its last one after a worker dies.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .console import LiveMetrics
from .flops import layer_forward_flops, matmul_peak, model_shape, train_flops_per_token
from .metrics import f1, span_counts
from .model import IGNORE, span_loss
from .defaults import WARMUP
from .schedule import StepPlan, epochs_in_budget, warmup_then_linear_decay


@dataclass
class LoopConfig:
    """What a worker needs, resolved on the driver."""

    run: str
    task: str
    model: str
    spec: dict[str, Any]
    """the task model (`ModelSpec` fields)"""
    labels: list[str]
    metric: str
    learning_rate: float
    epochs: int
    patience: int | None
    batch_size: int
    zero_stage: int
    precision: str
    seed: int
    max_length: int
    workers: int
    train_rows: int
    has_test: bool
    source: str
    """cache (rows of layer-k states) or text (rows of texts)"""
    hidden: int
    cache_dtype: str | None
    budget_seconds: float | None = None
    """seconds of training to spend: after the first epoch, the epochs that fit are planned (at most `epochs`)"""
    max_train_examples: int | None = None
    warmup: float = WARMUP
    """share of the steps warming up (resolved per adapter kind on the driver)"""
    head_learning_rate: float | None = None  # the head's own peak rate (None: learning_rate)
    threads: int | None = None
    tables: dict[str, Any] | None = None  # split -> object ref of its rows (train_data.TableShard); None: Ray Data's

    def settings(self) -> dict[str, Any]:
        """What makes two runs the same run (threads and where the rows wait do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("threads", "tables")}


@dataclass
class LoopState:
    """What a checkpoint keeps between epochs (loop.json, and best.pt for the best epoch's weights)."""

    epochs_done: int = 0
    best: float = -1.0
    best_dev: dict = field(default_factory=dict)
    """the best epoch's dev scores: the final report reuses them instead of evaluating again"""
    stale: int = 0
    history: list[dict] = field(default_factory=list)
    stopped: bool = False
    """a finished run: a resumed one is not trained again"""
    planned_epochs: int | None = None
    """under a time budget: the epochs that fit it, planned after the first, only ever shortened after that"""
    checkpoint_seconds: float = 0.0
    """saving and reporting the epochs' checkpoints so far (the timeline's `checkpoint`)"""
    best_weights: dict | None = None

    def record(self, dev: dict, metric: str, weights) -> None:
        if dev[metric] > self.best:
            self.best, self.best_dev, self.stale = dev[metric], dev, 0
            self.best_weights = weights()
        else:
            self.stale += 1

    def save(self, folder: Path) -> None:
        import torch

        loop = {k: v for k, v in asdict(self).items() if k != "best_weights"}
        (folder / "loop.json").write_text(json.dumps(loop))
        if self.best_weights is not None:
            torch.save(self.best_weights, folder / "best.pt")

    @classmethod
    def load(cls, folder: Path) -> LoopState:
        import torch

        state = cls(**json.loads((folder / "loop.json").read_text()))
        if (folder / "best.pt").exists():
            state.best_weights = torch.load(folder / "best.pt", weights_only=True)
        return state


def deepspeed_config(batch_size: int, world: int, zero: int, precision: str) -> dict:
    return {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": batch_size * world, "zero_optimization": {"stage": zero},
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
            "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def init_deepspeed(model, optimizer, scheduler, cfg: dict, cpu: bool):
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


class Worker:
    """One Ray Train worker's model, engine and data."""

    def __init__(self, cfg: LoopConfig):
        import ray.train
        import ray.train.torch
        import torch

        from .model import ModelSpec, TaskModel
        from .pretrained import load_encoder
        from .train_data import TableShard

        self.cfg, self.started_at = cfg, time.time()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = ray.train.torch.get_device()
        self.enc = load_encoder(cfg.model)
        self.spec = ModelSpec(**cfg.spec)
        self.model = TaskModel(self.enc.model, self.spec).to(self.device)
        groups = self.model.param_groups(cfg.learning_rate, cfg.head_learning_rate)  # each with its own peak
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        self.steps_per_epoch = max(1, -(-cfg.train_rows // (cfg.batch_size * self.world)))
        self.plan = StepPlan(self.steps_per_epoch * cfg.epochs, cfg.warmup)
        scheduler = warmup_then_linear_decay(optimizer, self.plan)
        self.engine = init_deepspeed(self.model, optimizer, scheduler,
                                     deepspeed_config(cfg.batch_size, self.world, cfg.zero_stage, cfg.precision),
                                     self.device.type == "cpu")
        self.data_spec = {"source": cfg.source, "task_type": self.spec.task_type, "hidden": cfg.hidden,
                          "cache_dtype": cfg.cache_dtype, "pad_id": self.enc.tokenizer.pad_token_id or 0}
        self.tokenizer = self.enc.tokenizer if cfg.source == "text" else None
        self.peak_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.peak = matmul_peak(self.peak_dtype, self.device.type)
        self.kept: dict = {}  # the dev shard, held in memory after its first pass (train_data.KeptShard)
        # rows cut on the driver: this worker's share of each split's table (else Ray Data's shards)
        self.tables = {s: TableShard(ref, self.rank, self.world, s == "train") for s, ref in (cfg.tables or {}).items()}
        self.setup_seconds = time.time() - self.started_at  # the model loaded, DeepSpeed started, the peak measured

    def step_flops(self, real_tokens: int, seq_len: int) -> float:
        """Model FLOPs of one training step (er_ray.flops): the layers that train, and frozen lower ones from text."""
        k = self.spec.cut_layer
        h, i, n = model_shape(self.enc.model.config)
        trains = self.spec.full_finetune or self.spec.adapter == "full"
        per_token = train_flops_per_token(h, i, seq_len, n - k, trains)
        if self.cfg.source == "text":
            per_token += k * layer_forward_flops(h, i, seq_len)
        return real_tokens * per_token

    def batches(self, split: str, shuffle_seed: int | None):
        import ray.train

        from .train_data import KeptShard, batches

        shard = self.tables.get(split) or ray.train.get_dataset_shard(split)
        if split == "dev" and not self.tables:  # evaluated every epoch, in the same order: kept after one pass
            shard = self.kept.setdefault(split, KeptShard(shard))
        return batches(shard, self.data_spec, self.cfg.batch_size, shuffle_seed, self.tokenizer, self.cfg.max_length)

    def resume(self) -> tuple[LoopState, bool]:
        """The state after the last checkpoint (DeepSpeed's own state restored into the engine), or a fresh one."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return LoopState(), False
        with ckpt.as_directory() as d:
            self.engine.load_checkpoint(d, tag="latest_ds", load_module_strict=False)
            state = LoopState.load(Path(d))
            self.restore_rng(Path(d))
        if state.planned_epochs:
            self.plan_epochs(state.planned_epochs)
        return state, True

    def plan_epochs(self, epochs: int) -> None:
        self.plan.replan(self.steps_per_epoch * epochs)

    def slowest(self, seconds: float) -> float:
        """The largest of every worker's `seconds` (workers must agree on a plan, or the collectives hang)."""
        if self.world == 1:
            return seconds
        import torch
        import torch.distributed as dist

        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def train_epoch(self, epoch: int) -> dict[str, float]:
        import torch

        t0 = time.perf_counter()
        data_s = step_s = loss_sum = flops = 0.0
        n_steps = n_ex = 0
        it = self.batches("train", self.cfg.seed * 1000 + epoch)
        first_batch_s = None
        while True:
            td = time.perf_counter()
            nxt = next(it, None)
            data_s += time.perf_counter() - td
            first_batch_s = time.perf_counter() - t0 if first_batch_s is None else first_batch_s
            if nxt is None:
                break
            x, mask, y, _ = nxt
            ts = time.perf_counter()
            logits = self.engine(x.to(self.device), mask.to(self.device))
            if self.spec.task_type == "question_answering":
                y = y.to(self.device)
                loss = span_loss(logits, mask.to(self.device), y[:, 0], y[:, 1])
            else:
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         y.to(self.device).reshape(-1), ignore_index=IGNORE)
            self.engine.backward(loss)
            self.engine.step()
            step_s += time.perf_counter() - ts
            flops += self.step_flops(int(mask.sum()), mask.shape[1])
            loss_sum += loss.detach().item()
            n_steps += 1
            n_ex += len(y)
        train_s = time.perf_counter() - t0
        flops_per_s = flops / max(step_s, 1e-9)
        if flops_per_s > self.peak:
            # the peak was measured while other processes competed for the cores (several workers or runs starting
            # at once: the demo once printed "MFU 137%"): measure it again now (flops.matmul_peak's traps)
            self.peak = max(self.peak, matmul_peak(self.peak_dtype, self.device.type))
        return {"train_loss": loss_sum / max(n_steps, 1), "train_seconds": train_s,
                "learning_rate": float(self.engine.get_lr()[0]),  # at the epoch's end
                "examples_per_second": n_ex * self.world / max(train_s, 1e-9), "data_seconds": data_s,
                "step_seconds": step_s, "data_stall": data_s / max(train_s, 1e-9), "first_batch_seconds": first_batch_s,
                # the step's model FLOP/s on this worker, against the best matmul peak it measured (at its start)
                "model_flops_per_second": flops_per_s, "mfu": flops_per_s / self.peak}

    def evaluate(self, split: str) -> dict:
        import torch
        import torch.distributed as dist

        self.engine.eval()
        if self.spec.task_type == "question_answering":
            return self.evaluate_answers(split)
        correct = tp = fp = fn = tokens_ok = total = 0
        predicted = torch.zeros(len(self.cfg.labels), dtype=torch.float64)  # how often each class was the answer
        with torch.no_grad():
            for x, mask, y, wids in self.batches(split, None):
                pred = self.engine(x.to(self.device), mask.to(self.device)).float().cpu().argmax(-1)
                if wids is None:
                    correct += int((pred == y).sum())
                    total += len(y)
                    predicted += torch.bincount(pred, minlength=len(predicted)).double()
                    continue
                keep = y != IGNORE
                tokens_ok += int((pred[keep] == y[keep]).sum())
                total += int(keep.sum())
                names = self.cfg.labels
                for j in range(len(y)):
                    a, b, c = span_counts([names[t] for t in y[j][keep[j]].tolist()],
                                          [names[t] for t in pred[j][keep[j]].tolist()])
                    tp, fp, fn = tp + a, fp + b, fn + c
        counts = torch.cat([torch.tensor([correct, tp, fp, fn, tokens_ok, total], dtype=torch.float64), predicted])
        if self.world > 1:
            dist.all_reduce(counts)
        (correct, tp, fp, fn, tokens_ok, total), predicted = counts[:6].tolist(), counts[6:]
        self.agree_to_keep(split)
        self.engine.train()
        # one class for every example (or no entity at all) is a model that learned nothing: the driver says so
        if self.spec.task_type == "classification":
            return {"accuracy": correct / max(total, 1), "examples": int(total),
                    "classes_predicted": int((predicted > 0).sum())}
        return {"span_f1": f1(tp, fp, fn), "token_accuracy": tokens_ok / max(total, 1), "examples": int(total),
                "spans_predicted": int(tp + fp)}

    def evaluate_answers(self, split: str) -> dict:
        """Question answering: every window's start and end logits, gathered from all workers (a question's
        windows may be on several), decoded into each question's answer and scored (er_ray.qa)."""
        import torch
        import torch.distributed as dist

        from .qa import score_windows

        windows = []
        with torch.no_grad():
            for x, mask, _, extra in self.batches(split, None):
                logits = self.engine(x.to(self.device), mask.to(self.device)).float().cpu().numpy()
                for j, n in enumerate(mask.sum(1).tolist()):
                    windows.append((*extra[j], logits[j, :n, 0], logits[j, :n, 1]))
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, windows)
            windows = [w for part in everyone for w in part]
        self.agree_to_keep(split)
        self.engine.train()
        return score_windows(windows)

    def agree_to_keep(self, split: str) -> None:
        """Trap: Ray Data's split coordinator starts a pass only when every worker asks for one; a worker that
        replayed its kept shard while another read its own would leave that one waiting for ever. All or none."""
        if split not in self.kept or self.world == 1:
            return
        import torch
        import torch.distributed as dist

        kept = torch.tensor([float(self.kept[split].kept is not None)])
        dist.all_reduce(kept, op=dist.ReduceOp.MIN)
        if kept.item() < 1:
            self.kept[split].forget()

    def trainable_weights(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.named_parameters() if v.requires_grad}

    def save(self, state: LoopState, folder: Path) -> None:
        """A checkpoint: every rank saves its DeepSpeed state (ZeRO partitions the optimizer), frozen weights left
        out; rank 0 adds the loop's state."""
        self.engine.save_checkpoint(str(folder), tag="latest_ds", exclude_frozen_parameters=True)
        self.save_rng(folder)
        if self.rank == 0:
            state.save(folder)

    def save_rng(self, folder: Path) -> None:
        """This rank's torch generators (dropout's masks). Trap: they were seeded once, at set-up, so a run resumed
        from epoch e's checkpoint drew other masks than the uninterrupted run from there on (SQuAD fine-tuning,
        resumed after Ray's memory monitor killed it: test F1 0.3198 against 0.3399). Tensors, loaded weights-only."""
        import torch

        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, folder / f"rng-rank{self.rank}.pt")

    def restore_rng(self, folder: Path) -> None:
        import torch

        path = folder / f"rng-rank{self.rank}.pt"
        if not path.exists():  # a checkpoint an older er_ray wrote: resumes, not bit for bit
            return
        rng = torch.load(path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def finish(self, state: LoopState, folder: Path) -> dict:
        """The best epoch's weights back in, test scored once, and (rank 0) the exported model and metrics.json
        inside the last checkpoint."""
        import torch

        t0 = time.perf_counter()
        cfg, metric = self.cfg, self.cfg.metric
        if state.best_weights is not None:
            with torch.no_grad():
                named = dict(self.model.named_parameters())
                for k, v in state.best_weights.items():
                    named[k].copy_(v)
        dev = state.best_dev or self.evaluate("dev")  # the best epoch's own scores: the same weights
        test = self.evaluate("test") if cfg.has_test else {}
        history = state.history
        train_s = sum(h["train_seconds"] for h in history)
        metrics = {"run": cfg.run, "task": cfg.task, "model": cfg.model, "metric": metric,
                   "dev": dev.get(metric), "test": test.get(metric), "dev_all": dev, "test_all": test,
                   "cut_layer": self.spec.cut_layer, "adapter": self.spec.adapter,
                   "adapter_size": None if self.spec.adapter == "full" else self.spec.adapter_size,
                   "recycled": self.spec.source == "cache", "full_finetune": self.spec.full_finetune,
                   "train_seconds": train_s, "epochs_run": len(history),
                   "seconds_per_epoch": train_s / max(len(history), 1),
                   "examples_per_second": float(np.mean([h["examples_per_second"] for h in history])),
                   # epochs an older er_ray trained (a resumed run) have no MFU: the mean of those that do, or None
                   "mfu": float(np.mean(mfus)) if (mfus := [h["mfu"] for h in history if "mfu" in h]) else None,
                   "matmul_peak_flops": self.peak, "data_stall": float(np.mean([h["data_stall"] for h in history])),
                   "trainable_parameters": self.model.num_trainable(), "learning_rate": cfg.learning_rate,
                   "batch_size": cfg.batch_size, "workers": cfg.workers, "precision": cfg.precision,
                   "zero_stage": cfg.zero_stage, "seed": cfg.seed, "budget_seconds": cfg.budget_seconds,
                   "planned_epochs": state.planned_epochs or cfg.epochs, "history": history,
                   "settings": cfg.settings(),  # what a resumed study compares before reusing this run
                   "started_at": self.started_at, "finished_at": time.time(),
                   "deepspeed": {"world_size": self.world, "global_steps": self.engine.global_steps,
                                 "zero_stage": self.engine.zero_optimization_stage(),
                                 "optimizer": type(self.engine.optimizer).__name__}}
        if self.rank == 0:
            self.export(folder / "model")
            metrics["timeline"] = {"model_setup": self.setup_seconds, "train": train_s,
                                   "evaluate": sum(h.get("evaluate_seconds", 0.0) for h in history),
                                   "checkpoint": state.checkpoint_seconds, "finish": time.perf_counter() - t0}
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return {"final": True, "dev": dev.get(metric), "test": test.get(metric)}

    def export(self, out: Path) -> None:
        """trainable.safetensors + task.json (+ a PEFT adapter that plain transformers + peft load)."""
        from safetensors.torch import save_file

        out.mkdir()
        save_file({k: v.contiguous() for k, v in self.model.trainable_state_dict().items()},
                  out / "trainable.safetensors")
        (out / "task.json").write_text(json.dumps({"spec": self.spec.to_json(), "labels": self.cfg.labels,
                                                   "model": self.cfg.model, "weights_sha256": self.enc.weights_sha256,
                                                   "max_length": self.cfg.max_length,
                                                   "cache_dtype": self.cfg.cache_dtype}, indent=1))
        if self.model.peft is not None:
            self.model.peft.save_pretrained(str(out / "peft_adapter"))


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: epochs until `epochs` or `patience` epochs without a better dev metric,
    each reported to Ray Train with its checkpoint (the last one holds the exported model)."""
    import ray.train

    cfg = LoopConfig(**config)
    worker = Worker(cfg)
    state, resumed = worker.resume()
    live = LiveMetrics(cfg) if worker.rank == 0 else None
    worker.engine.train()
    first = state.epochs_done
    for epoch in range(first, cfg.epochs if not state.stopped else 0):
        row = worker.train_epoch(epoch)
        if cfg.budget_seconds:  # planned after the first epoch (its data wait once), shortened if later ones slow
            spent = row["train_seconds"] + sum(h["train_seconds"] for h in state.history)
            steady = worker.slowest(row["train_seconds"] - (row["first_batch_seconds"] if epoch == 0 else 0.0))
            fit = epochs_in_budget(cfg.budget_seconds, worker.slowest(spent), steady, cfg.epochs, epoch + 1)
            if fit < (state.planned_epochs or cfg.epochs + 1):  # the decay then reaches zero at the new end
                state.planned_epochs = fit
                worker.plan_epochs(fit)
        t = time.perf_counter()
        dev = worker.evaluate("dev")
        row["evaluate_seconds"] = time.perf_counter() - t
        state.record(dev, cfg.metric, worker.trainable_weights)
        row = {"run": cfg.run, "epoch": epoch + 1, "epochs": state.planned_epochs or cfg.epochs, "metric": cfg.metric,
               "resumed": resumed and epoch == first, f"dev_{cfg.metric}": dev[cfg.metric],
               "dev_score": dev[cfg.metric],  # one name for every task's metric: what a sweep's scheduler compares
               "trainable_parameters": worker.model.num_trainable(), **row}
        state.history.append(row)
        state.epochs_done = epoch + 1
        state.stopped = (cfg.patience is not None and state.stale >= cfg.patience) or \
            epoch + 1 == (state.planned_epochs or cfg.epochs)
        if live:
            live.epoch(epoch + 1, row["train_loss"], dev[cfg.metric], row["examples_per_second"])
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            worker.save(state, Path(d))
            if state.stopped:
                row.update(worker.finish(state, Path(d)))
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        if state.stopped:
            break
        state.checkpoint_seconds += time.perf_counter() - t  # kept by the next epoch's checkpoint
