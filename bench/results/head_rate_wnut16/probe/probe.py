"""Diagnostic: do frozen token features at each layer separate wnut16 entities (binary: entity vs O)?"""

import sys, torch, pyarrow.parquet as pq
from transformers import AutoTokenizer, AutoModel

torch.manual_seed(0)
torch.set_num_threads(1)
name = sys.argv[1]
path = f"/root/.cache/er_ray/models/{name}"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
rows = pq.read_table("/root/.cache/er_ray/tasks/wnut16/data.parquet").to_pylist()
train = [r for r in rows if r["split"] == "train"][:1000]
dev = [r for r in rows if r["split"] == "dev"]


TAGS = {"O": 0}  # every tag an index ("O" is 0): head.py trains on them; the probe asks entity or not


def feats(rs):
    X, y = [], []
    for i in range(0, len(rs), 32):
        b = rs[i : i + 32]
        enc = tok(
            [r["tokens"] for r in b],
            is_split_into_words=True,
            truncation=True,
            max_length=128,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        for j, r in enumerate(b):
            seen = set()
            idx = []
            for t, w in enumerate(enc.word_ids(j)):
                if w is not None and w not in seen:
                    seen.add(w)
                    idx.append(t)
                    y.append(TAGS.setdefault(r["tags"][w], len(TAGS)))
            f = [h[j, idx] for h in hs]
            X.append(f)
    X = [torch.cat(layer) for layer in zip(*X)]
    return X, torch.tensor(y)


Xt, yt = feats(train)
Xd, yd = feats(dev)
torch.save({"Xt": [Xt[-1], Xt[len(Xt) // 2]], "yt": yt, "Xd": [Xd[-1], Xd[len(Xd) // 2]], "yd": yd}, f"{name}.pt")
yt, yd = (yt > 0).float(), (yd > 0).float()  # the probe: entity or "O"
print(name, "train tokens", len(yt), "entity share", yt.mean().item())
for layer in range(len(Xt)):
    a, b = Xt[layer], Xd[layer]
    mu, sd = a.mean(0), a.std(0) + 1e-5
    a, b = (a - mu) / sd, (b - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, c], lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, yt) + 1e-3 * w.square().sum()
        loss.backward()
        opt.step()
    p = (b @ w + c) > 0
    tp = (p & (yd > 0)).sum().item()
    prec = tp / max(1, p.sum().item())
    rec = tp / max(1, (yd > 0).sum().item())
    f1 = 2 * prec * rec / max(1e-9, prec + rec)
    cos = torch.nn.functional.normalize(Xd[layer][:2000], dim=1)
    aniso = (cos @ cos.T).mean().item()
    print(
        f"{name} layer {layer:2d}: dev entity-token F1 {f1:.3f} (P {prec:.2f} R {rec:.2f}), "
        f"mean cosine {aniso:.2f}, norm {Xd[layer].norm(dim=1).mean():.1f}"
    )
