"""The CUDA query kernel (``codegen/cuda_query.py``) beside the Triton query kernel, on the same chunk states.

For each length and gate setting (b1 h8 d64 bf16 causal, ``bench_forward.inputs``, the planner's Plan and the state
kernel the op picks) one eager forward runs with its query launch captured; then, on those arguments (the states the
state kernel left), the Triton query kernel is launched again and the CUDA kernel into fresh outputs. Printed and
recorded: y and denom of the CUDA kernel against the Triton kernel's (max abs, relative norm), both against the
float64 oracle at ``--check-lengths`` (chunks of 1024 forced), and per length each query kernel's time
(``triton.testing.do_bench`` medians, alternated ``--rounds`` times) with the whole forward's (the Triton route) and
the forward it implies with the CUDA query kernel (forward - Triton query + CUDA query), and the whole forward on the
CUDA route: beside the state kernel (``forward.QUERY_BESIDE_STATES``, the default), after it, and with each
``--configs`` launch.

    python benchmarks/bench_cuda_query.py [--lengths 65536 16384] [--check-lengths 3000] [--rounds 3] [--commit REV]
        [--configs 2x4 2x3 1x6x4] [--chunks 0 512]

Writes ``benchmarks/results/cuda_query_<gpu>_<date>_<commit>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from datetime import date
from pathlib import Path

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_forward  # noqa: E402
from provenance import command_line, git_commit  # noqa: E402

from retention_compile import hardware, planning  # noqa: E402
from retention_compile.codegen import cuda_query, forward, replays  # noqa: E402
from retention_compile.codegen.cherries import feature_coordinates, query_coefficients  # noqa: E402
from retention_compile.reference import _weighted_powers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def cuda_query_route(on: bool):
    """Eager forwards take the CUDA query kernel (gated ones too) where ``on``, else the Triton one."""
    saved = forward.CUDA_QUERY, forward.CUDA_QUERY_GATED
    forward.CUDA_QUERY = forward.CUDA_QUERY_GATED = on
    try:
        yield
    finally:
        forward.CUDA_QUERY, forward.CUDA_QUERY_GATED = saved


@contextlib.contextmanager
def query_beside_states(on: bool):
    """The query kernel (either) launched beside the state kernel where ``on`` (``forward.QUERY_BESIDE_STATES``), else
    after it."""
    saved = forward.QUERY_BESIDE_STATES
    forward.QUERY_BESIDE_STATES = on
    try:
        yield
    finally:
        forward.QUERY_BESIDE_STATES = saved


def captured_query(run) -> dict:
    """Run ``run`` (an eager forward) once on the Triton query kernel with its launch recorded: ``forward._launch``'s
    arguments."""
    seen: dict = {}
    original = forward._launch

    def spy(kernel, grid, kwargs, num_warps, num_stages, maxnreg=None, kept=None, dependent=False):
        if getattr(kernel, "__name__", "") == "attention_kernel" or "attention_kernel" in repr(kernel):
            seen.update(
                kernel=kernel, grid=grid, kwargs=dict(kwargs), warps=num_warps, stages=num_stages, maxnreg=maxnreg
            )
        return original(kernel, grid, kwargs, num_warps, num_stages, maxnreg, kept, dependent)

    replays.clear()
    forward._launch = spy
    try:
        with cuda_query_route(False):
            run()
    finally:
        forward._launch = original
    torch.cuda.synchronize()
    if not seen:
        raise RuntimeError("the forward launched no attention_kernel")
    return seen


def relaunch_triton(seen: dict) -> None:
    """The captured query launch again, straight to Triton (as the op's eager body launches it)."""
    with set_wrap_triton_enabled(False):
        forward._launch(seen["kernel"], seen["grid"], seen["kwargs"], seen["warps"], seen["stages"], seen["maxnreg"])


def takes_the_cuda_route(run) -> bool:
    """Whether ``run`` (an eager forward, no call of it kept) launches the CUDA query kernel where it is on."""
    calls = []
    original = cuda_query.query_launch

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    replays.clear()
    cuda_query.query_launch = counted
    try:
        with cuda_query_route(True):
            run()
    finally:
        cuda_query.query_launch = original
    replays.clear()
    return bool(calls)


def cuda_outputs(seen: dict) -> dict:
    """The query arguments with fresh Y and DEN for the CUDA kernel."""
    kwargs = dict(seen["kwargs"])
    kwargs["Y"], kwargs["DEN"] = torch.empty_like(kwargs["Y"]), torch.empty_like(kwargs["DEN"])
    for name in ("SYNC", *cuda_query.COUNTS):  # the kernel alone, after the state kernel: no wait on the fold's counts
        kwargs.pop(name, None)
    return kwargs


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    return {
        "max_abs": float((got - want).abs().max()),
        "rel": float((got - want).norm() / want.norm()),
        "finite": bool(torch.isfinite(got).all()),
    }


def partial_references(kwargs: dict, chunk_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """y and denom of each term alone, in float64 from the call's own chunk states and G (the CUDA kernel's renders
    ``parts="state"`` and ``"keys"``): the chunk-state term exp(G_i - G_b) phi(q_i)^T S_c (denominator q_i^T M_c q_i)
    in the cherry layout, and the chunk's keys j <= i."""
    q, k, v = (kwargs[n].double() for n in ("Q", "K", "V"))
    B, H, T, d = q.shape
    s2 = float(kwargs["scale"]) ** 2
    xs, ys = feature_coordinates(d)
    coef = torch.tensor(query_coefficients(d), dtype=torch.float64, device=q.device)
    S = kwargs["S_ST"].double().reshape(B, H, -1, len(xs), v.shape[-1])
    M = kwargs["M_ST"].double().reshape(B, H, -1, d, d)
    G = kwargs["G"][..., :T].double() if "G" in kwargs else torch.zeros(B, H, T, dtype=torch.float64, device=q.device)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=q.device)

    out = {name: (zeros(B, H, T, v.shape[-1]), zeros(B, H, T)) for name in ("state", "keys")}
    for c, lo in enumerate(range(0, T, chunk_size)):
        hi = min(lo + chunk_size, T)
        qc, gc = q[:, :, lo:hi], G[:, :, lo:hi]
        decay = torch.exp(gc - (G[:, :, lo - 1 : lo] if lo else 0.0))
        phi = qc[..., xs] * qc[..., ys] * coef
        out["state"][0][:, :, lo:hi] = decay[..., None] * (phi @ S[:, :, c])
        out["state"][1][:, :, lo:hi] = decay * torch.einsum("zhta,zhac,zhtc->zht", qc, M[:, :, c], qc)
        w = (qc @ k[:, :, lo:hi].transpose(-1, -2)) ** 2 * torch.exp(gc[..., :, None] - gc[..., None, :])
        w = w * torch.ones(hi - lo, hi - lo, device=q.device).tril()
        out["keys"][0][:, :, lo:hi] = w @ v[:, :, lo:hi]
        out["keys"][1][:, :, lo:hi] = w.sum(-1)
    return {name: (num * s2 / (den * s2 + 1e-6)[..., None], den * s2 + 1e-6) for name, (num, den) in out.items()}


def check_against_oracle(T: int, gated: bool) -> dict:
    """Both query kernels at length T with chunks of 1024 against the float64 oracle (y, denom)."""
    x = bench_forward.inputs(T, gated)
    plan = planning.plan(hardware.detect(), T=T, d=64, e=64, deg=2, dtype=torch.bfloat16, gated=gated, batch_heads=8)
    plan = dataclasses.replace(plan, chunk_size=1024)
    seen = captured_query(bench_forward.ours(x, plan, codegen="cuda"))
    args = cuda_outputs(seen)
    why = cuda_query.query_unsupported_reason(args, plan.chunk_size)
    if why is not None:
        return {"T": T, "gated": gated, "skipped": why}
    cuda_query.launch_query(args, plan.chunk_size, packed=True)
    torch.cuda.synchronize()
    numerator, want_den = _weighted_powers(
        x["q"].double(), x["k"].double(), x["v"].double(), 1, 1e-6, scale=64**-0.5, deg=2,
        log_gate=None if x["gate"] is None else x["gate"].double(), causal=True, valid=None,
    )  # fmt: skip
    want_y, want_den = numerator / want_den, want_den.squeeze(-1)
    parts = {}
    for name, (part_y, part_den) in partial_references(seen["kwargs"], plan.chunk_size).items():
        part = cuda_outputs(seen)
        cuda_query.launch_query(part, plan.chunk_size, packed=True, parts=name)
        torch.cuda.synchronize()
        parts[name] = {"y": compare(part["Y"], part_y), "den": compare(part["DEN"], part_den)}
    return {
        "T": T,
        "gated": gated,
        "parts": parts,
        "triton_y": compare(seen["kwargs"]["Y"], want_y),
        "cuda_y": compare(args["Y"], want_y),
        "triton_den": compare(seen["kwargs"]["DEN"], want_den),
        "cuda_den": compare(args["DEN"], want_den),
    }


@contextlib.contextmanager
def launch_settings(config: str | None):
    """The CUDA query kernel's launch settings ``config`` = "<programs per SM>x<stages>[x<warpgroups>]" (registers
    capped for that many programs per SM, that many copy stages, 2 or 4 warpgroups per program: 2 where not given)
    while in the block; None: the module's defaults."""
    saved = cuda_query.MIN_BLOCKS, cuda_query.STAGES, cuda_query.WARPGROUPS
    if config is not None:
        blocks, stages, *rest = (int(n) for n in config.split("x"))
        cuda_query.MIN_BLOCKS, cuda_query.STAGES, cuda_query.WARPGROUPS = blocks, stages, rest[0] if rest else 2
    try:
        yield
    finally:
        cuda_query.MIN_BLOCKS, cuda_query.STAGES, cuda_query.WARPGROUPS = saved


def configured_launch(args: dict, chunk_size: int, config: str):
    """The CUDA query launch with ``config`` (``launch_settings``)."""
    with launch_settings(config):
        if (why := cuda_query.query_unsupported_reason(args, chunk_size)) is not None:
            raise ValueError(f"config {config}: {why}")
        return cuda_query.query_launch(args, chunk_size, True)


def measure(T: int, gated: bool, rounds: int, configs: list[str], chunk_size: int = 0) -> dict:
    """One length and gate setting with the planner's chunk (``chunk_size`` 0) or that chunk size."""
    x = bench_forward.inputs(T, gated)
    plan = planning.plan(
        hardware.detect(), T=T, d=64, e=64, deg=2, dtype=torch.bfloat16, gated=gated, batch_heads=8,
        chunk_size=chunk_size,
    )  # fmt: skip
    run = bench_forward.ours(x, plan, codegen="cuda")
    seen = captured_query(run)
    args = cuda_outputs(seen)
    row: dict = {"T": T, "gated": gated, "chunk_size": plan.chunk_size}
    why = cuda_query.query_unsupported_reason(args, plan.chunk_size)
    if why is not None:
        row["skipped"] = why
        return row
    cuda_query.launch_query(args, plan.chunk_size, packed=True)
    torch.cuda.synchronize()
    row["forward_takes_the_cuda_route"] = takes_the_cuda_route(run)
    row["y_vs_triton"] = compare(args["Y"], seen["kwargs"]["Y"])
    row["den_vs_triton"] = compare(args["DEN"], seen["kwargs"]["DEN"])
    times: dict[str, list[float]] = {"triton_query": [], "cuda_query": [], "forward": [], "forward_cuda_query": []}
    launch = cuda_query.query_launch(args, plan.chunk_size, True)

    def forward_with(cuda: bool, config: str | None = None, beside: bool = True) -> float:
        replays.clear()
        with cuda_query_route(cuda), launch_settings(config), query_beside_states(beside):
            return triton.testing.do_bench(run)

    variants = {config: configured_launch(args, plan.chunk_size, config) for config in configs}
    for name in variants:
        times[f"cuda_query_{name}"] = []
        times[f"forward_cuda_query_{name}"] = []
    times["forward_cuda_query_after"] = []
    for _ in range(rounds):
        times["triton_query"].append(triton.testing.do_bench(lambda: relaunch_triton(seen)))
        times["cuda_query"].append(triton.testing.do_bench(lambda: launch(args)))
        for name, variant in variants.items():
            times[f"cuda_query_{name}"].append(triton.testing.do_bench(lambda variant=variant: variant(args)))
        times["forward"].append(forward_with(False))
        times["forward_cuda_query"].append(forward_with(True))
        times["forward_cuda_query_after"].append(forward_with(True, beside=False))
        for name in variants:
            times[f"forward_cuda_query_{name}"].append(forward_with(True, name))
    row["ms"] = times
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    row["forward_with_cuda_query_ms"] = med["forward"] - med["triton_query"] + med["cuda_query"]
    print(
        f"T={T} gated={gated} chunk={plan.chunk_size}: triton query {med['triton_query']:.4f} ms, "
        f"cuda query {med['cuda_query']:.4f} ms, "
        f"forward {med['forward']:.4f}, with the cuda query kernel {med['forward_cuda_query']:.4f} (implied "
        f"{row['forward_with_cuda_query_ms']:.4f}); y vs triton {row['y_vs_triton']}; "
        + ", ".join(f"{name} {ms:.4f}" for name, ms in med.items() if "cuda_query_" in name),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 16384])
    parser.add_argument("--check-lengths", type=int, nargs="*", default=[3000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commit", default=None)
    parser.add_argument(
        "--chunks", type=int, nargs="*", default=[0], help="chunk sizes to time (0: the planner's), default 0"
    )
    parser.add_argument(
        "--configs", nargs="*", default=[],
        help="more CUDA launches timed, as 2x3 or 1x6x4: programs per SM x stages [x warpgroups, default 2]",
    )  # fmt: skip
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    commit = git_commit(args.commit)
    out = RESULTS / f"cuda_query_{gpu}_{date.today().isoformat()}_{commit}.json"
    record: dict = {"command": command_line(), "commit": commit, "gpu": gpu, "checks": [], "rows": []}

    def save() -> None:  # after every result: a run cut by a time limit keeps what it measured
        out.write_text(json.dumps(record, indent=1))

    for T in args.check_lengths:
        for gated in (False, True):
            record["checks"].append(check_against_oracle(T, gated))
            print("oracle", json.dumps(record["checks"][-1]), flush=True)
            save()
    for T in args.lengths:
        for chunk in args.chunks:
            for gated in (False, True):
                record["rows"].append(measure(T, gated, args.rounds, args.configs, chunk))
                save()
    print("wrote", out)


if __name__ == "__main__":
    main()
