"""Forward + backward time of power retention (issue 6) against SDPA (flash) and Manifest's ``retention``:
b=1, h=8, d=64, deg=2, bf16, causal, ungated and gated (random per-token per-head gate).

    python benchmarks/bench_backward.py [--out DIR] [--T 2048 8192 32768 65536] [--competitors T ...]
                                        [--compiled T ...]
                                        [--profile T ...] [--chunks C ...]

"ours" is ``rc.power_retention`` run eagerly with autograd (the op's forward and backward bodies launch the
Triton kernels directly; chunk and tiles from ``planning.plan``): one timed call is forward, then
``y.backward(dy)``. "ours_compiled" (at the ``--compiled`` lengths, default 2048 and 8192: each costs a
compile) is the same under ``torch.compile`` (the kernels launched from Inductor's
generated code, as in a compiled model: at short T the eager op's host time dominates, 2026-11-29). SDPA and
Manifest are timed eagerly like "ours" (Manifest only when importable: carry its wheels,
../shared/tools/gpu-wheels.sh). Times are medians of ``triton.testing.do_bench`` (warmup 25 ms, rep 100 ms), a row's
columns timed in turns (``bench_forward.timed_columns``: 3 rounds in rotated order, each column the median of its
rounds, ``rounds_ms``); gradients are reset to None between calls. ``--gate-variants`` also times gated ours with
the backward's gate factoring switched (``GATE_VARIANTS``: every factoring off, one exp per weight,
``ours_per_weight``; dq_kernel's factored, ``ours_factored_dq``), each with its profile (``breakdown_<variant>``),
in the same process as ``ours`` with the switches as the package has them.
``--chunks`` also times ours (fwd+bwd and forward only) with each chunk size forced (``chunk_size=C``, rows
``ours_chunkC`` and ``ours_forward_only_chunkC``), to check the planner's choice. At the largest T (or each
``--profile`` T) a profiler breakdown per kernel of ours is recorded. Run it alone on the GPU: the two runs of
2026-11-29 that followed a pytest killed by ``timeout`` (its xdist workers may have lived on) gave SDPA fwd+bwd
0.40-0.45 ms at T=2048 against the anchor's 0.125.

Writes ``backward_<gpu>_<date>.json`` (after every row) and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from bench_forward import (
    SDPA_BACKENDS,
    kernel_times,
    record_rows,
    result_header,
    sdpa_backend,
    timed,
    timed_columns,
)

import retention_compile as rc
from retention_compile.codegen import backward

B, H, D = 1, 8, 64
LENGTHS = (2048, 8192, 32768, 65536)


def inputs(T: int, gated: bool) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(T)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    x = {name: randn(B, H, T, D).requires_grad_() for name in "qkv"}
    x["dy"] = randn(B, H, T, D)
    x["gate"] = (-0.05 * torch.rand(B, H, T, device="cuda", generator=gen)).requires_grad_() if gated else None
    return x


def _step(forward: Callable[[], torch.Tensor], dy: torch.Tensor, leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(dy)

    return run


def ours(x: dict, chunk: int | None = None, impl: str = "auto") -> Callable[[], None]:
    leaves = [x["q"], x["k"], x["v"]] + ([x["gate"]] if x["gate"] is not None else [])
    return _step(
        lambda: rc.power_retention(x["q"], x["k"], x["v"], log_gate=x["gate"], chunk_size=chunk, impl=impl),
        x["dy"],
        leaves,
    )


# gated variants of ours: the ``backward`` module switches each sets for its calls
GATE_VARIANTS = {
    "per_weight": {"FACTORED_GATE_ROWS": False, "FACTORED_DQ_GATE": False},
    "factored_dq": {"FACTORED_DQ_GATE": True},
}


def ours_switched(x: dict, switches: dict[str, bool]) -> Callable[[], None]:
    """``ours`` with the ``backward`` module's ``switches`` set for each call (restored after it)."""
    run = ours(x)

    def switched() -> None:
        with mock.patch.multiple(backward, **switches):
            run()

    return switched


def ours_compiled(x: dict) -> Callable[[], None]:
    """``rc.power_retention`` under ``torch.compile`` (Inductor, one graph per T): Inductor's generated forward and
    backward launch the op's Triton kernels themselves, without the op's eager Python, as in a model compiled with
    ``backend="retention"``. The first call (compiling) happens here, outside the timing."""
    leaves = [x["q"], x["k"], x["v"]] + ([x["gate"]] if x["gate"] is not None else [])
    compiled = torch.compile(
        lambda q, k, v, gate: rc.power_retention(q, k, v, log_gate=gate), fullgraph=True, dynamic=False
    )
    run = _step(lambda: compiled(x["q"], x["k"], x["v"], x["gate"]), x["dy"], leaves)
    run()
    return run


def forward_only(x: dict, chunk: int | None = None) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return rc.power_retention(x["q"], x["k"], x["v"], log_gate=x["gate"], chunk_size=chunk)

    return run


def sdpa(x: dict, backend: str | None = "FLASH_ATTENTION") -> Callable[[], None]:
    def forward() -> torch.Tensor:
        with sdpa_backend(backend):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)

    return _step(forward, x["dy"], [x["q"], x["k"], x["v"]])


def manifest(x: dict) -> Callable[[], None]:
    """Manifest's ``retention.power_retention`` (deg 2, chunk 1024), layout (b, t, h, d)."""
    from retention import power_retention

    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (x["q"], x["k"], x["v"]))
    gate = None if x["gate"] is None else x["gate"].detach().transpose(1, 2).contiguous().requires_grad_()
    dy = x["dy"].transpose(1, 2).contiguous()
    T = q.shape[1]
    chunk = 1024 if T > 1024 else None
    leaves = [q, k, v] + ([gate] if gate is not None else [])
    return _step(lambda: power_retention(q, k, v, gate, deg=2, scale=D**-0.5, chunk_size=chunk), dy, leaves)


def breakdown(run: Callable[[], None], calls: int = 10) -> dict[str, float]:
    """Device time per kernel (ms per call) from the profiler, names cut to 80 characters, slowest first."""
    times = {name[:80]: round(ms, 4) for name, ms in kernel_times(run, calls).items()}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def measure(
    T: int,
    gated: bool,
    competitors: bool,
    profile: bool,
    compiled: bool,
    chunks: list[int],
    gate_variants: bool = False,
) -> dict:
    x = inputs(T, gated)
    row: dict = {"T": T, "gated": gated, "errors": {}}
    started = time.perf_counter()
    try:  # once outside do_bench: a failure prints its traceback (which kernel, which resource)
        ours(x)()
    except Exception:
        traceback.print_exc()
    print(f"  T={T} gated={gated} first call (kernel compiles): {time.perf_counter() - started:.0f} s", flush=True)
    makers = {"ours": lambda: ours(x)}
    if compiled:
        makers["ours_compiled"] = lambda: ours_compiled(x)
    if not gated:
        makers.update({name: lambda backend=backend: sdpa(x, backend) for name, backend in SDPA_BACKENDS.items()})
    if competitors:
        makers["manifest"] = lambda: manifest(x)
    for variant, switches in GATE_VARIANTS.items() if gate_variants and gated else ():
        makers[f"ours_{variant}"] = lambda switches=switches: ours_switched(x, switches)
    for chunk in chunks:
        makers[f"ours_chunk{chunk}"] = lambda chunk=chunk: ours(x, chunk)
        makers[f"ours_forward_only_chunk{chunk}"] = lambda chunk=chunk: forward_only(x, chunk)
    timed_columns(row, makers, f"T={T} gated={gated} ")
    row["ours_forward_only"] = timed(lambda: forward_only(x))[0]
    if profile:
        row["breakdown"] = breakdown(ours(x))
        for variant, switches in GATE_VARIANTS.items() if gate_variants and gated else ():
            row[f"breakdown_{variant}"] = breakdown(ours_switched(x, switches))
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for gated in (False, True):
        sel = sorted((r for r in rows if r["gated"] == gated), key=lambda r: r["T"])
        for m in ("ours", "ours_compiled", *SDPA_BACKENDS, "manifest"):
            pts = [(r["T"], r[m]) for r in sel if r.get(m)]
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if gated else "-", label=f"{m}{' gated' if gated else ''}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"fwd+bwd, b={B} h={H} d={D} deg 2 bf16 causal")
    ax.set_xlabel("T")
    ax.set_ylabel("ms (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--T", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--competitors", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--compiled", type=int, nargs="*", default=[2048, 8192], help="lengths timed compiled too")
    parser.add_argument("--profile", type=int, nargs="*", default=None, help="lengths to profile (default: max T)")
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="chunk sizes also timed, forced")
    parser.add_argument("--gate-variants", action="store_true", help="gated rows: also time GATE_VARIANTS")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    profiled = set(args.profile if args.profile is not None else [max(args.T)])
    base, record = result_header("backward", args.out, args.commit)
    record["rows"] = []

    def measure_row(T: int, gated: bool) -> dict:
        return measure(
            T, gated, T in args.competitors, T in profiled, T in args.compiled, args.chunks, args.gate_variants
        )

    record_rows(record, base, args.T, measure_row, _line, plot)
    for row in record["rows"]:
        if "breakdown" in row:
            print(f"T={row['T']} gated={row['gated']} kernels (ms): {json.dumps(row['breakdown'])}")
        for variant in GATE_VARIANTS:
            if f"breakdown_{variant}" in row:
                print(f"T={row['T']} gated={row['gated']} {variant} (ms): {json.dumps(row[f'breakdown_{variant}'])}")
    print(f"wrote {base}.json/.png")


def _line(row: dict) -> str:
    cells = [f"T={row['T']:>6}", f"gated={'yes' if row['gated'] else 'no ':3}"]
    variants = [f"ours_{variant}" for variant in GATE_VARIANTS]
    for m in ("ours", *variants, "ours_compiled", "ours_forward_only", *SDPA_BACKENDS, "manifest"):
        value = row.get(m)
        cells.append(f"{m}={value:.3f}" if value is not None else f"{m}=-")
    return "  ".join(cells) + (f"  errors={row['errors']}" if row["errors"] else "")


if __name__ == "__main__":
    main()
