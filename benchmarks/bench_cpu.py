"""The CPU path (the aten forms of ``chunked.py`` and ``quadratic.py``) against SDPA on the CPU, and the planner's
modelled time against the measured one.

Rows, per T (b=1, ``--heads`` heads, d = e = ``--d``, deg 2, float32, causal):
  op eager      ``rc.power_retention`` (the chunk the planner picks), ungated and gated (log-gates in [-0.05, 0])
  op compiled   ``torch.compile(f, backend="retention")`` of ``f = SDPA(q, k, v, is_causal=True)``: the backend's
                rewrite, compiled by Inductor for the CPU (ungated: SDPA has no gate)
  sdpa          ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the CPU
  chunk C       with ``--chunks``: the eager op at a forced chunk size, to check the planner's choice
``--backward`` adds the same rows for forward + backward (the sum of the output times fresh random weights).

Times are medians of ``--repeats`` calls after two warm-up calls, in one process, on ``torch.get_num_threads()``
threads. Large fresh allocations dominate parts of this path on the CPU (glibc maps each buffer above 32 MB anew,
and the kernel zero-fills its pages on first touch), so the process's allocator settings change these numbers; the
JSON records the ``MALLOC_*`` environment.

    python benchmarks/bench_cpu.py [--T 1024 2048 4096 8192 16384] [--heads 4] [--d 64] [--repeats 5]
        [--backward] [--chunks 128 256 512] [--out DIR] [--commit SHA]

Writes ``cpu_<processor>_<date>_<commit>.json`` and a plot (time against T, log-log) of the same name under ``--out``
(default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import git_commit, origin

import retention_compile as rc
from retention_compile import planning


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def with_backward(forward: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """Forward, then the backward of ``(y * w).sum()`` for fixed random ``w``, gradients reset each call."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    weight = torch.randn_like(forward(*inputs))

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        (forward(*leaves) * weight).sum().backward()

    return step


def bench_length(T: int, args: argparse.Namespace, compiled: Callable) -> list[dict]:
    """Every row of the module docstring at one length."""
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, args.heads, T, args.d, generator=gen) for _ in range(3))
    log_gate = -0.05 * torch.rand(1, args.heads, T, generator=gen)
    chosen = planning.plan(None, T, args.d, args.d, 2, torch.float32, False, args.heads)

    def gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return rc.power_retention(q, k, v, log_gate=g)

    cases: list[tuple[str, int, Callable[..., torch.Tensor], list[torch.Tensor]]] = [
        ("op eager", chosen.chunk_size, rc.power_retention, [q, k, v]),
        ("op eager gated", chosen.chunk_size, gated, [q, k, v, log_gate]),
        ("op compiled", chosen.chunk_size, compiled, [q, k, v]),
        ("sdpa", 0, causal_sdpa, [q, k, v]),
    ]
    for chunk in args.chunks:
        if chunk != chosen.chunk_size:
            forced = functools.partial(rc.power_retention, chunk_size=chunk)
            cases.append((f"chunk {chunk}", chunk, forced, [q, k, v]))
    rows = []
    for name, chunk, forward, inputs in cases:
        call = functools.partial(forward, *inputs)
        row = {"T": T, "row": name, "chunk": chunk, "forward_ms": median_ms(call, args.repeats)}
        if args.backward:
            row["forward_backward_ms"] = median_ms(with_backward(forward, inputs), args.repeats)
        if name.startswith("op eager") and name != "op eager gated":
            row["modelled_ms"] = 1e3 * chosen.modelled_s
        rows.append(row)
        shown = "  ".join(f"{key} {value:.1f}" for key, value in row.items() if key.endswith("_ms"))
        print(f"T={T:6d} {name:15} C={chunk:5d}  {shown}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(r["row"] for r in rows):
        points = [(r["T"], r["forward_ms"]) for r in rows if r["row"] == name]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("forward ms (median)")
    ax.set_title(f"CPU, {torch.get_num_threads()} threads, causal, float32")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--chunks", type=int, nargs="*", default=[])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None, help="commit of the code (where the tree has no .git)")
    args = parser.parse_args()

    compiled = torch.compile(causal_sdpa, backend="retention", dynamic=False)
    rows = [row for T in args.T for row in bench_length(T, args, compiled)]
    commit = git_commit(args.commit)
    record = {
        **origin(commit),
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "malloc_environment": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
        "shape": {"batch": 1, "heads": args.heads, "d": args.d, "e": args.d, "deg": 2, "dtype": "float32"},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processor = (platform.processor() or platform.machine()).replace(" ", "-")
    stem = f"cpu_{processor}_{datetime.date.today().isoformat()}_{commit}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
