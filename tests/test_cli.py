"""The command line as a user runs it: a real subprocess of the installed `er-ray`."""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path


from er_ray import cli
from er_ray.options import DemoOptions

ER_RAY = str(Path(sys.executable).with_name("er-ray"))


def run(*args, timeout=300):
    return subprocess.run([ER_RAY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_lists_every_verb_and_documents_options():
    out = run("--help").stdout
    for verb in ("demo", "cache", "train", "finetune", "sweep", "study", "predict", "models", "tasks", "fetch"):
        assert verb in out
    out = run("demo", "--help").stdout
    assert "--cut-layer" in out and "half the layers" in out and "(default: minilm)" in out


def test_train_help_states_the_default_learning_rates():
    """The defaults come from a grid over every built-in task (BENCHMARKS.md); --help must say what they are."""
    import re

    from er_ray.defaults import DEFAULT_LR, DEFAULT_LR_TOKENS, default_learning_rate

    out = " ".join(run("train", "--help").stdout.split())  # argparse wraps lines
    text = out.split("--learning-rate LEARNING_RATE")[-1][:400]
    classification, tokens = text.split("for token classification:")
    assert classification.rstrip().endswith("question answering too;"), text
    for part, task_type, own in ((classification, "classification", DEFAULT_LR),
                                 (classification, "question_answering", DEFAULT_LR),
                                 (tokens.split(";")[0], "token_classification", DEFAULT_LR_TOKENS)):
        stated = {a.replace("fine-tuning", "finetune"): float(v)
                  for a, v in re.findall(r"(lora|bottleneck|full|fine-tuning) ([0-9.e-]+[0-9])", part)}
        assert set(own) <= set(stated), out  # every rate of the task type's own is stated...
        assert stated == {kind: default_learning_rate(kind, task_type) for kind in stated}, out  # ...and true
    from er_ray.defaults import DEFAULT_ADAPTER, DEFAULT_WARMUP, WARMUP

    adapter = out.split("--adapter {")[-1][:300]  # and the kind each task type trains by default
    assert set(DEFAULT_ADAPTER) == {None} and f"(default: {DEFAULT_ADAPTER[None]} on every task type," in adapter, \
        adapter

    warmup = out.split("--warmup WARMUP")[-1][:220].replace("- ", "-")  # each kind's too (argparse wraps at "-")
    assert f"lora {DEFAULT_WARMUP['lora']:g}, the others, token classification and fine-tuning {WARMUP:g}" \
        in warmup, warmup


def test_every_verbs_help_formats():
    # argparse formats help lazily: a bad help string (a lone %) only fails when someone asks for --help
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "--help" in text and len(text) > 100, name


def test_models_and_tasks_listings():
    out = run("models")
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("minilm"))
    assert line.split()[:5] == ["minilm", "bert", "6", "384", "22,713,216"]
    out = run("tasks")
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("trec"))
    assert line.split()[:7] == ["trec", "classification", "trec", "4,362", "546", "544", "6"]
    # the listing's last line too: a piped stdout arrives whole through the quick exit of `er-ray` (cli.run)
    assert out.stdout.splitlines()[-1].split()[:2] == ["squad", "question_answering"], out.stdout[-300:]


def test_demo_runs_the_whole_pipeline_and_prints_the_table(ray_local, tmp_path):
    """The README's main job, cut small: cache once, train from the cache, fine-tune the baseline, table + plot.
    (Run as the user runs it; it joins this session's Ray instead of starting a second one.)"""
    out = tmp_path / "demo"
    res = subprocess.run([ER_RAY, "demo", "--task", "trec", "--compare", "trec", "--epochs", "1",
                          "--max-train-examples", "64", "--max-length", "32", "--output", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cut layer k=3" in res.stdout and "cache trec: 5,452 documents" in res.stdout
    for step in ("1/2 caching layer 3", "2/2 training 1 task models from the cache (full) and fully fine-tuning "
                 "trec from raw text"):
        assert step in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if "recycled k=3 full " in ln)
    assert line.split()[0] == "trec" and re.search(r" \d+\.\d\dx ", line), line  # the speed-up column
    assert any("full fine-tuning" in ln for ln in res.stdout.splitlines())
    assert sum(ln.startswith("task ") for ln in res.stdout.splitlines()) == 1  # the demo's table, not run_all's too
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "trec-finetune-s0" / "metrics.json").exists()
    assert (out / "runs" / "trec-k3-full-s0" / "metrics.json").exists()
    # A console a person can read: er_ray's progress, no Ray INFO lines, no C++ log lines (Ray's benign "E ...
    # core_worker.cc ... constructor arguments in the object store"), no colour codes, no tracebacks.
    console = res.stdout + res.stderr
    assert "[er_ray cache] 6/6 shards, 5,452 documents" in console
    assert re.search(r"\[er_ray train\] trec-k3-full-s0: epoch 1/1, loss \d\.\d{4}, dev accuracy 0\.\d{4}", console)
    assert re.search(r"\[er_ray train\] trec-finetune-s0: dev accuracy 0\.\d{4}, test 0\.\d{4}", console)
    noise = [ln for ln in console.splitlines() if re.search(r"\bINFO\b|^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+|"
                                                               r"\x1b\[|Traceback|core_worker\.cc|^\(raylet\)", ln)]
    assert noise == [], noise


RAYLET = """
import sys, time
import ray
from ray._private.utils import publish_error_to_driver
from er_ray import console
from er_ray.cluster import connect
console.configure(verbose=sys.argv[1] == "verbose")
connect(num_cpus=1, dashboard=False)
gcs = ray._private.worker.global_worker.gcs_client
publish_error_to_driver("worker_pool_large", "WARNING: 32 PYTHON worker processes have been started on node: x "
                        "with address: y, which is 16x the maximum expected startup concurrency (2).", gcs)
publish_error_to_driver("task", "Task MapWorker(MapBatches(ShardEncoder)).submit failed. There are infinite retries "
                        "remaining, so the task will be retried. Error: The actor is dead because it was killed by "
                        "`ray.kill`.", gcs)
publish_error_to_driver("other", "a raylet message a user must see", gcs)
time.sleep(3)
ray.shutdown()
"""


def test_the_raylets_benign_messages_stay_off_the_console_unless_verbose():
    """`make demo` printed "(raylet) WARNING: N PYTHON worker processes have been started ..." eight times, and
    Ctrl-C on `er-ray cache` "(raylet) Task MapWorker(...).submit failed ... killed by `ray.kill`": Ray's driver
    prints every message a raylet publishes. Published here through Ray's own channel, beside another message that
    must still come through."""
    for mode in ("quiet", "verbose"):
        out = subprocess.run([sys.executable, "-c", RAYLET, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "a raylet message a user must see" in out.stdout, (mode, out.stdout)
        assert ("worker processes have been started" in out.stdout) == (mode == "verbose"), (mode, out.stdout)
        assert ("killed by `ray.kill`" in out.stdout) == (mode == "verbose"), (mode, out.stdout)


RAY_DATA_ADVICE = """
import logging, sys
from er_ray import console
console.configure(verbose=sys.argv[1] == "verbose")
import ray.data
console.quiet_ray()
logging.getLogger("ray.data._internal.issue_detection.issue_detector_manager").warning(
    "Operator 'MapBatches(ShardEncoder)' uses 2.5GiB of memory per worker on average")
logging.getLogger("ray.data._internal.execution").warning("a Ray Data warning a user must see")
import time
import ray.tune.utils.util as tune_util
tune_util.START_OF_TIME -= 120  # Tune holds this warning back for a minute after its import
with tune_util.warn_if_slow("process_trial_result", threshold=0.01):  # Tune's own timer, as its driver loop uses it
    time.sleep(0.05)
logging.getLogger("ray.tune.tune").warning("a Tune warning a user must see")
"""


def test_rays_advice_on_er_rays_own_calls_stays_off_the_console_unless_verbose():
    """An mpnet cache build printed Ray Data's issue detector's 14-line advice to set `memory=` on er_ray's own
    encoder, and a study's sweep Tune's "operation took 0.654 s, which may be a performance bottleneck" four lines
    at a time: nothing a user can act on. Other Ray Data and Tune warnings still come through."""
    for mode in ("quiet", "verbose"):
        out = subprocess.run([sys.executable, "-c", RAY_DATA_ADVICE, mode], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "a Ray Data warning a user must see" in out.stderr, (mode, out.stderr)
        assert ("uses 2.5GiB of memory per worker" in out.stderr) == (mode == "verbose"), (mode, out.stderr)
        assert "a Tune warning a user must see" in out.stderr, (mode, out.stderr)
        assert ("performance bottleneck" in out.stderr) == (mode == "verbose"), (mode, out.stderr)


THREADS_TALKING = """
import sys, threading
from er_ray import console
sys.setswitchinterval(1e-6)  # a thread switch at (nearly) every chance
def talk(n):
    for i in range(2000):
        console.say("train", f"run {n}: line {i} " + "x" * 200)
threads = [threading.Thread(target=talk, args=(n,)) for n in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_lines_from_several_threads_come_out_whole():
    """A suite run's SIGTERM test read "...BENCHMARKS.md)[er_ray train] interrupted: ...": print() wrote a run
    thread's line and its newline apart, and the main thread's line went out between them. Under
    PYTHONUNBUFFERED=1 (common in containers and CI) each is a write of its own; with print() this test failed
    (3 tries of 3; a stand-alone check of the same kind glued 458 lines of 9,000)."""
    out = subprocess.run([sys.executable, "-c", THREADS_TALKING], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    whole = re.compile(r"\[er_ray train\] run \d: line \d+ x{200}")
    lines = out.stderr.splitlines()
    assert len(lines) == 6000 and all(whole.fullmatch(ln) for ln in lines), \
        [ln for ln in lines if not whole.fullmatch(ln)][:3]


def test_the_epoch_relay_ends_quietly_when_ray_shuts_down_under_it(monkeypatch):
    """The thread that prints Ray Train's epoch lines polls a Ray queue. A suite run ended with "Exception in
    thread er_ray-epochs ... SystemExit: 0": ray.shutdown() had landed inside its ray.get, which then raises
    SystemExit in that thread, not an Exception. Here the queue raises what Ray raised there."""
    import threading

    import ray

    from er_ray import console

    class ShutDownUnderIt:
        def size(self):
            raise SystemExit(0)

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    t = threading.Thread(target=console._drain, args=(ShutDownUnderIt(),))
    t.start()
    t.join(10)
    assert not t.is_alive() and unhandled == [], unhandled


def test_bad_options_are_errors_not_tracebacks():
    out = run("demo", "--cut-layer", "9")
    assert out.returncode == 1 and "--cut-layer 9 out of range: minilm has layers 0..5 to cut at" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("demo", "--batch-size", "0")
    assert out.returncode == 2 and "--batch-size must be at least 1" in out.stderr
    out = run("sweep", "--task", "trec", "--cut-layer", "9")  # refused before Ray starts
    assert out.returncode == 1 and "--cut-layer 9 out of range: minilm has layers 0..5 to cut at" in out.stderr
    out = run("fetch", "nonesuch")
    assert out.returncode == 1 and "unknown asset 'nonesuch'" in out.stderr


def test_cli_options_are_the_api_dataclasses():
    parser = cli.build_parser()
    ns = parser.parse_args(["demo", "--cut-layer", "4", "--max-train-examples", "none", "--model", "mpnet"])
    opts = cli.options_from(ns, DemoOptions)
    default = DemoOptions()
    assert opts == dataclasses.replace(default, train=dataclasses.replace(default.train, cut_layer=4,
                                                                          max_train_examples=None, model="mpnet"))
    ns = parser.parse_args(["fetch", "minilm,trec", "wnut16"])
    assert cli.options_from(ns, cli.FetchOptions).names == ["minilm", "trec", "wnut16"]


def test_predict_progress_counts_rows_and_says_where_and_how_fast(capsys):
    # Both ways of predicting (this process, Ray Data's actors) tell their progress through this one helper; here it
    # prints on every table (every=0): rows done, of the total where it is known, the rate.
    import pyarrow as pa

    from er_ray.predict import _told

    tables = [pa.table({"id": [str(i) for i in range(n)]}) for n in (1024, 1024, 300)]
    assert [t.num_rows for t in _told(iter(tables), 2348, "documents", "by Ray Data", every=0)] == [1024, 1024, 300]
    lines = capsys.readouterr().err.splitlines()
    assert [re.match(r"\[er_ray predict\] ([\d,]+) of 2,348 documents by Ray Data, [\d,]+/s$", x).group(1)
            for x in lines] == ["1,024", "2,048", "2,348"]
    list(_told(iter(tables[:1]), None, "windows", "on this process", every=0))  # a total not known: no "of"
    assert re.fullmatch(r"\[er_ray predict\] 1,024 windows on this process, [\d,]+/s\n", capsys.readouterr().err)
