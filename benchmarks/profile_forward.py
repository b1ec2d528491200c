"""Where the forward's time goes at long context: the query kernel by row-block size, and one call for ncu.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), ungated (``--gated`` for a random gate), the
CUDA state kernel (``impl="cuda"``: no timing of candidates, so the first call launches only the forward's kernels).

    timing     ``triton_forward`` with the CUDA state kernel for each ``--block-t`` (the op's plan for chunk 1024
               otherwise), y stored in bf16 alone, median of CUDA events. Each program of the query kernel
               reads the whole state of its chunk, Dt x e bf16 (327 KB at d = e = 64), so 64-row programs read
               twice the bytes of 128-row ones (``state_read_bytes``, per variant): the difference of the two
               times estimates what one copy of those reads costs (the rest of the work is the same, though the
               tile shape's efficiency changes with it).
    --single-call  one forward (no_grad), nothing else: the process to run under ncu, e.g.

        ncu --clock-control none --csv --page details -k regex:"attention_kernel|retention_chunk_state|scan_kernel" \\
            --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
            --section WarpStateStats --section ComputeWorkloadAnalysis \\
            python3 benchmarks/profile_forward.py --single-call > OUT/ncu_forward.csv

    python benchmarks/profile_forward.py [--T 65536] [--gated] [--block-t 64 128] [--out DIR] [--commit SHA]

Writes ``profile_forward_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
from pathlib import Path

import torch
from bench_cuda_state import B, D, H, inputs
from provenance import command_line, git_commit

import retention_compile as rc
from retention_compile.codegen import forward
from retention_compile.codegen.choice import median_ms
from retention_compile.codegen.cuda_state import chunk_states
from retention_compile.ops import resolve_plan

CHUNK = 1024
REPS = 15


def state_read_bytes(T: int, block_t: int) -> int:
    """Bytes of chunk state the query kernel's programs read in all (each its chunk's whole S, bf16)."""
    tiled_features = 2560  # 10 pair tiles of 16 x 16 features for d = 64
    return -(-T // block_t) * B * H * tiled_features * D * 2


def timing(T: int, gated: bool, block_ts: list[int]) -> dict:
    q, k, v, gate = inputs(T, gated)
    options = {"scale": D**-0.5, "deg": 2, "log_gate": gate, "causal": True, "valid": None}
    planned = resolve_plan(q, k, v, 2, gated, CHUNK)
    out: dict = {"T": T, "gated": gated, "plan": dataclasses.asdict(planned), "forward_ms": {}, "state_read_bytes": {}}
    for block_t in block_ts:
        plan = dataclasses.replace(planned, block_t=block_t)
        call = functools.partial(
            forward.triton_forward, q, k, v, **options, plan=plan, state_kernel=chunk_states, y_dtype=torch.bfloat16
        )
        out["forward_ms"][block_t] = median_ms(call, REPS)
        out["state_read_bytes"][block_t] = state_read_bytes(T, block_t)
        print(f"T={T} gated={gated} block_t={block_t}: {out['forward_ms'][block_t]:.3f} ms", flush=True)
    return out


def single_call(T: int, gated: bool) -> None:
    q, k, v, gate = inputs(T, gated)
    with torch.no_grad():
        rc.power_retention(q, k, v, log_gate=gate, chunk_size=CHUNK, impl="cuda")
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--block-t", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--single-call", action="store_true", help="one forward for ncu, nothing recorded")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_forward.py needs a CUDA GPU")
    if args.single_call:
        single_call(args.T, args.gated)
        return
    name = torch.cuda.get_device_name()
    result = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "gpu": name},
        "shape": {"B": B, "H": H, "d": D, "deg": 2, "dtype": "bfloat16", "causal": True},
        "timing": timing(args.T, args.gated, args.block_t),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_forward_{name.replace(' ', '-')}_{result['date']}_{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
