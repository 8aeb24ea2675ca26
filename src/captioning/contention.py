"""How much CPU other processes took while something was measured.

On a shared machine one busy neighbour makes torch's OpenMP threads wait on each other, so a
timing taken then says little about the code. The benchmarks record, beside each figure, the
cores other processes used meanwhile: the machine's busy CPU time minus this process's own.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

QUIET_LOAD = 0.1  # cores other processes may use during a measurement before it counts as contended


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot (Linux /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its joined children (DataLoader / resize workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def other_load(busy_before: float, own_before: float, seconds: float) -> float:
    """Cores other processes used on average over the last `seconds`, given the two counters'
    values at its start."""
    others = busy_cpu_seconds() - busy_before - (own_cpu_seconds() - own_before)
    return max(0.0, others) / seconds
