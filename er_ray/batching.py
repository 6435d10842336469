"""Ragged rows -> padded batches: the one place every model feed (cache build, training, prediction, benches) batches.

A row is a document's token ids `[n]` or its cached states `[n, H]`; rows are never padded at rest. Batches are cut
from rows sorted by length, so a batch pads only to its own longest row (little waste), and the cut depends only on
the lengths, so the same rows always give the same batches (the cache relies on that to write bit-identical shards
on a resumed build).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Trap (CPU): glibc's malloc serves a block above its mmap threshold (raised at run time as blocks are freed, but
# never above 32 MiB on 64-bit Linux) with a fresh mmap and unmaps it on free; the kernel then zero-fills it page
# by page on first touch, every batch again. An inference batch of 64 reviews of 128 tokens has 50 MB feed-forward
# states in MiniLM: on CPU, inference batches are cut so a layer's widest activation stays under the ceiling
# (`er-ray predict` over 5,000 reviews: page faults /4, system time /2 to /4; BENCHMARKS.md). PyTorch's caching
# allocator serves GPU memory: no cap there. Training batches are a hyperparameter and are never cut.
MMAP_CEILING = 32 * 2**20

BatchBytes = Callable[[int, int], int]
"""(rows, longest row) -> bytes of the batch's widest activation"""


def length_batches(lengths: Sequence[int], batch_size: int, batch_bytes: BatchBytes | None = None,
                   limit: int = MMAP_CEILING) -> list[list[int]]:
    """Row indices sorted by length (ties by position) and cut into batches of `batch_size`; with `batch_bytes`,
    a batch also ends before its widest activation would pass `limit` (a row alone is always a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if batch_bytes is None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    groups: list[list[int]] = []
    for i in order:  # ascending: the row being added is the batch's longest
        if groups and len(groups[-1]) < batch_size and batch_bytes(len(groups[-1]) + 1, lengths[i]) <= limit:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def activation_bytes(model, device: str) -> BatchBytes | None:
    """The `batch_bytes` of inference on `device` (None: no cap, on a GPU): for a transformers model, a batch's
    widest per-layer activation, the feed-forward's inner states [rows, T, intermediate] or the attention weights
    [rows, heads, T, T] where they are computed whole (eager attention; PyTorch's fused attention never holds
    them), in the model's dtype."""
    from .flops import model_shape

    if device != "cpu":
        return None
    config, itemsize = model.config, next(model.parameters()).element_size()
    _, inter, _ = model_shape(config)
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    return lambda rows, t: rows * t * max(inter, heads * t if eager else 0) * itemsize


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
