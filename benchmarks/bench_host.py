"""Host time of one ``triton_forward`` call, measured on the CPU: the Python work around the kernels.

At short context the eager forward is host-bound on the H200 (T=2048: 0.088 ms eager against 0.031 ms replayed from
a CUDA graph at 448e8ac), so the time the launcher spends before its launches is part of what a user waits for.
Here the launches are captured instead of run (``forward._launch`` replaced, as ``tests/test_kernel_resources.py``
does), the shared-memory fitting is skipped (it needs a GPU and is cached per shape there), and the inputs are CPU
tensors: what remains is the shape-class lookup, the planning of buffers and arguments, and the allocations.
Triton's own launcher (per kernel, on the GPU) is not included. At long T the CPU allocations of the big buffers
(torch.empty) take a large and variable share that a GPU's caching allocator does not: repeated processes at one
commit read 91-150 us at T=65536, so compare the Python work there with a profiler (cProfile), not this number.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, y stored in bf16 (a forward no backward follows), the H200's plan;
T in ``--T``, ungated and gated. Median of ``--repeats`` batches of ``--calls`` calls.

    python benchmarks/bench_host.py [--T 2048 65536] [--calls 500] [--repeats 7] [--out DIR] [--commit SHA]

Writes ``host_<cpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from provenance import command_line, git_commit

from retention_compile import hardware, planning
from retention_compile.codegen import forward

B, H, D = 1, 8, 64
LAUNCHES: list[object] = []  # the kernels ``forward._launch`` was asked to launch (captured, not run)


def per_call_us(T: int, gated: bool, calls: int, repeats: int) -> tuple[float, int]:
    """Median microseconds per ``triton_forward`` call and the kernel launches of one call."""
    plan = planning.plan(hardware.KNOWN["H200"], T=T, d=D, e=D, deg=2, dtype=torch.bfloat16, gated=gated, batch_heads=H)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16) for _ in range(3))
    gate = -torch.rand(B, H, T) if gated else None
    options = dict(scale=D**-0.5, deg=2, log_gate=gate, causal=True, valid=None, plan=plan, y_dtype=torch.bfloat16)
    forward.triton_forward(q, k, v, **options)  # warm-up: renders and imports the module
    LAUNCHES.clear()
    forward.triton_forward(q, k, v, **options)
    per_call = len(LAUNCHES)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            forward.triton_forward(q, k, v, **options)
        times.append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(times), per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 65536])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    forward._launch = lambda kernel, *rest, **options: LAUNCHES.append(kernel)
    forward.device_shared_memory_limit = lambda device: None
    rows = []
    for T in args.T:
        for gated in (False, True):
            us, per_call = per_call_us(T, gated, args.calls, args.repeats)
            rows.append({"T": T, "gated": gated, "host_us_per_call": us, "launches_per_call": per_call})
            print(f"T={T:6d} gated={gated!s:5}: {us:6.1f} us per call ({per_call} launches)", flush=True)
    result = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = (platform.machine() or "cpu").replace(" ", "-")
    path = out / f"host_{cpu}_{result['date']}_{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
