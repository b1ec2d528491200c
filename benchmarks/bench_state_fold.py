"""The wgmma state kernel with the segments folded in (``StateKernelConfig.wgmma_fold``) against the state kernel
and the Triton scan after it, alternated in one process.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, the op's plan, the CUDA state kernel; T in {16384, 65536, 131072},
ungated and gated. Per (T, gated), ``ROUNDS`` rounds of both settings in turn, each: the whole eager forward
(``bench_forward.bench_ms``: ``do_bench`` median) and the device time per kernel (profiler, mean of 20 calls). The
rounds' spread is the run's noise (under the H200's power cap a whole round moves by a few percent). Also per (T,
gated): ``y_rel``, ||y_fold - y_scan|| / ||y_scan|| (both round the states to bf16 at the same points, so this is
rounding noise, not a bias: the oracle tests are tests/gpu/test_cuda_state.py).

    python benchmarks/bench_state_fold.py [--lengths 16384 65536 131072] [--rounds 3] [--out DIR] [--commit SHA]

Writes ``state_fold_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from bench_forward import bench_ms, inputs, kernel_times, ours, result_header

from retention_compile.codegen import cuda_state
from retention_compile.ops import resolve_plan

ROUNDS = 3


def with_fold(fold: bool) -> None:
    """Set the wgmma state kernel's fold (``launch_tunables`` holds ``CONFIG``: a kept call of the other setting is
    not replayed)."""
    cuda_state.CONFIG = dataclasses.replace(cuda_state.CONFIG, wgmma_fold=fold)


def measure(T: int, gated: bool, rounds: int) -> dict:
    x = inputs(T, gated)
    plan = resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0)
    row: dict = {"T": T, "gated": gated, "rounds": []}
    outputs = {}
    for _ in range(rounds):
        entry = {}
        for fold in (False, True):
            with_fold(fold)
            run = ours(x, plan, codegen="cuda")
            outputs[fold] = run()[0].float()
            entry["fold" if fold else "scan"] = {"forward_ms": bench_ms(run), "kernel_ms": kernel_times(run, 20)}
        row["rounds"].append(entry)
        print(json.dumps({"T": T, "gated": gated, **{k: v["forward_ms"] for k, v in entry.items()}}), flush=True)
    row["y_rel"] = ((outputs[True] - outputs[False]).norm() / outputs[False].norm()).item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    base, record = result_header("state_fold", args.out, args.commit)
    base = base.with_name(f"{base.name}_{record['commit']}")
    record["rows"] = []
    default = cuda_state.CONFIG
    try:
        for gated in (False, True):
            for T in args.lengths:
                record["rows"].append(measure(T, gated, args.rounds))
                base.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
                torch.cuda.empty_cache()
    finally:
        cuda_state.CONFIG = default
    print(f"wrote {base.with_suffix('.json')}")


if __name__ == "__main__":
    main()
