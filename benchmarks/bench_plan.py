"""The planner's choice against the alternatives it weighed, measured: is the planned path and tile set the fastest?

For b=1, h=8, d=e=64 (``--d``), deg 2, bf16, causal, at each ``--T``, ungated and gated: the forward
(``triton_forward`` eager with ``wrap_triton`` disabled, as the op's body runs it; the state kernel ``codegen="auto"``
picks; y in bf16) with the plan ``planning.plan`` makes, with the single-chunk kernel on each tile set of
``QUADRATIC_TILES`` (rows / warps / copy stages), and chunked with ``--chunks``; the modelled time beside each where
the planner has one. Medians of
``triton.testing.do_bench`` in ms. Short calls include their host time (the eager path repeats its launches,
``forward.ForwardReplay``): at T=2048 they are noise, the planned row read up to 1.9x the same tiles' single-chunk
row in one run (H200, 627d6b3 and ace6222, with or without an untimed call first); ``bench_forward.py``'s CUDA-graph
column times the device alone.

    python benchmarks/bench_plan.py [--T 2048 4096 6144 8192] [--chunks 1024] [--d 64] [--out DIR] [--commit SHA]

Writes ``plan_<gpu>_<date>_<commit>.json`` (``..._d<d>.json`` for another head dim) under ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from provenance import command_line, git_commit
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench

from retention_compile import hardware, planning
from retention_compile.codegen.cuda_state import select_state_kernel
from retention_compile.codegen.forward import triton_forward
from retention_compile.planning import Plan

B, H = 1, 8
QUADRATIC_TILES = ((128, 8, 3), (128, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3))


def forward_ms(q, k, v, gate, plan: Plan) -> float:
    """do_bench median of one eager forward with ``plan``."""
    scale = q.shape[-1] ** -0.5
    hook = select_state_kernel(q, k, v, 2, gate, None, True, scale, plan, "auto").kernel
    options = dict(scale=scale, deg=2, log_gate=gate, causal=True, valid=None, plan=plan, state_kernel=hook)

    def call() -> None:
        with set_wrap_triton_enabled(False):
            triton_forward(q, k, v, **options, y_dtype=torch.bfloat16)

    return do_bench(call, warmup=25, rep=80)


def variants(spec: hardware.GpuSpec, T: int, d: int, gated: bool, chunks: list[int]) -> dict[str, Plan]:
    """The planned configuration and the alternatives, by name."""
    problem = dict(T=T, d=d, e=d, deg=2, dtype=torch.bfloat16, gated=gated, batch_heads=B * H)
    chosen = {"planned": planning.plan(spec, **problem)}
    cands = planning.gpu_candidates(spec, T, d, d, 2, torch.bfloat16, gated, B * H)
    for rows, warps, stages in QUADRATIC_TILES:
        # the model's time for the tiles where it considers them (not past MAX_ROWS_PER_WARP)
        on_tile = cands.single & (cands.block_t == rows) & (cands.num_warps == warps) & (cands.num_stages == stages)
        times = cands.time[on_tile & (cands.block_e == d)]
        chosen[f"single-chunk {rows}/{warps}/{stages}"] = Plan(
            chunk_size=1 << 20, block_t=rows, block_e=d, num_warps=warps, num_stages=stages,
            modelled_s=float(times.min()) if times.size else 0.0,
        )  # fmt: skip
    for chunk in chunks:
        chosen[f"chunk {chunk}"] = planning.plan(spec, **problem, chunk_size=chunk)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 6144, 8192])
    parser.add_argument("--chunks", type=int, nargs="*", default=[1024])
    parser.add_argument(
        "--d", type=int, default=64, help="head dim d = e (the planner's single-chunk tile was measured at 64)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    spec = hardware.detect()
    rows: dict[str, dict] = {}
    for T in args.T:
        for gated in (False, True):
            q, k, v = (torch.randn(B, H, T, args.d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
            gate = -0.05 * torch.rand(B, H, T, device="cuda") if gated else None
            row: dict[str, object] = {}
            for name, plan in variants(spec, T, args.d, gated, args.chunks).items():
                tiles = f"{plan.chunk_size}/{plan.block_t}/{plan.num_warps}/{plan.num_stages}"
                modelled = round(plan.modelled_s * 1e3, 4) if plan.modelled_s else None
                row[name] = {"ms": round(forward_ms(q, k, v, gate, plan), 4), "modelled_ms": modelled, "tiles": tiles}
            rows[f"T={T} gated={gated}" + (f" d={args.d}" if args.d != 64 else "")] = row
            print(T, "gated" if gated else "ungated", {n: r["ms"] for n, r in row.items()}, flush=True)
    commit, gpu = git_commit(args.commit), torch.cuda.get_device_name()
    record = {"gpu": gpu, "command": command_line(), "commit": commit, "date": str(datetime.date.today()), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    shape = f"_d{args.d}" if args.d != 64 else ""
    path = args.out / f"plan_{gpu.replace(' ', '-')}_{record['date']}_{commit[:7]}{shape}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
