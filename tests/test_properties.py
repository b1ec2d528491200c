"""Property tests: the chunked form and the CPU op against the float64 oracle (DESIGN.md section 1) over random
shapes, degrees, chunk sizes, per-token gates (hard resets of -inf among them), validity masks and dtypes, forward
and backward.

Replaying a failure. Each example draws the sizes, the flags and one integer ``seed`` from which every tensor
is made, so the falsifying ``Case(...)`` hypothesis prints rebuilds the failing tensors exactly: call
``check_forward(Case(...))`` or ``check_backward(Case(...))`` with it. Hypothesis also prints an
``@reproduce_failure`` blob and keeps the example in ``.hypothesis/`` (tried first on the next run);
``pytest --hypothesis-seed=N`` makes the whole search repeatable. ``RETENTION_PROPERTY_EXAMPLES=2000``
searches longer (the default, 100 per test, keeps this file near 30 s on 2 cores).

Forward tolerance. Rounding in any form of the sum (quadratic, chunked through ``phi``) is bounded by the sum of
absolute terms: ``|phi(q) . phi(k)| <= (|q| |k|)^p`` term by term (Cauchy-Schwarz on the symmetric embedding),
so with ``Z_i = sum_j w_ij`` and ``Zbar_i = sum_j (s |q_i| |k_j|)^p exp(G_{i+off} - G_j)`` over admissible j,

    |y_i - oracle_i| <= tol * max|v| * (1 + Zbar_i / (Z_i + eps)),

the ratio being row i's condition number (large when q_i is nearly orthogonal to its keys). Both masses come
from the oracle itself (``masses``). ``tol`` is about a hundred units of rounding of the dtype, plus the relative
rounding that every gate factor exp(G_i - G_j) carries from G itself where there are resets (``gate_rounding``):
the op holds G in float64, each reset adding 747 (``gates.log_gate_floor``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retention_compile as rc
from retention_compile.chunked import chunked_forward
from retention_compile.gates import log_gate_floor
from retention_compile.reference import EPS, default_scale, power_retention_reference

EXAMPLES = int(os.environ.get("RETENTION_PROPERTY_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, print_blob=True)
# The worst ratios error / (condition x size) seen over 9000 random cases were, forward: 3.9e-16 (float64),
# 3.9e-7 (float32); backward: 2.8e-15, 1.2e-6. The tolerances sit 25 to 35 times above them.
FORWARD_TOL = {torch.float64: 1e-14, torch.float32: 1e-5}
GRAD_TOL = {torch.float64: 1e-13, torch.float32: 3e-5}
BIG = 1e30  # an eps so large that the oracle's y for v = 1 is Z / BIG to float64 rounding
# Multiples of ``gate_rounding`` added to the tolerances. The worst seen over 20000 float64 cases with resets (3000 for
# the gradients), in units of gate_rounding beyond the tolerances above: y 0.14, denom 1.7, gradients 0.32; these
# sit 30 to 40 times above them. float32 cases are within their tolerances as they are.
RESET_ROUNDING = {"y": 5.0, "denom": 64.0, "grad": 10.0}


@dataclass(frozen=True)
class Case:
    """One random problem; ``seed`` makes every tensor (``tensors``)."""

    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    deg: int
    causal: bool
    gate: str  # "none" | "kv" (per kv head) | "q" (per query head)
    gate_strength: float
    padded: bool
    scale: float | None
    chunk: int
    dtype: torch.dtype
    seed: int
    resets: bool = False  # some keys' log-gates -inf (hard resets: documents packed in one sequence)


@st.composite
def cases(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)) -> Case:
    """Small problems: d <= 8 for p = 2 (D <= 36), d <= 5 for p = 4 (D <= 70); Tq <= Tk <= 40."""
    kv_len = draw(st.integers(1, 40))
    deg = draw(st.sampled_from([2, 4]))
    causal = draw(st.booleans())
    return Case(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 3)),
        q_len=draw(st.integers(1, kv_len)),
        kv_len=kv_len,
        head_dim=draw(st.integers(1, 8 if deg == 2 else 5)),
        value_dim=draw(st.integers(1, 6)),
        deg=deg,
        causal=causal,
        gate=draw(st.sampled_from(["none", "kv", "q"])) if causal else "none",
        gate_strength=draw(st.sampled_from([0.05, 0.5, 3.0])),
        padded=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.2, 2.0))),
        chunk=draw(st.integers(1, kv_len + 2)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        resets=draw(st.booleans()),
    )


@dataclass(frozen=True)
class Problem:
    """The tensors of a case, in the case's dtype (gates in float64 for float64, else float32 as models hold them)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_gate: torch.Tensor | None
    valid: torch.Tensor | None

    def options(self, case: Case) -> dict:
        return dict(scale=case.scale, deg=case.deg, log_gate=self.log_gate, causal=case.causal, valid=self.valid)

    def float64(self) -> Problem:
        """The same values in float64 (the oracle's inputs)."""
        gate = None if self.log_gate is None else self.log_gate.double()
        return Problem(self.q.double(), self.k.double(), self.v.double(), gate, self.valid)


def tensors(case: Case) -> Problem:
    gen = torch.Generator().manual_seed(case.seed)
    B, Hk, Tk = case.batch, case.kv_heads, case.kv_len
    Hq = Hk * case.group

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(case.dtype)

    q, k, v = randn(B, Hq, case.q_len, case.head_dim), randn(B, Hk, Tk, case.head_dim), randn(B, Hk, Tk, case.value_dim)
    gate = None
    if case.gate != "none":
        heads = Hk if case.gate == "kv" else Hq
        gate_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
        gate = -case.gate_strength * torch.rand(B, heads, Tk, generator=gen, dtype=gate_dtype)
        if case.resets:
            gate[torch.rand(gate.shape, generator=gen) < 0.15] = float("-inf")
    valid = torch.rand(B, Tk, generator=gen) > 0.3 if case.padded else None
    return Problem(q, k, v, gate, valid)


def gate_rounding(p: Problem) -> float:
    """The unit of what resets add to the rounding of every gate factor exp(G_i - G_j): the op holds G in float64
    (``gates.cumulative_log_gate``) and takes each reset at the floor, -747, so G's ulp grows with 747 per reset:
    2^-52 x 747 x (most resets in a row). Scaled by ``RESET_ROUNDING`` in the bounds; 0 without resets."""
    if p.log_gate is None:
        return 0.0
    resets = int(torch.isneginf(p.log_gate).sum(-1).max())
    return torch.finfo(torch.float64).eps * resets * -log_gate_floor(torch.float64)


def masses(case: Case, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z_i`` and ``Zbar_i`` (B, Hq, Tq) in float64, read off the oracle: with ``v = 1`` and ``eps = BIG`` its
    output is ``Z / (Z + BIG)``; ``Zbar`` is ``Z`` of the one-dimensional problem ``|q_i|``, ``|k_j|``."""
    x = p.float64()
    ones = torch.ones_like(x.v[..., :1])
    options = {**x.options(case), "scale": default_scale(case.head_dim, case.scale), "eps": BIG}

    def mass(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        frac = power_retention_reference(q, k, ones, **options)[..., 0]
        return BIG * frac / (1 - frac)

    return mass(x.q, x.k), mass(x.q.norm(dim=-1, keepdim=True), x.k.norm(dim=-1, keepdim=True))


def assert_forward_close(case: Case, p: Problem, y: torch.Tensor) -> None:
    """``y`` against the oracle within the conditioned bound of the module docstring."""
    x = p.float64()
    expected = power_retention_reference(x.q, x.k, x.v, **x.options(case))
    assert y.dtype == case.dtype and y.shape == expected.shape
    z, zbar = masses(case, p)
    bound = (
        (FORWARD_TOL[case.dtype] + RESET_ROUNDING["y"] * gate_rounding(p)) * x.v.abs().max() * (1 + zbar / (z + EPS))
    )
    excess = ((y.double() - expected).abs() - bound.unsqueeze(-1)).max()
    assert excess <= 0, f"{case}: error exceeds the conditioned bound by {float(excess):.3e}"


def check_forward(case: Case) -> None:
    """The chunked form (y and denom) and the op, each against the oracle."""
    p = tensors(case)
    s = default_scale(case.head_dim, case.scale)
    y, denom = chunked_forward(p.q, p.k, p.v, **{**p.options(case), "scale": s}, chunk_size=case.chunk)
    assert_forward_close(case, p, y)
    z, zbar = masses(case, p)
    tol = FORWARD_TOL[case.dtype] + RESET_ROUNDING["denom"] * gate_rounding(p)
    assert ((denom.double() - (z + EPS)).abs() <= tol * (zbar + EPS)).all(), case
    assert_forward_close(case, p, rc.power_retention(p.q, p.k, p.v, **p.options(case), chunk_size=case.chunk))


@SETTINGS
@given(cases())
def test_forward_matches_oracle(case: Case) -> None:
    check_forward(case)


@SETTINGS
@given(cases(), st.booleans())
def test_planned_chunk_matches_oracle(case: Case, planned: bool) -> None:
    """The op with its chunk planned from the shape (``chunk_size=None``) or forced to one chunk."""
    p = tensors(case)
    chunk = None if planned else case.kv_len
    assert_forward_close(case, p, rc.power_retention(p.q, p.k, p.v, **p.options(case), chunk_size=chunk))


def weights(case: Case) -> torch.Tensor:
    """The random weights ``w`` of the loss ``sum(w * y)`` (float64, fixed by the case)."""
    shape = (case.batch, case.kv_heads * case.group, case.q_len, case.value_dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)


def grads(case: Case, inputs: list[torch.Tensor], fn, **options: object) -> list[torch.Tensor]:
    """Gradients of ``sum(w * y)`` with respect to ``inputs`` (q, k, v and the gate if there is one)."""
    y = fn(*inputs[:3], **{**options, "log_gate": inputs[3] if len(inputs) > 3 else None})
    return list(torch.autograd.grad((y.double() * weights(case)).sum(), inputs))


def per_kv_head(x: torch.Tensor, case: Case) -> torch.Tensor:
    """Norms of ``x`` (B, Hk or Hq, ...) per (batch, kv head): the query heads of a group go with their kv head."""
    return x.double().reshape(case.batch, case.kv_heads, -1).norm(dim=-1)


def check_backward(case: Case) -> None:
    """Gradients through the op against torch.autograd through the float64 oracle, per (batch, kv head).

    The bound is the forward one carried through: ``tol * condition * (|grad| + term)``, with the largest row
    condition ``1 + Zbar_i / (Z_i + eps)`` of the kv head's queries. ``term`` is the size of a gradient's terms,
    which stands in when the gradient itself is small by cancellation (with d = 1, ``y`` hardly depends on q: its
    scale cancels between numerator and denominator): ``|w| max|v| p / rms(x)`` for x = q, k (a weight's
    log-derivative is ``p / x``), ``|w|`` for v, ``|w| max|v|`` for the gate."""
    p = tensors(case)
    leaves = [p.q, p.k, p.v] + ([p.log_gate] if p.log_gate is not None else [])

    def run(fn, dtype: torch.dtype | None, **options: object) -> list[torch.Tensor]:
        inputs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in leaves]
        return grads(case, inputs, fn, **p.options(case), **options)

    ours = run(rc.power_retention, None, chunk_size=case.chunk)
    expected = run(power_retention_reference, torch.float64)
    z, zbar = masses(case, p)
    condition = (1 + zbar / (z + EPS)).reshape(case.batch, case.kv_heads, -1).amax(-1)
    w_norm, v_max = float(weights(case).norm()), float(p.v.abs().max())
    term = {
        "q": w_norm * v_max * case.deg / float(p.q.double().pow(2).mean().sqrt()),
        "k": w_norm * v_max * case.deg / float(p.k.double().pow(2).mean().sqrt()),
        "v": w_norm,
        "g": w_norm * v_max,
    }
    for name, leaf, mine, ref in zip("qkvg", leaves, ours, expected):
        assert mine.dtype == leaf.dtype and mine.shape == ref.shape
        error = per_kv_head(mine.double() - ref, case)
        tol = GRAD_TOL[case.dtype] + RESET_ROUNDING["grad"] * gate_rounding(p)
        allowed = tol * condition * (per_kv_head(ref, case) + term[name])
        worst = int((error / allowed).argmax())
        assert (error <= allowed).all(), f"d{name}: error {error.flatten()[worst]:.3e} > {allowed.flatten()[worst]:.3e}"


@SETTINGS
@given(cases())
def test_backward_matches_oracle_autograd(case: Case) -> None:
    check_backward(case)
