"""The log-gate's cumulative sum for the aten forms, and its gradient from the gradients of that sum.

    log_gate_floor(dtype) -> F           the log-gate below which every decay it enters is 0 in dtype
    cumulative_log_gate(log_gate) -> G   G_t = sum_{u <= t} max(g_u, F) in float64, along the last axis
    log_gate_grad(d_cum) -> dg      dg_u = sum_{t >= u} dG_t, along the last axis
    log_gate_grad_in_chunks(d_cum, starts, chunk, shift) -> dg     the same, from dg at every chunk start

G_t = sum_{u <= t} g_u, so each g_u enters every G_t with t >= u. The aten (quadratic, chunked) and Triton
backwards all form dG_t = (query term of the row at t) - (key term of t) and end here: the chunked causal Triton
backward in the chunk-start form, the others in the prefix form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_gate_floor(dtype: torch.dtype) -> float:
    """``F = floor(log(half the smallest subnormal of dtype)) - 1``: -105 for float32, -747 for float64 (-19 for
    float16).

    exp(x) rounds to 0 in ``dtype`` for every x <= F + 1: a nat to spare for the rounding of a G difference. Every
    G difference that spans a key u is at most g_u, and in a factored form (exp(G_i - G_ref) exp(G_ref - G_j)) u
    falls in exactly one factor's span. So with g_u <= F each weight u separates has a factor of exactly 0, and
    taking ``max(g_u, F)`` into G leaves every weight as it was. It keeps G finite for a hard reset ``g_u = -inf``
    (the log of a zero decay: G differences would be ``-inf - -inf = NaN``) and bounds what a reset adds to |G|,
    whose rounding every later gate factor carries (``cumulative_log_gate``). A NaN stays NaN."""
    info = torch.finfo(dtype)
    half_subnormal = math.log(info.smallest_normal) + math.log(info.eps) - math.log(2)  # in logs: it underflows
    return float(math.floor(half_subnormal) - 1)


def cumulative_log_gate(log_gate: Tensor) -> Tensor:
    """``G_t = sum_{u <= t} max(g_u, F)`` along the last axis, in float64, with ``F = log_gate_floor(float64)``:
    the same weights as the plain sum in float64 and float32 (``log_gate_floor``), and finite after ``-inf``.

    The weights read only differences ``G_i - G_j``. Held in float32, each G is off by up to half an ulp of |G|, so
    every difference, and every gate factor ``exp(G_i - G_j)`` relatively, carries about ``|G| 2^-24`` however
    close i and j are: 5.9e-3 at T = 65536 under log-gates of -1.67 per key, 2.0e-4 in y after a reset of -1e4
    (``benchmarks/gate_prefix_precision.py``), beyond float32's 1e-4. In float64 that error is 2^-29 of float32's,
    so a difference cast to the accumulation dtype afterwards is that dtype's rounding of the exact value. The
    aten forms take G this way and cast each difference (a vector per row, or one chunk's pairs at a time)."""
    return log_gate.to(torch.float64).clamp_min(log_gate_floor(torch.float64)).cumsum(-1)


def log_gate_grad(d_cum: Tensor) -> Tensor:
    """``dg_u = sum_{t >= u} dG_t`` along the last axis from the gradients ``dG_t`` of the cumulative gate, computed
    as ``-sum_{t < u} dG_t``.

    The two are equal: ``sum_t dG_t = dg_0 = 0``, since g_0 enters every G_t and the weights depend on differences
    of G only. The prefix form keeps each rounding error near where it arises. The suffix form would carry the
    mismatch between the rounded query terms and key terms of every later query into each earlier key. When the
    queries come last (decode, prefill after a cache), those keys' true dg is small. On the H200, bf16 decode at
    Tk = 5000 gave a relative error of 8.3e-2 with suffix sums."""
    return -torch.nn.functional.pad(d_cum, (1, 0))[..., :-1].cumsum(-1)


def log_gate_grad_in_chunks(d_cum: Tensor, starts: Tensor, chunk: int, shift: int) -> Tensor:
    """``dg`` along the last axis (Tk positions) from ``dG_t`` and ``starts[..., c]``, dg at the start u_c of chunk c
    (chunk c holds positions ``[c chunk - shift, (c + 1) chunk - shift)`` within ``[0, Tk)``; ``starts[..., 0]``
    is dg at position 0, which is 0).

    Inside chunk c: ``dg_t = dg_(u_c) - sum_(u_c <= t' < t) dG_t'``.

    The prefix form ``log_gate_grad`` sums the mismatch between each earlier row's rounded query and key terms, a
    random walk along T. Each row's terms are differences of values 6-9 times larger than dg (float64 simulation
    of the bf16 chunked kernels), so the walk grows past the bf16 bar: d log_gate 2.48e-2 on the H200 (fuzz seed
    20261202 case 699, T = 3217, chunk 16). From chunk starts computed on their own (``boundary_kernel``), each
    error stays within its chunk: 3-5e-3 in the same simulation, flat along T."""
    Tk = d_cum.shape[-1]
    n = starts.shape[-1]
    chunks = torch.nn.functional.pad(d_cum, (shift, n * chunk - shift - Tk)).unflatten(-1, (n, chunk))
    within = chunks.cumsum(-1) - chunks
    return (starts[..., None] - within).flatten(-2)[..., shift : shift + Tk]
