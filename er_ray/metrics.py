"""Scores of task models: accuracy counts, and span-level F1 for BIO tagging (seqeval's default rules)."""

from __future__ import annotations


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entity spans of a BIO sequence as seqeval (default mode) / conlleval read it: an I- without a matching
    open entity starts a new one."""
    spans, start, kind = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, typ = t.partition("-")
        if start is not None and (prefix in ("O", "B") or typ != kind):
            spans.add((kind, start, i))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return spans


def span_counts(gold: list[str], pred: list[str]) -> tuple[int, int, int]:
    g, p = bio_spans(gold), bio_spans(pred)
    return len(g & p), len(p - g), len(g - p)


def f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1e-12)
