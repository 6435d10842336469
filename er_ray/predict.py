"""Predictions from a trained task model: over a corpus's cache (upper layers only) or over raw text (lower +
upper), with Ray Data's actors on a cluster or for a big input, on the process itself for a small input on one
machine. Both sources, and both ways, give the same labels on the same documents.

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
from .qa import window_span


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
    """Ray Data actor: labels for a batch of cache rows or texts from one or several task models that share their
    model and cut layer: the cache's rows are decoded (or the frozen lower layers run on the texts) once, then each
    model runs its own upper layers. Columns: id, then per run i: label_i, score_i (tags_i, scores_i)."""

    def __init__(self, runs: list[str], source: str, batch_size: int, threads: int | None = None,
                 cache_dtype: str | None = None):
        import torch

        from .batching import activation_bytes
        from .encoders import LowerEncoder

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # A fully fine-tuned run trained its embeddings too: it runs from text alone, whole (a group of one).
        whole = source == "text" and len(runs) == 1 and _run_info(runs[0])["spec"]["full_finetune"]
        self.models = [load_task_model(r, "text" if whole else "cache") for r in runs]
        for m, _, _ in self.models:
            m.to(self.device)
        self.info, self.enc = self.models[0][1], self.models[0][2]
        # Recycled runs froze layers 1..k: the first model's pretrained lower layers serve every model.
        self.lower = None if whole or source == "cache" else \
            LowerEncoder(self.enc.model, self.info["spec"]["cut_layer"]).to(self.device).eval()
        self.source, self.batch_size, self.cache_dtype = source, batch_size, cache_dtype
        self.batch_bytes = activation_bytes(self.enc.model, self.device)
        self.token = self.info["spec"]["task_type"] == "token_classification"
        self.qa = self.info["spec"]["task_type"] == "question_answering"

    def _inputs(self, batch: pa.Table):
        """Per row: layer-k states (cache) or token ids (text); word ids per token for token tasks; for question
        answering (a row per window) the window's question id and its tokens' context characters."""
        from .codec import decode_rows

        if self.qa:
            return self._windows(batch)
        if self.source == "cache":
            rows = decode_rows(batch, self.cache_dtype, self.enc.hidden_size)
            return rows, batch.column("word_ids").to_pylist() if self.token else None, 0.0
        enc = self.enc.tokenizer(batch.column("text").to_pylist(), truncation=True,
                                 max_length=self.info["max_length"], is_split_into_words=self.token)
        rows = [np.asarray(x, np.int64) for x in enc["input_ids"]]
        wids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(batch.num_rows)] \
            if self.token else None
        return rows, wids, self.enc.tokenizer.pad_token_id or 0

    def _windows(self, batch: pa.Table):
        from . import qa
        from .codec import decode_rows
        from .tokenizer import qa_tokenizer_for

        if self.source == "cache":
            offsets = qa.offsets(batch)
            rows = decode_rows(batch, self.cache_dtype, self.enc.hidden_size)
            return rows, list(zip(batch.column("question_id").to_pylist(), offsets)), 0.0
        m = self.info["max_length"]
        wins = qa.windows(qa_tokenizer_for(str(self.enc.folder), m, qa.stride(m)), batch.column("text").to_pylist(),
                          batch.column("context").to_pylist())
        ids = batch.column("id").to_pylist()
        return ([np.asarray(w.input_ids, np.int64) for w in wins], [(ids[w.question], w.offsets) for w in wins],
                self.enc.tokenizer.pad_token_id or 0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from .batching import length_batches, pad_rows

        rows, wids, pad = self._inputs(batch)
        n = len(rows)  # documents, or question answering's windows
        labels: list[list[Any]] = [[None] * n for _ in self.models]
        scores: list[list[Any]] = [[None] * n for _ in self.models]
        with torch.inference_mode():
            for g in length_batches([len(r) for r in rows], self.batch_size, self.batch_bytes):
                x, mask = pad_rows([rows[i] for i in g], pad)
                x, mask = torch.from_numpy(x).to(self.device), torch.from_numpy(mask).to(self.device)
                h = self.lower(x, mask) if self.lower is not None else x
                for r, (model, info, _) in enumerate(self.models):
                    logits = model(h, mask).float()
                    if self.qa:  # each window's best span; the best window of each question wins (predict())
                        for j, i in enumerate(g):
                            t = len(rows[i])
                            labels[r][i] = window_span(logits[j, :t, 0].cpu().numpy(), logits[j, :t, 1].cpu().numpy(),
                                                       wids[i][1])
                        continue
                    p, y = torch.softmax(logits, -1).cpu().max(-1)
                    for j, i in enumerate(g):
                        labels[r][i], scores[r][i] = self._row(info["labels"], p[j], y[j], wids[i] if wids else None)
        if self.qa:
            return pa.table({"id": [q for q, _ in wids], **{f"{c}_{r}": [b[k] for b in labels[r]]
                                                             for r in range(len(self.models))
                                                             for k, c in enumerate(("start", "end", "score"))}})
        out = {"id": batch.column("id")}
        for r in range(len(self.models)):
            if self.token:
                out[f"tags_{r}"] = pa.array(labels[r], pa.list_(pa.string()))
                out[f"scores_{r}"] = pa.array(scores[r], pa.list_(pa.float32()))
            else:
                out[f"label_{r}"] = pa.array(labels[r], pa.string())
                out[f"score_{r}"] = pa.array(scores[r], pa.float32())
        return pa.table(out)

    def _row(self, names: list[str], p, y, wids):
        if wids is None:
            return names[int(y)], float(p)
        tags, conf, seen = [], [], set()
        for t, w in enumerate(wids):  # first subword of each word carries the word's tag
            if w >= 0 and w not in seen:
                seen.add(w)
                tags.append(names[int(y[t])])
                conf.append(float(p[t]))
        return tags, conf


def _run_info(run: str) -> dict[str, Any]:
    path = storage.join(run, "model", "task.json")
    if not storage.exists(path):
        raise PredictError(f"{run}: no model/task.json: not a trained er_ray run")
    return storage.read_json(path)


def _one_pass_groups(infos: list[dict[str, Any]]) -> list[list[int]]:
    """Runs that can share one pass: same weights, cut layer, max length and task type; a fully fine-tuned run
    (its lower layers trained too) alone."""
    groups: dict[tuple, list[int]] = {}
    for i, info in enumerate(infos):
        s = info["spec"]
        key = ("whole", i) if s["full_finetune"] else \
            (info["weights_sha256"], s["cut_layer"], info["max_length"], s["task_type"])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def predict(opts: PredictOptions) -> Path | str:
    """Label every document of a corpus with one or several trained task models; writes
    OUTPUT/predictions.parquet (several runs: OUTPUT/<run name>/predictions.parquet; an earlier file there is
    replaced only once the new one is complete) and returns OUTPUT: a Path for a local folder, the URI for a remote
    one. Runs that share a model and cut layer share one pass over the documents."""
    storage.writable_folder(opts.output)
    runs = [storage.absolute(r) for r in opts.run]  # the predictor actors read the models from them
    infos = [_run_info(r) for r in runs]
    groups = _one_pass_groups(infos)
    outputs = [storage.join(opts.output, "predictions.parquet")] if len(runs) == 1 else \
        [storage.join(opts.output, r.rstrip("/").rsplit("/", 1)[-1], "predictions.parquet") for r in runs]
    for g in groups:
        _predict_group(opts, [runs[i] for i in g], infos[g[0]], [outputs[i] for i in g])
    return Path(opts.output) if storage.is_local(opts.output) else opts.output


def _runs_here(opts: PredictOptions, input_bytes: int) -> bool:
    """Whether to predict on this process instead of Ray Data's actors: on one machine (no cluster to spread over),
    for an input small enough to read here (the limit training's driver reads use: `ER_RAY_DRIVER_READ_BYTES`,
    0 for always Ray Data), unless --workers asks for actors. A local Ray's start, its actor's start (imports, model
    load) and Ray Data's plan made every `er-ray predict` over 5,000 reviews 40-48 s longer here (BENCHMARKS.md,
    end-to-end predict on one machine without Ray)."""
    from .cluster import on_one_machine
    from .train_data import driver_read_bytes

    return opts.workers is None and input_bytes <= driver_read_bytes() and on_one_machine()


def _predict_group(opts: PredictOptions, runs: list[str], info: dict[str, Any], outputs: list[str]) -> None:
    from .cache import KEY_FIELDS, open_cache
    from .cache_build import corpus_of
    from .corpus import read_ids
    from .pretrained import fingerprint

    qa = info["spec"]["task_type"] == "question_answering"
    corpus = corpus_of(opts.corpus, opts.id_column, opts.text_column, opts.context_column) if opts.corpus else None
    if qa and (corpus is None or corpus.context_column is None):
        raise PredictError("a question answering model answers from each question's context: give --corpus (the "
                           "built-in task, a task spec, or files with --context-column), also with --cache")
    cache, wanted = None, None
    if opts.cache:
        k = info["spec"]["cut_layer"]
        fp = fingerprint(info["model"], info["max_length"])
        cache = open_cache(opts.cache, k, expect={f: fp[f] for f in KEY_FIELDS if f in fp})
        if corpus:  # only the corpus's documents
            wanted = pa.array(sorted({i for _, ids in read_ids(corpus) for i in ids}), pa.string())
    source = "cache" if cache else "text"
    here = _runs_here(opts, cache.manifest.bytes if cache else sum(storage.size(f) for f in corpus.files))
    predicted = (_predict_here if here else _predict_ray)(opts, runs, corpus, cache, wanted, qa)
    where = "on this process" if here else "by Ray Data"
    if qa:
        rows = _write_answers(predicted, corpus, outputs)
        say("predict", f"{fmt_count(rows)} questions answered from {source} by {len(runs)} task model(s) {where} -> "
                       f"{outputs[0] if len(outputs) == 1 else opts.output}")
        return
    token = info["spec"]["task_type"] == "token_classification"
    names = ("tags", "scores") if token else ("label", "score")

    def per_run(batches):  # the predictors' one table -> one table per run, streamed into its own file
        for b in batches:
            yield tuple(pa.table({"id": b.column("id"), **{n: b.column(f"{n}_{r}") for n in names}})
                        for r in range(len(runs)))

    # streamed as the predictors deliver, never all in this process's memory
    rows = run_pipeline(lambda: storage.write_parquet_streams(outputs, per_run(predicted)))[0]
    if rows == 0:
        raise PredictError("no documents to label: the corpus is empty" +
                           (" or none of its documents are in the cache" if opts.cache and opts.corpus else ""))
    if opts.cache and corpus and rows < len(wanted):  # nothing is dropped silently
        say("predict", f"{fmt_count(len(wanted) - rows)} of the corpus's {fmt_count(len(wanted))} documents are not "
                       f"in the cache {opts.cache} and were not labelled")
    what = f"{len(runs)} task models in one pass" if len(runs) > 1 else "1 task model"
    say("predict", f"{fmt_count(rows)} documents labelled from {source} by {what} {where} -> "
                   f"{outputs[0] if len(outputs) == 1 else opts.output}")


ROWS_PER_CALL = 1024  # rows handed to a predictor at a time (it batches them by length inside)


def _predict_here(opts: PredictOptions, runs: list[str], corpus, cache, wanted, qa: bool):
    """The predictor's tables, computed on this process (no Ray): the cache's rows read in one filtered pass, or
    the corpus files; progress every 10 s."""
    from . import console

    console.terminate_as_interrupt()  # as under Ray: `kill` takes Ctrl-C's path

    def read() -> pa.Table:
        if cache:
            cols, key = cache.row_columns(), "question_id" if qa else "id"
            return cache.read_ids(set(wanted.to_pylist()), cols, key=key) if wanted is not None else cache.read(cols)
        # under the size limit: the texts fit here
        return pa.concat_tables([_read_files(pa.table({"file": [f]}), corpus.columns) for f in corpus.files])

    # The rows are read on a second thread while this one loads the task models: the load is mostly Python
    # imports on one core, and pyarrow reads and decompresses outside the GIL on the other.
    rows = _in_background(read, "er_ray-read")
    predictor = Predictor(runs, "cache" if cache else "text", opts.batch_size,
                          cache_dtype=cache.manifest.dtype if cache else None)
    table = rows()
    # counted as they come out: a question answering model's rows are windows (from text: not known before)
    slices = (predictor(table.slice(s, ROWS_PER_CALL)) for s in range(0, table.num_rows, ROWS_PER_CALL))
    yield from _told(slices, None if qa and not cache else table.num_rows, "windows" if qa else "documents",
                     "on this process")


def _in_background(fn, name: str):
    """fn() started on a thread; returns a function that waits for its result (or raises its error). A daemon
    thread: a command interrupted, or failed, meanwhile ends without waiting for it."""
    import threading

    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the waiter, in its thread
            box["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result


def _told(tables, total: int | None, noun: str, where: str, every: float = 10.0):
    """The predictor's tables passed on, with a progress line every `every` seconds: rows done of `total` (None:
    not known before the end, e.g. a corpus read by Ray tasks) and the rate."""
    import time

    from . import console

    bar, t0 = console.progress("predict", total or 0), time.perf_counter()
    last, done = t0, 0
    try:
        for t in tables:
            done += t.num_rows
            yield t
            if time.perf_counter() - last > every:
                last = time.perf_counter()
                of = f" of {fmt_count(total)}" if total else ""
                bar.update(done, f"{fmt_count(done)}{of} {noun} {where}, {done / (last - t0):,.0f}/s")
    finally:
        bar.close()


def _predict_ray(opts: PredictOptions, runs: list[str], corpus, cache, wanted, qa: bool):
    """The predictor's tables from Ray Data's actors (a cluster, or an input too big for this process)."""
    import ray
    import ray.data

    from .cluster import cluster_cpus, cluster_gpus, connect

    connect()
    if cache:
        ds = cache.dataset(columns=cache.row_columns())
        if wanted is not None:
            ds = ds.map_batches(_keep_ids, fn_kwargs={"wanted": wanted, "key": "question_id" if qa else "id"},
                                batch_format="pyarrow")
    else:  # each corpus file is read by a Ray task, not by this process: a corpus need not fit in the driver
        ds = ray.data.from_items([{"file": f} for f in corpus.files], override_num_blocks=len(corpus.files))
        ds = ds.map_batches(_read_files, fn_kwargs={"columns": corpus.columns}, batch_size=1, batch_format="pyarrow")
    gpus = cluster_gpus()
    workers = opts.workers or max(1, gpus)
    threads = None if gpus else max(1, int(cluster_cpus()) // workers)
    out = ds.map_batches(Predictor, fn_constructor_kwargs={"runs": runs, "source": "cache" if cache else "text",
                                                           "batch_size": opts.batch_size, "threads": threads,
                                                           "cache_dtype": cache.manifest.dtype if cache else None},
                         batch_format="pyarrow", batch_size=ROWS_PER_CALL,
                         compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if gpus else 0, num_cpus=1)
    # a cache's rows are known before the pass (of the wanted ids, those missing are counted after it); a
    # question answering model's rows are windows, not the questions asked for
    total = None if not cache or qa else len(wanted) if wanted is not None else cache.manifest.rows
    yield from _told(out.iter_batches(batch_size=None, batch_format="pyarrow"), total,
                     "windows" if qa else "documents", "by Ray Data")


def _write_answers(predicted, corpus, outputs: list[str]) -> int:
    """Question answering: the windows' best spans (a few numbers each) gathered here, each question's best window
    kept per run, its span cut from the question's context; OUTPUT's predictions.parquet holds id, answer and
    score per question. Returns the questions answered."""
    from .corpus import read_table

    best: list[dict[str, tuple]] = [{} for _ in outputs]
    for b in predicted:
        ids = b.column("id").to_pylist()
        for r, runs_best in enumerate(best):
            for q, s, e, sc in zip(ids, *(b.column(f"{c}_{r}").to_pylist() for c in ("start", "end", "score"))):
                if q not in runs_best or sc > runs_best[q][2]:
                    runs_best[q] = (s, e, sc)
    context = {}
    for f in corpus.files:
        t = read_table(f).select([corpus.id_column, corpus.context_column])
        context.update(zip((str(i) for i in t.column(0).to_pylist()), t.column(1).to_pylist()))
    for runs_best, path in zip(best, outputs):
        ids = list(runs_best)
        storage.write_parquet(path, pa.table({
            "id": pa.array(ids, pa.string()),
            "answer": [context[q][runs_best[q][0]:runs_best[q][1]] if runs_best[q][2] > -np.inf else "" for q in ids],
            "score": pa.array([runs_best[q][2] for q in ids], pa.float32())}))
    return len(best[0])


def _keep_ids(batch: pa.Table, wanted: pa.Array, key: str = "id") -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column(key), value_set=wanted))


def _read_files(batch: pa.Table, columns: list[str]) -> pa.Table:
    """(Ray task) The named corpus files -> id (as strings), text (and context) columns."""
    from .corpus import read_table

    out = []
    for file in batch.column("file").to_pylist():
        t = read_table(file)
        missing = [c for c in columns if c not in t.column_names]
        if missing:
            raise PredictError(f"{file}: no column {missing[0]!r} (columns: {', '.join(t.column_names)}); "
                               f"name it with --id-column / --text-column / --context-column")
        out.append(pa.table({"id": pa.array([str(x) for x in t.column(columns[0]).to_pylist()], pa.string()),
                             "text": t.column(columns[1]), **({"context": t.column(columns[2])}
                                                              if len(columns) > 2 else {})}))
    return pa.concat_tables(out)
