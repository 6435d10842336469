"""Task models: the pretrained layers k+1..L, small adapters, and a task head, fed from the layer-k cache.

    TaskModel(encoder, ModelSpec(cut_layer=3, adapter="lora", adapter_size=16, ...))   # recycled: cache in
    TaskModel(encoder, ModelSpec(cut_layer=0, adapter="full", source="text", ...))       # full_finetune: text in

Adapters (each with an `adapter_size`):
- `lora`: PEFT LoRA on every linear map (attention q, k, v, output; feed-forward in, out) of the upper layers
  only (size = rank). PEFT injects it into the loaded model itself, so the adapter saves and loads with plain
  `peft` (`PeftModel.from_pretrained`).
- `bottleneck`: Houlsby adapters, two per upper layer (after the attention output and the feed-forward output
  projections, before the residual LayerNorm), width = size; the layer norms train too, as in Houlsby et al.
- `full`: every weight of the upper layers trains (the paper's first variant; no size).
The head pools the way the encoder was trained to pool (mean over real tokens for sentence-transformers models,
the first token otherwise) for sequence classification, labels every token for token classification, or
scores every token as the start and the end of an answer span for extractive QA (`span_loss`; decoding is
er_ray.qa's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from . import encoders
from .errors import OptionsError
from .options import ADAPTERS, Adapter

IGNORE = -100  # the label of tokens no loss or score counts (special tokens, later subwords, padding)


@dataclass
class ModelSpec:
    """What a task model is, in the paper's words; saved beside its weights as task.json."""

    cut_layer: int
    adapter: Adapter = "lora"
    adapter_size: int = 16
    task_type: Literal["classification", "token_classification", "question_answering"] = "classification"
    num_labels: int = 2
    """classes, tags, or 2 for question answering (a start and an end logit per token)"""
    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = 0.1
    source: Literal["cache", "text"] = "cache"
    """cache: the model reads layer-k states; text: it runs layers 1..k itself (frozen unless full_finetune)"""
    full_finetune: bool = False
    """every weight trains, embeddings included (the baseline the paper compares with; implies text input)"""

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise OptionsError(f"adapter must be one of {', '.join(ADAPTERS)}, not {self.adapter!r}")
        if self.adapter != "full" and self.adapter_size < 1:
            raise OptionsError(f"adapter_size must be at least 1 for a {self.adapter} adapter")
        if self.full_finetune:
            self.source, self.adapter = "text", "full"

    def to_json(self) -> dict:
        return asdict(self)


class Bottleneck(nn.Module):
    """x + up(gelu(down(x))), up initialised to zero: the adapted model starts as the pretrained one.

    `down` keeps nn.Linear's kaiming-uniform init, as PEFT's LoRA A does. Trap: a near-zero `down` as well (we had
    std 1e-3) starts at a saddle: up's gradient is scaled by down's tiny outputs and down's gradient is zero until
    up grows, so the adapter learned as if at a far lower learning rate."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(hidden, width), nn.Linear(width, hidden), nn.GELU()
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class Adapted(nn.Module):
    """A projection followed by its bottleneck adapter (it then feeds dropout + residual + LayerNorm as before)."""

    def __init__(self, proj: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.proj, self.adapter = proj, adapter

    def forward(self, x):
        return self.adapter(self.proj(x))


def add_bottlenecks(layers: nn.ModuleList, points: tuple[str, ...], hidden: int, width: int) -> None:
    for layer in layers:
        for path in points:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            setattr(parent, name, Adapted(getattr(parent, name), Bottleneck(hidden, width)))


def add_lora(model: nn.Module, spec: ModelSpec):
    """PEFT LoRA on the linear maps of layers cut_layer+1..L only; returns the PeftModel (it wraps `model` in place)."""
    from peft import LoraConfig, get_peft_model

    arch = encoders.architecture_of(model)
    n = encoders.num_layers(model)
    config = LoraConfig(r=spec.adapter_size, lora_alpha=2 * spec.adapter_size, lora_dropout=0.0, bias="none",
                        target_modules=list(arch.lora_targets), layers_to_transform=list(range(spec.cut_layer, n)),
                        layers_pattern="layer")
    import warnings

    with warnings.catch_warnings():
        # peft 0.x asks `model.is_gradient_checkpointing`, which this transformers deprecates with a FutureWarning
        # on every model it wraps: noise on a user's console (predict builds models on its own process)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


class TaskModel(nn.Module):
    """Upper layers (+ adapter) + head. forward(hidden_states at layer k | input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        m = encoders.base_model(model)
        n = encoders.num_layers(m)
        if not 0 <= spec.cut_layer <= n:
            raise OptionsError(f"cut layer {spec.cut_layer} out of range 0..{n}")
        if spec.adapter != "full" and spec.cut_layer == n:
            raise OptionsError(f"cut layer {n} leaves no upper layer for a {spec.adapter} adapter")
        self.spec = spec
        for p in m.parameters():
            p.requires_grad_(False)
        self.peft = None
        if spec.adapter == "lora":
            object.__setattr__(self, "peft", add_lora(m, spec))  # not a submodule: the layers below hold it
        self.upper = encoders.UpperEncoder(m, spec.cut_layer)
        if spec.adapter == "bottleneck":
            arch = encoders.architecture_of(m)
            add_bottlenecks(self.upper.layer, arch.adapter_points, m.config.hidden_size, spec.adapter_size)
            for name, p in self.upper.layer.named_parameters():
                if "adapter" in name or "LayerNorm" in name or "layer_norm" in name:
                    p.requires_grad_(True)
        elif spec.adapter == "full":
            for p in self.upper.layer.parameters():
                p.requires_grad_(True)
        self.lower = None
        if spec.source == "text":
            self.lower = encoders.LowerEncoder(m, spec.cut_layer)
            if spec.full_finetune:
                for p in self.lower.parameters():
                    p.requires_grad_(True)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(m.config.hidden_size, spec.num_labels)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.lower(inputs, attention_mask) if self.lower is not None else inputs
        h, _ = self.upper.run_layers(h.to(self.classifier.weight.dtype), attention_mask)  # no pooler: unused
        if self.spec.task_type != "classification":  # a logit per token and tag (or per token: start, end)
            return self.classifier(self.dropout(h))
        if self.spec.pooling == "mean":
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        else:
            pooled = h[:, 0]
        return self.classifier(self.dropout(pooled))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changed: adapters, head (and for full fine-tuning, the weights it trained)."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def param_groups(self, learning_rate: float, head_learning_rate: float | None) -> list[dict]:
        """The optimizer's groups: one, or with a head rate, what trains below the head at `learning_rate` and the
        head at its own (the body first: its rate is the one the logs report; the schedule scales both alike).
        One group without a head rate, as before it existed: a checkpoint's optimizer state must match the
        groups of the run that resumes it."""
        trains = [p for p in self.parameters() if p.requires_grad]
        if head_learning_rate is None:
            return [{"params": trains, "lr": learning_rate}]
        head = {id(p) for p in self.classifier.parameters()}
        body = [p for p in trains if id(p) not in head]
        return ([{"params": body, "lr": learning_rate}] if body else []) + \
            [{"params": list(self.classifier.parameters()), "lr": head_learning_rate}]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold LoRA into the weights for inference (exact up to float rounding; unmerged LoRA costs time)."""
        if self.peft is not None:
            self.peft.merge_adapter()


def span_loss(logits: torch.Tensor, attention_mask: torch.Tensor, start: torch.Tensor,
              end: torch.Tensor) -> torch.Tensor:
    """Extractive QA's loss: the mean of the cross-entropies of the answer's start and end token over each window's
    real tokens (padding can be neither). logits [b, t, 2]; start, end [b] (0, the first token, where the window
    holds no answer)."""
    pad = attention_mask == 0
    s, e = (logits[..., i].float().masked_fill(pad, torch.finfo(torch.float32).min) for i in (0, 1))
    return (nn.functional.cross_entropy(s, start) + nn.functional.cross_entropy(e, end)) / 2


def token_labels(word_ids: list[int], word_tags: list[int], ignore: int = IGNORE) -> list[int]:
    """First-subword labelling: a word's tag goes on its first token; other subwords and specials are ignored."""
    out, prev = [], None
    for w in word_ids:
        out.append(ignore if w < 0 or w == prev or w >= len(word_tags) else word_tags[w])
        prev = w if w >= 0 else prev
    return out
