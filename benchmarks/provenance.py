"""Where a benchmark result came from, recorded in every JSON under ``benchmarks/results``.

git_commit(explicit)   a script's ``--commit``, else the checkout's HEAD (short), else "unknown"
command_line()         the interpreter and the arguments the script ran with
"""

from __future__ import annotations

import subprocess
import sys


def git_commit(explicit: str | None = None) -> str:
    """``explicit`` when given, else the checkout's HEAD, else "unknown" (no git, or not a checkout)."""
    if explicit:
        return explicit
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def command_line() -> str:
    """``python benchmarks/<script>.py <arguments>`` as this process was started."""
    return " ".join([sys.executable, *sys.argv])
