"""The backward's CUDA (wgmma) kernels against the Triton ones they replace, on the same arguments.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), gated and ungated, the op's own plan. Stages
(``--stages``, default both):

    reverse     ``_reverse_states`` as a whole (reverse-state kernel and reverse scan): Triton's kernel, and the
                CUDA one in each launch shape of ``REVERSE_VARIANTS``. Agreement: ||R_cuda - R_triton|| /
                ||R_triton|| (and P), after the scan.
    dkv_state   ``_dkv_state_terms`` (the inter-chunk terms of dk and dv): Triton's ``dkv_state_kernel`` and the
                CUDA dv and dk kernels. Agreement: of the increments each adds to DK, DV (and KTERM, gated).
    dq_state    the whole ``triton_backward`` with dq's state terms in Triton's ``dq_kernel`` and with them on the
                CUDA kernel after a ``dq_kernel`` without them (``StateKernelConfig.wgmma_dq``). Agreement: of
                the gradients (dq, dk, dv), the one against the other.

The arguments are those ``triton_backward`` passes (captured from one call with the CUDA state kernel). Timed:
``LAUNCHES`` back-to-back calls between two CUDA events, median over ``ROUNDS`` rounds.

    python benchmarks/bench_cuda_backward.py [--T 65536] [--stages reverse dkv_state dq_state] [--out DIR]
                                             [--commit SHA]

Writes ``cuda_<stage>_<gpu>_<date>_<commit>.json`` (the commit shortened to 7 characters) under ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from bench_forward import B, D, H, result_header

from retention_compile.codegen import backward, cuda_state
from retention_compile.codegen.choice import median_ms
from retention_compile.codegen.cuda_state import StateKernelConfig, chunk_states
from retention_compile.codegen.forward import triton_forward
from retention_compile.ops import resolve_plan

LAUNCHES, ROUNDS = 5, 5
REVERSE_VARIANTS = (  # registers capped for 2 programs per SM with 1 or 2 slices in flight; for 1 program with 4
    StateKernelConfig(wgmma=True, wgmma_min_blocks=2, wgmma_reverse_in_flight=1),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=2, wgmma_reverse_in_flight=2),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=1, wgmma_reverse_in_flight=4),
)
STAGES = {"reverse": ("_reverse_states", "reverse_kernel"), "dkv_state": ("_dkv_state_terms", "state_terms")}


def forward_with_cuda_states(
    T: int, gated: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Random bf16 q, k, v of the benchmarked shape (a random gate where ``gated``), the options of the op's own plan,
    and ``triton_forward``'s y, denom with the CUDA state kernel: what the backward benchmarks start from."""
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gate = -0.02 * torch.rand(B, H, T, device="cuda") if gated else None
    plan = resolve_plan(q, k, v, 2, gated, 0)
    options = {"scale": D**-0.5, "deg": 2, "log_gate": gate, "causal": True, "valid": None, "plan": plan}
    y, den = triton_forward(q, k, v, **options, state_kernel=chunk_states, for_backward=True)
    return q, k, v, options, y, den


def _captured(T: int, gated: bool, stage: str) -> tuple[tuple, Callable]:
    """The positional arguments of the stage's function in ``backward`` and its CUDA hook, from one backward call."""
    function, hook_name = STAGES[stage]
    q, k, v, options, y, den = forward_with_cuda_states(T, gated)
    seen: dict = {}
    original = getattr(backward, function)

    def capture(*args, **hook):
        seen.update(args=args, hook=hook[hook_name])
        return original(*args, **hook)

    setattr(backward, function, capture)
    try:
        backward.triton_backward(torch.randn_like(v), q, k, v, y, den, **options, state_kernel=chunk_states)
    finally:
        setattr(backward, function, original)
    if seen["hook"] is None:
        raise RuntimeError(f"the backward did not take the CUDA kernel of stage {stage} (not sm_90a?)")
    return seen["args"], seen["hook"]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def reverse_case(T: int, gated: bool) -> dict:
    args, hook = _captured(T, gated, "reverse")

    def call(reverse_kernel):
        return lambda: backward._reverse_states(*args, reverse_kernel=reverse_kernel)

    triton_out = call(None)()
    out: dict = {"T": T, "gated": gated, "ms": {"triton": median_ms(call(None), ROUNDS, LAUNCHES)}, "rel_diff": {}}
    default = cuda_state.CONFIG
    try:
        for config in REVERSE_VARIANTS:
            cuda_state.CONFIG = config
            name = f"cuda(min_blocks={config.wgmma_min_blocks}, in_flight={config.wgmma_reverse_in_flight})"
            try:
                got = call(hook)()
                out["rel_diff"][name] = {n: _rel(got[n], triton_out[n]) for n in ("R_ST", "P_ST")}
                out["ms"][name] = median_ms(call(hook), ROUNDS, LAUNCHES)
            except Exception as error:  # a launch shape that does not fit is recorded, not fatal
                out["ms"][name] = f"failed: {error}"[:300]
    finally:
        cuda_state.CONFIG = default
    return out


def dkv_state_case(T: int, gated: bool) -> dict:
    (module, fwd, grid, args), hook = _captured(T, gated, "dkv_state")
    names = [n for n in ("DK", "DV", "KTERM") if n in args]
    start = {n: args[n].clone() for n in names}
    added = {}
    for name, state_terms in (("triton", None), ("cuda", hook)):
        for n in names:
            args[n].copy_(start[n])
        backward._dkv_state_terms(module, fwd, grid, args, state_terms=state_terms)
        added[name] = {n: args[n] - start[n] for n in names}
    out: dict = {"T": T, "gated": gated, "ms": {}}
    out["rel_diff"] = {"cuda": {n: _rel(added["cuda"][n], added["triton"][n]) for n in names}}
    for name, state_terms in (("triton", None), ("cuda", hook)):  # the buffers grow with every call: timing only
        call = lambda s=state_terms: backward._dkv_state_terms(module, fwd, grid, args, state_terms=s)  # noqa: E731
        out["ms"][name] = median_ms(call, ROUNDS, LAUNCHES)
    return out


def dq_state_case(T: int, gated: bool) -> dict:
    """The whole ``triton_backward`` with dq's state terms in Triton's dq_kernel and on the CUDA kernel
    (``cuda_state.CONFIG.wgmma_dq`` off and on), timed, and the gradients of the one against the other."""
    labels = ("triton dq_kernel", "cuda dq state")
    q, k, v, options, y, den = forward_with_cuda_states(T, gated)
    grad_y = torch.randn_like(v)
    default = cuda_state.CONFIG
    out: dict = {"T": T, "gated": gated, "ms": {}}
    grads = {}
    try:
        for name, on in zip(labels, (False, True)):
            cuda_state.CONFIG = dataclasses.replace(default, wgmma_dq=on)

            def step():
                return backward.triton_backward(grad_y, q, k, v, y, den, **options, state_kernel=chunk_states)

            grads[name] = step()
            out["ms"][name] = median_ms(step, ROUNDS, LAUNCHES)
    finally:
        cuda_state.CONFIG = default
    (a, b) = grads.values()
    out["rel_diff"] = {f"{labels[1]} vs {labels[0]}": {g: _rel(x, y) for g, x, y in zip("qkv", b[:3], a[:3])}}
    return out


CASES = {"reverse": reverse_case, "dkv_state": dkv_state_case, "dq_state": dq_state_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--stages", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    for stage in args.stages:
        base, result = result_header(f"cuda_{stage}", Path(args.out), args.commit)
        result["cases"] = []
        for gated in (False, True):
            case = CASES[stage](args.T, gated)
            result["cases"].append(case)
            print(f"{stage} T={args.T} gated={gated}: ms {case['ms']}  agreement {case['rel_diff']}", flush=True)
        path = base.with_name(f"{base.name}_{str(result['commit'])[:7]}.json")
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
