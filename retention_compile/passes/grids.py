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
retention's normalisation), so the bias is the per-step log-decay ``g = -m`` of a constant gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# An additive mask entry at or below this is a masked entry: exp(-1e4) is 0 in every float format, so
# softmax gives it exactly zero weight whatever the rest of the row holds.
MASKED_BELOW = -1.0e4


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

    @property
    def zero(self) -> bool:
        return bool((self.values == 0).all())

    def describe(self) -> str:
        shown = ", ".join(f"{v:.4g}" for v in self.values.tolist()[:8])
        return f"ALiBi slopes [{shown}{', ...' if self.values.numel() > 8 else ''}]"


def fit_slopes(bias: Tensor, admissible: Tensor) -> Slopes | str:
    """The slopes of ``bias`` (broadcastable to ``(B, H, Tq, Tk)``) as ``c_i + m_h j`` on the ``admissible``
    entries, or why it is not of that form. The slope must not depend on the batch row."""
    bias = bias.to(torch.float64).cpu()
    while bias.dim() < 4:
        bias = bias[None]
    admissible = admissible.to(torch.bool).cpu()
    while admissible.dim() < 4:
        admissible = admissible[None]
    heads = max(bias.shape[1], admissible.shape[1])
    bias, admissible = torch.broadcast_tensors(bias, admissible)
    kv_len = bias.shape[-1]
    cols = torch.arange(kv_len, dtype=torch.float64)
    count = admissible.sum(-1)
    last = torch.where(admissible, cols, -1.0).amax(-1)
    first = torch.where(admissible, cols, float(kv_len)).amin(-1)
    take = lambda index: bias.gather(-1, index.clamp(0, kv_len - 1).long()[..., None])[..., 0]  # noqa: E731
    if not bool(torch.isfinite(bias[admissible]).all()):  # +inf or NaN where keys are admitted: SDPA gives NaN rows
        return "the bias is +inf or NaN on admitted entries"
    rows = count >= 2
    if not bool(rows.any()):
        return Slopes(torch.zeros(1, dtype=torch.float64))
    slope = (take(last) - take(first)) / (last - first).clamp(min=1)
    per_head = slope.masked_fill(~rows, float("nan")).transpose(0, 1).reshape(heads, -1)
    m = per_head.nanmean(-1).nan_to_num(0.0)  # (H,); a head without a row of two keys has no slope to fit
    # the residual's scale: the bias less each row's value at its last key (the per-row constant c_i cancels, so a
    # large one must not widen the tolerance: 1e4 i + 0.45 (j mod 2) passed as linear with a slope fitted to noise)
    scale = 1.0 + float((bias - take(last)[..., None]).masked_fill(~admissible, 0).abs().max())
    predicted = take(last)[..., None] - m[None, :, None, None] * (last[..., None] - cols)
    error = (bias - predicted).masked_fill(~admissible, 0).abs().max()
    if not float(error) <= 1e-5 * scale:  # NaN fails too
        return f"the bias is not linear in the key position on the admissible entries (residual {float(error):.3g})"
    if bool((m < -1e-7 * scale).any()):
        return f"the bias grows with the distance to the key (slopes {m.tolist()}): not a decay"
    return Slopes(m.clamp(min=0))
