"""Compile the Triton forward for many configurations in parallel processes before a benchmark times them.

Triton compiles a kernel at its first launch, one at a time per process (seconds each); its on-disk cache is
shared between processes. ``warm(tasks, jobs)`` runs every task once in ``jobs`` worker processes, so the timing
process then finds every kernel compiled. A task is one forward call:

    {"T": 65536, "d": 64, "gated": False, "plan": {Plan fields}, "segments": None, "constants": {...}}

``constants`` sets ``codegen.forward`` module constants (kernel variants) for that call. The worker builds
inputs exactly as ``inputs`` below (b=1, h=8, bf16, contiguous), so the integer-argument specialisations match
the timed calls. Errors are returned per task, not raised.

    python benchmarks/warm.py TASKS.json     # a worker: runs the tasks in the file, prints a JSON list of errors
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HEADS = 8


def inputs(T: int, d: int, gated: bool, seed: int = 0) -> dict:
    """q, k, v (1, HEADS, T, d) bf16 and the log-gate (1, HEADS, T) or None, on the GPU."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed + T)
    q, k, v = (torch.randn(1, HEADS, T, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    gate = -0.05 * torch.rand(1, HEADS, T, device="cuda", generator=gen) if gated else None
    return {"q": q, "k": k, "v": v, "gate": gate}


def forward_call(x: dict, plan, segments: int | None = None):
    """``triton_forward`` as a ``triton_op`` body runs it eagerly (kernels launched directly): a closure."""
    from torch._library.triton import set_wrap_triton_enabled

    from retention_compile.codegen.forward import triton_forward

    d = x["q"].shape[-1]

    def run():
        with set_wrap_triton_enabled(False):
            return triton_forward(
                x["q"], x["k"], x["v"], scale=d**-0.5, deg=2, log_gate=x["gate"], causal=True, valid=None,
                plan=plan, segments=segments,
            )  # fmt: skip

    return run


def set_constants(constants: dict) -> dict:
    """Set ``codegen.forward`` constants; returns the previous values."""
    from retention_compile.codegen import forward

    previous = {name: getattr(forward, name) for name in constants}
    for name, value in constants.items():
        setattr(forward, name, value)
    return previous


def _run_tasks(tasks: list[dict]) -> list[str | None]:
    import torch

    from retention_compile.planning import Plan

    errors: list[str | None] = []
    for task in tasks:
        previous = set_constants(task.get("constants") or {})
        try:
            x = inputs(task["T"], task["d"], task["gated"])
            forward_call(x, Plan(**task["plan"]), task.get("segments"))()
            torch.cuda.synchronize()
            errors.append(None)
        except Exception as exc:  # reported to the timing process, which records it
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            set_constants(previous)
    return errors


def warm(tasks: list[dict], jobs: int = 8) -> list[str | None]:
    """Run ``tasks`` once each, spread over ``jobs`` worker processes; per task None or the error text."""
    if not tasks:
        return []
    jobs = max(1, min(jobs, len(tasks)))
    shares = [list(range(i, len(tasks), jobs)) for i in range(jobs)]
    folder = Path(tempfile.mkdtemp(prefix="warm_"))
    procs = []
    for n, share in enumerate(shares):
        path = folder / f"tasks_{n}.json"
        path.write_text(json.dumps([tasks[i] for i in share]))
        procs.append(subprocess.Popen([sys.executable, __file__, str(path)], stdout=subprocess.PIPE, text=True))
    errors: list[str | None] = [None] * len(tasks)
    for share, proc in zip(shares, procs):
        out, _ = proc.communicate()
        lines = out.strip().splitlines()
        results = json.loads(lines[-1]) if lines else [f"worker exited with {proc.returncode}"] * len(share)
        for i, err in zip(share, results):
            errors[i] = err
    return errors


if __name__ == "__main__":
    print(json.dumps(_run_tasks(json.loads(Path(sys.argv[1]).read_text()))))
