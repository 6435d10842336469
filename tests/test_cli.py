"""The command line as a user runs it: a real subprocess of the installed `er-ray`."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path


from er_ray import cli, demo

ER_RAY = str(Path(sys.executable).with_name("er-ray"))


def run(*args, timeout=300):
    return subprocess.run([ER_RAY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_lists_every_verb_and_documents_options():
    out = run("--help").stdout
    for verb in ("demo", "models", "tasks", "fetch"):
        assert verb in out
    out = run("demo", "--help").stdout
    assert "--cut-layer" in out and "half the model's layers" in out and "(default: minilm)" in out


def test_models_and_tasks_listings():
    out = run("models")
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("minilm"))
    assert line.split()[:5] == ["minilm", "bert", "6", "384", "22,713,216"]
    out = run("tasks")
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("trec"))
    assert line.split()[:7] == ["trec", "classification", "trec", "4,362", "546", "544", "6"]


def test_demo_encodes_real_texts_and_reports_bytes_per_token():
    out = run("demo", "--limit", "40", "--cut-layer", "2", "--batch-size", "16")
    assert out.returncode == 0, out.stderr
    assert "cut layer k=2" in out.stdout and "40 of 5,452 documents" in out.stdout
    assert "er_ray ragged fp16 (no padding)" in out.stdout and " 768" in out.stdout  # 2 bytes x 384 per token


def test_demo_result_from_the_python_api_is_the_same_call():
    result = demo.run(demo.DemoOptions(limit=10, cut_layer=1, max_length=8))
    assert result["cut_layer"] == 1 and result["documents"] == 10
    assert result["real_tokens"] <= 10 * 8 and result["shape"][2] == 384


def test_bad_options_are_errors_not_tracebacks():
    out = run("demo", "--cut-layer", "9", "--limit", "4")
    assert out.returncode == 1 and "--cut-layer 9 is deeper than minilm's 6 layers" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("demo", "--batch-size", "0")
    assert out.returncode == 2 and "--batch-size must be at least 1" in out.stderr
    out = run("fetch", "--names", "nonesuch")
    assert out.returncode == 1 and "unknown asset 'nonesuch'" in out.stderr


def test_cli_options_are_the_api_dataclasses():
    parser = cli.build_parser()
    ns = parser.parse_args(["demo", "--cut-layer", "4", "--limit", "none", "--model", "mpnet"])
    opts = cli.options_from(ns, demo.DemoOptions)
    assert opts == dataclasses.replace(demo.DemoOptions(), cut_layer=4, limit=None, model="mpnet")
    ns = parser.parse_args(["fetch", "--names", "minilm,trec", "--names", "wnut16"])
    assert cli.options_from(ns, cli.FetchOptions).names == ["minilm", "trec", "wnut16"]
