# How to run: python probe.py minilm|mpnet (per-layer binary entity probe; it also saves the last and
# middle layers' features with their 21 tags to <model>.pt);
# python head.py minilm|mpnet trains a fresh 21-tag head on them as er_ray would (AdamW, ~620 words per batch,
# 64 steps). Diagnostics for BENCHMARKS.md.
"""Head-only training on frozen features, as our head sees them: how fast does a fresh Linear learn wnut16 tags?"""

import sys, torch

torch.manual_seed(0)
torch.set_num_threads(1)
d = torch.load(sys.argv[1] + ".pt")
nl = int(max(d["yt"].max(), d["yd"].max())) + 1
for li, lname in ((0, "last"), (1, "mid")):
    Xt, Xd, yt, yd = d["Xt"][li], d["Xd"][li], d["yt"], d["yd"]
    for std in (False, True):
        a, b = Xt, Xd
        if std:
            mu, sd = a.mean(0), a.std(0) + 1e-5
            a, b = (a - mu) / sd, (b - mu) / sd
        for lr in (1e-3, 3e-3, 1e-2):
            torch.manual_seed(0)
            head = torch.nn.Linear(a.shape[1], nl)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
            n = len(yt)
            bs = 620  # ~32 tweets of ~19.5 words
            steps = 0
            for ep in range(2):
                perm = torch.randperm(n)
                for i in range(0, n, bs):
                    idx = perm[i : i + bs]
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(head(a[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                    steps += 1
            with torch.no_grad():
                p = head(b).argmax(1)
                tl = torch.nn.functional.cross_entropy(head(a), yt).item()
            ent_p, ent_y = p > 0, yd > 0
            tp = (ent_p & ent_y & (p == yd)).sum().item()
            prec = tp / max(1, ent_p.sum().item())
            rec = tp / max(1, ent_y.sum().item())
            print(
                f"{sys.argv[1]} {lname} std={std} lr={lr:g} steps={steps}: train loss {tl:.3f}, "
                f"dev tagged {ent_p.sum().item()}, exact-tag F1 {2 * prec * rec / max(1e-9, prec + rec):.3f}"
            )
