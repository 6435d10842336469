"""Extractive question answering (SQuAD v1.1): windows over long contexts, the best span across a question's
windows, and the official scores (exact match and F1).

A question + context pair longer than `max_length` tokens becomes several windows that overlap by `stride` tokens
(the fast tokenizer's overflow, the standard SQuAD preprocessing); each window keeps, per token, the character span
it covers in the context (None for the question's tokens and special tokens), so a span of tokens maps back to
the context's text. A window is trained on the answer's tokens when it holds the whole answer, else on its first
token (the [CLS] position: "no answer here"). Decoding takes the n best starts and ends of every window, keeps the
pairs that are a context span of at most `max_answer_tokens`, and answers with the best-scoring one of all windows.

The scores are those of the official evaluation script (evaluate-v1.1.py): answers are compared after lower-casing,
removing punctuation, the articles a/an/the and extra whitespace; each question takes its best over its reference
answers; the totals are percentages.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_LENGTH = 384  # the SQuAD defaults of BERT's reference code and of transformers' examples
STRIDE = 128
MAX_ANSWER_TOKENS = 30
TRIVIAL_WORDS = 5  # the trivial baseline answers with the context's first five words (F1 ~0.09 on SQuAD's dev)


def stride(max_length: int) -> int:
    """The tokens consecutive windows share: 128 at SQuAD's 384, a third of shorter windows (the tokenizer refuses
    a stride that leaves no room for new context)."""
    return min(STRIDE, max_length // 3)
N_BEST = 20

# ---------------------------------------------------------------------------------------------------------------
# SQuAD files


class QAError(ValueError):
    """A question-answering file is unusable; the message names the file, the row (1 = its first question, in file
    order) and the field."""


def squad_rows(raw: bytes, path: str) -> dict[str, list]:
    """A SQuAD v1.1 JSON file -> one row per question: id, title (its article), question, context, answer_text and
    answer_start (the first reference answer: what training uses), answers (every reference text: what scoring
    uses)."""
    cols: dict[str, list] = {k: [] for k in ("id", "title", "question", "context", "answer_text", "answer_start",
                                              "answers")}
    row = 0
    for article in json.loads(raw)["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                row += 1
                if not str(qa.get("question", "")).strip():
                    raise QAError(f"{path}, row {row}, field 'question': empty question (id {qa.get('id')!r})")
                if not qa.get("answers"):
                    raise QAError(f"{path}, row {row}, field 'answers': no answer (id {qa['id']!r})")
                for a in qa["answers"]:
                    start, text = a["answer_start"], a["text"]
                    if context[start:start + len(text)] != text:
                        raise QAError(f"{path}, row {row}, field 'answer_start': answer {text!r} is not at "
                                      f"character {start} of its context (id {qa['id']!r})")
                first = qa["answers"][0]
                for k, v in (("id", qa["id"]), ("title", article["title"]), ("question", qa["question"]),
                             ("context", context), ("answer_text", first["text"]),
                             ("answer_start", first["answer_start"]), ("answers", [a["text"] for a in qa["answers"]])):
                    cols[k].append(v)
    return cols


def split_by_article(titles: Sequence[str], seed: int = 0) -> list[str]:
    """dev or test per row, half the articles each (seeded): no context is shared between the two."""
    articles = sorted(set(titles))
    order = np.random.default_rng(seed).permutation(len(articles))
    dev = {articles[i] for i in order[: len(articles) // 2]}
    return ["dev" if t in dev else "test" for t in titles]


# ---------------------------------------------------------------------------------------------------------------
# The official SQuAD v1.1 scores

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: evaluate-v1.1.py's normalisation."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:  # v1.1 has no special case for empty answers: an empty prediction scores 0
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, references: Sequence[str]) -> float:
    return max(_f1(prediction, r) for r in references)


def squad_scores(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, float]:
    """exact_match and f1 in percent over the questions of `references` (a question without a prediction scores
    0, as in the official script)."""
    if not references:
        raise ValueError("no questions to score")
    em = f1 = 0.0
    for qid, refs in references.items():
        if qid in predictions:
            em += exact_match(predictions[qid], refs)
            f1 += f1_score(predictions[qid], refs)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "questions": n}


# ---------------------------------------------------------------------------------------------------------------
# Windows


@dataclass
class Window:
    question: int
    """index of the question (row) this window belongs to"""
    index: int
    """its position among the question's windows"""
    input_ids: list[int]
    offsets: list[tuple[int, int] | None]
    """per token, the (start, end) characters of the context it covers; None outside the context"""
    start: int = 0
    end: int = 0
    """the answer's first and last token (training), 0 and 0 when the window does not hold the whole answer"""


def windows(tokenizer, questions: Sequence[str], contexts: Sequence[str], answer_starts: Sequence[int] | None = None,
            answer_texts: Sequence[str] | None = None) -> list[Window]:
    """The windows of question + context pairs, with their answer tokens when answers are given. `tokenizer`:
    `er_ray.tokenizer.qa_tokenizer_for(folder, max_length, stride)`, the Rust tokenizer set to cut the context
    only, into windows of max_length tokens overlapping by stride (what transformers' fast tokenizers do with
    `return_overflowing_tokens=True`; the cache's windows and a text run's are the same)."""
    out = []
    for q, enc in enumerate(tokenizer.encode_batch(list(zip(questions, contexts)))):
        for w, part in enumerate([enc] + enc.overflowing):
            offsets = [tuple(o) if s == 1 else None for o, s in zip(part.offsets, part.sequence_ids)]
            win = Window(q, w, part.ids, offsets)
            if answer_starts is not None:
                win.start, win.end = answer_tokens(offsets, answer_starts[q], answer_starts[q] + len(answer_texts[q]))
            out.append(win)
    return out


def window_columns(wins: Sequence[Window], ids: Sequence[str]) -> dict:
    """Windows as the cache's columns (`ids`: each question's id): id `<question id>#<window>`, question_id,
    input_ids, and offset_start/offset_end (-1 outside the context). The cache's shards and a text run's windows
    are written by this one function, and read back by `offsets`."""
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return {"id": [f"{ids[w.question]}#{w.index}" for w in wins], "question_id": [ids[w.question] for w in wins],
            "input_ids": pa.array([w.input_ids for w in wins], ints),
            "offset_start": pa.array([[-1 if o is None else o[0] for o in w.offsets] for w in wins], ints),
            "offset_end": pa.array([[-1 if o is None else o[1] for o in w.offsets] for w in wins], ints)}


def offsets(table) -> list[list[tuple[int, int] | None]]:
    """Each window row's token offsets (None outside the context), from `window_columns`' two columns."""
    return [[None if a < 0 else (a, b) for a, b in zip(s, e)] for s, e in
            zip(table.column("offset_start").to_pylist(), table.column("offset_end").to_pylist())]


def answer_tokens(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
    """The first and last token of the characters [start_char, end_char) in a window, or (0, 0) when the window
    does not cover them all."""
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return 0, 0
    first = next(i for i in inside if offsets[i][1] > start_char)
    last = next(i for i in reversed(inside) if offsets[i][0] < end_char)
    return first, last


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def window_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence[tuple[int, int] | None],
                n_best: int = N_BEST, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> tuple[int, int, float]:
    """One window's best span: the (first, end) context characters and score (start + end logit) of the best pair
    of its n best starts and ends that is a context span, start <= end, at most `max_answer_tokens` long; (0, 0,
    -inf) if none. A question's answer is its windows' best (a window's best is the best of the union's that lies
    in it), so windows can be decoded apart and the best kept."""
    s_log, e_log = np.asarray(start_logits), np.asarray(end_logits)
    best = (0, 0, -np.inf)
    for s in np.argsort(s_log)[::-1][:n_best]:
        if offsets[s] is None:
            continue
        for e in np.argsort(e_log)[::-1][:n_best]:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_tokens:
                continue
            if s_log[s] + e_log[e] > best[2]:
                best = (offsets[s][0], offsets[e][1], float(s_log[s] + e_log[e]))
    return best


def best_span(start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
              offsets: Sequence[Sequence[tuple[int, int] | None]], context: str, n_best: int = N_BEST,
              max_answer_tokens: int = MAX_ANSWER_TOKENS) -> tuple[str, float]:
    """The answer to one question from its windows' start and end logits: the best window span (`window_span`)
    over all windows, as text; ("", -inf) if none."""
    first, end, score = max((window_span(s, e, o, n_best, max_answer_tokens)
                             for s, e, o in zip(start_logits, end_logits, offsets)), key=lambda b: b[2])
    return (context[first:end], score) if score > -np.inf else ("", score)


def score_windows(windows: Sequence[tuple]) -> dict[str, float]:
    """Exact match and F1 (fractions, not percent: every er_ray metric is) of the answers decoded from windows
    given as (question id, offsets, context, reference answers, start logits, end logits), in any order."""
    by_question: dict[str, list[tuple]] = {}
    for w in windows:
        by_question.setdefault(w[0], []).append(w)
    predictions, references = {}, {}
    for qid, ws in by_question.items():
        predictions[qid] = best_span([w[4] for w in ws], [w[5] for w in ws], [w[1] for w in ws], ws[0][2])[0]
        references[qid] = ws[0][3]
    scores = squad_scores(predictions, references)
    # QA's majority class: the first words of each context, scored the same way. A model at or below it learned
    # nothing (LoRA at 1e-2 sat there on SQuAD: dev F1 0.04-0.07 against 0.09; BENCHMARKS.md).
    trivial = squad_scores({q: first_words(ws[0][2]) for q, ws in by_question.items()}, references)
    return {"f1": scores["f1"] / 100, "exact_match": scores["exact_match"] / 100, "examples": scores["questions"],
            "baseline_f1": trivial["f1"] / 100}


def first_words(context: str, n: int = TRIVIAL_WORDS) -> str:
    """The trivial answer: the context's first `n` words."""
    return " ".join(context.split()[:n])


def answers(wins: Sequence[Window], start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray],
            ids: Sequence[str], contexts: Sequence[str], n_best: int = N_BEST,
            max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict[str, str]:
    """Each question's answer (by its id) from the logits of all its windows."""
    by_question: dict[int, list[int]] = {}
    for i, w in enumerate(wins):
        by_question.setdefault(w.question, []).append(i)
    return {ids[q]: best_span([start_logits[i] for i in ws], [end_logits[i] for i in ws],
                              [wins[i].offsets for i in ws], contexts[q], n_best, max_answer_tokens)[0]
            for q, ws in by_question.items()}
