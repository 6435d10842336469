"""The cache build's two Ray Data stages: tokenize a planned shard (CPU tasks), then encode and write it (actors).

Stage 1, `tokenize_shard`: read one planned shard's documents, validate and tokenize them (no padding).
Stage 2, `ShardEncoder`: run the lower layers over whole shards and write one Parquet file per cut layer per
shard. The driver (`er_ray.cache_build`) plans the shards and commits each finished one to the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .batching import activation_bytes, length_batches, pad_rows
from .cache import CacheError, CacheMismatch, layer_dir
from .codec import decode_rows, encode_hidden, quantize, to_arrow
from .corpus import DataError, bad_text, doc_sha256, read_rows
from .tokenizer import qa_tokenizer_for, tokenizer_for


# What a shard keeps beside the states: words of token classification, windows of question answering.
EXTRA_COLUMNS = ("word_ids", "question_id", "offset_start", "offset_end")


def tokenize_shard(batch: pa.Table, *, folder: str, max_length: int, id_column: str, text_column: str,
                   token_classification: bool, skip_bad_rows: bool, context_column: str | None = None) -> pa.Table:
    """Stage 1 (CPU task): read one planned shard's documents, validate and tokenize them (no padding); question
    + context pairs become their windows (`er_ray.qa.windows`), a row each."""
    out = []
    for plan in batch.to_pylist():
        docs = read_rows(plan["file"], plan["rows"], [id_column, text_column] + [context_column] * bool(context_column))
        texts = docs.column(text_column).to_pylist()
        if context_column:
            texts = list(zip(texts, docs.column(context_column).to_pylist()))
        assert [str(i) for i in docs.column(id_column).to_pylist()] == plan["ids"], "corpus changed under the run"
        good, skipped = [], []
        for row, (doc_id, text) in enumerate(zip(plan["ids"], texts)):
            problem = bad_text(text, token_classification)
            if problem:
                if not skip_bad_rows:
                    raise DataError(f"{plan['file']}, row {plan['rows'][row] + 1}, field {text_column!r}: "
                                    f"{problem} (document {doc_id!r}); fix it, or pass --skip-bad-rows to skip "
                                    f"and record such documents in the manifest")
                skipped.append({"id": doc_id, "reason": problem})
            else:
                good.append(row)
        if context_column:
            cols = _windows(folder, max_length, [plan["ids"][r] for r in good], [texts[r] for r in good])
        else:
            cols = _documents(folder, max_length, [plan["ids"][r] for r in good], [texts[r] for r in good],
                              token_classification)
        n = len(cols["id"])
        cols.update(shard=[plan["shard"]] * n, planned=[len(plan["ids"])] * n, skipped=[json.dumps(skipped)] * n)
        if n == 0:  # a shard whose every document was skipped still reports, as one marker row
            cols = {k: pa.nulls(1, v.type) if isinstance(v, pa.Array) else [None] for k, v in cols.items()}
            cols.update(shard=[plan["shard"]], planned=[len(plan["ids"])], skipped=[json.dumps(skipped)])
        out.append(pa.table(cols))
    return pa.concat_tables(out)


def _documents(folder: str, max_length: int, ids: list[str], texts: list, token_classification: bool) -> dict:
    # The Rust tokenizer itself: a worker imports it in milliseconds, where `transformers` costs seconds in
    # every tokenizing process and slowed the start of the encoder actors (same tokenizer.json, same ids).
    encs = tokenizer_for(folder, max_length).encode_batch(texts, is_pretokenized=token_classification)
    cols = {"id": ids, "input_ids": pa.array([e.ids for e in encs], pa.list_(pa.int32())),
            "truncated": [bool(e.overflowing) for e in encs],
            "doc_sha256": [doc_sha256(i, t) for i, t in zip(ids, texts)]}
    if token_classification:
        cols["word_ids"] = pa.array([[-1 if w is None else w for w in e.word_ids] for e in encs],
                                    pa.list_(pa.int32()))
    return cols


def _windows(folder: str, max_length: int, ids: list[str], pairs: list[tuple[str, str]]) -> dict:
    """Question answering: a row per window of each (question, context) pair, with the context characters of
    each token (-1 outside the context). Nothing is truncated: the windows cover the whole context."""
    from . import qa

    wins = qa.windows(qa_tokenizer_for(folder, max_length, qa.stride(max_length)), [q for q, _ in pairs],
                      [c for _, c in pairs])
    hashes = [doc_sha256(i, t) for i, t in zip(ids, pairs)]
    return {**qa.window_columns(wins, ids), "truncated": [False] * len(wins),
            "doc_sha256": [hashes[w.question] for w in wins]}


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

        from . import encoders, pretrained

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.enc = pretrained.load_encoder(model)
        if self.enc.weights_sha256 != key["weights_sha256"]:  # a node with other weights must not write here
            raise CacheMismatch(f"worker loaded {model} with weights {self.enc.weights_sha256}, "
                                f"the driver expected {key['weights_sha256']}")
        self.enc.model.to(self.device)
        self.root, self.cut_layers, self.dtype, self.batch_size = root, cut_layers, dtype, batch_size
        self.batch_bytes = activation_bytes(self.enc.model, self.device)
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
        docs = len(set(t.column("question_id").to_pylist())) if "question_id" in t.column_names else t.num_rows
        if docs + len(skipped) != planned:  # a block boundary split a shard: never write a partial one
            raise CacheError(f"shard {shard}: got {docs} + {len(skipped)} skipped of {planned} documents")
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

        groups = length_batches([len(x) for x in inputs], self.batch_size, self.batch_bytes)
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
        keep = ["id"] + [c for c in EXTRA_COLUMNS if c in src.column_names]
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
        cols.update({c: t.column(c) for c in EXTRA_COLUMNS if c in t.column_names})
        table = pa.table(cols)
        sink = pa.BufferOutputStream()
        # No dictionary and no statistics for the activations (they cost time and say nothing).
        pq.write_table(table, sink, compression=self.compression,
                       use_dictionary=[c for c in ("id", "question_id") if c in table.column_names],
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
            # one hash per document (a question's windows share theirs): what stale_shards recomputes from the corpus
            docs = set(t.column("doc_sha256").to_pylist()) if t.num_rows else set()
            docs_sha256 = hashlib.sha256("".join(sorted(docs)).encode()).hexdigest()
        if truncated is None:
            truncated = int(sum(t.column("truncated").to_pylist())) if t.num_rows else 0
        return {"cut_layer": k, "file": shard, "rows": len(lengths), "tokens": tokens, "bytes": size,
                "sha256": hashlib.sha256(data).hexdigest(), "docs_sha256": docs_sha256, "truncated": truncated,
                "skipped": json.dumps(skipped), "seconds": seconds, "write_seconds": time.perf_counter() - t0}
