"""Settings of the op alternated in one process: the eager forward and its kernels per setting, round by round.

Under the H200's power cap a whole run moves by a few percent, so two settings are compared within one process,
in turns, over several rounds (the rounds' spread is the noise). Used by ``bench_state_fold.py`` (and, at
c6f13f6, by ``bench_query_after_states.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from bench_forward import bench_ms, inputs, kernel_times, ours, result_header

from retention_compile.ops import resolve_plan

ROUNDS = 3


def alternated(
    T: int, gated: bool, rounds: int, settings: dict[str, Callable[[], None]], segments: int | None = None
) -> dict:
    """Per round, each setting in turn (``settings``: name -> a function that applies it): the whole eager forward
    (``bench_ms``: ``do_bench`` median; ``back_to_back_ms``: median of 20 calls queued back to back), and the device
    time per kernel (profiler, mean of 20 calls) at b1 h8 d64 bf16 causal, the op's plan and the CUDA state kernel.
    ``y_rel``: ||y_last - y_first|| / ||y_first|| between the first and the last setting; ``summary``: per setting
    and measure the median over the rounds, and in how many rounds each setting beat the first. ``segments``: the
    state kernel's segment count (None: the op's)."""
    x = inputs(T, gated)
    plan = resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0)
    row: dict = {"T": T, "gated": gated, "segments": segments, "rounds": []}
    outputs = {}
    for _ in range(rounds):
        entry = {}
        for name, apply in settings.items():
            apply()
            run = ours(x, plan, segments, codegen="cuda")
            outputs[name] = run()[0].float()
            timed = {"forward_ms": bench_ms(run), "back_to_back_ms": back_to_back_ms(run, 20)}
            entry[name] = {**timed, "kernel_ms": kernel_times(run, 20)}
        row["rounds"].append(entry)
        times = {k: v["forward_ms"] for k, v in entry.items()}
        print(json.dumps({"T": T, "gated": gated, "segments": segments, **times}), flush=True)
    first, last = outputs[next(iter(settings))], outputs[list(settings)[-1]]
    row["y_rel"] = ((last - first).norm() / first.norm()).item()
    row["summary"] = summary(row["rounds"])
    print(json.dumps({"T": T, "gated": gated, "segments": segments, "summary": row["summary"]}), flush=True)
    return row


def back_to_back_ms(run: Callable[[], object], calls: int) -> float:
    """Median ms of ``calls`` calls queued back to back, each between two CUDA events (no cache flush between them,
    unlike ``do_bench``): a call's time from its first kernel's start to its last kernel's end, as the next call's
    kernels queue behind it."""
    run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def summary(rounds: list[dict]) -> dict:
    """Per setting and timed measure: the median over ``rounds`` and, for the settings after the first, the rounds in
    which that setting took less time than the first."""
    names = list(rounds[0])
    out: dict = {}
    for name in names:
        out[name] = {}
        for measure in ("forward_ms", "back_to_back_ms"):
            values = [entry[name][measure] for entry in rounds]
            out[name][measure] = statistics.median(values)
            if name != names[0]:
                wins = sum(entry[name][measure] < entry[names[0]][measure] for entry in rounds)
                out[name][f"{measure}_lower_than_{names[0]}"] = f"{wins}/{len(rounds)}"
    return out


def main(kind: str, description: str, settings: dict[str, Callable[[], None]], restore: Callable[[], None]) -> None:
    """The command line of an alternation script: ``--lengths``, ``--rounds``, ``--gated`` (which of ungated and
    gated), ``--segments`` (state-kernel segment counts, a row each; default the op's), ``--out``, ``--commit``;
    writes ``<kind>_<gpu>_<date>_<commit>.json`` under ``--out`` after every row.
    ``restore`` puts the default setting back at the end."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--gated", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--segments", type=int, nargs="+", default=[None], help="state-kernel segment counts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    base, record = result_header(kind, args.out, args.commit)
    base = base.with_name(f"{base.name}_{record['commit']}")
    record["rows"] = []
    gates = {"no": (False,), "yes": (True,), "both": (False, True)}[args.gated]
    try:
        for gated in gates:
            for T in args.lengths:
                for segments in args.segments:
                    record["rows"].append(alternated(T, gated, args.rounds, settings, segments))
                base.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
                torch.cuda.empty_cache()
    finally:
        restore()
    print(f"wrote {base.with_suffix('.json')}")
