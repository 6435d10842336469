"""Every verb as a Ray Job, submitted through the Jobs API to a REAL local head, token authentication on.

The head is `ray start --head` from this venv, bound to 127.0.0.1 (dashboard and job server), on free ports and
its own --temp-dir so it does not clash with the other Rays on the machine, with Ray 2.60's token authentication on
(RAY_AUTH_MODE=token) and a token of its own (RAY_AUTH_TOKEN_PATH; ~/.ray/auth_token is left alone). Clients
authenticate with an `Authorization: Bearer <token>` header. Each job uploads the repository as its working_dir
and runs `python jobs/<verb>.py` with the CLI's options, exactly as `ray job submit ... -- python jobs/<verb>.py`.

Only the head this module started is stopped (never `ray stop`, which kills every Ray on the machine): its
processes are the ones in the session `ray start` ran in, and job drivers (Ray puts each in a session of its own)
carry a marker in their environment. Teardown checks that none of them is left.

Adding a job: a test (or a module fixture, when later jobs build on its output) calling
`submit(head, "sweep.py", [...])` and checking what the job wrote; `cache_dir` and `trained` are there to build on.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from er_ray.defaults import DEFAULT_LR

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# Uploaded as the job's working_dir: the sources, not the venv, history, or earlier outputs.
EXCLUDES = [".venv", ".git", "runs", "caches", "out", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
            "bench/results"]
JOB_TIMEOUT_S = 240
TREC_DOCUMENTS = 4362 + 546 + 544  # train + dev + test: the whole corpus


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _environ_without_ray_target() -> dict[str, str]:
    """This environment minus what would point Ray at another cluster or token (RAY_AUTH_TOKEN beats any file)."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}


@dataclass
class Head:
    """A `ray start --head` this test started, and how to reach and stop it (and nothing else)."""

    address: str  # the job server / dashboard: http://127.0.0.1:<port>
    token: str
    token_path: Path
    temp_dir: Path
    session_id: int  # the session `ray start` ran in: GCS, raylet, dashboard, agents and workers stay in it
    marker: tuple[str, str]  # an env var every process of this head inherits (job drivers get a new session)
    gcs_address: str = ""  # host:port, as `ray start` recorded it in its temp dir

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @functools.cached_property
    def client(self):
        """The Jobs API client: the token goes in an Authorization header (works whatever RAY_AUTH_MODE says)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)

    def client_env(self) -> dict[str, str]:
        """What a shell needs for `ray job ...` against this head (README: export RAY_AUTH_MODE=token)."""
        return {**_environ_without_ray_target(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) == self.session_id or p.environ().get(self.marker[0]) == self.marker[1]:
                    found.append(p)
            except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
                pass
        return found

    def stop(self, grace_s: float = 10.0) -> list[str]:
        """SIGTERM this head's processes (what `ray stop` does, but only to these): the raylet first (it stops its
        workers and agents), then the rest, the GCS last (the dashboard and autoscaler wait on it while they go
        down); SIGKILL what outlives its grace period. Returns what is left: nothing, or the test fails."""
        phases = [lambda p: p.name() == "raylet", lambda p: p.name() != "gcs_server", lambda p: True]
        for selected in phases + [lambda p: True]:  # the last pass catches anything started meanwhile
            procs = []
            for p in self.processes():
                try:
                    if selected(p):
                        procs.append(p)
                except psutil.Error:  # gone meanwhile
                    pass
            for p in procs:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=grace_s)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
        return [f"{p.pid} {p.name()}" for p in self.processes()]


def start_head() -> Head:
    temp_dir = Path(tempfile.mkdtemp(prefix="er_ray_jobs_", dir="/tmp"))  # short: Ray's socket paths must fit
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    marker = ("ER_RAY_TEST_HEAD", secrets.token_hex(8))
    names = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
             "object-manager-port"]
    ports = dict(zip(names, _free_ports(len(names))))
    env = _environ_without_ray_target()
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        # On a loaded 2-core machine the dashboard agent can take longer than the raylet's 30 s to come up, and
        # the raylet then dies ("Timed out waiting for file .../dashboard_agent_listen_port_..."): wait longer.
        "RAY_agent_register_timeout_ms": "180000", "RAY_worker_register_timeout_seconds": "180",
        marker[0]: marker[1],
    })
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2",
           f"--temp-dir={temp_dir / 'ray'}", "--disable-usage-stats",
           *[f"--{name}={port}" for name, port in ports.items()]]
    # A session of its own: everything the head starts stays in it, so it can be stopped without touching others.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    head = Head(address=f"http://127.0.0.1:{ports['dashboard-port']}", token=token, token_path=token_path,
                temp_dir=temp_dir, session_id=proc.pid, marker=marker)
    try:
        out, _ = proc.communicate(timeout=240)
        if proc.returncode != 0:
            pytest.fail(f"ray start --head failed ({proc.returncode}):\n{out}")
        head.gcs_address = (temp_dir / "ray" / "ray_current_cluster").read_text().strip()
    except BaseException:
        proc.kill()
        left = head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still running: {left}"
        raise
    return head


@pytest.fixture(scope="module")
def head():
    h = start_head()
    try:
        yield h
    finally:
        left = h.stop()
        shutil.rmtree(h.temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still running: {left}"


@pytest.fixture(scope="module")
def out():
    d = Path(tempfile.mkdtemp(prefix="er_ray_jobs_out_"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def submit(head: Head, job: str, args: list[str], timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Submit `python jobs/<job> ARGS` to the head with the repository as working_dir; wait for SUCCEEDED (else
    fail with the job's logs); return the logs."""
    from ray.job_submission import JobStatus

    from er_ray import assets

    client = head.client
    entrypoint = " ".join(["python", f"jobs/{job}", *args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(REPO), "excludes": EXCLUDES,
        "env_vars": {
            # where the packaged models and tasks were fetched; forwarded as a user would with a non-default home
            "ER_RAY_HOME": str(assets.home()),
            # Ray's own State API calls inside workers (Train's PlacementGroupCleaner, which Tune over Train
            # relies on) look for "the" local Ray when RAY_ADDRESS is unset; with several Rays on this machine
            # they fail ("Found multiple active Ray instances") or find another one. One Ray per node on a cluster.
            "RAY_ADDRESS": head.gcs_address,
        },
    })
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    info = client.get_job_info(job_id)
    if info.end_time:
        print(f"[test_jobs] {entrypoint}: {status} in {(info.end_time - info.start_time) / 1000:.1f} s")
    if status != JobStatus.SUCCEEDED:
        if not status.is_terminal():
            client.stop_job(job_id)
        pytest.fail(f"job {entrypoint!r}: {status} after {timeout_s - (deadline - time.monotonic()):.0f} s\n"
                    f"--- logs (end) ---\n{logs[-8000:]}")
    assert "Found multiple active Ray instances" not in logs, "a worker of the job looked for another Ray"
    return logs


# ---------------------------------------------------------------------------------------------------------------
# Outputs the jobs build on one another with (each built once per module, by its job)


@pytest.fixture(scope="module")
def cache_dir(head, out):
    d = out / "cache"
    submit(head, "build_cache.py", ["--corpus", "trec", "--model", "minilm", "--cut-layer", "3", "--output", str(d)])
    return d


@pytest.fixture(scope="module")
def trained(head, out, cache_dir):
    d = out / "train"
    submit(head, "train_tasks.py", ["--task", "trec", "--cut-layer", "3", "--adapter", "lora",
                                    "--cache", str(cache_dir),
                                    "--epochs", "1", "--max-train-examples", "64", "--output", str(d)])
    return d


def _single_run(output: Path) -> Path:
    runs = sorted((output / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


# ---------------------------------------------------------------------------------------------------------------


def _http_status(url: str, headers: dict[str, str]) -> int:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def test_token_auth_is_on_and_the_documented_cli_works(head):
    jobs_api = head.address + "/api/jobs/"
    assert _http_status(jobs_api, {}) == 401  # no token
    assert _http_status(jobs_api, {"Authorization": "Bearer " + secrets.token_hex(32)}) == 403  # another token
    assert _http_status(jobs_api, head.headers) == 200
    # `RAY_AUTH_MODE=token ray job list --address ...` as the README says; without RAY_AUTH_MODE it is refused
    ok = subprocess.run([RAY, "job", "list", "--address", head.address], env=head.client_env(),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env = {k: v for k, v in head.client_env().items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run([RAY, "job", "list", "--address", head.address], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr


def test_build_cache_job_writes_a_verified_cache(head, cache_dir):
    manifest = json.loads((cache_dir / "layer=3" / "manifest.json").read_text())
    assert manifest["cut_layer"] == 3 and manifest["rows"] == TREC_DOCUMENTS
    assert manifest["hidden_size"] == 384 and manifest["dtype"] == "fp16"
    logs = submit(head, "verify_cache.py", [str(cache_dir)])
    assert f"{cache_dir}: ok" in logs


def test_train_tasks_job_trains_from_the_cache(trained):
    run = _single_run(trained)
    assert run.name.startswith("trec-k3-lora16")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recycled"] and metrics["cut_layer"] == 3 and metrics["epochs_run"] == 1
    assert 0.0 <= metrics["dev"] <= 1.0 and 0.0 <= metrics["test"] <= 1.0
    assert (run / "model" / "trainable.safetensors").exists() and (run / "model" / "peft_adapter").is_dir()
    results = pq.read_table(trained / "results.parquet").to_pylist()
    assert [r["run"] for r in results] == [run.name]


def test_finetune_job_trains_the_whole_model(head, out):
    d = out / "finetune"
    submit(head, "finetune.py", ["--task", "trec", "--epochs", "1", "--max-train-examples", "32", "--output", str(d)])
    run = _single_run(d)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["full_finetune"] and not metrics["recycled"] and metrics["epochs_run"] == 1
    assert 0.0 <= metrics["test"] <= 1.0


def test_predict_job_labels_documents_from_the_cache(head, out, trained, cache_dir):
    from er_ray import assets

    run = _single_run(trained)
    # 200 TREC test questions as a corpus file: only their cached layer-3 states go through the upper layers
    docs = pq.read_table(assets.home() / "tasks" / "trec" / "data.parquet").to_pylist()
    docs = [{"id": r["id"], "text": r["text"]} for r in docs if r["split"] == "test"][:200]
    pq.write_table(pa.Table.from_pylist(docs), out / "questions.parquet")
    d = out / "preds"
    submit(head, "predict.py", ["--run", str(run), "--corpus", str(out / "questions.parquet"),
                                "--cache", str(cache_dir), "--output", str(d)])
    table = pq.read_table(d / "predictions.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in docs)
    labels = set(json.loads((run / "model" / "task.json").read_text())["labels"])
    assert set(table.column("label").to_pylist()) <= labels


SMALL = ["--cut-layer", "3", "--adapter", "lora", "--adapter-size", "4", "--epochs", "1", "--max-train-examples", "32",
         "--max-length", "32"]


@pytest.fixture(scope="module")
def swept(head, out):
    d = out / "sweep"
    logs = submit(head, "sweep.py", ["--task", "trec", *SMALL, "--scheduler", "fifo", "--output", str(d)])
    (out / "sweep.log").write_text(logs)
    return d


def test_sweep_job_writes_the_table_and_plots(swept):
    logs = (swept.parent / "sweep.log").read_text()
    # er_ray's lines, not Tune's status tables (its closing "Current best trial: ... params={...}" was 700 chars)
    assert "[er_ray sweep]" in logs and "Current best trial" not in logs and "Trial status" not in logs, logs
    rows = pq.read_table(swept / "sweep.parquet").to_pylist()
    assert [(r["trial"], r["status"]) for r in rows] == [(f"trec-k3-lora4-lr{DEFAULT_LR['lora']:g}-s0", "done")]
    m = json.loads((swept / "runs" / rows[0]["trial"] / "metrics.json").read_text())
    assert (rows[0]["dev"], rows[0]["test"]) == (m["dev"], m["test"])
    for png in ("trec-dev-vs-k.png", "trec-pareto.png"):
        assert (swept / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (swept / "caches" / "trec-minilm-32" / "layer=3" / "manifest.json").exists()


def test_study_job_writes_a_report_from_its_runs_and_resumes(head, out, swept):
    """The paper's study, cut to one model, task, seed and k; its cache is the sweep job's (--caches). Fine-tuning's
    learning rate picked on dev from two; with --match-finetune-time, the sweep's pick again for fine-tuning's
    training seconds."""
    d = out / "study"
    args = ["--model", "minilm", "--task", "trec", "--seed", "0", *SMALL, "--caches", str(swept),
            "--finetune-learning-rate", "3e-5,1e-4", "--match-finetune-time", "--output", str(d)]
    submit(head, "study.py", args, timeout_s=2 * JOB_TIMEOUT_S)  # six Train runs, each ~45 s here
    runs = pq.read_table(d / "study.parquet").to_pylist()
    # fine-tuning + one recycled run that is both the best at L/2 and the sweep's best (trained once), + that
    # configuration at fine-tuning's time
    assert sorted(r["variant"] for r in runs) == ["finetune", "recycled best", "recycled best, finetune's time",
                                                  "recycled k=L/2 lora"]
    # fine-tuning at both learning rates; the better on dev is the reported one (its run, not a third)
    picks = {n: json.loads((d / "minilm" / "runs" / n / "metrics.json").read_text())
             for n in ("trec-finetune-lr3e-05-s0", "trec-finetune-s0")}
    ft_metrics = max(picks.values(), key=lambda m: m["dev"])
    assert next(r for r in runs if r["variant"] == "finetune")["run"] == ft_metrics["run"]
    budget = max(1, round(ft_metrics["train_seconds"]))
    run_dirs = sorted(p.parent for p in (d / "minilm" / "runs").glob("*/metrics.json"))
    assert [p.name for p in run_dirs] == ["trec-finetune-lr3e-05-s0", "trec-finetune-s0", f"trec-k3-lora4-{budget}s-s0",
                                          "trec-k3-lora4-s0"]
    timed = json.loads((run_dirs[2] / "metrics.json").read_text())
    assert timed["budget_seconds"] == budget and 1 <= timed["planned_epochs"] == timed["epochs_run"] <= 4
    assert timed["train_seconds"] <= budget + timed["history"][0]["train_seconds"]  # planned after its first epoch
    report = (d / "REPORT.md").read_text()
    assert "The paper's headline" in report and "(minilm/sweep/sweep.md)" in report
    for r in runs:  # every number in the report is a run's own
        m = json.loads((d / "minilm" / "runs" / r["run"] / "metrics.json").read_text())
        assert r["test"] == m["test"] and r["seconds_per_epoch"] == m["seconds_per_epoch"]
        assert f"{m['test']:.4f}" in report
    ft = next(r for r in runs if r["variant"] == "finetune")
    rec = next(r for r in runs if r["variant"] == "recycled k=L/2 lora")
    assert ft["cut_layer"] == 0 and rec["cut_layer"] == 3 and rec["adapter"] == "lora"
    assert f"{ft['seconds_per_epoch'] / rec['seconds_per_epoch']:.2f}x" in report
    assert f"| lr {ft['learning_rate']:g} |" in report and "picked on dev from 3e-05, 0.0001" in report
    assert (d / "plots" / "minilm-study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (d / "caches").exists()  # nothing encoded again: the sweep's cache served
    assert f"The caches came from {swept} (--caches)" in report  # so their near-zero cost is not taken as theirs
    # submitted again: every finished run is read, nothing is trained again
    before = {p: p.stat().st_mtime_ns for p in (d / "minilm").rglob("metrics.json")}
    submit(head, "study.py", args)
    assert {p: p.stat().st_mtime_ns for p in (d / "minilm").rglob("metrics.json")} == before
