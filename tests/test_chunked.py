"""The chunked form (forward and explicit backward) against the float64 oracle, on CPU.

Every comparison runs in float64 on fresh random inputs; gates are random per token and per head.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.library import triton_op

import retention_compile as rc
from retention_compile.checks import RetentionInputError
from retention_compile.chunked import chunked_backward, chunked_forward, power_retention_chunked
from retention_compile.quadratic import quadratic_backward, quadratic_forward
from retention_compile.reference import EPS, power_retention_recurrent, power_retention_reference

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}


def make_case(
    *,
    B: int = 2,
    Hq: int = 2,
    Hk: int = 1,
    Tq: int = 17,
    Tk: int | None = None,
    d: int = 4,
    e: int = 3,
    gate: str | None = "kv",
    padded: bool = False,
    seed: int = 0,
    dtype: torch.dtype = F64,
) -> dict:
    """Random q, k, v (SDPA layout), a random per-token, per-head log-gate in [-0.5, 0] of shape
    (B, Hk, Tk) ("kv") or (B, Hq, Tk) ("q"), and a validity mask with about a quarter of the keys padded."""
    Tk = Tq if Tk is None else Tk
    g = torch.Generator().manual_seed(seed)
    case = {
        "q": torch.randn(B, Hq, Tq, d, generator=g, dtype=F64).to(dtype),
        "k": torch.randn(B, Hk, Tk, d, generator=g, dtype=F64).to(dtype),
        "v": torch.randn(B, Hk, Tk, e, generator=g, dtype=F64).to(dtype),
        "log_gate": None,
        "valid": None,
    }
    if gate is not None:
        heads = Hk if gate == "kv" else Hq
        case["log_gate"] = (-0.5 * torch.rand(B, heads, Tk, generator=g, dtype=F64)).to(dtype)
    if padded:
        case["valid"] = torch.rand(B, Tk, generator=g) > 0.25
    return case


def oracle(case: dict, *, scale: float = 0.5, deg: int = 2, causal: bool = True) -> torch.Tensor:
    return power_retention_reference(
        case["q"],
        case["k"],
        case["v"],
        scale=scale,
        deg=deg,
        log_gate=case["log_gate"],
        causal=causal,
        valid=case["valid"],
    )


def forward(case: dict, chunk: int, *, scale: float = 0.5, deg: int = 2, causal: bool = True):
    return chunked_forward(
        case["q"],
        case["k"],
        case["v"],
        scale=scale,
        deg=deg,
        log_gate=case["log_gate"],
        causal=causal,
        valid=case["valid"],
        chunk_size=chunk,
    )


def backward(case: dict, grad_y, y, denom, chunk: int, *, scale: float = 0.5, deg: int = 2, causal: bool = True):
    return chunked_backward(
        grad_y,
        case["q"],
        case["k"],
        case["v"],
        y,
        denom,
        scale=scale,
        deg=deg,
        log_gate=case["log_gate"],
        causal=causal,
        valid=case["valid"],
        chunk_size=chunk,
    )


def oracle_grads(case: dict, grad_y: torch.Tensor, **options) -> list[torch.Tensor | None]:
    """d(sum(grad_y * y))/d(q, k, v, log_gate) by torch.autograd through the oracle."""
    leaves = {name: case[name].clone().requires_grad_() for name in ("q", "k", "v")}
    if case["log_gate"] is not None:
        leaves["log_gate"] = case["log_gate"].clone().requires_grad_()
    y = oracle({**case, **leaves}, **options)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return [*grads, None] if case["log_gate"] is None else list(grads)


def assert_grads_close(actual, expected) -> None:
    for name, a, b in zip(("dq", "dk", "dv", "dlog_gate"), actual, expected):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("T", [1, 2, 17, 255, 256, 257, 1000])
def test_forward_every_chunk_size_and_length(chunk, T):
    case = make_case(B=1, Tq=T, gate="kv", padded=True, seed=T + chunk)
    y, denom = forward(case, chunk)
    assert y.shape == (1, 2, T, 3) and y.dtype == F64 and denom.shape == (1, 2, T) and denom.dtype == F64
    torch.testing.assert_close(y, oracle(case), **TOL)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("gate", [None, "kv", "q"])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_gqa_gates_padding(group, gate, padded):
    case = make_case(Hq=2 * group, Hk=2, Tq=37, gate=gate, padded=padded, seed=group)
    for chunk in (3, 16):
        torch.testing.assert_close(forward(case, chunk)[0], oracle(case), **TOL)


@pytest.mark.parametrize(
    "Tq, Tk",
    [(13, 40), (1, 40), (39, 40), (40, 13), (40, 1), (5, 5)],
    ids=["Tq<Tk", "decode", "Tq=Tk-1", "Tq>Tk", "Tk=1", "Tq=Tk"],
)
@pytest.mark.parametrize("gate", ["kv", "q"])
def test_forward_bottom_right_alignment(Tq, Tk, gate):
    case = make_case(Hq=4, Hk=2, Tq=Tq, Tk=Tk, gate=gate, padded=True, seed=Tq * Tk)
    for chunk in (1, 4, 64):
        torch.testing.assert_close(forward(case, chunk)[0], oracle(case), **TOL)


def test_rows_without_keys_are_zero():
    case = make_case(Tq=20, Tk=7, gate="kv")
    y, denom = forward(case, 3)
    assert y[:, :, :13].abs().max() == 0 and (denom[:, :, :13] == EPS).all()
    case = make_case(Tq=9, gate="kv", padded=True)
    case["valid"][:] = False
    y, denom = forward(case, 4)
    assert y.abs().max() == 0 and (denom == EPS).all()


@pytest.mark.parametrize("Tq, Tk", [(13, 40), (40, 13), (1, 25)])
def test_forward_non_causal(Tq, Tk):
    case = make_case(Hq=4, Hk=2, Tq=Tq, Tk=Tk, gate=None, padded=True, seed=Tk)
    for chunk in (1, 16):
        torch.testing.assert_close(forward(case, chunk, causal=False)[0], oracle(case, causal=False), **TOL)


def test_forward_degree_4():
    case = make_case(Hq=4, Hk=2, Tq=45, gate="q", padded=True, seed=4)
    for chunk in (1, 7, 64):
        torch.testing.assert_close(forward(case, chunk, deg=4)[0], oracle(case, deg=4), rtol=1e-8, atol=1e-10)


def test_denominator_is_sum_of_weights_plus_eps():
    case = make_case(Hq=2, Hk=1, Tq=11, gate="kv", padded=True, seed=5)
    q, k = case["q"], case["k"]
    cum = case["log_gate"].cumsum(-1)
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).clamp(max=0))
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    w = (0.5 * q @ k.transpose(-1, -2)) ** 2 * decay * (causal & case["valid"][:, None, None, :])
    torch.testing.assert_close(forward(case, 4)[1], w.sum(-1) + EPS, **TOL)


def test_large_gates_stay_finite():
    case = make_case(Hq=4, Hk=2, Tq=50, gate="q", padded=True, seed=6)
    case["log_gate"][:, :, ::7] = -1e4  # decays to exactly 0 across these steps
    y, denom = forward(case, 8)
    assert torch.isfinite(y).all() and torch.isfinite(denom).all()
    torch.testing.assert_close(y, oracle(case), **TOL)
    grads = backward(case, torch.randn_like(y), y, denom, 8)
    assert all(torch.isfinite(g).all() for g in grads)


def test_low_precision_dtypes():
    case = make_case(Hq=4, Hk=2, Tq=33, gate="kv", padded=True, seed=7, dtype=torch.bfloat16)
    case["log_gate"] = case["log_gate"].float()
    y, denom = forward(case, 8)
    assert y.dtype == torch.float32 and denom.dtype == torch.float32  # the accumulation dtype (the backward reads y)
    expected = oracle({name: t.double() if t is not None and t.is_floating_point() else t for name, t in case.items()})
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
    dq, dk, dv, dg = backward(case, torch.randn_like(y), y, denom, 8)
    assert (dq.dtype, dk.dtype, dv.dtype, dg.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)


def test_wrapper_validates_and_defaults():
    case = make_case(Hq=4, Hk=2, Tq=20, gate=None, seed=8)
    y = power_retention_chunked(case["q"], case["k"], case["v"], chunk_size=6)
    expected = power_retention_reference(case["q"], case["k"], case["v"])
    torch.testing.assert_close(y, expected, **TOL)
    with pytest.raises(RetentionInputError, match="chunk_size"):
        power_retention_chunked(case["q"], case["k"], case["v"], chunk_size=0)


def test_oracle_matches_recurrence():
    case = make_case(Hq=4, Hk=2, Tq=9, Tk=23, gate="q", padded=True, seed=9)
    expected = power_retention_recurrent(
        case["q"], case["k"], case["v"], scale=0.5, log_gate=case["log_gate"], valid=case["valid"]
    )
    torch.testing.assert_close(oracle(case), expected, **TOL)


# ---------------------------------------------------------------------------------------------- backward

BACKWARD_CASES = {
    "chunk1": dict(chunk=1, Tq=9, gate=None, padded=False, group=1),
    "gqa2-kvgate-padded": dict(chunk=3, Tq=17, gate="kv", padded=True, group=2),
    "gqa4-qgate": dict(chunk=16, Tq=40, gate="q", padded=False, group=4),
    "long-tail": dict(chunk=16, Tq=255, gate="kv", padded=True, group=2),
    "single-chunk": dict(chunk=64, Tq=37, gate="q", padded=True, group=2),
    "Tq<Tk": dict(chunk=5, Tq=13, Tk=40, gate="kv", padded=True, group=2),
    "Tq>Tk": dict(chunk=4, Tq=30, Tk=11, gate="q", padded=True, group=2),
    "decode": dict(chunk=8, Tq=1, Tk=25, gate="kv", padded=True, group=2),
    "non-causal": dict(chunk=6, Tq=13, Tk=40, gate=None, padded=True, group=2, causal=False),
    "deg4": dict(chunk=7, Tq=30, gate="q", padded=True, group=2, deg=4),
    # a chunk far past the keys: the same result, without C x C tensors for the empty full-chunk piece
    "chunk-past-T": dict(chunk=1 << 20, Tq=25, gate="q", padded=True, group=1),
    "chunk-past-T, Tq>Tk": dict(chunk=1 << 20, Tq=30, Tk=11, gate="kv", padded=True, group=2),
}


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_matches_autograd_on_the_oracle(name):
    spec = dict(BACKWARD_CASES[name])
    chunk, group = spec.pop("chunk"), spec.pop("group")
    options = {"causal": spec.pop("causal", True), "deg": spec.pop("deg", 2)}
    case = make_case(Hq=2 * group, Hk=2, seed=len(name), **spec)
    y, denom = forward(case, chunk, **options)
    grad_y = torch.randn_like(y)
    assert_grads_close(backward(case, grad_y, y, denom, chunk, **options), oracle_grads(case, grad_y, **options))


# ------------------------------------------------------------------------------------ tracing, compiling


def _forward_fn(chunk: int):
    def fn(q, k, v, log_gate, valid):
        return chunked_forward(q, k, v, scale=0.5, deg=2, log_gate=log_gate, causal=True, valid=valid, chunk_size=chunk)

    return fn


def _backward_fn(chunk: int):
    def fn(grad_y, q, k, v, y, denom, log_gate, valid):
        return chunked_backward(
            grad_y, q, k, v, y, denom, scale=0.5, deg=2, log_gate=log_gate, causal=True, valid=valid, chunk_size=chunk
        )

    return fn


def _traced_inputs(Tq: int, Tk: int, seed: int) -> tuple[dict, tuple]:
    # sizes that differ from every traced length below, so symbolic tracing keeps the lengths their own symbols
    case = make_case(B=3, Hq=12, Hk=6, Tq=Tq, Tk=Tk, d=5, e=7, gate="q", padded=True, seed=seed)
    y, denom = forward(case, 8)
    grad_y = torch.randn_like(y)
    return case, (grad_y, case["q"], case["k"], case["v"], y, denom, case["log_gate"], case["valid"])


def _inputs(case: dict) -> tuple:
    return tuple(case[n] for n in ("q", "k", "v", "log_gate", "valid"))


SAME_LENGTHS = [(2, 2), (9, 9), (24, 24), (53, 53)]
TRACES = {
    "chunks+tail": ((37, 37), SAME_LENGTHS),
    "single-chunk": ((4, 4), SAME_LENGTHS),
    "no-tail": ((16, 16), SAME_LENGTHS),
    "decode": ((1, 37), [(1, 2), (1, 9), (1, 53)]),
    "Tq<Tk": ((19, 45), [(9, 30), (24, 24), (30, 9), (3, 61)]),
}


SLOW_TRACES = ("no-tail", "Tq<Tk")  # about 10 s and 20 s of tracing


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TRACES else n for n in TRACES])
def test_symbolic_trace_is_valid_at_every_length(name):
    """Graphs traced by ``make_fx`` with symbolic sizes at one (Tq, Tk) give the oracle's numbers at others,
    including chunk counts and tails of 0 and 1 on either side."""
    (Tq, Tk), others = TRACES[name]
    case, args = _traced_inputs(Tq, Tk, seed=0)
    fwd = make_fx(_forward_fn(8), tracing_mode="symbolic")(*_inputs(case))
    bwd = make_fx(_backward_fn(8), tracing_mode="symbolic")(*args)
    for Tq, Tk in others:
        case, args = _traced_inputs(Tq, Tk, seed=Tq + Tk)
        torch.testing.assert_close(fwd(*_inputs(case))[0], oracle(case), **TOL)
        assert_grads_close(bwd(*args), oracle_grads(case, args[0]))


@triton_op("rc_test_chunked::forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_fn(8)(q, k, v, log_gate, valid)


@triton_op("rc_test_chunked::backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    denom: torch.Tensor,
    log_gate: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_fn(8)(grad_y, q, k, v, y, denom, log_gate, valid)


@pytest.mark.slow  # Inductor's C++ codegen of both graphs under dynamic shapes: about 90 s of CPU
def test_torch_compile_dynamic_forward_and_backward():
    """Inductor traces into ``triton_op`` bodies (as for the project's op) and compiles them to C++; the
    graphs compiled at the first length serve the second. (Lengths whose chunk count or tail is 0 or 1
    hit PyTorch's 0/1 size guards and recompile; the symbolic-trace test shows such graphs stay correct.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fwd = torch.compile(lambda *a: _forward_op(*a), dynamic=True)
    bwd = torch.compile(lambda *a: _backward_op(*a), dynamic=True)
    for T in (37, 61):
        case, args = _traced_inputs(T, T, seed=T)
        torch.testing.assert_close(fwd(*_inputs(case))[0], oracle(case), **TOL)
        assert_grads_close(bwd(*args), oracle_grads(case, args[0]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_inductor_backward_non_causal_with_padding():
    """Regression: Inductor's CPU code for ``J_phi^T`` once scattered with a doubled stride (successive
    ``index_add``s into one buffer), giving wrong key gradients and heap corruption for non-causal retention
    with a validity mask. The op compiled by Inductor (static shapes, float64) must match the oracle's autograd."""
    from retention_compile.ops import power_retention

    torch._dynamo.reset()
    case = make_case(Tq=9, Tk=13, gate=None, padded=True, seed=5)
    leaves = [case[name].clone().requires_grad_() for name in ("q", "k", "v")]
    compiled = torch.compile(
        lambda q, k, v: power_retention(q, k, v, scale=0.5, causal=False, valid=case["valid"], chunk_size=4),
        backend="inductor",
    )
    y = compiled(*leaves)
    torch.testing.assert_close(y, oracle(case, causal=False), **TOL)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert_grads_close([*grads, None], oracle_grads(case, grad_y, causal=False, scale=0.5))


# --------------------------------------------------------------- the quadratic path (short key lengths)

QUADRATIC_CASES = {
    "causal": dict(Tq=13, gate=None),
    "gated kv heads, padded": dict(Tq=13, gate="kv", padded=True),
    "gated query heads, GQA": dict(Hq=4, Hk=2, Tq=11, gate="q"),
    "gated kv heads, GQA of 3": dict(Hq=6, Hk=2, Tq=9, Tk=10, gate="kv", padded=True),
    "fewer queries than keys": dict(Tq=5, Tk=12, gate="kv", padded=True),
    "one query": dict(Tq=1, Tk=9, gate="kv"),
    "more queries than keys": dict(Hq=4, Hk=2, Tq=12, Tk=5, gate="q", padded=True),
}


def _run_quadratic(case: dict, causal: bool = True, deg: int = 2):
    options = dict(scale=0.5, deg=deg, log_gate=case["log_gate"], causal=causal, valid=case["valid"])
    y, denom = quadratic_forward(case["q"], case["k"], case["v"], **options)
    torch.testing.assert_close(y, oracle(case, causal=causal, deg=deg), **TOL)
    grad_y = torch.randn_like(y)
    grads = quadratic_backward(grad_y, case["q"], case["k"], case["v"], y, denom, **options)
    assert_grads_close(grads, oracle_grads(case, grad_y, causal=causal, deg=deg, scale=0.5))


@pytest.mark.parametrize("name", list(QUADRATIC_CASES))
def test_quadratic_matches_the_oracle(name):
    _run_quadratic(make_case(**QUADRATIC_CASES[name], seed=len(name)))


@pytest.mark.parametrize("padded", [False, True])
def test_quadratic_non_causal(padded):
    _run_quadratic(make_case(Tq=7, Tk=10, gate=None, padded=padded, seed=3), causal=False)


def test_quadratic_degree_4():
    _run_quadratic(make_case(Tq=9, gate="kv", seed=4), deg=4)


def test_op_degree_4_with_more_queries_than_keys_stays_quadratic(monkeypatch: pytest.MonkeyPatch):
    """Causal, Tq > Tk, every key in one chunk: the op's aten path takes the quadratic form, forward and backward
    (the chunked form would embed q and k in C(d+3, 4) features, 766480 per token at d = 64)."""
    import retention_compile.chunked as chunked

    def refuse(*args, **kwargs):
        raise AssertionError("the chunked form ran")

    monkeypatch.setattr(chunked, "chunked_forward", refuse)
    monkeypatch.setattr(chunked, "chunked_backward", refuse)
    case = make_case(Hq=2, Hk=1, Tq=24, Tk=16, d=64, gate="kv", padded=True, seed=5)
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v", "log_gate")]
    y = rc.power_retention(*leaves[:3], deg=4, log_gate=leaves[3], valid=case["valid"], scale=0.5)
    torch.testing.assert_close(y, oracle(case, deg=4), **TOL)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert_grads_close([t.grad for t in leaves], oracle_grads(case, grad_y, deg=4))


@pytest.mark.parametrize("chunk", [None, 4])
def test_bf16_gradients_of_rows_with_few_keys(chunk: int | None):
    """The op saves y in float32: ``dZ_i = -(dy_i . y_i) / denom_i`` cancels against ``dy_i . v_j / denom_i``
    where a row sees few keys, and a y rounded to bf16 moved dq by ~10% here (and d log_gate by ~1%).
    ``chunk`` None: one chunk (the quadratic form); 4: the chunked form."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    log_gate = -0.3 * torch.rand(1, 2, 12, generator=gen)
    dy = torch.randn(1, 2, 12, 16, generator=gen).to(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_gate)]
    rc.power_retention(*leaves[:3], log_gate=leaves[3], chunk_size=chunk).backward(dy)
    ref = [t.double().requires_grad_() for t in (q, k, v, log_gate)]
    power_retention_reference(*ref[:3], log_gate=ref[3]).backward(dy.double())
    for name, got, want in zip(("dq", "dk", "dv", "dlog_gate"), leaves, ref):
        err = float((got.grad.double() - want.grad).norm() / want.grad.norm())
        assert err <= 2e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.slow  # one Inductor compile of the joint graph under dynamic shapes: about 30-60 s of CPU
def test_torch_compile_dynamic_training_with_a_value_dim_unlike_the_head_dim():
    """Regression: with e != d the value head dim stayed symbolic in the chunked form, and Inductor failed on a
    stride of (e + 1) times the tail length over the tail length ("Exponent must be non-negative"), compiling the
    forward of a training call (GQA 4/2, d=4, e=3, T=200 with a tail of 8 keys). e is now static like d."""
    import retention_compile as rc

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 4, 200, 4, generator=gen), torch.randn(2, 2, 200, 4, generator=gen)
    v = torch.randn(2, 2, 200, 3, generator=gen)
    weights = torch.randn(2, 4, 200, 3, generator=gen)
    compiled = torch.compile(lambda q, k, v: rc.power_retention(q, k, v, chunk_size=64), dynamic=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad((compiled(*leaves) * weights).sum(), leaves)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad((power_retention_reference(*exact) * weights.double()).sum(), exact)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.slow  # two Inductor compiles, the second of the chunked joint graph under dynamic shapes: about 20-45 s
def test_torch_compile_dynamic_training_after_a_recompile():
    """Regression: compiled with ``dynamic=True``, a training call at T=16 (one chunk) and then at T=40 (chunked: a
    recompile, in which q's and k's lengths became two symbols) failed in Inductor with an AssertionError on the
    prefix piece, sized ``Max(0, Tk - Tq)`` by ``torch.sym_max`` and 0 where traced. An empty prefix is now a literal 0
    (``chunked._excess``: 0 at equal lengths, under a guard). Every call matches the oracle's gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)

    def attention(q, k, v, log_gate, valid):
        return rc.power_retention(q, k, v, log_gate=log_gate, valid=valid, chunk_size=16)

    compiled = torch.compile(attention, dynamic=True)
    for T in (16, 40, 72):
        q, k = torch.randn(2, 4, T, 4, generator=gen), torch.randn(2, 2, T, 4, generator=gen)
        v, log_gate = torch.randn(2, 2, T, 3, generator=gen), -torch.rand(2, 2, T, generator=gen)
        valid = torch.ones(2, T, dtype=torch.bool)
        valid[0, :3] = False
        weights = torch.randn(2, 4, T, 3, generator=gen)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, log_gate)]
        grads = torch.autograd.grad((compiled(*leaves, valid) * weights).sum(), leaves)
        exact = [t.double().requires_grad_() for t in (q, k, v, log_gate)]
        expected = power_retention_reference(*exact[:3], log_gate=exact[3], valid=valid)
        expected = torch.autograd.grad((expected * weights.double()).sum(), exact)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
