"""Training data: a task's labelled rows cut from the layer-k cache (or its texts), and the batches a worker
trains on.

On the driver, `split_datasets` reads the cache once for all splits and keeps the rows each split labels: as
Arrow tables in Ray's object store when they were cut on the driver (a small cache, or texts), else as materialized
Ray Datasets; on a worker, `batches` turns its shard of them into bucketed, padded tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .errors import ErRayError


class TrainDataError(ErRayError):
    pass


def batches(ds_iter, spec: dict, batch_size: int, shuffle_seed: int | None, tokenizer=None, max_length: int = 128):
    """Yield (inputs, mask, labels, word_ids | None) from a Ray Data shard iterator of Arrow batches.

    Rows are read in chunks of 8 batches, sorted by length within the chunk (little padding) and the batch order
    shuffled; the chunking also bounds memory."""
    import torch

    from .batching import length_batches, pad_rows
    from .codec import decode_rows
    from .model import IGNORE, token_labels  # here, not at the top: Ray Data's tasks import this module (no torch)

    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    for chunk in ds_iter.iter_batches(batch_size=batch_size * 8, batch_format="pyarrow",
                                      local_shuffle_buffer_size=batch_size * 32 if rng is not None else None,
                                      local_shuffle_seed=shuffle_seed):
        n = chunk.num_rows
        if spec["task_type"] == "question_answering":
            rows, labels, wids = _qa_rows(chunk, spec)
        elif spec["source"] == "cache":
            rows = decode_rows(chunk, spec["cache_dtype"], spec["hidden"])
        else:
            words = chunk.column("text").to_pylist()
            enc = tokenizer(words, truncation=True, max_length=max_length,
                            is_split_into_words=spec["task_type"] == "token_classification")
            rows = [np.asarray(x, np.int64) for x in enc["input_ids"]]
        if spec["task_type"] == "token_classification":
            wids = (chunk.column("word_ids").to_pylist() if spec["source"] == "cache"
                    else [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(n)])
            labels = chunk.column("label").to_pylist()
        elif spec["task_type"] == "classification":
            wids, labels = None, chunk.column("label").to_pylist()
        groups = length_batches([len(r) for r in rows], batch_size)
        if rng is not None:
            rng.shuffle(groups)
        for g in groups:
            x, mask = pad_rows([rows[i] for i in g], spec["pad_id"] if spec["source"] == "text" else 0)
            T = mask.shape[1]
            if wids is None or spec["task_type"] == "question_answering":  # a class, or a span's start and end
                y = torch.tensor([labels[i] for i in g])
                w = None if wids is None else [wids[i] for i in g]
            else:
                y = torch.full((len(g), T), IGNORE, dtype=torch.long)
                for j, i in enumerate(g):
                    y[j, :len(rows[i])] = torch.tensor(token_labels(wids[i], labels[i]))
                w = [wids[i] for i in g]
            yield torch.from_numpy(x), torch.from_numpy(mask), y, w


class TableShard:
    """A worker's share of a split held as one Arrow table (`split_datasets`' tables), with the part of Ray Data's
    `iter_batches` that `batches` uses. Training rows are shuffled over the whole split (every worker draws the
    same permutation from the epoch's seed and takes its slice) and split equally, as Ray Data's `equal=True`
    streaming split does: workers step together, and a worker with one batch more would hang the others'
    all-reduce. Dev and test rows are split in order and every row is kept (their one collective is at the end)."""

    def __init__(self, ref, rank: int, world: int, equal: bool):
        import ray

        self.table, self.rank, self.world, self.equal = ray.get(ref), rank, world, equal

    def iter_batches(self, batch_size: int, local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None, **_):
        n = self.table.num_rows
        order = np.arange(n) if local_shuffle_buffer_size is None else \
            np.random.default_rng(local_shuffle_seed).permutation(n)
        if self.equal:
            share = n // self.world
            mine = order[self.rank * share:(self.rank + 1) * share]
        else:
            mine = np.array_split(order, self.world)[self.rank]
        for i in range(0, len(mine), batch_size):
            yield self.table.take(mine[i:i + batch_size])


def _qa_rows(chunk: pa.Table, spec: dict) -> tuple[list[np.ndarray], list[tuple[int, int]], list[tuple]]:
    """Question answering: a chunk's windows as model inputs, each with its answer's first and last token (0, 0
    where it does not hold the whole answer) and what decoding needs: (question id, offsets, context, reference
    answers), the last two only where the rows carry them (dev, test)."""
    from . import qa
    from .codec import decode_rows

    labels = chunk.column("label").to_pylist()  # the answer's [first character, end character)
    context = chunk.column("context").to_pylist() if "context" in chunk.column_names else [None] * chunk.num_rows
    refs = chunk.column("answers").to_pylist() if "answers" in chunk.column_names else [None] * chunk.num_rows
    # a row per window: cached states, or token ids (cut on the driver, `_text_windows`)
    rows = decode_rows(chunk, spec["cache_dtype"], spec["hidden"]) if spec["source"] == "cache" else \
        [np.asarray(x, np.int64) for x in chunk.column("input_ids").to_pylist()]
    offsets = qa.offsets(chunk)
    spans = [qa.answer_tokens(o, *y) for o, y in zip(offsets, labels)]
    return rows, spans, list(zip(chunk.column("question_id").to_pylist(), offsets, context, refs))


class KeptShard:
    """A worker's dev or test shard, kept in its memory after one whole pass (up to `limit` bytes of Arrow
    batches): evaluating after every epoch then reads it from there, instead of a new pass through Ray Data's
    streaming split (a new execution, coordinated across workers, every epoch). Takes iter_batches's arguments."""

    def __init__(self, shard, limit: int = 1 << 30):
        self.shard, self.limit, self.kept = shard, limit, None

    def forget(self) -> None:
        """Hold nothing, now and later: every pass reads the shard."""
        self.kept, self.limit = None, -1

    def iter_batches(self, **kwargs):
        if self.kept is not None and self.kept[0] == kwargs:
            yield from self.kept[1]
            return
        kept: list | None = []
        size = 0
        for b in self.shard.iter_batches(**kwargs):
            size += b.nbytes
            if kept is not None and size > self.limit:
                kept = None  # too big to hold: every pass reads the shard
            elif kept is not None:
                kept.append(b)
            yield b
        if kept is not None:  # a whole pass (an abandoned one ends before this line)
            self.kept = (kwargs, kept)


def _label_index(task) -> dict[str, Any]:
    """id -> label index (classification), list of tag indices (token classification) or the answer's [first,
    end) characters in its context (question answering), per split."""
    index = {y: i for i, y in enumerate(task.labels)}
    out = {}
    for split, t in task.splits.items():
        if task.type == "question_answering":
            out[split] = {i: [s, s + len(a)] for i, s, a in zip(*(t.column(n).to_pylist() for n in
                                                                  ("id", "answer_start", "answer_text")))}
        elif task.type == "classification":
            out[split] = dict(zip(t.column("id").to_pylist(), (index[y] for y in t.column("label").to_pylist())))
        else:
            out[split] = dict(zip(t.column("id").to_pylist(),
                                  ([index[y] for y in tags] for tags in t.column("tags").to_pylist())))
    return out


def _attach_labels(batch: pa.Table, labels: dict[str, dict[str, Any]], kind: str,
                   references: dict[str, tuple[str, list[str]]] | None = None) -> pa.Table:
    """Keep the rows that a split labels, with `split` and `label` columns (a document in two splits is kept twice).
    Question answering: rows are windows, labelled by their question (its answer's characters); dev and test
    windows also get their question's context and reference answers (`references`), which decoding and scoring
    need."""
    key = "question_id" if "question_id" in batch.column_names else "id"
    ids = batch.column(key).to_pylist()
    keep, split, ys = [], [], []
    for name, lab in labels.items():
        for i, x in enumerate(ids):
            if x in lab:
                keep.append(i), split.append(name), ys.append(lab[x])
    batch = batch.take(pa.array(keep, pa.int64()))
    batch = (batch.append_column("split", pa.array(split, pa.string()))
             .append_column("label", pa.array(ys, pa.int32() if kind == "classification" else pa.list_(pa.int32()))))
    if references is not None:
        refs = [references.get(ids[i]) if s != "train" else None for i, s in zip(keep, split)]
        for j, (name, typ) in enumerate((("context", pa.string()), ("answers", pa.list_(pa.string())))):
            if name not in batch.column_names:
                batch = batch.append_column(name, pa.array([r and r[j] for r in refs], typ))
    return batch


def _select_split(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])


def _references(task) -> dict[str, tuple[str, list[str]]]:
    """Question answering: each dev and test question's context and reference answers, by its id."""
    return {i: (c, a) for s in ("dev", "test") if s in task.splits for i, c, a in
            zip(*(task.splits[s].column(n).to_pylist() for n in ("id", "context", "answers")))}


def _documents_in(data, qa: bool) -> int:
    """Documents in a split's rows (an Arrow table, or a Dataset): its rows, or for question answering the
    questions of its windows. Trap: on a Dataset, `unique` is a Ray Data job (~20 s of a small QA run when every
    split was counted so); a table read on the driver is counted on the driver."""
    import pyarrow.compute as pc

    if isinstance(data, pa.Table):
        return pc.count_distinct(data.column("question_id")).as_py() if qa else data.num_rows
    return len(data.unique("question_id")) if qa and "question_id" in data.columns() else data.count()


DRIVER_READ_BYTES = 1 << 30  # caches up to 1 GiB on disk are read by the driver; larger ones by Ray Data


def driver_read_bytes() -> int:
    """The largest cache (bytes on disk) a run reads on its driver; ER_RAY_DRIVER_READ_BYTES overrides (0: always
    Ray Data, as on a cluster whose driver node is small)."""
    import os

    return int(os.environ.get("ER_RAY_DRIVER_READ_BYTES", DRIVER_READ_BYTES))


def split_datasets(task, cache_obj, source: str, max_train: int | None, seed: int,
                   tokenizer: tuple[str, int] | None = None) -> dict[str, Any]:
    """Per split, the cache rows (or texts) of its documents with their labels: {"tables": split -> object ref of
    an Arrow table} when cut on the driver, else {"datasets": split -> materialized Ray Dataset}; and "rows".
    (Quietly: these few small reads would print Ray Data's progress lines every few seconds, per task.)

    In the cache's order: Ray Data otherwise keeps blocks in the order its read tasks happen to finish, and the
    seeded shuffle of a run's batches then starts from a different order every time (one seed gave test 0.9210,
    0.9154 and 0.9081 on TREC). A Dataset keeps the context it was made in, so the flag is set before the reads.

    `tokenizer`: (model folder, max length), with which question answering texts are cut into windows here (as the
    cache's are), so that every split is counted in the windows the loop steps through."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        return _split_datasets(task, cache_obj, source, max_train, seed, tokenizer)
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = shown, ordered


def _split_datasets(task, cache_obj, source: str, max_train: int | None, seed: int,
                    tokenizer: tuple[str, int] | None) -> dict[str, Any]:
    import ray.data

    labels = _label_index(task)
    if max_train and len(labels["train"]) > max_train:
        rng = np.random.default_rng(seed)
        keep = sorted(str(i) for i in rng.choice(sorted(labels["train"]), size=max_train, replace=False))
        labels["train"] = {k: labels["train"][k] for k in keep}
    qa = task.type == "question_answering"
    refs = _references(task) if qa else None
    label_args = {"labels": labels, "kind": task.type, "references": refs}
    labelled = out = None  # a table of every split's rows, where they are cut on the driver
    if source == "cache":
        cols = cache_obj.row_columns(task.type)
        if cache_obj.manifest.bytes <= driver_read_bytes():
            # A small cache is read here, in one filtered pass (the task's ids): Ray Data's read tasks would first
            # start cold worker processes, 10-15 s of a small run (BENCHMARKS.md, the fixed cost of one run).
            rows = cache_obj.read_ids(set().union(*labels.values()), cols, key="question_id" if qa else "id")
            labelled = _attach_labels(rows, **label_args)
        else:
            # One distributed read of the cache for all splits (decompressing every shard's states is the expensive
            # part), then each split is cut from the small materialized result.
            labelled = cache_obj.dataset(columns=cols).map_batches(
                _attach_labels, fn_kwargs=label_args, batch_format="pyarrow", num_cpus=0.25).materialize()
            out = {split: labelled.map_batches(_select_split, fn_kwargs={"split": split}, batch_format="pyarrow",
                                               num_cpus=0.25).materialize() for split in labels}
    elif qa:
        labelled = _attach_labels(_text_windows(task, labels, *tokenizer), **label_args)
    else:
        texts = pa.concat_tables(task.splits[s].select(["id", task.input_column]).rename_columns(["id", "text"])
                                 for s in labels)
        labelled = _attach_labels(texts, **label_args)
    tables = {}
    if isinstance(labelled, pa.Table):  # cut on the driver: counted there too
        tables = {split: _select_split(labelled, split) for split in labels}
    if any(_documents_in(tables[split] if tables else out[split], qa) < len(lab) for split, lab in labels.items()):
        # only a cache can lack documents; name them (reading all its ids is fine on this error path)
        have = set(cache_obj.ids(documents=True))
        missing = [i for split in labels.values() for i in split if i not in have]
        raise TrainDataError(f"task {task.name}: {len(missing):,} of its documents are missing from the cache "
                         f"{cache_obj.path} (e.g. {missing[0]!r}); build the cache over the task's corpus")
    # What a worker steps through: documents, or question answering's windows (the learning rate's schedule is
    # planned in them: counted in questions, it reached zero a third into the run)
    rows = {s: (tables[s].num_rows if tables else out[s].count()) if qa else len(v) for s, v in labels.items()}
    if tables:
        # Rows cut here go to the workers through Ray's object store, an Arrow table per split (`TableShard`). As
        # Ray Datasets, each run started Ray Data's own actors (a split coordinator per split and a stats actor:
        # 12-17 CPU seconds on 2 cores, BENCHMARKS.md "as Arrow tables in the object store") to stream a few MB.
        return {"datasets": {}, "tables": {s: ray.put(t) for s, t in tables.items()}, "rows": rows}
    return {"datasets": out, "tables": {}, "rows": rows}


def _text_windows(task, labels: dict[str, dict], folder: str, max_length: int) -> pa.Table:
    """Question answering from text: the labelled questions cut into windows, as the cache's rows (token ids in
    place of states)."""
    from . import qa
    from .tokenizer import qa_tokenizer_for

    wanted = set().union(*labels.values())
    t = pa.concat_tables(task.splits[s].select(["id", "question", "context"]) for s in labels)
    t = t.filter(pa.array([i in wanted for i in t.column("id").to_pylist()]))
    ids = t.column("id").to_pylist()
    wins = qa.windows(qa_tokenizer_for(folder, max_length, qa.stride(max_length)), t.column("question").to_pylist(),
                      t.column("context").to_pylist())
    return pa.table(qa.window_columns(wins, ids))
