"""The backward's intra-chunk Triton kernels (``dq_kernel``, ``dkv_kernel``) over tile shapes, warps and stages.

Where the CUDA kernels add the state terms (bf16 on sm_90a), the two Triton kernels do only the causal attention
inside each chunk, so their tiles are no longer held to the state terms' register budget (``backward.MAX_ROWS``).
This times each kernel alone, on the arguments ``triton_backward`` passes it (captured from one call), in each
variant: (program rows or keys, loop step, warps, stages). Agreement: ||out - out_default|| / ||out_default|| of
the float32 buffers the kernel fills (DQ; DK and DV). Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536
(``--T``), the op's own plan; ungated over every variant, gated over the ungated run's best ``--gated-top``.

    python benchmarks/bench_intra_tiles.py [--T 65536] [--gated-top 3] [--out DIR] [--commit SHA]

Writes ``intra_tiles_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
from bench_cuda_backward import forward_with_cuda_states
from bench_forward import result_header

from retention_compile.codegen import backward
from retention_compile.codegen.choice import median_ms
from retention_compile.codegen.cuda_state import chunk_states

LAUNCHES, ROUNDS = 5, 5
# (program rows or keys, loop step), warps, stages
TILES = ((64, 64), (64, 32), (128, 32), (128, 64), (128, 128))
WARPS = (4, 8)
STAGES = (2, 3)
KERNELS = {  # kernel -> (spec field of its program's size, of its loop step, its outputs, its grid's first axis)
    "dq_kernel": ("block_t", "key_step", ("DQ",), lambda a, size: -(-a["Tq"] // size)),
    "dkv_kernel": ("block_k", "row_step", ("DK", "DV"), lambda a, size: -(-(a["Tk"] + a["shift"]) // size)),
}


def _captured(T: int, gated: bool) -> tuple[backward.BackwardSpec, dict[str, dict]]:
    """The backward's spec and each intra-chunk kernel's launch (grid, arguments, warps, stages) from one call."""
    q, k, v, options, y, den = forward_with_cuda_states(T, gated)
    specs: list = []
    launches: dict[str, dict] = {}
    original_load, original_launch = backward.load, backward._launch

    def load(template, spec, *rest, **kw):
        if template == backward.BACKWARD_TEMPLATE:
            specs.append(spec)
        return original_load(template, spec, *rest, **kw)

    def launch(kernel, grid, kwargs, warps, stages):
        name = getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", ""))
        if name in KERNELS:
            launches[name] = {"grid": grid, "args": dict(kwargs), "warps": warps, "stages": stages}
        return original_launch(kernel, grid, kwargs, warps, stages)

    backward.load, backward._launch = load, launch
    try:
        backward.triton_backward(torch.randn_like(v), q, k, v, y, den, **options, state_kernel=chunk_states)
    finally:
        backward.load, backward._launch = original_load, original_launch
    missing = set(KERNELS) - set(launches)
    if missing or not specs:
        raise RuntimeError(f"did not see the launches of {sorted(missing)} (or the backward's spec)")
    return specs[-1], launches


def _run(spec, name: str, launch: dict, variant: tuple) -> tuple[dict[str, torch.Tensor], float]:
    """One variant's outputs (fresh buffers, NaN until written) and median time."""
    (size, step), warps, stages = variant
    size_field, step_field, outputs, first_axis = KERNELS[name]
    variant_spec = dataclasses.replace(spec, **{size_field: size, step_field: step})
    module, _ = backward.load(backward.BACKWARD_TEMPLATE, variant_spec)
    args = {**launch["args"], **{n: torch.full_like(launch["args"][n], float("nan")) for n in outputs}}
    grid = (first_axis(args, size), *launch["grid"][1:])

    def call():
        backward._launch(getattr(module, name), grid, args, warps, stages)

    call()
    return {n: args[n].clone() for n in outputs}, median_ms(call, ROUNDS, LAUNCHES)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def case(T: int, gated: bool, variants: dict[str, list]) -> dict:
    spec, launches = _captured(T, gated)
    out: dict = {"T": T, "gated": gated, "kernels": {}}
    for name, launch in launches.items():
        size_field, step_field, _, _ = KERNELS[name]
        default = ((getattr(spec, size_field), getattr(spec, step_field)), launch["warps"], launch["stages"])
        reference, default_ms = _run(spec, name, launch, default)
        rows = [{"variant": default, "ms": default_ms, "default": True}]
        for variant in variants[name]:
            if variant == default or variant[0][0] > spec.forward.chunk_size:
                continue
            try:
                got, ms = _run(spec, name, launch, variant)
                rows.append({"variant": variant, "ms": ms, "rel_diff": {n: _rel(got[n], reference[n]) for n in got}})
            except Exception as error:  # a variant that does not compile or fit is recorded, not fatal
                rows.append({"variant": variant, "failed": f"{type(error).__name__}: {error}"[:300]})
            print(f"  {name} gated={gated} {rows[-1]}", flush=True)
        out["kernels"][name] = rows
    return out


def _best(rows: list[dict], top: int) -> list:
    """The ``top`` fastest variants whose outputs agree with the default's (within 1e-3)."""
    agreeing = [r for r in rows if "ms" in r and max(r.get("rel_diff", {"": 0.0}).values()) < 1e-3]
    return [r["variant"] for r in sorted(agreeing, key=lambda r: r["ms"])[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--gated-top", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    base, result = result_header("intra_tiles", Path(args.out), args.commit)
    every = list(itertools.product(TILES, WARPS, STAGES))
    ungated = case(args.T, False, {name: every for name in KERNELS})
    best = {name: _best(rows, args.gated_top) for name, rows in ungated["kernels"].items()}
    result["cases"] = [ungated, case(args.T, True, best)]
    for c in result["cases"]:
        for name, rows in c["kernels"].items():
            fastest = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            print(f"gated={c['gated']} {name}: default {rows[0]['ms']:.4f} ms, fastest {fastest}")
    path = base.with_name(f"{base.name}_{str(result['commit'])[:7]}.json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
