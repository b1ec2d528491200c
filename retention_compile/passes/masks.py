"""Prove what an attention mask means.

A site's masks (``MaskPart``s) are split into *terms*: a bool mask that admits an entry splits at ``&``
(a mask that blocks splits at ``|``; ``~`` swaps the two), an additive float mask splits at ``+``, and
``where(c, x, -big)``, ``masked_fill(x, c, -big)`` and ``(1 - c.float()) * -big`` turn into the bool term ``c``
plus the additive rest. Each term is then read by what it is computed from (``fxutils.DataDependence``):

    index    depends on no data: a function of the sizes (``arange`` comparisons, ``tril(ones)``, ALiBi
             biases built from ``arange``). Evaluated for real at the example sizes and, under dynamic
             shapes, at more sizes the guards allow; with static shapes that evaluation *is* the proof.
    buffer   depends on module buffers only (nanoGPT's ``tril`` buffer): evaluated with the buffers'
             compile-time values, and the rewrite adds a run-time check that they still hold.
    padding  depends on data but has size 1 along the head and query axes: by broadcasting its value is
             the same for every query and head, so it is a function of (batch, key) only, a key-validity
             mask: it becomes the op's ``valid``.
    input    depends on tensors passed in (a mask argument, transformers' 4-D mask) and buffers only, and varies
             along the query axis: read at the call that compiled the graph (``fxutils.input_value``), and
             the rewrite adds a run-time check that every later call's mask is that grid on its own valid keys.
    unknown  anything else (data computed from parameters or activations, a learned bias): the site is kept.

The index terms together form one grid per size, compared entry by entry with the causal, sliding-window
and full grids (``grids.classify_grid``); the finite part of the additive terms must be an ALiBi bias
(``grids.fit_slopes``), whose per-row constant cancels, or the site is kept.

A mask with an input term is read once, at the example sizes (``_read_passed_in``): all its terms together give one
grid ``M (B, H, Tq, Tk)``, its valid keys are those some query sees, ``valid[b, j] = any_{h, i} M[b, h, i, j]``,
and ``M`` must be the causal, window or full grid on those keys, or top-left causal with Tq < Tk (the keys past
the first Tq then seen by no query: a prefill into transformers' ``StaticCache``), or with Tq == Tk causal within
documents (packed sequences: ``grids.document_starts``), which retention holds as causal with a gate of -inf at each
document's first key (every weight across a start is exactly 0). Its additive terms must hold
nothing but 0 and masked entries, or be an ALiBi bias ``c_i - m_h (i - j)`` on the admitted entries (BLOOM's,
made from the cumulative sum of the padding mask). At run time the rewrite recomputes ``valid`` from the call's mask,
passes it to the op and asserts that the mask is that grid on it (and that the bias is still ``c_i + m_h j`` there,
with the slopes read at compile time).

A term is evaluated from the ops that compute it. A term that reads a tensor changed in place by an op outside that
computation (``mask[0, 5] = True``, ``mask.fill_(...)``, also through a view of it: ``fxutils.in_place_changes``) is
not proven, and the site is kept.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..bodies import Operand
from . import grids
from .fxutils import (
    MAX_SAMPLE_ELEMENTS,
    DataDependence,
    Evaluator,
    Sizes,
    backward_slice,
    buffer_value,
    compile_time_value,
    elements,
    free_symbols,
    mutated_from_outside,
    sample_sizes,
    shape_env_of,
)
from .sites import AttentionSite, MaskPart, example_value

# A mask passed in is read at compile time up to this many entries of its grid (B, H, Tq, Tk); an eighth of it with an
# additive part (read in float64).
MAX_PASSED_IN_ELEMENTS = 1 << 28
# Extra sizes tried for each shape symbol under dynamic shapes (small primes and sizes around powers of two).
SAMPLE_SIZES = (1, 2, 3, 7, 33, 130, 1031)
# Under dynamic shapes a mask that reads an integer constant c (a window or a chunk of c keys, a period) is also
# evaluated at c and c + 1; up to this many elements (T = 8191) at c + 1, else it is not proven.
MAX_REVEALING_ELEMENTS = 1 << 26
AND_OPS = (operator.and_, torch.logical_and, torch.bitwise_and, torch.Tensor.logical_and, torch.Tensor.__and__)
OR_OPS = (operator.or_, torch.logical_or, torch.bitwise_or, torch.Tensor.logical_or, torch.Tensor.__or__)
NOT_OPS = (operator.invert, torch.logical_not, torch.bitwise_not, torch.Tensor.logical_not)
ADD_OPS = (operator.add, torch.add, torch.Tensor.add)
MUL_OPS = (operator.mul, torch.mul, torch.Tensor.mul)
WHERE_OPS = (torch.where,)
AND_METHODS = frozenset({"logical_and", "__and__", "bitwise_and"})
OR_METHODS = frozenset({"logical_or", "__or__", "bitwise_or"})
NOT_METHODS = frozenset({"logical_not", "__invert__", "bitwise_not"})
# Ops that leave a mask's meaning unchanged (right-aligned broadcasting is preserved).
PASS_METHODS = frozenset({"contiguous", "clone", "detach", "expand", "expand_as", "to", "bool", "float", "type_as"})
PASS_FUNCTIONS = (torch.clone, torch.Tensor.contiguous, torch.Tensor.expand, torch.Tensor.to)
AXES = ("batch", "head", "query", "key")


def _is(node: object, functions: tuple, methods: frozenset[str] = frozenset()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def where_operands(node: fx.Node) -> tuple[object, object, object] | None:
    """``(condition, x, y)`` of ``torch.where(condition, x, y)`` or its method form ``x.where(condition, y)`` (whose
    first argument is ``x``); None for any other call or a call of another arity."""
    if len(node.args) != 3 or node.kwargs:
        return None
    if (node.op == "call_method" and node.target == "where") or node.target is torch.Tensor.where:
        x, condition, y = node.args
        return condition, x, y
    if node.op == "call_function" and node.target in WHERE_OPS:
        return node.args
    return None


def masked_fill_operands(node: fx.Node) -> tuple[object, object, object] | None:
    """``(x, mask, value)`` of ``x.masked_fill(mask, value)`` (``torch.masked_fill``, the in-place ``masked_fill_``),
    the value given by position or as ``value=``; None for any other call."""
    if not _is(
        node,
        (torch.masked_fill, torch.Tensor.masked_fill, torch.Tensor.masked_fill_),
        frozenset({"masked_fill", "masked_fill_"}),
    ):
        return None
    args = (*node.args, *(node.kwargs[name] for name in ("mask", "value") if name in node.kwargs))
    return tuple(args) if len(args) == 3 and set(node.kwargs) <= {"mask", "value"} else None


ARITHMETIC_OPS = frozenset(
    {
        operator.floordiv, operator.mod, operator.sub, operator.add, operator.lt, operator.le, operator.gt,
        operator.ge, operator.eq, operator.ne, torch.floor_divide, torch.remainder, torch.fmod, torch.div,
        torch.sub, torch.add, torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne,
    }
)  # fmt: skip
ARITHMETIC_METHODS = frozenset(
    {
        "__floordiv__", "__mod__", "__sub__", "__rsub__", "__add__", "__radd__", "__lt__", "__le__", "__gt__",
        "__ge__", "__eq__", "__ne__", "floor_divide", "remainder", "fmod", "div", "sub", "add", "lt", "le", "gt", "ge",
        "eq", "ne",
    }
)  # fmt: skip


def _constants(slices: list[fx.Node]) -> set[int]:
    """The integer constants ``c >= 2`` that the arithmetic and comparison ops of the slices read (``i // c``,
    ``j > i - c``, ``T % c == 0``): a length or period the mask may change at."""
    found: set[int] = set()
    for node in slices:
        arithmetic = (node.op == "call_function" and node.target in ARITHMETIC_OPS) or (
            node.op == "call_method" and node.target in ARITHMETIC_METHODS
        )
        if arithmetic:
            for arg in (*node.args, *node.kwargs.values()):
                if isinstance(arg, int) and not isinstance(arg, bool) and arg >= 2:
                    found.add(arg)
    return found


def node_dtype(node: object) -> torch.dtype | None:
    """The dtype of a node's example value, or None (not a tensor, no example value)."""
    try:
        return example_value(node).dtype
    except TypeError:
        return None


@dataclass
class Term:
    """One bool term: ``block`` True if the term marks masked entries (the admitted entries are ``~node``)."""

    node: fx.Node
    block: bool
    kind: str = "unknown"  # "index" | "buffer" | "padding" | "input" | "unknown"
    detail: str = ""


@dataclass
class Bias:
    """One additive term, multiplied by ``factor`` (None: by a run-time factor) before the softmax."""

    node: fx.Node
    factor: float | None
    kind: str = "unknown"  # "index" | "buffer" | "input" | "unknown"
    detail: str = ""


@dataclass
class MaskAnalysis:
    """What a site's masks mean.

    grid:     the reading of the index terms (full, causal, window w) at every evaluated size.
    index:    the bool index terms (evaluated).
    biases:   the additive terms (evaluated).
    padding:  the padding terms (their conjunction is the op's ``valid``).
    slopes:   ALiBi slopes of the additive bias (None without an additive bias or with a zero slope).
    buffers:  the names of the terms read from module buffers: the rewrite checks at run time that the
              index terms and biases still give the proven grid (and, from buffers, no bias but masking).
    passed_in: the names of the input terms: the grid was read from the call that compiled the graph, and the
              rewrite reads ``valid`` from each call's mask and checks the grid on it (``_read_passed_in``).
    checked_slopes: for a passed-in mask with a non-zero bias, the slopes the run-time check holds it to (zero
              slopes: a per-row constant); ``slopes`` is the same when they are not zero.
    key_prefix: the grid is causal aligned top-left with Tq < Tk (a passed-in mask): query i sees keys 0..i.
    documents: the grid is causal within documents (a passed-in mask, Tq == Tk): the rewrite reads each call's
              document starts from its mask and resets the gate there.
    unknown:  why the mask cannot be read ('' when it can).
    sizes:    the sizes it was evaluated at.
    terms:    a short description per term, for the report.
    """

    grid: grids.GridShape
    index: list[Term] = field(default_factory=list)
    biases: list[Bias] = field(default_factory=list)
    padding: list[Term] = field(default_factory=list)
    slopes: grids.Slopes | None = None
    checked_slopes: grids.Slopes | None = None
    key_prefix: bool = False
    documents: bool = False
    unknown: str = ""
    sizes: list[Sizes] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)

    @property
    def buffers(self) -> list[str]:
        return [t.node.name for t in [*self.index, *self.biases] if t.kind == "buffer"]

    @property
    def passed_in(self) -> list[str]:
        return [t.node.name for t in [*self.index, *self.biases] if t.kind == "input"]

    def reading(self) -> str:
        """The grid alone: ``causal``, ``sliding window of 8 keys``, ``causal within documents`` ..."""
        reading = self.grid.describe().split(" (")[0] if not self.grid.full else "full"
        if self.key_prefix:
            reading += " (top-left: the first Tq keys)"
        return reading + (" within documents" if self.documents else "")

    def summary(self) -> str:
        """``causal & padding``, ``sliding window of 8 keys``, ...: the SiteRecord's ``mask``."""
        if self.unknown:
            return f"unproven: {self.unknown}"
        pieces = [self.reading()]
        if self.passed_in:
            pieces.append("the valid keys of each call's mask")
        elif self.padding:
            pieces.append("padding (" + ", ".join(t.node.name for t in self.padding) + ")")
        if self.slopes is not None:
            pieces.append(self.slopes.describe())
        where = "at static shapes" if self.sizes == [Sizes()] else f"at {len(self.sizes)} size(s)"
        if self.passed_in:
            where = "from the call that compiled the graph, checked at every call"
        return " & ".join(pieces) + f" [terms: {'; '.join(self.terms)}; proven {where}]"


def neg_constant(value: object, evaluator: Evaluator) -> bool:
    """``value`` is a constant at or below ``MASKED_BELOW`` (-inf, finfo.min, a full() of it ...)."""
    if isinstance(value, (int, float)):
        return value <= grids.MASKED_BELOW
    if isinstance(value, fx.Node) and evaluator.evaluable(value) and not evaluator.data.sources(value):
        try:
            found = evaluator.run(value, Sizes())
        except Exception:
            return False
        if isinstance(found, torch.Tensor) and found.numel() == 1:
            return float(found) <= grids.MASKED_BELOW
        return isinstance(found, (int, float)) and found <= grids.MASKED_BELOW
    return False


def _bool_source(node: object) -> tuple[fx.Node, bool] | None:
    """``(c, flipped)`` when ``node`` is ``c.float()`` (values 1/0 as c) or ``1 - c.float()`` (flipped)."""
    if not isinstance(node, fx.Node):
        return None
    if _is(node, (torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as), frozenset({"to", "float", "type_as"})):
        inner = node.args[0]
        if node_dtype(inner) == torch.bool:
            return inner, False
        return None
    if node.op == "call_function" and node.target in (operator.sub, torch.sub, torch.rsub) and len(node.args) == 2:
        first, second = node.args
        if node.target is torch.rsub:
            first, second = second, first
        if first == 1 or first == 1.0:
            found = _bool_source(second)
            return (found[0], not found[1]) if found else None
    return None


class TermCollector:
    """Splits mask parts into bool terms and additive terms."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.terms: list[Term] = []
        self.biases: list[Bias] = []

    def part(self, part: MaskPart) -> None:
        if part.polarity == "add":
            self.additive(part.node, part.factor)
        else:
            self.bool(part.node, part.polarity == "block")

    def _outside(self, node: fx.Node) -> fx.Node | None:
        """The node made outside a body that the body's placeholder ``node`` receives, where the rewrite can pass it
        into the body (``bodies.pass_into``), else None: a mask built outside a checkpointed region is split where
        it is made."""
        link = self.evaluator.data.link(node) if node.op == "placeholder" else None
        return link.value if link is not None and link.open and isinstance(link.value, fx.Node) else None

    def bool(self, node: fx.Node, block: bool) -> None:
        """Split a bool mask at ``&`` (admitting) or ``|`` (blocking), through ``~``, pass-through ops and into the
        graph around a body (``_outside``)."""
        if (outside := self._outside(node)) is not None:
            return self.bool(outside, block)
        if _is(node, NOT_OPS, NOT_METHODS):
            return self.bool(node.args[0], not block)
        if _is(node, OR_OPS if block else AND_OPS, OR_METHODS if block else AND_METHODS) and len(node.args) == 2:
            for arg in node.args:
                if isinstance(arg, fx.Node):
                    self.bool(arg, block)
                elif bool(arg) == block:  # a constant that masks (or admits) everything: keep it as a term
                    self.terms.append(Term(node, block))
                    return None
            return None
        if self._passes(node) and node_dtype(node.args[0]) == torch.bool:
            return self.bool(node.args[0], block)
        self.terms.append(Term(node, block))
        return None

    def additive(self, node: object, factor: float | None) -> None:
        """Split an additive mask at ``+`` and turn ``where``/``masked_fill``/indicator forms into bool terms."""
        if not isinstance(node, fx.Node):
            return  # a constant added to every score cancels in the normalisation
        if (outside := self._outside(node)) is not None:
            return self.additive(outside, factor)
        args = node.args
        if _is(node, ADD_OPS, frozenset({"add", "__add__"})) and len(args) == 2 and not node.kwargs:
            self.additive(args[0], factor)
            self.additive(args[1], factor)
        elif (where := where_operands(node)) is not None:
            condition, keep, fill = where
            if neg_constant(fill, self.evaluator):
                self.bool(condition, block=False)
                self.additive(keep, factor)
            elif neg_constant(keep, self.evaluator):
                self.bool(condition, block=True)
                self.additive(fill, factor)
            else:
                self.biases.append(Bias(node, factor))
        elif (fill := masked_fill_operands(node)) is not None and neg_constant(fill[2], self.evaluator):
            self.bool(fill[1], block=True)
            self.additive(fill[0], factor)
        elif _is(node, MUL_OPS, frozenset({"mul", "__mul__"})) and len(args) == 2 and self._indicator(args):
            pass
        elif self._passes(node) and (node_dtype(args[0]) or torch.bool).is_floating_point:
            self.additive(args[0], factor)
        else:
            self.biases.append(Bias(node, factor))

    def _indicator(self, args: tuple) -> bool:
        """``indicator * -big``: the entries where the indicator is 1 are masked."""
        for this, other in (args, args[::-1]):
            found = _bool_source(this)
            if found is not None and neg_constant(other, self.evaluator):
                condition, flipped = found
                self.bool(condition, block=not flipped)
                return True
        return False

    @staticmethod
    def _passes(node: fx.Node) -> bool:
        """A pass-through op (``contiguous``, ``expand``, ``to`` ...) that keeps the dtype: ``fm.bool()`` of a float
        mask or ``type_as`` a bool tensor turn -inf into True, which added to scores masks nothing."""
        listed = (node.op == "call_method" and node.target in PASS_METHODS) or (
            node.op == "call_function" and node.target in PASS_FUNCTIONS
        )
        return (
            listed and bool(node.args) and node_dtype(node) is not None and node_dtype(node) == node_dtype(node.args[0])
        )


def _documents(admitted: torch.Tensor, valid: torch.Tensor) -> bool:
    """``admitted (B, H, T, T)`` is causal within the documents its subdiagonal starts, on the ``valid`` keys."""
    starts = grids.document_starts(admitted)
    expected = grids.causal_grid(*admitted.shape[-2:]) & valid[:, None, None, :] & grids.same_document(starts)
    return bool((admitted == expected).all())


def _passed_in(sources: frozenset[fx.Node]) -> bool:
    """Every source is a tensor passed in that needs no gradient, or a module buffer: a compile-time value to read
    the mask from (a mask that requires grad would lose its gradient in the rewrite)."""
    values = [compile_time_value(s) for s in sources]
    return all(value is not None and not value.requires_grad for value in values)


def _broadcast_axes(node: fx.Node) -> dict[str, bool]:
    """For each of (batch, head, query, key): whether the term has size 1 there (right-aligned)."""
    shape = list(example_value(node).shape)
    shape = [1] * (4 - len(shape)) + shape[-4:]
    return {axis: statically_known_true(size == 1) for axis, size in zip(AXES, shape)}


# Why a mask made outside a higher-order op's body reads as data inside it (``MaskAnalyser.in_body``)
FROM_OUTSIDE_THE_BODY = (
    "; it enters the body of a higher-order op (activation checkpointing, say) as an input, so how it was made, "
    "outside the body, is not traced here"
)


class MaskAnalyser:
    """Reads the masks of the sites of one graph; ``in_body``: the graph is a higher-order op's body (its inputs are
    values of the graph around it). ``links``: body placeholders by the operand they receive (``bodies.body_inputs``):
    a mask made outside the body is read where it is made."""

    def __init__(self, gm: fx.GraphModule, in_body: bool = False, links: Mapping[fx.Node, Operand] | None = None):
        self.data = DataDependence(links)
        self.evaluator = Evaluator(gm, self.data)
        self.in_body = in_body
        self.graph = gm.graph

    def _from_outside(self, node: fx.Node) -> str:
        """``FROM_OUTSIDE_THE_BODY`` where the data ``node`` reads are inputs of this body not followed out of it
        (``DataDependence.link``), else ''."""
        inputs = any(source.op == "placeholder" and source.graph is self.graph for source in self.data.sources(node))
        return FROM_OUTSIDE_THE_BODY if self.in_body and inputs else ""

    def analyse(self, site: AttentionSite) -> MaskAnalysis:
        collector = TermCollector(self.evaluator)
        for part in site.parts:
            collector.part(part)
        for term in collector.terms:
            self._classify_term(term)
        for bias in collector.biases:
            self._classify_bias(bias)
        index = [t for t in collector.terms if t.kind in ("index", "buffer", "input")]
        padding = [t for t in collector.terms if t.kind == "padding"]
        unknown = [
            f"mask {part.node.name} reads {mutated.name}, which is changed in place"
            for part in site.parts
            if (mutated := mutated_from_outside(backward_slice(part.node))) is not None
        ]  # the split into terms passes through nodes (a masked_fill, an add) that no term's slice holds
        unknown += [t.detail for t in collector.terms if t.kind == "unknown"]
        unknown += [b.detail for b in collector.biases if b.kind == "unknown"]
        terms = [f"{t.node.name}: {t.kind}" for t in collector.terms] + [
            f"{b.node.name}: {b.kind} bias" for b in collector.biases
        ]
        full = grids.GridShape(True, False, None, 0)
        if unknown:
            return MaskAnalysis(full, unknown="; ".join(unknown), terms=terms)
        if any(t.kind == "input" for t in [*index, *collector.biases]):
            analysis = self._read_passed_in(site, [*index, *padding], collector.biases)
        else:
            analysis = self._evaluate(site, index, collector.biases)
        analysis.index, analysis.biases, analysis.padding, analysis.terms = index, collector.biases, padding, terms
        analysis.unknown = analysis.unknown or self._buffer_biases(analysis)
        return analysis

    def _buffer_biases(self, analysis: MaskAnalysis) -> str:
        """Why an additive term read from a module buffer cannot be checked at run time ('' when it can): the
        check holds it to masking only (0 or masked entries), so its compile-time value must be that."""
        for bias in (b for b in analysis.biases if b.kind == "buffer"):
            value = torch.as_tensor(self.evaluator.run(bias.node, Sizes())).to(torch.float64) * bias.factor
            if analysis.slopes is not None or bool((value[value > grids.MASKED_BELOW] != 0).any()):
                return f"additive mask {bias.node.name} read from a module buffer carries a bias, not only masking"
        return ""

    def _classify_term(self, term: Term) -> None:
        node = term.node
        if node_dtype(node) != torch.bool:
            term.detail = f"mask term {node.name} has dtype {node_dtype(node)}, not bool"
            return
        mutated = mutated_from_outside(backward_slice(node))
        if mutated is not None:
            term.detail = f"mask term {node.name} reads {mutated.name}, which is changed in place"
            return
        sources = self.data.sources(node)
        if not sources:
            term.kind = "index"
        elif all(buffer_value(s) is not None for s in sources):
            term.kind = "buffer"
        elif (axes := _broadcast_axes(node))["head"] and axes["query"]:
            term.kind = "padding"
        elif _passed_in(sources):
            term.kind = "input"
        else:
            term.detail = (
                f"mask term {node.name} depends on the data of {self.data.describe(node)} and varies along the "
                f"query axis, so it is not a key-padding mask; it is computed from more than tensors passed in "
                f"(parameters, activations) or requires grad, so it cannot be read once and checked"
                f"{self._from_outside(node)}"
            )

    def _classify_bias(self, bias: Bias) -> None:
        sources = self.data.sources(bias.node)
        if bias.factor is None:
            bias.detail = f"additive mask {bias.node.name} is scaled by a run-time factor"
        elif mutated_from_outside(backward_slice(bias.node)) is not None:
            bias.detail = f"additive mask {bias.node.name} reads a tensor changed in place"
        elif not sources:
            bias.kind = "index"
        elif all(buffer_value(s) is not None for s in sources):
            bias.kind = "buffer"
        elif _passed_in(sources):
            bias.kind = "input"
        else:
            bias.detail = (
                f"additive bias {bias.node.name} is computed from the data of {self.data.describe(bias.node)} "
                f"(e.g. a learned relative-position bias): retention has no equivalent{self._from_outside(bias.node)}"
            )

    def _sizes(self, site: AttentionSite, nodes: list[fx.Node]) -> tuple[list[Sizes], set[int]]:
        """The sizes to evaluate at (``SAMPLE_SIZES``, and c and c + 1 for each constant c the masks' ops read,
        ``_constants``), and the key lengths c + 1 that must be among them: the first length at which a window or
        chunk of c keys differs from the causal grid."""
        slices = [n for node in nodes for n in backward_slice(node)]
        values = [n.meta.get("example_value") for n in slices] + [example_value(site.query), example_value(site.key)]
        symbols = free_symbols(v for v in values if v is not None)
        constants = _constants(slices) if symbols else set()
        candidates = sorted({*SAMPLE_SIZES, *constants, *(c + 1 for c in constants)})
        sizes = sample_sizes(symbols, shape_env_of([site.query, site.key, *slices]), candidates)
        return sizes, {c + 1 for c in constants}

    def _evaluate(self, site: AttentionSite, index: list[Term], biases: list[Bias]) -> MaskAnalysis:
        """Evaluate the index terms and biases at every sampled size and read the grid and the slopes."""
        q, k = example_value(site.query), example_value(site.key)
        nodes = [t.node for t in index] + [b.node for b in biases]
        shapes: list[grids.GridShape] = []
        slopes: list[grids.Slopes] = []
        evaluated: list[Sizes] = []
        candidates, revealing = self._sizes(site, nodes)
        # a static key length below c + 1 never reaches it: the sizes evaluated are every size the site runs at
        unrevealed = {length for length in revealing if not isinstance(k.shape[2], int) or length <= k.shape[2]}
        for number, sizes in enumerate(candidates):
            q_len, kv_len = sizes.of(q.shape[2]), sizes.of(k.shape[2])
            size = max([q_len * kv_len] + [elements(example_value(n), sizes) for n in nodes])
            reveals = any(kv_len >= length for length in revealing)
            if number and size > (MAX_REVEALING_ELEMENTS if reveals else MAX_SAMPLE_ELEMENTS):
                continue
            try:
                admitted, bias, terms = self._grid(index, biases, sizes, q_len, kv_len)
            except Exception as error:  # noqa: BLE001 - a size the graph itself cannot run at
                if number == 0:
                    return MaskAnalysis(
                        grids.GridShape(False, False, None, kv_len), unknown=f"the mask could not be evaluated: {error}"
                    )
                continue
            shape = grids.classify_grid(admitted, q_len, kv_len)
            shapes.append(shape)
            evaluated.append(sizes)
            unrevealed = {length for length in unrevealed if kv_len < length}
            if bias is not None and not slopes:
                fitted = grids.fit_slopes(bias, admitted, self._allowance(terms, admitted, grids.BIAS_ROUNDINGS))
                if isinstance(fitted, str):
                    return MaskAnalysis(shape, unknown=fitted, sizes=evaluated)
                slopes.append(fitted)
            elif bias is not None and not self._holds(slopes[0], bias, admitted, terms):
                differs = "the additive bias does not have the slopes read at the traced size at every size"
                return MaskAnalysis(shape, unknown=differs, sizes=evaluated)
        grid = grids.combine(shapes)
        analysis = MaskAnalysis(grid, sizes=evaluated)
        if not grid.known:
            analysis.unknown = f"the mask is {grid.describe()}"
        elif unrevealed:
            analysis.unknown = (
                f"the mask reads the constant {min(unrevealed) - 1} (a window or chunk length?), and under dynamic "
                f"shapes it would have to be evaluated at {min(unrevealed)} keys to be proven, past the "
                f"{MAX_REVEALING_ELEMENTS} elements the proof evaluates"
            )
        if slopes and not slopes[0].zero:
            analysis.slopes = slopes[0]
        return analysis

    def _read_passed_in(self, site: AttentionSite, terms: list[Term], biases: list[Bias]) -> MaskAnalysis:
        """The grid of a mask with input terms (every term, padding too) at the call that compiled the graph, on the
        keys some query sees there; bottom-right (causal, window, full), top-left causal (``key_prefix``) or causal
        within documents (``documents``)."""
        q, k = example_value(site.query), example_value(site.key)
        q_len, kv_len = Sizes().of(q.shape[2]), Sizes().of(k.shape[2])
        unread = grids.GridShape(False, False, None, kv_len)
        shapes = [Sizes().shape(example_value(part.node).shape) for part in [*terms, *biases]]
        entries = math.prod(torch.broadcast_shapes((q_len, kv_len), *shapes))
        limit = MAX_PASSED_IN_ELEMENTS // (8 if biases else 1)
        if entries > limit:
            return MaskAnalysis(
                unread, unknown=f"the mask passed in has {entries} entries, more than the {limit} read at compile time"
            )
        try:
            admitted, bias, parts = self._grid(terms, biases, Sizes(), q_len, kv_len)
        except Exception as error:  # noqa: BLE001 - whatever the graph's own ops raise on these values
            return MaskAnalysis(unread, unknown=f"the mask passed in could not be read: {error}")
        checked = None
        if bias is not None and bool((bias != 0).any()):
            checked = grids.fit_slopes(bias, admitted, self._allowance(parts, admitted, grids.BIAS_ROUNDINGS))
            if isinstance(checked, str):
                return MaskAnalysis(unread, unknown=f"the additive mask passed in carries a bias: {checked}")
        valid = admitted.any(2).any(1)
        shape = grids.classify_grid(admitted, q_len, kv_len, valid)
        causal = grids.GridShape(False, True, None, kv_len)
        if shape.full and shape.causal and q_len > 1:  # both on these valid keys (one per row): read it as causal
            shape = causal
        slopes = None if checked is None or checked.zero else checked
        analysis = MaskAnalysis(shape, slopes=slopes, checked_slopes=checked, sizes=[Sizes()])
        top_left = grids.top_left_causal_grid(q_len, kv_len) & valid[:, None, None, :]
        if not shape.known and q_len < kv_len and bool((admitted == top_left).all()):
            analysis.grid, analysis.key_prefix = causal, True
        elif (
            q_len == kv_len
            and (not shape.known or (shape.causal and self._per_row([*terms, *biases])))
            and _documents(admitted, valid)
        ):
            analysis.grid, analysis.documents = causal, True  # causal alone is one document per row
        elif not shape.known:
            analysis.unknown = f"the mask passed in is, at the call that compiled the graph, {shape.describe()}"
        return analysis

    def _per_row(self, terms: list[Term | Bias]) -> bool:
        """A term (bool or additive) read from a tensor passed in with 4 dimensions (B, H, Tq, Tk), as packed
        sequences give (a (1, 1, T, T) one too: it then takes the reset gate, at the gated kernels' cost).
        Causal there is read as causal within documents (one per row at that call), so that a later call with
        several runs; a 2-D or 3-D mask passed in (``nn.Transformer``'s ``tgt_mask``), or one made from a (B, Tk)
        padding mask (transformers' flex_attention mask_mod), stays plain causal, ungated."""
        sources = [source for term in terms if term.kind == "input" for source in self.data.sources(term.node)]
        return any(example_value(source).dim() == 4 for source in sources)

    @staticmethod
    def _allowance(terms: tuple, admitted: torch.Tensor, roundings: int) -> torch.Tensor:
        """``grids.rounding_allowance`` of the bias terms ``_grid`` read, 0 off the admitted entries."""
        return grids.rounding_allowance(*terms, admitted, roundings).masked_fill(~admitted, 0.0)

    def _holds(self, slopes: grids.Slopes, bias: torch.Tensor, admitted: torch.Tensor, terms: tuple) -> bool:
        """Whether ``bias`` at another size is ``c_i + m_h j`` with the slopes read at the traced size, to within its
        terms' rounding (``CHECKED_ROUNDINGS``, as the run-time check takes)."""
        allowance = self._allowance(terms, admitted, grids.CHECKED_ROUNDINGS)
        return bool((grids.linear_misfit(bias, admitted, slopes.values, allowance) <= 0).all())

    def _grid(
        self, index: list[Term], biases: list[Bias], sizes: Sizes, q_len: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[list[torch.Tensor], list[torch.dtype]]]:
        """The admitted grid of the index terms, the additive bias there (0 elsewhere) and its terms (float64, with
        their own dtypes: ``grids.rounding_allowance``) at ``sizes``."""
        admitted = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
        for term in index:
            value = torch.as_tensor(self.evaluator.run(term.node, sizes)).to(torch.bool)
            admitted = admitted & (~value if term.block else value)
        terms: tuple[list[torch.Tensor], list[torch.dtype]] = ([], [])
        if not biases:
            return admitted, None, terms
        total = torch.zeros(1, 1, q_len, kv_len, dtype=torch.float64)
        for bias in biases:
            value = torch.as_tensor(self.evaluator.run(bias.node, sizes))
            terms[0].append(value.to(torch.float64) * bias.factor)
            terms[1].append(value.dtype)
            total = total + terms[0][-1]
        # NaN counts as admitted and stays in the bias, as +inf does, so that the fit refuses both (SDPA gives NaN rows)
        admitted = admitted & ~(total <= grids.MASKED_BELOW)
        return admitted, total.masked_fill(~admitted, 0.0), terms
