"""What the machine did during a measurement, for the benchmarks in this folder."""


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far (/proc/stat): user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_fraction(before: list[int], after: list[int]) -> float:
    """Share of the interval the hypervisor gave these cores to other guests. These VMs are shared: steal was seen
    to swing between 2% and 40% within a minute, so a ratio of two arms run minutes apart carries it."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d[:8])
    return d[7] / total if total else 0.0
