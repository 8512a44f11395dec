"""What every benchmark prints with its table: the machine (CPU model, and the GPU where one runs it), torch, and
lors-convert's version and git commit (with a note when lors_convert/ differs from that commit)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

import lors_convert

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version() -> str:
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "lors_convert"], capture_output=True).returncode
        where = f"at {commit.stdout.strip()}" + (" with local changes to lors_convert/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        where = "(no git checkout)"
    return f"lors-convert {lors_convert.__version__} {where}"


def describe(device: torch.device | None = None) -> str:
    """'CPU model [+ GPU], N cores, torch X; lors-convert V at COMMIT'."""
    gpu = f" + {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return f"{cpu_model()}{gpu}, {os.cpu_count()} cores, torch {torch.__version__}; {version()}"
