"""The layer-k activation cache: built once on Ray Data, kept as Parquet, trusted for months.

Layout (a contract: other tools read it with plain pyarrow or DuckDB; nothing is pickled):

    DIR/layer=<k>/manifest.json         the commit point: readers list shards from it, never by glob
    DIR/layer=<k>/part-<hash>.parquet   one row per document, no padding stored

Columns of a shard: `id` string; `length` int32 (real tokens); `hidden` the layer-k states as
`list<fixed_size_binary[B]>`, one value per real token holding its H numbers as raw little-endian bytes of the
manifest's dtype (fp32: B = 4H, fp16: IEEE half, B = 2H, bf16: bfloat16, B = 2H, int8: B = H with a `scale`
`list<float>` column, value = int8 * scale per token); token-classification corpora add `word_ids`
`list<int32>` (-1 for special tokens), mapping tokens back to words. Decoding with plain numpy:
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
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .batching import length_batches, pad_rows
from .errors import ErRayError, OptionsError, run_pipeline

FORMAT = "er_ray.cache"
FORMAT_VERSION = 1
DTYPES = ("fp32", "fp16", "bf16", "int8")
Dtype = Literal["fp32", "fp16", "bf16", "int8"]
# What a reader must agree with before it may use a cache (the fingerprint of the computation).
KEY_FIELDS = ("weights_sha256", "architecture", "cut_layer", "tokenizer_fingerprint", "max_length")


class CacheError(ErRayError):
    pass


class CacheMismatch(CacheError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Encoding activations into Arrow and back


def quantize(h, dtype: str) -> dict[str, np.ndarray]:
    """Real-token states [tokens, H] (a torch tensor) -> storage arrays for `dtype`: {"hidden", ("scale")}.

    Done in torch, per batch, on the device: multi-threaded, and on a GPU only the small result crosses to the host."""
    import torch

    if dtype == "fp32":
        return {"hidden": h.float().cpu().numpy()}
    if dtype == "fp16":
        return {"hidden": h.half().cpu().numpy()}
    if dtype == "bf16":
        return {"hidden": h.bfloat16().view(torch.int16).cpu().numpy()}
    if dtype == "int8":
        scale = (h.float().abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(h.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"hidden": q.cpu().numpy(), "scale": scale.cpu().numpy()}
    raise OptionsError(f"dtype must be one of {DTYPES}, not {dtype!r}")


def to_arrow(parts: dict[str, np.ndarray], lengths: np.ndarray, dtype: str, hidden: int) -> dict[str, pa.Array]:
    """Storage arrays of consecutive documents' real tokens -> the `hidden` (and `scale`) list columns."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.ascontiguousarray(parts["hidden"])
    width = hidden * flat.itemsize
    tokens = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(flat), [None, pa.py_buffer(flat)])
    out = {"hidden": pa.ListArray.from_arrays(offsets, tokens)}
    if "scale" in parts:
        out["scale"] = pa.ListArray.from_arrays(offsets, pa.array(parts["scale"]))
    return out


def encode_hidden(rows: list[np.ndarray], dtype: str, hidden: int) -> dict[str, pa.Array]:
    """Per-document float32 [length, H] arrays -> the `hidden` (and `scale`) columns for `dtype`."""
    import torch

    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate(rows) if rows else np.zeros((0, hidden), np.float32)
    return to_arrow(quantize(torch.from_numpy(flat), dtype), lengths, dtype, hidden)


STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16, "int8": np.int8}


def decode_hidden(table: pa.Table, dtype: str, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """The `hidden` column of a shard (or a slice of one) -> (float32 [tokens, H], offsets [rows + 1])."""
    col = table.column("hidden").combine_chunks()
    offsets = col.offsets.to_numpy()
    tokens = col.values
    width = hidden * np.dtype(STORAGE[dtype]).itemsize
    if tokens.type != pa.binary(width):  # a row-wise Ray Data map turns fixed-size binary into plain binary
        tokens = tokens.cast(pa.binary(width))
    start, end = int(offsets[0]), int(offsets[-1])
    raw = np.frombuffer(tokens.buffers()[1], dtype=STORAGE[dtype])
    raw = raw[tokens.offset * hidden:(tokens.offset + len(tokens)) * hidden].reshape(-1, hidden)[start:end]
    if dtype == "bf16":
        import torch

        flat = torch.from_numpy(raw.copy()).view(torch.bfloat16).float().numpy()
    elif dtype == "int8":
        scale = table.column("scale").combine_chunks().values.to_numpy()[start:end]
        flat = raw.astype(np.float32) * scale[:, None]
    else:
        flat = raw.astype(np.float32)
    return flat, offsets - start


def decode_rows(table: pa.Table, dtype: str, hidden: int) -> list[np.ndarray]:
    """The `hidden` column -> one float32 [length, H] array per row (views into one decoded buffer)."""
    flat, off = decode_hidden(table, dtype, hidden)
    return [flat[off[i]:off[i + 1]] for i in range(table.num_rows)]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: what the cache pipeline tokenizes with, and its fingerprint


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
        raise CacheError(f"{folder}: er_ray needs a fast (Rust) tokenizer; this model only has a slow one")
    return tok.backend_tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised pipeline (vocab, normaliser, special tokens, post-processor),
    with padding and truncation settings left out (they are per-call, and max length is recorded on its own)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


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
                 corpus_fingerprint=self.corpus_fingerprint)
        order = ["format", "format_version", "model", "weights_sha256", "architecture", "num_layers", "hidden_size",
                 "cut_layer", "dtype", "max_length", "tokenizer_fingerprint", "token_classification", "rows",
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

    def ids(self) -> list[str]:
        return self.read(columns=["id"]).column("id").to_pylist() if self.files else []

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole cache as one Arrow table (small caches and tests; training streams it with Ray Data)."""
        return pa.concat_tables([storage.read_parquet(f, columns) for f in self.files])

    def dataset(self, columns: list[str] | None = None):
        """A Ray Dataset over exactly the manifest's shards (read through the cache's filesystem)."""
        import ray.data

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
            try:
                ids = storage.read_parquet(f, ["id"]).column("id").to_pylist()
            except Exception as e:
                problems.append(f"{f}: unreadable ({e})")
                continue
            if len(ids) != s["rows"]:
                problems.append(f"{f}: {len(ids)} rows, manifest says {s['rows']}")
            if shard_name(ids + [x["id"] for x in s.get("skipped", [])]) != s["file"]:
                problems.append(f"{f}: its ids do not match its name")
            for i in ids:
                if i in seen:
                    problems.append(f"{f}: id {i!r} is also in {seen[i]}")
                    break
                seen[i] = s["file"]
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Planning: which documents still need encoding, in which shards


_SHARD = re.compile(r"^part-[0-9a-f]{20}\.parquet$")


def shard_name(ids: list[str]) -> str:
    """part-<hash of the shard's planned ids>: the same documents always make the same shard file."""
    h = hashlib.sha256("\0".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{h}.parquet"


@dataclass
class Corpus:
    """Documents to cache: files (Parquet, CSV, JSONL) with an id column and a text (or tokens) column."""

    files: list[str]
    id_column: str = "id"
    text_column: str = "text"
    token_classification: bool = False
    """the text column holds lists of words (tokens); word_ids are stored to map tokens back to words"""


def corpus_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))
                       and f.suffix in (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".ndjson"))
        if not files:
            raise CacheError(f"{path}: no .parquet, .csv or .jsonl files in this directory")
        return files
    if not p.exists():
        raise CacheError(f"corpus {path}: no such file, directory or built-in task")
    return [str(p)]


def resolve_corpus(spec: str | list[str], id_column: str = "id", text_column: str = "text") -> Corpus:
    """A built-in task name (all its texts), a task spec file, or corpus files / directories."""
    from . import tasks

    items = [spec] if isinstance(spec, str) else list(spec)
    if len(items) == 1 and (items[0] in tasks.BUILTINS or items[0].endswith((".yaml", ".yml"))):
        task = tasks.load_task(items[0])
        if isinstance(task.spec.files, str) and task.spec.id_column == "id":
            files = [task.spec.files]
        else:  # a user task with files per split: its documents, normalised, in one file next to the cache
            raise CacheError("cache a user task by pointing --corpus at its data files")
        return Corpus(files, "id", task.input_column, task.type == "token_classification")
    files = [f for item in items for f in corpus_files(item)]
    return Corpus(files, id_column, text_column, _holds_word_lists(files[0], text_column))


def _holds_word_lists(file: str, column: str) -> bool:
    """A corpus whose text column holds lists of words is a token classification corpus (word_ids are kept)."""
    from .tasks import read_table

    try:
        schema = pq.read_schema(file) if file.endswith(".parquet") else read_table(file).schema
    except Exception:
        return False  # read_ids reports unreadable files with their name
    return column in schema.names and pa.types.is_list(schema.field(column).type)


def read_ids(corpus: Corpus) -> list[tuple[str, list[str]]]:
    """(file, ids) per file; errors on a missing id column, empty ids and duplicate ids, naming file and row."""
    from .tasks import TaskError, read_table

    out, seen = [], {}
    for f in corpus.files:
        try:
            if f.endswith(".parquet"):
                schema = pq.read_schema(f)
                for c in (corpus.id_column, corpus.text_column):
                    if c not in schema.names:
                        raise CacheError(f"{f}: no column {c!r} (columns: {schema.names})")
                t = pq.read_table(f, columns=[corpus.id_column])
            else:
                t = read_table(f)
                for c in (corpus.id_column, corpus.text_column):
                    if c not in t.column_names:
                        raise CacheError(f"{f}: no column {c!r} (columns: {t.column_names})")
        except TaskError as e:
            raise CacheError(str(e)) from None
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(f"cannot read {f}: {e}") from None
        ids = t.column(corpus.id_column).to_pylist()
        for row, i in enumerate(ids, 1):
            if i is None or str(i) == "":
                raise CacheError(f"{f}, row {row}, field {corpus.id_column!r}: empty id")
            key = str(i)
            if key in seen:
                raise CacheError(f"{f}, row {row}, field {corpus.id_column!r}: duplicate id {key!r} "
                                 f"(first at {seen[key][0]}, row {seen[key][1]})")
            seen[key] = (f, row)
        out.append((f, [str(i) for i in ids]))
    return out


def plan_shards(file_ids: list[tuple[str, list[str]]], done: set[str], shard_rows: int) -> list[dict[str, Any]]:
    """Missing documents, in corpus order, cut into shards of shard_rows per file.

    Deterministic: a resumed run plans exactly the shards the interrupted one had not committed (committed shards
    are whole chunks, so the chunks of what remains are the same), and a grown corpus plans only new documents."""
    plans = []
    for f, ids in file_ids:
        todo = [(row, i) for row, i in enumerate(ids) if i not in done]
        for s in range(0, len(todo), shard_rows):
            chunk = todo[s:s + shard_rows]
            chunk_ids = [i for _, i in chunk]
            plans.append({"shard": shard_name(chunk_ids), "file": f, "rows": [r for r, _ in chunk],
                          "ids": chunk_ids})
    return plans


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: plan -> read + tokenize (CPU tasks) -> lower encoder + write (actor pool) -> manifest (driver)

_TOKENIZERS: dict[tuple[str, int], Any] = {}


def tokenizer_for(folder: str, max_length: int):
    if (folder, max_length) not in _TOKENIZERS:  # once per worker process
        tok = fast_tokenizer(folder)
        tok.no_padding()
        tok.enable_truncation(max_length)
        _TOKENIZERS[folder, max_length] = tok
    return _TOKENIZERS[folder, max_length]


def _read_rows(file: str, rows: list[int], columns: list[str]) -> pa.Table:
    if file.endswith(".parquet"):
        import pyarrow.dataset as pds

        return pds.dataset(file, format="parquet").take(pa.array(rows, pa.int64()), columns=columns)
    from .tasks import read_table

    return read_table(file).select(columns).take(pa.array(rows, pa.int64()))


def tokenize_shard(batch: pa.Table, *, folder: str, max_length: int, id_column: str, text_column: str,
                   token_classification: bool, skip_bad_rows: bool) -> pa.Table:
    """Stage 1 (CPU task): read one planned shard's documents, validate and tokenize them (no padding)."""
    out = []
    for plan in batch.to_pylist():
        docs = _read_rows(plan["file"], plan["rows"], [id_column, text_column])
        texts = docs.column(text_column).to_pylist()
        assert [str(i) for i in docs.column(id_column).to_pylist()] == plan["ids"], "corpus changed under the run"
        good, skipped = [], []
        for row, (doc_id, text) in enumerate(zip(plan["ids"], texts)):
            problem = _bad_text(text, token_classification)
            if problem:
                if not skip_bad_rows:
                    raise CacheError(f"{plan['file']}, row {plan['rows'][row] + 1}, field {text_column!r}: "
                                     f"{problem} (document {doc_id!r}); fix it, or pass --skip-bad-rows to skip "
                                     f"and record such documents in the manifest")
                skipped.append({"id": doc_id, "reason": problem})
            else:
                good.append(row)
        # The Rust tokenizer itself: a worker imports it in milliseconds, where `transformers` costs seconds in
        # every tokenizing process and slowed the start of the encoder actors (same tokenizer.json, same ids).
        encs = tokenizer_for(folder, max_length).encode_batch([texts[r] for r in good],
                                                          is_pretokenized=token_classification)
        truncated = [bool(e.overflowing) for e in encs]
        input_ids = [e.ids for e in encs]
        word_ids = ([[-1 if w is None else w for w in e.word_ids] for e in encs] if token_classification else None)
        hashes = [_doc_sha(plan["ids"][r], texts[r]) for r in good]
        n = len(good)
        cols = {"shard": [plan["shard"]] * n, "id": [plan["ids"][r] for r in good],
                "input_ids": pa.array(input_ids, pa.list_(pa.int32())), "truncated": truncated,
                "doc_sha256": hashes, "planned": [len(plan["ids"])] * n,
                "skipped": [json.dumps(skipped)] * n}
        if word_ids is not None:
            cols["word_ids"] = pa.array(word_ids, pa.list_(pa.int32()))
        if n == 0:  # a shard whose every document was skipped still reports, as one marker row
            cols = {k: [None] if k != "shard" else [plan["shard"]] for k in cols}
            cols["skipped"] = [json.dumps(skipped)]
            cols["planned"] = [len(plan["ids"])]
            cols["input_ids"] = pa.array([None], pa.list_(pa.int32()))
            if word_ids is not None:
                cols["word_ids"] = pa.array([None], pa.list_(pa.int32()))
        out.append(pa.table(cols))
    return pa.concat_tables(out)


def _bad_text(text, token_classification: bool) -> str | None:
    if text is None:
        return "missing text (None)"
    if token_classification:
        if isinstance(text, str):
            return "tokens must be a list of words, got a string"
        if not text or not all(isinstance(w, str) and w for w in text):
            return "tokens must be a non-empty list of non-empty strings"
        return None
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if not text.strip():
        return "empty text"
    return None


def _doc_sha(doc_id: str, text) -> str:
    body = text if isinstance(text, str) else "\x1f".join(text)
    return hashlib.sha256(f"{doc_id}\0{body}".encode()).hexdigest()


class ShardEncoder:
    """Stage 2 (actor, one GPU each where the cluster has GPUs): run the lower layers over whole shards and write
    one Parquet file per cut layer per shard, atomically. Activations never pass through the object store.

    `root` is a location string (local path or URI), resolved in this process (no filesystem object is shipped).

    Writing overlaps computing. The pool runs two calls at once on each actor (`max_concurrent_calls_per_actor=2`
    in `_run_pipeline`): forward passes take turns under `_compute`, and each encoded shard's write (Arrow table,
    Parquet bytes, their sha256, the file) goes to the actor's one writer thread, so while a call waits for its
    shard's write, the next call's shard is already being encoded. A call returns its shards' rows only once their
    files are complete: the driver never commits an unwritten shard, and no row waits for a later call (Ray Data
    has no end-of-stream hook to flush one). A killed actor loses only its calls in flight, which are uncommitted
    and which Ray Data retries."""

    def __init__(self, *, model: str, root: str, cut_layers: list[int], dtype: str, batch_size: int,
                 threads: int | None, key: dict[str, Any], from_layer: int | None = None,
                 compression: str = "zstd"):
        import torch

        from . import encoders

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.enc = encoders.load_encoder(model)
        if self.enc.weights_sha256 != key["weights_sha256"]:  # a node with other weights must not write here
            raise CacheMismatch(f"worker loaded {model} with weights {self.enc.weights_sha256}, "
                                f"the driver expected {key['weights_sha256']}")
        self.enc.model.to(self.device)
        self.root, self.cut_layers, self.dtype, self.batch_size = root, cut_layers, dtype, batch_size
        self.compression = compression
        self.from_layer = from_layer
        if from_layer is None:
            self.part = encoders.LowerEncoder(self.enc.model, max(cut_layers))
        else:
            self.part = encoders.MiddleEncoder(self.enc.model, from_layer, max(cut_layers))
        self.pad_id = self.enc.tokenizer.pad_token_id or 0
        from ray.util import metrics

        tags = ("model", "cut_layer")
        self.m_docs = metrics.Counter("er_ray_cache_documents", "documents encoded into the cache", tags)
        self.m_tokens = metrics.Counter("er_ray_cache_tokens", "real tokens encoded into the cache", tags)
        self.m_bytes = metrics.Counter("er_ray_cache_bytes", "bytes of cache shards written", tags)
        self.m_tps = metrics.Gauge("er_ray_cache_tokens_per_second", "tokens/s of the last shard", tags)
        self._compute = threading.Lock()  # one shard's forward passes at a time (the cores, or the GPU's memory)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="er_ray-shard-writer")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "source" in batch.column_names:  # derive: each row names a shallower layer's shard
            jobs = [functools.partial(self._derive_shard, plan) for plan in batch.to_pylist()]
        else:
            shards = batch.column("shard").to_pylist()
            jobs = [functools.partial(self._encode_shard, batch.take(pa.array([i for i, s in enumerate(shards)
                                                                               if s == shard])))
                    for shard in dict.fromkeys(shards)]
        writes = []
        for job in jobs:
            with self._compute:
                writes += [self._writer.submit(self._write, **w) for w in job()]
        # The shards' rows leave this call only when their files are complete (see the class docstring).
        return pa.Table.from_pylist([w.result() for w in writes])

    def _encode_shard(self, t: pa.Table) -> list[dict[str, Any]]:
        """Encode one shard: the `_write` arguments of each cut layer's file."""
        shard = t.column("shard")[0].as_py()
        planned = t.column("planned")[0].as_py()
        skipped = json.loads(t.column("skipped")[0].as_py())
        if t.column("id")[0].as_py() is None:
            t = t.slice(0, 0)
        if t.num_rows + len(skipped) != planned:  # a block boundary split a shard: never write a partial one
            raise CacheError(f"shard {shard}: got {t.num_rows} + {len(skipped)} skipped of {planned} rows")
        t0 = time.perf_counter()
        seqs = [np.asarray(x, np.int64) for x in t.column("input_ids").to_pylist()]
        order, states = self._run(seqs, lambda ids, mask: self.part(ids, mask, cut_layers=tuple(self.cut_layers)),
                                  pad_value=self.pad_id)
        t = t.take(pa.array(order, pa.int64()))  # rows are stored in the (deterministic) encoding order
        lengths = np.array([len(seqs[i]) for i in order], np.int64)
        seconds = time.perf_counter() - t0
        return [dict(k=k, shard=shard, t=t, states=states[k], lengths=lengths, skipped=skipped, seconds=seconds)
                for k in self.cut_layers]

    def _run(self, inputs: list[np.ndarray], fn, pad_value) -> tuple[list[int], dict[int, dict[str, np.ndarray]]]:
        """Run `fn` over rows (token ids [n] or states [n, H]) in padded batches.

        Returns the row order (sorted by length) and, per cut layer, the storage arrays of the real tokens of the
        rows in that order. Sorted and cut into fixed batches: little padding, and the same batches on every run,
        so a resumed build writes bit-identical shards."""
        import torch

        groups = length_batches([len(x) for x in inputs], self.batch_size)
        parts: dict[int, list[dict[str, np.ndarray]]] = {k: [] for k in self.cut_layers}
        with torch.inference_mode():
            for rows in groups:
                x, mask = pad_rows([inputs[i] for i in rows], pad_value)
                mask_t = torch.from_numpy(mask).to(self.device)
                out = fn(torch.from_numpy(x).to(self.device), mask_t)
                out = out if isinstance(out, dict) else {self.cut_layers[0]: out}
                real = mask_t.bool()
                for k, h in out.items():
                    parts[k].append(quantize(h[real], self.dtype))  # real tokens only, row after row
        merged = {k: {name: np.concatenate([p[name] for p in ps]) for name in ps[0]} if ps else {}
                  for k, ps in parts.items()}
        return [i for rows in groups for i in rows], merged

    def _derive_shard(self, plan: dict[str, Any]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        src = storage.read_parquet(plan["source"])
        inputs = decode_rows(src, plan["dtype"], self.enc.hidden_size)
        order, states = self._run(inputs, self.part, pad_value=0.0)
        keep = ["id"] + (["word_ids"] if "word_ids" in src.column_names else [])
        t = src.select(keep).take(pa.array(order, pa.int64()))
        lengths = np.array([len(inputs[i]) for i in order], np.int64)
        k = self.cut_layers[0]
        return [dict(k=k, shard=plan["shard"], t=t, states=states[k], lengths=lengths,
                     skipped=json.loads(plan["skipped"]), seconds=time.perf_counter() - t0,
                     docs_sha256=plan["docs_sha256"], truncated=plan["truncated"])]

    def _write(self, k: int, shard: str, t: pa.Table, states: dict[str, np.ndarray], lengths: np.ndarray,
               skipped: list, seconds: float, docs_sha256: str | None = None, truncated: int | None = None) -> dict:
        """(The writer thread.) One cut layer's file of one shard, written whole (`storage.write_bytes`: a
        temporary file renamed locally, one upload on object stores); the sha256 is taken of the Parquet bytes in
        memory, not by reading the file back."""
        t0 = time.perf_counter()
        cols = {"id": t.column("id"), "length": pa.array(lengths.astype(np.int32)),
                **(to_arrow(states, lengths, self.dtype, self.enc.hidden_size) if len(lengths) else
                   encode_hidden([], self.dtype, self.enc.hidden_size))}
        if "word_ids" in t.column_names:
            cols["word_ids"] = t.column("word_ids")
        table = pa.table(cols)
        sink = pa.BufferOutputStream()
        # No dictionary and no statistics for the activations (they cost time and say nothing).
        pq.write_table(table, sink, compression=self.compression, use_dictionary=["id"],
                       write_statistics=["id", "length"])
        data = sink.getvalue()
        storage.write_bytes(storage.join(layer_dir(self.root, k), shard), data)
        size = data.size
        tokens = int(lengths.sum())
        tags = {"model": self.enc.name, "cut_layer": str(k)}
        self.m_docs.inc(len(lengths), tags)
        if tokens:
            self.m_tokens.inc(tokens, tags)
        self.m_bytes.inc(size, tags)
        self.m_tps.set(tokens / max(seconds, 1e-9), tags)
        if docs_sha256 is None:
            docs = t.column("doc_sha256").to_pylist() if t.num_rows else []
            docs_sha256 = hashlib.sha256("".join(sorted(docs)).encode()).hexdigest()
        if truncated is None:
            truncated = int(sum(t.column("truncated").to_pylist())) if t.num_rows else 0
        return {"cut_layer": k, "file": shard, "rows": len(lengths), "tokens": tokens, "bytes": size,
                "sha256": hashlib.sha256(data).hexdigest(), "docs_sha256": docs_sha256, "truncated": truncated,
                "skipped": json.dumps(skipped), "seconds": seconds, "write_seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class CacheOptions:
    corpus: list[str]
    """a built-in task name (all its texts), or corpus files / directories of .parquet, .csv, .jsonl"""
    output: str
    """cache directory or URI (s3://bucket/prefix?endpoint_override=...); each cut layer goes to OUTPUT/layer=<k>/
    with its manifest.json"""
    model: str = "minilm"
    """packaged model name, local folder, or hub id"""
    cut_layer: list[int] = field(default_factory=list)
    """cut layer(s) k, comma-separated (e.g. 2,3,4): all from one forward pass (default: half the layers)"""
    dtype: Dtype = "fp16"
    """storage type of the activations: fp16, bf16, int8 (per-token scale) or fp32"""
    max_length: int = 128
    """tokens per document at most; longer documents are truncated and counted in the manifest"""
    id_column: str = "id"
    """column holding unique document ids"""
    text_column: str = "text"
    """column holding the text (or, for token classification corpora, the list of words)"""
    workers: int | None = None
    """lower-encoder actors (default: one per GPU; one on a CPU-only cluster)"""
    threads: int | None = None
    """torch threads per actor on CPU (default: the cluster's CPUs divided among the actors)"""
    batch_size: int = 64
    """documents per forward pass (bucketed by length within a shard)"""
    shard_rows: int = 1024
    """documents per Parquet shard: the unit of work, of resume and of verification"""
    compression: Literal["none", "zstd", "lz4", "snappy"] = "zstd"
    """Parquet compression of the shards (zstd makes fp16 caches ~8% smaller for ~1% of the build time)"""
    skip_bad_rows: bool = False
    """skip empty, missing or non-string texts (counted and listed in the manifest) instead of failing"""
    derive_from: int | None = None
    """derive the cut layer(s) from this shallower layer's cache in OUTPUT (no raw text, no lower layers)"""

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if isinstance(self.cut_layer, int):
            self.cut_layer = [self.cut_layer]
        if self.dtype not in DTYPES:
            raise OptionsError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("batch_size", "shard_rows", "max_length"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise OptionsError("--workers must be at least 1")
        if not self.corpus and self.derive_from is None:
            raise OptionsError("--corpus is required (a built-in task, or corpus files)")


def _log(msg: str) -> None:
    print(f"[er_ray cache] {msg}", file=sys.stderr, flush=True)


def build_cache(opts: CacheOptions) -> dict[int, Manifest]:
    """Encode a corpus's layer-k activations into OUTPUT, once: committed shards are skipped, so a re-run encodes
    nothing, an interrupted run resumes, and a grown corpus encodes only its new documents."""
    from . import encoders
    from .cluster import connect

    fp = encoders.fingerprint(opts.model, opts.max_length)
    layers = sorted(set(opts.cut_layer)) or [fp["num_layers"] // 2]
    if bad := [k for k in layers if not 0 <= k <= fp["num_layers"]]:
        raise OptionsError(f"cut layer(s) {bad} out of range: {fp['model']} has layers 0..{fp['num_layers']}")
    if opts.derive_from is not None:
        return {k: derive_cache(opts, fp, k) for k in layers}
    corpus = resolve_corpus(opts.corpus, opts.id_column, opts.text_column)
    file_ids = read_ids(corpus)
    n_docs = sum(len(ids) for _, ids in file_ids)
    manifests = {k: _open_for_write(opts, fp, k, corpus.token_classification) for k in layers}
    # Layers whose caches hold the same documents are encoded together, in one forward pass.
    groups: dict[frozenset, list[int]] = {}
    for k, m in manifests.items():
        done = frozenset(_done_ids(layer_dir(opts.output, k), m))
        groups.setdefault(done, []).append(k)
    connect()
    for done, ks in groups.items():
        plans = plan_shards(file_ids, set(done), opts.shard_rows)
        todo = sum(len(p["ids"]) for p in plans)
        _log(f"{fp['model']} layer(s) {ks}: {n_docs:,} documents in the corpus, {len(done):,} cached, "
             f"{todo:,} to encode in {len(plans)} shard(s)")
        if not plans:
            continue
        stage1 = dict(folder=fp["folder"], max_length=opts.max_length, id_column=corpus.id_column,
                      text_column=corpus.text_column, token_classification=corpus.token_classification,
                      skip_bad_rows=opts.skip_bad_rows)
        _run_pipeline(opts, fp, ks, plans, manifests, stage1=stage1)
    return manifests


def derive_cache(opts: CacheOptions, fp: dict[str, Any], k: int) -> Manifest:
    """OUTPUT/layer=<k> from OUTPUT/layer=<derive_from> by running only the layers in between."""
    from .cluster import connect

    a = opts.derive_from
    if not 0 <= a < k:
        raise OptionsError(f"--derive-from {a} must be shallower than the cut layer {k}")
    src = open_cache(opts.output, a, expect=fp)
    m = _open_for_write(opts, fp, k, src.manifest.token_classification)
    have = {s["file"] for s in m.shards}
    plans = [{"shard": s["file"], "source": storage.join(storage.absolute(src.path), s["file"]),
              "dtype": src.manifest.dtype,
              "docs_sha256": s["docs_sha256"], "truncated": s.get("truncated", 0),
              "skipped": json.dumps(s.get("skipped", []))} for s in src.manifest.shards if s["file"] not in have]
    _log(f"deriving layer {k} from layer {a}: {len(src.manifest.shards)} shard(s), {len(plans)} to do")
    if plans:
        connect()
        _run_pipeline(opts, fp, [k], plans, {k: m}, stage1=None, from_layer=a)
    return m


def _open_for_write(opts: CacheOptions, fp: dict[str, Any], k: int, token_classification: bool) -> Manifest:
    d = layer_dir(opts.output, k)
    key = {**{f: fp[f] for f in KEY_FIELDS if f in fp}, "cut_layer": k}
    m = None
    if storage.exists(storage.join(d, "manifest.json")):
        m = Manifest.load(storage.join(d, "manifest.json"))
        check_key(m, key, d)
        if m.dtype != opts.dtype:
            raise CacheMismatch(f"{d} was built with dtype={m.dtype!r}, but this run uses dtype={opts.dtype!r}; "
                                f"build into another directory")
    # What a killed run wrote and never committed (temporary files; on object stores, whole shards uploaded but
    # not yet in the manifest): never visible to readers, now removed.
    committed = {s["file"] for s in m.shards} if m else set()
    for name in storage.listdir(d):
        if name.startswith((".tmp-", ".manifest.")) or (_SHARD.match(name) and name not in committed):
            storage.delete(storage.join(d, name))
    if m:
        return m
    return Manifest(model=fp["model"], weights_sha256=fp["weights_sha256"], architecture=fp["architecture"],
                    num_layers=fp["num_layers"], hidden_size=fp["hidden_size"], cut_layer=k, dtype=opts.dtype,
                    max_length=opts.max_length, tokenizer_fingerprint=fp["tokenizer_fingerprint"],
                    token_classification=token_classification, versions=versions())


def _done_ids(d: str, m: Manifest) -> set[str]:
    done = {s["id"] for s in m.skipped}
    for s in m.shards:
        done.update(storage.read_parquet(storage.join(d, s["file"]), ["id"]).column("id").to_pylist())
    return done


def _run_pipeline(opts: CacheOptions, fp: dict[str, Any], layers: list[int], plans: list[dict[str, Any]],
                  manifests: dict[int, Manifest], stage1: dict[str, Any] | None, from_layer: int | None = None):
    import ray
    import ray.data

    from .cluster import cluster_cpus, cluster_gpus

    gpus = cluster_gpus()
    workers = opts.workers or max(1, gpus)
    threads = opts.threads or (None if gpus else max(1, int(cluster_cpus()) // workers))
    # One planned shard per block, so every shard reaches an actor whole.
    ds = ray.data.from_items(plans, override_num_blocks=len(plans))
    if stage1 is not None:
        # Tokenizing is cheap next to the encoder: two tasks at a time keep ahead of it and leave it the cores.
        ds = ds.map_batches(tokenize_shard, batch_size=None, batch_format="pyarrow", fn_kwargs=stage1,
                            num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=2))
    ds = ds.map_batches(
        ShardEncoder, batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=dict(model=fp["model"], root=storage.absolute(opts.output), cut_layers=layers,
                                   dtype=opts.dtype, batch_size=opts.batch_size, threads=threads,
                                   key={"weights_sha256": fp["weights_sha256"]}, from_layer=from_layer,
                                   compression=opts.compression),
        # Two calls at once per actor: one shard's write overlaps the next one's forward passes (see ShardEncoder).
        compute=ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=2,
                                           enable_true_multi_threading=True),
        num_gpus=1 if gpus else 0, num_cpus=1)
    run_pipeline(lambda: _commit_results(opts, ds, layers, len(plans), manifests))


def _commit_results(opts: CacheOptions, ds, layers: list[int], n_plans: int, manifests: dict[int, Manifest]):
    """Record each finished shard in its layer's manifest as it arrives (the manifest is the commit point)."""
    t0, docs, tokens, nbytes, shards = time.perf_counter(), 0, 0, 0, 0
    encoding = writing = 0.0  # the actors' own seconds: forward passes (per shard), writes (per file)
    # prefetch_batches=0: with prefetching, Ray Data's iterator hands a block over only once the next one has
    # arrived, so each shard was committed one actor call late (a kill then re-encoded a written shard).
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for r in batch.to_pylist():
            m = manifests[r["cut_layer"]]
            skipped = json.loads(r["skipped"])
            entry = {k: r[k] for k in ("file", "rows", "tokens", "bytes", "sha256", "docs_sha256", "truncated")}
            if skipped:
                entry["skipped"] = skipped
            m.shards = sorted([s for s in m.shards if s["file"] != entry["file"]] + [entry], key=lambda s: s["file"])
            m.skipped = [s for s in m.skipped if s["id"] not in {x["id"] for x in skipped}] + skipped
            m.save(storage.join(layer_dir(opts.output, r["cut_layer"]), "manifest.json"))  # commit this shard
            if r["cut_layer"] == layers[0]:
                shards += 1
                docs += r["rows"]
                tokens += r["tokens"]
                encoding += r["seconds"]
            nbytes += r["bytes"]
            writing += r["write_seconds"]
        dt = time.perf_counter() - t0
        # Tokens/s while encoding against the end-to-end rate says where a slow build loses its time: in the
        # encoder itself, or in starting and feeding it.
        _log(f"{shards}/{n_plans} shards, {docs:,} documents, {tokens:,} tokens, {tokens / dt:,.0f} tokens/s, "
             f"{nbytes / 2**20:,.1f} MiB written, {dt:,.0f} s (encoder: {tokens / max(encoding, 1e-9):,.0f} "
             f"tokens/s over {encoding:,.1f} s of forward passes; writes {writing:,.1f} s)")
