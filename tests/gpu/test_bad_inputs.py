"""The bad-input matrix on a GPU (the CPU side is tests/test_bad_inputs.py): head dims and dtypes the Triton
kernels do not take fall back to the aten path with one warning and a correct result; empty and one-token
sequences; non-contiguous and expanded inputs through the kernels; NaN and inf; no triton; ``impl="cuda"``;
and 1M tokens in memory linear in T.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import retention_compile as rc
from retention_compile import ops
from retention_compile.codegen.forward import triton_supports
from retention_compile.reference import power_retention_reference

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the op's one-time fallback warnings anew."""
    monkeypatch.setattr(ops, "_WARNED", set())


def make(B=2, Hq=4, Hk=2, Tq=300, Tk=300, d=64, e=64, dtype=torch.bfloat16, *, gate=True, padded=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    q, k, v = randn(B, Hq, Tq, d), randn(B, Hk, Tk, d), randn(B, Hk, Tk, e)
    log_gate = -0.05 * torch.rand(B, Hk, Tk, generator=gen, device="cuda") if gate else None
    valid = torch.rand(B, Tk, generator=gen, device="cuda") > 0.2 if padded else None
    return q, k, v, log_gate, valid


def relative_error(y: torch.Tensor, q, k, v, log_gate, valid, causal: bool = True) -> float:
    gate = None if log_gate is None else log_gate.double()
    expected = power_retention_reference(q.double(), k.double(), v.double(), log_gate=gate, causal=causal, valid=valid)
    return float((y.double() - expected).norm() / expected.norm().clamp_min(1e-300))


def calls_warned(n: int, *args, **kwargs) -> tuple[torch.Tensor, list[str]]:
    """Run the op ``n`` times; its output and the warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            y = rc.power_retention(*args, **kwargs)
        torch.cuda.synchronize()
    return y, [str(w.message) for w in caught if "retention_compile" in str(w.message)]


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("d,e", [(80, 64), (96, 96), (256, 64), (100, 64), (264, 32), (64, 300)])
def test_head_dims(d: int, e: int, chunk: int | None) -> None:
    """Whatever the kernels take runs there silently; anything else warns once and is still correct."""
    q, k, v, gate, valid = make(d=d, e=e)
    reason = triton_supports(q, k, v, 2, gate, valid, True)
    if d in (100, 264) or e == 300:
        assert reason is not None
    y, warned = calls_warned(2, q, k, v, log_gate=gate, valid=valid, chunk_size=chunk)
    assert len(warned) == (0 if reason is None else 1), warned
    if reason is not None:
        assert reason in warned[0] and "aten path" in warned[0]
    assert relative_error(y, q, k, v, gate, valid) <= TOL[q.dtype]


def test_float64_on_the_gpu_falls_back_with_one_warning() -> None:
    q, k, v, gate, valid = make(dtype=torch.float64)
    y, warned = calls_warned(2, q, k, v, log_gate=gate.double(), valid=valid)
    assert len(warned) == 1 and "float64" in warned[0]
    assert y.dtype == torch.float64 and y.is_cuda
    assert relative_error(y, q, k, v, gate, valid) <= 1e-10


@pytest.mark.parametrize("Tq,Tk", [(0, 0), (0, 7), (5, 0), (1, 1), (1, 500), (3, 1)])
def test_empty_and_single_token(Tq: int, Tk: int) -> None:
    q, k, v, gate, valid = make(Tq=Tq, Tk=Tk)
    y, warned = calls_warned(1, q, k, v, log_gate=gate, valid=valid)
    assert not warned and y.shape == (2, 4, Tq, 64)
    if Tk == 0:
        assert torch.equal(y, torch.zeros_like(y))
    elif Tq > 0:
        assert relative_error(y, q, k, v, gate, valid) <= TOL[q.dtype]


def test_non_contiguous_and_expanded_inputs_through_the_kernels() -> None:
    B, Hq, Hk, T, d = 2, 4, 2, 700, 64

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    layouts = {
        "transposed": (randn(B, T, Hq, d).transpose(1, 2), randn(B, T, Hk, d).transpose(1, 2), randn(B, Hk, d, T).mT),
        "sliced": (randn(B, Hq, 2 * T, d)[:, :, ::2], randn(B, Hk, T, 2 * d)[..., ::2], randn(B, 2 * Hk, T, d)[:, ::2]),
        # stride 0 over heads (q), batch (k) and value columns (v). Not over k's time axis: keys all equal make
        # every weight of a row equal, and rows with q nearly orthogonal to that key then divide two tiny sums
        # (ill-conditioned: the chunked bf16 form, whose phi(q) . S rounds to bf16, was off by 2e2 there)
        "expanded": (randn(B, 1, T, d).expand(B, Hq, T, d), randn(1, Hk, T, d).expand(B, Hk, T, d),
                     randn(B, Hk, T, 1).expand(B, Hk, T, d)),
    }  # fmt: skip
    for name, (q, k, v) in layouts.items():
        assert triton_supports(q, k, v, 2, None, None, True) is None, name
        for chunk in (None, 64):
            y, warned = calls_warned(1, q, k, v, chunk_size=chunk)
            assert not warned, name
            assert relative_error(y, q, k, v, None, None) <= 1e-2, (name, chunk)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize(
    "which,value", [("q", NAN), ("q", INF), ("k", NAN), ("k", -INF), ("v", NAN), ("v", INF), ("log_gate", NAN)]
)
def test_nan_and_inf_through_the_kernels(which: str, value: float, chunk: int | None) -> None:
    """No crash, no hang; rows that read the element are not finite; other batches and kv heads are unchanged."""
    q, k, v, gate, _ = make(Tq=400, Tk=400, padded=False)
    clean, _ = calls_warned(1, q, k, v, log_gate=gate, chunk_size=chunk)
    bad = {"q": q, "k": k, "v": v, "log_gate": gate}
    bad[which] = bad[which].clone()
    bad[which][1, 1, 200] = value
    y, warned = calls_warned(1, bad["q"], bad["k"], bad["v"], log_gate=bad["log_gate"], chunk_size=chunk)
    assert not warned
    heads = [1] if which == "q" else [2, 3]
    reading = torch.zeros(2, 4, 400, dtype=torch.bool, device="cuda")
    if which == "q":
        reading[1, 1, 200] = True
    else:
        reading[1, heads, 200:] = True
    assert not torch.isfinite(y).all(-1)[reading].any()
    untouched = torch.ones(2, 4, dtype=torch.bool, device="cuda")
    untouched[1, heads] = False
    assert torch.equal(y[untouched], clean[untouched])


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("T,chunk", [(300, None), (3000, None), (3000, 256)])  # single chunk; the op's chunks; small
def test_padded_keys_holding_garbage_change_nothing(T: int, chunk: int | None, value: float) -> None:
    """Keys that ``valid`` masks out weigh 0 whatever k and v hold there: the query kernel read v at them unmasked,
    and 0 * NaN made rows NaN (caught by the interpreter's padding cases; the aten forms zero them). y and the
    gradients (0 at the padded keys) match the run with zeros there."""
    q, k, v, gate, valid = make(Tq=T, Tk=T)
    padded = ~valid[:, None, :, None]
    dirty = [t.masked_fill(padded, value).requires_grad_() for t in (k, v)]
    clean = [t.masked_fill(padded, 0.0).requires_grad_() for t in (k, v)]
    q = q.requires_grad_()
    dy = torch.randn_like(q)
    results = []
    for k_in, v_in in (dirty, clean):
        y = rc.power_retention(q, k_in, v_in, log_gate=gate, valid=valid, chunk_size=chunk)
        dq, dk, dv = torch.autograd.grad(y, (q, k_in, v_in), dy)
        results.append((y, dq, dk, dv))
    assert relative_error(results[0][0], *(t.detach() for t in (q, *clean)), gate, valid) <= 1e-2
    for name, got, want in zip(("y", "dq", "dk", "dv"), *results):
        assert torch.isfinite(got).all(), name
        assert float((got.double() - want.double()).norm() / want.double().norm()) <= 1e-2, name


def test_cuda_target_names_why_it_cannot_serve() -> None:
    q, k, v, *_ = make(Tq=16, Tk=16)
    with pytest.raises(RuntimeError, match=r"impl='cuda' cannot serve.*Use 'auto'"):
        rc.power_retention(q, k, v, impl="cuda")


WITHOUT_TRITON = """
    import json, sys, warnings
    sys.modules["triton"] = None  # as if triton were not installed
    import torch
    import retention_compile as rc
    from retention_compile.reference import power_retention_reference
    q, k, v = (torch.randn(1, 4, 500, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = [rc.power_retention(q, k, v) for _ in range(2)][-1]
    expected = power_retention_reference(q.double(), k.double(), v.double())
    error = float((y.double() - expected).norm() / expected.norm())
    print(json.dumps({"error": error, "warnings": [str(w.message) for w in caught if "retention" in str(w.message)]}))
"""


def test_without_triton_on_the_gpu() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_TRITON)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1 and "triton is not installed" in result["warnings"][0]
    assert result["error"] <= 1e-2


def peak_extra_bytes(T: int) -> tuple[int, torch.Tensor, tuple]:
    """Bytes allocated at the peak of one forward beyond its inputs, its output, and the inputs."""
    inputs = make(B=1, Hq=2, Hk=1, Tq=T, Tk=T, gate=True, padded=False, seed=T)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    q, k, v, gate, _ = inputs
    y = rc.power_retention(q, k, v, log_gate=gate)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, y, inputs


def test_a_million_tokens_in_linear_memory() -> None:
    """T = 2^20 (bf16, d = e = 64, gated, GQA 2:1): the peak beyond the inputs stays within a few times the
    input size and grows like T (against T = 2^18), and the first and last query rows match the oracle."""
    T = 1 << 20
    small, _, _ = peak_extra_bytes(T // 4)
    large, y, (q, k, v, gate, _) = peak_extra_bytes(T)
    input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    print(f"T={T}: peak beyond inputs {large / 2**20:.0f} MiB (inputs {input_bytes / 2**20:.0f} MiB); "
          f"T={T // 4}: {small / 2**20:.0f} MiB")  # fmt: skip
    assert large <= 4 * input_bytes
    assert large <= 5 * small  # linear: 4x; quadratic would be 16x
    assert torch.isfinite(y).all()
    for rows in (slice(0, 128), slice(T - 128, T)):
        stop = rows.stop  # causal, Tq = Tk: row block [r0, r1) reads keys [0, r1)
        expected = power_retention_reference(
            q[:, :, rows].double(), k[:, :, :stop].double(), v[:, :, :stop].double(),
            log_gate=gate[..., :stop].double(),
        )  # fmt: skip
        error = float((y[:, :, rows].double() - expected).norm() / expected.norm())
        assert error <= 1e-2, f"rows {rows}: relative error {error:.2e}"


@pytest.mark.parametrize("chunk_size", [None, 64])  # the single-chunk kernel, and states across chunks
@pytest.mark.parametrize("rise", [0.002, 0.05, 2.0])
def test_positive_log_gate_is_named_or_fails_loudly(monkeypatch: pytest.MonkeyPatch, chunk_size, rise: float) -> None:
    """A positive log-gate (+rise per key over 300 keys, G up to 0.6 / 15 / 600) breaks the contract. With
    ``CHECK_GATE_VALUES = "all"`` the eager call raises naming it; unchecked (the GPU default), each row is either
    non-finite (its weights overflowed float32) or within the dtype's tolerance of the float64 oracle, for these
    inputs (not a guarantee: a row whose denominator alone overflowed would read 0)."""
    q, k, v, _, _ = make(B=1, padded=False)
    gate = torch.full((1, 2, 300), rise, device="cuda")
    monkeypatch.setattr(rc.checks, "CHECK_GATE_VALUES", "all")
    with pytest.raises(rc.RetentionInputError, match="log_gate must be <= 0"):
        rc.power_retention(q, k, v, log_gate=gate, chunk_size=chunk_size)
    monkeypatch.setattr(rc.checks, "CHECK_GATE_VALUES", "cpu")
    y = rc.power_retention(q, k, v, log_gate=gate, chunk_size=chunk_size).double()
    ref = power_retention_reference(q.double(), k.double(), v.double(), log_gate=gate.double())
    finite = torch.isfinite(y).all(-1)
    assert torch.isfinite(ref).all()
    err = (y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
    assert (err[finite] <= 3 * TOL[q.dtype]).all(), f"finite rows off the oracle: {float(err[finite].max()):.3g}"
    if rise == 0.002:
        assert finite.all()
