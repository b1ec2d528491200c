"""Repeated eager calls of the quadratic forward (``codegen.eager_launch``, ``forward.QuadraticReplay``), on the CPU:
what the replay key tells apart, and the arguments a kept launch hands to the compiled kernel's launcher. The replays
themselves run on a GPU (``tests/gpu/test_triton_forward.py``: bitwise equal to the planned path)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from retention_compile.codegen import eager_launch, forward
from retention_compile.codegen.eager_launch import DirectLaunch
from retention_compile.planning import Plan

PLAN = Plan(chunk_size=1 << 20, block_t=64, block_e=64)


def key(q, k, v, log_gate=None, valid=None, scale=0.125, plan=PLAN) -> tuple:
    return forward._replay_key(q, k, v, log_gate, valid, scale, 2, True, plan, None, None, torch.bfloat16)


@pytest.fixture
def inputs(monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, ...]:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return tuple(torch.randn(1, 4, 100, 64, dtype=torch.bfloat16) for _ in range(3))


def test_fresh_tensors_of_the_same_layout_share_a_key(inputs: tuple) -> None:
    again = tuple(torch.randn_like(t) for t in inputs)
    assert key(*inputs) == key(*again)


def test_the_key_tells_apart_what_the_kernels_are_specialized_and_planned_on(inputs: tuple) -> None:
    q, k, v = inputs
    base = key(q, k, v)
    unaligned = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)
    gate = -torch.rand(1, 4, 100)
    variants = {
        "unaligned q": key(unaligned, k, v),
        "strides of q": key(transposed, k, v),
        "dtype of k": key(q, k.float(), v),
        "length of v": key(q, k, torch.randn(1, 4, 101, 64, dtype=v.dtype)),
        "a gate": key(q, k, v, log_gate=gate),
        "validity": key(q, k, v, valid=torch.ones(1, 100, dtype=torch.bool)),
        "scale": key(q, k, v, scale=0.25),
        "plan": key(q, k, v, plan=Plan(chunk_size=1 << 20, block_t=32, block_e=64)),
    }
    for what, other in variants.items():
        assert other != base, f"{what} left the key unchanged"
    assert len(set(variants.values())) == len(variants)


def test_calls_on_the_cpu_keep_nothing() -> None:
    assert not forward._replayable(torch.randn(2, 2))


@triton.jit
def sample_kernel(X, Y, n, scale, FLAG: tl.constexpr):
    pass


class Compiled:
    """What a launch of Triton's JIT hands back, as far as ``DirectLaunch`` reads it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.function = "function handle"
        self.packed_metadata = "packed metadata"

    def run(self, *arguments) -> None:
        self.calls.append(arguments)


def test_a_kept_launch_passes_each_calls_tensors_in_parameter_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(eager_launch, "current_stream", lambda device: f"stream of {device}")
    compiled = Compiled()
    first = {"Y": torch.zeros(3), "FLAG": True, "scale": 0.5, "n": 3, "X": torch.ones(3)}
    kept = DirectLaunch.of(sample_kernel, (7, 2), first, compiled)
    x, y = torch.randn(3), torch.randn(3)
    kept({"X": x, "Y": y, "unused": torch.zeros(1)})
    (call,) = compiled.calls
    assert call[:7] == (7, 2, 1, "stream of 0", "function handle", "packed metadata", None)
    assert call[7:9] == (None, None)  # no launch hooks
    assert call[9] is x and call[10] is y and call[11:] == (3, 0.5, True)
    with pytest.raises(KeyError):
        kept({"X": x})


def test_a_launch_that_cannot_be_repeated_directly_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch = {"X": torch.ones(1), "Y": torch.ones(1), "n": 1, "scale": 1.0, "FLAG": False}
    assert DirectLaunch.of(sample_kernel, (1,), launch, None) is None  # traced through wrap_triton: nothing back
    with pytest.raises(ValueError, match="parameters"):
        DirectLaunch.of(sample_kernel, (1,), {**launch, "extra": 1}, Compiled())


def test_direct_launches_only_where_triton_would_launch_directly_and_no_hook_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._library.triton import set_wrap_triton_enabled
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not eager_launch.direct_launches_allowed()  # wrap_triton enabled: launches go through its tracing
    with set_wrap_triton_enabled(False):
        assert eager_launch.direct_launches_allowed()
        hook = knobs.runtime.launch_enter_hook
        if isinstance(hook, knobs.HookChain):
            monkeypatch.setattr(hook, "calls", [lambda metadata: None])
        else:
            monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
        assert not eager_launch.direct_launches_allowed()  # a profiler's hook
        monkeypatch.undo()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not eager_launch.direct_launches_allowed()
