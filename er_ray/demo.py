"""The main job on the embedded default: the whole of embedding recycling on this machine, in a few minutes.

1. cache the clothing-reviews corpus's layer-k activations once (Ray Data -> Parquet, the packaged MiniLM);
2. train three task models (rating, recommended, department) from that one cache (Ray Train + DeepSpeed, LoRA on
   layers k+1..L) and, side by side with them, fully fine-tune one of them from raw text: the paper's baseline,
   with the same loop and hyperparameters;
then print the table (accuracy, time, speed-up, the cache's cost) and write its plot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionsError
from .model import Adapter
from .report import format_table

CLOTHING = ["clothing_rating", "clothing_recommended", "clothing_department"]


@dataclass
class DemoOptions:
    model: str = "minilm"
    """packaged model name (er-ray models), local folder, or hub id"""
    task: list[str] = field(default_factory=lambda: list(CLOTHING))
    """tasks trained at once from one cache (tasks over one corpus share it)"""
    compare: str = "clothing_department"
    """the task also fully fine-tuned from text, the baseline the recycled model is compared with"""
    cut_layer: int | None = None
    """cut layer k: task models run layers k+1..L (default: half the model's layers)"""
    adapter: Adapter = "lora"
    """adapter of the recycled models: lora, bottleneck or full"""
    adapter_size: int = 16
    """LoRA rank or bottleneck width"""
    epochs: int = 2
    """epochs of every run"""
    max_train_examples: int | None = 1000
    """train on at most this many examples per task (dev and test stay whole; none: all)"""
    max_length: int = 64
    """tokens per document at most (longer reviews are truncated, and counted in the cache's manifest)"""
    batch_size: int = 32
    """examples per step"""
    output: str = "demo-output"
    """folder for the cache, the runs, the table and the plot (re-running reuses the cache)"""

    def __post_init__(self):
        if isinstance(self.task, str):
            self.task = [self.task]
        if self.compare not in self.task:
            raise OptionsError(f"--compare {self.compare} must be one of the --task list {self.task}")
        if self.max_length < 2:
            raise OptionsError(f"--max-length must be at least 2, got {self.max_length}")
        if self.epochs < 1 or self.batch_size < 1:
            raise OptionsError("--epochs and --batch-size must be at least 1")


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(opts: DemoOptions) -> dict[str, Any]:
    """Cache a corpus once, train several task models from it at once, compare one with full fine-tuning."""
    from . import cache, encoders, tasks
    from .cluster import connect
    from .train import TrainOptions, ensure_cache, run_all

    t_all = time.perf_counter()
    fp = encoders.fingerprint(opts.model, opts.max_length)
    k = fp["num_layers"] // 2 if opts.cut_layer is None else opts.cut_layer
    if not 0 < k < fp["num_layers"]:
        raise OptionsError(f"--cut-layer {k} out of range: {fp['model']} has layers 1..{fp['num_layers'] - 1} "
                           "to cut at")
    loaded = [tasks.load_task(t) for t in opts.task]
    corpora = sorted({t.spec.corpus for t in loaded})
    connect()
    out = Path(opts.output).resolve()
    common = dict(model=opts.model, output=str(out), epochs=opts.epochs, patience=opts.epochs,
                  batch_size=opts.batch_size, max_length=opts.max_length,
                  max_train_examples=opts.max_train_examples)
    print(f"model {fp['model']}: {fp['num_layers']} layers, hidden {fp['hidden_size']}; cut layer k={k}: "
          f"the task models run layers {k + 1}..{fp['num_layers']}")

    _step(f"1/2 caching layer {k} of corpus {', '.join(corpora)} once (Ray Data -> Parquet)")
    t0 = time.perf_counter()
    roots = {}
    for t in loaded:
        if t.spec.corpus not in roots:
            roots[t.spec.corpus] = ensure_cache(TrainOptions(task=[t.name], **common), t, fp, [k])
    cache_s = time.perf_counter() - t0
    manifests = {c: cache.open_cache(r, k).manifest for c, r in roots.items()}
    for c, m in manifests.items():
        print(f"cache {c}: {m.rows:,} documents, {m.real_tokens:,} real tokens ({m.truncated:,} truncated at "
              f"{opts.max_length}), {m.bytes / 2**20:.1f} MiB = {m.bytes / max(m.real_tokens, 1):.0f} bytes per "
              f"token ({m.dtype}; padded to 512 in fp32, the paper's code stores "
              f"{m.rows * 512 * fp['hidden_size'] * 4 / max(m.real_tokens, 1):,.0f}); ready in {cache_s:.0f} s")

    _step(f"2/2 training {len(loaded)} task models from the cache ({opts.adapter} {opts.adapter_size}) and fully "
          f"fine-tuning {opts.compare} from raw text (the baseline), all at once")
    # All at once, one thread each: the baseline and the recycled models share the cores on equal terms, so their
    # seconds per epoch compare fairly (and the whole step takes the time of the slowest run).
    t0 = time.perf_counter()
    runs = [(TrainOptions(task=[t.name], cut_layer=k, adapter=opts.adapter, adapter_size=opts.adapter_size,
                          cache=str(roots[t.spec.corpus]), **common), t.name) for t in loaded]
    runs.append((TrainOptions(task=[opts.compare], full_finetune=True, **common), opts.compare))
    *recycled, baseline = run_all(runs, out)
    wall = time.perf_counter() - t0

    rows = _table(recycled, baseline)
    print()
    print(format_table(rows, ["task", "model", "metric", "dev", "test", "s/epoch", "speedup", "trainable"]))
    ft_epoch = baseline["seconds_per_epoch"]
    per_task_cache = cache_s / max(sum(1 for t in loaded if t.spec.corpus == c) for c in corpora)
    print(f"\n{len(recycled)} recycled task models and the fine-tuning baseline trained side by side in {wall:.0f} s "
          f"of wall time. The cache took {cache_s:.0f} s once for {len(loaded)} tasks: {per_task_cache:.0f} s per "
          f"task, {per_task_cache / ft_epoch:.2f} epochs of fine-tuning (the next run re-encodes nothing).")
    plot = plot_demo(rows, out / "demo.png")
    print(f"table: {out / 'results.md'}; plot: {plot}; done in {time.perf_counter() - t_all:.0f} s")
    return {"cut_layer": k, "rows": rows, "cache_seconds": cache_s, "train_wall": wall, "plot": str(plot),
            "manifests": manifests}


def _table(recycled: list[dict[str, Any]], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in [baseline, *recycled]:
        rows.append({"task": m["task"], "metric": m["metric"], "dev": m["dev"], "test": m["test"],
                     "model": "full fine-tuning" if m["full_finetune"] else
                     f"recycled k={m['cut_layer']} {m['adapter']}" + (f" {m['adapter_size']}" if m["adapter_size"]
                                                                        else ""),
                     "s/epoch": m["seconds_per_epoch"], "trainable": m["trainable_parameters"],
                     "speedup": (f"{baseline['seconds_per_epoch'] / m['seconds_per_epoch']:.2f}x"
                                 if m["task"] == baseline["task"] and not m["full_finetune"] else "")})
    return rows


def plot_demo(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test score and seconds per epoch of every model, side by side."""
    from .report import figure, save_figure

    labels = [f"{r['task']}\n{r['model']}" for r in rows]
    colors = ["C3" if r["model"] == "full fine-tuning" else "C0" for r in rows]
    fig, (a, b) = figure(1, 2, size=(11, 4))
    a.barh(labels, [r["test"] or 0 for r in rows], color=colors)
    a.set(xlabel="test score", xlim=(0, 1), title="accuracy")
    b.barh(labels, [r["s/epoch"] for r in rows], color=colors)
    b.set(xlabel="seconds per epoch", title="training time")
    b.set_yticks([])
    for ax in (a, b):
        ax.tick_params(axis="y", labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
