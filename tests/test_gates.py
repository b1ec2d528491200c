"""The cumulative gate of the aten forms holds float32's bound after a reset, and d log_gate from the gradients of the
cumulative gate: the prefix form and the chunk-start form agree."""

import math

import pytest
import torch

import retention_compile as rc
from retention_compile.chunked import chunked_forward
from retention_compile.decode import decode_step, init_state
from retention_compile.gates import log_gate_floor, log_gate_grad, log_gate_grad_in_chunks
from retention_compile.quadratic import quadratic_forward
from retention_compile.reference import power_retention_recurrent, power_retention_reference

FLOAT32_BOUND = 1e-4  # the contract's relative error of y for float32 inputs
RESET_AT = 10


def _inputs_with_a_reset(T: int, d: int, e: int) -> tuple[torch.Tensor, ...]:
    """float32 q, k, v (1, 2, T, .) and log-gates in [-0.1, 0] with -1e5 added at key ``RESET_AT``: a document
    boundary that puts every later G near -1e5, where a float32's ulp is 7.8e-3."""
    gen = torch.Generator().manual_seed(T * 7 + d)
    q, k = (torch.randn(1, 2, T, d, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, T, e, generator=gen)
    gate = -0.1 * torch.rand(1, 2, T, generator=gen)
    gate[..., RESET_AT] -= 1e5
    return q, k, v, gate


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("form", ["chunked, chunks of 16", "chunked, one chunk", "quadratic"])
def test_float32_rows_after_a_reset_hold_the_bound(form: str) -> None:
    """With G held in float32 every gate factor after the reset carried up to that ulp: the rows after it were
    1.9e-3 from the oracle (``benchmarks/gate_prefix_precision.py``). The aten forms take G in float64."""
    q, k, v, gate = _inputs_with_a_reset(T=96, d=8, e=4)
    options = {"scale": 8**-0.5, "deg": 2, "causal": True, "valid": None}
    if form == "quadratic":
        y, _ = quadratic_forward(q, k, v, log_gate=gate, **options)
    else:
        y, _ = chunked_forward(q, k, v, log_gate=gate, chunk_size=16 if "16" in form else 128, **options)
    ref = power_retention_reference(q.double(), k.double(), v.double(), log_gate=gate.double(), **options)
    after = slice(RESET_AT + 1, None)
    assert _relative_error(y[..., after, :], ref[..., after, :]) <= FLOAT32_BOUND


def test_float32_prefill_state_after_a_reset_holds_the_bound() -> None:
    """``decode.init_state`` weighs key t by exp(G_T - G_t): in float32 after the reset, off by up to G's ulp."""
    _, k, v, gate = _inputs_with_a_reset(T=40, d=8, e=4)
    state, norm = init_state(k, v, deg=2, log_gate=gate)
    want_state, want_norm = init_state(k.double(), v.double(), deg=2, log_gate=gate.double())
    assert _relative_error(state, want_state) <= FLOAT32_BOUND
    assert _relative_error(norm, want_norm) <= FLOAT32_BOUND


@pytest.mark.parametrize(("Tk", "chunk", "shift"), [(37, 8, 0), (37, 8, 3), (16, 16, 0), (5, 16, 11), (64, 4, 1)])
def test_chunk_start_form_matches_the_prefix_form(Tk: int, chunk: int, shift: int) -> None:
    """Given dg at each chunk start (here from the prefix form), the chunk-local sums rebuild every position; a
    boundary's error stays in its own chunk."""
    gen = torch.Generator().manual_seed(Tk * 31 + chunk + shift)
    d_cum = torch.randn(2, 3, Tk, generator=gen, dtype=torch.float64)
    want = log_gate_grad(d_cum)
    n = -(-(Tk + shift) // chunk)
    starts = (torch.arange(n) * chunk - shift).clamp_min(0)  # chunk c starts at c chunk - shift (chunk 0 at 0)
    at_starts = want[..., starts]
    assert (at_starts[..., 0] == 0).all()
    torch.testing.assert_close(log_gate_grad_in_chunks(d_cum, at_starts, chunk, shift), want, rtol=1e-12, atol=1e-12)
    if n > 2:
        moved = at_starts.clone()
        moved[..., 1] += 1.0
        changed = (log_gate_grad_in_chunks(d_cum, moved, chunk, shift) - want).abs() > 0.5
        assert changed[..., starts[1] : starts[2]].all() and changed.sum() == 2 * 3 * chunk


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_floor_zeroes_every_decay_it_enters(dtype: torch.dtype) -> None:
    """exp(F + 1) is 0 in its dtype (a nat to spare below the subnormals), exp(F + 1 + log 4) is not."""
    floor = log_gate_floor(dtype)
    assert torch.exp(torch.tensor(floor + 1, dtype=dtype)) == 0
    assert torch.exp(torch.tensor(floor + 1 + math.log(4), dtype=dtype)) > 0


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_hard_resets_of_minus_inf(chunk_size: int | None) -> None:
    """Log-gates of -inf (a zero decay: documents packed in one sequence) at keys 10 and 30: the op's CPU path
    (single-chunk and chunked forms) matches the oracle and the recurrence, rows after a reset see only their own
    document, and every gradient is finite and matches the oracle's autograd."""
    gen = torch.Generator().manual_seed(30)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    gate = -0.2 * torch.rand(1, 2, 40, generator=gen, dtype=torch.float64)
    gate[..., [10, 30]] = float("-inf")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    y = rc.power_retention(*leaves[:3], log_gate=leaves[3], chunk_size=chunk_size)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    ref = power_retention_reference(*ref_leaves[:3], log_gate=ref_leaves[3])
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ref, power_retention_recurrent(q, k, v, log_gate=gate), rtol=1e-9, atol=1e-10)
    middle = power_retention_reference(q[..., 10:30, :], k[..., 10:30, :], v[..., 10:30, :], log_gate=gate[..., 10:30])
    torch.testing.assert_close(ref[..., 10:30, :], middle, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad_y)
    want = torch.autograd.grad(ref, ref_leaves, grad_y)
    for name, got, expected in zip(("dq", "dk", "dv", "dlog_gate"), grads, want):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_decoding_across_hard_resets() -> None:
    """A prefix with a hard reset inside (``init_state``), then decode steps, the first of them a reset too: each
    step's y is the oracle's row of the whole sequence, which sees only the step's own document."""
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(1, 2, 28, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    gate = -0.2 * torch.rand(1, 2, 28, generator=gen, dtype=torch.float64)
    gate[..., [12, 20]] = float("-inf")
    ref = power_retention_reference(q, k, v, log_gate=gate)
    state, norm = init_state(k[..., :20, :], v[..., :20, :], deg=2, log_gate=gate[..., :20])
    assert torch.isfinite(state).all() and torch.isfinite(norm).all()
    for t in range(20, 28):
        step = slice(t, t + 1)
        y = decode_step(q[..., step, :], k[..., step, :], v[..., step, :], state, norm, log_gate=gate[..., step])
        torch.testing.assert_close(y, ref[..., step, :], rtol=1e-9, atol=1e-10)
