"""The Triton backward on a GPU, through the op's autograd, against the float64 oracle's autograd.

Relative error ``|g - ref| / |ref|`` of dq, dk, dv and d log_gate <= 2e-2 for bf16 and <= 1e-4 for fp32, never
NaN, over head dims {32, 64, 128}, degrees {2, 4}, lengths {1, 17, 1000, 4096}, GQA groups {1, 4}, random
per-token per-head gates (none, per kv head, per query head), key validity, decode (Tq = 1, Tk = 5000), non-causal
and |q|, |k| ~ 1e2 (``triton_forward`` + ``triton_backward``, chunk 256: deg 2 past 256 keys runs the chunked
kernels; float allocations poisoned with NaN); the op's autograd must reach ``codegen.triton_backward``, and
Inductor's backward code must contain the kernels.
"""

from __future__ import annotations

import re

import pytest
import torch

import retention_compile as rc
import retention_compile.codegen as codegen
from retention_compile.codegen import backward as backward_module
from retention_compile.codegen import triton_backward, triton_forward
from retention_compile.planning import Plan
from retention_compile.reference import power_retention_reference
from retention_compile.testing import single_key_gradient_floor

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
PLAN = Plan(chunk_size=256, block_t=64, block_feature=16, block_e=64)  # deg 2 past 256 keys: the chunked kernels
bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Replace ``module.name`` for the test by a wrapper that records each call; returns the record."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture
def backward_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of ``codegen.triton_backward`` (the op imports it from ``codegen`` at call time)."""
    return count_calls(monkeypatch, codegen, "triton_backward")


def check(
    B, Hq, Hk, Tq, Tk, d, e, deg, dtype, gate, has_valid, causal, *, magnitude=1.0, op=False, chunk_size=None, resets=()
) -> None:
    """``triton_forward`` + ``triton_backward`` (or, with ``op``, the op's autograd) against the oracle's autograd;
    ``resets``: keys whose log-gate is -inf (hard resets).

    With a single key (Tk = 1) the true dq, dk are O(eps / w) and dg is exactly 0 (g_0 cancels in every
    G_i - G_j): the backward reads them off ``dy . (v - y)`` (y in float32, from weights rounded to the dots'
    dtype), which cannot resolve them to 2e-2, so there the reference norm is floored at 1e-2 |dy| (the bound
    becomes absolute: tol x 1e-2 |dy|); elsewhere the bound is relative."""
    gen = torch.Generator(device="cuda").manual_seed(Tq * 7 + Tk + d + deg)

    def randn(*shape):
        return (torch.randn(*shape, device="cuda", generator=gen) * magnitude).to(dtype)

    q, k, v = randn(B, Hq, Tq, d), randn(B, Hk, Tk, d), randn(B, Hk, Tk, e) / magnitude
    gate_heads = {None: 0, "k": Hk, "q": Hq}[gate]
    log_gate = -0.1 * torch.rand(B, gate_heads, Tk, device="cuda", generator=gen) if gate_heads else None
    if resets:
        log_gate[..., list(resets)] = float("-inf")
    valid = torch.rand(B, Tk, device="cuda", generator=gen) > 0.2 if has_valid else None
    if valid is not None:
        valid[:, -1] = True
    grad_y = torch.randn(B, Hq, Tq, e, device="cuda", generator=gen).to(dtype)
    options = {"deg": deg, "causal": causal, "valid": valid, "log_gate": log_gate}
    if op:
        leaves = [t.detach().requires_grad_() for t in (q, k, v) + (() if log_gate is None else (log_gate,))]
        gate_leaf = leaves[3] if log_gate is not None else None
        chunk = chunk_size or PLAN.chunk_size
        y = rc.power_retention(*leaves[:3], chunk_size=chunk, **(options | {"log_gate": gate_leaf}))
        y.backward(grad_y)
        grads = [t.grad for t in leaves]
    else:
        options["scale"] = d**-0.5
        y, den = triton_forward(q, k, v, plan=PLAN, **options, for_backward=True)
        grads = [g for g in triton_backward(grad_y, q, k, v, y, den, plan=PLAN, **options) if g is not None]
        del options["scale"]
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v) + (() if log_gate is None else (log_gate,))]
    ref_gate = ref_leaves[3] if log_gate is not None else None
    ref = power_retention_reference(*ref_leaves[:3], **(options | {"log_gate": ref_gate}))
    ref.backward(grad_y.double())
    tol, floor = TOL[dtype], single_key_gradient_floor(grad_y) if Tk == 1 else 1e-300
    for name, got, want in zip("qkvg", grads, ref_leaves):
        assert got.dtype == (log_gate.dtype if name == "g" else dtype)
        assert got.shape == want.shape and torch.isfinite(got).all(), f"d{name} is not finite"
        err = float((got.double() - want.grad).norm() / max(float(want.grad.norm()), floor))
        assert err <= tol, f"d{name}: relative error {err:.2e} > {tol}"


GRID = [
    (d, deg, T, group, ("none", "k", "q")[i % 3], i % 2 == 1)
    for i, (d, deg, T, group) in enumerate(
        (d, deg, T, group) for d in (32, 64, 128) for deg in (2, 4) for T in (1, 17, 1000, 4096) for group in (1, 4)
    )
]


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize(("d", "deg", "T", "group", "gate", "has_valid"), GRID)
def test_grid(d: int, deg: int, T: int, group: int, gate: str, has_valid: bool) -> None:
    check(1, 4, 4 // group, T, T, d, d, deg, bf16, None if gate == "none" else gate, has_valid, True)


CASES = {
    # name: (B, Hq, Hk, Tq, Tk, d, e, deg, dtype, gate, valid, causal)
    "decode-deg2": (2, 4, 1, 1, 5000, 64, 64, 2, bf16, "k", True, True),
    "decode-deg4": (1, 4, 1, 1, 5000, 64, 64, 4, bf16, "q", False, True),
    "prefill-cache": (1, 4, 2, 700, 4000, 64, 32, 2, bf16, "k", True, True),
    "noncausal-deg2-chunked": (1, 4, 1, 1000, 3000, 64, 64, 2, bf16, None, True, False),
    "noncausal-deg2-quadratic": (1, 4, 4, 200, 200, 64, 64, 2, bf16, None, False, False),
    "noncausal-deg4": (1, 4, 1, 333, 2000, 32, 32, 4, bf16, None, True, False),
    "fp32-chunked": (1, 4, 2, 1000, 1000, 64, 64, 2, f32, "k", True, True),
    "fp32-quadratic-deg4": (1, 2, 1, 1000, 1000, 32, 32, 4, f32, "q", True, True),
    "fp32-decode": (1, 4, 1, 1, 5000, 64, 64, 2, f32, "k", False, True),
    # float16 runs the float32 kernels (codegen.forward.kernel_inputs); d = e = 128 has the widest fp32 tiles
    "fp16-d128-chunked": (1, 4, 2, 1000, 1000, 128, 128, 2, f16, "k", True, True),
    "fp16-deg4-narrow-values": (2, 4, 2, 90, 90, 16, 8, 4, f16, None, True, True),
}


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name: str) -> None:
    check(*CASES[name])


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize(("dtype", "chunk_size"), [(bf16, 1024), (bf16, 1 << 20), (f32, 256)])
def test_document_resets(dtype: torch.dtype, chunk_size: int) -> None:
    """Hard resets (log-gate -inf: documents packed in one sequence) at a chunk's first key, mid-chunk and past the
    middle, through the op's autograd: every gradient finite and within the bound (before ``gates.log_gate_floor``,
    G differences of -inf - -inf made them NaN; the CPU interpreter's cases are float32 and tiny)."""
    check(1, 4, 1, 4096, 4096, 64, 64, 2, dtype, "k", False, True, op=True, chunk_size=chunk_size,
          resets=(1024, 1500, 3001))  # fmt: skip


# gated cases for the backward's gate factorings, each switch setting: dkv_kernel's rows after each key block
# (backward.FACTORED_GATE_ROWS, on by default at deg 2) and dq_kernel's key steps before its rows
# (FACTORED_DQ_GATE, on by default): the chunked plan's 256-key chunks hold 4 key blocks of 64, so 3 of them have
# rows after them in their chunk; single-chunk d = 128; deg 4 (dkv_kernel keeps one exp per weight there either way)
GATE_CASES = {
    "chunked-gqa-valid": (1, 4, 1, 1000, 1000, 64, 64, 2, bf16, "k", True, True),
    "chunked-query-head-gate": (1, 4, 2, 1000, 1000, 64, 64, 2, bf16, "q", False, True),
    "prefill-cache": (1, 4, 2, 700, 4000, 64, 32, 2, bf16, "k", True, True),
    "quadratic-d128": (1, 4, 1, 1000, 1000, 128, 128, 2, bf16, "k", True, True),
    "quadratic-deg4": (1, 4, 1, 1000, 1000, 32, 32, 4, bf16, "k", True, True),
    "fp32-chunked": (1, 4, 2, 1000, 1000, 64, 64, 2, f32, "k", True, True),
}
GATE_SWITCHES = {
    "per-weight": {"FACTORED_GATE_ROWS": False, "FACTORED_DQ_GATE": False},
    "factored-rows": {"FACTORED_GATE_ROWS": True, "FACTORED_DQ_GATE": False},
    "factored-dq": {"FACTORED_GATE_ROWS": False, "FACTORED_DQ_GATE": True},
}


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("switches", list(GATE_SWITCHES))
@pytest.mark.parametrize("name", list(GATE_CASES))
def test_gate_factorings(name: str, switches: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for switch, value in GATE_SWITCHES[switches].items():
        monkeypatch.setattr(backward_module, switch, value)
    check(*GATE_CASES[name])


@pytest.mark.parametrize(("deg", "T"), [(4, 1000), (2, 200), (2, 1000)])
def test_op_autograd_reaches_the_kernels(backward_calls: list[int], deg: int, T: int) -> None:
    """``rc.power_retention``'s autograd on CUDA runs ``codegen.triton_backward`` on the quadratic path and on the
    chunked one (deg 2 past one chunk); ungated, d = 64 here."""
    check(1, 4, 2, T, T, 64, 64, deg, bf16, None, True, True, op=True)
    assert backward_calls


def test_op_autograd_gated_16bit(backward_calls: list[int]) -> None:
    """Gated bf16 calls on the quadratic path run the Triton backward and match the oracle."""
    check(1, 4, 2, 200, 200, 64, 64, 2, bf16, "k", True, True, op=True)
    assert backward_calls


def test_op_autograd_chunked_gated_16bit(backward_calls: list[int]) -> None:
    """The chunked path through the op (the Triton forward and backward): gradients, d log_gate included, match
    the oracle."""
    check(1, 4, 2, 1000, 1000, 64, 64, 2, bf16, "k", True, True, op=True)
    assert backward_calls


def test_op_autograd_wide_chunked(backward_calls: list[int]) -> None:
    """d = 128 past one chunk through the op: the Triton chunked backward (36 pair tiles), right."""
    check(1, 2, 1, 600, 600, 128, 128, 2, bf16, "q", False, True, op=True)
    assert backward_calls


@pytest.mark.parametrize("deg", [2, 4])
def test_large_inputs_stay_finite(deg: int) -> None:
    """|q|, |k| entries ~ 1e2: (s q.k)^4 ~ 1e19 and its gradients stay in fp32 / bf16 range."""
    check(1, 2, 1, 2000, 2000, 64, 64, deg, bf16, "k", False, True, magnitude=100.0)


def test_backward_kernels_in_inductor_code() -> None:
    """Under torch.compile the backward graph's code contains the rendered backward kernels."""
    from torch._inductor.utils import run_and_get_code

    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=bf16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: rc.power_retention(q, k, v, deg=4))

    def step():
        out = compiled(q, k, v)
        out.float().square().sum().backward()
        return out

    _, code = run_and_get_code(step)
    text = "\n".join(code)
    for kernel in ("dq_kernel", "dkv_kernel"):
        assert kernel in text, f"{kernel} not in Inductor's output code"


def test_wide_fp32_chunked_backward_runs_aten(backward_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """float32, e = 256, chunked: the Triton forward, then (one warning) the aten backward, since fp32 tiles that
    wide need ~300 KB of shared memory in the backward (``codegen.backward.backward_unsupported``)."""
    monkeypatch.setattr(rc.ops, "_WARNED", set())
    with pytest.warns(UserWarning, match="Triton backward does not serve"):
        check(1, 2, 1, 600, 600, 64, 256, 2, f32, "k", True, True, op=True)
    assert not backward_calls


@pytest.mark.usefixtures("poison_allocations")
def test_narrow_bf16_heads_run_padded(backward_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 d = 8, the shapes of GPU fuzz seed 20261204 cases 629 and 639 (which faulted the unpadded dkv_kernel),
    and a gated GQA one: the op's autograd runs the Triton backward on q, k padded to 16 columns, and the gradients
    match the oracle's. So for d = 24 with e = 40, non-causal with validity (seed 20261301's class, whose dq and dk
    were 90-110% off unpadded), padded to 32."""
    padded = count_calls(monkeypatch, backward_module, "_padded_head_backward")
    check(3, 2, 2, 128, 91, 8, 64, 2, bf16, None, False, True, op=True)
    check(1, 2, 2, 68, 68, 8, 64, 2, bf16, None, False, True, op=True)
    check(2, 4, 2, 300, 300, 8, 32, 2, bf16, "k", True, True, op=True)
    check(2, 2, 2, 779, 1455, 24, 40, 2, bf16, None, True, False, op=True)
    assert len(backward_calls) == 4 and len(padded) == 4


# A length of 1 is a constant to the kernels (Triton specializes an integer argument equal to 1, eager launches and
# Inductor's alike), a loop over those rows or keys folds away, and ptxas 12.8 (Triton 3.6) miscompiled such bf16
# kernels of d 16 and 32: GPU fuzz seed 69690001 case 599 (d 8 padded to 16, e 64, deg 4, non-causal, Tq 1, Tk 3126)
# faulted in dkv_kernel so on the H100. The op now runs a single key after a key of zeros and the backward's single
# non-causal row after a row of zeros (``forward.single_key_padded``, ``backward.backward_rows``); the offline scan
# (``benchmarks/miscompiled_lengths.py``) flags the other shapes below (all 9 passed on an H200, session 70)
ONE_LENGTH_CASES = {
    "one-row-noncausal": (2, 1, 1, 1, 3126, 16, 64, 4, bf16, None, True, False),
    "one-row-noncausal-chunked": (1, 4, 1, 1, 3000, 64, 64, 2, bf16, None, True, False),
    "one-row-noncausal-fp32": (2, 1, 1, 1, 3126, 32, 64, 4, f32, None, True, False),
    "one-row-causal": (2, 1, 1, 1, 3126, 16, 64, 4, bf16, "k", True, True),
    "one-key-noncausal": (1, 4, 1, 1000, 1, 64, 64, 2, bf16, None, False, False),
    "one-key-noncausal-deg4": (2, 1, 1, 3126, 1, 16, 64, 4, bf16, None, True, False),
    "one-key-noncausal-d32": (1, 4, 1, 1000, 1, 32, 32, 2, bf16, None, False, False),
    "one-token-prefill-d32": (1, 4, 1, 1, 1, 32, 32, 2, bf16, "k", False, True),
    "one-key-keyless-rows-d32": (1, 1, 1, 1000, 1, 32, 32, 2, bf16, None, False, True),
}


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("name", list(ONE_LENGTH_CASES))
def test_one_row_or_one_key_through_the_op(name: str) -> None:
    check(*ONE_LENGTH_CASES[name], op=True)


def test_kept_states_skip_the_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16, d = e = 64, chunk 1024, T = 3000 (3 chunks), gated, GQA: the op keeps the forward's chunk states (at
    0.66x y's bytes, within ``ops.KEPT_STATES_MAX_RATIO``), its backward runs no state kernel, and the gradients
    match the oracle; compiled, Inductor's backward code launches a reverse state kernel (Triton's or CUDA's) but
    not the forward's, and gives the eager gradients."""
    from torch._inductor.utils import run_and_get_code

    from retention_compile.codegen import backward

    recomputed = count_calls(monkeypatch, backward, "_chunk_states")
    check(1, 4, 2, 3000, 3000, 64, 64, 2, bf16, "k", True, True, op=True, chunk_size=1024)
    assert not recomputed

    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, h, 3000, 64, device="cuda", generator=gen, dtype=bf16) for h in (4, 2, 2))
    gate = -0.1 * torch.rand(1, 2, 3000, device="cuda", generator=gen)

    def grads(fn) -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_() for t in (q, k, v, gate)]
        out = fn(*leaves[:3], log_gate=leaves[3], chunk_size=1024)
        out.float().square().sum().backward()
        return [t.grad for t in leaves]

    eager = grads(rc.power_retention)
    compiled, code = run_and_get_code(grads, torch.compile(rc.power_retention))
    # the forward runs the Triton state kernel or the CUDA one (``codegen="auto"`` picks the faster on this GPU and
    # shape, timed under whatever else runs), and the backward the reverse state kernel of the same kind
    reverse, forward_states = r"reverse_state_kernel|cuda_reverse_states", r"\bstate_kernel|cuda_chunk_states"
    backward_code = [c for c in code if re.search(reverse, c)]
    forward_code = [c for c in code if not re.search(reverse, c)]
    assert backward_code and any(re.search(forward_states, c) for c in forward_code)
    assert not any(re.search(forward_states, c) for c in backward_code)
    for name, got, want in zip("qkvg", compiled, eager):
        err = float((got.double() - want.double()).norm() / want.double().norm())
        assert err < 1e-2, f"compiled d{name} differs from eager by {err:.2e}"
