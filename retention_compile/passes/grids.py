"""Concrete attention-mask grids: the canonical ones, what a given grid is, and ALiBi slopes.

A grid is a bool tensor broadcastable to ``(B, H, Tq, Tk)``, True where query ``i`` may attend to key ``j``.
With ``off = Tk - Tq`` (bottom-right alignment, as the op's ``causal``):

    causal        j <= i + off
    window w      i + off - w < j <= i + off          (a sliding window of w keys, the query's own included)
    full          every entry
    documents     j <= i and no document starts in (j, i]   (Tq == Tk: packed sequences, block-diagonal causal;
                  the starts read from the grid's own subdiagonal, ``document_starts``)

A grid is compared entry by entry with these, so a grid is called causal only if it *is* the causal grid at
that size. With a key-validity mask ``valid (B, Tk)`` the comparison is with ``canonical & valid[b, j]``.

An additive bias ``b_ij`` (the finite part of a float mask) equals ALiBi's ``c_i - m (i - j)`` on the admissible
entries iff every row is linear in ``j`` with one slope ``m`` per head; ``c_i`` cancels in softmax (and in
retention's normalisation), so the bias is the per-step log-decay ``g = -m`` of a constant gate. A bias stored in
a 16-bit dtype is linear only to within its rounding (BLOOM in bf16 rounds ``m j`` by up to 1 at 600 keys), so each
entry may lie ``rounding_allowance`` from the line: ``BIAS_ROUNDINGS`` unit roundoffs of the dtype of the term it
came from, at the entry's own size (``CHECKED_ROUNDINGS`` at other sizes and later calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# An additive mask entry at or below this is a masked entry: exp(-1e4) is 0 in every float format, so
# softmax gives it exactly zero weight whatever the rest of the row holds.
MASKED_BELOW = -1.0e4
# Unit roundoff u = 2^-p of the float dtypes (p significand bits): rounding x to the dtype moves it by at most u |x|.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Roundings in its own dtype that a bias term's entry may carry where the slopes are read: BLOOM rounds the float32
# m_h j to its dtype once; Falcon multiplies bf16 slopes by positions converted to bf16 (rounded from 256 on) and
# rounds the product.
BIAS_ROUNDINGS = 2
# At the other sizes a proof evaluates and at every later call: one more (Falcon divides that product by sqrt(d) in
# bf16, inexact where d is not a power of 4, and a longer call rounds more of its positions than the traced one did)
CHECKED_ROUNDINGS = 3
# Roundings of the check's own arithmetic (rest = bias - m j in the bias's dtype, the allowance, the bounds)
CHECK_ROUNDINGS = 4
# Spread of a linear row that any bias may show, relative to 1 + max_h m_h (Tk - 1): float error of the bias's own
# computation in float32 (an ALiBi built in float32 and cast)
LINEAR_TOLERANCE = 1e-5


def causal_grid(q_len: int, kv_len: int, device: torch.device | None = None) -> Tensor:
    """``(Tq, Tk)`` bool: ``j <= i + (Tk - Tq)``."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def top_left_causal_grid(q_len: int, kv_len: int, device: torch.device | None = None) -> Tensor:
    """``(Tq, Tk)`` bool: ``j <= i`` (SDPA's ``is_causal`` with Tq < Tk: keys past the first Tq seen by no query)."""
    return torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None]


def document_starts(grid: Tensor) -> Tensor:
    """``(B, T)`` bool of a self-attention grid ``(B, H, T, T)``: key 0, and each key j that query j does not see
    key j - 1 from (head 0), the first key of a document in a block-diagonal causal grid (packed sequences)."""
    below = grid[:, 0, 1:, :-1].diagonal(dim1=-2, dim2=-1)  # grid[b, 0, j, j - 1]
    return torch.cat([torch.ones_like(below[:, :1]), ~below], -1)


def same_document(starts: Tensor) -> Tensor:
    """``(B, 1, T, T)`` bool: query i and key j lie in one document (no start in ``(min, max]`` of the two)."""
    document = starts.long().cumsum(-1)
    return document[:, None, :, None] == document[:, None, None, :]


def window_grid(q_len: int, kv_len: int, window: int, device: torch.device | None = None) -> Tensor:
    """``(Tq, Tk)`` bool: ``i + off - w < j <= i + off``."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device)[None, :]
    return (cols <= rows) & (cols > rows - window)


@dataclass(frozen=True)
class GridShape:
    """What one concrete grid is.

    full:    every entry admissible.
    causal:  the causal grid.
    window:  w, when the grid is a sliding window narrower than the longest causal row (None otherwise).
    kv_len:  Tk of the grid (a causal grid is also a window of any w >= Tk).
    detail:  for a grid that is none of these, where it differs from the causal grid.
    """

    full: bool
    causal: bool
    window: int | None
    kv_len: int
    detail: str = ""

    @property
    def known(self) -> bool:
        return self.full or self.causal or self.window is not None

    def describe(self) -> str:
        if self.causal and self.full:
            return "causal (= full: one query row)"
        if self.causal:
            return "causal"
        if self.full:
            return "full (no masking)"
        if self.window is not None:
            return f"sliding window of {self.window} keys"
        return f"not causal, windowed or full: {self.detail}"


def _with_valid(canonical: Tensor, valid: Tensor | None) -> Tensor:
    return canonical if valid is None else canonical & valid[:, None, None, :]


def _estimate_window(grid: Tensor, q_len: int, kv_len: int) -> int | None:
    """The widest span ``i + off - first admissible j + 1`` over the rows (the window, if the grid is one)."""
    rows = grid.reshape(-1, q_len, kv_len).any(0)
    has_key = rows.any(-1)
    if not bool(has_key.any()):
        return None
    first = torch.where(rows, torch.arange(kv_len)[None, :], kv_len).min(-1).values
    span = torch.arange(q_len) + (kv_len - q_len) - first + 1
    return int(span[has_key].max())


def _first_difference(grid: Tensor, reference: Tensor) -> str:
    grid, reference = torch.broadcast_tensors(grid, reference)
    differ = (grid != reference).nonzero()
    if differ.numel() == 0:
        return ""
    *lead, i, j = differ[0].tolist()
    where = f"b={lead[0]}, h={lead[1]}, " if len(lead) == 2 else ""
    state = "admissible" if bool(grid[tuple(differ[0])]) else "masked"
    return f"entry ({where}i={i}, j={j}) is {state} ({int(len(differ))} entries differ from the causal mask)"


def classify_grid(grid: Tensor, q_len: int, kv_len: int, valid: Tensor | None = None) -> GridShape:
    """Compare ``grid`` (broadcastable to ``(B, H, Tq, Tk)``) with the canonical grids at this size,
    each restricted to ``valid`` keys when given."""
    grid = grid.to(torch.bool).cpu()
    while grid.dim() < 4:
        grid = grid[None]
    if tuple(grid.shape[-2:]) not in ((q_len, kv_len), (1, kv_len), (q_len, 1), (1, 1)):
        return GridShape(
            False, False, None, kv_len, f"grid {tuple(grid.shape)} does not broadcast to ({q_len}, {kv_len})"
        )
    grid = grid.expand(*grid.shape[:2], q_len, kv_len)
    if valid is not None:
        valid = valid.to(torch.bool).cpu()
    causal = _with_valid(causal_grid(q_len, kv_len), valid)
    is_causal = bool((grid == causal).all())
    is_full = bool((grid == _with_valid(torch.ones(q_len, kv_len, dtype=torch.bool), valid)).all())
    window = None
    if not is_causal:
        width = _estimate_window(grid, q_len, kv_len)
        if width is not None and width < kv_len:
            candidate = _with_valid(window_grid(q_len, kv_len, width), valid)
            window = width if bool((grid == candidate).all()) else None
    detail = "" if (is_causal or is_full or window) else _first_difference(grid, causal)
    return GridShape(is_full, is_causal, window, kv_len, detail)


def combine(shapes: list[GridShape]) -> GridShape:
    """One reading valid at every sampled size: full, causal, or one window width ``w`` (a causal grid at a
    size with ``Tk <= w`` agrees with that window)."""
    if all(s.full for s in shapes):
        return GridShape(True, all(s.causal for s in shapes), None, shapes[0].kv_len)
    if all(s.causal for s in shapes):
        return GridShape(False, True, None, shapes[0].kv_len)
    widths = {s.window for s in shapes if s.window is not None}
    if len(widths) == 1:
        (width,) = widths
        if all(s.window == width or (s.causal and s.kv_len <= width) for s in shapes):
            return GridShape(False, False, width, shapes[0].kv_len)
    unknown = next((s for s in shapes if not s.known), None)
    detail = unknown.detail if unknown else "the mask is read differently at different sizes"
    return GridShape(False, False, None, shapes[0].kv_len, detail)


@dataclass(frozen=True)
class Slopes:
    """ALiBi slopes ``m_h >= 0`` (one per head, or one for all heads) of a bias ``c_i - m_h (i - j)``."""

    values: Tensor  # (H,) or (1,), float64
    allowance: float = 0.0  # the largest rounding allowance an admitted entry took (``rounding_allowance``)

    @property
    def zero(self) -> bool:
        return bool((self.values == 0).all())

    def describe(self) -> str:
        shown = ", ".join(f"{v:.4g}" for v in self.values.tolist()[:8])
        rounded = f" (to within {self.allowance:.2g}: the bias's rounding)" if self.allowance > 1e-3 else ""
        return f"ALiBi slopes [{shown}{', ...' if self.values.numel() > 8 else ''}]{rounded}"


def rounding_allowance(terms: list[Tensor], dtypes: list[torch.dtype], admitted: Tensor, roundings: int) -> Tensor:
    """How far each entry of a bias, the sum of ``terms`` stored in ``dtypes``, may lie from the exact value it was
    computed from: per term, ``roundings`` unit roundoffs of its dtype (relative bounds compose: an operand rounded
    and the product rounded stay within two of the product), summed; 0 for integer dtypes, which round nothing.

    Each is taken at the smaller of the entry's size and its row's span on the ``admitted`` keys (max - min of the
    term there). An ALiBi term is 0 at some key of each row or spans more than its size (BLOOM's and Falcon's start
    at 0 at the first valid key; ``-m (i - j)`` is 0 at the diagonal), so its rounding is covered. A term whose size
    is mostly a constant gets only its span's worth: a row constant of 1000 in bf16 (steps of 4 there) must not let
    a pattern of a few units pass as its rounding, and a constant term (span 0) lends nothing to the other terms."""
    total = torch.zeros((), dtype=terms[0].dtype, device=terms[0].device)
    for term, dtype in zip(terms, dtypes):
        high = torch.where(admitted, term, -math.inf).amax(-1, keepdim=True)
        low = torch.where(admitted, term, math.inf).amin(-1, keepdim=True)
        size = torch.minimum(term.abs(), (high - low).clamp(min=0))  # a row with no admitted key: 0
        total = total + size * (roundings * UNIT_ROUNDOFF.get(dtype, 0.0))
    return total


def linear_misfit(bias: Tensor, admitted: Tensor, slopes: Tensor, allowance: Tensor) -> Tensor:
    """Per row ``(B, H, Tq)``: how far ``bias`` is from ``c_i + m_h j`` on the ``admitted`` entries, for the best
    ``c_i``, beyond each entry's ``allowance`` and the tolerance; at most 0 where the row is such a line (or has no
    admitted entry). With ``r = bias - m_h j`` and ``s`` the allowance plus the rounding of this arithmetic in
    ``bias``'s dtype, the intervals ``[r - s, r + s]`` must share a point to within ``LINEAR_TOLERANCE (1 + max_h m_h
    (Tk - 1))``: ``max(r - s) - min(r + s) - tolerance``. The one criterion of the fit (float64, at compile time)
    and of the rewrite's run-time check (in the graph, on each call's float32 bias)."""
    bias, admitted, allowance = torch.broadcast_tensors(bias, admitted, allowance)
    cols = torch.arange(bias.shape[-1], dtype=bias.dtype, device=bias.device)
    line = slopes.to(bias.dtype).reshape(-1, 1, 1) * cols
    rest = bias - line
    slack = allowance + (bias.abs() + line.abs()) * (CHECK_ROUNDINGS * UNIT_ROUNDOFF[bias.dtype])
    high = torch.where(admitted, rest - slack, -math.inf).amax(-1)
    low = torch.where(admitted, rest + slack, math.inf).amin(-1)
    tolerance = LINEAR_TOLERANCE * (1 + slopes.max().to(bias.dtype) * (bias.shape[-1] - 1))
    return high - low - tolerance  # a row with no admitted entry: -inf; NaN in the bias: NaN, which fails


def fit_slopes(bias: Tensor, admissible: Tensor, allowance: Tensor | None = None) -> Slopes | str:
    """The slopes of ``bias`` (broadcastable to ``(B, H, Tq, Tk)``) as ``c_i + m_h j`` on the ``admissible``
    entries, each entry within its ``allowance`` (``rounding_allowance``; None: none), or why it is not of that
    form. ``m_h`` is the least-squares slope of the head's rows (each about its own mean: ``c_i`` drops out), so the
    roundings of a 16-bit bias average out where the ends of a row alone would carry theirs; every row is then held
    to ``linear_misfit``. The slope must not depend on the batch row."""
    bias = bias.to(torch.float64).cpu()
    while bias.dim() < 4:
        bias = bias[None]
    admissible = admissible.to(torch.bool).cpu()
    while admissible.dim() < 4:
        admissible = admissible[None]
    heads = max(bias.shape[1], admissible.shape[1])
    bias, admissible = torch.broadcast_tensors(bias, admissible)
    allowance = torch.zeros(()) if allowance is None else allowance.to(torch.float64).cpu()
    if not bool(torch.isfinite(bias[admissible]).all()):  # +inf or NaN where keys are admitted: SDPA gives NaN rows
        return "the bias is +inf or NaN on admitted entries"
    bias = bias.masked_fill(~admissible, 0.0)  # masked entries (-inf, say) take no part
    weights = admissible.to(torch.float64)
    count = weights.sum(-1, keepdim=True).clamp(min=1)
    cols = torch.arange(bias.shape[-1], dtype=torch.float64)
    centred = (cols - (weights * cols).sum(-1, keepdim=True) / count) * weights
    deviation = bias - (weights * bias).sum(-1, keepdim=True) / count
    per_head = lambda x: x.transpose(0, 1).reshape(heads, -1).sum(-1)  # noqa: E731
    moment = per_head((centred * centred).sum(-1))
    m = (per_head((centred * deviation).sum(-1)) / moment).nan_to_num(0.0)  # a head without a row of two keys: 0
    if not bool(moment.any()):
        return Slopes(torch.zeros(1, dtype=torch.float64))
    decay_tolerance = LINEAR_TOLERANCE * (1 + float(m.abs().max()) * (bias.shape[-1] - 1)) / max(bias.shape[-1], 1)
    for slopes in (m, m.clamp(min=0)):  # linear, then with the slopes the op and the run-time check take
        misfit = float(linear_misfit(bias, admissible, slopes, allowance).max())
        if not misfit <= 0:  # NaN fails too
            return (
                "the bias is not linear in the key position on the admissible entries, to within the rounding of "
                f"its dtype (off by {misfit:.3g})"
            )
        if bool((m < -decay_tolerance).any()):
            return f"the bias grows with the distance to the key (slopes {m.tolist()}): not a decay"
    return Slopes(m.clamp(min=0), float(allowance.expand_as(bias).masked_fill(~admissible, 0.0).max()))
