"""Where the forward's time goes at long context: the query kernel's launch shapes, and one call for ncu.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), ungated (``--gated`` for a random gate), chunk 1024,
the state kernel ``codegen="auto"`` picks.

    timing     for each ``--variants`` entry ROWS/WARPS/STAGES[/REGISTERS[/KEYS[/SPLIT]]] the chunked query kernel runs
               with that many query rows per program, warps and copy stages, registers capped per thread (Triton's
               ``maxnreg``, so that two programs fit on an SM; 0: uncapped), keys per intra-chunk step (default
               64) and parts per pair of the state product (``KernelSpec.query_split``, default 1), as
               ``forward.NARROW_QUERY_LAUNCH`` (the launch of eager and compiled calls at this shape): the whole
               forward (``bench_forward.ours``: y stored in bf16 alone, median of ``do_bench``) and the query
               kernel alone (profiler, mean of 20 calls). Each program reads its chunk's whole state, Dt x e bf16
               (327 KB at d = e = 64), so 64-row programs read twice the bytes of 128-row ones
               (``state_read_bytes``).
    --single-call  one forward (no_grad), nothing else: the process to run under ncu, e.g.

        ncu --clock-control none --csv --page details -k regex:"attention_kernel|retention_chunk_state|scan_kernel" \\
            --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
            --section WarpStateStats --section ComputeWorkloadAnalysis \\
            python3 benchmarks/profile_forward.py --single-call > OUT/ncu_forward.csv

    python benchmarks/profile_forward.py [--T 65536] [--gated] [--variants 128/8/3 64/4/2/128 ...] [--den-dot off on]
        [--out DIR] [--commit SHA]

``--den-dot off on`` times each variant with the attention loops' denominator summed both ways
(``forward.DENOMINATOR_BY_DOT``), named ``<variant> den_dot=<setting>``.

Writes ``profile_forward_<gpu>_<date>_<commit>_T<T>_<gated|ungated>.json`` under ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch
from bench_forward import B, D, H, bench_ms, inputs, kernel_times, ours
from provenance import command_line, git_commit

import retention_compile as rc
from retention_compile.codegen import forward
from retention_compile.ops import resolve_plan

CHUNK = 1024
# rows / warps / copy stages / registers per thread (0: uncapped) / keys per intra-chunk step / parts per pair: the
# eager launch until session 53 (128 rows, 8 warps, capped), 128 rows on one warpgroup (two m64 tiles sharing each k16
# slice's B descriptor, fence and commit) with 3 stages (forward.NARROW_QUERY_LAUNCH since session 53, eager and
# compiled; the traced launch from 2026-12-03) and with 2, 64 rows on 4 warps (the traced launch before), and the
# shape before 868912f. Local sm_90a compiles (Triton 3.6) of the bf16 d=64 kernel:
# 128/8/3 in halves 150 registers and 76 KB (capped at 128: two per SM; in the cherry layout, gated, a 24-byte stack);
# 128/4/3 in halves uncapped, cherry layout, 252 registers ungated and 255 gated with no stack, 76 KB (two per SM, 8
# warps), a third fewer warp-instructions per state step and a quarter fewer per key block than 128/8/3
# (forward_notes, session 50); 64/4/3 in halves 148 and 64 KB (three per SM); 128/8/2 capped at 128 spills 72 bytes,
# 88 KB (two per SM).
DEFAULT_VARIANTS = ("128/8/3/128/64/2", "128/4/3/0/64/2", "128/4/2/0/64/2", "64/4/3/0/64/2", "128/8/2/128")


def state_read_bytes(T: int, block_t: int) -> int:
    """Bytes of chunk state the query kernel's programs read in all (each its chunk's whole S, bf16)."""
    tiled_features = 2560  # 10 pair tiles of 16 x 16 features for d = 64
    return -(-T // block_t) * B * H * tiled_features * D * 2


def parse_variant(text: str) -> tuple[int, int, int, int, int, int]:
    """``ROWS/WARPS/STAGES[/REGISTERS[/KEYS[/SPLIT]]]`` -> (rows, warps, stages, registers (0: uncapped), keys per
    step, parts per pair)."""
    fields = [int(f) for f in text.split("/")]
    if not 3 <= len(fields) <= 6:
        raise SystemExit(f"variant {text!r}: expected ROWS/WARPS/STAGES[/REGISTERS[/KEYS[/SPLIT]]]")
    return tuple(fields + [0, forward.QUADRATIC_BLOCK_K, 1][len(fields) - 3 :])  # type: ignore[return-value]


def timing(T: int, gated: bool, variants: list[str], den_dot: list[bool]) -> dict:
    x = inputs(T, gated)
    planned = resolve_plan(x["q"], x["k"], x["v"], 2, gated, CHUNK)
    out: dict = {"T": T, "gated": gated, "plan": dataclasses.asdict(planned), "variants": {}}
    defaults = (forward.NARROW_QUERY_LAUNCH, forward.QUADRATIC_BLOCK_K, forward.DENOMINATOR_BY_DOT)
    named_by_dot = den_dot != [forward.DENOMINATOR_BY_DOT]  # a setting other than the package's is named in the row
    try:
        for text, by_dot in ((t, d) for t in variants for d in den_dot):
            rows, warps, stages, registers, keys, split = parse_variant(text)
            forward.NARROW_QUERY_LAUNCH = forward.QueryLaunch(rows, warps, stages, split, registers or None)
            forward.QUADRATIC_BLOCK_K = keys
            forward.DENOMINATOR_BY_DOT = by_dot
            if named_by_dot:
                text = f"{text} den_dot={by_dot}"
            plan = dataclasses.replace(planned, block_t=rows, num_stages=stages)
            run = ours(x, plan)
            try:
                entry = {"forward_ms": bench_ms(run), "query_kernel_ms": kernel_times(run, 20).get("attention_kernel")}
            except Exception as exc:  # a variant that cannot launch (shared memory, registers) is reported
                torch.cuda.synchronize()
                entry = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            entry["state_read_bytes"] = state_read_bytes(T, rows)
            out["variants"][text] = entry
            print(f"T={T} gated={gated} {text}: {entry}", flush=True)
    finally:
        forward.NARROW_QUERY_LAUNCH, forward.QUADRATIC_BLOCK_K, forward.DENOMINATOR_BY_DOT = defaults
    return out


def single_call(T: int, gated: bool) -> None:
    x = inputs(T, gated)
    with torch.no_grad():
        rc.power_retention(x["q"], x["k"], x["v"], log_gate=x["gate"], chunk_size=CHUNK, impl="cuda")
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--single-call", action="store_true", help="one forward for ncu, nothing recorded")
    parser.add_argument(
        "--den-dot", nargs="+", choices=("off", "on"), default=["on" if forward.DENOMINATOR_BY_DOT else "off"],
        help="forward.DENOMINATOR_BY_DOT per variant: off, on, or both (each variant timed with each; default: the "
        "package's setting, so --single-call profiles the kernels the package runs)",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_forward.py needs a CUDA GPU")
    if args.single_call:
        if len(args.den_dot) > 1:
            raise SystemExit("--single-call takes one --den-dot setting")
        forward.DENOMINATOR_BY_DOT = args.den_dot == ["on"]
        single_call(args.T, args.gated)
        return
    name = torch.cuda.get_device_name()
    result = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "gpu": name},
        "shape": {"B": B, "H": H, "d": D, "deg": 2, "dtype": "bfloat16", "causal": True},
        "timing": timing(args.T, args.gated, args.variants, [setting == "on" for setting in args.den_dot]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = f"T{args.T}_{'gated' if args.gated else 'ungated'}"  # runs of one commit at other shapes keep their files
    path = out / f"profile_forward_{name.replace(' ', '-')}_{result['date']}_{result['commit']}_{shape}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
