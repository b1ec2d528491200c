"""The CUDA state kernel's time against how its grid is dispatched, beside the model of ``codegen/dispatch.py``.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), ungated (``--gated``), the planner's plan, the CUDA
state kernel. Two sweeps, each timed by the profiler (the state kernel's mean over 20 forward calls), ``--rounds`` times
alternated:

    active   the first N programs in dispatch order do the work, the rest return at once (an edit of the rendered
             source; the results are wrong, only the time counts), with the default segment count: N = one round of
             the GPU's slots (SMs x programs per SM), half of one, 1.5, 2, all. How long a round takes, a program
             alone on an SM against two, and what the last partial round costs.
    order    the kernel's segment-major grid and a segment-minor one (the Triton kernel's order: segments fastest, by
             swapping the grid's axes in the source and the launch), for each ``--segments`` count: the kernel's time
             and the model's makespan (``dispatch.makespan`` of that dispatch order, in chunk times of a program
             alone; ``model_ms`` scales it by the segment-major default's measured time over its makespan).

    python benchmarks/state_dispatch.py [--T 65536] [--gated] [--segments 6 7 8 9 11] [--rounds 2] [--out DIR]
        [--commit SHA]

The state kernel runs without the segment fold (``StateKernelConfig.wgmma_fold`` off, the Triton scan after it,
``STUDIED_CONFIG``): the edits drop or reorder programs, which the fold's waits on the segment before cannot follow.

Writes ``state_dispatch_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from unittest import mock

from ablate_forward import Edit, apply_edits, edited_sources, unmatched

from retention_compile.codegen import cuda_state, dispatch, forward

# the first N programs in dispatch order (x fastest) work, the others return before anything else
_PROGRAM_LINE = r"(const int p = (?:blockIdx\.y|program_y) / NEB, eb = (?:blockIdx\.y|program_y) % NEB;)"
SEGMENT_MINOR: list[Edit] = [
    (r"const int seg = blockIdx\.z;", "const int seg = blockIdx.x;"),
    (r"const long long bs = blockIdx\.x;", "const long long bs = blockIdx.z;"),
]


# the kernel these edits apply to: no fold (blockIdx order, no waits on other programs)
STUDIED_CONFIG = dataclasses.replace(cuda_state.CONFIG, wgmma_fold=False)


def first_programs_only(n: int) -> Edit:
    linear = "blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)"
    return (_PROGRAM_LINE, rf"\1\n  if ({linear} >= {n}) return;")


def _segment_minor_grid(info, batch: int, state_heads: int, n_seg: int) -> tuple[int, int, int]:
    return n_seg, info.grid_y, batch * state_heads


def edits_apply(source: str) -> list[str]:
    """The patterns of this benchmark's edits that match nothing in ``source`` (a rendered state kernel)."""
    matched: dict[str, int] = {}
    edits = [*SEGMENT_MINOR, first_programs_only(1)]
    apply_edits(source, edits, matched)
    return unmatched(edits, matched)


def model_queue(n_chunks: int, segments: int, programs: int, order: str) -> list[int]:
    """Chunks per program in dispatch order for the grid of ``order``."""
    lengths = dispatch.segment_lengths(n_chunks, segments)
    if order == "segment-major":
        return dispatch.segment_major(lengths, programs)
    return [length for _ in range(programs) for length in lengths]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--segments", type=int, nargs="+", default=[6, 7, 8, 9, 11])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    with mock.patch.object(cuda_state, "CONFIG", STUDIED_CONFIG):
        return measure(args)


def measure(args: argparse.Namespace) -> dict:
    import torch
    from bench_forward import B, H, inputs, kernel_times, ours, result_header

    from retention_compile.ops import resolve_plan

    x = inputs(args.T, args.gated)
    plan = resolve_plan(x["q"], x["k"], x["v"], 2, args.gated, 0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    spec = forward.kernel_spec(x["q"], x["v"], 2, args.gated, False, True, args.T, plan)
    per_sm = cuda_state.CudaStateHook.programs_per_sm(spec, x["q"].device)
    programs = spec.template_params()["npairs"] * spec.template_params()["n_eb"] * B * H
    n_chunks = -(-args.T // plan.chunk_size)
    default = forward.state_segments(x["q"].device, programs, n_chunks, None, per_sm)[2]
    slots = sms * per_sm

    def state_ms(segments: int | None, state_edits: list[Edit], minor: bool) -> float:
        grid = _segment_minor_grid if minor else cuda_state._grid  # the launch's axes as the edited source reads them
        with edited_sources([], state_edits) as matched, mock.patch.object(cuda_state, "_grid", grid):
            run = ours(x, plan, segments=segments, codegen="cuda")
            run()
            torch.cuda.synchronize()
            if missing := unmatched(state_edits, matched):
                raise RuntimeError(f"edits that match nothing (the kernel changed): {missing}")
            return kernel_times(run, 20)["retention_chunk_state"]

    total = programs * default
    counts = sorted({slots // 2, slots, slots * 3 // 2, 2 * slots, total} - {0})
    active, order = [], []
    for rnd in range(args.rounds):
        for n in counts:
            row = {"round": rnd, "active_programs": n, "segments": default, "of_programs": total}
            row["state_ms"] = state_ms(None, [first_programs_only(n)] if n < total else [], False)
            print(json.dumps(row), flush=True)
            active.append(row)
        for name in ("segment-major", "segment-minor"):
            for segments in args.segments:
                row = {"round": rnd, "order": name, "segments": segments}
                minor = name == "segment-minor"
                row["state_ms"] = state_ms(segments, SEGMENT_MINOR if minor else [], minor)
                row["makespan"] = dispatch.makespan(model_queue(n_chunks, segments, programs, name), sms, per_sm)
                print(json.dumps(row), flush=True)
                order.append(row)
    reference = [r for r in order if r["order"] == "segment-major" and r["segments"] == default]
    if reference:
        per_unit = sum(r["state_ms"] / r["makespan"] for r in reference) / len(reference)
        for row in order:
            row["model_ms"] = row["makespan"] * per_unit
    base, record = result_header("state_dispatch", args.out, args.commit)
    record["shape"]["T"] = args.T
    record.update(gated=args.gated, sms=sms, programs_per_sm=per_sm, programs_per_segment=programs)
    record.update(n_chunks=n_chunks, default_segments=default, active=active, order=order)
    path = Path(f"{base}_{record['commit']}{'_gated' if args.gated else ''}.json")
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
