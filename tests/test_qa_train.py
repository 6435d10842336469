"""Extractive QA end to end (issue 16) on real Ray, real Parquet, the real MiniLM and real SQuAD v1.1 questions:
a cache of windows, a recycled model trained on it, scored with the official EM and F1, and its answers predicted
from the cache and from raw text."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from er_ray import cache, predict, qa, tasks
from er_ray.cache import open_cache
from er_ray.options import TrainOptions
from er_ray.train import train

# 128-token windows: most SQuAD contexts (~160 tokens) need two or more, so decoding across windows is exercised
OPTS = dict(max_length=128, epochs=2, batch_size=16, cut_layer=3, adapter="lora", adapter_size=16)


@pytest.fixture(scope="module")
def squad_small(tmp_path_factory):
    """A SQuAD task of one's own: the first 300 training questions and 50 questions each of the dev and test
    articles (whole questions, untouched). (300, not 500: the fixture's cost is its training; 300 took 171 s and
    test F1 0.29 here, 500 took 229 s.)"""
    d = tmp_path_factory.mktemp("squad_small")
    squad = tasks.load_task("squad")
    parts = [squad.splits["train"].slice(0, 300), squad.splits["dev"].slice(0, 50),
             squad.splits["test"].slice(0, 50)]
    table = pa.concat_tables([p.append_column("split", pa.array([s] * p.num_rows)) for p, s in
                              zip(parts, ("train", "dev", "test"))])
    pq.write_table(table, d / "squad_small.parquet")
    spec = d / "squad_small.yaml"
    spec.write_text("name: squad_small\ntype: question_answering\nfiles: squad_small.parquet\n")
    return spec


@pytest.fixture(scope="module")
def trained(ray_local, squad_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("qa_runs")
    (m,) = train(TrainOptions(task=[str(squad_small)], output=str(out), **OPTS))
    return m, out


def test_the_cache_holds_a_row_per_window(trained, squad_small, tmp_path):
    _, out = trained
    (root,) = (out / "caches").glob("squad_small-*")
    c = open_cache(root, 3)
    assert c.manifest.question_answering and c.manifest.stride == qa.stride(128)
    assert json.loads((root / "layer=3" / "manifest.json").read_text())["format_version"] == 2
    t = c.read(["id", "question_id", "length", "offset_start", "offset_end"])
    questions = set(t.column("question_id").to_pylist())
    assert len(questions) == 400 < t.num_rows  # every question, and more windows than questions
    row = t.slice(0, 1).to_pylist()[0]
    assert row["id"].startswith(row["question_id"] + "#") and len(row["offset_start"]) == row["length"]
    assert row["offset_start"][0] == -1  # [CLS] is not context
    # `er-ray cache verify` passes it: a QA shard is named by its questions, not its windows (it said BAD once)
    assert cache.verify(root) == []
    copy = shutil.copytree(root, tmp_path / "copy")  # the later tests read this cache: spoil a copy
    shard = next((copy / "layer=3").glob("part-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert cache.verify(copy) == [f"{shard}: checksum mismatch (sha256 differs from the manifest)"]


def test_a_recycled_model_learns_to_answer(trained):
    m, _ = trained
    assert m["metric"] == "f1" and m["recycled"] and m["cut_layer"] == 3
    assert set(m["dev_all"]) >= {"f1", "exact_match", "examples"} and m["dev_all"]["examples"] == 50
    # The schedule is planned in windows, the rows the loop steps through: the learning rate reaches zero at the
    # last step, not before (planned in questions, it reached zero in epoch 1 and epoch 2 changed nothing).
    lrs = [h["learning_rate"] for h in m["history"]]
    assert lrs[0] > 1e-4 and lrs[-1] < 1e-9, lrs
    assert m["history"][0]["dev_score"] != m["history"][1]["dev_score"], m["history"]
    # An untrained head answers with a near-random span: F1 of a few percent. Measured with 1,000 questions: test
    # F1 0.52 (EM 0.41), and 0.34 while the schedule was cut short; with this fixture's 300, 0.29. See
    # BENCHMARKS.md for the figures over k.
    assert m["test"] > 0.2, m


def test_full_fine_tuning_answers_from_text_windows(ray_local, squad_small, tmp_path):
    """The baseline: the whole model trains from text, its windows cut on the driver as the cache's are."""
    (m,) = train(TrainOptions(task=[str(squad_small)], output=str(tmp_path), full_finetune=True,
                              **dict(OPTS, epochs=1, max_train_examples=100)))
    assert m["metric"] == "f1" and m["full_finetune"] and 0 <= m["test"] <= 1 and m["dev_all"]["examples"] == 50
    assert m["history"][-1]["learning_rate"] < 1e-9 and m["epochs_run"] == 1


def test_answers_from_the_cache_and_from_text_agree_and_score_as_the_run_did(trained, squad_small, tmp_path):
    """The corpus: the test questions as plain files (id, question, context), not the task: --context-column."""
    m, out = trained
    run = out / "runs" / m["run"]
    (root,) = (out / "caches").glob("squad_small-*")
    test = tasks.load_task(str(squad_small)).splits["test"]
    pq.write_table(test.select(["id", "question", "context"]), tmp_path / "questions.parquet")
    corpus = dict(corpus=[str(tmp_path / "questions.parquet")], text_column="question", context_column="context")
    a = predict.predict(predict.PredictOptions(run=str(run), cache=str(root), output=str(tmp_path / "from_cache"),
                                               **corpus))
    b = predict.predict(predict.PredictOptions(run=str(run), output=str(tmp_path / "from_text"), **corpus))
    ca = {r["id"]: r["answer"] for r in pq.read_table(a / "predictions.parquet").to_pylist()}
    tb = {r["id"]: r["answer"] for r in pq.read_table(b / "predictions.parquet").to_pylist()}
    assert len(ca) == len(tb) == 50
    differ = [q for q in ca if ca[q] != tb[q]]
    assert len(differ) <= 2, differ  # fp16 cache vs fp32 text: near-ties only (6 of 600 questions once)
    refs = dict(zip(test.column("id").to_pylist(), test.column("answers").to_pylist()))
    assert qa.squad_scores(ca, refs)["f1"] / 100 == pytest.approx(m["test"], abs=0.02)
