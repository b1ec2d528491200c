"""Power retention in chunked form, forward and explicit backward, in plain PyTorch.

The math is DESIGN.md section 1. With ``V'_j = [v_j, 1]`` one product gives numerator and normaliser:

    O'_i  = [N_i, Z_i] = sum_j w_ij V'_j,   w_ij = (s q_i . k_j)^p exp(G_{i+off} - G_j)  (admissible j)
    y_i   = N_i / denom_i,                   denom_i = Z_i + eps

Causal layout (``off = Tk - Tq``, bottom-right alignment). Keys ``[0, P)`` with ``P = max(off, 0)`` precede
every query; queries ``[0, Z)`` with ``Z = max(-off, 0)`` see no key (``O' = 0``); the remaining ``L`` queries
and keys are aligned, query ``Z + t`` sitting at key position ``P + t``. The aligned part is cut into
``n = (L - 1) // C`` full chunks plus one last chunk, the tail, of ``L - n C`` steps: 1 to C, never empty (for
``L > 0``), and no padding. With ``phi`` the symmetric
power embedding (``phi(x) . phi(y) = (x . y)^p``), ``Q_i = s q_i`` and ``G_i`` read at query i's key position:

    chunk states   S_c  = sum_{j in c} exp(E_c - G_j) phi(k_j) V'_j^T        sources c: the prefix, full chunks
    chunk ends     E_c  = G at the last key of source c (E_prefix = G_{P-1}, 0 for an empty prefix)
    incoming       I_c  = sum_{c' <= c} exp(E_c - E_c') S_c'                 the state before aligned chunk c
    output         O'_i = exp(G_i - E_c) phi(Q_i)^T I_c + sum_{j in c, j <= i} (Q_i . k_j)^p exp(G_i - G_j) V'_j

The sum over ``c'`` is one matmul with the lower-triangular chunk-pair matrix ``exp(E_c - E_c')``, so the
number of chunks is never a Python loop count, and every ``exp`` argument is ``<= 0`` (G is a cumulative sum
of ``g <= 0``; masked entries are ``-inf`` before ``exp``). Padded keys (``valid`` False) get weight
``exp(-inf) = 0``. The non-causal form has one source (every valid key) read by every query.

The backward runs the same pieces in the adjoint direction; with ``dO'_i = [dy_i, -(dy_i . y_i)] / denom_i``:

    reverse states R_c  = sum_{c'' >= c} exp(E_c'' - E_c) sum_{i in c''} exp(G_i - E_c'') phi(Q_i) dO'_i^T
    dV'_j = sum_i w_ij dO'_i,   dw_ij = dO'_i . V'_j
    dQ_i  = J_phi(Q_i)^T (exp(G_i - E_c) I_c dO'_i) + sum_j dw_ij p (Q_i . k_j)^(p-1) exp(G_i - G_j) k_j
    dk_j  = J_phi(k_j)^T (exp(E_c - G_j) R_c V'_j) + sum_i dw_ij p (Q_i . k_j)^(p-1) exp(G_i - G_j) Q_i
    dG_t  = dO'_i . O'_i [i at position t] - V'_t . dV'_t,   dO'_i . O'_i = (dy_i . y_i) eps / denom_i
    dg_u  = sum_{t >= u} dG_t,   dq = s dQ

Shapes follow SDPA outside. Inside, every tensor is a stack of rows, one row per state (``_Rows``), so all
matmuls have the two batch dims (row, chunk): this keeps symbolic tracing cheap.

Tracing: there is no ``.item()`` and no Python branch on a length; the chunk count is a symbolic size, never a
loop count. A graph traced at one length computes every other length correctly, even when traced where a
chunk count was 0 or 1 or the tail 1: broadcasts of sizes that may be 1 are explicit ``expand``s, ranges are
``narrow``s, batched products are ``bmm``s of contiguous copies (``_bmm``), one-chunk pieces are ``unsqueeze``s,
and a product over a derived length that may be 1 is padded (``_contract``). Only the head dim and the head counts
are specialised (``int``). PyTorch still records 0/1 guards on derived sizes, so ``torch.compile`` may recompile
when a chunk count crosses 0 or 1 or the tail 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .checks import validate_retention_inputs
from .gates import cumulative_log_gate, log_gate_grad
from .power_features import power_embedding, power_embedding_vjp
from .reference import EPS, compute_dtype, default_scale

Size = int | torch.SymInt
TIME = 1  # the time axis of row tensors (R, T, ...)


class _Piece(NamedTuple):
    """A stretch ``[start, start + count * size)`` of the time axis, cut into ``count`` chunks of ``size``."""

    start: Size
    count: Size
    size: Size

    def of(self, x: Tensor, per_step: int = 1) -> Tensor:
        """``x`` (R, T * per_step, ...) restricted to the piece: (R, count, size * per_step, ...).

        ``per_step`` rows per time step: the query heads that read one state, interleaved step-major. A
        piece of one chunk (the literal count 1: prefix, tail) is a plain ``unsqueeze``, free of the size
        arithmetic of a reshape, which would add guards true only for the traced length."""
        stretch = x.narrow(TIME, self.start * per_step, self.count * self.size * per_step)
        if isinstance(self.count, int) and self.count == 1:
            return stretch.unsqueeze(TIME)
        return stretch.unflatten(TIME, (self.count, self.size * per_step))


def _query_rows(x: Tensor, heads: int) -> Tensor:
    """(B, Hq, Tq, f) -> (R, Tq * heads, f): the ``heads`` query heads of a state interleaved step-major."""
    B, Hq, Tq, f = x.shape
    return x.reshape(B, Hq // heads, heads, Tq, f).transpose(2, 3).reshape(-1, Tq * heads, f)


def _query_heads(x: Tensor, batch: Size, heads: int) -> Tensor:
    """Inverse of ``_query_rows``: (R, Tq * heads, f) -> (B, Hq, Tq, f)."""
    R, steps, f = x.shape
    return x.reshape(batch, R // batch, steps // heads, heads, f).transpose(2, 3).reshape(batch, -1, steps // heads, f)


def _per_head(x: Tensor, heads: int, dim: int) -> Tensor:
    """Repeat each step of ``dim`` once per query head of the state (identity for one head)."""
    return x if heads == 1 else x.repeat_interleave(heads, dim=dim)


@dataclass(frozen=True)
class _Rows:
    """The inputs in the accumulation dtype as rows ``R = B * Hk * gk``, one per state.

    ``gk`` is ``Hq / Hk`` for a query-head gate (a state per query head) and 1 otherwise; the
    ``heads = Hq / (Hk gk)`` query heads that read one state are interleaved step-major along the query axis.
    q = s q (R, Tq * heads, d); k (R, Tk, d); vp = [v, 1] (R, Tk, e+1); phi_q, phi_k their embeddings;
    cum = G (R, Tk) in float64 (``gates.cumulative_log_gate``; zeros in the accumulation dtype without a gate);
    valid (R, Tk) or None. Every log weight is a difference of G cast to the accumulation dtype once formed.
    """

    q: Tensor
    k: Tensor
    vp: Tensor
    phi_q: Tensor
    phi_k: Tensor
    cum: Tensor
    valid: Tensor | None
    heads: int
    deg: int


def _to_rows(
    q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None, valid: Tensor | None, scale: float, deg: int
) -> _Rows:
    """Cast to the accumulation dtype, scale q, append the ones column to v, take G (``cumulative_log_gate``), embed.

    Head counts and the head dims d and e are made static (``int``): the embedding's multiset table is built from d
    and the row layout from the heads, so a traced graph is specialised to them (batch and lengths stay
    symbolic). ``expand`` with these ints (a no-op on the data) gives tensors whose sizes are the ints even
    where the inputs' sizes are symbolic; a ``reshape`` to the same sizes would keep the symbols. A symbolic e made
    Inductor fail on CPU under ``dynamic=True`` with gradients (T=200, e=3: "Exponent must be non-negative" in the
    value ranges of a stride with (e + 1) times the tail length over the tail length).
    """
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    Hq, Hk, d = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    gate_group = 1 if log_gate is None else int(log_gate.shape[1]) // Hk
    states, acc = Hk * gate_group, compute_dtype(q.dtype)

    def key_rows(x: Tensor, width: Size) -> Tensor:
        return x.to(acc).unsqueeze(2).expand(B, Hk, gate_group, Tk, width).reshape(B * states, Tk, width)

    ks, vs = key_rows(k, d), key_rows(v, int(v.shape[-1]))
    vp = torch.cat([vs, vs.new_ones(vs.shape[:-1]).unsqueeze(-1)], dim=-1)
    cum = ks.new_zeros(B * states, Tk) if log_gate is None else cumulative_log_gate(log_gate).reshape(B * states, Tk)
    mask = None if valid is None else valid.unsqueeze(1).expand(B, states, Tk).reshape(B * states, Tk)
    heads = Hq // states
    qs = _query_rows(q.to(acc).expand(B, Hq, Tq, d) * scale, heads)
    return _Rows(qs, ks, vp, power_embedding(qs, deg), power_embedding(ks, deg), cum, mask, heads, deg)


def _valid_of(x: _Rows, piece: _Piece) -> Tensor | None:
    """The key-validity mask of a piece (None: every key valid)."""
    return None if x.valid is None else piece.of(x.valid)


def _excess(a: Size, b: Size) -> Size:
    """``max(a - b, 0)``: 0 where the lengths are equal, else ``torch.sym_max``. Where they are two symbols, the
    equality test is a guard: a graph traced at equal lengths is specialised to them (and makes the two one
    symbol), one traced at unequal lengths serves every pair, equal ones included. Inductor (torch 2.13, CPU,
    ``dynamic=True`` with gradients) failed a stride assertion on views of an axis sized ``Max(0, Tk - Tq)`` traced
    where it was 0 (its contiguous strides read ``Max(1, Tk - Tq)``): a recompile at equal lengths had given q and
    k a symbol each."""
    return 0 if a == b else torch.sym_max(a - b, 0)


class _Layout(NamedTuple):
    """The causal layout of the module docstring: prefix keys, skipped queries, aligned full chunks and tail."""

    prefix: Size  # P
    skip: Size  # Z
    full: Size  # n
    chunk: int  # C
    tail: Size  # L - n C, in [1, C] (0 only for L = 0)

    @staticmethod
    def of(q_len: Size, kv_len: Size, chunk: int) -> _Layout:
        """``P = max(Tk - Tq, 0)``, ``Z = max(Tq - Tk, 0)``, ``L = Tk - P``, ``n = (L - 1) // C`` (0 for L = 0).

        The tail is never empty: under dynamic shapes an empty one (L a multiple of C) was an axis of length
        ``T mod C`` guarded to 0, and Inductor (torch 2.13, CPU) failed a stride-order assertion on the views of it
        that the forward saved for the backward (their strides read ``Max(1, T mod C)``).

        With concrete lengths C is at most L: a longer chunk gives the same result, but the empty full-chunk piece
        would still build C x C decay tensors (8 TB for C = 2^20). Symbolic lengths keep C: a graph traced at one
        length serves every length, and clamping to the traced one would bake a chunk count of 0 or 1 into it.
        Symbolic lengths are at least 2 (PyTorch specialises lengths 0 and 1), so there ``L >= 1`` and ``n >= 0``."""
        prefix = _excess(kv_len, q_len)
        aligned = kv_len - prefix
        if isinstance(aligned, int):
            chunk = min(chunk, max(aligned, 1))
            full = max(aligned - 1, 0) // chunk
        else:
            full = (aligned - 1) // chunk
        return _Layout(prefix, _excess(q_len, kv_len), full, chunk, aligned - full * chunk)

    def sources(self) -> tuple[_Piece, _Piece]:
        """Key pieces whose chunk states feed later chunks: the prefix (one chunk of P) and the full chunks."""
        return _Piece(0, 1, self.prefix), _Piece(self.prefix, self.full, self.chunk)

    def aligned(self, start: Size) -> tuple[_Piece, _Piece]:
        """The full chunks and the tail chunk of the aligned part, which begins at ``start`` on its axis."""
        return _Piece(start, self.full, self.chunk), _Piece(start + self.full * self.chunk, 1, self.tail)

    def chunk_ends(self, cum: Tensor) -> Tensor:
        """``E`` (R, n + 1): G at the last prefix key (0 for an empty prefix) and at the end of each full chunk."""
        before_aligned = torch.nn.functional.pad(cum, (1, 0)).narrow(-1, self.prefix, 1)
        return torch.cat([before_aligned, self.sources()[1].of(cum)[..., -1]], dim=-1)

    def source_ranges(self) -> tuple[tuple[Size, Size], tuple[Size, Size]]:
        """(start, length) of the prefix and the full chunks on the (n + 1) chunk axis of ``E`` and ``R``.

        Ranges are taken with ``narrow``: a Python slice would be elided in a graph traced where it covered
        the whole axis (n = 0)."""
        return (0, 1), (1, self.full)

    def incoming_ranges(self) -> tuple[tuple[Size, Size], tuple[Size, Size]]:
        """(start, length) of the full chunks and the tail chunk on the (n + 1) chunk axis of ``E`` and ``I``."""
        return (0, self.full), (self.full, 1)


def _masked(log_w: Tensor, valid: Tensor | None) -> Tensor:
    """``log_w`` with ``-inf`` where the key is padding (so ``exp`` gives weight 0)."""
    return log_w if valid is None else torch.where(valid, log_w, -math.inf)


def _pairwise(x: Tensor) -> Tensor:
    """``x_a - x_b`` over the last dim: (..., m) -> (..., m, m).

    Broadcast by explicit ``expand``: an implicit broadcast of a size that is 1 when traced (one chunk, a
    one-step tail) against a literal 1 would fix that size to 1 in the traced graph."""
    shape = (*x.shape, x.shape[-1])
    return x.unsqueeze(-1).expand(shape) - x.unsqueeze(-2).expand(shape)


def _minus_ends(cum: Tensor, ends: Tensor, dtype: torch.dtype) -> Tensor:
    """``G_i - E_c`` in ``dtype`` for every step i of chunk c: (R, m, l), (R, m) -> (R, m, l), broadcast by
    ``expand``."""
    return (cum - ends.unsqueeze(-1).expand(cum.shape)).to(dtype)


def _lower_log_decay(cum: Tensor, valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``L_ab = G_a - G_b`` in ``dtype`` for ``b <= a`` (and b valid), else ``-inf``: (..., m) -> (..., m, m)."""
    diff = _pairwise(cum).to(dtype)
    keep = (_pairwise(torch.arange(cum.shape[-1], device=cum.device)) >= 0).expand(diff.shape)
    if valid is not None:
        keep = keep & valid.unsqueeze(-2).expand(diff.shape)
    return torch.where(keep, diff, -math.inf)


def _derived(length: Size) -> bool:
    """Whether ``length`` is an expression of symbolic lengths (a tail, a prefix, a chunk count) not known to be at
    least 2: guards can make it 0 or 1 while it stays an expression. An input's own length (a plain symbol) or a
    number is not."""
    if not isinstance(length, torch.SymInt) or length.node.expr.is_Symbol:
        return False
    return not statically_known_true(length >= 2)


def _zero_steps(x: Tensor, dim: int) -> Tensor:
    """``x`` with two zero steps appended along ``dim`` (-1 or -2): a ``_derived`` length so padded is at least 2,
    and a sum over it is unchanged."""
    return torch.nn.functional.pad(x, (0, 2) if dim == -1 else (0, 0, 0, 2))


def _contract(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` of (R, x, y) and (R, y, z); a contraction length ``y`` derived from symbolic lengths (a
    tail, a prefix ``Tk - Tq``, a chunk count ``n + 1``) is first padded with two zero steps.

    Such a length can be 1 by the graph's guards while remaining an expression. Inductor (torch 2.13, CPU) then turns
    the product into a broadcast outer product, ``a * b``, yet indexes the length-1 axis of the operands as if
    it spanned the broadcast one: rows of garbage, NaN or inf (the backward's tail state, with a one-key tail). The
    padding keeps ``y >= 2`` and adds zeros to the sum. An input's own length (a plain symbol) is never padded:
    a length-1 input is specialised to the literal 1, which Inductor reads right."""
    if _derived(a.shape[-1]):
        a, b = _zero_steps(a, -1), _zero_steps(b, -2)
    return torch.bmm(a, b)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` over the matching (row, chunk) dims of (R, m, x, y) and (R, m, y, z), as one ``bmm``.

    The operands are copied to contiguous layout first, so merging (R, m) is a view whatever the sizes: a
    graph traced where a chunk count is 0 or 1, or a tail empty, stays valid for every other length
    (``matmul`` would decide view-or-copy and broadcasting from the sizes seen when traced). A piece of one chunk
    (the literal count 1: prefix, tail) is a ``_contract`` of the squeezed operands instead: under dynamic shapes
    Inductor (torch 2.13, CPU) miscompiled the copy and merge of a tail of one key, returning garbage in its row."""
    rows, chunks = a.shape[0], a.shape[1]
    if isinstance(chunks, int) and chunks == 1:
        return _contract(a.squeeze(1), b.squeeze(1)).unsqueeze(1)
    dense = (t.clone(memory_format=torch.contiguous_format).flatten(0, 1) for t in (a, b))
    return torch.bmm(*dense).unflatten(0, (rows, chunks))


def _weighted(x: Tensor, log_w: Tensor | None) -> Tensor:
    """``exp(log_w_i) x_i`` row by row (``x`` unchanged without weights)."""
    return x if log_w is None else x * log_w.exp().unsqueeze(-1)


def _accumulate(features: Tensor, log_w: Tensor | None, values: Tensor) -> Tensor:
    """Chunk states ``S_c = sum_{j in c} exp(log_w_j) f_j values_j^T``:
    (..., m, l, D), (..., m, l, e) -> (..., m, D, e).

    A derived step count ``l`` (``_derived``) is padded with two zero steps before the transpose: under dynamic shapes
    the transposed weighted features may be saved for the backward, and a view of a tensor whose length is
    ``Max(0, Tk - Tq)``, 0 when Tq > Tk, failed Inductor's stride-order assertion (torch 2.13, CPU)."""
    weighted = _weighted(features, log_w)
    if _derived(weighted.shape[-2]):
        weighted, values = _zero_steps(weighted, -2), _zero_steps(values, -2)
    return _bmm(weighted.transpose(-1, -2), values)


def _read(features: Tensor, state: Tensor, log_w: Tensor | None) -> Tensor:
    """``exp(log_w_i) f_i^T S_c``: (..., m, l, D), (..., m, D, e) -> (..., m, l, e)."""
    return _weighted(_bmm(features, state), log_w)


def _phi_grad(values: Tensor, state: Tensor, log_w: Tensor | None) -> Tensor:
    """``exp(log_w_i) S_c values_i``, the gradient of ``sum_i exp(log_w_i) phi_i^T S_c values_i`` with respect to
    ``phi_i``: (..., m, l, e), (..., m, D, e) -> (..., m, l, D). ``J_phi^T`` is applied once per input, over
    the whole time axis (``power_embedding_vjp``)."""
    return _weighted(_bmm(values, state.transpose(-1, -2)), log_w)


def _mix(pair_decay: Tensor, states: Tensor) -> Tensor:
    """``sum_c' M_cc' S_c'`` over the chunk axis: (R, m, m), (R, m, D, e) -> (R, m, D, e)."""
    return _contract(pair_decay, states.flatten(-2)).unflatten(-1, states.shape[-2:])


def _intra_forward(q: Tensor, k: Tensor, vp: Tensor, log_decay: Tensor, deg: int) -> Tensor:
    """``O'_i = sum_j (Q_i . k_j)^p exp(L_ij) V'_j`` inside each chunk."""
    return _bmm(_bmm(q, k.transpose(-1, -2)) ** deg * log_decay.exp(), vp)


def _intra_backward(
    q: Tensor, k: Tensor, vp: Tensor, d_out: Tensor, log_decay: Tensor, deg: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Adjoint of ``_intra_forward``: with ``A = Q k^T``, ``W = A^p exp(L)``, ``dW = dO' V'^T``,
    ``dA = dW p A^(p-1) exp(L)``: returns ``dQ = dA k``, ``dk = dA^T Q`` and ``dV' = W^T dO'``."""
    scores, decay = _bmm(q, k.transpose(-1, -2)), log_decay.exp()
    d_scores = _bmm(d_out, vp.transpose(-1, -2)) * (deg * scores ** (deg - 1) * decay)
    return _bmm(d_scores, k), _bmm(d_scores.transpose(-1, -2), q), _bmm((scores**deg * decay).transpose(-1, -2), d_out)


def _flat(x: Tensor) -> Tensor:
    """Merge the (chunk, step) axes back into time."""
    return x.flatten(TIME, TIME + 1)


def _zeros(x: _Rows, rows: Size, width: Size) -> Tensor:
    """Zeros (R, rows, width): the part of a gradient that a piece does not touch."""
    return x.q.new_zeros(x.q.shape[0], rows, width)


class _CausalPlan(NamedTuple):
    """What the causal forward and backward share: the per-chunk log weights and the incoming states."""

    pair_decay: Tensor  # exp(E_c - E_c'), (R, n+1, n+1)
    source_log_w: tuple[Tensor, Tensor]  # E_c - G_j for the prefix and the full chunks, (R, m, l)
    query_log_w: tuple[Tensor, Tensor]  # G_i - E_c for the full chunks and the tail, (R, m, l * heads)
    intra_log_decay: tuple[Tensor, Tensor]  # G_i - G_j inside the full chunks and the tail, (R, m, l * heads, l)
    incoming: Tensor  # I_c, (R, n+1, D, e+1)


def _causal_plan(x: _Rows, layout: _Layout) -> _CausalPlan:
    """Chunk ends, log weights and incoming states ``I = M S`` of the causal layout (module docstring)."""
    acc, ends = x.k.dtype, layout.chunk_ends(x.cum)
    pair_decay = _lower_log_decay(ends, None, acc).exp()
    sources = layout.sources()
    source_log_w = tuple(
        _masked(-_minus_ends(piece.of(x.cum), ends.narrow(-1, start, count), acc), _valid_of(x, piece))
        for piece, (start, count) in zip(sources, layout.source_ranges())
    )
    states = torch.cat([_accumulate(p.of(x.phi_k), w, p.of(x.vp)) for p, w in zip(sources, source_log_w)], TIME)
    key_pieces = layout.aligned(layout.prefix)
    query_log_w = tuple(
        _per_head(_minus_ends(piece.of(x.cum), ends.narrow(-1, start, count), acc), x.heads, -1)
        for piece, (start, count) in zip(key_pieces, layout.incoming_ranges())
    )
    intra_log_decay = tuple(
        _per_head(_lower_log_decay(piece.of(x.cum), _valid_of(x, piece), acc), x.heads, -2) for piece in key_pieces
    )
    return _CausalPlan(pair_decay, source_log_w, query_log_w, intra_log_decay, _mix(pair_decay, states))


def _causal_forward(x: _Rows, layout: _Layout) -> Tensor:
    """``O'`` (R, Tq * heads, e+1) of causal retention, chunk by chunk (module docstring)."""
    plan = _causal_plan(x, layout)
    parts = [_zeros(x, layout.skip * x.heads, x.vp.shape[-1])]  # queries with no key
    for q_piece, k_piece, (start, count), log_w, log_decay in zip(
        layout.aligned(layout.skip),
        layout.aligned(layout.prefix),
        layout.incoming_ranges(),
        plan.query_log_w,
        plan.intra_log_decay,
    ):
        inter = _read(q_piece.of(x.phi_q, x.heads), plan.incoming.narrow(TIME, start, count), log_w)
        intra = _intra_forward(q_piece.of(x.q, x.heads), k_piece.of(x.k), k_piece.of(x.vp), log_decay, x.deg)
        parts.append(_flat(inter + intra))
    return torch.cat(parts, TIME)


def _non_causal_log_w(x: _Rows) -> Tensor | None:
    """Log weights of the single non-causal source: 0 for a valid key, ``-inf`` for padding (None: all valid)."""
    return None if x.valid is None else _masked(x.cum, x.valid).unsqueeze(TIME)


def _non_causal_state(x: _Rows) -> Tensor:
    """``S = sum_j phi(k_j) V'_j^T`` over every valid key, as one chunk: (R, 1, D, e+1)."""
    return _accumulate(x.phi_k.unsqueeze(TIME), _non_causal_log_w(x), x.vp.unsqueeze(TIME))


def _non_causal_forward(x: _Rows) -> Tensor:
    """``O'_i = phi(Q_i)^T S`` for every query."""
    return _flat(_read(x.phi_q.unsqueeze(TIME), _non_causal_state(x), None))


def chunked_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: Tensor | None,
    causal: bool,
    valid: Tensor | None,
    chunk_size: int,
    eps: float = EPS,
) -> tuple[Tensor, Tensor]:
    """Chunked power retention: ``y_i = N_i / denom_i`` with ``[N_i, Z_i] = sum_j w_ij [v_j, 1]`` and
    ``denom_i = Z_i + eps``. Inputs are assumed valid (see ``validate_retention_inputs``).

    Returns ``y`` (B, Hq, Tq, e) and ``denom`` (B, Hq, Tq) in the accumulation dtype (``compute_dtype``): the
    backward reads ``dZ_i = -(dy_i . y_i) / denom_i`` off y, and a y rounded to 16 bits would move that small
    difference (and so dq and d log_gate) by far more than the inputs' precision.
    """
    x = _to_rows(q, k, v, log_gate, valid, scale, deg)
    out = _causal_forward(x, _Layout.of(q.shape[2], k.shape[2], chunk_size)) if causal else _non_causal_forward(x)
    out = _query_heads(out, q.shape[0], x.heads)
    denom = out[..., -1] + eps
    return out[..., :-1] / denom.unsqueeze(-1), denom


def _causal_backward(x: _Rows, layout: _Layout, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``dQ`` (R, Tq * heads, d), ``dk`` (R, Tk, d), ``dV'`` (R, Tk, e+1) of causal retention given ``dO'``.

    Inter-chunk parts come from the incoming states ``I`` (queries) and the reverse states ``R`` (keys),
    intra-chunk parts from ``_intra_backward``; the lists below run along time (skipped queries or prefix
    keys, full chunks, tail) with zeros where a piece has no part."""
    plan = _causal_plan(x, layout)
    q_pieces, k_pieces = layout.aligned(layout.skip), layout.aligned(layout.prefix)
    local = [_accumulate(p.of(x.phi_q, x.heads), w, p.of(d_out, x.heads)) for p, w in zip(q_pieces, plan.query_log_w)]
    reverse = _mix(plan.pair_decay.transpose(-1, -2), torch.cat(local, TIME))  # R_c
    D, tail = x.phi_k.shape[-1], layout.tail
    reverse_parts = [reverse.narrow(TIME, start, count) for start, count in layout.source_ranges()]
    inter = [
        (_flat(_phi_grad(p.of(x.vp), r, w)), _flat(_read(p.of(x.phi_k), r, w)))
        for p, w, r in zip(layout.sources(), plan.source_log_w, reverse_parts)
    ]
    phi_k_grad = [g for g, _ in inter] + [_zeros(x, tail, D)]
    dvp_inter = [g for _, g in inter] + [_zeros(x, tail, x.vp.shape[-1])]
    phi_q_grad, dq_intra = [_zeros(x, layout.skip * x.heads, D)], [_zeros(x, layout.skip * x.heads, x.q.shape[-1])]
    dk_intra, dvp_intra = [_zeros(x, layout.prefix, x.k.shape[-1])], [_zeros(x, layout.prefix, x.vp.shape[-1])]
    for q_piece, k_piece, (start, count), log_w, log_decay in zip(
        q_pieces, k_pieces, layout.incoming_ranges(), plan.query_log_w, plan.intra_log_decay
    ):
        qc, dc = q_piece.of(x.q, x.heads), q_piece.of(d_out, x.heads)
        phi_q_grad.append(_flat(_phi_grad(dc, plan.incoming.narrow(TIME, start, count), log_w)))
        grads = _intra_backward(qc, k_piece.of(x.k), k_piece.of(x.vp), dc, log_decay, x.deg)
        for parts, grad in zip((dq_intra, dk_intra, dvp_intra), grads):
            parts.append(_flat(grad))
    dq = power_embedding_vjp(x.q, torch.cat(phi_q_grad, TIME), x.deg) + torch.cat(dq_intra, TIME)
    dk = power_embedding_vjp(x.k, torch.cat(phi_k_grad, TIME), x.deg) + torch.cat(dk_intra, TIME)
    return dq, dk, torch.cat(dvp_inter, TIME) + torch.cat(dvp_intra, TIME)


def _non_causal_backward(x: _Rows, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dQ, dk, dV')`` of non-causal retention: ``R = sum_i phi(Q_i) dO'_i^T``, ``dQ_i = J_phi(Q_i)^T (S dO'_i)``,
    ``dk_j = J_phi(k_j)^T (R V'_j)``, ``dV'_j = R^T phi(k_j)`` (padded keys: 0)."""
    log_w, d_chunk = _non_causal_log_w(x), d_out.unsqueeze(TIME)
    reverse = _accumulate(x.phi_q.unsqueeze(TIME), None, d_chunk)
    phi_q_grad = _phi_grad(d_chunk, _non_causal_state(x), None)
    phi_k_grad = _phi_grad(x.vp.unsqueeze(TIME), reverse, log_w)
    return (
        power_embedding_vjp(x.q, _flat(phi_q_grad), x.deg),
        power_embedding_vjp(x.k, _flat(phi_k_grad), x.deg),
        _flat(_read(x.phi_k.unsqueeze(TIME), reverse, log_w)),
    )


def _gate_grad(x: _Rows, layout: _Layout, query_term: Tensor, dvp: Tensor) -> Tensor:
    """``dg`` (R, Tk) from ``dG_t = dO'_i . O'_i [i + off = t] - V'_t . dV'_t`` (``gates.log_gate_grad``);
    ``query_term`` (R, Tq * heads) holds ``dO'_i . O'_i``, summed here over the heads of each state."""
    per_step = query_term.unflatten(TIME, (-1, x.heads)).sum(-1)
    aligned = per_step.narrow(TIME, layout.skip, per_step.shape[TIME] - layout.skip)
    return log_gate_grad(torch.nn.functional.pad(aligned, (layout.prefix, 0)) - (x.vp * dvp).sum(-1))


def chunked_backward(
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
    chunk_size: int,
    eps: float = EPS,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of ``sum(grad_y * y)`` for ``y = chunked_forward(...)[0]``, written out (no autograd):
    ``dO'_i = [dy_i, -(dy_i . y_i)] / denom_i``, then the adjoint chunk recurrences of the module docstring.

    Returns ``dq``, ``dk``, ``dv`` in the input dtypes and ``dlog_gate`` in log_gate's shape and dtype
    (None without a gate). Gradients of k, v and of a kv-head gate sum over the query heads that read them.
    """
    x = _to_rows(q, k, v, log_gate, valid, scale, deg)
    acc = x.q.dtype
    dy, yy = (_query_rows(t.to(acc), x.heads) for t in (grad_y, y))
    den = _query_rows(denom.to(acc).unsqueeze(-1), x.heads)
    dy_y = (dy * yy).sum(-1, keepdim=True)
    d_out = torch.cat([dy, -dy_y], dim=-1) / den
    d_gate = None
    if causal:
        layout = _Layout.of(q.shape[2], k.shape[2], chunk_size)
        dq, dk, dvp = _causal_backward(x, layout, d_out)
        if log_gate is not None:
            d_cum = _gate_grad(x, layout, (dy_y * eps / den).squeeze(-1), dvp)
            d_gate = d_cum.reshape(log_gate.shape).to(log_gate.dtype)
    else:
        dq, dk, dvp = _non_causal_backward(x, d_out)
    B, Hk = k.shape[0], k.shape[1]
    return (
        _query_heads(dq * scale, B, x.heads).to(q.dtype),
        dk.unflatten(0, (B, Hk, -1)).sum(2).to(k.dtype),
        dvp[..., :-1].unflatten(0, (B, Hk, -1)).sum(2).to(v.dtype),
        d_gate,
    )


def power_retention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: Tensor | None = None,
    causal: bool = True,
    valid: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Validated ``chunked_forward`` returning ``y`` only; ``scale`` defaults to ``1/sqrt(d)``."""
    validate_retention_inputs(
        q, k, v, deg=deg, log_gate=log_gate, causal=causal, valid=valid, scale=scale, chunk_size=chunk_size
    )
    y, _ = chunked_forward(
        q,
        k,
        v,
        scale=default_scale(q.shape[-1], scale),
        deg=deg,
        log_gate=log_gate,
        causal=causal,
        valid=valid,
        chunk_size=chunk_size,
    )
    return y.to(q.dtype)
