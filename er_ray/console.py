"""What a person sees: er_ray's own progress lines, numbers formatted; Ray's logs stay in Ray's log folder.

    say("cache", "7/23 shards ...")    ->  [er_ray cache] 7/23 shards ...     (stderr; tables go to stdout)
    progress("cache", 23)              ->  one line per step, or a bar redrawn in place on a terminal
    fmt_score(0.91433) -> "0.9143"; fmt_seconds(125.3) -> "2 min 05 s"; fmt_count(5452) -> "5,452"

`configure(verbose)` runs once per command, before Ray starts: unless --verbose, Ray's INFO logs, its worker
processes' output and Ray Data's progress lines go only to Ray's session log folder (the dashboard shows them
all), and er_ray prints its own progress from the driver (training epochs are relayed from the Train
controller, see `epoch_relay`). Warnings and errors of Ray still reach the console. `LiveMetrics` puts a run's
loss, speed and dev metric on the dashboard.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time

_state = {"verbose": True, "configured": False}
# Known-benign lines of Ray that are not er_ray's to fix, dropped from the console unless --verbose:
# - Ray Data hands its actors their constructor arguments as object refs, so every actor pool logs this ERROR
#   line from the driver's core worker (Ray issue #57733; open); the actors restart fine here (tests kill them).
BENIGN = (re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),)


def verbose() -> bool:
    return _state["verbose"]


def configure(verbose: bool = False) -> None:
    """Set how chatty Ray is for this process and the workers it starts (before Ray starts)."""
    _state.update(verbose=verbose, configured=True)
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI colour codes in logs that land in files
    if not verbose:
        # Tune's newer console prints its status table and "Current best trial: ... params={...}" (the whole
        # trial config) once more at the end even at verbose=0; the older one honours it. er_ray prints a line per
        # trial itself and the table after.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        _filter_stderr()


def quiet_ray() -> None:
    """After `import ray`: Ray's and Ray Data's loggers print warnings and errors only (their files keep all)."""
    if _state["verbose"]:
        return
    import logging

    import ray.data

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__:
                h.setLevel(logging.WARNING)
                h.addFilter(_drop_known_lines)  # a handler's filter also sees its child loggers' records
        if name == "ray":
            logger.setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _drop_benign_raylet_messages()


# What raylets publish to the driver is printed by a thread of Ray's (`listen_error_messages`) as "(raylet) ...",
# whatever log_to_driver says. One message is benign here and frequent: on a small machine every Ray Data and Ray
# Train actor with a fractional CPU counts against "the maximum expected startup concurrency" (the number of CPUs),
# and `make demo` printed "(raylet) WARNING: 32 PYTHON worker processes have been started ..." eight times. The
# raylet's own log (raylet.out) and the dashboard keep it; every other raylet message still reaches the console.
# Another comes at Ctrl-C: Ray Data's executor kills its actors as it stops, and a call still in flight to one is
# told as "(raylet) Task MapWorker(MapBatches(ShardEncoder)).submit failed ... killed by `ray.kill`" above the
# command's own "interrupted" line. An actor killed by `ray.kill` is always one that Ray or er_ray meant to stop.
BENIGN_RAYLET = (re.compile(r"worker processes have been started on node"), re.compile(r"killed by `ray\.kill`"))


def _drop_benign_raylet_messages() -> None:
    from ray._private import worker  # the listener looks the printer up by name at each message

    show = worker.print_to_stdstream
    if getattr(show, "er_ray_filter", False):
        return

    def printer(data, ignore_prefix):
        lines = [ln for ln in data.get("lines", []) if not any(p.search(ln) for p in BENIGN_RAYLET)]
        if lines:
            show({**data, "lines": lines}, ignore_prefix)

    printer.er_ray_filter = True
    worker.print_to_stdstream = printer


def _drop_known_lines(record) -> bool:
    # Ray Data warns that it has no progress bars when asked for none (er_ray prints its own progress). Its issue
    # detectors advise on er_ray's own calls ("Operator 'MapBatches(ShardEncoder)' uses 2.5GiB of memory per
    # worker ... consider setting `memory=`", 14 lines during an mpnet cache build): nothing a user can act on;
    # Ray's log files keep them. Tune warns when its driver's bookkeeping of a trial result takes over 0.5 s ("The
    # `process_trial_result` operation took 0.654 s, which may be a performance bottleneck. Please consider reporting
    # results less frequently"): on a 2-core machine busy with two trials it does, four lines at a time, and er_ray
    # already reports once per epoch.
    slow_tune = record.name.startswith("ray.tune") and "performance bottleneck" in str(record.msg)
    return "Progress bars disabled" not in str(record.msg) and "issue_detect" not in record.name and not slow_tune


def terminate_as_interrupt() -> None:
    """`kill` (SIGTERM) takes Ctrl-C's path: one line, what is kept, how to resume. Set after ray.init: Ray's
    core worker installs a failure-signal handler for SIGTERM that printed a C++ stack dump
    (`logging.cc: PC: @ ...`) and killed the process mid-write. Only for er-ray's own commands (the CLI configures
    the console; a Python program that imports er_ray keeps its own SIGTERM handling), in the main thread."""
    import signal
    import threading

    if not _state["configured"] or threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        _state["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def exit_code_of_interrupt() -> int:
    """128 + the signal that interrupted the command: 130 for Ctrl-C, 143 for SIGTERM."""
    import signal

    return 128 + int(_state.get("signal", signal.SIGINT))


def say(stage: str, msg: str) -> None:
    line(f"[er_ray {stage}] {msg}")


def line(text: str) -> None:
    """One line on stderr, in one write. Trap: print() writes a line's text and its newline apart, and under
    PYTHONUNBUFFERED=1 (common in containers and CI) each is its own write to the descriptor, so lines from
    several threads (a run's, the epoch relay's, the main thread's "interrupted") came out glued together:
    "...BENCHMARKS.md)[er_ray train] interrupted: ..." in a suite run."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def fmt_score(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def fmt_count(n) -> str:
    return f"{int(n):,}"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class progress:
    """Steps of a long job: on a terminal one bar redrawn in place, elsewhere (logs, CI, a Ray Job) a line per
    step. `update(done, detail)`; `close()` ends the bar's line. A total of 0: not known, no bar (the detail
    alone)."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.t0 = stage, total, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._open = False

    def update(self, done: int, detail: str) -> None:
        if not self.tty:
            say(self.stage, detail)
            return
        width = 24
        filled = int(width * min(done, self.total) / self.total) if self.total > 0 else 0
        bar = f"[{'#' * filled + '.' * (width - filled)}] " if self.total > 0 else ""
        sys.stderr.write(f"\r\033[K[er_ray {self.stage}] {bar}{detail}")
        sys.stderr.flush()
        self._open = True

    def close(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._open = False


# ---------------------------------------------------------------------------------------------------------------
# Training epochs, told on the driver: a Train controller callback puts a line in a queue this process drains.


_relay: dict = {}


def epoch_relay():
    """A Ray Train callback that tells this process each reported epoch of a run (started once per process)."""
    import ray
    from ray.train import UserCallback
    from ray.util.queue import Queue

    if "queue" not in _relay:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # num_cpus=0: an actor otherwise needs a free CPU to be placed, and training holds them. On this
        # process's node: it lives and dies with the driver, not with a worker node a run may lose.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        _relay["queue"] = Queue(actor_options={"num_cpus": 0, "max_restarts": 0, "scheduling_strategy": here})
        threading.Thread(target=_drain, args=(_relay["queue"],), daemon=True, name="er_ray-epochs").start()

    class EpochLines(UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            if "epoch" in m:
                try:  # telling is best effort: it must never fail a run
                    self.queue.put_nowait(m)
                except Exception:
                    pass

    return EpochLines(_relay["queue"])


def epoch_line(m: dict) -> str:
    return (f"{m['run']}: epoch {m['epoch']}/{m['epochs']}, loss {m['train_loss']:.4f}, dev {m['metric']} "
            f"{fmt_score(m['dev_score'])}, {fmt_seconds(m['train_seconds'])} "
            f"({m['examples_per_second']:,.0f} examples/s" + (f", MFU {m['mfu']:.0%}" if "mfu" in m else "") + ")" +
            (", resumed" if m.get("resumed") else ""))


def _drain(queue) -> None:
    import ray

    # Trap: a Ray call after ray.shutdown() (at exit) starts a new local Ray; stop polling once Ray is down.
    while ray.is_initialized():
        try:
            for m in queue.get_nowait_batch(queue.size()) if queue.size() else []:
                say("train", epoch_line(m))
        # Ray shut down: nothing more to tell. Trap: a ray.get that ray.shutdown() interrupts raises SystemExit(0)
        # in this thread, not an Exception (seen once, at the end of a test session).
        except (Exception, SystemExit):
            return
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------------------
# Known-benign C++ lines: the driver's core worker writes them straight to file descriptor 2, past Python's
# logging, so they are dropped on their way out: fd 2 goes through a pipe that a thread copies to the console.


def _filter_stderr() -> None:
    if _state.get("filtering") or os.environ.get("ER_RAY_RAW_STDERR"):
        return
    try:
        sys.stderr.flush()
        console = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
    except OSError:
        return
    _state["filtering"] = True
    thread = threading.Thread(target=_copy, args=(r, console), daemon=True, name="er_ray-stderr")
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(console, 2)  # the pipe's last write end here: the copier reads what is left, then EOF
        thread.join(timeout=2)

    atexit.register(restore)
    _state["restore_stderr"] = restore


def end_interrupted() -> None:
    """Exit now, with 128 + the interrupting signal, what was printed flushed. Trap: training runs in daemon
    threads that may still be inside Ray Train's fit(); at a normal exit ray.shutdown() runs first, and such a
    thread's next call into the shut-down core worker ends the process with status 1 ("The core worker has
    already been shutdown ... The process will exit"; seen once in a suite run, SIGTERM at a run's start).
    os._exit skips that race: a local Ray's processes share this process's fate (Ray starts them so) and go with
    it; on a cluster, Ray ends this driver's job."""
    sys.stdout.flush()
    if "restore_stderr" in _state:
        _state["restore_stderr"]()
    sys.stderr.flush()
    os._exit(exit_code_of_interrupt())


def _copy(r: int, console: int) -> None:
    buf = b""
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            out = [ln for ln in lines if not any(p.search(ln.decode("utf-8", "replace")) for p in BENIGN)]
            if out:
                os.write(console, b"\n".join(out) + b"\n")
            if buf and not buf.startswith(b"["):  # a partial line (a redrawn bar) goes out now; Ray's C++ log
                os.write(console, buf)             # lines start with "[" and come whole
                buf = b""
        if buf:
            os.write(console, buf)


# ---------------------------------------------------------------------------------------------------------------
# The dashboard: a run's numbers as Ray metrics


class LiveMetrics:
    """Loss, throughput, epoch and dev metric per run, through Ray's metrics API: the dashboard's Metrics view
    (and Prometheus/Grafana where the cluster has them) shows every concurrent task side by side."""

    def __init__(self, cfg):  # a train_loop.LoopConfig
        from ray.util import metrics

        tags = ("run", "task", "metric")
        self.tags = {"run": cfg.run, "task": cfg.task, "metric": cfg.metric}
        self.loss = metrics.Gauge("er_ray_train_loss", "mean training loss of the last epoch", tags)
        self.speed = metrics.Gauge("er_ray_train_examples_per_second", "training examples per second", tags)
        self.dev = metrics.Gauge("er_ray_train_dev_metric", "dev metric after the last epoch", tags)
        self.epochs = metrics.Gauge("er_ray_train_epoch", "epochs finished", tags)

    def epoch(self, epoch: int, loss: float, dev: float, speed: float) -> None:
        self.loss.set(loss, tags=self.tags)
        self.speed.set(speed, tags=self.tags)
        self.dev.set(dev, tags=self.tags)
        self.epochs.set(epoch, tags=self.tags)

    def final(self, metrics: dict) -> None:
        """The finished run's dev metric and epochs, set again by the process that publishes the run. Trap: Ray
        exports a process's metrics every few seconds, and a training worker exits soon after its last epoch, so
        its last values could leave with it (seen: a dev metric never reached the dashboard)."""
        if metrics.get("dev") is not None:
            self.dev.set(metrics["dev"], tags=self.tags)
        self.epochs.set(metrics["epochs_run"], tags=self.tags)
