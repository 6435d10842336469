"""Task models from the cache: real Ray Train + DeepSpeed, the real MiniLM, real tasks."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import all_cpus_free

from er_ray import predict, tasks
from er_ray.metrics import bio_spans, f1, span_counts
from er_ray.defaults import (DEFAULT_LR, default_adapter, default_head_learning_rate, default_learning_rate,
                             default_warmup)
from er_ray.options import TrainOptions
from er_ray.train import finished_run, run_name, train

ER_RAY = str(Path(sys.executable).with_name("er-ray"))
FAST = dict(epochs=2, batch_size=32, max_length=64, max_train_examples=1200)


def majority(task) -> float:
    labels = task.splits["test"].column("label").to_pylist()
    return max(labels.count(y) for y in set(labels)) / len(labels)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def trec_cache(out: Path) -> Path:
    """The TREC cache the trec_lora fixture built (the wnut16 test adds its own cache beside it)."""
    (cache,) = (out / "caches").glob("trec-*")
    return cache


@pytest.fixture(scope="module")
def trec_lora(ray_local, out):
    return train(TrainOptions(task=["trec"], adapter="lora", adapter_size=8, output=str(out), **FAST))[0]


def test_recycled_lora_learns_trec(trec_lora, out):
    m = trec_lora
    base = majority(tasks.load_task("trec"))
    assert m["metric"] == "accuracy" and m["recycled"] and m["cut_layer"] == 3
    assert m["test"] >= base + 0.4, f"test accuracy {m['test']:.3f} vs majority {base:.3f}"
    # LoRA rank 8 on the six linear maps of each of the 3 upper layers (q, k, v, attention out: 384 -> 384; the
    # feed-forward's 384 -> 1536 and back), + the head
    assert m["trainable_parameters"] == 3 * 8 * (4 * (384 + 384) + 2 * (384 + 1536)) + 384 * 6 + 6
    run = out / "runs" / "trec-k3-lora8-s0"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("task", "metric", "dev", "test", "train_seconds", "examples_per_second", "trainable_parameters",
                "cut_layer", "adapter", "adapter_size", "model"):
        assert saved[key] is not None, key
    assert (run / "model" / "peft_adapter" / "adapter_config.json").exists()
    assert (out / "results.parquet").exists()
    # MFU: the step's model FLOP/s against the matmul peak the worker measured at its start (er_ray.flops)
    assert saved["matmul_peak_flops"] > 1e8 and 0.01 < saved["mfu"] <= 1.0, saved["mfu"]
    assert all(0 < h["mfu"] <= 1.0 for h in saved["history"])
    # the timeline (issue 17): every phase of the run, in the order they happen, adding up to (nearly) its total
    tl = saved["timeline"]
    assert list(tl) == ["ray_start", "data", "workers_start", "model_setup", "train", "evaluate", "checkpoint",
                        "finish", "publish", "total"], tl
    assert all(v >= 0 for v in tl.values()) and tl["train"] == pytest.approx(saved["train_seconds"])
    assert tl["workers_start"] > 1 and tl["model_setup"] > 0.5 and tl["evaluate"] > 0
    phases = sum(v for k, v in tl.items() if k != "total")
    assert 0.8 * tl["total"] <= phases <= tl["total"] + 0.5, tl  # what no phase names: Ray Train's own steps


@pytest.fixture(scope="module")
def trec_bottleneck(trec_lora, out):
    """A second adapter kind over the same cache and cut layer (the several-runs predict test reads it too)."""
    return train(TrainOptions(task=["trec"], adapter="bottleneck", adapter_size=32,  # the kind's default lr
                              output=str(out), **FAST))[0]


def test_recycled_bottleneck_learns_trec(trec_bottleneck):
    assert trec_bottleneck["adapter"] == "bottleneck"
    assert trec_bottleneck["test"] >= majority(tasks.load_task("trec")) + 0.4, trec_bottleneck["test"]


def test_recycled_full_upper_layers_learn_trec(trec_lora, out):
    m = train(TrainOptions(task=["trec"], adapter="full", output=str(out), **FAST))[0]
    assert m["adapter"] == "full" and m["adapter_size"] is None
    assert m["test"] >= majority(tasks.load_task("trec")) + 0.4, m["test"]
    assert m["trainable_parameters"] > 5_000_000  # three whole transformer layers of MiniLM


def test_a_finished_run_is_reused_only_under_its_own_settings(trec_lora, out, capsys):
    """A resumed study reads finished runs instead of training them again, but a run name does not say everything:
    a wnut16 run trained at the old token default (3e-3) had the new default's (1e-3) name."""
    opts = TrainOptions(task=["trec"], adapter="lora", adapter_size=8, output=str(out), **FAST)
    name = "trec-k3-lora8-s0"
    assert finished_run(opts, name, "classification") == trec_lora
    for changed, said in ((dict(learning_rate=1e-3), "learning_rate 0.003 -> 0.001"),
                          (dict(epochs=3), "epochs 2 -> 3"), (dict(max_train_examples=600), "1200 -> 600"),
                          (dict(precision="bf16"), "precision fp32 -> bf16")):  # "auto" is what it resolved to
        assert finished_run(dataclasses.replace(opts, **changed), name, "classification") is None
        assert said in capsys.readouterr().err
    assert finished_run(opts, "trec-k3-lora8-s9", "classification") is None  # never trained


def test_wnut16_reports_span_f1_and_its_default_recipe_finds_entities(ray_local, out):
    # The study's budget (1,000 sentences x 2 epochs) at the seed where LoRA warming up over a quarter of the steps
    # found no entity (BENCHMARKS.md, "the warm-up"); the default is now the whole upper layers at tagging's own
    # rate (1e-4: mpnet learns nothing at classification's 3e-4), its head at its own (test span F1 0.386 on this
    # seed here: BENCHMARKS.md, "The tagging body's rate on mpnet").
    m = train(TrainOptions(task=["wnut16"], output=str(out), epochs=2, max_train_examples=1000, seed=1,
                           max_length=128))[0]
    assert m["metric"] == "span_f1" and "token_accuracy" in m["test_all"]
    assert m["adapter"] == default_adapter("token_classification") == "full"
    assert m["learning_rate"] == default_learning_rate("full", "token_classification") == 1e-4 != DEFAULT_LR["full"]
    assert m["settings"]["warmup"] == default_warmup("full", "token_classification")
    assert m["settings"]["head_learning_rate"] == default_head_learning_rate("full", "token_classification") == 1e-2
    # It finds whole entities, on dev and on test: predicting "O" everywhere (94.7% of test words) scores 0 here.
    assert m["dev"] > 0.0 and m["test"] > 0.0, (m["dev"], m["test"])
    assert m["test"] == m["test_all"]["span_f1"] and m["dev_all"]["spans_predicted"] > 0
    assert m["test"] > 0.3, m["test"]  # 0.386 measured; the tags' prior (no entity) scores 0


def test_a_model_with_one_answer_for_everything_is_told_not_just_scored():
    from er_ray.metrics import learned_nothing

    def run(**dev):
        return {"dev_all": dev, "learning_rate": 3e-3}

    said = learned_nothing(run(accuracy=0.8678, examples=484, classes_predicted=1))  # sms_spam seed 1, as seen
    assert "one class for every dev example" in said and "0.8678" in said and "--learning-rate (now 0.003)" in said
    said = learned_nothing({**run(classes_predicted=1, accuracy=0.55), "settings": {"warmup": 0.25}})
    assert "--warmup (now 0.25)" in said, said  # what the run had, not a direction (it depends on the task type)
    assert "no entity" in learned_nothing(run(span_f1=0.0, spans_predicted=0))
    said = learned_nothing({**run(span_f1=0.0, spans_predicted=0), "settings": {"head_learning_rate": 1e-2}})
    assert "--learning-rate (now 0.003), --head-learning-rate (now 0.01) or --warmup" in said, said  # its own knob
    assert "--head-learning-rate" not in learned_nothing(run(classes_predicted=1, accuracy=0.55))  # one rate: not
    assert learned_nothing(run(accuracy=0.61, classes_predicted=3)) is None
    # a few spans, none right, is no better (seen: 1 span over 240 tweets); some right is a score, not this
    said = learned_nothing(run(span_f1=0.0, spans_predicted=1))
    assert "no dev entity right (span F1 0, 1 span(s) predicted)" in said, said
    assert learned_nothing(run(span_f1=0.12, spans_predicted=12)) is None
    assert learned_nothing(run(f1=0.5)) is None and learned_nothing({"learning_rate": 1e-3}) is None
    # QA: LoRA at 1e-2 on SQuAD (dev F1 0.066 where the first five words of each context score 0.092)
    said = learned_nothing(run(f1=0.066, exact_match=0.005, baseline_f1=0.092))
    assert "no better than the first 5 words of each context" in said and "0.0660" in said, said
    assert learned_nothing(run(f1=0.45, exact_match=0.3, baseline_f1=0.092)) is None


def test_a_run_restored_finished_is_not_timed_as_if_trained_now():
    """Seen: a command re-run into an output folder whose runs/ was deleted (ray/ kept) printed "workers 0.0 s, ...,
    publish 52.7 s" under "23.7 s in all": Ray Train had read the earlier command's finished run back."""
    from er_ray.train import complete_timeline, fmt_timeline

    now = time.time()
    worker = {"model_setup": 7.0, "train": 30.0, "evaluate": 2.0, "checkpoint": 1.0, "finish": 3.0}
    earlier = {"started_at": now - 3600, "finished_at": now - 3550, "timeline": dict(worker)}
    complete_timeline(earlier, {"ray_start": 4.0, "data": 1.0}, fit_started=now - 2)
    tl = earlier["timeline"]
    assert earlier["earlier_timeline"] == worker and "train" not in tl and "publish" not in tl
    assert 2 <= tl["restored"] < 3 and 7 <= tl["total"] < 8
    assert "read back (an earlier command trained it)" in fmt_timeline(tl)
    trained = {"started_at": now - 40, "finished_at": now - 1, "timeline": dict(worker)}
    complete_timeline(trained, {"ray_start": 4.0, "data": 1.0}, fit_started=now - 50)
    assert {"workers_start", "train", "publish"} <= set(trained["timeline"]) and "restored" not in trained["timeline"]
    assert 9 <= trained["timeline"]["workers_start"] < 11


def test_runs_that_differ_in_learning_rate_get_their_own_folders():
    base = dict(task=["trec"], cut_layer=3, adapter="lora", output="unused")
    names = {run_name(TrainOptions(**base, **o), "trec", 6, "classification") for o in
             (dict(), dict(learning_rate=DEFAULT_LR["lora"]), dict(learning_rate=2e-2), dict(adapter_size=8),
              dict(full_finetune=True), dict(full_finetune=True, learning_rate=3e-5))}
    assert names == {"trec-k3-lora16-s0", "trec-k3-lora16-lr0.02-s0", "trec-k3-lora8-s0",  # the default is unnamed
                     "trec-finetune-s0", "trec-finetune-lr3e-05-s0"}
    # Token classification has its own default: unnamed there, named where it is not the default.
    tokens = default_learning_rate("lora", "token_classification")
    assert [run_name(TrainOptions(**base, learning_rate=lr), "wnut16", 6, "token_classification")
            for lr in (None, tokens, DEFAULT_LR["lora"])] == \
        ["wnut16-k3-lora16-s0", "wnut16-k3-lora16-s0", f"wnut16-k3-lora16-lr{DEFAULT_LR['lora']:g}-s0"]


def test_fine_tuning_has_its_own_default_rate_apart_from_the_whole_upper_layers():
    """`full` (recycled: layers k+1..L trained) and fine-tuning (every layer, from text) both train whole layers,
    but their rates come from different grids (BENCHMARKS.md): one must not move the other."""
    full = TrainOptions(task=["trec"], adapter="full")
    finetune = TrainOptions(task=["trec"], full_finetune=True)
    assert finetune.adapter == "full" and finetune.kind_for("classification") == "finetune"
    assert full.lr("classification") == DEFAULT_LR["full"] != DEFAULT_LR["finetune"] == \
        finetune.lr("classification")
    assert finetune.lr("question_answering") == default_learning_rate("finetune", "question_answering")
    assert run_name(TrainOptions(task=["trec"], full_finetune=True, learning_rate=DEFAULT_LR["finetune"]),
                    "trec", 6, "classification") == "trec-finetune-s0"
    assert run_name(TrainOptions(task=["trec"], full_finetune=True, learning_rate=DEFAULT_LR["full"]),
                    "trec", 6, "classification") == f"trec-finetune-lr{DEFAULT_LR['full']:g}-s0"


def test_span_f1_follows_seqeval():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert bio_spans(["I-PER", "I-PER", "B-PER"]) == {("PER", 0, 2), ("PER", 2, 3)}  # I- opens a span
    assert bio_spans(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}
    tp, fp, fn = span_counts(["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "O"])
    assert (tp, fp, fn) == (1, 0, 1) and f1(tp, fp, fn) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def clothing_small(tmp_path_factory):
    """Three task specs over one 500-review corpus: one cache, three task models."""
    d = tmp_path_factory.mktemp("clothing")
    rating = tasks.load_task("clothing_rating")
    docs = {r["id"] for split, n in (("train", 300), ("dev", 100), ("test", 100))
            for r in rating.splits[split].slice(0, n).to_pylist()}
    specs = []
    for name in ("clothing_rating", "clothing_recommended", "clothing_department"):
        t = tasks.load_task(name)
        rows = [r | {"split": s} for s, tab in t.splits.items() for r in tab.to_pylist() if r["id"] in docs]
        pq.write_table(pa.Table.from_pylist(rows), d / f"{name}.parquet")
        spec = d / f"{name}.yaml"
        spec.write_text(f"name: small_{name}\nfiles: {name}.parquet\ncorpus: clothing_small\n")
        specs.append(str(spec))
    return specs


def test_three_tasks_train_concurrently_over_one_cache(ray_local, clothing_small, tmp_path):
    t0 = time.time()
    rows = train(TrainOptions(task=clothing_small, adapter="lora", adapter_size=8, output=str(tmp_path), epochs=1,
                              batch_size=32, max_length=48))
    assert sorted(r["task"] for r in rows) == ["small_clothing_department", "small_clothing_rating",
                                               "small_clothing_recommended"]
    assert len(list((tmp_path / "caches").iterdir())) == 1  # the corpus was cached once for all three
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.num_rows == 3 and set(table.column("metric").to_pylist()) == {"accuracy"}
    # concurrent: the three runs' training loops overlapped in time
    ms = [json.loads((tmp_path / "runs" / f"{r['task']}-k3-lora8-s0" / "metrics.json").read_text()) for r in rows]
    assert all(m["epochs_run"] == 1 for m in ms)
    assert max(m["started_at"] for m in ms) < min(m["finished_at"] for m in ms)
    assert time.time() - t0 < 600
    # and the dashboard's metrics (Ray's metrics API, scraped from this node's exporter) show each task's numbers
    for r in rows:
        dev = _scrape("er_ray_train_dev_metric", ray_local, task=r["task"])
        assert dev == pytest.approx(max(h["dev_accuracy"] for h in next(m for m in ms if m["task"] == r["task"])
                                        ["history"]), abs=1e-6)
    assert _scrape("er_ray_cache_tokens", ray_local) > 0


def _scrape(name: str, ray, timeout: float = 60, **tags) -> float:
    """A metric's value from the Prometheus endpoint Ray's metrics agent serves on this node (what the dashboard
    reads); Ray exports on an interval, so wait for it."""
    import re
    import urllib.request

    port = ray.nodes()[0]["MetricsExportPort"]
    want = [f'{k}="{v}"' for k, v in tags.items()]
    t0 = time.time()
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            m = re.match(rf"(?:ray_)?{name}(?:_total)?\{{(.*)\}} (\S+)$", line)
            if m and all(w in m.group(1) for w in want):
                return float(m.group(2))
        assert time.time() - t0 < timeout, f"{name} {tags} not exported in {timeout} s"
        time.sleep(2)


def test_deepspeed_steps_the_optimizer_with_two_workers(ray_local, tmp_path):
    # sms_spam cut to the 320 training messages used and 100 each of dev and test: what the optimizer is checked on
    # needs no cache of all 5,574 messages (that build was half of this test's time)
    rows = [r | {"split": s} for s, t in tasks.load_task("sms_spam").splits.items()
            for r in t.slice(0, 320 if s == "train" else 100).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sms.parquet")
    (tmp_path / "sms.yaml").write_text("name: sms_small\nfiles: sms.parquet\n")
    # with a time budget: the two workers agree on its plan through a collective (the run would hang otherwise)
    m = train(TrainOptions(task=[str(tmp_path / "sms.yaml")], adapter="lora", workers=2, zero_stage=2,
                           output=str(tmp_path), epochs=1, batch_size=16, max_length=64, max_train_examples=320,
                           budget_seconds=600))[0]
    assert m["planned_epochs"] == 1 and m["budget_seconds"] == 600
    ds = m["deepspeed"]
    assert ds["world_size"] == 2 and ds["zero_stage"] == 2
    assert ds["global_steps"] == 320 // (16 * 2)  # one optimizer step per global batch of 2 x 16
    assert "ZeRO" in ds["optimizer"] or "Optimizer" in ds["optimizer"]  # DeepSpeed's wrapper, not bare AdamW
    # LoRA's B matrices start at zero: non-zero B in the exported weights means the engine's steps updated them
    from safetensors.torch import load_file

    w = load_file(tmp_path / "runs" / m["run"] / "model" / "trainable.safetensors")
    lora_b = [v for k, v in w.items() if "lora_B" in k]
    assert len(lora_b) == 3 * 6 and all(float(v.abs().sum()) > 0 for v in lora_b)  # 6 maps in each of 3 layers


def test_several_runs_predict_in_one_pass_as_each_does_alone_and_cache_agrees_with_text(trec_lora, trec_bottleneck,
                                                                                         out, tmp_path, capfd,
                                                                                         monkeypatch):
    """`er-ray predict --run A --run B`: one read of the cache (or one pass of the lower layers over the text) for
    both task models, each run's predictions what it gives alone. B is another adapter kind at the same cut layer.
    The pass for both runs on this process (a small input on one machine), each alone through Ray Data's actors (as
    on a cluster): the two ways agree. Then: a run predicts from the cache what it predicts from text, and its
    exported PEFT adapter reloads in plain transformers + peft with the same answers."""
    cache_dir = trec_cache(out)
    runs = [out / "runs" / trec_lora["run"], out / "runs" / trec_bottleneck["run"]]
    docs = tasks.load_task("trec").splits["test"].select(["id", "text"])
    pq.write_table(docs, tmp_path / "docs.parquet")
    corpus = [str(tmp_path / "docs.parquet")]
    alone = {}
    for where, source in (("cache", {"cache": str(cache_dir)}), ("text", {})):
        together = predict.predict(predict.PredictOptions(run=[str(r) for r in runs], corpus=corpus,
                                                          output=str(tmp_path / f"both_{where}"), **source))
        assert "2 task models in one pass on this process" in capfd.readouterr().err
        assert not (together / "predictions.parquet").exists()  # several runs: a folder each
        for r in runs:
            monkeypatch.setenv("ER_RAY_DRIVER_READ_BYTES", "0")  # Ray Data's actors, as for a cache over the limit
            folder = predict.predict(predict.PredictOptions(run=str(r), corpus=corpus,
                                                            output=str(tmp_path / f"{r.name}_{where}"), **source))
            monkeypatch.delenv("ER_RAY_DRIVER_READ_BYTES")
            assert "1 task model by Ray Data" in capfd.readouterr().err
            one = pq.read_table(together / r.name / "predictions.parquet").sort_by("id").to_pydict()
            ref = alone[r.name, where] = pq.read_table(folder / "predictions.parquet").sort_by("id").to_pydict()
            assert one["id"] == ref["id"] and len(one["id"]) == docs.num_rows
            assert one["label"] == ref["label"], (where, r)
            assert np.allclose(one["score"], ref["score"], atol=1e-5), (where, r)

    ca, tb = ({i: (lab, sc) for i, lab, sc in zip(p["id"], p["label"], p["score"])}
              for p in (alone[runs[0].name, "cache"], alone[runs[0].name, "text"]))
    # fp16 cache vs fp32 text: the same labels, except where the text model's choice is a near-tie that the
    # fp16 rounding of the layer-k states (cosine >= 0.999) can tip; then both top scores are almost equal.
    differ = {i: (ca[i][1], tb[i][1]) for i in ca if ca[i][0] != tb[i][0]}
    assert len(differ) <= 2 and all(abs(a - b) < 0.05 and b < 0.6 for a, b in differ.values()), differ
    # plain transformers + peft, no er_ray model code: base model + saved adapter + saved head
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from er_ray.pretrained import PACKAGED_MODELS

    run, folder = runs[0], PACKAGED_MODELS["minilm"].folder()
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(folder), str(run / "model" / "peft_adapter"))
    peft_model.eval()
    head = load_file(run / "model" / "trainable.safetensors")
    w, bias = head["classifier.weight"], head["classifier.bias"]
    labels = json.loads((run / "model" / "task.json").read_text())["labels"]
    tok = AutoTokenizer.from_pretrained(folder)
    first = docs.slice(0, 64)
    enc = tok(first.column("text").to_pylist(), truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = peft_model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        logits = ((h * m).sum(1) / m.sum(1)) @ w.T + bias
    plain = [labels[i] for i in logits.argmax(-1).tolist()]
    assert plain == [tb[i][0] for i in first.column("id").to_pylist()]
    # the CLI with a built-in task as corpus: all its 5,452 questions, the test split's labels as above
    from er_ray.cli import main

    assert main(["predict", "--run", str(run), "--corpus", "trec", "--cache", str(cache_dir),
                 "--output", str(tmp_path / "all_trec")]) == 0
    every = pq.read_table(tmp_path / "all_trec" / "predictions.parquet").to_pydict()
    assert len(every["id"]) == len(set(every["id"])) == 5452
    assert {i: lab for i, lab in zip(every["id"], every["label"]) if i in ca} == {i: v[0] for i, v in ca.items()}


def test_missing_documents_in_the_cache_are_named(trec_lora, out, tmp_path):
    from er_ray.train_data import TrainDataError as TrainError

    cache_dir = trec_cache(out)
    # 1,200 sampled training documents + 484 dev + 484 test, none of them in the TREC cache
    with pytest.raises(TrainError, match=r"sms_spam: 2,168 of its documents are missing from the cache .*'sms-"):
        train(TrainOptions(task=["sms_spam"], cache=str(cache_dir), output=str(tmp_path), **FAST))


def test_the_driver_and_ray_data_cut_the_same_rows_from_a_cache(trec_lora, out, monkeypatch):
    """A cache up to ER_RAY_DRIVER_READ_BYTES is read on the driver, a larger one by Ray Data: same rows, same
    order, same labels, same bytes."""
    from er_ray.cache import open_cache
    from er_ray.train_data import split_datasets

    task, c = tasks.load_task("trec"), open_cache(trec_cache(out), 3)
    cut = {}
    for limit in ("0", str(1 << 40)):  # Ray Data, then the driver
        monkeypatch.setenv("ER_RAY_DRIVER_READ_BYTES", limit)
        data = split_datasets(task, c, "cache", max_train=300, seed=1)
        assert bool(data["tables"]) == (limit != "0")  # rows cut on the driver travel as tables
        splits = data["tables"] or data["datasets"]
        cut[limit] = {s: pa.concat_tables(_tables(d)).to_pydict() for s, d in splits.items()}
        assert data["rows"] == {"train": 300, "dev": len(task.splits["dev"]), "test": len(task.splits["test"])}
    assert cut["0"] == cut[str(1 << 40)]


def _tables(d):
    import ray

    return [ray.get(d)] if isinstance(d, ray.ObjectRef) else [ray.get(r) for r in d.to_arrow_refs()]


def test_a_split_held_as_a_table_is_shared_out_as_ray_data_would(ray_local):
    """Training rows: one permutation per epoch seed on every worker, equal disjoint shares (a worker with a batch
    more would hang the others' all-reduce); dev and test rows: in order, every row kept."""
    import ray

    from er_ray.train_data import TableShard

    ref = ray.put(pa.table({"id": [str(i) for i in range(11)]}))

    def ids(shard, **kw):
        return [i for b in shard.iter_batches(batch_size=2, **kw) for i in b.column("id").to_pylist()]

    shuffled = dict(local_shuffle_buffer_size=64, local_shuffle_seed=7)
    train = [ids(TableShard(ref, r, 3, equal=True), **shuffled) for r in range(3)]
    assert [len(t) for t in train] == [3, 3, 3] and len(set().union(*train)) == 9
    assert train == [ids(TableShard(ref, r, 3, equal=True), **shuffled) for r in range(3)]  # same seed, same rows
    assert ids(TableShard(ref, 0, 1, equal=True), **shuffled) != ids(TableShard(ref, 0, 1, equal=True),
                                                                     local_shuffle_buffer_size=64, local_shuffle_seed=8)
    dev = [ids(TableShard(ref, r, 3, equal=False)) for r in range(3)]
    assert sum(dev, []) == [str(i) for i in range(11)]


def test_killed_training_worker_resumes_from_its_checkpoint_to_the_uninterrupted_result(ray_local, trec_lora, out,
                                                                                       tmp_path):
    """A resumed run must end where the uninterrupted one does, or comparisons over seeds mean little (dropout's
    generator used to be seeded once at set-up: a resumed epoch drew other masks). (Over the fixture's TREC
    cache: building one here cost 35 s.)"""
    import psutil

    cmd = [ER_RAY, "train", "--task", "trec", "--adapter", "lora", "--epochs", "3", "--patience", "3",
           "--batch-size", "16", "--max-length", "64", "--max-train-examples", "600", "--cache", str(trec_cache(out))]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd + ["--output", str(tmp_path / "killed")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    ckpts = tmp_path / "killed" / "ray"
    t0 = time.time()

    def committed():  # the controller registered epoch 1's checkpoint (its snapshot names it)
        return any("checkpoint_" in f.read_text() for f in ckpts.rglob("checkpoint_manager_snapshot.json"))

    while not committed():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() - t0 < 400, "no checkpoint"
        time.sleep(0.5)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "RayTrainWorker" in " ".join(p.cmdline())]
    assert victims, "no training worker process found"
    for p in victims:
        p.kill()
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    # told on the console: the epoch after the kill ran again from the last checkpoint
    assert re.search(r"\[er_ray train\] trec-k3-lora16-s0: epoch [23]/3, loss .*, resumed", log), log[-3000:]
    m = json.loads(next((tmp_path / "killed" / "runs").glob("*/metrics.json")).read_text())
    assert m["epochs_run"] == 3 and any(h["resumed"] for h in m["history"])

    whole = subprocess.run(cmd + ["--output", str(tmp_path / "whole")], capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    w = json.loads(next((tmp_path / "whole" / "runs").glob("*/metrics.json")).read_text())

    def scores(metrics):
        return {"dev": metrics["dev"], "test": metrics["test"],
                "epochs": [(h["train_loss"], h["dev_score"], h["learning_rate"]) for h in metrics["history"]]}

    assert scores(m) == scores(w)


def test_predict_from_text_names_a_missing_column_and_keeps_old_predictions(trec_lora, out, tmp_path, monkeypatch):
    monkeypatch.setenv("ER_RAY_DRIVER_READ_BYTES", "0")  # through Ray Data's actors: they end with the error
    run = out / "runs" / "trec-k3-lora8-s0"
    docs = tasks.load_task("trec").splits["test"].slice(0, 40)
    pq.write_table(docs, tmp_path / "docs.parquet")
    first = predict.predict(predict.PredictOptions(run=str(run), corpus=[str(tmp_path / "docs.parquet")],
                                                   output=str(tmp_path / "preds")))
    before = (first / "predictions.parquet").read_bytes()
    assert pq.read_table(first / "predictions.parquet").num_rows == 40
    with pytest.raises(predict.PredictError, match=r"docs.parquet: no column 'body' \(columns: id, text"):
        predict.predict(predict.PredictOptions(run=str(run), corpus=[str(tmp_path / "docs.parquet")],
                                               text_column="body", output=str(tmp_path / "preds")))
    assert all_cpus_free()  # its predictor actors are gone although pytest keeps the error (CI once hung here)
    assert (first / "predictions.parquet").read_bytes() == before  # a failed run leaves the old file whole
    assert [p.name for p in first.iterdir()] == ["predictions.parquet"]  # and no temporary file behind
    # from the cache, a corpus none of whose documents it holds: an error, not an empty file
    strangers = docs.set_column(0, "id", pa.array([f"x-{i}" for i in range(40)]))
    pq.write_table(strangers, tmp_path / "strangers.parquet")
    with pytest.raises(predict.PredictError, match="none of its documents are in the cache"):
        predict.predict(predict.PredictOptions(run=str(run), corpus=[str(tmp_path / "strangers.parquet")],
                                               cache=str(trec_cache(out)),
                                               output=str(tmp_path / "preds2")))
    assert not list((tmp_path / "preds2").glob("*"))  # no file, no temporary left behind


def at_a_terminal():
    """The child as a terminal would start it. A suite started in the background (`make test &`) ignores SIGINT,
    its children inherit that, and Python then installs no KeyboardInterrupt handler: the Ctrl-C below was
    ignored so once, and the run trained to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_is_one_line_saying_what_is_kept(ray_local, trec_lora, out, tmp_path, sig):
    """Ctrl-C used to end in a traceback (or, in a study, in a sweep that 'finished no trial'); `kill` (SIGTERM) in
    a C++ stack dump from Ray's failure-signal handler. (The TREC cache is the fixture's: encoding it again cost
    each case 30 s.)"""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([ER_RAY, "train", "--task", "trec", "--adapter", "lora", "--output", str(tmp_path),
                             "--epochs", "3",
                             "--max-train-examples", "400", "--max-length", "64", "--cache", str(trec_cache(out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=at_a_terminal)
    lines = []
    for line in proc.stderr:  # interrupt once training has started
        lines.append(line)
        if "[er_ray train] trec-k3-lora16-s0: train 400" in line:
            break
    proc.send_signal(sig)
    t0 = time.perf_counter()
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig and time.perf_counter() - t0 < 60, "".join(lines) + rest
    assert ("[er_ray train] interrupted: finished epochs are kept in checkpoints; the same command resumes them"
            in rest.splitlines())
    assert "Traceback" not in rest and "logging.cc" not in rest, rest


def test_a_run_that_finds_no_cpus_fails_naming_what_holds_them(trec_lora, out):
    """Ray Train waits 60 s for a worker group and then retries for ever: a sweep once hung 20 minutes so."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from er_ray.train import TrainError

    assert all_cpus_free()
    holder = placement_group([{"CPU": 1}], name="held-by-test")  # 1 CPU stays free, for reading the cache
    ray.get(holder.ready(), timeout=30)
    try:
        t0 = time.perf_counter()
        with pytest.raises(TrainError, match=r"1 worker\(s\) \(1.50 CPU each\) found no room in 12 s\. 2 CPU "
                                             r"in the cluster, [\d.]+ free; placement group 'held-by-test': 1 CPU "
                                             r"\(this job\)\. Free them"):
            train(TrainOptions(task=["trec"], adapter="lora", adapter_size=4, cpus_per_worker=1.5, resource_wait=12,
                               output=str(out), **FAST))
        assert time.perf_counter() - t0 < 60
    finally:
        remove_placement_group(holder)
    assert all_cpus_free()


def test_one_seed_gives_one_result(trec_lora, out, tmp_path):
    """Two runs of one recycled command with one seed used to differ (Ray Data's block order fed the shuffle)."""
    from er_ray.train import run_all

    cache_dir = trec_cache(out)
    # side by side (their start-up costs overlap), each in its own output folder
    runs = run_all([(TrainOptions(task=["trec"], cache=str(cache_dir), output=str(tmp_path / d), seed=3,
                                  **dict(FAST, epochs=1, max_train_examples=400)), "trec") for d in ("a", "b")],
                   tmp_path, max_concurrent=2)
    keep = ("dev", "test", "history")
    same = [{k: r[k] for k in keep} for r in runs]
    for r in same:
        # times differ, and so does everything measured against them (data stall, FLOP/s, MFU)
        r["history"] = [{k: v for k, v in h.items() if not any(t in k for t in ("second", "stall", "mfu", "flops"))}
                        for h in r["history"]]
    assert same[0] == same[1] and same[0]["history"][0]["train_loss"] > 0, same


def test_a_time_budget_plans_the_epochs_that_fit_it(trec_lora, out, tmp_path):
    """Equal wall time: a recycled run given fine-tuning's training seconds trains as many epochs as fit them."""
    cache_dir = trec_cache(out)
    m = train(TrainOptions(task=["trec"], adapter="lora", cache=str(cache_dir), output=str(tmp_path), budget_seconds=30,
                           **dict(FAST, epochs=16, max_train_examples=600), patience=None))[0]
    assert m["run"] == "trec-k3-lora16-30s-s0"
    # the first epoch takes 4-8 s here (a second or two of it Ray Data's start), so the budget, not the ceiling of
    # 16 epochs, decides. (300 examples and a ceiling of 8 once ran into the ceiling on a faster day.)
    h = m["history"]
    first = h[0]["train_seconds"]
    steady = first - h[0]["first_batch_seconds"]  # the data pipeline's start is paid once
    assert h[0]["epochs"] == max(1, min(16, 1 + int((30 - first) // steady))), m  # planned from the first epoch
    assert 2 <= m["planned_epochs"] <= h[0]["epochs"] < 16 and m["planned_epochs"] == m["epochs_run"] == len(h), m
    # ...and shortened if later epochs ran slower (CI once overran 30 s by 5): every epoch after the first started
    # only where the one before it said another would fit (only the first one's wait for data is paid once)
    for e in range(1, len(h)):
        spent = sum(r["train_seconds"] for r in h[:e])
        assert spent + h[e - 1]["train_seconds"] - (h[0]["first_batch_seconds"] if e == 1 else 0) <= 30, (e, h)
    # warmed up over a quarter of the planned epochs (LoRA's default), then decayed to zero at their end
    lrs = [h["learning_rate"] for h in m["history"]]
    peak = lrs.index(max(lrs))
    assert peak <= 0.25 * len(lrs) and lrs[-1] < 1e-9, lrs
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])), lrs
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:])), lrs


def test_a_budget_is_planned_after_the_first_epoch_and_shortened_when_epochs_slow_down():
    from er_ray.schedule import epochs_in_budget

    assert epochs_in_budget(30, 6, 4, 16) == 7  # the first took 6 s (with the data's start), then 4 s each
    assert epochs_in_budget(30, 22, 4, 16, done=3) == 5  # three took 22 s: two more fit
    assert epochs_in_budget(30, 29, 4, 16, done=5) == 5 == epochs_in_budget(30, 40, 4, 16, done=5)  # none more
    assert epochs_in_budget(300, 6, 4, 16) == 16 and epochs_in_budget(3, 6, 4, 16) == 1  # the ceiling; at least one


def test_a_replanned_run_warms_up_over_its_own_steps_not_the_ceilings():
    from er_ray.schedule import StepPlan

    plan = StepPlan(1600)  # a budgeted run starts planned for its --epochs ceiling: 16 epochs of 100 steps
    assert plan.warmup == 96
    plan.replan(400)  # after the first epoch, the budget fits 4
    assert plan.warmup == 24 and plan(99) == pytest.approx((400 - 99) / (400 - 24)) and plan(399) > 0 == plan(400)


def test_warmup_is_an_option_of_the_recipe_named_in_the_run_and_checked():
    from er_ray.errors import OptionsError
    from er_ray.defaults import DEFAULT_WARMUP, WARMUP
    from er_ray.options import TrainOptions
    from er_ray.train import run_name
    from er_ray.schedule import StepPlan

    plan = StepPlan(62, 0.25)  # 2 epochs of 31 steps, a quarter warming up
    assert plan.warmup == 15 and plan(0) == pytest.approx(1 / 15) and plan(14) == pytest.approx(1.0)
    assert plan(30) == pytest.approx((62 - 30) / (62 - 15))  # then down to 0 over the other 47
    # each kind's default (LoRA a quarter, the others and fine-tuning 6%) unless given; another one is another run
    lora, ft = TrainOptions(task=["trec"], adapter="lora"), TrainOptions(task=["trec"], full_finetune=True)
    assert (lora.warmup_share("classification"), ft.warmup_share("classification")) == (0.25, 0.06) == \
        (DEFAULT_WARMUP["lora"], WARMUP)
    assert lora.warmup_share("token_classification") == 0.06  # a tagger's LoRA: 6% (wnut16, BENCHMARKS.md)
    assert run_name(lora, "wnut16", 6, "token_classification") == "wnut16-k3-lora16-s0"
    assert run_name(TrainOptions(task=["wnut16"], adapter="lora", warmup=0.25), "wnut16", 6,
                    "token_classification") == \
        "wnut16-k3-lora16-wu0.25-s0"
    assert run_name(lora, "trec", 6, "classification") == "trec-k3-lora16-s0" == \
        run_name(TrainOptions(task=["trec"], adapter="lora", warmup=0.25), "trec", 6, "classification")
    assert run_name(TrainOptions(task=["trec"], adapter="lora", warmup=0.06), "trec", 6, "classification") == \
        "trec-k3-lora16-wu0.06-s0"
    assert run_name(TrainOptions(task=["trec"]), "trec", 6, "classification") == "trec-k3-full-s0"  # the default
    assert run_name(ft, "trec", 6, "classification") == "trec-finetune-s0"
    for bad in (1.0, -0.1):
        with pytest.raises(OptionsError, match="--warmup"):
            TrainOptions(task=["trec"], warmup=bad)


def test_the_head_can_have_its_own_rate_named_in_the_run_and_checked(tmp_path):
    """--head-learning-rate gives the fresh head its own peak rate (the rest keeps --learning-rate, both under one
    schedule); a run with one is another run, and a finished run with another head rate is not reused."""
    import transformers as tf
    from er_ray.errors import OptionsError
    from er_ray.model import ModelSpec, TaskModel
    from er_ray.schedule import StepPlan, warmup_then_linear_decay

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32)
    for adapter, body in (("full", 2 * 16), ("lora", 2 * 6 * 2)):  # trainable tensors below the head
        model = TaskModel(tf.BertModel(cfg), ModelSpec(cut_layer=2, adapter=adapter, adapter_size=4, num_labels=3))
        groups = model.param_groups(1e-4, 3e-3)
        assert [g["lr"] for g in groups] == [1e-4, 3e-3] and len(groups[0]["params"]) == body
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.classifier.parameters()}
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
        opt = torch.optim.AdamW(groups, lr=1e-4)
        sched = warmup_then_linear_decay(opt, StepPlan(10, 0.2))
        opt.step()
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 3e-3])  # the peak, after 2 of 10 steps
    assert [(len(g["params"]), g["lr"]) for g in model.param_groups(1e-4, None)] == [(body + 2, 1e-4)]  # one
    opts = TrainOptions(task=["wnut16"], adapter="full", head_learning_rate=3e-3, output=str(tmp_path))
    assert run_name(opts, "wnut16", 12, "token_classification") == "wnut16-k6-full-head0.003-s0"
    with pytest.raises(OptionsError, match="--head-learning-rate"):
        TrainOptions(task=["trec"], head_learning_rate=0)
    # a tagger's `full` has its head at 1e-2 by default, unnamed; a classifier's head trains at the run's rate
    plain = TrainOptions(task=["wnut16"], adapter="full", output=str(tmp_path))
    assert plain.head_lr("token_classification") == 1e-2 and plain.head_lr("classification") is None
    assert run_name(plain, "wnut16", 12, "token_classification") == "wnut16-k6-full-s0" == \
        run_name(dataclasses.replace(plain, head_learning_rate=1e-2), "wnut16", 12, "token_classification")
    assert TrainOptions(task=["wnut16"], adapter="lora").head_lr("token_classification") is None  # no evidence
    baseline = TrainOptions(task=["wnut16"], full_finetune=True)  # fine-tuning's head too: a fair baseline
    assert baseline.head_lr("token_classification") == 1e-2 and baseline.head_lr("classification") is None
    assert run_name(baseline, "wnut16", 12, "token_classification") == "wnut16-finetune-s0"
    # a finished run records its head rate: the same name with another head rate is trained again
    other = dataclasses.replace(opts, head_learning_rate=1e-2)
    done = tmp_path / "runs" / "wnut16-k6-full-s0"
    done.mkdir(parents=True)
    settings = {"model": "minilm", "learning_rate": opts.lr("token_classification"), "epochs": 3, "patience": 2,
                "batch_size": 32, "zero_stage": 0, "seed": 0, "max_length": opts.max_length, "workers": 1,
                "budget_seconds": None, "max_train_examples": None, "warmup": 0.06, "head_learning_rate": 3e-3}
    (done / "metrics.json").write_text(json.dumps({"settings": settings}))
    assert finished_run(opts, "wnut16-k6-full-s0", "token_classification") is not None
    assert finished_run(other, "wnut16-k6-full-s0", "token_classification") is None
    # ... and so is a run from before the tagger's head had its own default (one rate: None)
    (done / "metrics.json").write_text(json.dumps({"settings": {**settings, "head_learning_rate": None}}))
    assert finished_run(plain, "wnut16-k6-full-s0", "token_classification") is None
    assert finished_run(dataclasses.replace(plain, head_learning_rate=None), "wnut16-k6-full-s0",
                        "token_classification") is None


def test_the_default_recipe_learns_where_the_old_one_sat_at_the_majority_class(ray_local, tmp_path):
    """Issue 15's guard: every option at its default (but the size of the data), a recycled model must beat the
    majority class by a margin on every seed. clothing_rating at a new user's budget (512 examples, 2 epochs) is
    where LoRA's old learning rate, 1e-3, predicted the majority class on every seed (test 0.5525 = majority,
    seeds 0-2; 3e-3 reached 0.6075 / 0.6162 / 0.595 here)."""
    from er_ray.train import run_all

    task = tasks.load_task("clothing_rating")
    rows = [r | {"split": s} for s, n in (("train", 512), ("dev", 200), ("test", 800))
            for r in task.splits[s].slice(0, n).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rating.parquet")
    spec = tmp_path / "rating.yaml"
    spec.write_text("name: rating_512\nfiles: rating.parquet\ncorpus: rating_512\n")
    labels = [r["label"] for r in rows if r["split"] == "test"]
    floor = max(labels.count(y) for y in set(labels)) / len(labels)
    # One seed here (each costs the suite ~2 min); the three seeds' figures are in BENCHMARKS.md (issue 15's grid)
    runs = [(TrainOptions(task=[str(spec)], epochs=2, output=str(tmp_path / "out"), seed=seed), str(spec))
            for seed in (0,)]
    got = run_all(runs, tmp_path / "out")
    kind = default_adapter("classification")
    assert all(m["learning_rate"] == default_learning_rate(kind, "classification") and m["adapter"] == kind
               for m in got)
    assert all(m["test"] >= floor + 0.02 for m in got), ([m["test"] for m in got], floor)
    assert all(m["dev_all"]["classes_predicted"] > 1 for m in got)


def test_bf16_on_a_cpu_without_it_is_named_before_the_run(capsys):
    """This machine's CPU (AVX2, no AVX512-BF16 or AMX) ran a bf16 training epoch at a tenth of fp32's speed, with
    no word why. The driver measures both matmul peaks and says so when bf16 is the slower."""
    from er_ray.train import _bf16_peaks, _warn_if_bf16_is_slow

    bf16, fp32 = _bf16_peaks()
    assert bf16 > 0 and fp32 > 0
    _warn_if_bf16_is_slow("trec-k3-lora16-s0")
    err = capsys.readouterr().err
    assert ("on a CPU without native bf16" in err) == (bf16 < fp32), (bf16, fp32, err)
