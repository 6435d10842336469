"""Issue 3's figures, measured side by side in one run on the clothing-reviews corpus.

    .venv/bin/python bench/cache_throughput.py --model minilm [--limit N] [--out bench/results]

1. Throughput ratio: tokens/s of `er-ray cache` (Ray Data pipeline, end to end: plan, tokenize, encode, write
   Parquet, commit) / tokens/s of a bare single-process PyTorch forward of the same lower layers over the same
   texts with the same batch size (tokenize + forward, nothing written), both on all the machine's cores.
2. Bytes on disk per real token for fp16 and int8 (and the padded-to-512 fp32 layout of the paper's code).
3. Multi-layer pass: 3 cut layers in one pass / the deepest alone.
4. Peak memory (PSS of the whole process tree: driver, raylet, workers) of each Ray run.
Also reports each run's model FLOP/s as a fraction of the machine's matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import console, encoders, pretrained, tasks  # noqa: E402
from er_ray.cache_build import build_cache  # noqa: E402
from er_ray.options import CacheOptions  # noqa: E402
from er_ray.cluster import connect  # noqa: E402
from machine import ProcessCpu, cpu_ticks, process_tree, steal_fraction  # noqa: E402  (bench/machine.py)


class PeakPSS:
    """Samples the PSS of this process and all its descendants (Ray's raylet, GCS and workers).

    Only the pipeline runs carry this sampler (the bare loop does not), so it must cost them next to nothing:
    reading smaps_rollup makes the kernel walk the page tables of every process, under each process's mmap lock.
    At one sample a second this took 15% of a core during mpnet's run (py-spy on the driver: 39 of
    51 busy samples in this read) and slowed the encoder it shares the two cores with. Every 10 s it is ~1.5%;
    memory moves slowly over a run of minutes, so the peak is still seen."""

    def __init__(self, interval=10.0):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()

    def _tree_pss(self):
        # /proc/<pid>/smaps_rollup, one line: psutil's memory_full_info() parses far more and, sampled over
        # Ray's ~20 processes, took most of a core away from the run being measured.
        total = 0
        for p in process_tree():
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
            except (OSError, psutil.NoSuchProcess):
                pass
        return total

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_pss())
            self._stop.wait(self.interval)

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def matmul_peak_gflops(dtype=torch.float32, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def lower_flops_per_token(enc, k: int, avg_len: float) -> float:
    """Forward FLOPs per token of layers 1..k: 2 x weights + attention scores/values (2 x 2 x T x H)."""
    layer = enc.split(enc.num_layers)[0].layer[0]
    weights = sum(p.numel() for n, p in layer.named_parameters() if p.dim() == 2)
    return k * (2 * weights + 4 * avg_len * enc.hidden_size)


def bare_forward(enc, texts, k, batch_size, max_length) -> dict:
    """One process, all cores: tokenize, bucket by length, run layers 1..k. What a user would write by hand."""
    torch.set_num_threads(os.cpu_count())
    lower = encoders.LowerEncoder(enc.model, k)
    with ProcessCpu() as cpu:
        t0, ticks = time.perf_counter(), cpu_ticks()
        ids = enc.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        tokens = 0
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                b = enc.tokenizer.pad({"input_ids": [ids[i] for i in order[s:s + batch_size]]}, return_tensors="pt")
                lower(b["input_ids"], b["attention_mask"])
                tokens += int(b["attention_mask"].sum())
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "steal": steal_fraction(ticks, cpu_ticks()), "cpu": cpu.result}


def ray_build(corpus, out, model, layers, dtype, batch_size, max_length) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    progress = []  # build_cache's progress lines, timed: when shards were committed, the encoder's own rate
    say = console.say  # the build's progress lines all go through er_ray.console.say
    console.say = lambda stage, msg: (progress.append((round(time.perf_counter() - t0, 1), msg)), say(stage, msg))
    with PeakPSS() as mem, ProcessCpu() as cpu:
        t0, ticks = time.perf_counter(), cpu_ticks()
        try:
            ms = build_cache(CacheOptions(corpus=[str(corpus)], output=str(out), model=model, cut_layer=layers,
                                          dtype=dtype, batch_size=batch_size, max_length=max_length))
        finally:
            console.say = say
        seconds = time.perf_counter() - t0
    m = ms[max(layers)]
    return {"seconds": seconds, "steal": steal_fraction(ticks, cpu_ticks()), "tokens": m.real_tokens, "rows": m.rows,
            "peak_pss_gib": mem.peak / 2**30, "truncated": m.truncated, "cpu": cpu.result, "progress": progress,
            "bytes_per_token": {k: ms[k].bytes / ms[k].real_tokens for k in ms}}


def main():
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--limit", type=int, default=None, help="documents of the corpus (default: all 22,641)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--bytes-docs", type=int, default=3000, help="documents for the fp16/int8 bytes comparison")
    ap.add_argument("--work", default="/tmp/er_ray_bench")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--parts", default="throughput,multi_layer,bytes",
                    help="what to measure (default: all): throughput (bare vs pipeline), multi_layer, bytes")
    a = ap.parse_args()
    parts = set(a.parts.split(","))

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = tasks.load_task("clothing_rating").documents()
    if a.limit:
        docs = docs.slice(0, a.limit)
    corpus = work / "clothing.parquet"
    pq.write_table(docs, corpus)
    small = work / "clothing_small.parquet"
    pq.write_table(docs.slice(0, a.bytes_docs), small)
    texts = docs.column("text").to_pylist()

    enc = pretrained.load_encoder(a.model)
    L = enc.num_layers
    k = L // 2
    layers3 = [k - 1, k, k + 1] if k + 1 <= L else [k - 2, k - 1, k]
    connect()  # the cluster is up before timing, as on a real cluster
    peak32 = matmul_peak_gflops()
    res = {"model": a.model, "documents": len(texts), "cut_layer": k, "batch_size": a.batch_size,
           "max_length": a.max_length, "cpus": os.cpu_count(), "matmul_peak_fp32_gflops": peak32}

    print(f"[bench] bare forward, {a.model} layers 1..{k}, {len(texts):,} docs", flush=True)
    res["bare"] = bare_forward(enc, texts, k, a.batch_size, a.max_length)
    print(f"[bench] ray pipeline, layer {k}", flush=True)
    res["ray"] = ray_build(corpus, work / "c_one", a.model, [k], "fp16", a.batch_size, a.max_length)
    if "multi_layer" in parts:
        print(f"[bench] ray pipeline, layers {layers3} in one pass", flush=True)
        res["ray_3_layers"] = ray_build(corpus, work / "c_three", a.model, layers3, "fp16", a.batch_size,
                                        a.max_length)
        print(f"[bench] ray pipeline, layer {max(layers3)} alone", flush=True)
        res["ray_deepest"] = (res["ray"] if max(layers3) == k else
                              ray_build(corpus, work / "c_deep", a.model, [max(layers3)], "fp16", a.batch_size,
                                        a.max_length))
    if "bytes" in parts:
        for dtype in ("fp16", "int8"):
            r = ray_build(small, work / f"c_{dtype}", a.model, [k], dtype, a.batch_size, a.max_length)
            res[f"bytes_{dtype}"] = r["bytes_per_token"][k]
    for d in ("c_one", "c_three", "c_deep", "c_fp16", "c_int8"):
        shutil.rmtree(work / d, ignore_errors=True)

    bare_tps = res["bare"]["tokens"] / res["bare"]["seconds"]
    ray_tps = res["ray"]["tokens"] / res["ray"]["seconds"]
    avg_len = res["bare"]["tokens"] / len(texts)
    flops = lower_flops_per_token(enc, k, avg_len)
    H = enc.hidden_size
    res["summary"] = {
        "bare_tokens_per_s": bare_tps, "ray_tokens_per_s": ray_tps, "throughput_ratio": ray_tps / bare_tps,
        # the same ratio per CPU second the hypervisor did not steal (reported next to the raw one, never instead)
        "steal_bare": res["bare"]["steal"], "steal_ray": res["ray"]["steal"],
        "throughput_ratio_without_steal":
            (ray_tps / (1 - res["ray"]["steal"])) / (bare_tps / (1 - res["bare"]["steal"])),
        "bare_fraction_of_peak": bare_tps * flops / 1e9 / peak32,
        "ray_fraction_of_peak": ray_tps * flops / 1e9 / peak32,
        "padded512_fp32_bytes_per_token": len(texts) * 512 * H * 4 / res["bare"]["tokens"],
        "peak_pss_gib": max(res[r]["peak_pss_gib"] for r in ("ray", "ray_3_layers") if r in res),
    }
    if "multi_layer" in parts:
        res["summary"]["multi_layer_ratio"] = res["ray_3_layers"]["seconds"] / res["ray_deepest"]["seconds"]
    if "bytes" in parts:
        res["summary"].update(fp16_bytes_per_token=res["bytes_fp16"], fp16_limit=2 * H * 1.05,
                              int8_bytes_per_token=res["bytes_int8"], int8_limit=H + 8)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"cache_{a.model}" + ("" if len(parts) == 3 else "_" + "_".join(sorted(parts)))
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
