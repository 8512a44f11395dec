"""How many compute threads a command uses: one per core that other work leaves free, chosen as it starts and
revised as it runs (another job starting or ending on the machine), unless the user chose a count.

OpenMP's threads wait for each other at every parallel region; with more threads than free cores each region waits
for a thread the OS has parked, and MiniLM's conversion ran 15-18x slower while another process kept the cores busy
(scripts/bench_busy.py). The first choice is made before torch is imported (nothing the CLI imports at its start
imports torch), so every library that reads OMP_NUM_THREADS sees it; later ones go through torch.set_num_threads
on the thread that computes. A library caller's threads are never touched: only the CLI turns this on."""

from __future__ import annotations

import os
import time
from pathlib import Path

THREAD_CHOICES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
FIRST_LOOK_S = 0.05  # the start's sample: short, it delays every command
REVISE_EVERY_S = 2.0  # later ones look at what the other processes used since the last look

# whether the count is ours (then torchrun's processes share it, and it is revised), and the last look
_chosen: dict = {"ours": False, "last": None}


def usable_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(busy, total) seconds of these CPUs since boot, from /proc/stat (None where there is none)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [float(v) for v in fields[:8]]
            total += sum(values)
            busy += sum(values) - values[3] - values[4]  # less idle and iowait
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (busy / tick, total / tick) if total else None


def own_cpu_seconds() -> float:
    """CPU time this process has used, all its threads."""
    times = os.times()
    return times.user + times.system


def look() -> tuple[float, float, float] | None:
    """(busy, total, this process's own) CPU seconds now, or None."""
    times = cpu_times(usable_cpus())
    return None if times is None else (*times, own_cpu_seconds())


def free_cores(before: tuple, after: tuple) -> int | None:
    """How many usable CPUs the other processes left idle between two looks."""
    cpus = len(usable_cpus())
    total = after[1] - before[1]
    if total <= 0:
        return None
    others = max(0.0, (after[0] - before[0]) - (after[2] - before[2]))  # busy, less what this process used
    return max(1, min(cpus, round((1 - others / total) * cpus)))


def choose_threads() -> None:
    """One compute thread per free core, unless the user chose a thread count (then nothing is ever changed)."""
    if any(name in os.environ for name in THREAD_CHOICES):
        return
    before = look()
    time.sleep(FIRST_LOOK_S)
    after = look()
    free = None if before is None or after is None else free_cores(before, after)
    if free is not None:
        os.environ["OMP_NUM_THREADS"] = str(free)
        _chosen.update(ours=True, last=(time.monotonic(), after))


def threads_are_ours() -> bool:
    return _chosen["ours"]


def revise_threads() -> None:
    """Called from the loops of long work (on the thread that computes): at most every REVISE_EVERY_S, sets the
    thread count to the cores the other processes left free since the last look."""
    if not _chosen["ours"] or time.monotonic() - _chosen["last"][0] < REVISE_EVERY_S:
        return
    now = look()
    if now is None:
        return
    free = free_cores(_chosen["last"][1], now)
    _chosen["last"] = (time.monotonic(), now)
    import torch  # imported by now: only work that computes calls this

    if free is not None and free != torch.get_num_threads():
        torch.set_num_threads(free)
