"""The generated CUDA decode step on a GPU: 1000 chained steps against the float64 oracle, one step against the
plain-PyTorch step for every launch shape, and replay inside a CUDA graph."""

import pytest
import torch

from retention_compile.decode import (
    DecodeKernelConfig,
    cuda_unsupported_reason,
    decode_step,
    decode_step_cuda,
    decode_step_torch,
    init_state,
)
from retention_compile.reference import power_retention_reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _problem(B, Hk, group, T, d, e, dtype, gated, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, Hk * group, T, d, generator=g, device=DEVICE).to(dtype)
    k = torch.randn(B, Hk, T, d, generator=g, device=DEVICE).to(dtype)
    v = torch.randn(B, Hk, T, e, generator=g, device=DEVICE).to(dtype)
    gate = None
    if gated:
        gate = -0.05 * torch.rand(B, Hk, T, generator=g, device=DEVICE)
        gate[:, 0] = 0.0  # one head never decays: the longest accumulation
    return q, k, v, gate


def _poison_allocator() -> None:
    """Fill freed allocator memory with NaN, so an output element the kernel forgets to write shows up."""
    torch.empty(1 << 24, device=DEVICE).fill_(float("nan"))


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_1000_chained_steps_match_oracle(d: int, group: int, gated: bool, dtype: torch.dtype) -> None:
    B, Hk, prefix, steps = 2, 2, 24, 1000
    T = prefix + steps
    q, k, v, gate = _problem(B, Hk, group, T, d, d, dtype, gated, seed=d + group)
    state, norm = init_state(
        k[:, :, :prefix], v[:, :, :prefix], deg=2, log_gate=None if gate is None else gate[..., :prefix]
    )
    one = slice(prefix, prefix + 1)
    step_gate = None if gate is None else gate[..., one]
    assert cuda_unsupported_reason(q[:, :, one], k[:, :, one], v[:, :, one], state, norm, 2, step_gate) is None
    ys = []
    for t in range(prefix, T):
        one = slice(t, t + 1)
        step_gate = None if gate is None else gate[..., one]
        ys.append(decode_step(q[:, :, one], k[:, :, one], v[:, :, one], state, norm, deg=2, log_gate=step_gate))
    y = torch.cat(ys, dim=2).double()
    ref = power_retention_reference(
        q.double(), k.double(), v.double(), deg=2, log_gate=None if gate is None else gate.double()
    )[:, :, prefix:]
    per_step = (y - ref).square().sum(dim=(0, 1, 3)).sqrt() / ref.square().sum(dim=(0, 1, 3)).sqrt()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.isfinite(y).all()
    assert per_step.max().item() < tol, f"worst step {per_step.argmax().item()}: {per_step.max().item():.2e}"
    assert per_step[-100:].max().item() < tol  # no drift at the end of the chain
    full_state, full_norm = init_state(k.double(), v.double(), deg=2, log_gate=None if gate is None else gate.double())
    assert _rel(state, full_state) < 1e-5
    assert _rel(norm, full_norm) < 1e-5


@pytest.mark.parametrize(
    ("d", "e", "deg", "group", "dtype", "config"),
    [
        (64, 64, 2, 1, torch.float32, DecodeKernelConfig(64, 2, pipeline=False)),
        (64, 64, 2, 3, torch.float16, DecodeKernelConfig(128, 8)),
        (128, 128, 2, 12, torch.bfloat16, DecodeKernelConfig(256, 4)),
        (128, 128, 2, 12, torch.float32, DecodeKernelConfig(544, 4)),
        (128, 128, 2, 12, torch.bfloat16, DecodeKernelConfig(256, 8, pipeline=False)),
        (128, 128, 2, 1, torch.bfloat16, DecodeKernelConfig(1056, 4)),
        (128, 32, 2, 2, torch.float32, DecodeKernelConfig(128, 4)),
        (16, 32, 4, 2, torch.float32, DecodeKernelConfig(128, 4, pipeline=False)),
    ],
)
def test_one_step_matches_torch(d, e, deg, group, dtype, config) -> None:
    """Random (non-zero) state, every launch shape: the kernel equals the PyTorch step; every output written."""
    B, Hk = 3, 2
    q, k, v, gate = _problem(B, Hk, group, 1, d, e, dtype, gated=True, seed=11)
    state0, norm0 = init_state(*_problem(B, Hk, 1, 9, d, e, torch.float32, gated=False, seed=12)[1:3], deg=deg)
    state, norm = state0.clone(), norm0.clone()
    _poison_allocator()
    y = decode_step_cuda(q, k, v, state, norm, scale=0.1, deg=deg, log_gate=gate, config=config)
    ref_state, ref_norm = state0.double(), norm0.double()
    ref = decode_step_torch(q.double(), k.double(), v.double(), ref_state, ref_norm, scale=0.1, deg=deg, log_gate=gate)
    torch.cuda.synchronize()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _rel(y, ref) < (1e-2 if dtype != torch.float32 else 1e-5)
    assert _rel(state, ref_state) < 1e-6
    assert _rel(norm, ref_norm) < 1e-6


def test_replays_inside_a_cuda_graph() -> None:
    """The driver-API launches land on PyTorch's current stream, so a graph capture records them."""
    q, k, v, gate = _problem(2, 2, 4, 1, 64, 64, torch.bfloat16, gated=True, seed=21)
    state, norm = init_state(*_problem(2, 2, 1, 5, 64, 64, torch.float32, gated=False, seed=22)[1:3], deg=2)
    ref_state, ref_norm = state.clone(), norm.clone()
    decode_step(q, k, v, state, norm, log_gate=gate)  # compile and load outside the capture
    decode_step_torch(q, k, v, ref_state, ref_norm, scale=64**-0.5, deg=2, log_gate=gate)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = decode_step(q, k, v, state, norm, log_gate=gate)
    for _ in range(3):
        graph.replay()
        ref = decode_step_torch(q, k, v, ref_state, ref_norm, scale=64**-0.5, deg=2, log_gate=gate)
    torch.cuda.synchronize()
    assert _rel(y, ref) < 1e-2
    assert _rel(state, ref_state) < 1e-5


def test_eager_step_launches_directly_as_the_op_would() -> None:
    """A plain eager step skips the op's dispatch: y, state and norm bitwise the op's, and the state's and
    normaliser's version counters moved, as the op's in-place-or-view layer moves them (autograd sees the update)."""
    q, k, v, gate = _problem(2, 2, 4, 1, 64, 64, torch.bfloat16, gated=True, seed=31)
    state, norm = init_state(*_problem(2, 2, 1, 7, 64, 64, torch.float32, gated=False, seed=32)[1:3], deg=2)
    op_state, op_norm = state.clone(), norm.clone()
    versions = state._version, norm._version
    y = decode_step(q, k, v, state, norm, log_gate=gate)
    assert state._version > versions[0] and norm._version > versions[1]
    y_op = torch.ops.retention_compile.decode_step(q, k, v, op_state, op_norm, 64**-0.5, 2, gate)
    torch.cuda.synchronize()
    assert torch.equal(y, y_op) and torch.equal(state, op_state) and torch.equal(norm, op_norm)
    with torch.inference_mode():  # inference tensors have no version counter to move
        state_inf, norm_inf = state.clone(), norm.clone()
        y_inf = decode_step(q, k, v, state_inf, norm_inf, log_gate=gate)
    decode_step(q, k, v, op_state, op_norm, log_gate=gate)
    torch.cuda.synchronize()
    assert torch.equal(state_inf, op_state) and torch.isfinite(y_inf).all()
