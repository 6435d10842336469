"""The layer-k activation cache: built once on Ray Data, kept as Parquet, trusted for months.

Layout (a contract: other tools read it with plain pyarrow or DuckDB; nothing is pickled):

    DIR/layer=<k>/manifest.json         the commit point: readers list shards from it, never by glob
    DIR/layer=<k>/part-<hash>.parquet   one row per document, no padding stored

Columns of a shard: `id` string; `length` int32 (real tokens); `hidden` the layer-k states as
`list<fixed_size_binary[B]>`, one value per real token holding its H numbers as raw little-endian bytes of the
manifest's dtype (fp32: B = 4H, fp16: IEEE half, B = 2H, bf16: bfloat16, B = 2H, int8: B = H with a `scale`
`list<float>` column, value = int8 * scale per token); token-classification corpora add `word_ids`
`list<int32>` (-1 for special tokens), mapping tokens back to words. Question answering caches (manifest
`question_answering: true`, format version 2) hold one row per *window* of a question + context pair: `id`
`<question id>#<window>`, `question_id` string, and `offset_start`, `offset_end` `list<int32>` (the characters of
the context each token covers; -1 for the question's tokens and special tokens); the manifest's `stride` is the
tokens consecutive windows share, its `rows` count windows. Decoding with plain numpy:
`np.frombuffer(col.values.buffers()[1], np.float16).reshape(-1, H)` (and `col.offsets` for the rows).
Why raw bytes rather than `list<fixed_size_list<halffloat>>`: Parquet encodes nested floats value by value
(repetition levels for every number), which made writing 6x slower; Arrow and Parquet have no bf16 or scaled
int8 type anyway, so one uniform layout serves all four dtypes.

One DIR holds one model, tokenizer, max length and dtype; any cut layers. A shard's rows are a fixed, planned
set of documents and its name is derived from their ids, so a re-run, a resumed run and an uninterrupted run
write the same shards with the same bytes. A shard is written whole (locally under a temporary name renamed when
complete; on an object store in one upload under its final name, as there is no rename), then recorded in the
manifest (rewritten atomically after every shard): the manifest is the commit point, a crash leaves nothing
half-visible, and shard files the manifest does not name are ignored by readers and removed by the next build.

DIR is a local path or a filesystem URI (`s3://bucket/prefix?endpoint_override=...`; see `er_ray.storage`).

This module is what a reader needs: the manifest, opening a cache (refused if it was computed differently), reading
it, verifying it. Building one is `er_ray.cache_build`; the activations' encoding is `er_ray.codec`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .codec import decode_rows
from .errors import ErRayError
from .options import DTYPES  # noqa: F401  (the dtypes a cache may hold)

FORMAT = "er_ray.cache"
FORMAT_VERSION = 2  # 2: question answering caches (rows are windows); others are still written as 1
# What a reader must agree with before it may use a cache (the fingerprint of the computation).
KEY_FIELDS = ("weights_sha256", "architecture", "cut_layer", "tokenizer_fingerprint", "max_length")


class CacheError(ErRayError):
    pass


class CacheMismatch(CacheError):
    pass


_CHECKED: set[tuple[str, int, int]] = set()  # shard file versions found whole in this process


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def layer_dir(root: str | Path, cut_layer: int) -> str:
    """Location (local path or URI) of a cut layer's cache."""
    return storage.join(root, f"layer={cut_layer}")


def versions() -> dict[str, str]:
    from importlib.metadata import version  # no imports of torch or transformers on the driver

    from . import __version__

    return {"er_ray": __version__, **{p: version(p) for p in ("ray", "pyarrow", "torch", "transformers")}}


@dataclass
class Manifest:
    """manifest.json of one cut layer's cache."""

    model: str
    weights_sha256: str
    architecture: str
    num_layers: int
    hidden_size: int
    cut_layer: int
    dtype: str
    max_length: int
    tokenizer_fingerprint: str
    token_classification: bool = False
    question_answering: bool = False
    """rows are windows of question + context pairs (id `<question id>#<window>`), not documents"""
    stride: int | None = None
    """question answering: the tokens consecutive windows share"""
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def document_column(self) -> str:
        """The column naming a row's document: shards are planned, named and checked by it. For question
        answering a row is a window (`<question id>#<w>`) and its document the question."""
        return "question_id" if self.question_answering else "id"

    @property
    def real_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def truncated(self) -> int:
        return sum(s.get("truncated", 0) for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)

    @property
    def corpus_fingerprint(self) -> str:
        """sha256 over the shards' document hashes (id + text), independent of shard order."""
        h = hashlib.sha256()
        for d in sorted(s["docs_sha256"] for s in self.shards):
            h.update(d.encode())
        return h.hexdigest()

    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KEY_FIELDS}

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d.update(rows=self.rows, real_tokens=self.real_tokens, truncated=self.truncated, bytes=self.bytes,
                 corpus_fingerprint=self.corpus_fingerprint,
                 format_version=2 if self.question_answering else 1)  # an older er_ray reads what it can
        order = ["format", "format_version", "model", "weights_sha256", "architecture", "num_layers", "hidden_size",
                 "cut_layer", "dtype", "max_length", "tokenizer_fingerprint", "token_classification",
                 "question_answering", "stride", "rows",
                 "real_tokens", "truncated", "bytes", "corpus_fingerprint", "versions", "created", "updated",
                 "skipped", "shards"]
        return {k: d[k] for k in order}

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a manifest.json (local path or URI)."""
        try:
            raw = storage.read_json(path)
        except FileNotFoundError:
            raise CacheError(f"{path}: not found (not an er_ray cache, or nothing committed yet)") from None
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: unreadable manifest ({e})") from None
        if raw.get("format") != FORMAT:
            raise CacheError(f"{path}: not an er_ray cache manifest")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CacheError(f"{path}: format version {raw['format_version']} is newer than this er_ray reads "
                             f"({FORMAT_VERSION}); upgrade er_ray")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, path: str | Path) -> None:
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.created = self.created or self.updated
        storage.write_json(path, self.to_json())  # atomic: readers see the old or the new manifest, never half


def check_key(manifest: Manifest, expected: dict[str, Any], where: str) -> None:
    """Refuse a cache computed differently from what the caller is about to do; name the field."""
    for k in KEY_FIELDS:
        if k in expected and expected[k] != getattr(manifest, k):
            raise CacheMismatch(
                f"{where} was built with {k}={getattr(manifest, k)!r}, but this run uses {k}={expected[k]!r} "
                f"(model {manifest.model!r}, cut layer {manifest.cut_layer}); use a cache built for this "
                f"configuration or build one into another directory")


@dataclass
class Cache:
    """A committed cut layer's cache, opened for reading."""

    path: Path | str
    """the layer's directory: an absolute Path for a local cache, the URI (str) for a remote one"""
    manifest: Manifest

    @property
    def files(self) -> list[str]:
        """The manifest's shards (local paths or URIs)."""
        return [storage.join(self.path, s["file"]) for s in self.manifest.shards]

    def check_shards(self) -> None:
        """Refuse to read a cache whose shards are not what the manifest committed: a missing shard, or one whose
        size or sha256 differs (a flipped byte), is an error naming it. Each file version is checked once per
        process (hashing costs about a read of the shard: see BENCHMARKS.md)."""
        root = str(self.path).rsplit("/layer=", 1)[0]
        for s in self.manifest.shards:
            f = storage.join(self.path, s["file"])
            try:
                key = (f, *storage.version(f))
            except FileNotFoundError:
                raise CacheError(f"{f}: this shard of the cache is missing (run `er-ray cache verify {root}`; "
                                 f"building the cache again re-encodes only what is missing)") from None
            if key in _CHECKED:
                continue
            problem = (f"{key[1]} bytes, the manifest says {s['bytes']}" if key[1] != s["bytes"] else
                       "its sha256 differs from the manifest's" if storage.sha256(f) != s["sha256"] else None)
            if problem:
                raise CacheError(f"{f}: a damaged shard ({problem}); nothing was read from this cache (run "
                                 f"`er-ray cache verify {root}`; delete the bad shard and build again to re-encode "
                                 f"it)")
            _CHECKED.add(key)

    def ids(self, documents: bool = False) -> list[str]:
        """Its rows' ids; with `documents`, the documents' (for question answering, its questions, not windows)."""
        col = self.manifest.document_column if documents else "id"
        return list(dict.fromkeys(self.read(columns=[col]).column(col).to_pylist())) if self.files else []

    def row_columns(self, task_type: str | None = None) -> list[str]:
        """The columns a task model reads of each row: the states (and int8's scales), and for token classification
        the word ids, for question answering each window's question and context offsets. The kind is the task's
        (training) or, without one, the cache's own (predict)."""
        m = self.manifest
        token = task_type == "token_classification" if task_type else m.token_classification
        qa = task_type == "question_answering" if task_type else m.question_answering
        return ["id", "length", "hidden"] + (["scale"] if m.dtype == "int8" else []) + \
            (["word_ids"] if token else []) + (["question_id", "offset_start", "offset_end"] if qa else [])

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole cache as one Arrow table (small caches and tests; training streams it with Ray Data)."""
        self.check_shards()
        return pa.concat_tables([storage.read_parquet(f, columns) for f in self.files])

    def read_ids(self, ids, columns: list[str] | None = None, key: str = "id") -> pa.Table:
        """The rows whose `key` (id, or question_id: a question's windows) is in `ids` (a set), in the cache's
        order, read on this process: shard by shard (a few at once, pyarrow decompressing outside the GIL), each
        cut to the wanted rows before the next, so memory holds the rows kept and a few shards. What a run of a
        small task reads: no Ray Data tasks to start."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.compute as pc

        self.check_shards()
        want = pa.array(sorted(ids), pa.string())

        def one(f: str) -> pa.Table:
            t = storage.read_parquet(f, columns)
            return t.filter(pc.is_in(t.column(key), value_set=want))

        with ThreadPoolExecutor(max_workers=4) as pool:
            parts = list(pool.map(one, self.files))  # map keeps the manifest's order
        return pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns or ["id"]})

    def dataset(self, columns: list[str] | None = None):
        """A Ray Dataset over exactly the manifest's shards (read through the cache's filesystem)."""
        import ray.data

        self.check_shards()
        if storage.is_local(self.path):
            return ray.data.read_parquet(self.files, columns=columns)
        fs, _ = storage.resolve(self.path)
        return ray.data.read_parquet([storage.resolve(f)[1] for f in self.files], columns=columns, filesystem=fs)

    def activations(self) -> dict[str, np.ndarray]:
        """id -> float32 [length, H] (small caches and tests)."""
        t = self.read()
        return dict(zip(t.column("id").to_pylist(), decode_rows(t, self.manifest.dtype, self.manifest.hidden_size)))


def open_cache(root: str | Path, cut_layer: int, expect: dict[str, Any] | None = None) -> Cache:
    """Open DIR's layer-k cache; with `expect`, refuse it unless model, tokenizer, layer and max length agree."""
    path = layer_dir(root, cut_layer)
    if not storage.exists(path):
        have = [n for n in storage.listdir(root) if n.startswith("layer=")]
        raise CacheError(f"{root}: no cache for cut layer {cut_layer} (present: {', '.join(have) or 'none'})")
    manifest = Manifest.load(storage.join(path, "manifest.json"))
    if expect:
        check_key(manifest, {"cut_layer": cut_layer, **expect}, path)
    return Cache(Path(storage.resolve(path)[1]) if storage.is_local(path) else path, manifest)


# ---------------------------------------------------------------------------------------------------------------
# Verify


def verify(root: str | Path) -> list[str]:
    """Re-check every layer's shards against its manifest: existence, size, sha256, rows, ids. Returns problems."""
    root = str(root)
    if storage.exists(storage.join(root, "manifest.json")):
        layers = [root]
    else:
        layers = [storage.join(root, n) for n in storage.listdir(root) if n.startswith("layer=")]
    if not layers:
        return [f"{root}: no layer=<k>/manifest.json: not an er_ray cache"]
    problems = []
    for d in layers:
        try:
            m = Manifest.load(storage.join(d, "manifest.json"))
        except CacheError as e:
            problems.append(str(e))
            continue
        seen: dict[str, str] = {}
        for s in m.shards:
            f = storage.join(d, s["file"])
            if not storage.exists(f):
                problems.append(f"{f}: missing shard")
                continue
            if (size := storage.size(f)) != s["bytes"]:
                problems.append(f"{f}: {size} bytes, manifest says {s['bytes']}")
                continue
            if storage.sha256(f) != s["sha256"]:
                problems.append(f"{f}: checksum mismatch (sha256 differs from the manifest)")
                continue
            key = m.document_column  # a QA shard is named by its questions, not its rows (their windows)
            try:
                t = storage.read_parquet(f, list(dict.fromkeys(["id", key])))
            except Exception as e:
                problems.append(f"{f}: unreadable ({e})")
                continue
            ids, docs = t.column("id").to_pylist(), list(dict.fromkeys(t.column(key).to_pylist()))
            if len(ids) != s["rows"]:
                problems.append(f"{f}: {len(ids)} rows, manifest says {s['rows']}")
            if shard_name(docs + [x["id"] for x in s.get("skipped", [])]) != s["file"]:
                problems.append(f"{f}: its ids do not match its name")
            for i in ids:
                if i in seen:
                    problems.append(f"{f}: id {i!r} is also in {seen[i]}")
                    break
                seen[i] = s["file"]
    return problems


SHARD = re.compile(r"^part-[0-9a-f]{20}\.parquet$")


def shard_name(ids: list[str]) -> str:
    """part-<hash of the shard's planned ids>: the same documents always make the same shard file."""
    h = hashlib.sha256("\0".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{h}.parquet"
