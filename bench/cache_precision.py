"""Issue 15 item 5: what a cache's storage dtype costs in accuracy, not only in bytes.

    .venv/bin/python bench/cache_precision.py --task trec --task wnut16 --seeds 0,1,2
    # -> bench/results/cache_precision_minilm.json and a table on stdout (also in the JSON)

For each dtype (fp32, fp16, bf16, int8) the same recycled runs: the default recipe (LoRA, k = L/2) on each task
and seed, from a cache of that dtype built for the purpose (its own folder under --work). Reported per dtype:
the test metric per task (accuracy; span F1 for token classification; mean and sd over seeds, whole test split),
the cache's Parquet bytes per token, and how far its stored activations are from fp32's (relative L2 error of the
decoded states of one shard's documents).
Every run is the same command but for --dtype, so differences are the cache's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray.options import DTYPES, TrainOptions  # noqa: E402


def cache_dir(out: Path) -> Path:
    [layer] = list(out.glob("caches/*/layer=*"))
    return layer


def open_layer(layer: Path):
    from er_ray.cache import open_cache

    return open_cache(layer.parent, int(layer.name.split("=")[1]))


def cache_bytes_per_token(layer: Path) -> float:
    manifest = open_layer(layer).manifest
    return manifest.bytes / manifest.real_tokens


def decoded(layer: Path) -> dict[str, object]:
    """One shard's documents' states (id -> float32 [tokens, H]), decoded as a run reads them. Shards are named
    by their documents, so every dtype's cache of a corpus has the same first shard."""
    from er_ray import storage
    from er_ray.codec import decode_rows

    cache = open_layer(layer)
    t = storage.read_parquet(sorted(cache.files)[0])
    return dict(zip(t.column("id").to_pylist(), decode_rows(t, cache.manifest.dtype, cache.manifest.hidden_size)))


def main():
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", action="append", help="a task (repeatable; default: trec and wnut16)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train-examples", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--work", default="/tmp/er_ray_precision")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()

    from er_ray.train import run_all

    names = a.task or ["trec", "wnut16"]
    seeds = [int(s) for s in a.seeds.split(",")]
    dtypes = a.dtypes.split(",")
    rows, caches, t0 = [], {}, time.perf_counter()
    for dtype in dtypes:
        runs = [(TrainOptions(task=[t], model=a.model, dtype=dtype, seed=s, epochs=a.epochs, patience=None,
                              max_length=a.max_length, max_train_examples=a.max_train_examples,
                              output=str(Path(a.work) / f"{dtype}-{t}")), t) for t in names for s in seeds]
        for (opts, t), m in zip(runs, run_all(runs, Path(a.work) / dtype, max_concurrent=2, skip_done=True)):
            rows.append({"dtype": dtype, "task": t, "seed": opts.seed, "dev": m["dev"], "test": m["test"],
                         "seconds_per_epoch": m["seconds_per_epoch"]})
        for t in names:
            caches[(dtype, t)] = cache_dir(Path(a.work) / f"{dtype}-{t}")
    errors = {}
    for t in names:
        ref = decoded(caches[("fp32", t)]) if "fp32" in dtypes else None
        for dtype in dtypes:
            if ref is None:
                continue
            got = decoded(caches[(dtype, t)])
            both = [i for i in ref if i in got]
            num = sum(float(((got[i] - ref[i]) ** 2).sum()) for i in both)
            den = sum(float((ref[i] ** 2).sum()) for i in both)
            errors[(dtype, t)] = (num / den) ** 0.5
    lines = ["| cache dtype | bytes/token | " + " | ".join(f"{t} test (mean ± sd)" for t in names)
             + " | " + " | ".join(f"{t} rel. error vs fp32" for t in names) + " |",
             "|---|---|" + "---|" * (2 * len(names))]
    summary = []
    for dtype in dtypes:
        cells, entry = [], {"dtype": dtype, "bytes_per_token": cache_bytes_per_token(caches[(dtype, names[0])])}
        for t in names:
            tests = [r["test"] for r in rows if r["dtype"] == dtype and r["task"] == t]
            mean, sd = statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0
            entry[t] = {"test_mean": mean, "test_sd": sd, "tests": tests, "relative_error": errors.get((dtype, t))}
            cells.append(f"{mean:.4f} ± {sd:.4f}")
        errs = [f"{errors[(dtype, t)]:.2e}" if (dtype, t) in errors else "" for t in names]
        lines.append(f"| {dtype} | {entry['bytes_per_token']:.0f} | " + " | ".join(cells) + " | "
                     + " | ".join(errs) + " |")
        summary.append(entry)
    report = {"model": a.model, "tasks": names, "seeds": seeds, "epochs": a.epochs,
              "max_train_examples": a.max_train_examples, "seconds": time.perf_counter() - t0,
              "summary": summary, "rows": rows, "table": "\n".join(lines)}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"cache_precision_{a.model}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(report["table"])
    print(f"-> {path}")


if __name__ == "__main__":
    main()
