"""The CUDA (wgmma) reverse-state kernel of the backward against the Triton one, on the same arguments.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), gated and ungated, the op's own plan. The
arguments are those ``triton_backward`` passes to ``_reverse_states`` (captured from one call with the CUDA state
kernel). Timed: ``_reverse_states`` as a whole (the reverse-state kernel and the reverse scan), with the Triton
kernel and with the CUDA one in each launch shape of ``VARIANTS``; ``LAUNCHES`` back-to-back calls between two
CUDA events, median over ``ROUNDS`` rounds. Agreement: ||R_cuda - R_triton|| / ||R_triton|| (and P), after the scan.

    python benchmarks/bench_cuda_reverse.py [--T 65536] [--out DIR] [--commit SHA]

Writes ``cuda_reverse_<gpu>_<date>_<commit>.json`` (the commit shortened to 7 characters) under ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_forward import B, D, H, result_header

from retention_compile.codegen import backward, cuda_state
from retention_compile.codegen.choice import median_ms
from retention_compile.codegen.cuda_state import StateKernelConfig, chunk_states
from retention_compile.codegen.forward import triton_forward
from retention_compile.ops import resolve_plan

LAUNCHES, ROUNDS = 5, 5
VARIANTS = (  # registers capped for 2 programs per SM with 1 or 2 slices in flight; for 1 program with 4
    StateKernelConfig(wgmma=True, wgmma_min_blocks=2, wgmma_reverse_in_flight=1),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=2, wgmma_reverse_in_flight=2),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=1, wgmma_reverse_in_flight=4),
)


def _captured(T: int, gated: bool) -> tuple:
    """``_reverse_states``' positional arguments and its CUDA hook, from one backward call."""
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gate = -0.02 * torch.rand(B, H, T, device="cuda") if gated else None
    plan = resolve_plan(q, k, v, 2, gated, 0)
    options = {"scale": D**-0.5, "deg": 2, "log_gate": gate, "causal": True, "valid": None, "plan": plan}
    y, den = triton_forward(q, k, v, **options, state_kernel=chunk_states)
    seen: dict = {}
    original = backward._reverse_states

    def capture(*args, reverse_kernel=None):
        seen.update(args=args, hook=reverse_kernel)
        return original(*args, reverse_kernel=reverse_kernel)

    backward._reverse_states = capture
    try:
        backward.triton_backward(torch.randn_like(v), q, k, v, y, den, **options, state_kernel=chunk_states)
    finally:
        backward._reverse_states = original
    if seen["hook"] is None:
        raise RuntimeError("the backward did not take the CUDA reverse-state kernel (not sm_90a?)")
    return seen["args"], seen["hook"]


def run_case(T: int, gated: bool) -> dict:
    args, hook = _captured(T, gated)

    def call(reverse_kernel):
        return lambda: backward._reverse_states(*args, reverse_kernel=reverse_kernel)

    triton_out = call(None)()
    out: dict = {"T": T, "gated": gated, "ms": {"triton": median_ms(call(None), ROUNDS, LAUNCHES)}, "rel_diff": {}}
    default = cuda_state.CONFIG
    try:
        for config in VARIANTS:
            cuda_state.CONFIG = config
            name = f"cuda(min_blocks={config.wgmma_min_blocks}, in_flight={config.wgmma_reverse_in_flight})"
            try:
                got = call(hook)()
                out["rel_diff"][name] = {
                    n: ((got[n].double() - triton_out[n].double()).norm() / triton_out[n].double().norm()).item()
                    for n in ("R_ST", "P_ST")
                }
                out["ms"][name] = median_ms(call(hook), ROUNDS, LAUNCHES)
            except Exception as error:  # a launch shape that does not fit is recorded, not fatal
                out["ms"][name] = f"failed: {error}"[:300]
    finally:
        cuda_state.CONFIG = default
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    base, result = result_header("cuda_reverse", Path(args.out), args.commit)
    result["cases"] = []
    for gated in (False, True):
        case = run_case(args.T, gated)
        result["cases"].append(case)
        print(f"T={args.T} gated={gated}: ms {case['ms']}  agreement {case['rel_diff']}", flush=True)
    path = base.with_name(f"{base.name}_{str(result['commit'])[:7]}.json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
