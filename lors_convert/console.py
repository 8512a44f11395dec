"""The consoles every command prints through. Imports no torch, so the CLI can set OpenMP defaults first."""

from __future__ import annotations

import sys

from rich.console import Console

stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False)
