"""Decode-step time and achieved state bandwidth of the generated CUDA kernel, against measured copy bandwidth.

Bytes counted per step (the floor): the fp32 state and normaliser read once and written once,
``2 * B * Hk * D * (e + 1) * 4``; the partial sums the two kernels exchange are extra traffic, not counted.
Time: CUDA-graph replays of one decode step per "layer", median over replays, with enough layers
(distinct states) that the states together exceed the L2 several times (a real decode touches a new layer's state
every step). Eager time (Python dispatch included) and the plain-PyTorch step are reported beside it.

``--host``: instead, the host time of one eager step at batch 1, where the kernels take a few microseconds and
the step is host-bound: the public ``decode_step`` (which launches the kernels itself for a plain eager call) beside
the ``decode_step`` op it then skips, host microseconds until ``--calls`` steps return and wall microseconds until
the GPU is done, medians of ``--repeats`` interleaved batches (``bench_host.interleaved``).

    python benchmarks/bench_decode.py [--out DIR] [--commit SHA] [--host [--calls 500] [--repeats 7]]

Writes ``decode_<gpu>_<date>.json`` (``decode_host_<gpu>_<date>_<commit>.json`` with ``--host``) under ``--out``
(default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform

import torch
from provenance import command_line, git_commit, origin, write_record

from retention_compile import hardware
from retention_compile.codegen import nvrtc
from retention_compile.codegen.choice import event_times_ms
from retention_compile.decode import (
    THREADS,
    DecodeKernelConfig,
    _plan,
    cuda_unsupported_reason,
    decode_kernels,
    decode_step,
    decode_step_cuda,
    decode_step_torch,
    default_config,
)
from retention_compile.power_features import state_dim

SHAPES = {  # name: (B, Hq, Hk, d)
    "b8_h8_d128": (8, 8, 8, 128),
    "powercoder_b8_q24_kv2_d128": (8, 24, 2, 128),
}
CONFIGS = [  # the first run's best shapes without the register double buffer, then with it, then larger slices
    *(DecodeKernelConfig(rows, unroll, pipeline=False) for rows, unroll in ((128, 4), (256, 2), (256, 8))),
    *(DecodeKernelConfig(rows, unroll) for rows in (128, 256) for unroll in (2, 4, 8)),
    *(DecodeKernelConfig(rows, unroll) for rows, unroll in ((352, 2), (544, 4), (832, 2), (1056, 4))),
]
HOST_SHAPES = {  # name: (B, Hq, Hk, d), batch 1
    "b1_h8_d64": (1, 8, 8, 64),
    "powercoder_b1_q24_kv2_d128": (1, 24, 2, 128),
}
MIN_STATE_BYTES = 256 << 20  # states per timed graph: > 4x the H200's 60 MB L2


def _events_median_ms(fn, reps: int) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of ``fn``'s device time over ``reps`` runs, each between two events."""
    times = event_times_ms(fn, reps)
    return times[len(times) // 2], times[len(times) // 10], times[(9 * len(times)) // 10]


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of ``nbytes``: (bytes read + bytes written) / median time."""
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    median, _, _ = _events_median_ms(lambda: dst.copy_(src), 30)
    return 2 * nbytes / (median * 1e-3) / 1e9


def _layers(B: int, Hq: int, Hk: int, d: int, count: int):
    """``count`` independent decode problems: random bf16 q/k/v, a gate, a random (non-zero) fp32 state."""
    D, e = state_dim(d, 2), d
    out = []
    for _ in range(count):
        q = torch.randn(B, Hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hk, 1, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hk, 1, e, device="cuda", dtype=torch.bfloat16)
        gate = -0.05 * torch.rand(B, Hk, 1, device="cuda")
        state = torch.rand(B, Hk, D, e, device="cuda")
        norm = torch.rand(B, Hk, D, device="cuda") + 1.0
        out.append((q, k, v, state, norm, gate))
    return out


def bench_shape(name: str, B: int, Hq: int, Hk: int, d: int, copy_gbs: float, reps: int) -> list[dict]:
    D, e = state_dim(d, 2), d
    floor_bytes = 2 * B * Hk * D * (e + 1) * 4
    layers = _layers(B, Hq, Hk, d, max(1, math.ceil(MIN_STATE_BYTES / floor_bytes * 2)))
    scale = d**-0.5
    rows = []
    default = default_config(Hq // Hk)
    sms = torch.cuda.get_device_properties().multi_processor_count
    for config in CONFIGS:
        if cuda_unsupported_reason(*layers[0][:5], 2, layers[0][5], config) is not None:
            continue
        planned = _plan(e, Hq // Hk, config)
        update, _ = decode_kernels(0, d, e, 2, Hq // Hk, torch.bfloat16, True, planned)
        blocks = B * Hk * -(-D // planned.rows)

        def step_all(config=config):
            for q, k, v, state, norm, gate in layers:
                decode_step_cuda(q, k, v, state, norm, scale=scale, deg=2, log_gate=gate, config=config)

        step_all()  # compile, load, warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_all()
        graph.replay()
        median, p10, p90 = _events_median_ms(graph.replay, reps)
        per_step_us = median * 1e3 / len(layers)
        eager_ms, _, _ = _events_median_ms(step_all, max(5, reps // 4))
        gbs = floor_bytes / (per_step_us * 1e-6) / 1e9
        rows.append(
            {
                "shape": name,
                "B": B,
                "Hq": Hq,
                "Hk": Hk,
                "d": d,
                "e": e,
                "D": D,
                "rows": config.rows,
                "unroll": config.unroll,
                "pipeline": config.pipeline,
                "default": config == default,
                "registers": update.num_regs,
                "blocks": blocks,
                "waves": blocks / (update.max_active_blocks(THREADS) * sms),
                "layers": len(layers),
                "state_bytes_per_step": floor_bytes,
                "graph_us_per_step": per_step_us,
                "graph_us_p10_p90": [p10 * 1e3 / len(layers), p90 * 1e3 / len(layers)],
                "eager_us_per_step": eager_ms * 1e3 / len(layers),
                "achieved_GBps": gbs,
                "fraction_of_copy": gbs / copy_gbs,
            }
        )
        del graph
    q, k, v, state, norm, gate = layers[0]
    torch_ms, _, _ = _events_median_ms(
        lambda: decode_step_torch(q, k, v, state, norm, scale=scale, deg=2, log_gate=gate), max(5, reps // 4)
    )
    for row in rows:
        row["torch_fallback_us_per_step"] = torch_ms * 1e3
    return rows


def _host_variants(B: int, Hq: int, Hk: int, d: int) -> dict:
    """``bench_host.interleaved``'s variants for one shape: the public step and the op, on one gated problem."""
    q, k, v, state, norm, gate = _layers(B, Hq, Hk, d, 1)[0]
    op = torch.ops.retention_compile.decode_step
    return {
        "decode_step": (lambda: None, lambda: decode_step(q, k, v, state, norm, log_gate=gate)),
        "op": (lambda: None, lambda: op(q, k, v, state, norm, d**-0.5, 2, gate)),
    }


def host_rows(calls: int, repeats: int) -> list[dict]:
    """Host and wall microseconds per eager step, gated, of the public ``decode_step`` and of the ``decode_step`` op
    it skips for plain eager calls, for each of ``HOST_SHAPES``."""
    from bench_host import interleaved

    rows = []
    for name, (B, Hq, Hk, d) in HOST_SHAPES.items():
        for variant, times in interleaved(_host_variants(B, Hq, Hk, d), calls, repeats).items():
            rows.append({"shape": name, "B": B, "Hq": Hq, "Hk": Hk, "d": d, "variant": variant, **times})
            host, wall = times["host_us_per_call"], times["wall_us_per_call"]
            print(f"{name:27} {variant:12}: host {host:6.1f} us, wall {wall:6.1f} us per step")
    return rows


def write_host_record(args: argparse.Namespace) -> None:
    """``--host``: ``host_rows`` as JSON beside the command, commit and versions."""
    commit = git_commit(args.commit)
    record = {**origin(commit), "gpu": torch.cuda.get_device_name(), "rows": host_rows(args.calls, args.repeats)}
    print(f"wrote {write_record(record, args.out, f'decode_host_{{gpu}}_{{date}}_{commit}.json')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None, help="commit of the code (where the tree has no .git)")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--host", action="store_true", help="time the host path of one eager step instead")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.host:
        write_host_record(args)
        return

    spec = hardware.detect()
    import cuda.bindings

    copy_gbs = copy_bandwidth_gbs()
    results = []
    for name, (B, Hq, Hk, d) in SHAPES.items():
        results += bench_shape(name, B, Hq, Hk, d, copy_gbs, args.reps)
    nv = nvrtc.nvrtc_version()
    record = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda_bindings": cuda.bindings.__version__,
            "nvrtc": None if nv is None else f"{nv[0]}.{nv[1]}",
            "compiler": nvrtc.compiler_id(),
            "driver": nvrtc.driver_version(),
        },
        "gpu": {
            "name": torch.cuda.get_device_name(),
            "compute_capability": list(torch.cuda.get_device_capability()),
            "sm_count": None if spec is None else spec.sm_count,
            "arch": nvrtc.gpu_arch(),
        },
        "copy_bandwidth_GBps": copy_gbs,
        "results": results,
    }
    path = write_record(record, args.out, "decode_{gpu}_{date}.json")

    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write); {record['gpu']}; {record['versions']}")
    print(
        f"{'shape':27} {'rows':>4} {'unr':>3} {'pipe':>5} {'regs':>4} {'waves':>5} "
        f"{'graph us':>9} {'eager us':>9} {'GB/s':>6} {'copy%':>6} {'torch us':>9}"
    )
    for r in results:
        mark = " *" if r["default"] else ""
        print(
            f"{r['shape'][:27]:27} {r['rows']:4d} {r['unroll']:3d} {r['pipeline']!s:>5} {r['registers']:4d} "
            f"{r['waves']:5.2f} {r['graph_us_per_step']:9.1f} "
            f"{r['eager_us_per_step']:9.1f} {r['achieved_GBps']:6.0f} {100 * r['fraction_of_copy']:5.1f}% "
            f"{r['torch_fallback_us_per_step']:9.1f}{mark}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
