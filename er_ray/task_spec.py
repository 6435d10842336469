"""Task specs: a task's type, files and columns, read and checked (`load_spec`). The built-in tasks and
`load_task` (a name or a spec) are er_ray.tasks.

A task is a name, a type (`classification`, `token_classification` or `question_answering`), and files: one per
split (`{"train": ..., "dev": ..., "test": ...}`) or one file with a `split` column. Files are Parquet, CSV or
JSONL. Classification rows carry text + label; token classification rows carry tokens + tags (lists of equal
length; in CSV, whitespace-separated strings); extractive question answering rows carry question, context,
answer_text and answer_start (the answer's first character in the context), and on dev and test optionally
`answers`, every reference answer's text (default: answer_text). Every row has an id (the key into the activation
cache; a QA row is a question, cached as the windows of its question + context); tasks that name the same `corpus`
share one cache.

    er-ray tasks                       # the built-in tasks, with sizes and label sets
    load_task("trec")                  # a built-in task (prepared once from its registry package)
    load_task("my_task.yaml")          # your own spec: a YAML or JSON file with TaskSpec's fields
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import assets
from .corpus import Corpus, DataError, read_table

SPLITS = ("train", "dev", "test")
TaskType = Literal["classification", "token_classification", "question_answering"]
TASK_TYPES = ("classification", "token_classification", "question_answering")


class TaskError(DataError):
    """A task spec or task file is unusable; the message names the file, the row (1 = first data row) and the
    field."""


@dataclass
class TaskSpec:
    name: str
    type: TaskType = "classification"
    files: dict[str, str] | str = field(default_factory=dict)
    """One file per split {"train": path, "dev": path, "test": path}, or one file with a `split_column`."""
    id_column: str | None = "id"
    """Unique document id (the cache key). None: ids are made as '<task>/<split>/<row>'."""
    text_column: str = "text"
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    split_column: str = "split"
    question_column: str = "question"
    context_column: str = "context"
    answer_text_column: str = "answer_text"
    answer_start_column: str = "answer_start"
    answers_column: str = "answers"
    """question answering: every reference answer of a dev/test question (optional; default its answer_text)"""
    corpus: str | None = None
    """Tasks naming the same corpus share one activation cache (default: the task's own name)."""
    description: str = ""

    def __post_init__(self):
        if self.type not in TASK_TYPES:
            raise TaskError(f"task {self.name!r}: type must be one of {', '.join(TASK_TYPES)}, not {self.type!r}")
        if isinstance(self.files, dict):
            unknown = set(self.files) - set(SPLITS)
            if unknown or "train" not in self.files:
                raise TaskError(f"task {self.name!r}: files must map splits {SPLITS} (train required) to paths; "
                                f"got {sorted(self.files)}")
        self.corpus = self.corpus or self.name

    @classmethod
    def from_file(cls, path: str | Path) -> TaskSpec:
        path = Path(path)
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml  # ray depends on PyYAML

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as e:
            raise TaskError(f"cannot read task spec {path}: {e}") from None
        if not isinstance(raw, dict):
            raise TaskError(f"task spec {path}: expected a mapping of TaskSpec fields")
        known = {f.name for f in fields(cls)}
        if unknown := set(raw) - known:
            raise TaskError(f"task spec {path}: unknown fields {sorted(unknown)} (known: {sorted(known)})")
        base = path.parent  # relative data paths are relative to the spec file
        files = raw.get("files", {})
        rel = (lambda p: str(p if Path(p).is_absolute() or "://" in p else base / p))
        raw["files"] = {k: rel(v) for k, v in files.items()} if isinstance(files, dict) else rel(files)
        raw.setdefault("name", path.stem)
        return cls(**raw)


@dataclass
class Task:
    """A loaded, validated task: per split a table of id + text/tokens + label/tags (labels as strings)."""

    spec: TaskSpec
    splits: dict[str, pa.Table]
    labels: list[str]
    """Class names (classification) or BIO tag set (token classification), sorted, from the train split; for
    question answering the two things its head scores per token, start and end."""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def input_column(self) -> str:
        """The document's text column (for question answering, its question; the context is `context`)."""
        return {"classification": "text", "token_classification": "tokens"}.get(self.type, "question")

    @property
    def target_column(self) -> str:
        return {"classification": "label", "token_classification": "tags"}.get(self.type, "answer_start")

    def documents(self) -> pa.Table:
        """All documents of all splits (id + text, tokens, or question + context): what the cache must hold."""
        cols = ["id", self.input_column] + (["context"] if self.type == "question_answering" else [])
        return pa.concat_tables([t.select(cols) for t in self.splits.values()])

    def corpus(self) -> Corpus:
        """The task's documents as a corpus to cache: a built-in's own file; a user task's documents written
        once, normalised (id + text, tokens or question + context), under $ER_RAY_HOME/corpora/."""
        token = self.type == "token_classification"
        context = "context" if self.type == "question_answering" else None
        if isinstance(self.spec.files, str) and self.spec.id_column == "id":
            return Corpus([self.spec.files], "id", self.input_column, token, context)
        path = assets.home() / "corpora" / f"{self.spec.corpus}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.documents(), path)
        return Corpus([str(path)], "id", self.input_column, token, context)

    def sizes(self) -> dict[str, int]:
        return {s: t.num_rows for s, t in self.splits.items()}


# ---------------------------------------------------------------------------------------------------------------
# Validating task files (reading them is er_ray.corpus)


def _column(table: pa.Table, name: str, path: str, what: str) -> list:
    if name not in table.column_names:
        raise TaskError(f"{path}, row 1, field {name!r}: missing {what} column (columns: {table.column_names})")
    return table.column(name).to_pylist()


def _validate(spec: TaskSpec, table: pa.Table, path: str, split: str) -> pa.Table:
    """Check one split's rows and normalise them to id + text/tokens + label/tags (strings)."""
    n = table.num_rows
    if n == 0:
        raise TaskError(f"{path}: split {split!r} has no rows")
    if spec.id_column:
        ids = _column(table, spec.id_column, path, "id")
        for i, v in enumerate(ids):
            if v is None or str(v) == "":
                raise TaskError(f"{path}, row {i + 1}, field {spec.id_column!r}: empty id")
        ids = [str(v) for v in ids]
    else:
        ids = [f"{spec.name}/{split}/{i}" for i in range(n)]
    if spec.type == "classification":
        texts = _column(table, spec.text_column, path, "text")
        labels = _column(table, spec.label_column, path, "label")
        for i, (t, y) in enumerate(zip(texts, labels)):
            if not isinstance(t, str):
                raise TaskError(f"{path}, row {i + 1}, field {spec.text_column!r}: text must be a string, "
                                f"got {type(t).__name__} {t!r:.40}")
            if not t.strip():
                raise TaskError(f"{path}, row {i + 1}, field {spec.text_column!r}: empty text")
            if y is None or str(y) == "":
                raise TaskError(f"{path}, row {i + 1}, field {spec.label_column!r}: missing label")
        return pa.table({"id": ids, "text": texts, "label": [_label(y) for y in labels]})
    if spec.type == "question_answering":
        return _validate_qa(spec, table, path, ids)
    tokens = _column(table, spec.tokens_column, path, "tokens")
    tags = _column(table, spec.tags_column, path, "tags")
    out_tokens, out_tags = [], []
    for i, (toks, tg) in enumerate(zip(tokens, tags)):
        toks, tg = _words(toks), _words(tg)
        if toks is None or not toks or not all(isinstance(t, str) and t for t in toks):
            raise TaskError(f"{path}, row {i + 1}, field {spec.tokens_column!r}: tokens must be a non-empty list "
                            f"of non-empty strings")
        if tg is None or len(tg) != len(toks):
            raise TaskError(f"{path}, row {i + 1}, field {spec.tags_column!r}: {len(toks)} tokens but "
                            f"{len(tg) if tg is not None else 'no'} tags")
        out_tokens.append(toks)
        out_tags.append([str(t) for t in tg])
    return pa.table({"id": ids, "tokens": pa.array(out_tokens, pa.list_(pa.string())),
                     "tags": pa.array(out_tags, pa.list_(pa.string()))})


def _validate_qa(spec: TaskSpec, table: pa.Table, path: str, ids: list[str]) -> pa.Table:
    """Question answering rows: a question, its context, and an answer that is where answer_start says."""
    questions = _column(table, spec.question_column, path, "question")
    contexts = _column(table, spec.context_column, path, "context")
    texts = _column(table, spec.answer_text_column, path, "answer text")
    starts = _column(table, spec.answer_start_column, path, "answer start")
    refs = table.column(spec.answers_column).to_pylist() if spec.answers_column in table.column_names else \
        [None] * table.num_rows
    out_starts, out_refs = [], []
    for i, (q, c, a, st, r) in enumerate(zip(questions, contexts, texts, starts, refs)):
        where = f"{path}, row {i + 1}, field"
        for name, v in ((spec.question_column, q), (spec.context_column, c), (spec.answer_text_column, a)):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise TaskError(f"{where} {name!r}: empty {name.replace('_', ' ')}")
            if not isinstance(v, str):
                raise TaskError(f"{where} {name!r}: must be a string, got {type(v).__name__} {v!r:.40}")
        try:
            st = int(st)
        except (TypeError, ValueError):
            raise TaskError(f"{where} {spec.answer_start_column!r}: not a character position: {st!r:.40}") from None
        if c[st:st + len(a)] != a:
            raise TaskError(f"{where} {spec.answer_start_column!r}: the answer {a!r:.60} is not at character {st} "
                            f"of its context (found {c[st:st + len(a)]!r:.60})")
        r = _words(r) if not isinstance(r, str) else [r]
        if r is not None and not all(isinstance(x, str) and x.strip() for x in r):
            raise TaskError(f"{where} {spec.answers_column!r}: reference answers must be non-empty strings")
        out_starts.append(st)
        out_refs.append(list(r) if r else [a])
    return pa.table({"id": ids, "question": questions, "context": contexts, "answer_text": texts,
                     "answer_start": pa.array(out_starts, pa.int32()),
                     "answers": pa.array(out_refs, pa.list_(pa.string()))})


def _label(y) -> str:
    # 1.0 from a float column and "1" from CSV are the same class.
    return str(int(y)) if isinstance(y, float) and y.is_integer() else str(y)


def _words(v):
    return v.split() if isinstance(v, str) else v


def load_spec(spec: TaskSpec) -> Task:
    """Read and validate a task's files."""
    splits: dict[str, pa.Table] = {}
    if isinstance(spec.files, str):
        table = read_table(spec.files)
        split_col = _column(table, spec.split_column, spec.files, "split")
        if bad := sorted({str(s) for s in split_col} - set(SPLITS)):
            row = next(i for i, s in enumerate(split_col) if str(s) in bad) + 1
            raise TaskError(f"{spec.files}, row {row}, field {spec.split_column!r}: unknown split {bad[0]!r} "
                            f"(use {', '.join(SPLITS)})")
        arr = np.array(split_col, dtype=object)
        rows = {}  # per split, the file's row number of each of its rows
        for s in SPLITS:
            idx = np.flatnonzero(arr == s)
            if len(idx):
                splits[s] = _validate(spec, table.take(idx), spec.files, s)
                rows[s] = (idx + 1).tolist()
        if "train" not in splits:
            raise TaskError(f"{spec.files}, field {spec.split_column!r}: no 'train' rows")
        paths = dict.fromkeys(splits, spec.files)
    else:
        paths = spec.files
        for s, p in spec.files.items():
            splits[s] = _validate(spec, read_table(p), p, s)
        rows = {s: list(range(1, t.num_rows + 1)) for s, t in splits.items()}
    if spec.type == "question_answering":  # nothing to check across splits but the ids
        _unique_ids(spec, splits, rows, paths)
        return Task(spec, splits, ["start", "end"])
    target = "label" if spec.type == "classification" else "tags"
    flat = (lambda t: t.column(target).to_pylist() if target == "label"
            else [x for row in t.column(target).to_pylist() for x in row])
    labels = sorted(set(flat(splits["train"])))
    if spec.type == "classification" and len(labels) < 2:
        raise TaskError(f"{paths['train']}, field {spec.label_column!r}: every train row has the label {labels[0]!r}; "
                        f"a classifier needs at least two classes to learn from")
    for s, t in splits.items():
        if s == "train":
            continue
        for i, row in enumerate(t.column(target).to_pylist()):
            for y in ([row] if target == "label" else row):
                if y not in labels:
                    fld = spec.label_column if target == "label" else spec.tags_column
                    raise TaskError(f"{paths[s]}, row {i + 1}, field {fld!r}: {s} label {y!r} never appears in "
                                    f"train (train labels: {labels[:20]})")
    _unique_ids(spec, splits, rows, paths)
    return Task(spec, splits, labels)


def _unique_ids(spec: TaskSpec, splits: dict[str, pa.Table], rows: dict[str, list[int]], paths) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for s, t in splits.items():
        for i, x in zip(rows[s], t.column("id").to_pylist()):
            if x in seen:
                raise TaskError(f"{paths[s]}, row {i}, field {spec.id_column!r}: duplicate id {x!r} (first at "
                                f"{seen[x][0]}, row {seen[x][1]})")
            seen[x] = (paths[s], i)
