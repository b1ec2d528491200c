"""``retention_compile::power_retention_inference``: the eager forward that keeps nothing for a backward as one custom
op, which traced calls on the CUDA state kernel's route take (``ops._in_one_op``). Checked without a GPU: its body on
CPU tensors against the float64 oracle, its fake shapes, and the traced graph (fake CUDA tensors); it runs on the GPU
in ``tests/gpu/test_cuda_query.py::test_compiled_calls_take_one_op``."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import retention_compile as rc
from retention_compile import ops
from retention_compile.planning import Plan
from retention_compile.reference import _weighted_powers


class _CudaStateChoice:
    """A route's state choice as ``select_state_kernel`` makes it where the CUDA state kernel serves."""

    kernel = staticmethod(lambda *args: None)


def _inputs(Tq: int, Tk: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q (2, 4, Tq, 16), k (2, 2, Tk, 16), v (2, 2, Tk, 24) in ``dtype`` and a float32 log-gate per key head."""
    gen = torch.Generator().manual_seed(Tq * 7 + Tk)
    q = torch.randn(2, 4, Tq, 16, generator=gen)
    k, v = torch.randn(2, 2, Tk, 16, generator=gen), torch.randn(2, 2, Tk, 24, generator=gen)
    gate = -0.2 * torch.rand(2, 2, Tk, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), gate


def _fake_cuda_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``_inputs``' shapes (T = 300) as CUDA tensors, made inside a ``FakeTensorMode`` (no GPU needed)."""
    q, k, v = (torch.empty(2, h, 300, e, dtype=dtype, device="cuda") for h, e in ((4, 16), (2, 16), (2, 24)))
    return q, k, v, torch.empty(2, 2, 300, device="cuda")


CASES = [(200, 200, True, torch.float32), (200, 200, False, torch.float32), (1, 150, True, torch.float32),
         (37, 37, True, torch.float32), (200, 200, True, torch.bfloat16), (100, 100, False, torch.float16)]  # fmt: skip


@pytest.mark.parametrize(("Tq", "Tk", "gated", "dtype"), CASES)
def test_its_body_matches_the_oracle_and_its_fake(Tq: int, Tk: int, gated: bool, dtype: torch.dtype) -> None:
    """On CPU tensors the body is the aten forward (chunks of 32 keys): y and denom against the float64 oracle (1e-4
    in float32, 1e-2 in 16 bits), in the dtypes, shapes and strides the op's fake gives for the same inputs."""
    q, k, v, gate = _inputs(Tq, Tk, dtype)
    args = (q, k, v, gate if gated else None, None, 0.25, 2, True, 32, "auto")
    y, denom = torch.ops.retention_compile.power_retention_inference(*args)
    numerator, den = _weighted_powers(
        q.double(), k.double(), v.double(), 1, rc.reference.EPS, scale=0.25, deg=2,
        log_gate=None if args[3] is None else args[3].double(), causal=True, valid=None,
    )  # fmt: skip
    bound = 1e-4 if dtype == torch.float32 else 1e-2
    assert ((y.double() - numerator / den).norm() / (numerator / den).norm()).item() <= bound
    assert ((denom.double() - den[..., 0]).abs() / den[..., 0]).max().item() <= bound
    with FakeTensorMode() as mode:
        fake_y, fake_denom = torch.ops.retention_compile.power_retention_inference(
            *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        )
    for real, fake in ((y, fake_y), (denom, fake_denom)):
        assert (real.dtype, real.shape, real.stride()) == (fake.dtype, fake.shape, fake.stride())


def test_fake_shapes_on_cuda() -> None:
    """On fake CUDA tensors: y (B, Hq, Tq, e) in q's dtype, denom (B, Hq, Tq) in the accumulators' (float32)."""
    with FakeTensorMode():
        q, k, v, gate = _fake_cuda_inputs(torch.bfloat16)
        y, denom = torch.ops.retention_compile.power_retention_inference(q, k, v, gate, None, 0.25, 2, True, 0, "auto")
    assert (y.shape, y.dtype, y.device.type) == ((2, 4, 300, 24), torch.bfloat16, "cuda")
    assert (denom.shape, denom.dtype) == ((2, 4, 300), torch.float32)


def _traced_body(monkeypatch: pytest.MonkeyPatch, state: object, for_backward: bool = False) -> str:
    """The graph make_fx traces from the op's body on fake CUDA tensors (as Inductor does), the route given."""
    monkeypatch.setattr(ops, "_route", lambda *args, **kwargs: ops.Route(Plan(chunk_size=128, block_t=64), None, state))

    def body(q, k, v, gate):
        return ops._forward(q, k, v, gate, None, 0.25, 2, True, 0, "auto", for_backward)[0]

    with FakeTensorMode():
        return make_fx(body, tracing_mode="fake")(*_fake_cuda_inputs(torch.bfloat16)).code


def test_a_traced_call_on_the_cuda_state_route_is_one_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body traced on fake CUDA tensors, on a route with the CUDA state kernel and nothing kept for a backward:
    one call of the inference op (with the caller's chunk_size 0: planned per call), no kernel launched by the
    trace."""
    code = _traced_body(monkeypatch, _CudaStateChoice())
    assert code.count("retention_compile.power_retention_inference.default(") == 1
    assert "0.25, 2, True, 0, 'auto')" in code
    for launched in ("cuda_chunk_states", "cuda_query", "triton_kernel_wrapper"):
        assert launched not in code


def test_the_one_op_only_where_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not for plain tensors or parameters (the eager call runs its kernels itself; the one op's own body must never
    take it), not for fake CPU tensors (the aten forms, which Inductor compiles), not without the CUDA state kernel
    (Triton's kernels, which Inductor's code shows), not for ``impl="cuda"`` (a single-chunk length would raise in
    the op), not while an inspection capture is open, not with ``TRACED_INFERENCE_IN_ONE_OP`` off."""
    from retention_compile import inspection

    choice = _CudaStateChoice()
    assert not ops._in_one_op(torch.empty(1), choice, "auto")
    assert not ops._in_one_op(torch.nn.Parameter(torch.empty(1)), choice, "auto")
    with FakeTensorMode():
        cuda, cpu = torch.empty(1, device="cuda"), torch.empty(1)
    assert ops._in_one_op(cuda, choice, "auto")
    assert ops._in_one_op(cuda, choice, "triton")  # (a route with the CUDA state kernel is never impl "triton")
    assert not ops._in_one_op(cuda, choice, "cuda")
    assert not ops._in_one_op(cpu, choice, "auto")
    assert not ops._in_one_op(cuda, None, "auto")
    assert not ops._in_one_op(cuda, rc.codegen.cuda_state.StateChoice(None, "measured slower"), "auto")
    with monkeypatch.context() as patch:
        patch.setattr(inspection, "_captures", [object()])
        assert not ops._in_one_op(cuda, choice, "auto")
    monkeypatch.setattr(ops, "TRACED_INFERENCE_IN_ONE_OP", False)
    assert not ops._in_one_op(cuda, choice, "auto")


def test_inductor_calls_it_as_a_fallback_kernel() -> None:
    """A compiled function that calls the op (on CPU tensors: Inductor's fallback kernel for it, with the fake's
    sizes and strides asserted on its outputs) returns what the eager call returns, and the op is in its code."""
    from torch._inductor.utils import run_and_get_code

    q, k, v, gate = _inputs(100, 100, torch.float32)

    def twice_y(q, k, v, gate):
        y, denom = torch.ops.retention_compile.power_retention_inference(q, k, v, gate, None, 0.25, 2, True, 32, "auto")
        return 2.0 * y, denom

    torch._dynamo.reset()
    (y, denom), code = run_and_get_code(torch.compile(twice_y, fullgraph=True), q, k, v, gate)
    eager_y, eager_denom = twice_y(q, k, v, gate)
    assert "retention_compile.power_retention_inference" in "\n".join(code)
    assert torch.equal(y, eager_y) and torch.equal(denom, eager_denom)
