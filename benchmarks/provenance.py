"""Where a benchmark result came from, recorded in every JSON under ``benchmarks/results``.

git_commit(explicit)   a script's ``--commit``, else the checkout's HEAD (short; "-dirty" when tracked files
                       differ from it), else "unknown"
command_line()         the interpreter and the arguments the script ran with
origin(commit)         a record's first fields: the command, the commit, the date (UTC) and the Python and torch
                       versions
write_record(r, out, name)  a record as JSON under a folder, the GPU's name and the date filled into its file name
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path


def git_commit(explicit: str | None = None) -> str:
    """``explicit`` when given, else the checkout's HEAD with "-dirty" when tracked files differ from it (a copied
    tree whose .git lags its files says so), else "unknown" (no git, or not a checkout). The name goes into result
    file names: "-", not "+", which the device tool does not bring back in a file name."""
    if explicit:
        return explicit
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")


def command_line() -> str:
    """``python benchmarks/<script>.py <arguments>`` as this process was started."""
    return " ".join([sys.executable, *sys.argv])


def origin(commit: str) -> dict[str, object]:
    """A result record's first fields: ``command``, ``commit``, ``date`` (UTC, to the second) and ``versions`` (Python,
    torch)."""
    import torch

    return {
        "command": command_line(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }


def write_record(record: dict, out: str | Path, name: str) -> Path:
    """``record`` as JSON under the folder ``out`` (made if missing) in file ``name``, its ``{gpu}`` (the current CUDA
    device's name, spaces as "-") and ``{date}`` (today, ISO) filled in; the file's path."""
    import torch

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    path = folder / name.format(gpu=gpu, date=datetime.date.today().isoformat())
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
