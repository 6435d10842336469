"""Does glibc's malloc cost training steps page faults, and would a raised mmap threshold remove them?

Inference batches are cut under glibc's 32 MiB dynamic mmap ceiling (er_ray.batching); training batches are a
hyperparameter and cannot be. This measures training steps of a TaskModel (forward, backward, AdamW) with and
without `mallopt(M_MMAP_THRESHOLD, 1 GiB)` + `mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)` (the process keeps its freed
blocks instead of returning them to the kernel), in the main thread and in a second thread: Ray Train V2 runs the
training function in a thread of its worker (`thread_runner.py`), and glibc serves threads from other arenas,
whose heaps are at most 64 MiB. Each arm runs in its own process; minor page faults and system seconds are the
whole process's (getrusage), per step.

    .venv/bin/python bench/train_allocator.py --model minilm --batch 32 --length 128 --steps 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ARM = r"""
import ctypes, json, resource, sys, threading, time
mode, where, model_name, source, batch, length, steps = sys.argv[1:8]
batch, length, steps = int(batch), int(length), int(steps)
if mode == "mallopt":
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
import torch
torch.set_num_threads(2)
torch.manual_seed(0)
from er_ray import pretrained
from er_ray.model import ModelSpec, TaskModel
enc = pretrained.load_encoder(model_name)
k = enc.model.config.num_hidden_layers // 2
spec = ModelSpec(cut_layer=k, adapter="full", num_labels=2, source=source, full_finetune=source == "text")
model = TaskModel(enc.model, spec).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
mask = torch.ones(batch, length, dtype=torch.long)
x = torch.randn(batch, length, enc.model.config.hidden_size) if source == "cache" else \
    torch.randint(1000, 20000, (batch, length))
y = torch.randint(0, 2, (batch,))
out = {}
def step():
    torch.nn.functional.cross_entropy(model(x, mask), y).backward()
    opt.step()
    opt.zero_grad()
def run():
    for _ in range(2):
        step()
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(seconds=(time.perf_counter() - t) / steps, minflt=(r1.ru_minflt - r0.ru_minflt) / steps,
               sys=(r1.ru_stime - r0.ru_stime) / steps, user=(r1.ru_utime - r0.ru_utime) / steps)
if where == "thread":
    th = threading.Thread(target=run)
    th.start()
    th.join()
else:
    run()
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--source", default="cache", choices=["cache", "text"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for r in range(a.rounds):
        for where in ("main", "thread"):
            for mode in ("plain", "mallopt"):  # alternated within every round
                p = subprocess.run([sys.executable, "-c", ARM, mode, where, a.model, a.source, str(a.batch),
                                    str(a.length), str(a.steps)], capture_output=True, text=True, check=True)
                res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
                rows.append({"round": r + 1, "where": where, "mode": mode, **res})
                print(f"round {r + 1} {where:6} {mode:7}: {res['seconds']:.3f} s/step, {res['minflt']:,.0f} "
                      f"minor faults/step, system {res['sys']:.3f} s/step, user {res['user']:.3f} s/step", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
