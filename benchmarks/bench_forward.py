"""Forward time of the Triton power-retention kernels against SDPA (its flash backend and its default choice),
Manifest's ``retention`` 1.0.7 and fla's ``chunk_simple_gla`` (issue 5): b=1, h=8, d=64, deg=2, bf16, causal, gated
and ungated.

    python benchmarks/bench_forward.py [--out DIR] [--T 1024 2048 ...] [--tune 65536] [--competitors T ...]
        [--compiled T ...]

Times are medians over ``ROUNDS`` rounds (below) of ``triton.testing.do_bench`` medians (warmup 25 ms, rep 100 ms).
"ours" is ``triton_forward`` run eagerly as the body of a ``triton_op`` runs it (kernels launched directly, Python
overhead included, as SDPA's is), with the Plan that ``planning.plan`` picks for the shape and the state kernel
``codegen="auto"`` picks (the row's ``state_kernel``: the CUDA one where measured faster), y stored in bf16 as by the
op's forward that no backward follows (``for_backward=False``; runs up to session 25 stored it in float32); "ours graph"
replays the same call from a CUDA graph (no launch overhead, as in a compiled model with CUDA graphs). "ours compiled"
(at the ``--compiled`` lengths, default 65536 and 8192) is the public ``power_retention`` under ``torch.compile``
(fullgraph, no grad): a compiled model's path, through Inductor's generated code (on the CUDA state kernel's route one
op, ``ops.power_retention_inference``, whose body is the eager forward). "ours dynamic" (at the ``--dynamic`` lengths,
default 65536) is the same under ``torch.compile(dynamic=True)``, called first at T=1000: the graph a model serving
several lengths runs, whose Plan and state kernel are chosen per call from the concrete length. ``--tune T`` first
times, gated at length T, the kernel variants of the chunked query kernel, two chunk sizes and several segment counts,
keeps the fastest variant for the whole run and reports the fastest configuration as "ours best" with a per-kernel
breakdown.
"sdpa" is SDPA on PyTorch's flash backend (FlashAttention-2), "sdpa default" SDPA on the backend it picks itself
(``sdpa_default_kernel`` names the kernel it ran: cuDNN's on the H200 with torch 2.11, the faster one). Achieved
rate: FLOP the kernels execute (tiled state, see ``executed_flops``) over the fastest time, as a fraction of a bf16
matmul measured in the same run. Competitors run at ``--competitors`` lengths when importable (carry them as wheels:
../shared/tools/gpu-wheels.sh); a failure is recorded, not fatal. A cProfile of eager calls at T=2048 is printed
first.

Rows are measured the bars' lengths first (``BAR_LENGTHS``), each ungated then gated, the table printed in order of T.
A row's columns are made first (compiled, captured, called once), then timed in ``ROUNDS`` rounds, each round in
an order rotated from the last's, and a column's time is the median of its rounds' (``rounds_ms``): the card's clock
drifts within a row, and a column always timed after another read slower for it. Each column made prints a
progress line (stderr); the row's ``seconds`` are what each column took, making included (the competitors and the
compiled columns take minutes at T=65536, more than a device call may have left).
A run with both lengths of ``ODD_LENGTH_PAIR`` (the odd-length bar) ends by timing "ours" at the two in turns
(``odd_length``: per gating, each length's median and their ratio). Writes ``forward_<gpu>_<date>.json`` (after
every row) and ``forward_<gpu>_<date>.png`` (time vs T, log-log) under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from retention_compile import hardware, planning
from retention_compile.codegen import forward
from retention_compile.codegen.cuda_state import StateChoice, select_state_kernel
from retention_compile.codegen.forward import kernel_spec, triton_forward

sys.path.insert(0, str(Path(__file__).resolve().parent))
import warm  # noqa: E402
from provenance import command_line, git_commit  # noqa: E402

B, H, D = 1, 8, 64
LENGTHS = (1024, 2048, 4096, 8192, 12345, 16384, 32768, 65529, 65536)
# Tuning runs: (state kernel constants, chunked query kernel warps, query stages). The profiler separates the
# kernels, so run i times state variant i and query variant i together; each kernel's best is then kept.
TUNE_RUNS = (
    ({"STATE_STAGES": 2}, 4, 2),
    ({"STATE_STAGES": 3}, 4, 3),
    ({"STATE_STAGES": 4}, 8, 2),
    ({"STATE_STAGES": 3, "STATE_BLOCK_S": 128}, 8, 3),
)
TUNE_CHUNKS = (1024, 2048)
TUNE_SEGMENTS: tuple[int, ...] = ()  # besides the default (STATE_WAVES programs per SM); run 2: 8 vs 16 within 1%
COMPETITOR_LENGTHS = (2048, 8192, 32768, 65536)
COMPETITOR_MODULES = ("retention", "fla")  # Manifest's retention 1.0.7, fla's chunk_simple_gla
# the rows the bars read (T=65536 and 65529 against 1 ms and each other, 2048 against flash, 8192 the first
# length past flash), measured first: a run cut by a device call's limit keeps them (session 70's run lost the gated
# 65536 and 65529)
BAR_LENGTHS = (65536, 65529, 2048, 8192)
# each length and gate compiles once (static shapes). 8192: the compiled call's host time is seen there (session 75:
# 0.32 ms compiled against 0.15 eager, host-bound, where the bench had timed compiled calls at 65536 alone)
COMPILED_LENGTHS = (65536, 8192)
DYNAMIC_LENGTHS = (65536,)
DYNAMIC_FIRST_LENGTH = 1000  # the dynamic graph's first call, before the timed length


def bench_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def matmul_tflops(n: int = 8192) -> float:
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    return 2 * n**3 / (bench_ms(lambda: a @ b) * 1e-3) / 1e12


def copy_gbs(nbytes: int = 1 << 30) -> float:
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def executed_flops(T: int, plan: planning.Plan, gated: bool, state_kernel: object = None) -> float:
    """FLOP the kernels execute for (B, H, T, D), deg 2, causal (matrix products; elementwise work not counted).

    quadratic: H T (T + bt)/2 2(d + e) (the diagonal blocks count whole).
    chunked:   query  H T [2 Dt e + 4 d^2 + (C + bt)/2 2(d + e)]   (state term, normaliser hi/lo, own chunk)
               state  H T [2 Dt e + 2 d^2 ne]                       (Dt: the state's rows, ne: value blocks)

    Dt is the layout's the call takes with ``state_kernel``: 2304 in the cherry layout at d = 64, else 2560."""
    q = torch.empty(B, H, 1, D, device="meta", dtype=torch.bfloat16)
    spec = kernel_spec(q, q, 2, gated, False, True, T, plan)
    if spec.chunked and forward.writes_cherry_rows(state_kernel, spec, torch.device("cuda")):
        spec = replace(spec, cherries=True)
    d = e = D
    bt = spec.block_t
    if not spec.chunked:
        return H * T * (T + bt) / 2 * 2 * (d + e)
    params = spec.template_params()
    dt, ne, C = params["dt"], params["n_eb"], spec.chunk_size
    query = 2 * dt * e + 4 * d * d * ne + (C + bt) / 2 * 2 * (d + e)
    state = 2 * dt * e + 2 * d * d * ne
    return H * T * (query + state)


def inputs(T: int, gated: bool) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(T)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    q, k, v = randn(B, H, T, D), randn(B, H, T, D), randn(B, H, T, D)
    gate = -0.05 * torch.rand(B, H, T, device="cuda", generator=gen) if gated else None
    return {"q": q, "k": k, "v": v, "gate": gate}


def row_plan(spec: hardware.GpuSpec, T: int, gated: bool) -> planning.Plan:
    """The Plan ``planning.plan`` makes for a row's shape (b=1, h=8, d=64, deg 2, bf16) on the GPU ``spec``."""
    return planning.plan(spec, T=T, d=D, e=D, deg=2, dtype=torch.bfloat16, gated=gated, batch_heads=B * H)


def state_kernel_choice(x: dict, plan: planning.Plan, codegen: str = "auto") -> StateChoice:
    """The state kernel the op picks for these inputs with ``codegen`` ("auto": measured once per GPU and shape)."""
    return select_state_kernel(x["q"], x["k"], x["v"], 2, x["gate"], None, True, D**-0.5, plan, codegen)


def ours(x: dict, plan: planning.Plan, segments: int | None = None, codegen: str = "auto") -> Callable[[], object]:
    """``triton_forward`` as a ``triton_op`` body runs it eagerly (kernels launched directly, not through the HOP),
    with the state kernel ``codegen`` picks, storing y in the inputs' dtype as the op does when no backward follows
    (``for_backward=False``)."""
    from torch._library.triton import set_wrap_triton_enabled

    state_kernel = state_kernel_choice(x, plan, codegen).kernel

    def run() -> object:
        with set_wrap_triton_enabled(False):
            return triton_forward(
                x["q"], x["k"], x["v"], scale=D**-0.5, deg=2, log_gate=x["gate"], causal=True, valid=None,
                plan=plan, segments=segments, state_kernel=state_kernel, y_dtype=x["q"].dtype,
            )  # fmt: skip

    return run


def compiled(x: dict, dynamic: bool = False) -> Callable[[], object]:
    """``rc.power_retention`` compiled by ``torch.compile`` (fullgraph) and called without grad, as a compiled model's
    inference runs it (y stored in the inputs' dtype alone, as in "ours"). ``dynamic``: compiled with symbolic
    lengths and called first at ``DYNAMIC_FIRST_LENGTH``."""
    import retention_compile as rc

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return rc.power_retention(q, k, v, scale=D**-0.5, log_gate=gate, causal=True)

    torch._dynamo.reset()  # one compile per row: rows past Dynamo's recompile limit would silently run eagerly
    fn = torch.compile(attention, fullgraph=True, dynamic=dynamic)

    def run(x: dict = x) -> object:
        with torch.no_grad():
            return fn(x["q"], x["k"], x["v"], x["gate"])

    if dynamic:
        run(inputs(DYNAMIC_FIRST_LENGTH, x["gate"] is not None))

    run()  # compiles here, not in the timed calls
    return run


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured into a CUDA graph (after a warm-up call that compiles its kernels)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# SDPA timed twice: "sdpa" on PyTorch's flash backend (FlashAttention-2, forced) and "sdpa_default" on the backend SDPA
# picks itself. On the H200 with torch 2.11 the default is cuDNN's fused attention, 1.5-1.8x faster than the flash
# backend here (T=65536: 9.8 against 14.5 ms; T=8192: 0.198 against 0.351), and the one the anchors measured.
SDPA_BACKENDS: dict[str, str | None] = {"sdpa": "FLASH_ATTENTION", "sdpa_default": None}
# a row's timed methods, in the order of the printed table's columns and the plot's legend
TIMED_COLUMNS = ("ours", "ours_graph", "ours_compiled", "ours_dynamic", "ours_best", *SDPA_BACKENDS, "manifest", "fla")


def sdpa_backend(name: str | None) -> contextlib.AbstractContextManager:
    """SDPA restricted to the backend ``name`` (an ``SDPBackend`` member), or left to its own choice for None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name)) if name else contextlib.nullcontext()


def sdpa(x: dict, backend: str | None = "FLASH_ATTENTION") -> Callable[[], object]:
    def run() -> object:
        with sdpa_backend(backend):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)

    return run


def busiest_kernel(run: Callable[[], object]) -> str:
    """The name of the kernel that takes most of ``run``'s device time (which backend SDPA chose)."""
    times = kernel_times(run, 3)
    return max(times, key=times.get)[:120] if times else ""


def manifest(x: dict) -> Callable[[], object]:
    """Manifest's ``retention.power_retention`` (deg 2, chunk 1024 as in the anchors), layout (b, t, h, d)."""
    from retention import power_retention

    q, k, v = (t.transpose(1, 2).contiguous() for t in (x["q"], x["k"], x["v"]))
    gate = None if x["gate"] is None else x["gate"].transpose(1, 2).contiguous()
    T = q.shape[1]
    chunk = 1024 if T > 1024 else None
    return lambda: power_retention(q, k, v, gate, deg=2, scale=D**-0.5, chunk_size=chunk)


def fla(x: dict) -> Callable[[], object]:
    """fla's ``chunk_simple_gla`` (scalar per-head decay, linear state d x d), layout (b, t, h, d)."""
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v = (t.transpose(1, 2).contiguous() for t in (x["q"], x["k"], x["v"]))
    gate = None if x["gate"] is None else x["gate"].transpose(1, 2).contiguous()
    return lambda: chunk_simple_gla(q, k, v, g=gate, scale=D**-0.5)


def timed(fn_maker: Callable[[], Callable[[], object]]) -> tuple[float | None, str | None]:
    try:
        return bench_ms(fn_maker()), None
    except Exception as exc:  # a competitor that fails is reported, not fatal
        return None, failure(exc)


def failure(exc: Exception) -> str:
    """A failed column's record (its work on the GPU waited for first: the next column's timing starts clean)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# Each column of a row is timed once per round, in an order rotated between rounds: the card's clock drifts within a
# row (its power and heat), and a column always timed after another paid for it (session 74: graph replays read
# 0.02-0.05 ms above the eager call at T=65536 when timed after it, the same when alternated with it).
ROUNDS = 3


def timed_in_turns(
    makers: dict[str, Callable[[], Callable[[], object]]], rounds: int = ROUNDS, label: str = ""
) -> tuple[dict[str, list[float]], dict[str, str], dict[str, float]]:
    """Every column's run made (compiled, captured) and called once, then ``bench_ms`` of each run once per round,
    round r starting at column r (mod the count). Returns per column its rounds' medians (empty where it failed),
    the failures, and the seconds it took in all (making included). Prints a progress line (stderr) per column made,
    prefixed with ``label``."""
    runs: dict[str, Callable[[], object]] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name, maker in makers.items():
        begin = time.perf_counter()
        try:
            run = maker()
            run()
            runs[name] = run
        except Exception as exc:  # a competitor that fails is reported, not fatal
            errors[name] = failure(exc)
        seconds[name] = time.perf_counter() - begin
        print(f"  {label}{name}: made in {seconds[name]:.1f} s{' ' + errors[name] if name in errors else ''}",
              file=sys.stderr, flush=True)  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in makers}
    names = list(runs)
    for r in range(rounds if names else 0):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in errors:  # failed in an earlier round
                continue
            begin = time.perf_counter()
            try:
                samples[name].append(bench_ms(runs[name]))
            except Exception as exc:
                errors[name] = failure(exc)
                samples[name] = []
            seconds[name] += time.perf_counter() - begin
    return samples, errors, seconds


def tune(x: dict, T: int, gated: bool, base: planning.Plan) -> list[dict]:
    """``TUNE_RUNS`` at each of ``TUNE_CHUNKS`` (128 query rows), per-kernel times from the profiler; the fastest
    state variant and the fastest query variant are combined, set for the rest of the run, and timed with
    ``TUNE_SEGMENTS``. Entries sorted by time."""
    entries = []
    for chunk in TUNE_CHUNKS:
        for constants, warps, stages in TUNE_RUNS:
            plan = replace(base, chunk_size=chunk, block_t=128, block_e=64, num_stages=stages, reason="")
            variant = {**constants, "CHUNK_QUERY_WARPS": warps}
            _set_variant({**DEFAULTS, **variant})
            ms, err = timed(lambda plan=plan: ours(x, plan))
            kernels = breakdown(x, plan, None) if err is None else {}
            entries.append({"variant": variant, "plan": asdict(plan), "segments": None, "ms": ms, "error": err,
                            "kernels": kernels})  # fmt: skip
    timed_entries = [e for e in entries if e["kernels"]]
    state = min(timed_entries, key=lambda e: e["kernels"].get("state_kernel", math.inf))
    query = min(timed_entries, key=lambda e: e["kernels"].get("attention_kernel", math.inf))
    state_constants = {k: v for k, v in state["variant"].items() if k.startswith("STATE_")}
    best_variant = {**state_constants, "CHUNK_QUERY_WARPS": query["variant"]["CHUNK_QUERY_WARPS"]}
    _set_variant({**DEFAULTS, **best_variant})
    for chunk in TUNE_CHUNKS:
        plan = replace(_plan(query), chunk_size=chunk)
        for segments in (None, *TUNE_SEGMENTS):
            ms, err = timed(lambda plan=plan, s=segments: ours(x, plan, s))
            entries.append({"variant": best_variant, "plan": asdict(plan), "segments": segments, "ms": ms,
                            "error": err, "kernels": breakdown(x, plan, segments) if err is None else {}})  # fmt: skip
    return sorted(entries, key=_ms)


def _ms(entry: dict) -> float:
    return entry["ms"] if entry["ms"] is not None else math.inf


DEFAULTS = {name: getattr(forward, name) for name in ("STATE_STAGES", "STATE_BLOCK_S", "CHUNK_QUERY_WARPS")}


def _set_variant(variant: dict) -> None:
    for name, value in variant.items():
        setattr(forward, name, value)


def _plan(entry: dict) -> planning.Plan:
    return planning.Plan(**entry["plan"])


def kernel_times(run: Callable[[], object], calls: int) -> dict[str, float]:
    """Device time per kernel name (ms, mean over ``calls`` calls of ``run`` after one warm-up) from the profiler."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total:
            times[event.key] = total / calls / 1e3
    return times


def breakdown(x: dict, plan: planning.Plan, segments: int | None) -> dict[str, float]:
    """Device time per kernel (ms, mean over 20 calls) from the profiler."""
    return kernel_times(ours(x, plan, segments), 20)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    for name in COMPETITOR_MODULES:
        try:
            found[name] = __import__(name).__dict__.get("__version__", "importable")
        except Exception as exc:
            found[name] = f"unavailable ({type(exc).__name__})"
    found["cuda"] = str(torch.version.cuda)
    found["gpu"] = torch.cuda.get_device_name()
    return found


def untimed_competitors(found: dict[str, str], competitor_lengths: list[int], lengths: list[int]) -> str | None:
    """A line saying that Manifest's ``retention`` or fla imports (``found``: ``versions()``) but no row will time it,
    as where ``--competitors`` is given bare (an empty list); None where nothing is left out that way."""
    importable = [name for name in COMPETITOR_MODULES if not found[name].startswith("unavailable")]
    if not importable or set(competitor_lengths) & set(lengths):
        return None
    return f"{' and '.join(importable)} importable but timed at no length: --competitors names none of --T"


def result_header(kind: str, out: Path, commit: str | None) -> tuple[Path, dict]:
    """The results' path stem ``out/<kind>_<gpu>_<date>`` and the record's common fields: the command, the commit
    (``commit`` or the checkout's HEAD), versions, and the benchmarked shape."""
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line(),
        "commit": git_commit(commit),
        "versions": versions(),
        "shape": {"B": B, "H": H, "d": D, "deg": 2, "dtype": "bfloat16", "causal": True},
    }
    return out / f"{kind}_{gpu}_{datetime.date.today().isoformat()}", record


def record_rows(
    record: dict,
    base: Path,
    lengths: list[int],
    measure_row: Callable[[int, bool], dict],
    line: Callable[[dict], str],
    plot_rows: Callable[[list[dict], Path], None],
    first: tuple[int, ...] = (),
) -> None:
    """Measure every (T, gated) row into ``record["rows"]``, rewriting ``base.json`` and the plot ``base.png`` after
    each: a run cut short (a device call's time limit) keeps what it measured, drawn. The lengths in ``first`` go
    first (in that order), each ungated then gated, then the others."""
    ordered = [T for T in first if T in lengths] + [T for T in lengths if T not in first]
    for T in ordered:
        for gated in (False, True):
            row = measure_row(T, gated)
            record["rows"].append(row)
            base.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
            torch.cuda.empty_cache()
            print(line(row), flush=True)
            try:
                plot_rows(record["rows"], base.with_suffix(".png"))
            except Exception:  # the numbers are in the JSON already
                traceback.print_exc()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in TIMED_COLUMNS if any(r.get(m) for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, gated in zip(axes, (False, True)):
        sel = sorted((r for r in rows if r["gated"] == gated), key=lambda r: r["T"])
        for m in methods:
            pts = [(r["T"], r[m]) for r in sel if r.get(m)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"b={B} h={H} d={D} deg 2 bf16 causal, {'gated' if gated else 'ungated'}")
        ax.set_xlabel("T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("forward ms (median)")
    for ax in axes:  # a run cut before its gated rows drew the ungated panel alone
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(
    T: int,
    gated: bool,
    spec: hardware.GpuSpec,
    ceilings: dict,
    tuned: dict | None,
    competitors: bool,
    compile_: bool,
    dynamic: bool,
) -> dict:
    """One table row: ours with the planner's Plan (eager and graph-replayed; compiled where ``compile_``, with
    dynamic shapes where ``dynamic``), the tuned plan when given (with its per-kernel breakdown), SDPA flash and the
    competitors."""
    x = inputs(T, gated)
    plan = row_plan(spec, T, gated)
    row: dict = {"T": T, "gated": gated, "plan": asdict(plan), "errors": {}}
    choice = state_kernel_choice(x, plan)
    row["state_kernel"] = "cuda" if choice.kernel is not None else f"triton ({choice.reason})"
    makers = {"ours": lambda: ours(x, plan), "ours_graph": lambda: graphed(ours(x, plan))}
    if compile_:
        makers["ours_compiled"] = lambda: compiled(x)
    if dynamic:
        makers["ours_dynamic"] = lambda: compiled(x, dynamic=True)
    makers.update({name: lambda backend=backend: sdpa(x, backend) for name, backend in SDPA_BACKENDS.items()})
    if tuned is not None:
        best = _plan(tuned)
        makers["ours_best"] = lambda: ours(x, best, tuned["segments"])
        row["best_plan"] = tuned["plan"] | {"segments": tuned["segments"], "variant": tuned["variant"]}
        row["breakdown"] = breakdown(x, best, tuned["segments"])
    if competitors:
        makers.update(manifest=lambda: manifest(x), fla=lambda: fla(x))
    timed_columns(row, makers, f"T={T} {'gated' if gated else 'ungated'} ")
    if row.get("sdpa_default"):
        row["sdpa_default_kernel"] = busiest_kernel(sdpa(x, None))
    timings = [(row.get("ours"), plan), (row.get("ours_graph"), plan)]
    if tuned is not None:
        timings.append((row.get("ours_best"), _plan(tuned)))
    measured = [(t, p) for t, p in timings if t]
    if measured:
        fastest, fastest_plan = min(measured, key=lambda tp: tp[0])
        row["executed_tflops"] = executed_flops(T, fastest_plan, gated, choice.kernel) / (fastest * 1e-3) / 1e12
        row["fraction_of_matmul"] = row["executed_tflops"] / ceilings["matmul_bf16_tflops"]
    return row


# The odd-length bar (issue 5): T=65529 within 3% of T=65536. Their rows are timed minutes apart, and the card's clock
# drifts by as much between rows (forward_notes, session 74), so the two are timed again in turns at the end of a run
# that has both.
ODD_LENGTH_PAIR = (65536, 65529)
ODD_LENGTH_ROUNDS = 5


def timed_columns(row: dict, makers: dict[str, Callable[[], Callable[[], object]]], label: str) -> None:
    """Time a row's columns in turns (``timed_in_turns``) into ``row``: each column's median of its rounds under its
    name, ``rounds_ms`` (per column, its rounds' medians in order), ``errors`` and ``seconds`` (per column, making
    included: to plan a run)."""
    samples, errors, seconds = timed_in_turns(makers, label=label)
    row["errors"].update(errors)
    row["rounds_ms"] = samples
    row["seconds"] = {name: round(t, 1) for name, t in seconds.items()}
    for name, values in samples.items():
        row[name] = statistics.median(values) if values else None


def odd_length_check(spec: hardware.GpuSpec, gated: bool, rounds: int = ODD_LENGTH_ROUNDS) -> dict:
    """The eager "ours" (the planner's Plan) at both lengths of ``ODD_LENGTH_PAIR``, timed in turns
    (``timed_in_turns``): per length the median of its rounds, the odd length's over the even one's (``ratio``), and
    the rounds."""
    makers = {}
    for T in ODD_LENGTH_PAIR:
        plan = row_plan(spec, T, gated)
        makers[T] = lambda T=T, plan=plan: ours(inputs(T, gated), plan)
    samples, errors, _ = timed_in_turns(makers, rounds, label=f"odd length {'gated' if gated else 'ungated'} T=")
    if errors:
        return {"gated": gated, "ms": {}, "ratio": float("nan"), "errors": errors}
    ms = {T: statistics.median(values) for T, values in samples.items()}
    even, odd = ODD_LENGTH_PAIR
    return {"gated": gated, "ms": ms, "ratio": ms[odd] / ms[even], "rounds_ms": samples}


def eager_overhead_profile(T: int = 2048, calls: int = 300) -> str:
    """cProfile of eager calls (the planner's Plan, ungated): where the host time goes."""
    import cProfile
    import io
    import pstats

    x = inputs(T, False)
    plan = row_plan(hardware.detect(), T, False)
    run = ours(x, plan)
    run()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(15)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--T", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--tune", type=int, default=65536, help="length at which to tune (0: none), gated")
    for option, default, timed in (
        ("--competitors", COMPETITOR_LENGTHS, "Manifest's retention and fla, where importable"),
        ("--compiled", COMPILED_LENGTHS, "torch.compile"),
        ("--dynamic", DYNAMIC_LENGTHS, "torch.compile with dynamic lengths"),
    ):
        parser.add_argument(
            option,
            type=int,
            nargs="*",
            default=list(default),
            help=f"lengths at which to time {timed} (default %(default)s; the flag alone, with no lengths: none)",
        )
    parser.add_argument("--commit", default=None)
    parser.add_argument("--jobs", type=int, default=12, help="processes compiling the kernels beforehand")
    args = parser.parse_args()
    spec = hardware.detect()
    base, record = result_header("forward", args.out, args.commit)
    record["ceilings"] = {"matmul_bf16_tflops": matmul_tflops(), "copy_gbs": copy_gbs()}
    record["rows"] = []
    ceilings = record["ceilings"]
    print(f"ceilings: bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbs']:.0f} GB/s")
    if note := untimed_competitors(record["versions"], args.competitors, args.T):
        print(note)
    record["warm_errors"] = [e for e in warm.warm(warm_tasks(spec, args), args.jobs) if e]
    print(eager_overhead_profile(), flush=True)
    tuned = None
    if args.tune:
        x = inputs(args.tune, True)
        plan = row_plan(spec, args.tune, True)
        record["tuning"] = entries = tune(x, args.tune, True, plan)
        tuned = entries[0]
        _set_variant({**DEFAULTS, **tuned["variant"]})
        record["variant"] = tuned["variant"]
        del x
        for entry in entries:
            kernels = {k: round(v, 3) for k, v in entry["kernels"].items() if "kernel" in k and v > 0.005}
            print(f"tune T={args.tune}: {_fmt(entry['ms'])} ms {entry['variant']} C={entry['plan']['chunk_size']} "
                  f"stages={entry['plan']['num_stages']} segments={entry['segments']} {kernels} {entry['error'] or ''}",
                  flush=True)  # fmt: skip

    def measure_row(T: int, gated: bool) -> dict:
        tuned_here = tuned if args.tune == T else None
        return measure(
            T, gated, spec, ceilings, tuned_here, T in args.competitors, T in args.compiled, T in args.dynamic
        )

    record_rows(record, base, args.T, measure_row, _line, plot, first=BAR_LENGTHS)
    if all(T in args.T for T in ODD_LENGTH_PAIR):
        record["odd_length"] = [odd_length_check(spec, gated) for gated in (False, True)]
        base.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
        for check in record["odd_length"]:
            print(f"odd length, {'gated' if check['gated'] else 'ungated'}, in turns: "
                  f"{' '.join(f'T={T} {ms:.3f} ms' for T, ms in check['ms'].items())}, "
                  f"ratio {check['ratio']:.3f}", flush=True)  # fmt: skip
    print(f"\n{_header()}")
    for row in sorted(record["rows"], key=lambda r: (r["gated"], r["T"])):
        print(_line(row))
    print(f"wrote {base}.json/.png")


def warm_tasks(spec: hardware.GpuSpec, args: argparse.Namespace) -> list[dict]:
    """Every forward the run times first (tuning variants, the planner's plan per row), for ``warm.warm``."""
    tasks = []
    if args.tune:
        for chunk in TUNE_CHUNKS:
            for constants, warps, stages in TUNE_RUNS:
                plan = planning.Plan(chunk_size=chunk, block_t=128, block_e=64, num_stages=stages)
                tasks.append({"T": args.tune, "d": D, "gated": True, "plan": asdict(plan),
                              "constants": {**constants, "CHUNK_QUERY_WARPS": warps}})  # fmt: skip
    for gated in (False, True):
        for T in args.T:
            plan = row_plan(spec, T, gated)
            tasks.append({"T": T, "d": D, "gated": gated, "plan": {**asdict(plan), "reason": ""}})
    return tasks


def _header() -> str:
    cols = ("T", "gate", "ours", "graph", "compiled", "dynamic", "best", "sdpa", "sdpa dflt", "manifest", "fla")
    cols += ("TFLOP/s", "of mm", "plan (C/bt/warps)")
    return " ".join(f"{c:>9}" for c in cols)


def _fmt(v: float | None) -> str:
    return f"{v:9.3f}" if v is not None else f"{'-':>9}"


def _line(row: dict) -> str:
    p = row.get("best_plan") or row["plan"]
    plan = f"{p['chunk_size']}/{p['block_t']}/{p['num_warps']}" + (f"/s{p['segments']}" if p.get("segments") else "")
    cells = [f"{row['T']:>9}", f"{'yes' if row['gated'] else 'no':>9}"]
    cells += [_fmt(row.get(m)) for m in TIMED_COLUMNS]
    cells += [_fmt(row.get("executed_tflops")), _fmt(row.get("fraction_of_matmul")), f"{plan:>9}"]
    return " ".join(cells)


if __name__ == "__main__":
    main()
