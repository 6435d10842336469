"""The model's tokenizer as the cache pipeline uses it, and its fingerprint (half of a cache's key).

Tokenizing workers use the Rust tokenizer itself: importing `transformers` (or torch) costs seconds in every
worker process. The ids are the same as the transformers tokenizer's (tests/test_models.py checks it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ErRayError


class TokenizerError(ErRayError):
    pass


def fast_tokenizer(folder: str | Path):
    """The model's Rust tokenizer (`tokenizers.Tokenizer`). Tokenizing workers import only this: importing
    `transformers` (or torch) costs seconds in every worker process and slowed the encoder actors' start."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{folder}: er_ray needs a fast (Rust) tokenizer; this model only has a slow one")
    return tok.backend_tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised pipeline (vocab, normaliser, special tokens, post-processor),
    with padding and truncation settings left out (they are per-call, and max length is recorded on its own)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()



_TOKENIZERS: dict[tuple, Any] = {}


def tokenizer_for(folder: str, max_length: int):
    """The Rust tokenizer, no padding, cut at max_length (once per worker process)."""
    if (folder, max_length) not in _TOKENIZERS:
        tok = fast_tokenizer(folder)
        tok.no_padding()
        tok.enable_truncation(max_length)
        _TOKENIZERS[folder, max_length] = tok
    return _TOKENIZERS[folder, max_length]


def qa_tokenizer_for(folder: str, max_length: int, stride: int):
    """The Rust tokenizer for question + context pairs: the context (only) cut into windows of max_length tokens
    that overlap by `stride`; each encoding's `overflowing` holds the windows after its first (er_ray.qa.windows)."""
    if (folder, max_length, stride) not in _TOKENIZERS:
        tok = fast_tokenizer(folder)
        tok.no_padding()
        tok.enable_truncation(max_length, stride=stride, strategy="only_second")
        _TOKENIZERS[folder, max_length, stride] = tok
    return _TOKENIZERS[folder, max_length, stride]
