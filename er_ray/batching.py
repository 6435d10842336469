"""Ragged rows -> padded batches: the one place every model feed (cache build, training, prediction, benches) batches.

A row is a document's token ids `[n]` or its cached states `[n, H]`; rows are never padded at rest. Batches are cut
from rows sorted by length, so a batch pads only to its own longest row (little waste), and the cut depends only on
the lengths, so the same rows always give the same batches (the cache relies on that to write bit-identical shards
on a resumed build).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices sorted by length (ties by position) and cut into batches of `batch_size`."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def pad_rows(rows: Sequence[np.ndarray], pad_value=0) -> tuple[np.ndarray, np.ndarray]:
    """Stack ragged rows into one right-padded array `[B, T, ...]` and its attention mask `[B, T]` (int64, 1 = real).

    `pad_value` is the tokenizer's pad id for token ids; for states it is irrelevant (masked) and 0."""
    T = max(len(r) for r in rows)
    x = np.full((len(rows), T, *rows[0].shape[1:]), pad_value, dtype=rows[0].dtype)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for j, r in enumerate(rows):
        x[j, :len(r)] = r
        mask[j, :len(r)] = 1
    return x, mask
