"""Training data: a task's labelled rows cut from the layer-k cache (or its texts), and the batches a worker
trains on.

On the driver, `split_datasets` reads the cache once for all splits and keeps the rows each split labels, as
materialized Ray Datasets; on a worker, `batches` turns its shard of them into bucketed, padded tensors.
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
        if spec["source"] == "cache":
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
        else:
            wids, labels = None, chunk.column("label").to_pylist()
        groups = length_batches([len(r) for r in rows], batch_size)
        if rng is not None:
            rng.shuffle(groups)
        for g in groups:
            x, mask = pad_rows([rows[i] for i in g], spec["pad_id"] if spec["source"] == "text" else 0)
            T = mask.shape[1]
            if wids is None:
                y = torch.tensor([labels[i] for i in g])
                w = None
            else:
                y = torch.full((len(g), T), IGNORE, dtype=torch.long)
                for j, i in enumerate(g):
                    y[j, :len(rows[i])] = torch.tensor(token_labels(wids[i], labels[i]))
                w = [wids[i] for i in g]
            yield torch.from_numpy(x), torch.from_numpy(mask), y, w


def _label_index(task) -> dict[str, Any]:
    """id -> label index (classification) or list of tag indices (token classification), per split."""
    index = {y: i for i, y in enumerate(task.labels)}
    out = {}
    for split, t in task.splits.items():
        if task.type == "classification":
            out[split] = dict(zip(t.column("id").to_pylist(), (index[y] for y in t.column("label").to_pylist())))
        else:
            out[split] = dict(zip(t.column("id").to_pylist(),
                                  ([index[y] for y in tags] for tags in t.column("tags").to_pylist())))
    return out


def _attach_labels(batch: pa.Table, labels: dict[str, dict[str, Any]], token: bool) -> pa.Table:
    """Keep the rows that a split labels, with `split` and `label` columns (a document in two splits is kept twice)."""
    ids = batch.column("id").to_pylist()
    keep, split, ys = [], [], []
    for name, lab in labels.items():
        for i, x in enumerate(ids):
            if x in lab:
                keep.append(i), split.append(name), ys.append(lab[x])
    batch = batch.take(pa.array(keep, pa.int64()))
    return (batch.append_column("split", pa.array(split, pa.string()))
            .append_column("label", pa.array(ys, pa.list_(pa.int32()) if token else pa.int32())))


def _select_split(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])


def split_datasets(task, cache_obj, source: str, max_train: int | None, seed: int) -> dict[str, Any]:
    """Ray Datasets per split: cache rows (or texts) of the split's documents with their labels, materialized.
    (Quietly: these few small reads would print Ray Data's progress lines every few seconds, per task.)

    In the cache's order: Ray Data otherwise keeps blocks in the order its read tasks happen to finish, and the
    seeded shuffle of a run's batches then starts from a different order every time (one seed gave test 0.9210,
    0.9154 and 0.9081 on TREC). A Dataset keeps the context it was made in, so the flag is set before the reads."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        return _split_datasets(task, cache_obj, source, max_train, seed)
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = shown, ordered


def _split_datasets(task, cache_obj, source: str, max_train: int | None, seed: int) -> dict[str, Any]:
    import ray.data

    labels = _label_index(task)
    if max_train and len(labels["train"]) > max_train:
        rng = np.random.default_rng(seed)
        keep = sorted(str(i) for i in rng.choice(sorted(labels["train"]), size=max_train, replace=False))
        labels["train"] = {k: labels["train"][k] for k in keep}
    token = task.type == "token_classification"
    if source == "cache":
        # One read of the cache for all splits (decompressing every shard's states is the expensive part), then
        # each split is cut from the small materialized result.
        cols = ["id", "length", "hidden"] + (["scale"] if cache_obj.manifest.dtype == "int8" else []) + \
               (["word_ids"] if token else [])
        labelled = cache_obj.dataset(columns=cols).map_batches(
            _attach_labels, fn_kwargs={"labels": labels, "token": token}, batch_format="pyarrow",
            num_cpus=0.25).materialize()
    else:
        texts = pa.concat_tables(task.splits[s].select(["id", task.input_column]).rename_columns(["id", "text"])
                                 for s in labels)
        labelled = ray.data.from_arrow(_attach_labels(texts, labels, token)).materialize()
    out = {split: labelled.map_batches(_select_split, fn_kwargs={"split": split}, batch_format="pyarrow",
                                       num_cpus=0.25).materialize() for split in labels}
    if any(out[split].count() < len(lab) for split, lab in labels.items()):
        # only a cache can lack documents; name them (reading all its ids is fine on this error path)
        have = set(cache_obj.ids())
        missing = [i for split in labels.values() for i in split if i not in have]
        raise TrainDataError(f"task {task.name}: {len(missing):,} of its documents are missing from the cache "
                         f"{cache_obj.path} (e.g. {missing[0]!r}); build the cache over the task's corpus")
    return {"datasets": out, "rows": {s: len(v) for s, v in labels.items()}}
