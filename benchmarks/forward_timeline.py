"""Where the forward's ``do_bench`` median goes: its kernels one by one, as ``do_bench`` runs them.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), ungated and gated, the planner's plan and the state
kernel ``codegen="auto"`` picks (``bench_forward.ours``). Per gating:

    do_bench          three medians, as ``bench_forward`` times a row (``do_bench`` clears the L2 cache before each
                      call by writing a buffer: 256 MB with Triton 3.6; the flushes here are Triton's own)
    events            medians of CUDA-event timings of 40 calls, with that L2 flush before each call and without it:
                      whether the flush moves the median
    calls             a profiler trace of ``--calls`` flushed calls: per call, each kernel's start after the flush
                      ends and its duration (us), and the span from the flush's end to the last kernel's end

So the median splits into the kernels' own time, the gaps between them and what runs besides them (buffer fills,
the gate's cumsum). Writes ``forward_timeline_<gpu>_<date>.json`` (the commit inside) and a ``.png`` of the traced
calls under ``--out`` (default ``benchmarks/results``).

    python benchmarks/forward_timeline.py [--T 65536] [--calls 12] [--graph] [--out DIR] [--commit SHA]

``--graph`` adds each gating's CUDA-graph replay (``bench_forward``'s "graph" column), traced the same way: where a
replay's median goes that the eager call's does not (graph replays have read 0.02-0.05 ms above eager calls at
T=65536, forward_notes session 74).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

FLUSH_MIN_US = 30.0  # a fill this long is the flush, not one of the forward's own buffer fills (about 1 us)


def is_flush(event: dict) -> bool:
    """Whether a trace event is the L2 flush: a fill (or memset) of at least ``FLUSH_MIN_US``."""
    filling = "fill" in event["name"].lower() or event.get("cat") == "gpu_memset"
    return filling and event["dur"] >= FLUSH_MIN_US


def calls_from_trace(events: list[dict]) -> list[dict]:
    """The traced calls from the device events of a Chrome trace (``cat`` kernel, gpu_memset or gpu_memcpy): each
    flush opens a call, whose kernels are the events up to the next flush, as (name, start after the flush's end,
    duration) in us. Events before the first flush are dropped."""
    on_device = (e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"))
    device = sorted(on_device, key=lambda e: e["ts"])
    calls: list[dict] = []
    for event in device:
        if is_flush(event):
            calls.append({"flush_end": event["ts"] + event["dur"], "kernels": []})
        elif calls:
            start = event["ts"] - calls[-1]["flush_end"]
            calls[-1]["kernels"].append({"name": event["name"], "start_us": start, "dur_us": event["dur"]})
    for call in calls:
        last = call["kernels"][-1] if call["kernels"] else None
        call["span_us"] = last["start_us"] + last["dur_us"] if last else 0.0
    return calls


def l2_flush() -> Callable[[], None]:
    """The L2 flush ``triton.testing.do_bench`` makes before each call (its driver's benchmark cache, cleared)."""
    import triton

    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    return lambda: driver.clear_cache(cache)


def event_medians(run: Callable[[], object], flush: Callable[[], None] | None, calls: int = 40) -> float:
    """Median ms of ``calls`` CUDA-event timings of ``run``, each after ``flush()`` where given."""
    import torch

    timed = []
    for _ in range(calls):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        timed.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in timed)


def traced_calls(run: Callable[[], object], flush: Callable[[], None], calls: int) -> list[dict]:
    """``calls_from_trace`` of a profiler trace of ``calls`` calls of ``run``, each after ``flush()``."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush()
            run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return calls_from_trace(json.loads(trace.read_text())["traceEvents"])


def measure(T: int, gated: bool, calls: int, graph: bool = False) -> dict:
    """One row: the eager call (``graph``: its CUDA-graph replay, ``bench_forward.graphed``) timed and traced."""
    import torch
    from bench_forward import bench_ms, graphed, inputs, ours

    from retention_compile.ops import resolve_plan

    x = inputs(T, gated)
    run = ours(x, resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0))
    run = graphed(run) if graph else run
    run()
    torch.cuda.synchronize()
    flush = l2_flush()
    traced = traced_calls(run, flush, calls + 1)[1:]  # the first traced call pays the profiler's start
    return {
        "T": T,
        "gated": gated,
        "run": "graph" if graph else "eager",
        "do_bench_ms": [bench_ms(run) for _ in range(3)],
        "events_flushed_ms": [event_medians(run, flush) for _ in range(3)],
        "events_unflushed_ms": [event_medians(run, None) for _ in range(3)],
        "span_us": [call["span_us"] for call in traced],
        "calls": traced,
    }


def plot(rows: list[dict], path: Path) -> None:
    """One panel per gating: the traced calls' kernels as bars from the flush's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.5 + 0.35 * max(len(r["calls"]) for r in rows) * len(rows)))
    colours: dict[str, str] = {}
    for ax, row in zip(list(axes) if len(rows) > 1 else [axes], rows):
        for i, call in enumerate(row["calls"]):
            for kernel in call["kernels"]:
                short = kernel["name"][:40]
                colour = colours.setdefault(short, f"C{len(colours) % 10}")
                ax.barh(i, kernel["dur_us"], left=kernel["start_us"], color=colour, label=short)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
        ax.set_title(f"T={row['T']} {'gated' if row['gated'] else 'ungated'} {row.get('run', 'eager')}: do_bench "
                     f"{min(row['do_bench_ms']):.3f}-{max(row['do_bench_ms']):.3f} ms", fontsize=9)  # fmt: skip
        ax.set_xlabel("us after the L2 flush")
        ax.set_ylabel("call")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None)
    parser.add_argument("--graph", action="store_true", help="each gating's CUDA-graph replay too, after its eager")
    args = parser.parse_args(argv)
    from bench_forward import result_header

    base, record = result_header("forward_timeline", args.out, args.commit)
    record["rows"] = []
    for gated, graph in itertools.product((False, True), (False, True) if args.graph else (False,)):
        row = measure(args.T, gated, args.calls, graph)
        record["rows"].append(row)
        spans = row["span_us"]
        print(f"T={args.T} gated={gated} {row['run']}: do_bench {row['do_bench_ms']}, "
              f"events flushed {row['events_flushed_ms']}, unflushed {row['events_unflushed_ms']}; "
              f"flush end -> last kernel end {min(spans):.1f}-{max(spans):.1f} us", flush=True)  # fmt: skip
        for kernel in row["calls"][0]["kernels"]:
            print(f"    {kernel['name'][:60]:60s} start {kernel['start_us']:8.2f} us  {kernel['dur_us']:8.2f} us")
        base.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    plot(record["rows"], base.with_suffix(".png"))
    print(f"wrote {base}.json/.png")
    return record


if __name__ == "__main__":
    main()
