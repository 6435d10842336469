"""The same forward passes, timed where they can run: why the cache's encoder actor computes slower than a bare loop.

    .venv/bin/python bench/forward_placement.py --model mpnet [--docs 600] [--rounds 2] [--out bench/results]

The throughput benchmark (cache_throughput.py) found mpnet's pipeline at ~0.75 of a bare loop while its encoder
actor spent nearly all its time in forward passes: the passes themselves ran slower. This runs one fixed list of
padded batches (the first DOCS clothing reviews, sorted by length, batch 64, layers 1..L/2) through
`encoders.LowerEncoder` in each placement, in rounds, and reports tokens/s and the CPU seconds the placement's
process used per 1,000 tokens (threads that spin at OpenMP barriers show up there):

- process_main: this process, its main thread (what the bare loop does);
- process_thread: this process, a second Python thread (where a threaded actor runs its calls);
- actor: a Ray actor (num_cpus=0.5, so three fit on two CPUs; Ray sets OMP_NUM_THREADS=1 as for 1), torch
  threads set to the machine's cores, calls on its main thread;
- actor_threaded: the same with max_concurrency=2 (calls on Ray's pool threads, as ShardEncoder's pool runs them);
- actor_omp: `actor` with OMP_NUM_THREADS set to the machine's cores in its environment (Ray sets it to the
  actor's num_cpus, 1, unless told);
- actor_passive: `actor` with OMP_WAIT_POLICY=PASSIVE (a thread that reaches a barrier first sleeps at once,
  instead of spinning a while; ACTIVE, spinning without end, is not a candidate: an idle actor then holds its
  cores, and it spoiled every other placement's reading here);
- process_main_load (and <actor placement>_load): process_main while another process burns LOAD of one core
  in short bursts (1 ms busy, then idle), standing in for what Ray's own processes take during a pipeline
  (driver, Ray Data's executor and helper actors, raylet, GCS, dashboard: ~0.25 of a core in
  cache_throughput.py's CPU accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import encoders, pretrained, tasks  # noqa: E402
from er_ray.batching import length_batches, pad_rows  # noqa: E402
from er_ray.cluster import connect  # noqa: E402
from machine import cpu_ticks, steal_fraction  # noqa: E402  (bench/machine.py)


def make_batches(tokenizer, docs: int, batch_size: int, max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-sorted padded batches, made as er_ray makes them (`er_ray.batching`)."""
    texts = tasks.load_task("clothing_rating").documents().slice(0, docs).column("text").to_pylist()
    ids = [np.asarray(x, np.int64) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    pad = tokenizer.pad_token_id or 0
    return [tuple(map(torch.from_numpy, pad_rows([ids[i] for i in g], pad)))
            for g in length_batches([len(x) for x in ids], batch_size)]


class Runner:
    """Holds the lower layers and times passes over the batches; the same class in this process and in actors."""

    def __init__(self, model: str, threads: int):
        torch.set_num_threads(threads)
        self.enc = pretrained.load_encoder(model)
        self.lower = encoders.LowerEncoder(self.enc.model, self.enc.num_layers // 2)

    def run(self, batches) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = 0
        with torch.inference_mode():
            for ids, mask in batches:
                self.lower(ids, mask)
                tokens += int(mask.sum())
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "tokens": tokens,
                "torch_threads": torch.get_num_threads(), "omp_env": os.environ.get("OMP_NUM_THREADS"),
                "thread": threading.current_thread().name}


def in_thread(runner: Runner, batches) -> dict:
    box = {}
    t = threading.Thread(target=lambda: box.update(runner.run(batches)), name="second-thread")
    t.start()
    t.join()
    return box


def burn(load: float, stop) -> None:
    """Busy for 1 ms, idle for the rest of a (1 ms / load) period, until `stop` is set."""
    period = 1e-3 / load
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < 1e-3:
            pass
        time.sleep(period - 1e-3)


def with_load(fn, load: float) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    p = ctx.Process(target=burn, args=(load, stop), daemon=True)
    p.start()
    time.sleep(1.0)  # the burner runs before the measurement starts
    try:
        return fn()
    finally:
        stop.set()
        p.join()


def main():
    from er_ray import console

    console.configure()  # er_ray's own console, as the CLI's: Ray's INFO lines and progress stay in its logs
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mpnet")
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", type=float, default=0.25, help="share of one core the burner takes (process_main_load)")
    ap.add_argument("--placements", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    cores = os.cpu_count()
    here = Runner(a.model, cores)
    batches = make_batches(here.enc.tokenizer, a.docs, a.batch_size, a.max_length)
    connect()
    ref = ray.put(batches)
    # num_cpus=0.5 so that three actors fit on two CPUs; Ray sets OMP_NUM_THREADS=1 for it as for num_cpus=1.
    remote = ray.remote(num_cpus=0.5)(Runner)
    # One placement at a time: only the measured one holds the cores (the others are created and then idle).
    def env(**v):
        return {"runtime_env": {"env_vars": v}}

    options = {"actor": {}, "actor_threaded": {"max_concurrency": 2}, "actor_omp": env(OMP_NUM_THREADS=str(cores)),
               "actor_passive": env(OMP_WAIT_POLICY="PASSIVE")}
    names = a.placements.split(",") if a.placements else ["process_main", "process_thread", *options,
                                                          "process_main_load"]
    actors = {name: remote.options(**opts).remote(a.model, cores) for name, opts in options.items()
              if name in names or f"{name}_load" in names}
    placements = {"process_main": lambda: here.run(batches), "process_thread": lambda: in_thread(here, batches),
                  **{name: (lambda h=h: ray.get(h.run.remote(ref))) for name, h in actors.items()},
                  "process_main_load": lambda: with_load(lambda: here.run(batches), a.load),
                  **{f"{name}_load": (lambda h=h: with_load(lambda: ray.get(h.run.remote(ref)), a.load))
                     for name, h in actors.items()}}
    placements = {name: placements[name] for name in names}
    for fn in placements.values():  # warm-up: first-call allocations, lazy inits
        fn()
    res = {"model": a.model, "docs": a.docs, "batch_size": a.batch_size, "cores": cores, "load": a.load, "runs": {}}
    for r in range(a.rounds):
        for name, fn in placements.items():
            ticks = cpu_ticks()
            out = fn()
            out["steal"] = steal_fraction(ticks, cpu_ticks())
            res["runs"].setdefault(name, []).append(out)
            print(f"[round {r}] {name:15s} {out['tokens'] / out['seconds']:7.0f} tokens/s, "
                  f"{1000 * out['cpu_seconds'] / out['tokens']:.3f} CPU s per 1k tokens, "
                  f"threads {out['torch_threads']}, OMP_NUM_THREADS={out['omp_env']}, steal {out['steal']:.1%}",
                  flush=True)
    # Medians over the rounds: identical passes vary by +-10% here even with no steal (noisy neighbours).
    res["summary"] = {name: {"tokens_per_s_median": statistics.median(o["tokens"] / o["seconds"] for o in runs),
                             "tokens_per_s_best": max(o["tokens"] / o["seconds"] for o in runs),
                             "cpu_s_per_1k_tokens_median":
                                 statistics.median(1000 * o["cpu_seconds"] / o["tokens"] for o in runs)}
                      for name, runs in res["runs"].items()}
    print(json.dumps(res["summary"], indent=1))
    out = Path(a.out) / f"forward_placement_{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
