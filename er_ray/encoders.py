"""Encoders split exactly at a cut layer k (pure torch: loading models by name is `er_ray.pretrained`).

    lower = LowerEncoder(model, cut_layer=k)     # embeddings + layers 1..k      -> hidden states h_k
    upper = UpperEncoder(model, cut_layer=k)     # layers k+1..L + the pooler    <- h_k and the attention mask
    upper(lower(ids, mask), mask)  ==  model(ids, mask)          (bit-identical in fp32, checked for every k)

The parts hold the loaded model's own modules (no copies) and register only the weights they run, so
`upper.parameters()` is exactly what a recycled task model may train. Each architecture differs only in where its
layers live and what per-batch inputs they need (mask format, MPNet's position bias, DeBERTa's relative positions
and conv): one `Architecture` subclass each, registered by `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ErRayError, OptionsError

# ---------------------------------------------------------------------------------------------------------------
# Architectures


class UnsupportedArchitecture(ErRayError, ValueError):
    pass


class Architecture:
    """How one model family embeds tokens and runs its layers. Subclass and `register` to add one."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Inside one layer: where LoRA goes (every linear map: attention q, k, v, output and both feed-forward maps;
    # with only q and v, LoRA on 3 upper layers of MiniLM trailed full fine-tuning by ~3 points, see BENCHMARKS.md)
    # and the two projections a Houlsby bottleneck adapter follows (attention output, feed-forward output), as
    # module paths relative to the layer.
    lora_targets: ClassVar[tuple[str, ...]] = ("attention.self.query", "attention.self.key", "attention.self.value",
                                               "attention.output.dense", "intermediate.dense", "output.dense")
    adapter_points: ClassVar[tuple[str, ...]] = ("attention.output.dense", "output.dense")

    def layers(self, m: nn.Module) -> nn.ModuleList:
        return m.encoder.layer

    def embedding_modules(self, m: nn.Module) -> dict[str, nn.Module]:
        return {"embeddings": m.embeddings}

    def embed(self, m: nn.Module, input_ids, attention_mask, token_type_ids):
        return m.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def layer_context(self, m: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Per-batch inputs every layer needs, rebuilt from the hidden states and the 2-D 0/1 mask alone."""
        from transformers.masking_utils import create_bidirectional_mask

        # Built from the same config the layers dispatch on (sdpa: bool mask, eager: additive float mask), so the
        # split is bit-identical to the full forward. No padding in the batch gives None, which layers accept.
        return {"mask": create_bidirectional_mask(config=m.config, inputs_embeds=h, attention_mask=attention_mask)}

    def run_layer(self, m, index: int, layer: nn.Module, h, ctx: dict[str, Any]):
        return _first(layer(h, ctx["mask"]))

    def shared_modules(self, m: nn.Module, start: int, end: int) -> dict[str, nn.Module]:
        """Modules besides the layers that running layers start..end-1 uses (registered so they move with .to())."""
        return {}

    def pooler(self, m: nn.Module) -> nn.Module | None:
        return getattr(m, "pooler", None)


class Bert(Architecture):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")

    def embedding_modules(self, m):
        mods = {"embeddings": m.embeddings}
        if hasattr(m, "embeddings_project"):  # ELECTRA when embedding_size != hidden_size
            mods["embeddings_project"] = m.embeddings_project
        return mods

    def embed(self, m, input_ids, attention_mask, token_type_ids):
        # RoBERTa derives pad-aware position ids from input_ids: pass the ids, never inputs_embeds.
        h = m.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if hasattr(m, "embeddings_project"):
            h = m.embeddings_project(h)
        return h


class DistilBert(Architecture):
    model_types = ("distilbert",)
    lora_targets = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                    "ffn.lin2")
    adapter_points = ("attention.out_lin", "ffn.lin2")

    def layers(self, m):
        return m.transformer.layer

    def embed(self, m, input_ids, attention_mask, token_type_ids):
        return m.embeddings(input_ids)

    def pooler(self, m):
        return None  # DistilBERT has none; its classifier reads h[:, 0] through pre_classifier.


class MPNet(Architecture):
    model_types = ("mpnet",)
    lora_targets = ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                    "intermediate.dense", "output.dense")
    adapter_points = ("attention.attn.o", "output.dense")

    def embed(self, m, input_ids, attention_mask, token_type_ids):
        return m.embeddings(input_ids=input_ids)

    def layer_context(self, m, h, attention_mask):
        ctx = super().layer_context(m, h, attention_mask)
        # Relative position bias from sequence length only; must be called exactly like the model does.
        ctx["position_bias"] = m.encoder.compute_position_bias(h)
        return ctx

    def run_layer(self, m, index, layer, h, ctx):
        return _first(layer(h, ctx["mask"], ctx["position_bias"]))

    def shared_modules(self, m, start, end):
        return {"relative_attention_bias": m.encoder.relative_attention_bias} if end > start else {}


class DebertaV2(Architecture):
    model_types = ("deberta-v2",)
    lora_targets = ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                    "attention.output.dense", "intermediate.dense", "output.dense")

    def embed(self, m, input_ids, attention_mask, token_type_ids):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # DeBERTa zeroes padded rows of the embeddings with the mask.
        return m.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)

    def layer_context(self, m, h, attention_mask):
        enc = m.encoder  # DeBERTa never calls create_bidirectional_mask: it has its own (B,1,T,T) 0/1 mask.
        return {"mask": enc.get_attention_mask(attention_mask), "relative_pos": enc.get_rel_pos(h),
                "rel_embeddings": enc.get_rel_embedding(), "attention_mask_2d": attention_mask}

    def run_layer(self, m, index, layer, h, ctx):
        out, _ = layer(h, ctx["mask"], query_states=None, relative_pos=ctx["relative_pos"],
                       rel_embeddings=ctx["rel_embeddings"])
        if index == 0 and m.encoder.conv is not None:  # v2-xlarge style conv, applied after layer 0 only:
            out = m.encoder.conv(h, out, ctx["attention_mask_2d"])  # its input is the layer-0 input
        return out

    def shared_modules(self, m, start, end):
        enc, mods = m.encoder, {}
        if end > start and getattr(enc, "relative_attention", False):
            mods["rel_embeddings"] = enc.rel_embeddings
            if "layer_norm" in enc.norm_rel_ebd:
                mods["rel_layer_norm"] = enc.LayerNorm
        if start == 0 < end and enc.conv is not None:
            mods["conv"] = enc.conv
        return mods

    def pooler(self, m):
        return None  # The ContextPooler lives in DebertaV2ForSequenceClassification, not the base model.


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for t in arch.model_types:
        ARCHITECTURES[t] = arch
    return arch


for _arch in (Bert(), DistilBert(), MPNet(), DebertaV2()):
    register(_arch)


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"er_ray cannot split a {model_type!r} model ({type(model).__name__}); supported architectures: "
            f"{', '.join(supported_architectures())}. Add one with er_ray.encoders.register(Architecture subclass).")
    return ARCHITECTURES[model_type]


def base_model(model: nn.Module) -> nn.Module:
    """The bare encoder inside a task model (BertForSequenceClassification -> BertModel)."""
    inner = getattr(model, "base_model", model)
    return model if inner is None else inner


def num_layers(model: nn.Module) -> int:
    m = base_model(model)
    return len(architecture_of(m).layers(m))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------------
# The split


class _Part(nn.Module):
    """Layers start..end-1 of a model (0-based), holding the model's own modules."""

    def __init__(self, model: nn.Module, start: int, end: int):
        super().__init__()
        m = base_model(model)
        self.arch = architecture_of(m)
        n = len(self.arch.layers(m))
        if not 0 <= start <= end <= n:
            raise ValueError(f"layers {start}..{end} out of range for a {n}-layer {m.config.model_type} model "
                             f"(cut layers go from 0 = embeddings only to {n} = all layers)")
        object.__setattr__(self, "_model", m)  # not a submodule: a part owns only the weights it runs
        self.config = m.config
        self.start, self.end = start, end
        self.layer = nn.ModuleList(self.arch.layers(m)[start:end])  # same module objects: weights shared
        self.shared = nn.ModuleDict(self.arch.shared_modules(m, start, end))

    def run_layers(self, h: torch.Tensor, attention_mask: torch.Tensor, stop_at: tuple[int, ...] = ()):
        """Run this part's layers; return the output and, for each absolute layer index in stop_at, h there."""
        taken = {self.start: h} if self.start in stop_at else {}
        if self.end > self.start:
            ctx = self.arch.layer_context(self._model, h, attention_mask)
            for i, layer in zip(range(self.start, self.end), self.layer):
                h = self.arch.run_layer(self._model, i, layer, h, ctx)
                if i + 1 in stop_at:
                    taken[i + 1] = h
        return h, taken


class LowerEncoder(_Part):
    """Embeddings + layers 1..cut_layer: raw tokens -> the hidden states that er_ray caches."""

    def __init__(self, model: nn.Module, cut_layer: int):
        super().__init__(model, 0, cut_layer)
        self.cut_layer = cut_layer
        self.embeddings = nn.ModuleDict(self.arch.embedding_modules(self._model))

    def forward(self, input_ids, attention_mask, token_type_ids=None, cut_layers: tuple[int, ...] | None = None):
        """Hidden states at cut_layer, or a dict {k: h_k} for several cut layers from one pass."""
        h = self.arch.embed(self._model, input_ids, attention_mask, token_type_ids)
        out, taken = self.run_layers(h, attention_mask, stop_at=tuple(cut_layers or ()))
        if cut_layers is None:
            return out
        missing = [k for k in cut_layers if k not in taken]
        if missing:
            raise ValueError(f"cut layers {missing} are deeper than this lower encoder's {self.cut_layer}")
        return taken


class MiddleEncoder(_Part):
    """Layers from_layer+1..to_layer: derives a deeper cache from a shallower one without touching raw text."""

    def __init__(self, model: nn.Module, from_layer: int, to_layer: int):
        super().__init__(model, from_layer, to_layer)

    def forward(self, hidden_states, attention_mask):
        return self.run_layers(hidden_states.to(_dtype(self, hidden_states)), attention_mask)[0]


@dataclass
class UpperOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None


class UpperEncoder(_Part):
    """Layers cut_layer+1..L and the model's pooler: cached hidden states + mask -> the full model's output."""

    def __init__(self, model: nn.Module, cut_layer: int):
        super().__init__(model, cut_layer, len(architecture_of(base_model(model)).layers(base_model(model))))
        self.cut_layer = cut_layer
        self.pooler = self.arch.pooler(self._model)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> UpperOutput:
        h, _ = self.run_layers(hidden_states.to(_dtype(self, hidden_states)), attention_mask)
        return UpperOutput(h, self.pooler(h) if self.pooler is not None else None)


def _dtype(part: nn.Module, like: torch.Tensor) -> torch.dtype:
    """Cached states may be fp16/bf16; run in the dtype of the part's weights (autocast still applies)."""
    p = next(part.parameters(), None)
    return p.dtype if p is not None else like.dtype


def split(model: nn.Module, cut_layer: int) -> tuple[LowerEncoder, UpperEncoder]:
    """Split at cut_layer (0 = after the embeddings, L = after the last layer); both parts share the model."""
    return LowerEncoder(model, cut_layer), UpperEncoder(model, cut_layer)


def mask_from_lengths(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """2-D 0/1 attention mask (int64) for right-padded rows of the given real lengths."""
    t = int(max_len if max_len is not None else lengths.max())
    return (torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]).long()


def default_cut_layer(num_layers: int, task_type: str | None = None) -> int:
    """The paper's 50% cut: half the layers (rounded down); for extractive question answering its 25% (at least
    layer 1). The paper finds QA loses more at half and caches a quarter; er_ray's SQuAD runs agree (MiniLM, 3 seeds:
    the whole upper layers at k = 1 test F1 0.499 against fine-tuning's 0.432, at k = 3 0.432; BENCHMARKS.md)."""
    if task_type == "question_answering":
        return max(1, num_layers // 4)
    return num_layers // 2


def check_cut_layer(k: int, num_layers: int, model: str = "the model", allow_last: bool = False) -> int:
    """A cut layer a task model can run above: 0 (embeddings only) to L-1; L too where nothing trains above the
    cut (a cache of the last layer). The one check every verb uses."""
    top = num_layers if allow_last else num_layers - 1
    if not 0 <= k <= top:
        raise OptionsError(f"--cut-layer {k} out of range: {model} has layers 0..{top} to cut at")
    return k
