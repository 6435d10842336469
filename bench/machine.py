"""What the machine did during a measurement, for the benchmarks in this folder."""

import time

import psutil

cpu_ticks = psutil.cpu_times  # the machine's CPU time so far: user, nice, system, idle, iowait, irq, softirq, steal


def steal_fraction(before, after) -> float:
    """Share of the interval the hypervisor gave these cores to other guests. These VMs are shared: steal was seen
    to swing between 2% and 40% within a minute, so a ratio of two arms run minutes apart carries it."""
    fields = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")  # guest is inside user
    total = sum(getattr(after, f) - getattr(before, f) for f in fields)
    return (after.steal - before.steal) / total if total else 0.0


def process_tree() -> list[psutil.Process]:
    """This process and all its descendants: the driver, and under a local Ray its raylet, GCS and workers."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


class ProcessCpu:
    """CPU seconds used during an interval by this process and each of its descendants (Ray's raylet, GCS,
    dashboard and workers), grouped by what the process was, with the machine's idle and steal time next to them:
    where both cores' time went. Sampled every `interval` s because a worker that exits (the encoder actor at the
    end of a pipeline) takes its counters with it; /proc/<pid>/stat is a cheap read (unlike smaps_rollup)."""

    def __init__(self, interval=2.0):
        import threading

        self.interval, self._stop, self._seen, self._seen_any = interval, threading.Event(), {}, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _label(p) -> str:
        # A Ray worker renames itself after what it runs ("ray::MapWorker(MapBatches(ShardEncoder))", "ray::IDLE").
        cmd = p.cmdline()
        name = cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()
        if name == "python" or name.startswith("python3"):
            name = next((c.rsplit("/", 1)[-1] for c in cmd[1:] if c.endswith(".py")), name)
        return name

    def _sample(self):
        for p in process_tree():
            try:
                t = p.cpu_times()
                label = self._label(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            # A process born during the interval counts from zero; one alive at the start, from what it had then.
            born = (t.user + t.system) if not self._seen_any else 0.0
            first, _, old_label = self._seen.get(p.pid, (born, None, label))
            keep = old_label if label == "ray::IDLE" else label  # the last real job of the worker names it
            self._seen[p.pid] = (first, t.user + t.system, keep)
        self._seen_any = True

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._t0, self._machine0 = time.perf_counter(), psutil.cpu_times()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._thread.join()
        self._sample()
        wall, m1 = time.perf_counter() - self._t0, psutil.cpu_times()
        groups: dict[str, float] = {}
        for first, last, label in self._seen.values():
            if last is not None:
                groups[label] = groups.get(label, 0.0) + last - first
        self.result = {
            "wall_seconds": wall, "cores": psutil.cpu_count(),
            "cpu_seconds": dict(sorted(((k, round(v, 1)) for k, v in groups.items() if v >= 0.05),
                                       key=lambda kv: -kv[1])),
            "machine_idle_seconds": round(m1.idle + m1.iowait - self._machine0.idle - self._machine0.iowait, 1),
            "machine_steal_seconds": round(m1.steal - self._machine0.steal, 1),
        }
