"""The oracle: power retention in its quadratic form, exactly as DESIGN.md section 1 states it.

    G_t  = sum_{u <= t} g_u
    off  = Tk - Tq
    w_ij = (s q_i . k_j)^p * exp(G_{i+off} - G_j)   for j <= i + off (causal) or every j (non-causal),
           0 where valid[j] is False
    y_i  = sum_j w_ij v_j / (sum_j w_ij + eps)

The gate's exponent G_(i+off) - G_j is summed as the g_u between the two (``_gate_exponent``): the same number, with
no cancellation at large |G|, and 0 weight across a hard reset g_u = -inf. It materialises the (Tq, Tk) weight
matrix, so it is meant for tests, not speed. It computes in
float64 when given float64 inputs and in float32 otherwise, and returns q's dtype. Every fast path
of the project is checked against it.
"""

from __future__ import annotations

import math

import torch

from .checks import RetentionShape, validate_retention_inputs
from .power_features import power_embedding

EPS = 1e-6


def default_scale(head_dim: int, scale: float | None) -> float:
    """SDPA's default scale ``1/sqrt(d)`` unless a scale is given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat kv heads so query head ``a`` reads kv head ``a // group`` (SDPA's ``enable_gqa``)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def power_retention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    causal: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights ``w_ij = (s q_i . k_j)^deg exp(G_(i+off) - G_j)`` of every admissible key, 0 elsewhere, shaped
    (B, Hq, Tq, Tk) in the compute dtype; arguments as ``power_retention_reference``, which is
    ``w V / (w 1 + eps)`` (the checks are given k's first column for v: only v's shape is checked)."""
    shape = validate_retention_inputs(
        q, k, k[..., :1], deg=deg, log_gate=log_gate, causal=causal, valid=valid, scale=scale
    )
    return _weights(q, k, shape, scale=scale, deg=deg, log_gate=log_gate, causal=causal, valid=valid)


def _weights(
    q: torch.Tensor,
    k: torch.Tensor,
    shape: RetentionShape,
    *,
    scale: float | None,
    deg: int,
    log_gate: torch.Tensor | None,
    causal: bool,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """``power_retention_weights`` of inputs already checked (``shape``: their sizes)."""
    s = default_scale(shape.head_dim, scale)
    acc = compute_dtype(q.dtype)
    qf, kf = q.to(acc), expand_kv_heads(k.to(acc), shape.group)
    weights = (s * (qf @ kf.transpose(-1, -2))) ** deg  # (B, Hq, Tq, Tk)
    rows = torch.arange(shape.q_len, device=q.device)[:, None] + shape.offset
    cols = torch.arange(shape.kv_len, device=q.device)[None, :]
    admissible = (cols <= rows) if causal else torch.ones_like(cols <= rows)
    admissible = admissible.expand(shape.batch, 1, shape.q_len, shape.kv_len)
    if valid is not None:
        admissible = admissible & valid[:, None, None, :]
    if log_gate is not None:
        gate = log_gate.to(acc)
        if gate.shape[1] != shape.q_heads:
            gate = expand_kv_heads(gate, shape.group)
        exponent = _gate_exponent(gate, rows[:, 0])
        exponent = torch.where(admissible, exponent, torch.full_like(exponent, -math.inf))
        weights = weights * torch.exp(exponent)
    return torch.where(admissible, weights, torch.zeros_like(weights))


def _gate_exponent(gate: torch.Tensor, row_pos: torch.Tensor) -> torch.Tensor:
    """``G_(i+off) - G_j``, (B, H, Tk), (Tq,) -> (B, H, Tq, Tk), taken as ``sum_(j < u <= i+off) g_u`` (for
    j <= i + off; 0 elsewhere, where the caller masks): a suffix sum per row, so each exponent is rounded relative to
    itself, not to |G|, and a hard reset g_u = -inf gives -inf for the pairs it separates, not ``-inf - -inf``.

    Built on the reversed key axis (column m for key Tk - 1 - m), where the suffix sums are one cumsum: column m
    holds g_u for u = Tk - m, the key after key Tk - 1 - m (0 for u = Tk or u > i + off). Two (Tq, Tk) tensors."""
    Tk = gate.shape[-1]
    after = torch.arange(Tk, 0, -1, device=gate.device)  # u = Tk - m
    terms = torch.nn.functional.pad(gate, (0, 1))[..., after]  # g_u, with g_Tk = 0
    seen = after[None, :] <= row_pos[:, None]  # (Tq, Tk): u <= i + off
    return torch.where(seen, terms[:, :, None, :], 0.0).cumsum_(-1).flip(-1)


def weight_condition(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    causal: bool = True,
    valid: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """How much the chunked form's rounding of each query row's weights is amplified, (B, Hq, Tq) in the compute
    dtype (arguments as ``power_retention_reference``):

        kappa_i = sum_j |w|_ij / (sum_j w_ij + eps),   |w|_ij = (s sum_a |q_ia k_ja|)^p exp(G_(i+off) - G_j)

    over the admissible keys (0 for a row without any). Through a chunk state a weight is a sum of feature products,
    (s q.k)^p = sum_f phi_f(s q) phi_f(k) with positive coefficients in phi, whose terms add up in magnitude to
    exactly (s sum_a |q_a k_a|)^p; a float sum of them is off by about its unit roundoff times that, so a row's
    weights lose about ``kappa_i`` times the roundoff relative to their sum. Random rows have kappa near 0.41 d at
    p = 2; it is large only where the admissible keys are nearly orthogonal to the query (a lone valid key with
    q.k near 0). The quadratic form computes each weight from q.k itself and does not have this amplification."""
    options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid}
    weights = power_retention_weights(q, k, **options)
    magnitudes = power_retention_weights(q.abs(), k.abs(), **options)
    return magnitudes.sum(-1) / (weights.sum(-1) + eps)


def rounding_spread(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    causal: bool = True,
    valid: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """How far y moves when its weights are rounded, per output element, (B, Hq, Tq, e) in the compute dtype
    (arguments as ``power_retention_reference``):

        nu_ic = sqrt(sum_j w_ij^2 v_jc^2) / (sum_j w_ij + eps)

    the spread of y_ic's numerator, over its denominator, when every weight is off by an independent relative error
    of unit variance (times a dtype's roundoff: what y's error is made of where the weights or the chunk state are
    rounded); where y_ic = 0 it is y_ic's own standard deviation to first order (in general
    sqrt(sum_j w_ij^2 (v_jc - y_ic)^2) / (sum_j w_ij + eps)). For zero-mean random v it is also the typical size of
    y_ic, so tests take max(|y_ref|, |nu|) as the scale of y's error: an output of a few elements can cancel far below
    it (one decoded token with e = 1 is one weighted mean of values per head; GPU fuzz seed 56560003 case 63's was
    2000x below its nu)."""
    options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid}
    squares, denominator = _weighted_powers(q, k, v, 2, eps, **options)
    return squares.sqrt() / denominator


def power_retention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    causal: bool = True,
    valid: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Quadratic-form power retention (the oracle). Shapes follow SDPA: ``q (B, Hq, Tq, d)``,
    ``k (B, Hk, Tk, d)``, ``v (B, Hk, Tk, e)``, ``log_gate (B, Hk|Hq, Tk)``, ``valid (B, Tk)``."""
    options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid}
    numerator, denominator = _weighted_powers(q, k, v, 1, eps, **options)
    return (numerator / denominator).to(q.dtype)


def _weighted_powers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, power: int, eps: float, **options: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_j w_ij^power v_j^power, sum_j w_ij + eps)`` per output element and row in the compute dtype, (B, Hq, Tq,
    e) and (B, Hq, Tq, 1) (0 and 1 where no key is admissible): the oracle's y is their ratio at power 1,
    ``rounding_spread`` the root of the first over the second at power 2. ``options`` as the oracle's."""
    shape = validate_retention_inputs(q, k, v, **options)
    if shape.kv_len == 0:  # no admissible key for any row
        zeros = q.new_zeros(shape.batch, shape.q_heads, shape.q_len, shape.value_dim, dtype=compute_dtype(q.dtype))
        return zeros, torch.ones_like(zeros[..., :1])
    weights = _weights(q, k, shape, **options)
    values = expand_kv_heads(v.to(weights.dtype), shape.group)
    return (weights**power) @ values**power, weights.sum(dim=-1, keepdim=True) + eps


def power_retention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Causal power retention by the token-by-token recurrence of DESIGN.md section 1:

        S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T,   z_t = exp(g_t) z_{t-1} + phi(k_t),
        y_i = phi(s q_i)^T S_{i+off} / (phi(s q_i)^T z_{i+off} + eps)

    with a padded key (valid False) adding nothing. One Python step per key: for tests only.
    """
    shape = validate_retention_inputs(q, k, v, deg=deg, log_gate=log_gate, causal=True, valid=valid, scale=scale)
    s = default_scale(shape.head_dim, scale)
    acc = compute_dtype(q.dtype)
    qf, kf, vf = q.to(acc), expand_kv_heads(k.to(acc), shape.group), expand_kv_heads(v.to(acc), shape.group)
    B, H, Tk = shape.batch, shape.q_heads, shape.kv_len
    gate = torch.zeros(B, H, Tk, dtype=acc, device=q.device) if log_gate is None else log_gate.to(acc)
    if gate.shape[1] != H:
        gate = expand_kv_heads(gate, shape.group)
    keep = torch.ones(B, Tk, dtype=acc, device=q.device) if valid is None else valid.to(acc)
    phi_q, phi_k = power_embedding(s * qf, deg), power_embedding(kf, deg) * keep[:, None, :, None]
    D = phi_k.shape[-1]
    state = torch.zeros(B, H, D, shape.value_dim, dtype=acc, device=q.device)
    norm = torch.zeros(B, H, D, dtype=acc, device=q.device)
    out = torch.zeros(B, H, shape.q_len, shape.value_dim, dtype=acc, device=q.device)
    for t in range(Tk):
        decay = torch.exp(gate[..., t])[..., None]
        state = decay[..., None] * state + phi_k[:, :, t, :, None] * vf[:, :, t, None, :]
        norm = decay * norm + phi_k[:, :, t]
        i = t - shape.offset
        if i >= 0:
            numerator = torch.einsum("bhD,bhDe->bhe", phi_q[:, :, i], state)
            denominator = (phi_q[:, :, i] * norm).sum(-1, keepdim=True) + eps
            out[:, :, i] = numerator / denominator
    return out.to(q.dtype)
