"""Could the forward's query kernel run in the state kernel's tail? A probe for issue 5 (T=65536 <= 1.0 ms).

The chunked forward runs the CUDA state kernel (three rounds of programs at b=1 h=8 d=64 T=65536, two per SM; the
segments folded in, the fold's adds trailing the last round) and then the query kernel. A query kernel started while
the state kernel's last programs end (a programmatic dependent launch, its programs waiting per chunk for their
states) would fill the slots the state kernel leaves idle. This probe bounds what that could save before building it:
the state-kernel call and the query launch of one ``triton_forward`` are recorded and replayed

    alone         each by itself,
    in sequence   state then query on one stream (what the forward does),
    overlapped    state on the current stream, the query kernel (on copies of its buffers, so nothing is shared and
                  it need not wait) on a second stream launched right after it, at normal and at high priority: the
                  query kernel's programs are dispatched as the state kernel's free their slots.

The overlap is an upper bound: a real query program must wait for its chunk's state. Session 59 built that launch
(``forward.QUERY_BESIDE_STATES``; the hook here is a bare function, so the recorded forward launches the query kernel
after the state kernel): it gained nothing gated at T=65536, where this probe had read 0.04-0.06 ms hidden, because
query programs that wait for the last segments' states cannot take their slots early. Times are means over
``--calls`` replays between CUDA events, after a warm-up, in ``--rounds`` rounds. History: session 29 ran this probe
on the segment scan (then a kernel of its own, 0.11 ms), of which the overlap hid 0.044-0.055 ms
(``overlap_probe_NVIDIA-H200_2026-12-01_*.json``); the scan has since been folded into the state kernel.

    python benchmarks/overlap_probe.py [--T 65536] [--calls 20] [--rounds 3] [--out DIR] [--commit SHA]

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

    def recording_launch(kernel, grid, kwargs, warps, stages, maxnreg=None, kept=None, dependent=False):
        recorded["launches"].append((kernel, grid, dict(kwargs), warps, stages))
        launch(kernel, grid, kwargs, warps, stages, maxnreg, kept, dependent=dependent)

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


def replay(recorded: dict, kernel_name: str) -> Callable[[], None]:
    """The recorded launch of Triton kernel ``kernel_name`` on copies of the buffers it reads and writes."""
    from torch._library.triton import set_wrap_triton_enabled

    ((kernel, grid, kwargs, warps, stages),) = [r for r in recorded["launches"] if kernel_name in repr(r[0])]
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


def overlapped(state: Callable[[], None], second: Callable[[], None], priority: int) -> Callable[[], None]:
    """``state`` on the current stream, ``second`` on a side stream of ``priority`` launched right after it; joined."""
    side = torch.cuda.Stream(priority=priority)

    def run() -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        state()
        with torch.cuda.stream(side):
            second()
        main.wait_stream(side)

    return run


def probe(T: int, gated: bool, calls: int, rounds: int) -> dict:
    """One row: per round, the state call and the query launch alone, in sequence and overlapped; ``hidden_ms`` the
    sequence less the faster overlap, per round."""
    x = inputs(T, gated)
    plan = resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0)
    recorded = capture(x, plan)
    spec, args = recorded["state"]
    kernel = state_kernel_choice(x, plan).kernel

    def state() -> None:
        kernel(spec, args)

    query = replay(recorded, "attention_kernel")
    timed = {
        "state_ms": state,
        "query_ms": query,
        "sequence_ms": lambda: (state(), query()),
        "overlapped_ms": overlapped(state, query, 0),
        "overlapped_high_priority_ms": overlapped(state, query, -1),
    }
    row: dict = {"T": T, "gated": gated, "chunk": plan.chunk_size, **{name: [] for name in timed}, "hidden_ms": []}
    for _ in range(rounds):
        for name, fn in timed.items():
            row[name].append(mean_ms(fn, calls))
        faster = min(row["overlapped_ms"][-1], row["overlapped_high_priority_ms"][-1])
        row["hidden_ms"].append(row["sequence_ms"][-1] - faster)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    commit = git_commit(args.commit)
    rows = [probe(args.T, gated, args.calls, args.rounds) for gated in (False, True)]
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) / f"overlap_probe_{gpu}_{datetime.date.today()}_{commit[:7]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command_line(), "commit": commit, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
