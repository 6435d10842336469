"""The main job on the embedded default: the whole of embedding recycling on this machine, in a few minutes.

1. cache the clothing-reviews corpus's layer-k activations once (Ray Data -> Parquet, the packaged MiniLM);
2. train three task models (rating, recommended, department) from that one cache (Ray Train + DeepSpeed, LoRA on
   layers k+1..L) and, side by side with them, fully fine-tune one of them from raw text: the paper's baseline,
   with the same loop and hyperparameters;
then print the table (accuracy, time, speed-up, the cache's cost) and write its plot.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from .console import fmt_count, fmt_seconds
from .options import DemoOptions
from .report import format_table


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(opts: DemoOptions) -> dict[str, Any]:
    """Cache a corpus once, train several task models from it at once, compare one with full fine-tuning."""
    from . import cache, tasks
    from .cache_build import cache_root, ensure_cache
    from .cluster import connect
    from .encoders import check_cut_layer, default_cut_layer
    from .pretrained import fingerprint
    from .train import run_all

    from . import storage

    t_all = time.perf_counter()
    train = opts.train
    storage.writable_folder(train.output)
    loaded = [tasks.load_task(t) for t in train.task]
    train = train.for_task_types(t.type for t in loaded)
    fp = fingerprint(train.model, train.max_length)
    types = {t.type for t in loaded}  # one cut for every task: a type's default where they share one
    k = default_cut_layer(fp["num_layers"], types.pop() if len(types) == 1 else None) if train.cut_layer is None else \
        check_cut_layer(train.cut_layer, fp["num_layers"], fp["model"])
    corpora = sorted({t.spec.corpus for t in loaded})
    connect()
    out = Path(train.output).resolve()
    train = dataclasses.replace(train, output=str(out), cut_layer=k)
    print(f"model {fp['model']}: {fp['num_layers']} layers, hidden {fp['hidden_size']}; cut layer k={k}: "
          f"the task models run layers {k + 1}..{fp['num_layers']}")

    _step(f"1/2 caching layer {k} of corpus {', '.join(corpora)} once (Ray Data -> Parquet)")
    t0 = time.perf_counter()
    roots = {}
    for t in loaded:
        if t.spec.corpus not in roots:
            roots[t.spec.corpus] = ensure_cache(t, cache_root(out, t.spec.corpus, fp["model"], train.max_length),
                                                train.model, train.max_length, train.dtype, [k])
    cache_s = time.perf_counter() - t0
    manifests = {c: cache.open_cache(r, k).manifest for c, r in roots.items()}
    for c, m in manifests.items():
        print(f"cache {c}: {fmt_count(m.rows)} documents, {fmt_count(m.real_tokens)} real tokens "
              f"({fmt_count(m.truncated)} truncated at {train.max_length}), {m.bytes / 2**20:.1f} MiB = "
              f"{m.bytes / max(m.real_tokens, 1):.0f} bytes per token ({m.dtype}; padded to 512 in fp32, the "
              f"paper's code stores {m.rows * 512 * fp['hidden_size'] * 4 / max(m.real_tokens, 1):,.0f}); ready in "
              f"{fmt_seconds(cache_s)}")

    size = "" if train.adapter == "full" else f" {train.adapter_size}"
    adapter = f"{train.adapter}{size}" if train.adapter else "each task type's default adapter"
    _step(f"2/2 training {len(loaded)} task models from the cache ({adapter}) and fully "
          f"fine-tuning {opts.compare} from raw text (the baseline), all at once")
    # All at once, one thread each: the baseline and the recycled models share the cores on equal terms, so their
    # seconds per epoch compare fairly (and the whole step takes the time of the slowest run).
    t0 = time.perf_counter()
    runs = [(dataclasses.replace(train, task=[t.name], cache=str(roots[t.spec.corpus])), t.name) for t in loaded]
    runs.append((dataclasses.replace(train, task=[opts.compare], full_finetune=True, cut_layer=None, cache=None),
                 opts.compare))
    *recycled, baseline = run_all(runs, out)
    wall = time.perf_counter() - t0

    rows = _table(recycled, baseline)
    print()
    print(format_table(rows, ["task", "model", "metric", "dev", "test", "s/epoch", "speedup", "trainable"]))
    ft_epoch = baseline["seconds_per_epoch"]
    per_task_cache = cache_s / max(sum(1 for t in loaded if t.spec.corpus == c) for c in corpora)
    print(f"\n{len(recycled)} recycled task models and the fine-tuning baseline trained side by side in "
          f"{fmt_seconds(wall)} of wall time. The cache took {fmt_seconds(cache_s)} once for {len(loaded)} tasks: "
          f"{fmt_seconds(per_task_cache)} per task, {per_task_cache / ft_epoch:.2f} epochs of fine-tuning (the next "
          f"run re-encodes nothing).")
    plot = plot_demo(rows, out / "demo.png")
    print(f"table: {out / 'results.md'}; plot: {plot}; done in {fmt_seconds(time.perf_counter() - t_all)}")
    return {"cut_layer": k, "rows": rows, "cache_seconds": cache_s, "train_wall": wall, "plot": str(plot),
            "manifests": manifests}


def _table(recycled: list[dict[str, Any]], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m in [baseline, *recycled]:
        rows.append({"task": m["task"], "metric": m["metric"], "dev": round(m["dev"], 4),
                     "test": None if m["test"] is None else round(m["test"], 4),
                     "model": "full fine-tuning" if m["full_finetune"] else
                     f"recycled k={m['cut_layer']} {m['adapter']}" + ("" if m["adapter"] == "full"
                                                                        else f" {m['adapter_size']}"),
                     "s/epoch": round(m["seconds_per_epoch"], 1), "trainable": m["trainable_parameters"],
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
