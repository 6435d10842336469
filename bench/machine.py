"""What the machine did during a measurement, for the benchmarks in this folder."""

import psutil

cpu_ticks = psutil.cpu_times  # the machine's CPU time so far: user, nice, system, idle, iowait, irq, softirq, steal


def steal_fraction(before, after) -> float:
    """Share of the interval the hypervisor gave these cores to other guests. These VMs are shared: steal was seen
    to swing between 2% and 40% within a minute, so a ratio of two arms run minutes apart carries it."""
    fields = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")  # guest is inside user
    total = sum(getattr(after, f) - getattr(before, f) for f in fields)
    return (after.steal - before.steal) / total if total else 0.0
