"""The CUDA chunk-state kernel against the Triton one, kernel for kernel and in the whole forward.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T in {16384, 65536}, gated and ungated, the op's own plan.

    state kernel   both kernels launched on the same captured arguments (the Triton forward's, default segments):
                   ``LAUNCHES`` back-to-back launches between two CUDA events, median over ``ROUNDS`` rounds,
                   divided by ``LAUNCHES``; the Triton kernel launched directly (``kernel[grid](...)``), the CUDA
                   one through its op (``torch.ops.retention_compile.cuda_chunk_states``, host work included)
    variants       at T=65536 the CUDA kernel's launch shapes (``StateKernelConfig``) and segment counts: the
                   kernel alone, and ``triton_forward`` with it and its scan (the scan's work grows with the
                   segments; ``forward.STATE_WAVES`` was tuned for the Triton kernel; the wgmma kernel with
                   ``wgmma_fold`` does the scan's work itself, and no scan runs), median of CUDA-event times
    forward        ``power_retention`` op with ``impl="triton"`` and ``impl="cuda"``, median of CUDA-event times
    agreement      ||y_cuda - y_triton|| / ||y_triton||

Work of the state kernel (tiled state, Dt = 2560 features for d=64): 2 * T * h * Dt * (e + 1) FLOP (the state
and the normaliser), reported as TFLOP/s.

    python benchmarks/bench_cuda_state.py [--out DIR] [--commit SHA]

Writes ``cuda_state_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch
import triton
from provenance import command_line, git_commit

from retention_compile.codegen import cuda_state, forward, nvrtc
from retention_compile.codegen.choice import median_ms
from retention_compile.codegen.cuda_state import StateKernelConfig, chunk_states
from retention_compile.codegen.triton_source import load_forward
from retention_compile.ops import power_retention_op, resolve_plan

B, H, D = 1, 8, 64
LENGTHS = (16384, 65536)
LAUNCHES, ROUNDS, REPS = 10, 5, 15
# mma.sync: (warps, keys per step, unrolled 16-key steps, programs per SM the registers are capped for, copy stages).
# The run at 00b2a3a timed 64 or 128 keys, 2 or 3 stages: within 2% of each other (the default is 128 keys, 2
# stages). wgmma (Hopper): registers capped for 1 or 2 programs per SM, 1, 2 or 4 k16 slices in flight (a divisor
# of the step's 4: the fragment sets rotate by slice).
VARIANTS = (
    StateKernelConfig(8, 128, 4, 2, 2),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=2, wgmma_in_flight=2),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=2, wgmma_in_flight=1),
    StateKernelConfig(wgmma=True, wgmma_min_blocks=1, wgmma_in_flight=4),
)
SEGMENTS = (4, 13)
# Segment counts for the whole forward with the CUDA state kernel (64 chunks at T=65536 chunk 1024: 8 is the default
# of STATE_WAVES for 80 programs per segment on 132 SMs; 11 -> 11 segments of 6 chunks, 13 of 5, 16 of 4, 22 of 3)
FORWARD_SEGMENTS = (4, 8, 11, 13, 16, 22)


def inputs(T: int, gated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random bf16 q, k, v (B, H, T, D) and, where ``gated``, a random log-gate (B, H, T)."""
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gate = -0.02 * torch.rand(B, H, T, device="cuda") if gated else None
    return q, k, v, gate


def _capture(q, k, v, gate, plan, segments=None) -> tuple:
    """The Triton forward's state-kernel arguments (spec, args) for these inputs."""
    seen = {}

    def hook(spec, args):
        seen.update(spec=spec, args=dict(args))
        return chunk_states(spec, args)

    forward.triton_forward(
        q, k, v, scale=D**-0.5, deg=2, log_gate=gate, causal=True, valid=None, plan=plan, segments=segments,
        state_kernel=hook,
    )  # fmt: skip
    return seen["spec"], seen["args"]


def _triton_state(spec, args):
    module, _ = load_forward(spec)
    params = spec.template_params()
    grid = (args["n_seg"], params["npairs"] * params["n_eb"], args["K"].shape[0] * args["state_heads"])
    kernel = module.state_kernel
    stages = getattr(forward, "STATE_STAGES", 2)
    return lambda: kernel[grid](**args, num_warps=forward.STATE_WARPS, num_stages=stages)


def _cuda_state(spec, args):
    names = ("Hq", "group", "state_heads", "Tk", "shift", "n_chunks", "chunks_per_seg", "n_seg")
    sizes = [args[n] for n in names]
    op = torch.ops.retention_compile.cuda_chunk_states
    return lambda: op(args["K"], args["V"], args.get("G"), args.get("VALID"), sizes, spec.chunk_size, spec.causal)


def _state_tflops(T: int, ms: float) -> float:
    flop = 2 * T * H * 2560 * (D + 1)  # S (2560 x e) and the normaliser's 2560 entries
    return flop / (ms * 1e-3) / 1e12


def run_case(T: int, gated: bool) -> dict:
    q, k, v, gate = inputs(T, gated)
    plan = resolve_plan(q, k, v, 2, gated, 0)
    spec, args = _capture(q, k, v, gate, plan)
    out: dict = {"T": T, "gated": gated, "plan": dataclasses.asdict(plan), "n_seg": int(args["n_seg"])}
    out["state_ms"] = {
        "triton": median_ms(_triton_state(spec, args), ROUNDS, LAUNCHES),
        "cuda": median_ms(_cuda_state(spec, args), ROUNDS, LAUNCHES),
    }
    out["state_tflops"] = {name: _state_tflops(T, ms) for name, ms in out["state_ms"].items()}
    if max(LENGTHS) == T:
        default = cuda_state.CONFIG
        variants = {}
        for config in VARIANTS:
            cuda_state.CONFIG = config
            try:
                variants[str(dataclasses.astuple(config))] = median_ms(_cuda_state(spec, args), ROUNDS, LAUNCHES)
            except Exception as error:  # a launch shape that does not fit is recorded, not fatal
                variants[str(dataclasses.astuple(config))] = f"failed: {error}"[:300]
        cuda_state.CONFIG = default
        out["cuda_config_ms"] = variants
        segs = {}
        for n in SEGMENTS:
            seg_spec, seg_args = _capture(q, k, v, gate, plan, segments=n)
            segs[str(int(seg_args["n_seg"]))] = median_ms(_cuda_state(seg_spec, seg_args), ROUNDS, LAUNCHES)
        out["cuda_segments_ms"] = segs
        options = {"scale": D**-0.5, "deg": 2, "log_gate": gate, "causal": True, "valid": None, "plan": plan}
        out["forward_segments_ms"] = {
            str(n): median_ms(
                lambda n=n: forward.triton_forward(q, k, v, **options, segments=n, state_kernel=chunk_states), REPS
            )
            for n in FORWARD_SEGMENTS
        }
    scale = D**-0.5

    def op(impl: str):
        return lambda: power_retention_op(q, k, v, gate, None, scale, 2, True, 0, impl)

    out["forward_ms"] = {impl: median_ms(op(impl), REPS) for impl in ("triton", "cuda")}
    y_t, y_c = op("triton")()[0].double(), op("cuda")()[0].double()
    out["y_rel_diff"] = ((y_c - y_t).norm() / y_t.norm()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    result = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.date.today().isoformat(),
        "gpu": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_driver": nvrtc.driver_version(),
        "compiler": nvrtc.compiler_id(),
        "python": platform.python_version(),
        "shape": {"B": B, "H": H, "d": D, "e": D, "deg": 2, "dtype": "bfloat16", "causal": True},
        "cuda_config": dataclasses.asdict(cuda_state.CONFIG),
        "cases": [],
    }
    for T in LENGTHS:
        for gated in (False, True):
            case = run_case(T, gated)
            result["cases"].append(case)
            s, f = case["state_ms"], case["forward_ms"]
            print(
                f"T={T:6d} gated={gated!s:5}  state: triton {s['triton']:.3f} ms  cuda {s['cuda']:.3f} ms "
                f"({s['triton'] / s['cuda']:.2f}x)  forward: triton {f['triton']:.3f}  cuda {f['cuda']:.3f}  "
                f"|dy|={case['y_rel_diff']:.1e}",
                flush=True,
            )
            if "cuda_config_ms" in case:
                print("   configs:", case["cuda_config_ms"], " segments:", case["cuda_segments_ms"], flush=True)
                print("   forward by segments:", case["forward_segments_ms"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "-")
    path = out / f"cuda_state_{slug}_{result['date']}_{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
