"""Host time of one ``triton_forward`` call: the Python work and launches around the kernels.

At short context the eager forward is host-bound on the H200 (T=2048: 0.088 ms eager against 0.031 ms replayed from
a CUDA graph at 448e8ac), so the time the launcher spends before its launches is part of what a user waits for.

``--device cpu`` (default): the launches are captured instead of run (``forward._launch`` replaced, as
``tests/test_kernel_resources.py`` does), the shared-memory fitting is skipped (it needs a GPU and is cached per shape
there), and the inputs are CPU tensors: what remains is the shape-class lookup, the planning of buffers and
arguments, and the allocations. Triton's own launcher is not included. At long T the CPU allocations of the big
buffers (torch.empty) take a large and variable share that a GPU's caching allocator does not: repeated processes at
one commit read 91-150 us at T=65536, so compare the Python work there with a profiler (cProfile), not this number.

``--device cuda``: real calls on the GPU as the op's eager body makes them (``wrap_triton`` disabled), the host time
per call measured until the last of ``--calls`` calls returns (the GPU's queue takes them without waiting), and the
wall time per call until the GPU is done. Rows: ``replayed`` (repeated calls repeat the first call's launches,
``forward.ForwardReplay``; the chunked path with the Triton state kernel), ``planned`` (``replays.MAX_KEPT = 0``:
every call planned and bound by Triton), ``op`` (the public eager ``power_retention`` under ``torch.no_grad``,
replays kept, the state kernel ``codegen="auto"`` picks), ``compiled`` (that call compiled by ``torch.compile``,
fullgraph, as a compiled model's inference runs it: on the CUDA state kernel's route the forward is one custom op,
``ops.power_retention_inference``), ``compiled_two_ops`` (the same with ``ops.TRACED_INFERENCE_IN_ONE_OP`` off: the
gate's cumsum, then the state and query kernels' custom ops) and SDPA's flash call for the same shape.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, y stored in bf16 (a forward no backward follows), the H200's plan;
T in ``--T``, ungated and gated. Median of ``--repeats`` batches of ``--calls`` calls.

    python benchmarks/bench_host.py [--device cpu|cuda] [--T 2048 65536] [--calls 500] [--repeats 7] [--out DIR]
        [--commit SHA]

Writes ``host_<cpu>_<date>_<commit>.json`` (``host_<gpu>_...`` with ``--device cuda``) under ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import command_line, git_commit

from retention_compile import hardware, planning
from retention_compile.codegen import forward, replays
from retention_compile.ops import power_retention

B, H, D = 1, 8, 64
LAUNCHES: list[object] = []  # the kernels ``forward._launch`` was asked to launch (captured, not run)


def call_inputs(T: int, gated: bool, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, T, D) bf16 and, ``gated``, a log-gate (B, H, T) float32 (else None) on ``device``."""
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16, device=device) for _ in range(3))
    return q, k, v, -torch.rand(B, H, T, device=device) if gated else None


def forward_call(T: int, gated: bool, device: str) -> Callable[[], None]:
    """One eager ``triton_forward`` call as the op's body makes it (``wrap_triton`` disabled)."""
    from torch._library.triton import set_wrap_triton_enabled

    spec = hardware.KNOWN["H200"] if device == "cpu" else hardware.detect()
    plan = planning.plan(spec, T=T, d=D, e=D, deg=2, dtype=torch.bfloat16, gated=gated, batch_heads=H)
    q, k, v, gate = call_inputs(T, gated, device)
    options = dict(scale=D**-0.5, deg=2, log_gate=gate, causal=True, valid=None, plan=plan, y_dtype=torch.bfloat16)

    def call() -> None:
        with set_wrap_triton_enabled(False):
            forward.triton_forward(q, k, v, **options)

    return call


def op_call(T: int, gated: bool) -> Callable[[], None]:
    """The public eager entry ``power_retention`` (under ``torch.no_grad``: nothing kept for a backward), which
    checks its inputs, plans, picks the state kernel and dispatches the op around ``triton_forward``."""
    q, k, v, gate = call_inputs(T, gated)

    def call() -> None:
        with torch.no_grad():
            power_retention(q, k, v, log_gate=gate, causal=True)

    return call


# The two compiled variants' sources: Dynamo keeps its graphs per code object (with the same guards for both), so
# one function compiled twice would run whichever graph it compiled last in both rows.
def _attention_one_op(q, k, v, gate):
    return power_retention(q, k, v, log_gate=gate, causal=True)


def _attention_two_ops(q, k, v, gate):
    return power_retention(q, k, v, log_gate=gate, causal=True)


def compiled_call(T: int, gated: bool, one_op: bool) -> Callable[[], None]:
    """``power_retention`` compiled by ``torch.compile`` (fullgraph, under ``torch.no_grad``), its forward traced as one
    custom op (``one_op``: ``ops.TRACED_INFERENCE_IN_ONE_OP``) or, on the CUDA state kernel's route, as the gate's
    cumsum and the state and query kernels' custom ops. Compiled here, with Inductor's caches off (they key Dynamo's
    graph, the same for both)."""
    from retention_compile import ops

    q, k, v, gate = call_inputs(T, gated)
    fn = torch.compile(_attention_one_op if one_op else _attention_two_ops, fullgraph=True)
    before = ops.TRACED_INFERENCE_IN_ONE_OP
    ops.TRACED_INFERENCE_IN_ONE_OP = one_op
    try:
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            fn(q, k, v, gate)
    finally:
        ops.TRACED_INFERENCE_IN_ONE_OP = before

    def call() -> None:
        with torch.no_grad():
            fn(q, k, v, gate)

    return call


def sdpa_call(T: int) -> Callable[[], None]:
    """SDPA's flash forward for the same shape."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16, device="cuda") for _ in range(3))

    def call() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return call


def keep_replays(on: bool) -> None:
    """Quadratic calls kept for the calls after them (``on``), or every call planned."""
    replays.MAX_KEPT = 256 if on else 0
    replays.clear()


def interleaved(variants: dict[str, tuple[Callable[[], None], Callable[[], None]]], calls: int, repeats: int) -> dict:
    """Host and wall microseconds per call of each variant (``(setup, call)``), batches of ``calls`` taken in turn
    (the device's host is noisy: a variant timed after another sees the same drift): median and minimum over
    ``repeats`` batches each, after warm-up calls."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    host: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (setup, call) in variants.items():
            setup()
            for _ in range(3):
                call()  # renders, compiles and keeps what later calls reuse
            synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            host[name].append(1e6 * (time.perf_counter() - start) / calls)
            synchronize()
            wall[name].append(1e6 * (time.perf_counter() - start) / calls)
    return {
        name: {"host_us_per_call": statistics.median(host[name]), "host_us_min": min(host[name]),
               "wall_us_per_call": statistics.median(wall[name]), "wall_us_min": min(wall[name])}
        for name in variants
    }  # fmt: skip


def launches_per_call(call: Callable[[], None]) -> int:
    """Kernel launches of one call (captured: ``--device cpu``)."""
    LAUNCHES.clear()
    call()
    return len(LAUNCHES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 65536])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        forward._launch = lambda kernel, *rest, **options: LAUNCHES.append(kernel)
        forward.device_shared_memory_limit = lambda device: None
    rows = []
    for T in args.T:
        for gated in (False, True):
            call = forward_call(T, gated, args.device)
            if args.device == "cpu":
                variants = {"planned": (lambda: None, call)}
            else:  # the same call with and without kept replays, beside SDPA
                variants = {"replayed": (lambda: keep_replays(True), call),
                            "planned": (lambda: keep_replays(False), call),
                            "op": (lambda: keep_replays(True), op_call(T, gated)),
                            "compiled": (lambda: keep_replays(True), compiled_call(T, gated, True)),
                            "compiled_two_ops": (lambda: keep_replays(True), compiled_call(T, gated, False)),
                            "sdpa": (lambda: None, sdpa_call(T))}  # fmt: skip
            for variant, times in interleaved(variants, args.calls, args.repeats).items():
                launches = launches_per_call(call) if args.device == "cpu" else None
                rows.append({"T": T, "gated": gated, "variant": variant, **times, "launches_per_call": launches})
                print(f"T={T:6d} gated={gated!s:5} {variant:16}: host {times['host_us_per_call']:6.1f} us "
                      f"(min {times['host_us_min']:6.1f}), wall {times['wall_us_per_call']:6.1f} us per call",
                      flush=True)  # fmt: skip
    keep_replays(True)
    result = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine() or "cpu"
    path = out / f"host_{machine.replace(' ', '-')}_{result['date']}_{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
