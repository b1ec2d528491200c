"""``.ci/parts.sh``'s ``part``: the device calls' runner of one part with a time limit (``.ci/gpu``,
``benchmarks/gpu_bench.sh``)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

PARTS = Path(__file__).resolve().parents[1] / ".ci" / "parts.sh"


def run_parts(tmp_path: Path, body: str) -> tuple[str, float]:
    """``body`` after sourcing parts.sh (under ``set -uo pipefail``, as the callers run), its output read through a
    pipe as a device call reads it; (summary, wall s)."""
    script = f'set -uo pipefail\nsource "{PARTS}"\nparts_dir="{tmp_path}/parts"; summary="{tmp_path}/summary.txt"\n'
    script += f'mkdir -p "$parts_dir"; : > "$summary"\n{body}\ncat "$summary"\n'
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
    )
    return done.stdout, time.monotonic() - start


def processes_running(argv: list[str]) -> list[int]:
    """The pids whose command line is exactly ``argv`` (from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv]:
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return found


def still_running_after(argv: list[str], seconds: float) -> list[int]:
    """The pids of ``argv`` still running once ``seconds`` have passed, polled (a cancelled watchdog's trap ends its
    sleep at once; on a busy machine the signal may take a moment), or none as soon as none is."""
    deadline = time.monotonic() + seconds
    while (running := processes_running(argv)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def test_a_quick_part_returns_before_its_limit(tmp_path: Path) -> None:
    """The watchdog holds none of the caller's output: a call whose output is piped ends with its parts, not at the
    longest limit (before the fix, 540 s for 204 s of parts)."""
    out, wall = run_parts(tmp_path, "part quick 31 echo hello")
    assert "quick rc=0" in out
    assert wall < 10, f"the call took {wall:.1f} s for a part of 0 s (limit 31 s)"
    assert not still_running_after(["sleep", "31"], 5), "the watchdog's sleep outlived the part"


def test_quick_parts_in_a_row_leave_no_watchdog_sleep(tmp_path: Path) -> None:
    """A watchdog cancelled right after it starts still ends its sleep: 100 parts that end at once, then no sleep of
    their limit is left (a TERM between the sleep's fork and its pid's assignment once left it running)."""
    out, _ = run_parts(tmp_path, "for i in $(seq 1 100); do part quick 33 true; done")
    assert out.count("quick rc=0") == 100
    assert not still_running_after(["sleep", "33"], 5), "a cancelled watchdog's sleep outlived its part"


def test_a_part_past_its_limit_is_ended(tmp_path: Path) -> None:
    out, wall = run_parts(tmp_path, "part slow 2 bash -c 'sleep 40; echo never'")
    assert "slow rc=143" in out, out
    assert wall < 20, f"the part ran {wall:.1f} s against a limit of 2 s"
    assert "never" not in (tmp_path / "parts" / "slow.log").read_text()


if __name__ == "__main__":
    pytest.main([__file__])
