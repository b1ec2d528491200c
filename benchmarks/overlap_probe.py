"""Could the forward's segment scan hide in the state kernel's tail? A probe for issue 5 (T=65536 <= 1.0 ms).

The chunked forward runs three kernels one after another: the state kernel (about 2.4 waves of programs at b=1
h=8 d=64 T=65536, two per SM), the segment scan (bandwidth-bound, about 0.11 ms) and the query kernel. A scan fused
into the state kernel's launch as programs that start once every state program has (the failed attempt of session
28 did the fix-ups inside the state programs, all at once) would run in the slots the state kernel's last wave
leaves idle. This probe measures what that could save before building it: the captured state-kernel call and scan
launch of one ``triton_forward`` are replayed

    alone         each by itself,
    in sequence   state then scan on one stream (what the forward does),
    overlapped    state on the current stream, the scan (on copies of its buffers, so nothing is shared) on a
                  second stream launched right after it, at normal and at high priority: the scan's blocks are
                  dispatched as the state kernel's free their slots.

Times are means over ``--calls`` replays between CUDA events, after a warm-up. H200, T=65536, session 29: the
overlap hid 0.044-0.055 ms of the scan's 0.11 (``overlap_probe_NVIDIA-H200_2026-12-01_*.json``).

    python benchmarks/overlap_probe.py [--T 65536] [--calls 20] [--scan-configs 1024/4/2 2048/8/3 ...] [--out DIR]
        [--commit SHA]

``--scan-configs`` then times the scan alone (ungated) per BLOCK/WARPS/STAGES: state elements per program, warps
and pipeline stages (the forward's: ``SCAN_BLOCK``/``SCAN_WARPS``/2).

Writes ``overlap_probe_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
from bench_forward import D, inputs, state_kernel_choice
from provenance import command_line, git_commit

from retention_compile.codegen import forward
from retention_compile.ops import resolve_plan


def capture(x: dict, plan) -> dict:
    """Run one forward, recording the state kernel's call and every Triton launch (kernel, grid, arguments)."""
    recorded: dict = {"launches": []}
    state_kernel = state_kernel_choice(x, plan).kernel
    if state_kernel is None:
        raise SystemExit("overlap_probe: the CUDA state kernel does not serve this shape on this GPU")

    def state_hook(spec, args):
        recorded["state"] = (spec, dict(args))
        return state_kernel(spec, args)

    launch = forward._launch

    def recording_launch(kernel, grid, kwargs, warps, stages, maxnreg=None, kept=None):
        recorded["launches"].append((kernel, grid, dict(kwargs), warps, stages))
        launch(kernel, grid, kwargs, warps, stages, maxnreg, kept)

    from torch._library.triton import set_wrap_triton_enabled

    forward._launch = recording_launch
    try:
        with set_wrap_triton_enabled(False):
            forward.triton_forward(
                x["q"], x["k"], x["v"], scale=D**-0.5, deg=2, log_gate=x["gate"], causal=True, valid=None,
                plan=plan, state_kernel=state_hook, y_dtype=x["q"].dtype,
            )  # fmt: skip
    finally:
        forward._launch = launch
    return recorded


def scan_replay(recorded: dict, launch: tuple[int, int] | None = None) -> Callable[[], None]:
    """The recorded scan launch on copies of the buffers it reads and writes (``launch``: other warps and stages)."""
    from torch._library.triton import set_wrap_triton_enabled

    ((kernel, grid, kwargs, warps, stages),) = [r for r in recorded["launches"] if "scan_kernel" in repr(r[0])]
    warps, stages = launch or (warps, stages)
    copied = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}

    def run() -> None:
        with set_wrap_triton_enabled(False):
            forward._launch(kernel, grid, copied, warps, stages)

    return run


def mean_ms(fn: Callable[[], None], calls: int) -> float:
    """Mean milliseconds of ``fn`` over ``calls`` replays (after 3 warm-up calls), between CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / calls


def overlapped(state: Callable[[], None], scan: Callable[[], None], priority: int) -> Callable[[], None]:
    """``state`` on the current stream, ``scan`` on a side stream of ``priority`` launched right after it; joined."""
    side = torch.cuda.Stream(priority=priority)

    def run() -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        state()
        with torch.cuda.stream(side):
            scan()
        main.wait_stream(side)

    return run


def probe(T: int, gated: bool, calls: int) -> dict:
    x = inputs(T, gated)
    plan = resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0)
    recorded = capture(x, plan)
    spec, args = recorded["state"]
    kernel = state_kernel_choice(x, plan).kernel

    def state() -> None:
        kernel(spec, args)

    scan = scan_replay(recorded)
    row = {
        "T": T,
        "gated": gated,
        "chunk": plan.chunk_size,
        "state_ms": mean_ms(state, calls),
        "scan_ms": mean_ms(scan, calls),
        "sequence_ms": mean_ms(lambda: (state(), scan()), calls),
        "overlapped_ms": mean_ms(overlapped(state, scan, 0), calls),
        "overlapped_high_priority_ms": mean_ms(overlapped(state, scan, -1), calls),
    }
    row["hidden_ms"] = row["sequence_ms"] - min(row["overlapped_ms"], row["overlapped_high_priority_ms"])
    print(json.dumps(row), flush=True)
    return row


def scan_configs(T: int, gated: bool, calls: int, configs: list[str]) -> list[dict]:
    """The scan alone per configuration ``BLOCK/WARPS/STAGES`` (state elements per program, warps, pipeline stages):
    the forward is re-rendered with ``triton_source.SCAN_BLOCK = BLOCK`` and its scan launch replayed."""
    from retention_compile.codegen import triton_source

    x = inputs(T, gated)
    plan = resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0)
    rows = []
    for config in configs:
        block, warps, stages = (int(part) for part in config.split("/"))
        triton_source.SCAN_BLOCK = forward.SCAN_BLOCK = block
        triton_source._forward_params.cache_clear()
        triton_source._load.cache_clear()
        scan = scan_replay(capture(x, plan), (warps, stages))
        rows.append({"T": T, "gated": gated, "scan": config, "scan_ms": mean_ms(scan, calls)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--scan-configs", nargs="*", default=[], help="BLOCK/WARPS/STAGES of the scan to time")
    args = parser.parse_args()
    commit = git_commit(args.commit)
    rows = [probe(args.T, gated, args.calls) for gated in (False, True)]
    rows += scan_configs(args.T, False, args.calls, args.scan_configs) if args.scan_configs else []
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) / f"overlap_probe_{gpu}_{datetime.date.today()}_{commit[:7]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command_line(), "commit": commit, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
