"""What `er_ray.flops.matmul_peak` measures by matrix size, alone and beside busy processes.

MFU is a training step's model FLOP/s over this peak, measured at each run's start on its own threads. The demo
starts four single-thread runs on two cores, so the peak is often measured while other processes take turns on
the core. This runs `matmul_peak` (the best of repeated square matmuls over 0.5 s) at several sizes, in this
process with `--threads`, while `--busy` other processes each run 1024-square matmuls on one thread (0: alone).

    .venv/bin/python bench/matmul_peak.py --threads 1 --busy 0,1,3 --rounds 3 --out bench/results/matmul_peak.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _busy(stop) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a @ a


def measure(threads: int, busy: int, sizes: list[int], rounds: int) -> dict:
    import torch

    from er_ray.flops import matmul_peak

    torch.set_num_threads(threads)
    stop = mp.Event()
    procs = [mp.Process(target=_busy, args=(stop,)) for _ in range(busy)]
    for p in procs:
        p.start()
    time.sleep(1.0 if busy else 0.0)  # the busy processes running before the first measurement
    try:
        return {str(n): [round(matmul_peak(n=n) / 1e9, 1) for _ in range(rounds)] for n in sizes}
    finally:
        stop.set()
        for p in procs:
            p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--busy", default="0,1,3", help="comma-separated numbers of busy processes beside it")
    ap.add_argument("--sizes", default="256,512,768,1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    for busy in (int(b) for b in a.busy.split(",")):
        row = {"threads": a.threads, "busy": busy, "cores": os.cpu_count(),
               "gflops": measure(a.threads, busy, sizes, a.rounds)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
