"""Issue 4's training-ratio profile: one training step in a bare single process (no Ray, no DeepSpeed, no cache
reads), full fine-tuning against recycled LoRA 16 at k = 3, MiniLM, batch 32, two sequence lengths; median of 6
steps after 2 warm-up steps. Tells what the model itself allows on these cores at short and long inputs.

    .venv/bin/python bench/step_ratio.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from er_ray import encoders  # noqa: E402
from er_ray.model import ModelSpec, TaskModel  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
for L in (16, 96):
    res = {}
    for arm in ("finetune", "recycled"):
        enc = encoders.load_encoder("minilm")
        spec = ModelSpec(cut_layer=3, adapter="full" if arm == "finetune" else "lora", adapter_size=16,
                         num_labels=6, full_finetune=arm == "finetune", source="text" if arm == "finetune" else "cache")
        m = TaskModel(enc.model, spec).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        mask = torch.ones(32, L, dtype=torch.long)
        x = torch.randint(1000, 2000, (32, L)) if arm == "finetune" else torch.randn(32, L, 384)
        y = torch.randint(0, 6, (32,))
        ts = []
        for i in range(8):
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(m(x, mask), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            ts.append(time.perf_counter() - t)
        res[arm] = sorted(ts[2:])[len(ts[2:]) // 2]
    print(f"len {L}: finetune {res['finetune']*1000:.0f} ms/step, recycled {res['recycled']*1000:.0f} ms/step, "
          f"ratio {res['finetune']/res['recycled']:.2f}", flush=True)
