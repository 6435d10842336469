"""Predictions from a trained task model: over a corpus's cache (upper layers only) or over raw text (lower +
upper), with Ray Data. Both give the same labels on the same documents.

    er-ray predict --run runs/runs/trec-k3-lora16-s0 --corpus trec --cache runs/caches/... --output preds/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .console import fmt_count, say
from .errors import ErRayError, run_pipeline
from .options import PredictOptions


class PredictError(ErRayError):
    pass


def load_task_model(run: str | Path, source: str = "cache", merge: bool = True):
    """A trained task model from its run directory (a path or a URI): (TaskModel in eval mode, task.json,
    Encoder)."""
    import torch
    from safetensors.torch import load

    from .model import ModelSpec, TaskModel
    from .pretrained import load_encoder

    d = storage.join(run, "model") if storage.exists(storage.join(run, "model", "task.json")) else run
    if not storage.exists(storage.join(d, "task.json")):
        raise PredictError(f"{run}: no model/task.json: not a trained er_ray run")
    info = storage.read_json(storage.join(d, "task.json"))
    enc = load_encoder(info["model"])
    if enc.weights_sha256 != info["weights_sha256"]:
        raise PredictError(f"{run} was trained on weights {info['weights_sha256'][:12]}..., "
                           f"but {info['model']} now has {enc.weights_sha256[:12]}...")
    spec = ModelSpec(**{**info["spec"], "source": source, "full_finetune": False})
    model = TaskModel(enc.model, spec)
    state = load(storage.read_bytes(storage.join(d, "trainable.safetensors")))
    named = dict(model.named_parameters())
    if unknown := set(state) - set(named):
        raise PredictError(f"{run}: weights {sorted(unknown)[:3]} do not fit this model")
    with torch.no_grad():
        for k, v in state.items():
            named[k].copy_(v)
    model.eval()
    if merge:
        model.merge_lora()
    return model, info, enc


class Predictor:
    """Ray Data actor: labels for a batch of cache rows or texts."""

    def __init__(self, run: str, source: str, batch_size: int, threads: int | None = None,
                 cache_dtype: str | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model, self.info, self.enc = load_task_model(run, source)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.source, self.batch_size = source, batch_size
        self.labels = self.info["labels"]
        self.token = self.info["spec"]["task_type"] == "token_classification"
        self.cache_dtype = cache_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from .batching import length_batches, pad_rows
        from .codec import decode_rows

        n = batch.num_rows
        if self.source == "cache":
            rows = decode_rows(batch, self.cache_dtype, self.enc.hidden_size)
            wids = batch.column("word_ids").to_pylist() if self.token else None
            pad = 0.0
        else:
            enc = self.enc.tokenizer(batch.column("text").to_pylist(), truncation=True,
                                     max_length=self.info["max_length"], is_split_into_words=self.token)
            rows = [np.asarray(x, np.int64) for x in enc["input_ids"]]
            wids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(n)] if self.token else None
            pad = self.enc.tokenizer.pad_token_id or 0
        labels: list[Any] = [None] * n
        scores: list[Any] = [None] * n
        with torch.inference_mode():
            for g in length_batches([len(r) for r in rows], self.batch_size):
                x, mask = pad_rows([rows[i] for i in g], pad)
                probs = torch.softmax(self.model(torch.from_numpy(x).to(self.device),
                                                 torch.from_numpy(mask).to(self.device)).float(), -1).cpu()
                p, y = probs.max(-1)
                for j, i in enumerate(g):
                    if not self.token:
                        labels[i], scores[i] = self.labels[int(y[j])], float(p[j])
                        continue
                    tags, conf, seen = [], [], set()
                    for t, w in enumerate(wids[i]):  # first subword of each word carries the word's tag
                        if w >= 0 and w not in seen:
                            seen.add(w)
                            tags.append(self.labels[int(y[j, t])])
                            conf.append(float(p[j, t]))
                    labels[i], scores[i] = tags, conf
        out = {"id": batch.column("id")}
        if self.token:
            out["tags"] = pa.array(labels, pa.list_(pa.string()))
            out["scores"] = pa.array(scores, pa.list_(pa.float32()))
        else:
            out["label"] = pa.array(labels, pa.string())
            out["score"] = pa.array(scores, pa.float32())
        return pa.table(out)


def predict(opts: PredictOptions) -> Path | str:
    """Label every document of a corpus with a trained task model; writes OUTPUT/predictions.parquet (an earlier
    one there is replaced only once the new one is complete) and returns OUTPUT: a Path for a local folder, the
    URI for a remote one."""
    import ray
    import ray.data

    from .cache import KEY_FIELDS, open_cache
    from .cache_build import corpus_of
    from .cluster import cluster_cpus, cluster_gpus, connect
    from .corpus import read_ids
    from .pretrained import fingerprint

    storage.writable_folder(opts.output)
    run = storage.absolute(opts.run)  # the predictor actors read the model from it
    if not storage.exists(storage.join(run, "model", "task.json")):
        raise PredictError(f"{run}: no model/task.json: not a trained er_ray run")
    info = storage.read_json(storage.join(run, "model", "task.json"))
    connect()
    if opts.cache:
        k = info["spec"]["cut_layer"]
        fp = fingerprint(info["model"], info["max_length"])
        c = open_cache(opts.cache, k, expect={f: fp[f] for f in KEY_FIELDS if f in fp})
        cache_dtype = c.manifest.dtype
        cols = ["id", "length", "hidden"] + (["scale"] if c.manifest.dtype == "int8" else []) + \
               (["word_ids"] if c.manifest.token_classification else [])
        ds = c.dataset(columns=cols)
        if opts.corpus:  # only the corpus's documents
            corpus = corpus_of(opts.corpus, opts.id_column, opts.text_column)
            wanted = pa.array(sorted({i for _, ids in read_ids(corpus) for i in ids}), pa.string())
            ds = ds.map_batches(_keep_ids, fn_kwargs={"wanted": wanted}, batch_format="pyarrow")
        source = "cache"
    else:  # each corpus file is read by a Ray task, not by this process: a corpus need not fit in the driver
        corpus = corpus_of(opts.corpus, opts.id_column, opts.text_column)
        ds = ray.data.from_items([{"file": f} for f in corpus.files], override_num_blocks=len(corpus.files))
        ds = ds.map_batches(_read_files, fn_kwargs={"id_column": corpus.id_column, "text_column": corpus.text_column},
                            batch_size=1, batch_format="pyarrow")
        source, cache_dtype = "text", None
    gpus = cluster_gpus()
    workers = opts.workers or max(1, gpus)
    threads = None if gpus else max(1, int(cluster_cpus()) // workers)
    out = ds.map_batches(Predictor, fn_constructor_kwargs={"run": run, "source": source,
                                                           "batch_size": opts.batch_size, "threads": threads,
                                                           "cache_dtype": cache_dtype},
                         batch_format="pyarrow", batch_size=1024, compute=ray.data.ActorPoolStrategy(size=workers),
                         num_gpus=1 if gpus else 0, num_cpus=1)
    # streamed into one file as the predictor actors deliver, never all in this process's memory
    rows = run_pipeline(lambda: storage.write_parquet_stream(
        storage.join(opts.output, "predictions.parquet"), out.iter_batches(batch_size=None, batch_format="pyarrow")))
    if rows == 0:
        raise PredictError("no documents to label: the corpus is empty" +
                           (" or none of its documents are in the cache" if opts.cache and opts.corpus else ""))
    if opts.cache and opts.corpus and rows < len(wanted):  # nothing is dropped silently
        say("predict", f"{fmt_count(len(wanted) - rows)} of the corpus's {fmt_count(len(wanted))} documents are not "
                       f"in the cache {opts.cache} and were not labelled")
    say("predict", f"{fmt_count(rows)} documents labelled from {source} -> {opts.output}")
    return Path(opts.output) if storage.is_local(opts.output) else opts.output


def _keep_ids(batch: pa.Table, wanted: pa.Array) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("id"), value_set=wanted))


def _read_files(batch: pa.Table, id_column: str, text_column: str) -> pa.Table:
    """(Ray task) The named corpus files -> id (as strings) and text columns."""
    from .corpus import read_table

    out = []
    for file in batch.column("file").to_pylist():
        t = read_table(file)
        missing = [c for c in (id_column, text_column) if c not in t.column_names]
        if missing:
            raise PredictError(f"{file}: no column {missing[0]!r} (columns: {', '.join(t.column_names)}); "
                               f"name it with --id-column / --text-column")
        out.append(pa.table({"id": pa.array([str(x) for x in t.column(id_column).to_pylist()], pa.string()),
                             "text": t.column(text_column)}))
    return pa.concat_tables(out)
