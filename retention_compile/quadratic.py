"""Power retention in its quadratic form, forward and explicit backward, for short key lengths (aten path).

When every key fits in one chunk the chunked form (``chunked.py``) has no state to carry: it still embeds q and k
(``D = C(d+p-1, p)`` features each) and builds the general layout, which costs time and, under ``torch.compile``,
many more generated kernels. Here the weights are formed directly, as in DESIGN.md section 1:

    A_ij = s q_i . k_j,   L_ij = G_{i+off} - G_j  (admissible: j <= i + off if causal, valid[j]; else -inf)
    W_ij = A_ij^p exp(L_ij),   N_i = sum_j W_ij v_j,   denom_i = sum_j W_ij + eps,   y_i = N_i / denom_i

and the backward is written out with ``dN_i = dy_i / denom_i`` and ``dZ_i = -(dy_i . y_i) / denom_i``:

    dW_ij = dN_i . v_j + dZ_i,   dv_j = sum_i W_ij dN_i,   dA_ij = dW_ij p A_ij^(p-1) exp(L_ij)
    dq_i  = s sum_j dA_ij k_j,   dk_j = s sum_i dA_ij q_i
    dL_ij = dW_ij W_ij,   dG_t = sum_{i + off = t} sum_j dL_ij - sum_i dL_it,   dg_u = sum_{t >= u} dG_t

(the last sum taken from the front: ``gates.log_gate_grad``)

The (Tq, Tk) matrices are materialised per query head (as the chunked form does inside one chunk), so ops.py
takes this path only when every key fits in the planned chunk. Causal calls with more queries than keys
(``Tq > Tk``) run on their last Tk rows: the first ``Tq - Tk`` rows see no key (y = 0, denom = eps, dq = 0). GQA
stacks the g query heads of a kv head as g * Tq rows of one product with that kv head's keys and values (no copy of
k or v, no broadcast product: Inductor would materialise the broadcast); the products that give dk and dv contract
over those stacked rows, which sums the g heads' contributions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .gates import cumulative_log_gate, log_gate_grad
from .reference import EPS, compute_dtype


class _Weights(NamedTuple):
    """The pieces of ``W = A^p exp(L)`` on the grouped layout (B, Hk, g, Tq, Tk), in the accumulation dtype."""

    scores: Tensor  # A = s q . k
    log_decay: Tensor  # L, -inf where inadmissible
    admissible: Tensor  # bool
    weights: Tensor  # W, exactly 0 where inadmissible


def _grouped(x: Tensor, kv_heads: int, acc: torch.dtype) -> Tensor:
    """(B, Hq, T, f) -> (B, Hk, g, T, f) in the accumulation dtype: the query heads of each kv head together."""
    B, Hq, T, f = x.shape
    return x.to(acc).reshape(B, kv_heads, Hq // kv_heads, T, f)


def _stacked(x: Tensor) -> Tensor:
    """(B, Hk, g, T, f) -> (B, Hk, g * T, f): the query heads of a kv head as rows of one product."""
    B, Hk, group, T, f = x.shape
    return x.reshape(B, Hk, group * T, f)


def _per_head(x: Tensor, group: int) -> Tensor:
    """(B, Hk, g * T, f) -> (B, Hk, g, T, f), the inverse of ``_stacked``."""
    B, Hk, rows, f = x.shape
    return x.reshape(B, Hk, group, rows // group, f)


def _cumulative_gate(log_gate: Tensor | None, shape: tuple) -> Tensor | None:
    """``G`` (B, Hk, g, Tk) in float64 (``gates.cumulative_log_gate``) from a kv-head (B, Hk, Tk) or query-head
    (B, Hq, Tk) log-gate."""
    if log_gate is None:
        return None
    B, Hk, group, _, _ = shape
    per_kv = log_gate.shape[1] == Hk
    cum = cumulative_log_gate(log_gate).reshape(B, Hk, 1 if per_kv else group, -1)
    return cum.expand(B, Hk, group, cum.shape[-1])


def _rows_before_keys(q: Tensor, k: Tensor, causal: bool) -> int | torch.SymInt:
    """``Tq - Tk`` for causal calls with more queries than keys (row i sees keys j <= i + Tk - Tq), else 0; a
    comparison of symbolic lengths guards, as the choice of this path does (``ops._quadratic_serves``)."""
    return q.shape[2] - k.shape[2] if causal and q.shape[2] > k.shape[2] else 0


def _weights(q: Tensor, k: Tensor, cum: Tensor | None, valid: Tensor | None, scale: float, deg: int, causal: bool):
    """``A``, ``L``, the admissible set and ``W`` for grouped ``q`` (B, Hk, g, Tq, d) and ``k`` (B, Hk, Tk, d)."""
    scores = scale * _per_head(_stacked(q) @ k.transpose(-1, -2), q.shape[2])
    Tq, Tk = q.shape[-2], k.shape[-2]
    offset = Tk - Tq
    admissible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        positions = torch.arange(Tk, device=q.device)
        admissible = positions.unsqueeze(0) <= (positions.narrow(0, offset, Tq)).unsqueeze(1)
    admissible = admissible.expand(scores.shape)
    if valid is not None:
        admissible = admissible & valid[:, None, None, None, :].expand(scores.shape)
    log_decay = torch.zeros_like(scores)
    if cum is not None:
        log_decay = (cum.narrow(-1, offset, Tq).unsqueeze(-1) - cum.unsqueeze(-2)).to(scores.dtype)
    log_decay = torch.where(admissible, log_decay, -math.inf)
    weights = torch.where(admissible, scores**deg * log_decay.exp(), 0.0)
    return _Weights(scores, log_decay, admissible, weights)


def quadratic_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: Tensor | None,
    causal: bool,
    valid: Tensor | None,
    eps: float = EPS,
) -> tuple[Tensor, Tensor]:
    """``(y, denom)`` as ``chunked.chunked_forward`` returns them: y (B, Hq, Tq, e) and denom (B, Hq, Tq) in the
    accumulation dtype."""
    if skip := _rows_before_keys(q, k, causal):
        options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid, "eps": eps}
        y, denom = quadratic_forward(q.narrow(2, skip, k.shape[2]), k, v, **options)
        return torch.nn.functional.pad(y, (0, 0, skip, 0)), torch.nn.functional.pad(denom, (skip, 0), value=eps)
    acc, Hk = compute_dtype(q.dtype), int(k.shape[1])
    qg = _grouped(q, Hk, acc)
    group = int(qg.shape[2])
    w = _weights(qg, k.to(acc), _cumulative_gate(log_gate, qg.shape), valid, scale, deg, causal)
    denom = w.weights.sum(-1) + eps
    y = _per_head(_stacked(w.weights) @ v.to(acc), group) / denom.unsqueeze(-1)
    B, Hq, Tq = q.shape[0], q.shape[1], q.shape[2]
    return y.reshape(B, Hq, Tq, v.shape[-1]), denom.reshape(B, Hq, Tq)


def quadratic_backward(
    grad_y: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    denom: Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: Tensor | None,
    causal: bool,
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of ``sum(grad_y * y)`` for ``y = quadratic_forward(...)[0]`` (module docstring): ``dq``, ``dk``,
    ``dv`` in the input dtypes and ``dlog_gate`` in log_gate's shape and dtype (None without a gate)."""
    if skip := _rows_before_keys(q, k, causal):
        grad_y, q, y, denom = (t.narrow(2, skip, k.shape[2]) for t in (grad_y, q, y, denom))
        options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid}
        dq, dk, dv, d_gate = quadratic_backward(grad_y, q, k, v, y, denom, **options)
        return torch.nn.functional.pad(dq, (0, 0, skip, 0)), dk, dv, d_gate
    acc, Hk = compute_dtype(q.dtype), int(k.shape[1])
    qg = _grouped(q, Hk, acc)
    group = int(qg.shape[2])
    ka, va = k.to(acc), v.to(acc)
    w = _weights(qg, ka, _cumulative_gate(log_gate, qg.shape), valid, scale, deg, causal)
    den = _grouped(denom.unsqueeze(-1), Hk, acc)
    d_num = _grouped(grad_y, Hk, acc) / den
    d_norm = -(d_num * _grouped(y, Hk, acc)).sum(-1, keepdim=True)
    d_weights = _per_head(_stacked(d_num) @ va.transpose(-1, -2), group) + d_norm
    d_scores = _stacked(torch.where(w.admissible, d_weights * (deg * w.scores ** (deg - 1)) * w.log_decay.exp(), 0.0))
    dq = scale * (d_scores @ ka)
    dk = scale * (d_scores.transpose(-1, -2) @ _stacked(qg))
    dv = _stacked(w.weights).transpose(-1, -2) @ _stacked(d_num)
    d_gate = None
    if log_gate is not None:
        d_log = d_weights * w.weights  # exactly 0 where inadmissible
        offset = k.shape[2] - q.shape[2]
        d_cum = torch.nn.functional.pad(d_log.sum(-1), (offset, 0)) - d_log.sum(-2)
        if log_gate.shape[1] == Hk:
            d_cum = d_cum.sum(2)
        d_gate = log_gate_grad(d_cum).reshape(log_gate.shape).to(log_gate.dtype)
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_gate
