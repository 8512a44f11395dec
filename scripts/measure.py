"""Wall time and peak resident memory of one command, its own.

A child's ru_maxrss is never below the memory its parent had when it started it: Linux keeps the high-water mark
of the memory a process had before it exec'd, and subprocess starts a child from the parent's memory. A benchmark
that has loaded a model would otherwise report its own peak as the command's. So the command is started from a
small launcher process, and the launcher reports its child's peak."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_measured(command: list, env: dict | None = None, check: bool = True) -> tuple[float, float, int, str]:
    """Run `command` to completion: (wall seconds, peak RSS in MB of the command alone, its exit code, its stdout
    and stderr). With `check`, a failure ends the benchmark with the end of the command's output."""
    with tempfile.NamedTemporaryFile("r") as report, tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        launcher = [sys.executable, "-c", LAUNCHER, report.name, *map(str, command)]
        code = subprocess.run(launcher, env=env, stdout=log, stderr=log).returncode
        wall = time.perf_counter() - start
        peak_kb = report.read()
        log.seek(0)
        output = log.read()
    if check and code:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{output[-3000:]}")
    return wall, float(peak_kb or 0) / 1024, code, output
