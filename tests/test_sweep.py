"""The sweep on real Ray Tune over real Ray Train runs (MiniLM, trec, a tiny grid): caches built once, every
trial run, the best chosen on dev, table and plots written; killed midway and re-run, finished trials are not
redone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import all_cpus_free

from er_ray.study import _fmt, choose, summarise
from er_ray.flags import build
from er_ray.options import SweepOptions
from er_ray.sweep import pareto_front, sweep

ER_RAY = str(Path(sys.executable).with_name("er-ray"))
ARGS = ["--task", "trec", "--cut-layer", "2,4", "--adapter", "lora", "--adapter-size", "4", "--learning-rate", "2e-3",
        "--epochs", "2", "--max-train-examples", "200", "--max-length", "48", "--batch-size", "16",
        "--max-concurrent-trials", "1", "--scheduler", "fifo"]
TRIALS = [f"trec-k{k}-lora4-lr0.002-s0" for k in (2, 4)]
MAJORITY_DEV = 0.23  # trec's dev split: 125 of 546 questions are its largest class


def _wait_for_first_trial(proc, runs: Path, timeout: float = 600) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = sorted(runs.glob("*/metrics.json")) if runs.exists() else []
        if done:
            return done[0]
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(1)
    raise AssertionError("no trial finished in time")


def test_sweep_killed_and_resumed_builds_caches_once_and_reports(ray_local, tmp_path):
    out = tmp_path / "sweep"
    # The first run joins this session's Ray as its own driver process, and is SIGKILLed once a trial finished.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([ER_RAY, "sweep", *ARGS, "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        first = _wait_for_first_trial(proc, out / "runs")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    assert first.parent.name in finished_before and len(finished_before) < len(TRIALS)
    manifests = {k: (out / "caches" / "trec-minilm-48" / f"layer={k}" / "manifest.json") for k in (2, 4)}
    cache_state = {k: m.read_bytes() for k, m in manifests.items()}  # both layers came from the first run's pass

    # Re-run in this process with the same options: resumes, redoes nothing that finished, encodes nothing.
    from er_ray.cli import build_parser, options_from

    opts = options_from(build_parser().parse_args(["sweep", *ARGS, "--output", str(out)]), SweepOptions)
    result = sweep(opts)
    for name, mtime in finished_before.items():
        assert (out / "runs" / name / "metrics.json").stat().st_mtime_ns == mtime, f"{name} was trained again"
    assert {k: m.read_bytes() for k, m in manifests.items()} == cache_state
    assert len(list((out / "caches").iterdir())) == 1

    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert sorted(r["trial"] for r in rows) == sorted(TRIALS)
    # done, each with a test score, and each learned something: above the majority class of trec's dev split
    assert all(r["status"] == "done" and r["dev"] > MAJORITY_DEV and r["test"] is not None for r in rows), rows
    assert {(r["cut_layer"], r["learning_rate"]) for r in rows} == {(2, 2e-3), (4, 2e-3)}
    for r in rows:  # the table's numbers are the runs' own
        m = json.loads((out / "runs" / r["trial"] / "metrics.json").read_text())
        assert (r["dev"], r["test"], r["trainable_parameters"], r["epochs_run"]) == \
               (m["dev"], m["test"], m["trainable_parameters"], m["epochs_run"])
    best = result["best"]
    assert len(best) == 1 and best[0]["dev"] == max(r["dev"] for r in rows)
    assert best[0]["trial"] in (out / "sweep.md").read_text()
    assert "Resumed: trials finished before were read" in (out / "sweep.md").read_text()  # its times are the resume's
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["trec-dev-vs-k.png", "trec-pareto.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_pareto_front():
    # (cost, score): the front keeps what nothing cheaper beats
    pts = [(1, 0.5), (2, 0.4), (3, 0.7), (4, 0.7), (5, 0.9), (0.5, 0.1)]
    assert pareto_front(pts) == [5, 0, 2, 4]


def test_the_study_reports_k_half_when_asha_stopped_every_trial_there():
    """The rows of a real sweep (MiniLM, sms_spam, 2026-11-27): ASHA stopped both trials at k = L/2 = 3 after an
    epoch because k = 2 won; the study crashed. k = L/2 must still be trained and reported, for each adapter kind
    the sweep tried (the paper's configurations: LoRA, bottleneck, the whole upper layers)."""
    def trial(k, status, dev, size=16, adapter="lora"):
        return {"task": "sms_spam", "cut_layer": k, "adapter": adapter, "adapter_size": size, "status": status,
                "dev": dev}

    trials = [trial(2, "done", 0.9814), trial(3, "stopped", 0.9793), trial(3, "stopped", 0.9801, size=8),
              trial(4, "stopped", 0.9793), trial(4, "error", None), {**trial(2, "done", 0.99), "task": "trec"},
              trial(3, "done", 0.9750, adapter="full", size=None), trial(3, "done", 0.9700, adapter="bottleneck"),
              trial(3, "stopped", 0.9790, adapter="bottleneck", size=64), trial(3, "error", None, adapter="full")]
    chosen = choose(trials, "sms_spam", half=3, model="minilm")
    assert list(chosen) == ["recycled k=L/2 lora", "recycled k=L/2 full", "recycled k=L/2 bottleneck",
                            "recycled best"]  # the sweep's order of adapter kinds, then the best of all
    assert chosen["recycled best"] == trials[0]
    assert chosen["recycled k=L/2 lora"] == trials[2]  # the better dev score among the stopped ones
    assert chosen["recycled k=L/2 full"] == trials[6]
    # a finished trial at L/2 beats a stopped one with a higher (one-epoch) score: ASHA judged them
    assert chosen["recycled k=L/2 bottleneck"] == trials[7]
    chosen = choose(trials + [trial(3, "done", 0.97)], "sms_spam", half=3, model="minilm")
    assert chosen["recycled k=L/2 lora"]["status"] == "done"
    with pytest.raises(RuntimeError, match="no trial at k = L/2 = 3"):
        choose([t for t in trials if t["cut_layer"] != 3], "sms_spam", half=3, model="minilm")
    with pytest.raises(RuntimeError, match="finished no trial"):
        choose([t for t in trials if t["status"] != "done"], "sms_spam", half=3, model="minilm")


def test_the_study_has_a_row_per_configuration_and_charges_each_corpus_its_own_cache_time():
    """Seen in the seven-task study: the total cache time split equally over 5 corpora charged TREC's 5,452
    questions as much as 22,641 clothing reviews (3.0 fine-tuning epochs against 0.43)."""
    def run(task, corpus, variant, epoch_s, test=0.9, adapter="lora"):
        return {"model": "minilm", "task": task, "corpus": corpus, "variant": variant, "test": test, "metric":
                "accuracy", "seconds_per_epoch": epoch_s, "cut_layer": 3, "adapter": adapter, "adapter_size": 16,
                "learning_rate": 1e-3}

    runs = [run(t, c, v, s, test, a) for t, c in (("trec", "trec"), ("rating", "clothing"), ("department", "clothing"))
            for v, s, test, a in (("finetune", 20.0, 0.9, "lora"), ("recycled k=L/2 lora", 5.0, 0.885, "lora"),
                                  ("recycled k=L/2 full", 8.0, 0.91, "full"), ("recycled best", 5.0, 0.9, "lora"))]
    caches = {"minilm": {"seconds": 150.0, "corpora": ["clothing", "trec"],
                         "seconds_per_corpus": {"clothing": 130.0, "trec": 20.0}}}
    rows = {(r["task"], r["variant"]): r for r in summarise(runs, caches)}
    assert [v for t, v in rows if t == "trec"] == ["finetune", "recycled k=L/2 lora", "recycled k=L/2 full",
                                                   "recycled best"]
    assert rows["trec", "recycled k=L/2 lora"]["cache s per task"] == 20.0
    assert rows["trec", "recycled k=L/2 lora"]["cache cost (finetune epochs)"] == 1.0
    assert rows["rating", "recycled best"]["cache s per task"] == rows["department", "finetune"]["cache s per task"] \
        == 65.0
    assert rows["rating", "recycled k=L/2 lora"]["speedup"] == 4.0 and rows["rating", "finetune"]["speedup"] is None
    assert rows["rating", "recycled k=L/2 full"]["config"] == "k=3 full lr 0.001"
    assert rows["trec", "recycled k=L/2 lora"]["vs finetune"] == pytest.approx(-1.5)  # points
    assert rows["trec", "recycled k=L/2 full"]["vs finetune"] == pytest.approx(1.0)
    assert rows["trec", "finetune"]["sd"] is None and _fmt(0.9, None) == "0.9000"  # one seed: no spread to show
    two = summarise(runs + [dict(r, seed=1) for r in runs], caches)  # seeds that agree: a spread of 0, shown
    assert two[0]["sd"] == 0.0 and two[0]["seeds"] == 2 and _fmt(0.9, 0.0) == "0.9000 ± 0.0000"
    old = {"minilm": {"seconds": 150.0, "corpora": ["clothing", "trec"]}}  # a cache.json written before
    assert {r["task"]: r["cache s per task"] for r in summarise(runs, old)} == \
        {"trec": 75.0, "rating": 37.5, "department": 37.5}


def test_a_sweep_caches_every_task_of_a_shared_corpus_not_only_the_first(ray_local, tmp_path):
    """Two task specs name one corpus but hold different documents (as subsets of the clothing tasks do): the
    sweep built the cache from the first task's file only, and the second task's trials had no activations."""
    import pyarrow as pa

    from er_ray import cache, tasks

    trec = tasks.load_task("trec")
    specs, ids = [], set()
    for i, name in enumerate(("trec_a", "trec_b")):
        train = trec.splits["train"].slice(96 * i, 96).to_pylist()
        seen = {r["label"] for r in train}
        rows = [r | {"split": "train"} for r in train]
        for split in ("dev", "test"):
            rows += [r | {"split": split} for r in trec.splits[split].slice(40 * i, 40).to_pylist()
                     if r["label"] in seen]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\nfiles: {name}.parquet\ncorpus: trec_shared\n")
        specs.append(str(tmp_path / f"{name}.yaml"))
        ids |= {r["id"] for r in rows}
    out = tmp_path / "sweep"
    result = sweep(build(SweepOptions, task=specs, cut_layer=[3], adapter=["lora"], adapter_size=[4],
                         learning_rate=[2e-3], epochs=1, max_train_examples=64, max_length=32, batch_size=16,
                         scheduler="fifo", output=str(out)))
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert sorted((r["task"], r["status"]) for r in rows) == [("trec_a", "done"), ("trec_b", "done")], rows
    root = out / "caches" / "trec_shared-minilm-32"
    assert set(cache.open_cache(root, 3).ids()) == ids  # one cache holds both tasks' documents
    assert cache.verify(root) == []
    assert list(result["cache_seconds_per_corpus"]) == ["trec_shared"]


def test_the_default_asha_scheduler_stops_trials_and_the_sweep_still_finishes(ray_local, tmp_path):
    """The default scheduler on a 2-CPU Ray: ASHA stops the weaker trials after their first epoch, and the trials
    after them still get workers and finish (a stopped trial's worker group must release its CPUs; a study once
    hung here for 20 minutes, every later trial timing out on its worker group).

    One trial at a time, in the grid's order (learning rates as given), the second with a learning rate too small
    to move its first epoch: whether ASHA stops a trial depends on the trials that reached the rung before it,
    and CI once saw four similar trials arrive best-last, so none was stopped. The third runs after the stopped
    one, on the CPUs the stopped one must have released."""
    out = tmp_path / "asha"
    t0 = time.perf_counter()
    result = sweep(build(SweepOptions, task=["trec"], cut_layer=[3], adapter=["lora"], adapter_size=[4],
                         learning_rate=[3e-3, 1e-7, 2e-3], epochs=2, max_train_examples=192, max_length=32,
                         batch_size=16, max_concurrent_trials=1, output=str(out)))
    rows = {r["trial"]: r for r in result["trials"]}
    assert len(rows) == 3 and time.perf_counter() - t0 < 900
    stopped = [t for t, r in rows.items() if r["status"] == "stopped"]
    done = [t for t, r in rows.items() if r["status"] == "done"]
    assert stopped == ["trec-k3-lora4-lr1e-07-s0"] and len(done) == 2, rows
    for t in stopped:  # stopped after the grace period's one epoch, with its dev score kept
        assert rows[t]["epochs_run"] == 1 and rows[t]["dev"] is not None and rows[t]["test"] is None
    for t in done:
        assert rows[t]["epochs_run"] == 2 and rows[t]["test"] is not None
    assert result["best"][0]["trial"] in done
    # nothing is left holding CPUs: every stopped trial's worker group was released
    from er_ray.cluster import release_orphaned_placement_groups

    assert release_orphaned_placement_groups() == 0 and all_cpus_free(60)


def test_a_placement_group_whose_creator_died_is_released_and_no_other(ray_local):
    """The mechanism of the sweep hang, in small: a placement group made by an actor (as Ray Train's controller
    makes its worker group's) outlives the actor and keeps its CPUs until the driver releases it."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from er_ray.cluster import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self):
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready())
            return pg.id.hex()

    mine = placement_group([{"CPU": 0.25}])  # the driver's own (as Tune's trial groups): never touched
    ray.get(mine.ready())
    controller = Controller.remote()
    theirs = ray.get(controller.reserve.remote())
    assert release_orphaned_placement_groups() == 0  # its creator lives
    ray.kill(controller)
    deadline = time.monotonic() + 30
    while placement_group_table()[theirs]["state"] == "CREATED" and time.monotonic() < deadline:
        if release_orphaned_placement_groups():
            break
        time.sleep(0.5)
    assert placement_group_table()[theirs]["state"] == "REMOVED"
    assert placement_group_table()[mine.id.hex()]["state"] == "CREATED"
    ray.util.remove_placement_group(mine)
    assert all_cpus_free(30)


def test_the_grid_takes_each_task_types_default_learning_rate():
    from er_ray.defaults import DEFAULT_LR, default_learning_rate
    from er_ray.sweep import grid

    opts = build(SweepOptions, task=["trec"], cut_layer=[3], adapter=["lora", "full"], adapter_size=[8])
    assert [(p["adapter"], p["learning_rate"]) for p in grid(opts, 6, "classification")] == \
        [("lora", default_learning_rate("lora", "classification")), ("full", default_learning_rate("full", ""))]
    # a tagger's whole upper layers: its default (1e-4, safe on mpnet) and MiniLM's better 3e-4, picked on dev
    assert [(p["adapter"], p["learning_rate"]) for p in grid(opts, 6, "token_classification")] == \
        [("lora", default_learning_rate("lora", "token_classification")), ("full", 1e-4), ("full", 3e-4)]
    assert default_learning_rate("full", "token_classification") == 1e-4
    for kind in ("lora", "full"):  # tagging's own (wnut16 on both models: BENCHMARKS.md)
        assert default_learning_rate(kind, "token_classification") != DEFAULT_LR[kind]
    given = build(SweepOptions, task=["trec"], cut_layer=[3], adapter=["lora"], learning_rate=[2e-3])
    assert {p["learning_rate"] for p in grid(given, 6, "token_classification")} == {2e-3}  # given rates win


def test_question_answering_has_its_own_defaults_a_lower_cut_and_higher_full_rates():
    """SQuAD (BENCHMARKS.md): 1e-4 under-trains fine-tuning and `full`, and the sweep's pick is k = L/4."""
    from er_ray.defaults import FINETUNE_LR_GRID, default_learning_rate, finetune_lr_grid
    from er_ray.options import TrainOptions
    from er_ray.sweep import default_cut_layers, grid

    assert default_cut_layers(6) == [2, 3, 4] and default_cut_layers(6, ["question_answering"]) == [1, 2, 3, 4]
    assert default_cut_layers(12, {"classification", "question_answering"}) == [3, 4, 6, 8]
    opts = build(SweepOptions, task=["squad"], adapter=["full", "lora"], adapter_size=[16])
    points = grid(opts, 6, "question_answering")
    assert sorted({p["cut_layer"] for p in points}) == [1, 2, 3, 4]
    assert {p["learning_rate"] for p in points if p["adapter"] == "full"} == {3e-4}
    assert {p["learning_rate"] for p in points if p["adapter"] == "lora"} == {default_learning_rate("lora", "")}
    finetune = TrainOptions(task=["squad"], full_finetune=True)
    assert finetune.lr("question_answering") == 1e-4 == finetune.lr("classification")  # 3e-4: mpnet learns nothing
    assert finetune_lr_grid("question_answering") == [1e-4, 3e-4] and finetune_lr_grid("classification") == \
        list(FINETUNE_LR_GRID[None]) == [3e-5, 1e-4, 3e-4]


def test_a_question_answering_run_defaults_to_the_whole_upper_layers_over_a_quarter_cut():
    """`er-ray train --task squad` with every option at its default used to train LoRA at L/2, 6.5-9 F1 points
    short of fine-tuning (BENCHMARKS.md); `full` at L/4 reached it on every seed. Classification keeps LoRA at L/2."""
    from er_ray.encoders import default_cut_layer
    from er_ray.options import TrainOptions
    from er_ray.train import run_name

    plain = TrainOptions(task=["squad"], output="unused")
    assert plain.adapter is None and plain.adapter_for("question_answering") == "full"
    assert run_name(plain, "squad", 6, "question_answering") == "squad-k1-full-s0"  # every default: unnamed
    assert run_name(plain, "squad", 12, "question_answering") == "squad-k3-full-s0"
    assert run_name(plain, "trec", 6, "classification") == "trec-k3-full-s0"
    assert run_name(plain, "wnut16", 6, "token_classification") == "wnut16-k3-full-s0"
    assert plain.lr("question_answering") == 3e-4 and plain.lr("classification") == 3e-4
    assert plain.lr("token_classification") == 1e-4  # the whole upper layers' tagging rate
    assert TrainOptions(task=["wnut16"], adapter="lora").lr("token_classification") == 1e-3  # LoRA's own, if asked
    mixed = TrainOptions(task=["squad", "wnut16"], max_length=128)  # QA's and a tagger's windows differ otherwise
    for types in (["question_answering"], ["classification"], ["token_classification"],
                  ["classification", "token_classification"]):
        assert plain.for_task_types(types).adapter == "full", types  # every type defaults to the whole upper layers
    assert mixed.for_task_types(["question_answering", "token_classification"]).adapter == "full"
    # what is given is kept
    lora = TrainOptions(task=["squad"], adapter="lora", cut_layer=3)
    assert run_name(lora, "squad", 6, "question_answering") == "squad-k3-lora16-s0"
    assert lora.for_task_types(["question_answering"]).adapter == "lora"
    assert default_cut_layer(6, "question_answering") == 1 and default_cut_layer(2, "question_answering") == 1
    assert default_cut_layer(6) == default_cut_layer(6, "token_classification") == 3


def test_a_trial_that_learned_nothing_is_told_on_the_sweeps_console(tmp_path, capsys):
    """The trial's own warning goes to its worker's log; the driver's trial lines say it when the trial ends."""
    from types import SimpleNamespace

    from er_ray.sweep import trial_lines

    def trial(name, classes):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(
            {"dev_all": {"accuracy": 0.8678, "classes_predicted": classes}, "learning_rate": 3e-3}))
        return SimpleNamespace(config={"trial": {"name": name, "train": {"output": str(tmp_path)}}}, last_result={})

    lines = trial_lines()
    collapsed, learned, stopped = trial("sms-a", 1), trial("sms-b", 2), trial("sms-c", 1)
    (tmp_path / "runs" / "sms-c" / "metrics.json").unlink()  # ASHA stopped it: no metrics.json, nothing to say
    for t in (collapsed, learned, stopped):
        lines.on_trial_complete(0, [collapsed, learned, stopped], t)
    err = capsys.readouterr().err
    assert "sms-a: the model predicts one class for every dev example" in err and "sms-b: the" not in err
    assert "sms-c: ended (3/3 trials)" in err and "sms-c: the" not in err


def test_a_trial_saved_before_trials_knew_their_task_type_is_still_found_finished(tmp_path):
    """Tune restores a sweep's trial configs as they were saved: one from before `task_type` was in them must still
    be matched to its finished run (not a KeyError mid-sweep)."""
    import dataclasses
    import json

    from er_ray.options import TrainOptions
    from er_ray.sweep import _finished, _mark_finished, _trial_options
    from er_ray.train import resolved_settings

    def ran(config, task_type, **changed):  # what the trial's run recorded when it finished
        settings = dict(resolved_settings(_trial_options(config), task_type), **changed)
        (run / "metrics.json").write_text(json.dumps({"settings": settings}))

    train = dataclasses.asdict(TrainOptions(task=["trec"], output=str(tmp_path)))
    config = {"task": "trec", "point": {"cut_layer": 3, "adapter": "lora", "adapter_size": 16,
                                        "learning_rate": 3e-3}, "train": train, "cache": str(tmp_path / "c")}
    run = tmp_path / "runs" / "trec-k3-lora16-lr0.003-s0"
    run.mkdir(parents=True)
    ran(config, "classification")
    _mark_finished(str(run), config)
    assert _finished(str(run), config)  # the old config: its type read from the task
    assert _finished(str(run), dict(config, task_type="classification"))
    assert not _finished(str(run), dict(config, task_type="token_classification"))  # a tagger's default is 6%
    ran(config, "classification", epochs=7)  # what the trial key cannot tell: the run's own record decides
    assert not _finished(str(run), config)
    # a tagger's `full` trial from before its head had its own default rate (1e-2) is trained again
    point = {"cut_layer": 3, "adapter": "full", "adapter_size": None, "learning_rate": 1e-3}
    tagger = {"task": "wnut16", "point": point, "train": train, "cache": str(tmp_path / "c"),
              "task_type": "token_classification"}
    run = tmp_path / "runs" / "wnut16-k3-full-s0"
    run.mkdir(parents=True)
    ran(tagger, "token_classification", head_learning_rate=None)
    _mark_finished(str(run), tagger)
    assert not _finished(str(run), tagger)
    ran(tagger, "token_classification")
    assert _finished(str(run), tagger) and resolved_settings(_trial_options(tagger), "token_classification")[
        "head_learning_rate"] == 1e-2


def test_the_console_says_what_a_defaulted_run_trains_and_why():
    """A QA run's defaults differ from a classifier's (full at L/4, not LoRA at L/2): the console says what the run
    trains and which choices were its task type's defaults; nothing when neither the cut nor the adapter is."""
    from types import SimpleNamespace

    from er_ray.options import TrainOptions
    from er_ray.train import recipe_line

    def plan(adapter, k, lr, warmup, task_type, head=None):
        spec = {"adapter": adapter, "adapter_size": 16, "cut_layer": k, "task_type": task_type}
        return {"name": "run", "num_layers": 6,
                "config": SimpleNamespace(spec=spec, learning_rate=lr, warmup=warmup, head_learning_rate=head)}

    opts = TrainOptions(task=["any"])
    assert recipe_line(plan("full", 1, 3e-4, 0.06, "question_answering"), opts) == (
        "run: layers 2..6 over the layer-1 cache, the whole upper layers, peak learning rate 0.0003 after 6% of the "
        "steps: cut layer, adapter, learning rate, warm-up at question answering's default (er-ray train --help; "
        "BENCHMARKS.md)")
    line = recipe_line(plan("full", 3, 1e-3, 0.06, "classification"), opts)  # --learning-rate 1e-3 given
    assert "the whole upper layers" in line and line.endswith("cut layer, adapter, warm-up at classification's default "
                                                       "(er-ray train --help; BENCHMARKS.md)")
    line = recipe_line(plan("full", 2, 1e-4, 0.06, "token_classification", head=1e-2), opts)  # --cut-layer 2
    assert "peak learning rate 0.0001 (the head 0.01) after 6% of the steps: adapter, learning rate, warm-up at " \
        "token classification's" in line, line  # the tagger's head has its own default rate
    assert "adapter, warm-up at token classification's" in \
        recipe_line(plan("full", 2, 1e-4, 0.06, "token_classification"), opts)  # --head-learning-rate 1e-4
    assert "peak learning rate 0.0003 (the head 0.003) after 6%" in \
        recipe_line(plan("full", 3, 3e-4, 0.06, "classification", head=3e-3), opts)  # --head-learning-rate given
    from_text = plan("lora", 3, 3e-3, 0.25, "classification")
    from_text["config"].spec["source"] = "text"  # --from-text: no cache under the upper layers
    assert recipe_line(from_text, opts).startswith("run: layers 4..6 over layers 1..3 run from text, LoRA")
    assert recipe_line(plan("bottleneck", 2, 1e-3, 0.06, "classification"), opts) is None  # both chosen
    assert recipe_line(plan("full", 0, 1e-4, 0.06, "classification"), TrainOptions(task=["x"], full_finetune=True)) \
        is None
