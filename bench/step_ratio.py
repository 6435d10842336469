"""Issue 4's training-ratio profile: one training step in a bare single process (no Ray, no DeepSpeed, no cache
reads), full fine-tuning against recycled LoRA 16 at k = 3, MiniLM, batch 32, two sequence lengths; median of 6
steps after 2 warm-up steps (by default). Tells what the model itself allows on these cores at short and long inputs.

    .venv/bin/python bench/step_ratio.py
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import pretrained  # noqa: E402
from er_ray.model import ModelSpec, TaskModel  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
ap.add_argument("--lengths", default="16,96", help="sequence lengths in tokens (default: 16,96)")
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--steps", type=int, default=8, help="steps per arm; the first 2 are warm-up (default 8)")
a = ap.parse_args()
if a.steps < 3:
    ap.error("--steps must be at least 3 (2 warm-up steps, then the timed ones)")
torch.set_num_threads(2)
torch.manual_seed(0)
for L in (int(x) for x in a.lengths.split(",")):
    res = {}
    for arm in ("finetune", "recycled"):
        enc = pretrained.load_encoder("minilm")  # fresh weights per arm: the LoRA arm wraps the layers in place
        spec = ModelSpec(cut_layer=3, adapter="full" if arm == "finetune" else "lora", adapter_size=16,
                         num_labels=6, full_finetune=arm == "finetune", source="text" if arm == "finetune" else "cache")
        m = TaskModel(enc.model, spec).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        mask = torch.ones(a.batch_size, L, dtype=torch.long)
        x = (torch.randint(1000, 2000, (a.batch_size, L)) if arm == "finetune"
             else torch.randn(a.batch_size, L, enc.hidden_size))
        y = torch.randint(0, 6, (a.batch_size,))
        ts = []
        for _ in range(a.steps):
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(m(x, mask), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            ts.append(time.perf_counter() - t)
        timed = sorted(ts[2:])
        res[arm] = timed[len(timed) // 2]
    print(f"len {L}: finetune {res['finetune']*1000:.0f} ms/step, recycled {res['recycled']*1000:.0f} ms/step, "
          f"ratio {res['finetune']/res['recycled']:.2f}", flush=True)
