"""Attention written in other forms: repeated kv heads and hand-written softmax attention.

Repeated kv heads (GQA written out). ``repeat_kv`` is ``x[:, :, None].expand(B, Hk, n, T, d).reshape(B, Hk n, T, d)``
(or ``x.unsqueeze(2)``, ``x.repeat_interleave(n, dim=1)``): merging the axes (Hk, n) row-major puts kv head
``a // n`` at query head ``a``, which is exactly SDPA's ``enable_gqa`` (and the op's) reading of ``x`` itself,
so the op is given ``x`` and the repeat is never materialised. A one-head ``x.expand(B, H, T, d)`` is the op's
Hk = 1. The form is proven from the ops *and* the shapes of every intermediate (``expand`` can only
broadcast size-1 axes; the unsqueezed axis is checked to be axis 2), not from names.

Hand-written attention. From every ``softmax(x, dim=-1)`` the scores ``x`` are walked back through casts,
``masked_fill(x, m, -big)``, ``where(m, x, -big)``, ``x + mask``, ``x * c`` and ``x / c`` to ``q @ k^T``, and
the probabilities forward through casts and ``dropout`` to ``p @ v``. A product may be written as ``a @ b``
(``matmul``, ``bmm``) or as an einsum over the last two axes with the same leading letters throughout: the scores as
``"bhid,bhdj->bhij"`` (of k^T) or ``"bhid,bhjd->bhij"`` (of k itself), the output as ``"bhij,bhjd->bhid"``
(``_product``). A key operand that is not a transposed tensor is k computed already transposed, (B, H, d, T) (LeViT
permutes its key projection so, then takes ``q @ k``): the op reads ``k.transpose(-2, -1)``, a view inserted before the
product (``_key_of_transposed``). The masks become the site's ``MaskPart``s, numbers multiply the scale, a tensor factor
with size 1 along the key axis (one number per query row at most) is folded into the query at rewrite time. Scores that
still come from ``q @ k^T`` through some other op (``tanh`` for logit soft-capping, say) make a kept site whose reason
names that op, so the report says why; anything else is not recognised, and the graph is left as it is.

Heads folded into the batch axis (BLOOM, XGLM). q @ k^T of 3-D q (B H, Tq, d), by ``bmm`` or by
``baddbmm(bias, q, k^T, beta=, alpha=)`` (``bias`` an additive mask part scaled by ``beta``, ``alpha`` a factor of the
scores), the scores and probabilities reshaped between (B H, Tq, Tk) and (B, H, Tq, Tk) on the way (both sides of the
softmax alike) and p @ v 3-D: q, k, v and the masks and factors met while the scores were 3-D (one per (B H) row or one
for all) are read as (B, H, ...) through ``unflatten`` views inserted before ``p @ v``, (B, H) as a reshape gave them
(none: (1, B H), each row a head of its own), and the op's output is flattened back (``AttentionSite.folded``). A floor
``torch.max(scores, c)`` at a masking value (XGLM's finfo.min) is a step of the walk.

In-place changes. ``scores.masked_fill_(m, -big)``, ``scores += mask`` / ``add_`` and ``scores *= c`` / ``mul_`` /
``div_`` made on a score tensor itself before the next op reads it are steps of the walk like their out-of-place
forms. Any other in-place change is one the walk cannot follow: a site whose scores or probabilities are changed in
place otherwise (through a view: ``scores[..., 1:] = ...`` as MViTv2 adds its relative positions; by another op; after
the softmax read them), or whose q, k, scale factor or mask is changed in place between ``q @ k^T`` and ``p @ v``
(where the op that replaces ``p @ v`` reads them), is kept as written with the op named
(``fxutils.in_place_changes``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx

from . import grids
from .fxutils import Evaluator, in_place_changes, insert_call
from .masks import ADD_OPS, MUL_OPS, masked_fill_operands, neg_constant, node_dtype, where_operands
from .shapes import holds
from .sites import AttentionSite, MaskPart, example_value

SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm)
MATMUL_METHODS = frozenset({"matmul", "__matmul__", "bmm"})
BADDBMM_FUNCTIONS = (torch.baddbmm, torch.Tensor.baddbmm)
RESHAPE_FUNCTIONS = (torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
RESHAPE_METHODS = frozenset({"reshape", "view"})
EINSUM_FUNCTIONS = (torch.einsum, torch.functional.einsum)
DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
CAST_METHODS = frozenset({"to", "type", "float", "half", "bfloat16", "type_as", "contiguous"})
DIV_OPS = (operator.truediv, torch.div, torch.Tensor.div, torch.true_divide)


def _equal(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    return holds(a == b)


def _shape(node: object) -> tuple | None:
    try:
        return tuple(example_value(node).shape)
    except TypeError:
        return None


def _calls(node: object, functions: tuple, methods: frozenset[str] = frozenset()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


# ---------------------------------------------------------------------------------------------- repeated kv


def _unsqueezed_at_2(node: object) -> fx.Node | None:
    """``x`` when ``node`` is ``x.unsqueeze(2)`` or ``x[:, :, None]`` for a 4-D ``x``."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    source = node.args[0]
    if _shape(source) is None or len(_shape(source)) != 4:
        return None
    if _calls(node, (torch.unsqueeze, torch.Tensor.unsqueeze), frozenset({"unsqueeze"})):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return source if dim in (2, -3) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None)
        if len(index) >= 3 and index[0] == full and index[1] == full and index[2] is None:
            rest = index[3:]
            if all(i == full or i is Ellipsis for i in rest) and sum(i is Ellipsis for i in rest) <= 1:
                return source
    return None


def unrepeat_kv(node: fx.Node) -> tuple[fx.Node, int, str] | None:
    """``(x, n, form)`` when ``node`` is ``x`` with each kv head repeated ``n`` times in place (head ``a``
    reads ``x`` head ``a // n``); None otherwise."""
    out = _shape(node)
    if out is None or len(out) != 4:
        return None
    if _calls(node, (torch.repeat_interleave, torch.Tensor.repeat_interleave), frozenset({"repeat_interleave"})):
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        source = node.args[0]
        if isinstance(repeats, int) and dim in (1, -3) and _shape(source) is not None:
            return source, repeats, "repeat_interleave"
        return None
    if _calls(node, (torch.Tensor.expand,), frozenset({"expand"})):
        source = node.args[0]
        shape = _shape(source)
        if (
            shape is not None
            and len(shape) == 4
            and _equal(shape[1], 1)
            and not _equal(out[1], 1)
            and all(_equal(a, b) for a, b in zip((shape[0], shape[2], shape[3]), (out[0], out[2], out[3])))
        ):
            return source, out[1], "one kv head broadcast"
        return None
    if not _calls(
        node, (torch.reshape, torch.Tensor.reshape, torch.flatten), frozenset({"reshape", "view", "flatten"})
    ):
        return None
    if node.target == "flatten" or node.target is torch.flatten:
        dims = tuple(node.args[1:3]) or (node.kwargs.get("start_dim"), node.kwargs.get("end_dim"))
        if dims != (1, 2):
            return None
    expanded = node.args[0]
    if not _calls(expanded, (torch.Tensor.expand,), frozenset({"expand"})):
        return None
    source = _unsqueezed_at_2(expanded.args[0])
    inner, five = _shape(source), _shape(expanded)
    if source is None or five is None or len(five) != 5:
        return None
    b, hk, t, d = inner
    n = five[2]
    same = all(_equal(x, y) for x, y in ((five[0], b), (five[1], hk), (five[3], t), (five[4], d)))
    merged = all(_equal(x, y) for x, y in ((out[0], b), (out[1], hk * n), (out[2], t), (out[3], d)))
    return (source, n, "repeat_kv (expand + reshape)") if same and merged else None


# ------------------------------------------------------------------------------------- hand-written attention


def _is_softmax(node: fx.Node) -> bool:
    if not _calls(node, SOFTMAX_FUNCTIONS, frozenset({"softmax"})):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    shape = _shape(node)
    return shape is not None and dim in (-1, len(shape) - 1)


def _is_cast(node: fx.Node) -> bool:
    """A cast between floating-point dtypes (or ``contiguous``): a cast to an integer dtype rounds the scores."""
    if not _calls(node, (torch.Tensor.to, torch.Tensor.float, torch.Tensor.contiguous), CAST_METHODS):
        return False
    dtypes = (node_dtype(node), node_dtype(node.args[0]))
    return all(dtype is not None and dtype.is_floating_point for dtype in dtypes)


class _Product(NamedTuple):
    """A batched matrix product over the last two axes: ``left @ right``, or ``left @ right^T`` when
    ``right_transposed`` (an einsum that contracts both operands' last axes, ``"bhic,bhjc->bhij"``)."""

    left: object
    right: object
    right_transposed: bool


def _einsum_product(equation: str, operands: list) -> _Product | None:
    """An einsum of two operands that is a batched matrix product: the same leading (batch) letters in both operands
    and the output, then ``ic,cj->ij`` (``left @ right``) or ``ic,jc->ij`` (``left @ right^T``)."""
    if len(operands) != 2 or equation.count("->") != 1 or "." in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    if inputs.count(",") != 1:
        return None
    left, right = inputs.split(",")
    if not len(left) == len(right) == len(output) >= 2 or any(len(set(x)) != len(x) for x in (left, right, output)):
        return None
    batch, (row, contracted) = left[:-2], left[-2:]
    if right[:-2] != batch or output[:-2] != batch or contracted in output or output[-2] != row:
        return None
    if right[-2] == contracted and right[-1] == output[-1] != row:
        return _Product(operands[0], operands[1], False)
    if right[-1] == contracted and right[-2] == output[-1] != row:
        return _Product(operands[0], operands[1], True)
    return None


class _Baddbmm(NamedTuple):
    """``baddbmm(bias, left, right, beta=beta, alpha=alpha)``: ``beta bias + alpha (left @ right)``."""

    bias: object
    left: object
    right: object
    beta: object
    alpha: object


def _baddbmm(node: object) -> _Baddbmm | None:
    """The operands of a ``baddbmm`` call (function or method form, by position or by name), else None."""
    if not _calls(node, BADDBMM_FUNCTIONS, frozenset({"baddbmm"})):
        return None
    names = ("input", "batch1", "batch2")
    values = dict(zip(names, node.args))
    values.update({("input" if name == "self" else name): value for name, value in node.kwargs.items()})
    if set(values) - {*names, "beta", "alpha"} or not set(names) <= set(values) or len(node.args) > 3:
        return None
    return _Baddbmm(values["input"], values["batch1"], values["batch2"], values.get("beta", 1), values.get("alpha", 1))


def _product(node: object) -> _Product | None:
    """``node`` as a batched matrix product: ``a @ b`` (``matmul``, ``bmm``) or an einsum of that form
    (``_einsum_product``)."""
    if _calls(node, MATMUL_FUNCTIONS, MATMUL_METHODS) and len(node.args) == 2:
        return _Product(node.args[0], node.args[1], False)
    if _calls(node, EINSUM_FUNCTIONS) and node.args and isinstance(node.args[0], str):
        operands = list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        return _einsum_product(node.args[0], operands)
    return None


def _score_product(node: object) -> _Product | None:
    """The product of q and k of scores: ``_product``'s, or that of a ``baddbmm`` (whose bias and factors
    ``_Scores._baddbmm`` takes; p @ v is never a ``baddbmm``: its addend would be lost)."""
    added = _baddbmm(node)
    return _Product(added.left, added.right, False) if added is not None else _product(node)


def _is_matmul(node: object) -> bool:
    return _score_product(node) is not None


def _is_masked_fill(node: object) -> bool:
    return isinstance(node, fx.Node) and masked_fill_operands(node) is not None


def _is_where(node: object) -> bool:
    return isinstance(node, fx.Node) and where_operands(node) is not None


def _is_add(node: object) -> bool:
    return _calls(node, (*ADD_OPS, operator.iadd, torch.Tensor.add_), frozenset({"add", "__add__", "add_", "__iadd__"}))


def _is_div(node: object) -> bool:
    if isinstance(node, fx.Node) and node.kwargs.get("rounding_mode") is not None:
        return False  # floor or trunc division rounds the scores
    return _calls(
        node,
        (*DIV_OPS, operator.itruediv, torch.Tensor.div_),
        frozenset({"div", "__truediv__", "div_", "__itruediv__"}),
    )


def _is_mul_or_div(node: object) -> bool:
    return _is_div(node) or _calls(
        node, (*MUL_OPS, operator.imul, torch.Tensor.mul_), frozenset({"mul", "__mul__", "mul_", "__imul__"})
    )


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _untransposed(node: object) -> fx.Node | None:
    """``k`` when ``node`` is ``k`` with its last two axes swapped."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    rank = len(_shape(node) or ())
    if rank < 3:
        return None
    if _calls(node, (torch.transpose, torch.Tensor.transpose), frozenset({"transpose"})):
        dims = {d % rank if isinstance(d, int) else d for d in node.args[1:3]}
        return node.args[0] if dims == {rank - 2, rank - 1} else None
    if _calls(node, (torch.permute, torch.Tensor.permute), frozenset({"permute"})):
        return node.args[0] if _listed_argument(node) == (*range(rank - 2), rank - 1, rank - 2) else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


class _Scores:
    """The walk from a softmax input back to ``q @ k^T``."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.parts: list[MaskPart] = []
        self.scale = 1.0
        self.factors: list[tuple[fx.Node, bool]] = []
        self.matmul: fx.Node | None = None
        self.chain: list[fx.Node] = []  # the nodes from the softmax input back to the matmul
        # a masked_fill or where whose value is not a mask's (<= MASKED_BELOW): (the node, the value)
        self.unmasked_fill: tuple[fx.Node, object] | None = None
        # scores with the heads folded into the batch axis, (B H, Tq, Tk): the reshapes between that and (B, H, Tq, Tk)
        # met on the way (``_heads_reshaped``), and which parts and factors were taken where the scores were 3-D
        self.reshapes: list[fx.Node] = []
        self.rank = 0
        self.folded_parts: list[int] = []
        self.folded_factors: list[int] = []

    @property
    def part_factor(self) -> float | None:
        return None if self.factors else self.scale

    def walk(self, node: object, consumer: fx.Node, depth: int = 0) -> bool:
        """Follow the score chain from ``node`` as ``consumer`` reads it; True when it reaches ``q @ k^T``."""
        if not isinstance(node, fx.Node) or depth > 32:
            return False
        self.chain.append(node)
        self.rank = len(_shape(node) or ())
        if not self._in_place_steps(node, consumer):
            return False
        args = node.args
        if (added := _baddbmm(node)) is not None:
            return self._baddbmm(node, added)
        if _heads_reshaped(node) is not None:
            self.reshapes.append(node)
            return self.walk(args[0], node, depth + 1)
        if (other := _floored(node, self.evaluator)) is not None:
            return self.walk(other, node, depth + 1)
        if _is_matmul(node):
            self.matmul = node
            return True
        if _is_cast(node):
            return self.walk(args[0], node, depth + 1)
        if _is_masked_fill(node):
            return self._masked(node) and self.walk(masked_fill_operands(node)[0], node, depth + 1)
        if _is_where(node):
            return self._where(node, depth)
        if _is_add(node) and len(args) == 2 and not node.kwargs:
            for scores, mask in ((args[0], args[1]), (args[1], args[0])):
                if isinstance(mask, fx.Node) and self._reaches_matmul(scores, node):
                    self._part(MaskPart(mask, "add", self.part_factor))
                    return self.walk(scores, node, depth + 1)
            return False
        if _is_mul_or_div(node) and len(args) == 2:
            divide = _is_div(node)
            pairs = ((args[0], args[1]),) if divide else ((args[0], args[1]), (args[1], args[0]))
            for scores, factor in pairs:
                if self._reaches_matmul(scores, node) and self._take_factor(factor, divide):
                    return self.walk(scores, node, depth + 1)
        return False

    def _in_place_steps(self, node: fx.Node, consumer: fx.Node) -> bool:
        """Take the in-place changes of ``node`` made before ``consumer`` reads it (``scores.masked_fill_(m, -inf)``,
        ``scores.add_(mask)``, ``scores.mul_(c)`` as statements) as steps of the chain, last first, when every one
        changes ``node`` itself (not a view of it) in one of those forms; False when one sets scores to a value that
        does not mask them. Otherwise they are left for ``_changed_in_place``, which keeps the site."""
        changes = [change for change in in_place_changes(node) if node < change < consumer]
        if not all(change.args and change.args[0] is node and _in_place_step(change) for change in changes):
            return True
        for change in reversed(changes):
            self.chain.append(change)
            operand = change.args[1] if len(change.args) > 1 else None
            if _is_masked_fill(change):
                if not self._masked(change):
                    return False
            elif _is_add(change):
                self._part(MaskPart(operand, "add", self.part_factor))
            else:
                self._take_factor(operand, _is_div(change))
        return True

    def _part(self, part: MaskPart) -> None:
        """Take a mask part of the scores as they are where the walk is (3-D: heads folded into the batch axis)."""
        self.folded_parts += [len(self.parts)] if self.rank == 3 else []
        self.parts.append(part)

    def _baddbmm(self, node: fx.Node, added: _Baddbmm) -> bool:
        """``beta bias + alpha (q @ k^T)`` (BLOOM's ALiBi): the bias is an additive mask part scaled by beta, alpha a
        factor of the scores; both must be numbers."""
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (added.beta, added.alpha)):
            return False
        if added.beta != 0 and isinstance(added.bias, fx.Node):
            factor = self.part_factor
            self._part(MaskPart(added.bias, "add", None if factor is None else factor * added.beta))
        if not self._take_factor(added.alpha, False):
            return False
        self.matmul = node
        return True

    def _masked(self, node: fx.Node) -> bool:
        """Take a ``masked_fill`` of the scores as the blocking mask part, if its value masks (<= MASKED_BELOW); else
        record it (filled with a score, not masked out: the softmax weighs it) and return False."""
        _, mask, value = masked_fill_operands(node)
        if not neg_constant(value, self.evaluator):
            self.unmasked_fill = (node, value)
            return False
        self._part(MaskPart(mask, "block"))
        return True

    def _where(self, node: fx.Node, depth: int) -> bool:
        condition, keep, fill = where_operands(node)
        if neg_constant(fill, self.evaluator) and self._reaches_matmul(keep, node):
            self._part(MaskPart(condition, "allow"))
            return self.walk(keep, node, depth + 1)
        if neg_constant(keep, self.evaluator) and self._reaches_matmul(fill, node):
            self._part(MaskPart(condition, "block"))
            return self.walk(fill, node, depth + 1)
        for scores, value in ((keep, fill), (fill, keep)):
            if self._reaches_matmul(scores, node):
                self.unmasked_fill = (node, value)
        return False

    def _take_factor(self, factor: object, divide: bool) -> bool:
        if not _is_factor(factor):
            return False
        if isinstance(factor, (int, float)):
            self.scale = self.scale / factor if divide else self.scale * factor
        else:
            self.folded_factors += [len(self.factors)] if self.rank == 3 else []
            self.factors.append((factor, divide))
        return True

    def _reaches_matmul(self, node: object, consumer: fx.Node) -> bool:
        return _Scores(self.evaluator).walk(node, consumer)


def _heads_reshaped(node: fx.Node) -> int | None:
    """The rank of ``node``'s result where it is a reshape (``view``) between (B, H, Tq, Tk) and (B H, Tq, Tk): 4 where
    it splits the heads out of the batch axis, 3 where it folds them into it; None otherwise."""
    if not _calls(node, RESHAPE_FUNCTIONS, RESHAPE_METHODS) or not node.args:
        return None
    inner, outer = _shape(node.args[0]), _shape(node)
    if inner is None or outer is None or {len(inner), len(outer)} != {3, 4}:
        return None
    three, four = (inner, outer) if len(inner) == 3 else (outer, inner)
    same = _equal(four[0] * four[1], three[0]) and _equal(four[2], three[1]) and _equal(four[3], three[2])
    return len(outer) if same else None


def _floored(node: fx.Node, evaluator: Evaluator) -> object | None:
    """The scores of ``torch.max(scores, c)`` (``maximum``, ``clamp(min=c)``) with c a constant at or below
    ``MASKED_BELOW`` (XGLM's floor at finfo.min), else None: it leaves admitted scores as they are and masked ones
    masked."""
    if _calls(node, (torch.max, torch.maximum), frozenset({"max", "maximum"})) and len(node.args) == 2:
        for scores, floor in (node.args, node.args[::-1]):
            if not node.kwargs and neg_constant(floor, evaluator):
                return scores
    if _calls(node, (torch.clamp, torch.clamp_min), frozenset({"clamp", "clamp_min"})) and node.args:
        floor = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        if set(node.kwargs) <= {"min"} and len(node.args) <= 2 and neg_constant(floor, evaluator):
            return node.args[0]
    return None


def _is_factor(factor: object) -> bool:
    """A factor of the scores the op can take: a nonzero number, or a tensor with one number per query row at most
    (size 1 along the key axis), folded into the query."""
    if isinstance(factor, (int, float)):
        return factor != 0
    shape = _shape(factor)
    return shape is not None and (len(shape) == 0 or _equal(shape[-1], 1))


def _in_place_step(node: fx.Node) -> bool:
    """An in-place change the walk takes as a step: ``masked_fill_``, ``add_`` / ``+=`` of a tensor, ``mul_`` /
    ``div_`` / ``*=`` / ``/=``."""
    if len(node.args) < 2 or (node.kwargs and set(node.kwargs) != {"value"}):
        return False
    if _is_add(node):
        return isinstance(node.args[1], fx.Node) and len(node.args) == 2
    if _is_mul_or_div(node):
        return len(node.args) == 2 and _is_factor(node.args[1])
    return _is_masked_fill(node)


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _other_op(node: object, seen: set[fx.Node], depth: int = 0) -> tuple[fx.Node, str | None] | None:
    """For scores that ``_Scores.walk`` rejects: the ``q @ k^T`` they still come from through the arguments of any
    ops, and the op nearest it on that path outside the walk's forms (None when there is none); None when no matmul
    is reached within 32 ops. ``seen``: nodes already searched (each is searched once)."""
    if not isinstance(node, fx.Node) or node in seen or depth > 32 or node.op not in ("call_function", "call_method"):
        return None
    seen.add(node)
    if _is_matmul(node):
        return node, None
    for arg in node.all_input_nodes:  # lists included: ``torch.cat([scores, sinks])``
        found = _other_op(arg, seen, depth + 1)
        if found is not None:
            matmul, op = found
            return matmul, op or (None if _walked_form(node) else _op_name(node))
    return None


def _walked_form(node: fx.Node) -> bool:
    """Whether ``node`` is one of the forms ``_Scores.walk`` follows (given the right operands)."""
    return any(form(node) for form in (_is_cast, _is_masked_fill, _is_where, _is_add, _is_mul_or_div))


def _probabilities(softmax: fx.Node) -> tuple[fx.Node | None, float, bool, list[fx.Node]]:
    """Follow the probabilities through casts, dropout, indexing and the fold of heads into the batch axis
    (``_heads_reshaped``) to ``p @ v``: (that matmul or None, dropout_p,
    whether the probabilities are also used elsewhere, the nodes from the softmax to the matmul's operand). An index
    (``p[..., :-1]``: attention sinks) is followed so that the site is found; ``_indexed`` keeps it."""
    current, dropout, shared, chain = softmax, 0.0, False, [softmax]
    while True:
        users = list(current.users)
        shared = shared or len(users) > 1
        following = None
        for user in users:
            product = _product(user)
            if product is not None and product.left is current and not product.right_transposed:
                return user, dropout, shared, chain
            reshaped = _heads_reshaped(user) is not None
            if (_is_cast(user) or user.target is operator.getitem or reshaped) and user.args[0] is current:
                following = user
            elif _calls(user, DROPOUT_FUNCTIONS, frozenset({"dropout"})) and user.args[0] is current:
                p = user.args[1] if len(user.args) > 1 else user.kwargs.get("p", 0.5)
                training = user.args[2] if len(user.args) > 2 else user.kwargs.get("training", True)
                dropout = float(p) if training and isinstance(p, (int, float)) else dropout
                following = user
        if following is None:
            return None, dropout, shared, chain
        current = following
        chain.append(current)


def _indexed(probabilities: list[fx.Node]) -> str | None:
    """Why a site whose probabilities are indexed before ``p @ v`` is kept (None when they are not)."""
    if not any(node.target is operator.getitem for node in probabilities):
        return None
    return (
        "the probabilities are indexed between the softmax and p @ v (attention sinks: the softmax also normalises "
        "over extra logits that p @ v drops): retention's normaliser sums the weights of the keys it reads only"
    )


def _transformed_scores(op: str) -> str:
    """The reason for keeping a site whose scores pass through ``op``."""
    return (
        f"the scores pass through {op} between q @ k^T and the softmax (logit soft-capping, or another transform): "
        "retention's weights (s q.k)^p cannot take it"
    )


def _changed_in_place(scores: _Scores, probabilities: list[fx.Node], output: fx.Node) -> str | None:
    """Why the values of a site are not what its nodes compute, or None. The scores or the probabilities changed in
    place (through any view: ``scores[..., 1:] = ...``, ``scores.add_(bias)``) by an op outside their chain, which the
    walk does not see; or an operand the op reads (q, k, a scale factor, a mask) changed in place between ``q @ k^T``
    and ``p @ v``, where the op replacing ``p @ v`` would read the changed value."""
    inside = {*scores.chain, *probabilities}
    for node in (*scores.chain, *probabilities):
        for change in in_place_changes(node):
            if change not in inside:
                what = "scores" if node in scores.chain else "attention weights"
                return f"the {what} are changed in place ({_op_name(change)}), which the rewrite cannot follow"
    operands = [
        *_score_product(scores.matmul)[:2],
        *(factor for factor, _ in scores.factors),
        *(part.node for part in scores.parts),
    ]
    for operand in operands:
        if isinstance(operand, fx.Node):
            for change in in_place_changes(operand):
                if scores.matmul < change < output:
                    return f"{operand.name} is changed in place ({_op_name(change)}) between q @ k^T and p @ v"
    return None


def _unmasked_fill(fill: tuple[fx.Node, object]) -> str:
    """The reason for keeping a site whose scores are set (``masked_fill``, ``where``) to a value that does not mask
    them out."""
    node, value = fill
    shown = value.name if isinstance(value, fx.Node) else repr(value)
    return (
        f"{_op_name(node)} sets scores to {shown}, not to a masking value (<= {grids.MASKED_BELOW:g}): the softmax "
        "weighs those entries, and retention's weights would not"
    )


SHARED_WEIGHTS = "the attention weights are also used elsewhere (e.g. returned with output_attentions)"


def _site_problem(query: object, key_operand: object, value: object) -> str | None:
    """Why a recognised hand-written site cannot be rewritten for its operands' shapes, or None."""
    if any(len(_shape(n) or ()) != 4 for n in (query, key_operand, value)):
        return "q, k, v are not 4-D (B, H, T, d) tensors"
    return None


def _key_of_transposed(graph: fx.Graph, key_t: fx.Node, product: fx.Node) -> fx.Node:
    """k for a key operand ``key_t`` that is k^T itself, (B, H, d, T): ``key_t.transpose(-2, -1)``, inserted just
    before ``product`` (a view, which Inductor drops again where the site is kept after all)."""
    with graph.inserting_before(product):
        return insert_call(graph, "transpose", (key_t, -2, -1), like=key_t)


def _is_folded(scores: _Scores) -> bool:
    """Whether the scores' product is of 3-D q (B H, Tq, d): the heads folded into the batch axis."""
    return len(_shape(_score_product(scores.matmul).left) or ()) == 3


def _four_dimensional(reshape: fx.Node) -> fx.Node:
    """The (B, H, Tq, Tk) side of a ``_heads_reshaped`` node: its result or its operand."""
    return reshape if len(_shape(reshape)) == 4 else reshape.args[0]


def _fold_problem(scores: _Scores, probabilities: list[fx.Node], output: fx.Node) -> str | None:
    """Why attention computed with the heads folded into the batch axis cannot be read per head (None when it can, or
    is not folded): p @ v must be 3-D too, every reshape between the 3-D and the 4-D scores or probabilities must
    split the batch axis into the same (B, H), and every mask and factor of the 3-D scores must be one per (B H) row
    or one for all."""
    reshapes = _reshapes(scores, probabilities)
    if not _is_folded(scores):
        return "the scores are reshaped between (B H, Tq, Tk) and (B, H, Tq, Tk)" if reshapes else None
    if len(_shape(output) or ()) == 4 and not any(_heads_reshaped(node) == 4 for node in reshapes):
        return "q @ k^T is 3-D (the heads folded into the batch axis), p @ v 4-D, and no reshape between them"
    heads = [_shape(_four_dimensional(node))[:2] for node in reshapes]
    if any(not (_equal(b, heads[0][0]) and _equal(h, heads[0][1])) for b, h in heads):
        return "the scores and probabilities are reshaped to different (batch, heads)"
    rows = _shape(_score_product(scores.matmul).left)[0]
    operands = [scores.parts[i].node for i in scores.folded_parts]
    operands += [scores.factors[i][0] for i in scores.folded_factors]
    for operand in operands:
        shape = _shape(operand) or ()
        if len(shape) > 3 or (len(shape) == 3 and not (_equal(shape[0], 1) or _equal(shape[0], rows))):
            return f"{operand.name} (shape {tuple(shape)}) meets the scores with the heads folded into the batch axis"
    return None


def _reshapes(scores: _Scores, probabilities: list[fx.Node]) -> list[fx.Node]:
    """The reshapes between (B H, Tq, Tk) and (B, H, Tq, Tk) of the scores and of the probabilities."""
    return [*scores.reshapes, *(node for node in probabilities if _heads_reshaped(node) is not None)]


def _listed_argument(node: fx.Node, *keywords: str) -> tuple:
    """The sizes or axes a call was given after its tensor (a reshape's shape, a permute's order): as arguments one by
    one, as one tuple, or by the first of ``keywords`` it was given."""
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return tuple(node.args[1])
    given = next((node.kwargs[name] for name in keywords if name in node.kwargs), ())
    return tuple(node.args[1:]) or tuple(given)


def _head_sizes(graph: fx.Graph, scores: _Scores, probabilities: list[fx.Node], query: fx.Node) -> tuple:
    """(B, H) of attention computed with the heads folded into the batch axis: as the first reshape of the scores to
    (B, H, Tq, Tk) was given them (a size read off the scores would make the mask proof compute them), else read off
    a reshape between the two; without any, (1, B H): each (B H) row is a head of its own."""
    reshapes = _reshapes(scores, probabilities)
    for node in reshapes:
        given = _listed_argument(node, "shape", "size")
        if _heads_reshaped(node) != 4 or len(given) != 4:
            continue
        sizes = tuple(
            given[axis] if isinstance(given[axis], fx.Node) or given[axis] == size else size
            for axis, size in enumerate(_shape(node)[:2])
        )
        if all(isinstance(size, (int, fx.Node)) for size in sizes):
            return sizes

    def size(node: fx.Node, axis: int) -> int | fx.Node:
        known = _shape(node)[axis]
        return known if isinstance(known, int) else insert_call(graph, "size", (node, axis), like=node)

    if reshapes:
        four = _four_dimensional(reshapes[0])
        return size(four, 0), size(four, 1)
    return 1, size(query, 0)


def _unfold_operands(
    graph: fx.Graph,
    scores: _Scores,
    probabilities: list[fx.Node],
    operands: tuple[fx.Node, fx.Node, fx.Node],
    output: fx.Node,
) -> tuple[fx.Node, fx.Node, fx.Node]:
    """q, k, v of attention computed with the heads folded into the batch axis, each 3-D one as (B, H, T, d)
    (``unflatten`` inserted before ``output``); the masks and factors taken of the 3-D scores likewise (in ``scores``),
    except where their first size is 1: those broadcast alike either way, and are left as they are."""
    with graph.inserting_before(output):
        sizes = _head_sizes(graph, scores, probabilities, operands[0])

        def unflatten(node: fx.Node, broadcast: bool = False) -> fx.Node:
            shape = _shape(node)
            if len(shape) != 3 or (broadcast and _equal(shape[0], 1)):
                return node
            return insert_call(graph, "unflatten", (node, 0, sizes), like=node)

        for i in scores.folded_parts:
            scores.parts[i] = dataclasses.replace(scores.parts[i], node=unflatten(scores.parts[i].node, True))
        for i in scores.folded_factors:
            scores.factors[i] = (unflatten(scores.factors[i][0], True), scores.factors[i][1])
        return tuple(unflatten(operand) for operand in operands)


def find_handwritten(graph: fx.Graph, evaluator: Evaluator) -> Iterator[AttentionSite]:
    """Every hand-written attention of ``graph`` (see the module docstring), in graph order."""
    for node in list(graph.nodes):
        if not _is_softmax(node):
            continue
        scores = _Scores(evaluator)
        output, dropout, shared, probabilities = _probabilities(node)
        if output is None:
            continue
        problem = _indexed(probabilities)
        if not scores.walk(node.args[0], node):
            other = _other_op(node.args[0], set())
            if other is None or (other[1] is None and scores.unmasked_fill is None):
                continue
            scores.matmul = other[0]
            problem = problem or (
                _transformed_scores(other[1]) if other[1] is not None else _unmasked_fill(scores.unmasked_fill)
            )
        query, key_t, key_transposed = _score_product(scores.matmul)
        key, value = key_t if key_transposed else _untransposed(key_t), _product(output).right
        problem = problem or _changed_in_place(scores, probabilities, output)
        problem = problem or _fold_problem(scores, probabilities, output) or (SHARED_WEIGHTS if shared else None)
        folded = problem is None and _is_folded(scores)
        if folded:  # q @ k^T of (B H, T, d) tensors (p @ v too, or the probabilities are 4-D: GPT-NeoX-Japanese)
            key = key if key is not None else _key_of_transposed(graph, key_t, scores.matmul)
            query, key, value = _unfold_operands(graph, scores, probabilities, (query, key, value), output)
        problem = problem or _site_problem(query, key if folded else key_t, value)
        if key is None and problem is None:
            key = _key_of_transposed(graph, key_t, scores.matmul)
        yield AttentionSite(
            node=output,
            query=query,
            key=key if key is not None else key_t,
            value=value,
            attn_mask=None,
            dropout_p=dropout,
            is_causal=False,
            scale=scores.scale,
            enable_gqa=False,
            kind="hand-written",
            parts=scores.parts,
            scale_factors=scores.factors,
            scores=node.args[0],
            anchor=node,
            unsupported=problem,
            folded=folded and len(_shape(output)) == 3,
        )
