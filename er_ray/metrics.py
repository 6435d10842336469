"""Scores of task models: accuracy counts, span-level F1 for BIO tagging (seqeval's default rules), and what to
tell a user whose model learned nothing."""

from __future__ import annotations

from typing import Any

from .console import fmt_score
from .qa import TRIVIAL_WORDS


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


# A QA model within this much dev F1 of the trivial answer learned nothing (bench/recipe_grid.py's collapse margin).
QA_MARGIN = 0.02


def learned_nothing(metrics: dict[str, Any]) -> str | None:
    """What to tell a user whose model gives one answer to everything on dev (one class for every example, no
    entity in any sentence, answers no better than a context's first words), or None. Seen with the default
    recipe: sms_spam's seed 1 at the majority class (BENCHMARKS.md, the default recipe); a score alone does not
    show it."""
    dev = metrics.get("dev_all") or {}
    if dev.get("classes_predicted") == 1:
        what = f"predicts one class for every dev example (dev accuracy {fmt_score(dev['accuracy'])} is its share)"
    elif dev.get("spans_predicted") == 0:
        what = "finds no entity in any dev sentence"
    elif dev.get("span_f1") == 0:  # seen: 1 span over wnut16's 240 dev tweets after 7 steps, none of them right
        what = f"finds no dev entity right (span F1 0, {dev['spans_predicted']} span(s) predicted)"
    elif "baseline_f1" in dev and dev["f1"] < dev["baseline_f1"] + QA_MARGIN:
        what = (f"answers no better than the first {TRIVIAL_WORDS} words of each context (dev F1 "
                f"{fmt_score(dev['f1'])} against their {fmt_score(dev['baseline_f1'])})")
    else:
        return None
    # Which way to move depends on the task type (a longer warm-up saved sms_spam and sank wnut16; BENCHMARKS.md):
    # say what the run had, not a direction.
    settings = metrics.get("settings") or {}
    had = f" (now {settings['warmup']:g})" if settings.get("warmup") is not None else ""
    # a head with its own rate (a tagger's default) is a knob of its own: the one that moved wnut16 (BENCHMARKS.md)
    head = settings.get("head_learning_rate")
    head = f", --head-learning-rate (now {head:g})" if head is not None else ""
    return (f"the model {what}: it learned nothing else. Try another --learning-rate (now "
            f"{metrics['learning_rate']:g}){head} or --warmup{had}, or more --epochs or training examples")
