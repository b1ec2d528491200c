"""The public eager ``power_retention``: a call that keeps nothing for a backward runs the op's body itself
(``ops.runs_body_directly``), exactly as the op's eager kernel would; anything that must see the op still does."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import retention_compile as rc
from retention_compile import ops


def inputs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=gen) for _ in range(3))
    gate = -0.1 * torch.rand(1, 4, 40, generator=gen)
    return q.requires_grad_(requires_grad), k, v, gate


def call(q, k, v, gate) -> torch.Tensor:
    return rc.power_retention(q, k, v, log_gate=gate, chunk_size=16)


def refusing_op(*args, **kwargs):
    raise AssertionError("the op was dispatched")


def test_a_call_without_a_backward_runs_the_body_and_matches_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, gate = inputs()
    through_op = ops.power_retention_op(q, k, v, gate, None, 0.25, 2, True, 16, "auto", False)[0]
    monkeypatch.setattr(ops, "power_retention_op", refusing_op)
    with torch.no_grad():
        assert torch.equal(call(q, k, v, gate), through_op)
    assert torch.equal(call(q, k, v, gate), through_op)  # no input asks for a gradient


def test_a_call_with_a_backward_goes_through_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "power_retention_op", refusing_op)
    with pytest.raises(AssertionError, match="dispatched"):
        call(*inputs(requires_grad=True))


class SeenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_op() -> None:
    with torch.no_grad(), SeenOps() as mode:
        call(*inputs())
    assert any("retention_compile.power_retention" in name for name in mode.names)


class AnyFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_nothing_runs_the_body_directly_where_the_op_must_be_seen() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.autograd import forward_ad

    q = torch.randn(1, 1, 4, 8)
    assert ops.runs_body_directly(q, None)
    with FakeTensorMode() as fake:
        assert not ops.runs_body_directly(fake.from_tensor(q))
    with AnyFunctionMode():
        assert not ops.runs_body_directly(q)
    with torch.profiler.profile():
        assert not ops.runs_body_directly(q)
    with forward_ad.dual_level():
        assert not ops.runs_body_directly(q)
    seen_in_vmap: list[bool] = []

    def body(x: torch.Tensor) -> torch.Tensor:
        seen_in_vmap.append(ops.runs_body_directly(x))
        return x

    torch.vmap(body)(torch.randn(2, 4))
    assert seen_in_vmap == [False]
    assert not ops.runs_body_directly(torch.nn.Parameter(q))  # a subclass: through the op


def test_an_eager_decode_step_launches_directly_only_where_the_forward_would() -> None:
    """``decode_step`` launches its CUDA kernels itself where ``runs_body_directly`` holds and no input asks for a
    gradient; otherwise it goes through its op, which a dispatch mode then sees (on the CPU it always does)."""
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    state, norm = rc.decode.init_state(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), deg=2)
    assert rc.decode._launches_directly(q, k, v, state, norm, None)
    wants_grad = q.clone().requires_grad_()
    assert not rc.decode._launches_directly(wants_grad, k, v, state, norm, None)
    with torch.no_grad():
        assert rc.decode._launches_directly(wants_grad, k, v, state, norm, None)
    with SeenOps() as mode:
        assert not rc.decode._launches_directly(q, k, v, state, norm, None)
        rc.decode.decode_step(q, k, v, state, norm)
    assert "retention_compile.decode_step.default" in mode.names


def test_a_default_device_still_runs_the_body_directly_and_right() -> None:
    q, k, v, gate = inputs()
    through_op = ops.power_retention_op(q, k, v, gate, None, 0.25, 2, True, 16, "auto", False)[0]
    with torch.device("meta"), torch.no_grad():  # factory calls that name no device would land on meta
        assert ops.runs_body_directly(q)
        assert torch.equal(call(q, k, v, gate), through_op)


def test_a_jit_trace_records_the_op() -> None:
    q, k, v, gate = inputs()
    traced = torch.jit.trace(call, (q, k, v, gate))
    assert "retention_compile::power_retention" in str(traced.graph)
    fresh = inputs()
    assert torch.equal(traced(*fresh), call(*fresh))


def test_an_eager_calls_route_is_kept_with_the_replays_and_only_where_triton_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ops._route`` plans, checks and chooses once per key (the CPU stands in for an eager CUDA call here: the key
    is forced); ``replays.clear`` forgets the route; a route the Triton kernels do not serve is not kept."""
    from retention_compile.codegen import cuda_state, replays

    q, k, v, gate = inputs()
    planned: list[int] = []
    real_plan = ops.resolve_plan
    monkeypatch.setattr(ops, "_route_key", lambda *args: ("a route",))
    monkeypatch.setattr(ops, "resolve_plan", lambda *args: planned.append(1) or real_plan(*args))
    monkeypatch.setattr(ops, "_triton_unavailable", lambda *args: None)
    monkeypatch.setattr(cuda_state, "select_state_kernel", lambda *args: cuda_state.StateChoice(None, "a reason"))
    monkeypatch.setattr(replays, "_KEPT", type(replays._KEPT)())
    route = (q, k, v, gate, None, 0.25, 2, True, 16, "auto")
    first = ops._route(*route)
    assert ops._route(*route) is first and len(planned) == 1 and first.key == ("a route",)
    replays.clear()
    again = ops._route(*route)
    assert again is not first and again == first and len(planned) == 2
    replays.clear()
    monkeypatch.setattr(ops, "_triton_unavailable", lambda *args: "not served")
    assert (ops._route(*route).triton_reason, ops._route(*route).state) == ("not served", None)
    assert len(planned) == 4 and not replays._KEPT


def test_a_kept_routes_launches_answer_only_current_calls_that_keep_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept ``ops.Route`` holding a call's launches (``Route.forward``) answers the calls after it that keep
    nothing for a backward, while those launches are current; a call for a backward, or once they are not current,
    goes to ``triton_forward`` (the CPU stands in for an eager CUDA call: the key and the route are forced)."""
    from retention_compile import codegen
    from retention_compile.codegen import cuda_state, replays

    q, k, v, gate = inputs()
    answer = (torch.randn(1, 4, 40, 16), torch.rand(1, 4, 40))

    class Launches:
        is_current, calls = True, 0

        def current(self) -> bool:
            return self.is_current

        def __call__(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            assert tensors == (q, k, v, gate, None)
            self.calls += 1
            return answer

    class ToTriton(Exception):
        pass

    def triton_forward(*args, **kwargs):
        raise ToTriton

    keys = []
    monkeypatch.setattr(ops, "_route_key", lambda *args: keys.append(1) or ("a route",))
    monkeypatch.setattr(ops, "_triton_unavailable", lambda *args: None)
    monkeypatch.setattr(cuda_state, "select_state_kernel", lambda *args: cuda_state.StateChoice(None, "a reason"))
    monkeypatch.setattr(replays, "_KEPT", type(replays._KEPT)())
    monkeypatch.setattr(codegen, "triton_forward", triton_forward)
    args = (q, k, v, gate, None, 0.25, 2, True, 16, "auto")
    launches = Launches()
    ops._route(*args).forward = launches
    y, denom, *rest = ops._forward_body(*args, for_backward=False)
    assert y is answer[0] and denom is answer[1] and all(t.numel() == 0 for t in rest) and launches.calls == 1
    y, denom = ops._y_and_denom(*args)  # the public no-grad call's, nothing else built
    assert y is answer[0] and denom is answer[1] and launches.calls == 2
    y, denom = ops._inference_body(*args)  # the one op of a traced call's body
    assert y is answer[0] and denom is answer[1] and launches.calls == 3
    with pytest.raises(ToTriton):
        ops._forward_body(*args, for_backward=True)
    launches.is_current = False
    with pytest.raises(ToTriton):
        ops._forward_body(*args, for_backward=False)
    keys.clear()
    with pytest.raises(ToTriton):
        ops._y_and_denom(*args)
    assert launches.calls == 3 and len(keys) == 1  # the body took the route found: one key per call


def test_cpu_calls_keep_no_route() -> None:
    q, k, v, gate = inputs()
    assert ops._route_key(q, k, v, gate, None, 0.25, 2, True, 16, "auto") is None
