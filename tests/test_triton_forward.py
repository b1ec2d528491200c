"""The Triton forward kernels on the CPU: rendered sources, the on-disk cache, and the kernels themselves run by
Triton's interpreter on tiny float32 shapes against the float64 oracle.

``TRITON_INTERPRET=1`` must be set before triton is first imported (``triton.language`` builds its helpers at
import), so the kernel cases run in one subprocess that executes this file as a script and reports JSON.
The interpreter has no bf16 matrix product (it multiplies the raw bits), so 16-bit inputs are covered by the GPU
tests only (tests/gpu/test_triton_forward.py).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from retention_compile.codegen import fitting, forward, nvrtc, triton_source  # noqa: E402
from retention_compile.codegen.backward import BackwardSpec  # noqa: E402
from retention_compile.codegen.fitting import fit_shared_memory  # noqa: E402
from retention_compile.codegen.forward import kernel_spec, triton_forward, triton_supports  # noqa: E402
from retention_compile.codegen.triton_source import KernelSpec, load_forward, render_forward  # noqa: E402
from retention_compile.planning import Plan  # noqa: E402
from retention_compile.reference import EPS, power_retention_reference, power_retention_weights  # noqa: E402
from retention_compile.testing import interpreted_fixture, nan_filled_empty  # noqa: E402

TINY = {"block_t": 16, "block_feature": 16, "block_e": 32}


def _spec(**changes: object) -> KernelSpec:
    fields = dict(
        dtype="bfloat16", head_dim=64, value_dim=64, deg=2, gated=True, has_valid=False, causal=True, chunked=True,
        chunk_size=1024, block_t=128, block_k=64, block_s=64, block_e=64, block_feature=16,
    )  # fmt: skip
    fields.update(changes)
    return KernelSpec(**fields)


CASES = [
    # name: (B, Hq, Hk, Tq, Tk, d, e, deg, gate heads (0: none), valid, causal, chunk, segments)
    ("quadratic", (1, 2, 1, 37, 37, 32, 32, 2, 0, False, True, 1024, None)),
    ("quadratic-deg4-gate-valid", (2, 2, 2, 29, 29, 32, 16, 4, 2, True, True, 1024, None)),
    ("quadratic-decode", (1, 4, 1, 1, 70, 32, 32, 4, 1, False, True, 1024, None)),
    ("quadratic-noncausal", (1, 2, 2, 21, 45, 48, 24, 2, 0, True, False, 1024, None)),
    ("quadratic-tq-gt-tk", (1, 1, 1, 40, 25, 32, 32, 2, 1, False, True, 1024, None)),
    ("quadratic-long", (1, 2, 1, 200, 200, 32, 32, 2, 0, False, True, 1024, None)),  # whole key blocks, ungated
    # the kernel's own sum of the log-gates: rows past 256 keys (two steps of the prefix), five key blocks
    ("quadratic-long-gate", (1, 2, 1, 300, 300, 32, 32, 2, 2, False, True, 1024, None)),
    ("quadratic-prefill-gate", (1, 2, 1, 21, 290, 32, 32, 2, 1, True, True, 1024, None)),
    ("chunked", (1, 2, 1, 40, 40, 32, 32, 2, 0, False, True, 16, None)),
    # rows 64 keys or more into their chunk: the query kernel's unmasked key blocks (the gate's factored form)
    ("chunked-long-gate", (1, 2, 1, 300, 300, 32, 32, 2, 2, False, True, 128, 2)),
    ("chunked-gate-valid-segments", (2, 2, 1, 45, 45, 32, 32, 2, 1, True, True, 16, 2)),
    # a later segment of 9 chunks: its first state is written by the scan alone, the others read and rewritten
    ("chunked-segment-steps", (1, 1, 1, 290, 290, 32, 32, 2, 0, False, True, 16, 2)),
    ("chunked-query-head-gate", (1, 4, 2, 33, 33, 32, 32, 2, 4, False, True, 16, 3)),
    ("chunked-prefill-cache", (1, 2, 2, 19, 61, 32, 24, 2, 2, True, True, 16, 2)),
    ("chunked-decode", (1, 2, 1, 1, 50, 32, 32, 2, 1, False, True, 16, 2)),
    ("chunked-tq-gt-tk", (1, 1, 1, 45, 30, 32, 32, 2, 1, False, True, 16, 2)),
    ("chunked-noncausal", (1, 2, 1, 27, 50, 32, 32, 2, 0, True, False, 16, 2)),
    ("chunked-d48", (1, 1, 1, 40, 40, 48, 40, 2, 1, False, True, 16, 2)),
]


def run_case(
    case: tuple,
    dtype: torch.dtype = torch.float32,
    gate_scale: float = 0.3,
    reset: float | None = None,
    padding: float | None = None,
) -> dict[str, float]:
    """Relative errors of ``triton_forward`` against the oracle on one case, ``{"y": ..., "denom": ...}`` (also
    checks shapes); the inputs are drawn in float32 and rounded to ``dtype``, the log-gates from
    ``-gate_scale * U(0, 1)``, with ``reset`` (a document boundary) as the log-gate of the keys in ``RESET_KEYS``;
    ``padding`` (a case with key validity): the kernels read k and v holding that value at the keys ``valid`` masks
    out, the oracle the drawn values (a padded key's weight is 0 whatever it holds)."""
    B, Hq, Hk, Tq, Tk, d, e, deg, gate_heads, has_valid, causal, chunk, segments = case
    gen = torch.Generator().manual_seed(sum(map(hash, case)) % 2**31)
    q = torch.randn(B, Hq, Tq, d, generator=gen).to(dtype)
    k = torch.randn(B, Hk, Tk, d, generator=gen).to(dtype)
    v = torch.randn(B, Hk, Tk, e, generator=gen).to(dtype)
    gate = -gate_scale * torch.rand(B, gate_heads, Tk, generator=gen) if gate_heads else None
    if reset is not None:
        gate[..., RESET_KEYS] = reset
    valid = torch.rand(B, Tk, generator=gen) > 0.25 if has_valid else None
    plan = Plan(chunk_size=chunk, **TINY)
    assert triton_supports(q, k, v, deg, gate, valid, causal) is None
    assert kernel_spec(q, v, deg, gate is not None, has_valid, causal, Tk, plan).chunked == (chunk < Tk and deg == 2)
    scale = 0.7 / d**0.5
    k_in, v_in = k, v
    if padding is not None:
        padded = ~valid[:, None, :, None]
        k_in, v_in = k.masked_fill(padded, padding), v.masked_fill(padded, padding)
    with nan_filled_empty():
        y, den = triton_forward(
            q, k_in, v_in, scale=scale, deg=deg, log_gate=gate, causal=causal, valid=valid, plan=plan,
            segments=segments,
        )  # fmt: skip
    ref = power_retention_reference(
        q.double(), k.double(), v.double(), scale=scale, deg=deg, causal=causal, valid=valid,
        log_gate=None if gate is None else gate.double(),
    )  # fmt: skip
    assert y.dtype == torch.float32 and y.shape == (B, Hq, Tq, e)  # the accumulator's precision (the backward reads y)
    assert den.dtype == torch.float32 and den.shape == (B, Hq, Tq)
    assert torch.isfinite(den).all() and (den >= 0.999e-6).all()
    weights = power_retention_weights(
        q.double(), k.double(), scale=scale, deg=deg, causal=causal, valid=valid,
        log_gate=None if gate is None else gate.double(),
    )  # fmt: skip
    want = weights.sum(-1) + EPS  # denom = sum_j w_ij + eps: y alone would not see a factor common to a row's weights
    den_error = float(((den.double() - want).abs() / want).max())
    return {"y": float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)), "denom": den_error}


def denominator_error(chunk: int) -> dict[str, float]:
    """denom = sum_j w_ij + eps, checked directly on one causal head of fixed inputs (the strict bound holds there)."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 40, 32, generator=gen), torch.randn(1, 1, 40, 32, generator=gen)
    expected = torch.tril((0.2 * q[0, 0] @ k[0, 0].T).double() ** 2).sum(-1) + 1e-6
    _, den = triton_forward(
        q, k, torch.randn(1, 1, 40, 32), scale=0.2, deg=2, log_gate=None, causal=True, valid=None,
        plan=Plan(chunk_size=chunk, **TINY),
    )  # fmt: skip
    return {"denom of fixed inputs": float(((den[0, 0].double() - expected).abs() / expected).max())}


def large_inputs(
    deg: int, d: int, T: int = 8, log_gate: torch.Tensor | None = None, chunk: int = 1024
) -> dict[str, float]:
    """Entries of q and k in [90, 100] (the contract's |q|, |k| up to 1e2, all the same sign, so q . k is near its
    largest): the relative error of y and whether y and denom are finite. The weights (s q.k)^p stay below float32's
    range where (q.k)^p alone would not (deg 6, d = 256: (2.5e6)^6 overflows). ``log_gate`` (1, 1, T) and ``chunk``:
    the gate and chunk size of the call."""
    gen = torch.Generator().manual_seed(deg * 1000 + d)
    q, k = (90 + 10 * torch.rand(1, 1, T, d, generator=gen) for _ in range(2))
    v = torch.randn(1, 1, T, 32, generator=gen)
    options = {"scale": d**-0.5, "deg": deg, "log_gate": log_gate, "causal": True}
    y, den = triton_forward(q, k, v, **options, valid=None, plan=Plan(chunk_size=chunk, **TINY))
    gate = None if log_gate is None else log_gate.double()
    ref = power_retention_reference(q.double(), k.double(), v.double(), **{**options, "log_gate": gate})
    finite = bool(torch.isfinite(y).all() and torch.isfinite(den).all())
    return {"y": float((y.double() - ref).norm() / ref.norm()) if finite else float("inf"), "finite": float(finite)}


def span_gate(per_key: float, T: int = 40) -> torch.Tensor:
    """Constant log-gates ``per_key``: over a row block's masked keys (``TINY``'s 16 rows, 16 keys) G falls by
    15 |per_key| nats."""
    return torch.full((1, 1, T), per_key)


def cliff_gate(T: int = 40, rows: int = TINY["block_t"]) -> torch.Tensor:
    """-1 per key over the first row block (a span of 15 nats), then -10 per key (150 nats per later row block: the
    diagonal blocks' keys after a row take exp(G_i - G_j) = inf there, which must not reach y as NaN)."""
    return torch.cat([torch.full((rows,), -1.0), torch.full((T - rows,), -10.0)]).view(1, 1, T)


# row-block spans of 15.9, 16.5 and 105 nats and a cliff after the first row block, with large_inputs' q and k (the
# spans around 16 nats, where a factored diagonal form would have to switch to one exp per weight: sessions 52-54)
GATE_SPAN_CASES = {"span-15.9": span_gate(-15.9 / 15), "span-16.5": span_gate(-16.5 / 15), "span-105": span_gate(-7.0),
                   "cliff": cliff_gate()}  # fmt: skip


def aligned_call(q_len: int, kv_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(y, denom, state slots)`` of a causal call of ``q_len`` queries over ``kv_len`` keys in chunks of 16."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, t, 32, generator=gen) for t in (q_len, kv_len, kv_len))
    states: dict[str, torch.Tensor] = {}
    y, den = triton_forward(
        q, k, v, scale=0.2, deg=2, log_gate=None, causal=True, valid=None, plan=Plan(chunk_size=16, **TINY),
        states_out=states,
    )  # fmt: skip
    shaped = y.shape == (1, 2, q_len, 32) and den.shape == (1, 2, q_len) and y.is_contiguous() and den.is_contiguous()
    return y, den, states["S"].shape[1] if shaped else -1


def keyless_alignment() -> dict[str, float]:
    """Causal Tq = 45 > Tk = 30 over chunks of 16: the state slots the kernels used (2 when the chunks align with the
    keys, 3 aligned with all the queries; -1 for outputs of another shape), and the first Tq - Tk rows' largest |y|
    and |denom - eps|."""
    y, den, slots = aligned_call(45, 30, 3)
    return {
        "keyless-slots": slots,
        "keyless-y": float(y[:, :, :15].abs().max()),
        "keyless-denom": float((den[:, :, :15] - 1e-6).abs().max()),
    }


def short_cache_alignment() -> dict[str, float]:
    """Causal Tq = 38 < Tk = 40 over chunks of 16: the state slots the kernels used (3 when the chunks align with the
    keys, behind 2 rows of zeros before the queries; 4 aligned with the queries, a first chunk of 2 keys; -1 for
    outputs of another shape)."""
    return {"short-cache-slots": aligned_call(38, 40, 4)[2]}


def rounded_output_mismatches(case: tuple, dtype: torch.dtype) -> dict[str, float]:
    """The counts of elements that differ from the float32 y rounded to ``dtype`` (0 expected: the query kernel
    stores them from the same values): of ``y_out`` (filled with NaN first), stored beside the float32 y, and of the
    y returned with ``y_dtype=dtype``, stored alone."""
    B, Hq, Hk, Tq, Tk, d, e, deg, gate_heads, has_valid, causal, chunk, segments = case
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, t, w, generator=gen).to(dtype) for h, t, w in ((Hq, Tq, d), (Hk, Tk, d), (Hk, Tk, e)))
    gate = -0.3 * torch.rand(B, gate_heads, Tk, generator=gen) if gate_heads else None
    valid = torch.rand(B, Tk, generator=gen) > 0.25 if has_valid else None
    y_out = torch.full((B, Hq, Tq, e), float("nan"), dtype=dtype)
    options = {"scale": 0.7 / d**0.5, "deg": deg, "log_gate": gate, "causal": causal, "valid": valid}
    options.update(plan=Plan(chunk_size=chunk, **TINY), segments=segments)
    y, _ = triton_forward(q, k, v, **options, y_out=y_out)
    alone, _ = triton_forward(q, k, v, **options, y_dtype=dtype)
    rounded = y.to(dtype)
    alone_mismatches = float((alone != rounded).sum()) if alone.dtype == dtype else float("inf")
    return {"beside": float((y_out != rounded).sum()), "alone": alone_mismatches}


ROUNDED_OUTPUT_CASES = ("quadratic-deg4-gate-valid", "chunked-gate-valid-segments", "chunked-tq-gt-tk")
UNTRIMMED_CASES = ("quadratic-tq-gt-tk", "chunked-tq-gt-tk", "chunked-prefill-cache")
QUERY_T_CASES = ("chunked-gate-valid-segments", "chunked-decode", "chunked-noncausal", "chunked-d48")
# the state product in halves of each pair (KernelSpec.query_split, which NARROW_QUERY_LAUNCH takes for bf16)
QUERY_SPLIT_CASES = QUERY_T_CASES
# the denominator summed by a product with a column of ones (forward.DENOMINATOR_BY_DOT, which the float32 kernels the
# interpreter runs take only with DENOMINATOR_BY_DOT_FLOAT32; every other case sums rows): whole unmasked key blocks
# with and without a gate (the gated row decay between the two loops, where den_part is folded in), in both kernels,
# key validity, non-causal, GQA (a review's mutations of the fold fail the gated cases with whole blocks)
DEN_DOT_CASES = (
    "quadratic-long", "quadratic-long-gate", "quadratic-prefill-gate", "quadratic-deg4-gate-valid",
    "quadratic-noncausal", "chunked-long-gate", "chunked-prefill-cache",
)  # fmt: skip
FLOAT16_CASES = ("quadratic-deg4-gate-valid", "chunked-gate-valid-segments")
# log-gates -3 * U(0, 1): G falls by about 96 over a block of 64 keys, so a factor exp(G_a - G_b) of the wrong sign
# would overflow float32 (e^88), and the weights of keys more than about 60 back underflow to 0
STRONG_GATE_CASES = ("quadratic-long-gate", "chunked-long-gate")
# document boundaries at keys 10 and 150: log-gates of -1e4 (G past -2e4 after them in a plain float32 sum, whose
# rounding every later gate factor would carry: y 4.8-5.1e-4, session 61) and -inf (a hard reset: G differences of
# -inf - -inf gave NaN), both taken into G at the floor ``gates.log_gate_floor``, -105: y 3.7-4.8e-6 over three
# processes (2026-12-04); the bound of 2e-5 (``GATE_REACH_BOUNDS``) catches either
RESET_KEYS = [10, 150]
RESETS = {"-1e4": -1e4, "-inf": float("-inf")}
RESET_CASES = STRONG_GATE_CASES
# NaN in k and v at the keys ``valid`` masks out: the query kernel read v there unmasked, and 0 * NaN made every row
# of the chunk NaN (the aten forms zero them, ``ops._padding_zeroed``; the kernels mask their loads)
PADDING_CASES = (
    "quadratic-deg4-gate-valid",
    "chunked-gate-valid-segments",
    "chunked-prefill-cache",
    "chunked-noncausal",
)


def _interpreted() -> dict[str, object]:
    """Every kernel case in the interpreter: {case name: its relative errors by quantity (``run_case``), or a
    check's value} (run as a script, see the module docstring).

    The cases in ``QUERY_T_CASES`` run again with the query kernel's transposed state product, those in
    ``DEN_DOT_CASES`` with the denominator summed by a product (``forward.DENOMINATOR_BY_DOT`` and
    ``DENOMINATOR_BY_DOT_FLOAT32``: the interpreter runs the float32 kernels).
    """
    results = {name: run_case(case) for name, case in CASES}
    results.update({f"{name}-strong-gate": run_case(dict(CASES)[name], gate_scale=3.0) for name in STRONG_GATE_CASES})
    for label, reset in RESETS.items():
        results.update({f"{name}-reset{label}": run_case(dict(CASES)[name], reset=reset) for name in RESET_CASES})
    results.update({f"{name}-padding-nan": run_case(dict(CASES)[name], padding=float("nan")) for name in PADDING_CASES})
    results.update({f"denominator-chunk{c}": denominator_error(c) for c in (16, 1024)})
    results.update(keyless_alignment())
    results.update(short_cache_alignment())
    results.update({f"large-inputs-deg{deg}-d{d}": large_inputs(deg, d) for deg, d in ((6, 256), (4, 128))})
    for name, gate in GATE_SPAN_CASES.items():  # the single-chunk kernel, then chunks of 16
        for chunk in (1024, 16):
            results[f"large-inputs-{name}-chunk{chunk}"] = large_inputs(2, 32, gate.shape[-1], gate, chunk)
    # keyless_rows and rows_before_the_queries off: the kernels align the chunks with the queries themselves
    # (negative positions for Tq > Tk, a short first chunk for Tq < Tk), as they do where symbolic sizes leave the
    # relation open, and for Tq < Tk past EXACT_CHUNK_BELOW
    real_keyless, forward.keyless_rows = forward.keyless_rows, lambda q, k, causal: None
    real_before, forward.rows_before_the_queries = forward.rows_before_the_queries, lambda q, k, causal: None
    results.update({f"{name}-untrimmed": run_case(dict(CASES)[name]) for name in UNTRIMMED_CASES})
    forward.keyless_rows, forward.rows_before_the_queries = real_keyless, real_before
    # float16 inputs run the float32 kernels (forward.kernel_inputs), exact as float32 ones
    results.update({f"{name}-float16": run_case(dict(CASES)[name], torch.float16) for name in FLOAT16_CASES})
    for name in ROUNDED_OUTPUT_CASES:
        counts = rounded_output_mismatches(dict(CASES)[name], torch.float16)
        results.update({f"{name}-rounded-output-{where}": count for where, count in counts.items()})
    # bfloat16 with chunks of 16 keys runs the float32 kernels too (forward.small_chunk_float32)
    bf16_case = dict(CASES)["chunked-gate-valid-segments"]
    results["chunked-gate-valid-segments-bfloat16"] = run_case(bf16_case, torch.bfloat16)
    real_launch = forward.query_launch
    forward.query_launch = lambda spec, plan: dataclasses.replace(real_launch(spec, plan), split=2)
    results.update({f"{name}-query-split": run_case(dict(CASES)[name]) for name in QUERY_SPLIT_CASES})
    forward.query_launch = real_launch
    forward.QUERY_TRANSPOSED = not forward.QUERY_TRANSPOSED
    results.update({f"{name}-query-t": run_case(dict(CASES)[name]) for name in QUERY_T_CASES})
    forward.QUERY_TRANSPOSED = not forward.QUERY_TRANSPOSED
    forward.DENOMINATOR_BY_DOT = forward.DENOMINATOR_BY_DOT_FLOAT32 = True
    results.update({f"{name}-den-dot": run_case(dict(CASES)[name]) for name in DEN_DOT_CASES})
    return results


interpreted = interpreted_fixture(__file__, 300)


@pytest.mark.parametrize(
    "name",
    [n for n, _ in CASES]
    + ["denominator-chunk16", "denominator-chunk1024"]
    + [f"{n}-query-t" for n in QUERY_T_CASES]
    + [f"{n}-query-split" for n in QUERY_SPLIT_CASES]
    + [f"{n}-den-dot" for n in DEN_DOT_CASES]
    + [f"{n}-float16" for n in FLOAT16_CASES]
    + [f"{n}-strong-gate" for n in STRONG_GATE_CASES]
    + [f"{n}-reset{label}" for n in RESET_CASES for label in RESETS]
    + [f"{n}-padding-nan" for n in PADDING_CASES]
    + ["chunked-gate-valid-segments-bfloat16"]
    + [f"{n}-untrimmed" for n in UNTRIMMED_CASES],
)
def test_kernels_match_oracle(interpreted: dict[str, dict[str, float]], name: str) -> None:
    bound = GATE_REACH_BOUNDS.get(name, 1e-5)
    for quantity, error in interpreted[name].items():
        limit = max(bound, RESET_DENOM_BOUNDS.get(name, DENOM_BOUND)) if quantity == "denom" else bound
        assert error < limit, f"{name}: relative error of {quantity} {error:.2e}"


# denom_i = sum_j w_ij + eps, relative to itself row by row: a row with a key or two whose q . k nearly cancels has
# weights far below |q|^2 |k|^2, which float32's dot rounds relative to |q| |k|. Over 200 seeds of the quadratic case
# (2026-12-01) one row read 2.2e-5 (y: 2.3e-6); every other case's rows were below 1e-5. The contract's float32 bound.
DENOM_BOUND = 1e-4
# The reset cases' rows right after a reset see a key or two, as row 0 does, and their G (near 250) rounds each gate
# factor by up to 1.5e-5: over 12 processes their denominators read 2.5e-5 to 6.7e-5 (2026-12-04), against 3.9e-3 and
# NaN without the floor. y stays at its bound.
RESET_DENOM_BOUNDS = {f"{name}-reset{label}": 2e-4 for name in RESET_CASES for label in RESETS}


# Cases whose weights span a wide range in float32: about 300 keys of log-gates -0.3 * U(0, 1) take G to about -45,
# where a float32 G is off by up to 4e-6 and so is every exp(G_i - G_j) relatively; deg 4 with gates raises each
# weight's rounding to the fourth power's. The inputs are drawn afresh per process (the seed hashes the case's name):
# over 46 seeds (PYTHONHASHSEED 10-55, 2026-12-01) these read up to 1.02e-5, 8.6e-6, 7.4e-6 and 1.4e-5, and one
# CI-like run 1.63e-5 for the first. The contract's float32 bound is 1e-4. The strong gates take G to about -450
# (float32 off by up to 3e-5 there): 2.0e-5 to 2.4e-5 over 3 seeds (2026-12-01).
GATE_REACH_BOUNDS = {
    "quadratic-long-gate": 1e-4, "quadratic-prefill-gate": 1e-4, "quadratic-deg4-gate-valid": 1e-4,
    "quadratic-deg4-gate-valid-float16": 1e-4, "quadratic-deg4-gate-valid-padding-nan": 1e-4, "chunked-long-gate": 1e-4,
    **{f"{name}-strong-gate": 1e-4 for name in STRONG_GATE_CASES},
    **{f"{name}-reset{label}": 2e-5 for name in RESET_CASES for label in RESETS},
    **{f"{name}-den-dot": 1e-4 for name in ("quadratic-long-gate", "quadratic-prefill-gate",
                                           "quadratic-deg4-gate-valid", "chunked-long-gate")},
}  # fmt: skip


@pytest.mark.parametrize("name", ROUNDED_OUTPUT_CASES)
def test_query_kernel_stores_the_rounded_output(interpreted: dict[str, float], name: str) -> None:
    """``y_out`` (float16 here, the op's output dtype) is y rounded, element for element; for Tq > Tk too, where
    the rows before the first key are cast after the kernels ran. So is y stored alone in float16 (``y_dtype``, the
    op's forward with no backward to follow)."""
    assert interpreted[f"{name}-rounded-output-beside"] == 0.0
    assert interpreted[f"{name}-rounded-output-alone"] == 0.0


@pytest.mark.parametrize("name", ["large-inputs-deg6-d256", "large-inputs-deg4-d128"])
def test_large_inputs_stay_finite(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """|q|, |k| up to 1e2 give finite y and denom of the oracle's value at deg 4 and 6 (``large_inputs``)."""
    assert interpreted[name]["finite"] == 1.0 and interpreted[name]["y"] < 1e-5, interpreted[name]


@pytest.mark.parametrize("chunk", [1024, 16])
@pytest.mark.parametrize("name", list(GATE_SPAN_CASES))
def test_gate_spans_and_cliffs_with_large_inputs(
    interpreted: dict[str, dict[str, float]], name: str, chunk: int
) -> None:
    """Large q and k under gates whose span over a row block's masked keys (G_first - G_last) is 15.9, 16.5 and
    105 nats, and a cliff after the first row block, in the single-chunk and the chunked kernel: y and denom finite,
    of the oracle's value (a key after the row may take exp(G_i - G_j) = inf, which its select makes 0)."""
    result = interpreted[f"large-inputs-{name}-chunk{chunk}"]
    assert result["finite"] == 1.0 and result["y"] < 1e-5, result


def test_queries_before_the_first_key_are_left_out(interpreted: dict[str, float]) -> None:
    """Causal Tq > Tk: the kernels run on the rows with keys, so the chunks align with the keys (no first chunk of
    a few keys reached through the bf16 state alone: ``forward.keyless_rows``); the rows before the first key are
    y = 0, denom = eps (their oracle values; the rest is checked by the chunked-tq-gt-tk case)."""
    assert interpreted["keyless-slots"] == 2
    assert interpreted["keyless-y"] == 0.0 and interpreted["keyless-denom"] < 1e-12


def test_a_prefill_after_a_short_cache_aligns_the_chunks_with_the_keys(interpreted: dict[str, float]) -> None:
    """Causal 0 < Tk - Tq < EXACT_CHUNK_BELOW: rows of zeros before the queries make Tq = Tk, so the first chunk holds
    a whole chunk of keys, not the Tk - Tq that the next rows would reach through the bf16 state alone
    (``forward.rows_before_the_queries``; GPU fuzz seed 67676767 case 769). The outputs are the oracle's: the
    chunked-prefill-cache case (with the rows) and its -untrimmed run (without them)."""
    assert interpreted["short-cache-slots"] == 3


def test_rendered_source_bakes_the_shape() -> None:
    spec = _spec()
    source = render_forward(spec)
    ast.parse(source)
    assert source == render_forward(spec)  # deterministic
    for name in ("def attention_kernel", "def state_kernel", "def scan_kernel"):
        assert name in source
    assert "for step in range(10):" in source  # d=64, b=16: 4 coordinate blocks, 10 pairs
    halves = render_forward(dataclasses.replace(spec, query_split=2))
    assert "for step in range(20):" in halves and "tl.arange(0, 8)" in halves  # 8 coordinates of block I per step
    assert "tl.arange(0, 256)" in source and "* 2560" not in source  # 256 features per pair tile
    assert f"* {2560 * 64}" in source  # tiled state: 2560 features x e
    assert "G," in source and "VALID" not in source
    quadratic = render_forward(_spec(chunked=False, chunk_size=0, block_feature=0, block_s=0, gated=False, deg=4))
    ast.parse(quadratic)
    assert "state_kernel" not in quadratic and "G," not in quadratic
    assert "x2 = x * x" in quadratic and "w = x2 * x2" in quadratic
    fp32 = render_forward(_spec(dtype="float32"))
    assert 'input_precision="ieee"' in fp32 and "tl.bfloat16" not in fp32
    assert "tl.dot(q, kt) * scale" in quadratic and "scale2" not in quadratic  # deg 4: s on each q . k, as always
    assert "x2 = x * x\n" in source and "acc = acc * scale2" in source  # deg 2: s^2 once per row, after the loops


def test_kernels_a_traced_call_launches_have_no_inline_asm_with_side_effects() -> None:
    """Inductor's analysis of what a user kernel writes (torch's TTIR mutation analysis) accepts pure inline asm only:
    with one impure asm it takes every input as written, which copied q, k and v in a compiled training step (session
    68). Only the query kernel's wait beside the state kernel (eager launches, ``waits_for_states``) sleeps in inline
    asm; no other forward variant, and no backward kernel, has such asm."""
    from retention_compile.codegen.backward import BACKWARD_TEMPLATE
    from retention_compile.codegen.triton_source import TEMPLATE_DIR

    impure = "is_pure=False"
    single_chunk = {"chunked": False, "chunk_size": 0, "block_feature": 0, "block_s": 0}
    for gated, causal, chunked, cherries, packed in itertools.product((False, True), repeat=5):
        shape = {} if chunked else single_chunk
        spec = _spec(gated=gated and causal, causal=causal, cherries=cherries, packed_squares=packed, **shape)
        assert impure not in render_forward(spec), spec
    assert impure in render_forward(_spec(waits_for_states=True))
    assert impure not in (TEMPLATE_DIR / BACKWARD_TEMPLATE).read_text()


def test_packed_squares_apply_to_deg_2_in_16_bits_and_to_the_unmasked_blocks() -> None:
    """``with_packed_squares`` sets the flag for deg 2 with bf16 dots only; its render squares x in packed bf16 in the
    unmasked key blocks (gated: times the key's factor rounded to bf16) and keeps float32 squares in the masked ones;
    without the flag (a forward a backward follows) every block squares in float32."""
    for gated in (True, False):
        spec = _spec(gated=gated)
        packed = triton_source.with_packed_squares(spec)
        assert packed.packed_squares and not spec.packed_squares
        source = render_forward(packed)
        assert source.count("xb = x.to(tl.bfloat16)\n        w = xb * xb\n") == 1 and source.count("x2 = x * x\n") == 1
        assert ("exp2_ftz(tl.fma(" in source) == gated
        assert (source.count(")).to(tl.bfloat16)[None, :]") == 1) == gated
        assert "xb" not in render_forward(spec) and render_forward(spec).count("x2 = x * x\n") == 2
    for unchanged in (_spec(deg=4), _spec(dtype="float32")):
        assert triton_source.with_packed_squares(unchanged) == unchanged


def test_gated_attention_loops_take_ftz_exp_on_the_gpu_only() -> None:
    """The GPU render's attention loops take e^(a - b) by one fma, 2^(a log2 e - b log2 e) with a log2 e worked out
    once, and one ``ex2.approx.ftz.f32`` (inline PTX); the interpreter's render (``TRITON_INTERPRET=1`` runs no PTX)
    takes the same fma and ``tl.exp2``; the ungated render has neither."""
    gpu = triton_source.render(triton_source.FORWARD_TEMPLATE, _spec())
    # the unmasked blocks' key factor, and the diagonal blocks' one exp per weight (selected: 0 for a key after the row)
    assert "ex2.approx.ftz.f32" in gpu and gpu.count("w = w * exp2_ftz(tl.fma(") == 1
    assert "w = w * tl.where(keep, exp2_ftz(tl.fma(" in gpu
    interpreted = triton_source.render(triton_source.FORWARD_TEMPLATE, _spec(), interpret=True)
    assert "exp2_ftz" not in interpreted and "inline_asm" not in interpreted
    assert interpreted.count("tl.exp2(tl.fma(") == 2
    assert "exp2_ftz" not in render_forward(_spec(gated=False))


def test_ablation_edits_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/ablate_forward.py`` edits the rendered kernels by pattern: every edit still matches this
    checkout's templates (its Triton edits still parse), with the denominator summed either way
    (``DENOMINATOR_BY_DOT``), for either query kernel (``--query``), and the edits hold only inside
    ``edited_sources``."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ablate_forward

    triton_query = ["--query", "triton"]
    for by_dot in (forward.DENOMINATOR_BY_DOT, not forward.DENOMINATOR_BY_DOT):
        monkeypatch.setattr(forward, "DENOMINATOR_BY_DOT", by_dot)
        expected = {name: [] for name, _, _ in ablate_forward.variants(query_kernel="triton")}
        assert ablate_forward.main(["--dry-run", *triton_query]) == expected, by_dot
    assert ablate_forward.main(["--dry-run"]) == {name: [] for name, _, _ in ablate_forward.variants()}
    for query, query_edits in (([], ablate_forward.CUDA_QUERY_EDITS), (triton_query, ablate_forward.GATED_QUERY_EDITS)):
        gated = ablate_forward.main(["--dry-run", "--gated", *query])  # the gated kernels and variants
        kernel = query[-1] if query else "cuda"
        assert gated == {name: [] for name, _, _ in ablate_forward.variants(gated=True, query_kernel=kernel)}
        assert set(ablate_forward.GATED_STATE_EDITS) | set(query_edits) < set(gated)
    with pytest.raises(ValueError, match="query_kernel"):
        ablate_forward.variants(query_kernel="flash")
    copies = ablate_forward.main(["--dry-run", "--only", "V copies|K copies|step wait"])
    bases = {"base", "base (between)", "base (last)"}
    assert len(copies) == 9 and bases < set(copies) and not any(copies.values())
    spec = _spec(query_split=2)
    edits = ablate_forward.QUERY_EDITS["query: no state product"]
    with ablate_forward.edited_sources(edits, []) as matched:
        assert "for step in range(0):" in render_forward(spec)
    assert matched == {edits[0][0]: 1}
    assert "for step in range(0):" not in render_forward(spec)


def test_paired_ablation_compares_each_variant_with_the_bases_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ablate_forward.py --paired``: a base after every variant, and each variant's times over the mean of the two
    bases beside it (the GPU slows as a run goes on, so the first base is no reference for a late variant)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ablate_forward

    names = [name for name, _, _ in ablate_forward.variants("no stores|B without", paired=True)]
    assert names[0] == "base" and names[2::2] == [f"base (after: {name})" for name in names[1::2]]
    assert len(names) == 5 and not any(name.startswith("base") for name in names[1::2])

    def row(name: str, forward: float, state: float | None) -> dict:
        kernels = {"attention_kernel": 0.5} | ({} if state is None else {"retention_chunk_state": state})
        return {"variant": name, "forward_ms": forward, "kernel_ms": kernels}

    rows = [row("base", 1.0, 0.40), row("a", 0.99, 0.36), row("base (after: a)", 1.2, 0.50), {"variant": "b"}]
    rows += [row("base (after: b)", 1.0, None), row("c", 1.1, 0.4), row("base (after: c)", 1.1, 0.4)]
    ablate_forward.relative_to_bases(rows)
    assert rows[1]["vs_bases"] == {"forward": 0.9, "attention_kernel": 1.0, "retention_chunk_state": 0.8}
    assert "vs_bases" not in rows[3] and "vs_bases" not in rows[0]  # a failed variant, a base
    assert rows[5]["vs_bases"] == {"forward": round(1.1 / 1.05, 4), "attention_kernel": 1.0}  # a kernel one base lacks


def test_ablation_variants_that_delete_cuda_lines_still_compile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The state-kernel variants of ``benchmarks/ablate_forward.py`` that delete or rewrite CUDA statements still
    compile for sm_90a (no GPU): a pattern that matched half a line once left a comment's tail as code, which only the
    GPU run found."""
    try:
        nvrtc.compiler_id()
    except RuntimeError:
        pytest.skip("neither NVRTC nor nvcc is available")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ablate_forward

    report = ablate_forward.main(["--dry-run", "--compile", "--only", "step wait|zero-filled|no stores|bytes"])
    assert len(report) == 9 and not any(report.values())
    gated = ablate_forward.main(["--dry-run", "--compile", "--gated", "--only", "state gated"])
    assert len(gated) == 3 + len(ablate_forward.GATED_STATE_EDITS) and not any(gated.values())
    # the CUDA query kernel's gated variants: the one that makes all five edits at once
    query = ablate_forward.main(["--dry-run", "--compile", "--gated", "--only", r"query \(CUDA\).*none of the five"])
    assert len(query) == 4 and not any(query.values())


def test_source_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    triton_source._load.cache_clear()
    spec = _spec(head_dim=32, value_dim=32)
    module, path = load_forward(spec)
    assert path.parent == tmp_path / "retention_compile" / "triton"
    assert path.read_text() == render_forward(spec)
    assert path.name.startswith("forward_") and path.suffix == ".py"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temporary left over
    assert load_forward(spec) == (module, path)  # imported once per process
    mtime = path.stat().st_mtime_ns
    triton_source._load.cache_clear()
    again, same = load_forward(spec)  # a new process: the entry is reused, not rewritten
    assert same == path and path.stat().st_mtime_ns == mtime
    assert hasattr(again, "attention_kernel") and hasattr(again, "state_kernel")
    _, other = load_forward(_spec(head_dim=32, value_dim=32, gated=False))
    assert other != path and other.parent == path.parent


def test_supports_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 8, 32)
    assert "CUDA" in triton_supports(q, q, q, 2, None, None, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_supports(q, q, q, 2, None, None, True) is None
    assert "float64" in triton_supports(q.double(), q.double(), q.double(), 2, None, None, True)
    odd = torch.randn(1, 2, 8, 12)
    assert "head dim" in triton_supports(odd, odd, odd, 2, None, None, True)
    empty = torch.randn(1, 2, 0, 32)
    assert "empty" in triton_supports(empty, empty, empty, 2, None, None, True)
    gate = -torch.rand(1, 2, 8)
    assert "causal=False" in triton_supports(q, q, q, 2, gate, None, False)
    with pytest.raises(ValueError, match="causal=False"):
        triton_forward(q, q, q, scale=0.2, deg=2, log_gate=gate, causal=False, valid=None, plan=Plan(chunk_size=16))


def test_shape_class_follows_the_module_tunables(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernel_spec`` is memoized; the module constants benchmarks and tests set are part of its key, so a changed
    one gives the shape class it asks for, not the one remembered."""
    q, v = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16), torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    plan = Plan(chunk_size=256)
    before = kernel_spec(q, v, 2, False, False, True, 4096, plan)
    monkeypatch.setattr(forward, "QUERY_TRANSPOSED", not forward.QUERY_TRANSPOSED)
    monkeypatch.setattr(forward, "QUADRATIC_BLOCK_K", 2 * forward.QUADRATIC_BLOCK_K)
    monkeypatch.setattr(forward, "STATE_BLOCK_S", 2 * forward.STATE_BLOCK_S)
    monkeypatch.setattr(forward, "DENOMINATOR_BY_DOT", not forward.DENOMINATOR_BY_DOT)
    after = kernel_spec(q, v, 2, False, False, True, 4096, plan)
    assert after.query_t != before.query_t and after.den_dot != before.den_dot
    assert (after.block_k, after.block_s) == (2 * before.block_k, 2 * before.block_s)
    # float32 kernels sum rows unless DENOMINATOR_BY_DOT_FLOAT32 (a tunable too)
    monkeypatch.setattr(forward, "DENOMINATOR_BY_DOT", True)
    assert not kernel_spec(q.float(), v.float(), 2, False, False, True, 4096, plan).den_dot
    monkeypatch.setattr(forward, "DENOMINATOR_BY_DOT_FLOAT32", True)
    assert kernel_spec(q.float(), v.float(), 2, False, False, True, 4096, plan).den_dot


def test_path_choice() -> None:
    q, v = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64)
    plan = Plan(chunk_size=256)
    assert kernel_spec(q, v, 2, False, False, True, 4096, plan).chunked
    assert not kernel_spec(q, v, 4, False, False, True, 4096, plan).chunked  # deg 4: D = 766480, quadratic
    assert not kernel_spec(q, v, 2, False, False, True, 256, plan).chunked  # one chunk
    q24, v24 = torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24)
    assert not kernel_spec(q24, v24, 2, False, False, True, 4096, plan).chunked  # 16 does not divide d
    q256 = torch.randn(1, 1, 4, 256)
    assert kernel_spec(q256[..., :128], v, 2, False, False, True, 4096, plan).chunked
    assert not kernel_spec(q256, v, 2, False, False, True, 4096, plan).chunked  # M (d x d fp32) > shared memory
    wide = kernel_spec(q, v, 2, False, False, True, 4096, Plan(chunk_size=256, block_feature=64, block_e=128))
    assert wide.block_feature == 16 and wide.block_e == 64


def _symbolic_sizes(**sizes: int) -> tuple:
    """A fresh ``ShapeEnv`` and one symbolic size per keyword (its value the example), as Dynamo makes them under
    ``dynamic=True``, with each symbol's name (before a guard may replace it)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    symbols = {}
    for name, value in sizes.items():
        expr = env.create_symbol(value, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        symbols[name] = env.create_symintnode(expr, hint=value)
    return env, symbols, {name: str(size.node.expr) for name, size in symbols.items()}


def test_kernel_specs_specialize_the_graph_on_symbolic_head_dims() -> None:
    """Traced with every size symbolic (``torch.compile(dynamic=True)`` on a function that takes q, k, v), the
    forward's and the CUDA state kernel's specs hold d and e as ints, each guarded to its value: the kernels' sources
    are written for them, so a call with another d must recompile. (Session 67: the state spec held the SymInt itself,
    and Dynamo's fake run of the op failed on hashing it; an unguarded d would let a graph traced at d = 64 run its
    d = 64 kernels on d = 128 inputs.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from retention_compile.codegen.cuda_state import state_spec

    env, n, names = _symbolic_sizes(B=2, H=3, T=5000, d=64, e=32)
    with FakeTensorMode(shape_env=env):
        q = torch.empty(n["B"], n["H"], n["T"], n["d"], dtype=torch.bfloat16)
        v = torch.empty(n["B"], n["H"], n["T"], n["e"], dtype=torch.bfloat16)
        specs = [
            kernel_spec(q, v, 2, True, False, True, 5000, Plan(chunk_size=1024)),
            state_spec(q, v, 1024, True, True, False),
        ]
    for spec in specs:
        assert (spec.head_dim, spec.value_dim) == (64, 32) and all(
            type(n) is int for n in (spec.head_dim, spec.value_dim)
        )
        hash(spec)
    guarded = {str(guard.expr) for guard in env.guards}
    assert {f"Eq({names['d']}, 64)", f"Eq({names['e']}, 32)"} <= guarded, guarded
    assert not any(names[free] in " ".join(guarded) for free in "BHT"), guarded


def test_the_grid_limit_guards_symbolic_batch_and_heads() -> None:
    """``triton_supports`` refuses B x Hq beyond one grid axis; traced with symbolic sizes, it guards that product, so
    a graph traced below the limit recompiles (onto the aten path) above it instead of launching a grid too large."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    env, n, names = _symbolic_sizes(B=2, H=3, T=5000)
    with FakeTensorMode(shape_env=env):
        q, k, v = (torch.empty(n["B"], n["H"], n["T"], 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        assert triton_supports(q, k, v, 2, None, None, True) is None
    guarded = " ".join(str(guard.expr) for guard in env.guards)
    assert names["B"] in guarded and names["H"] in guarded and str(forward.MAX_GRID_Z) in guarded, guarded


def test_query_launch() -> None:
    """bf16 chunked calls with d <= 64 take the measured narrow launch, uncapped (Inductor's launch of a user kernel
    drops ``maxnreg``, so eager and compiled calls run one kernel); wider heads, float32 tiles, chunks shorter than
    its rows and the quadratic kernel keep the plan's rows and stages, whole pairs and no register cap."""
    plan = Plan(chunk_size=1024, block_t=128, num_warps=4, num_stages=2)

    def launch(d: int, dtype: torch.dtype, kv_len: int = 65536, p: Plan = plan):
        q = torch.empty(1, 1, 1, d, dtype=dtype)
        return forward.query_launch(kernel_spec(q, q, 2, True, False, True, kv_len, p), p)

    assert launch(64, torch.bfloat16) == forward.NARROW_QUERY_LAUNCH == launch(32, torch.float16)
    assert forward.NARROW_QUERY_LAUNCH.max_registers is None and forward.NARROW_QUERY_LAUNCH.split == 2
    default = forward.QueryLaunch(rows=128, warps=forward.CHUNK_QUERY_WARPS, stages=2, split=1, max_registers=None)
    assert launch(64, torch.float32) == default
    assert launch(128, torch.bfloat16) == default  # d = 128: whole pairs, the plan's rows (its value blocks: 64)
    short = Plan(chunk_size=64, block_t=64, num_warps=4, num_stages=2)
    assert launch(64, torch.bfloat16, p=short) == dataclasses.replace(default, rows=64)  # chunks of 64 < 128 rows
    quadratic = forward.QueryLaunch(rows=128, warps=4, stages=2, split=1, max_registers=None)
    assert launch(64, torch.bfloat16, kv_len=512) == quadratic


if __name__ == "__main__":
    print(json.dumps(_interpreted()))


def test_value_tiles_are_at_least_32_columns() -> None:
    """16-column value tiles were miscompiled for fp16 on sm_90 (``triton_source.MIN_VALUE_TILE``): the forward's
    tiles of narrow values are 32 columns wide (the backward keeps 16: ``backward._value_pad``)."""
    plan = Plan(chunk_size=1 << 20, block_t=64, block_e=64, num_warps=4, num_stages=2)
    for e in (1, 8, 16, 17):
        q, v = torch.empty(1, 1, 1, 24, dtype=torch.float16), torch.empty(1, 1, 1, e, dtype=torch.float16)
        spec = kernel_spec(q, v, 2, True, True, True, 100, plan)
        assert spec.block_e == 32
        assert BackwardSpec.of(spec).block_e == (16 if e <= 16 else 32)


def test_fitting_cache_entries_name_the_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fitting answer kept on disk belongs to one compute capability: GPUs with equal shared-memory limits compile
    the same kernel to different sizes, so another GPU sharing the cache directory checks again."""
    monkeypatch.setenv("RETENTION_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    key = ("spec", 8, 3, 227 * 1024, ())
    paths = set()
    for capability in ((9, 0), (8, 9), (9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=capability: c)
        paths.add(fitting._cache_path(key))
    assert len(paths) == 2


def test_fit_shared_memory_shrinks_rows_then_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A kernel over the limit loses query rows (down to 16), then stages, until it fits; none fitting is an error
    naming the shape. Answers are remembered in the process and in the kernel cache."""
    plan = Plan(chunk_size=32, block_t=128, block_e=64, num_stages=3)
    spec = kernel_spec(torch.empty(1, 1, 1, 96), torch.empty(1, 1, 1, 64), 2, False, False, False, 473, plan)
    monkeypatch.setenv("RETENTION_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(fitting, "_FITTED", {})
    asked = []

    def shared_of(candidate, stages: int) -> int:  # a stand-in for the compiled kernel: 1 KB per row and stage
        asked.append((candidate.block_t, stages))
        return candidate.block_t * stages * 1024

    fitted, stages = fit_shared_memory(spec, 8, 3, 40 * 1024, shared_of)
    assert asked == [(128, 3), (64, 3), (32, 3), (16, 3), (16, 2)] and (fitted.block_t, stages) == (16, 2)
    assert dataclasses.replace(fitted, block_t=spec.block_t) == spec  # nothing else changes
    asked.clear()
    assert fit_shared_memory(spec, 8, 3, 40 * 1024, shared_of) == (fitted, 2) and not asked  # remembered
    assert fit_shared_memory(spec, 8, 3, 40 * 1024, shared_of, ((torch.float16, False),)) == (fitted, 2)
    assert asked, "another argument specialization compiles again"
    with pytest.raises(RuntimeError, match="shared memory even with 16 query rows"):
        fit_shared_memory(spec, 8, 3, 1024, shared_of)
    # a later process (an empty memo) reads the answer from the cache without compiling; a damaged entry is redone
    monkeypatch.setattr(fitting, "_FITTED", {})
    asked.clear()
    assert fit_shared_memory(spec, 8, 3, 40 * 1024, shared_of) == (fitted, 2) and not asked
    for entry in (tmp_path / "fitting").glob("*.json"):
        entry.write_text("[16]")
    monkeypatch.setattr(fitting, "_FITTED", {})
    assert fit_shared_memory(spec, 8, 3, 40 * 1024, shared_of) == (fitted, 2) and asked
