"""Replace one attention site by the ``retention_compile::power_retention`` op.

Inserted before the site's output node:

    q        the site's query, times the run-time scale factors (``(c s q . k)^p = ((c q) . (s k))^p``)
    k, v     the site's (or the folded ones of a kv-head repeat), cast to q's dtype; the first Tq keys
             for SDPA's top-left ``is_causal`` with Tq < Tk
    valid    the conjunction of the padding terms, each read at head 0 and query 0 (they are constant
             along those axes) and broadcast to (B, Tk); for a mask passed in, the keys some query sees in
             the call's mask (the first Tq of them for a top-left grid)
    log_gate the constant ``-m_h`` of ALiBi slopes, broadcast to (B, Hq, Tk) (Tq keys for a top-left grid);
             plus, for a passed-in mask causal within documents, -inf at each document's first key
             (``grids.document_starts`` of the call's mask)
    checks   for masks read from module buffers: ``_assert_async`` that the mask is still the proven grid;
             for masks passed in, that the call's mask is that grid on its valid keys

A site in a higher-order op's body whose mask terms were made outside it (``masks.TermCollector._outside``) receives
those terms as operands added to the op's call (``bring``, ``bodies.pass_into``).

and the op's output (cast to the site's output dtype) replaces the site's output.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from ..config import RetentionConfig
from ..reference import compute_dtype
from ..sizes import specialized
from . import grids
from .decide import Decision
from .fxutils import insert_call
from .masks import MaskAnalysis, Term
from .sites import AttentionSite, example_value, traced_value

Size = int | fx.Node


def site_scale(site: AttentionSite) -> float:
    """The scale of the scores: the one given, else SDPA's ``1/sqrt(d)`` (d fixed by a guard if symbolic)."""
    if site.scale is not None:
        return float(site.scale)
    head_dim = example_value(site.query).shape[-1]
    return 1.0 / math.sqrt(specialized(head_dim))


def needs_gradient(site: AttentionSite) -> bool:
    """Whether autograd may ask the site's output for a gradient: its query, key, value or a run-time factor of its
    scale requires one as traced (Dynamo's example values carry ``requires_grad``; under ``torch.no_grad`` none
    does; a run-time scale that is a Python number carries none). The op's ``for_backward``: without it the forward
    keeps nothing for a backward."""
    operands = [site.query, site.key, site.value, *(factor for factor, _ in site.scale_factors)]
    values = [traced_value(x) for x in operands if isinstance(x, fx.Node)]
    return any(isinstance(value, torch.Tensor) and value.requires_grad for value in values)


class _Builder:
    """Inserts the op's inputs before the site's output node."""

    def __init__(self, graph: fx.Graph, site: AttentionSite, bring: Callable[[fx.Node], fx.Node]) -> None:
        self.graph, self.site, self.bring = graph, site, bring
        self.device = example_value(site.query).device

    def call(self, target, *args, **kwargs) -> fx.Node:
        """A call (a method call when ``target`` is a str) with its example value: Dynamo's graphs carry one on
        every node, and AOTAutograd's cache bypasses graphs with a method call on a node that lacks it."""
        return insert_call(self.graph, target, args, kwargs, like=self.site.node)

    def retention(self, query: fx.Node, key: fx.Node, value: fx.Node, *options: object, for_backward: bool) -> fx.Node:
        """The op's call, with its example value ``(y, denom, S, M, y_acc)`` made from the shapes alone: running the
        op on the fake inputs here would record guards on the traced lengths (its body plans per length). The
        states' shapes come from the plan, so their example values are empty placeholders: the rewrite reads only y
        (in q's dtype), and AOTAutograd traces the op's body itself, which gives S and M their real (symbolic)
        shapes. Without ``for_backward`` (the op's last argument) ``y_acc`` is empty."""
        op = torch.ops.retention_compile.power_retention.default
        node = self.graph.call_function(op, (query, key, value, *options, for_backward))
        q, v = example_value(query), example_value(value)
        with q.fake_mode if isinstance(q, FakeTensor) else contextlib.nullcontext():
            rows = (q.shape[0], q.shape[1], q.shape[2])
            acc = compute_dtype(q.dtype)
            y, denom = q.new_empty(*rows, v.shape[3]), q.new_empty(rows, dtype=acc)
            kept = acc != q.dtype and for_backward
            y_acc = q.new_empty(*rows, v.shape[3], dtype=acc) if kept else q.new_empty(0, dtype=torch.float32)
            states = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
        node.meta["example_value"] = (y, denom, *states, y_acc)
        return node

    def size(self, node: fx.Node, dim: int) -> Size:
        """A size of ``node``: an int, or read at run time when symbolic."""
        size = example_value(node).shape[dim]
        return self.call("size", node, dim) if isinstance(size, torch.SymInt) else int(size)

    def first_keys(self, tensor: fx.Node) -> fx.Node:
        """``tensor[:, :, :Tq]`` with Tq read from the query."""
        length = self.size(self.site.query, 2)
        return self.call(operator.getitem, tensor, (slice(None), slice(None), slice(None, length)))

    def query(self) -> fx.Node:
        query = self.site.query
        for factor, divide in self.site.scale_factors:
            query = self.call(operator.truediv if divide else operator.mul, query, factor)
        return query

    def cast(self, tensor: fx.Node, dtype: torch.dtype, current: torch.dtype | None = None) -> fx.Node:
        current = current or example_value(tensor).dtype
        return tensor if current == dtype else self.call("to", tensor, dtype)

    def arith(self, op, a: Size, b: Size) -> Size:
        """``op(a, b)`` on sizes: computed now for ints, in the graph otherwise."""
        return op(a, b) if isinstance(a, int) and isinstance(b, int) else self.call(op, a, b)

    def admitted(self, term: Term) -> fx.Node:
        node = self.bring(term.node)
        return self.call(operator.invert, node) if term.block else node

    def valid(self, terms: list[Term], batch: Size, kv_len: Size) -> fx.Node:
        """(B, Tk) bool: each padding term at head 0, query 0, broadcast to (B, Tk); all of them and-ed."""
        valid = None
        for term in terms:
            node = self.admitted(term)
            lead = 4 - example_value(term.node).dim()
            if lead:
                node = self.call(operator.getitem, node, (None,) * lead + (Ellipsis,))
            row = self.call(operator.getitem, node, (slice(None), 0, 0, slice(None)))
            row = self.call("expand", row, batch, kv_len)
            valid = row if valid is None else self.call(operator.and_, valid, row)
        return self.call("contiguous", self.call("to", valid, torch.bool))

    def log_gate(self, slopes: grids.Slopes, batch: Size, heads: Size, kv_len: Size) -> fx.Node:
        """(B, Hq, Tk) float32: ``-m_h`` at every key."""
        values = [-float(m) for m in slopes.values.tolist()]
        gate = self.call(torch.tensor, values, dtype=torch.float32, device=self.device)
        gate = self.call("view", gate, 1, -1, 1)
        return self.call("contiguous", self.call("expand", gate, batch, heads, kv_len))

    def expected_grid(self, mask: MaskAnalysis, q_len: Size, kv_len: Size) -> fx.Node:
        """(Tq, Tk) bool: the proven grid, bottom-right aligned (top-left for ``mask.key_prefix``)."""
        offset = 0 if mask.key_prefix else self.arith(operator.sub, kv_len, q_len)
        rows = self.call(torch.arange, q_len, device=self.device)
        if offset != 0:
            rows = self.call(operator.add, rows, offset)
        rows = self.call(operator.getitem, rows, (slice(None), None))
        cols = self.call(torch.arange, kv_len, device=self.device)
        expected = self.call(operator.le, cols, rows)
        if mask.grid.full:
            expected = self.call(torch.ones_like, expected)
        elif mask.grid.window is not None:
            start = self.call(operator.sub, rows, mask.grid.window)
            expected = self.call(operator.and_, expected, self.call(operator.gt, cols, start))
        return expected

    def admitted_grid(self, mask: MaskAnalysis, message: str) -> fx.Node:
        """The entries the terms admit (index, buffer and input terms; the padding terms too for a passed-in mask;
        the biases above ``MASKED_BELOW``), with an ``_assert_async`` that the biases read from buffers hold nothing
        but 0 and masked entries, and so every bias of a passed-in mask (index biases too: it was read at one size
        only), unless its sum was read as ``c_i + m_h j`` (``checked_slopes``): then that it still is."""
        admitted = None
        for term in [*mask.index, *(mask.padding if mask.passed_in else [])]:
            node = self.admitted(term)
            admitted = node if admitted is None else self.call(operator.and_, admitted, node)
        total, terms = None, ([], [])
        for bias in mask.biases:
            # in float32 before the factor, as the analysis read it (the factor in a 16-bit dtype would round again)
            scaled = self.call(operator.mul, self.call("to", self.bring(bias.node), torch.float32), bias.factor)
            open_ = self.call(operator.gt, scaled, grids.MASKED_BELOW)
            if bias.kind == "buffer" or (mask.passed_in and mask.checked_slopes is None):
                zero = self.call(operator.or_, self.call(operator.eq, scaled, 0), self.call(operator.invert, open_))
                self.call(torch._assert_async, self.call("all", zero), message)
            admitted = open_ if admitted is None else self.call(operator.and_, admitted, open_)
            total = scaled if total is None else self.call(operator.add, total, scaled)
            terms[0].append(scaled)
            terms[1].append(example_value(bias.node).dtype)
        if mask.passed_in and mask.checked_slopes is not None:
            allowance = self.call(grids.rounding_allowance, *terms, admitted, grids.CHECKED_ROUNDINGS)
            self.check_slopes(mask.checked_slopes, total, allowance, admitted, message)
        return admitted

    def check_slopes(
        self, slopes: grids.Slopes, bias: fx.Node, allowance: fx.Node, admitted: fx.Node, message: str
    ) -> None:
        """``_assert_async`` that ``bias`` (float32) is ``c_i + m_h j`` on the admitted entries to within each
        entry's ``allowance`` (its terms' rounding): ``grids.linear_misfit``, the criterion of ``grids.fit_slopes``
        at compile time, at most 0 in every row."""
        slope = self.call(torch.tensor, slopes.values.tolist(), dtype=torch.float32, device=self.device)
        misfit = self.call(grids.linear_misfit, bias, admitted, slope, allowance)
        self.call(torch._assert_async, self.call("all", self.call(operator.le, misfit, 0)), message)

    def four_dimensional(self, grid: fx.Node) -> fx.Node:
        """``grid`` with leading axes of size 1 up to (B, H, Tq, Tk)."""
        lead = 4 - example_value(grid).dim()
        return self.call(operator.getitem, grid, (None,) * lead + (Ellipsis,)) if lead else grid

    def keys_seen(self, admitted: fx.Node, batch: Size, kv_len: Size) -> fx.Node:
        """(B, Tk) bool: the keys some query of some head sees in ``admitted`` (4-D)."""
        seen = self.call("any", self.call("any", admitted, 2), 1)
        return self.call("contiguous", self.call("expand", seen, batch, kv_len))

    def reset_gate(self, starts: fx.Node, batch: Size, heads: Size, kv_len: Size) -> fx.Node:
        """(B, Hq, Tk) float32: -inf at each document's first key, else 0."""
        gate = self.call(torch.where, starts, -math.inf, 0.0)
        gate = self.call("to", gate, torch.float32)
        gate = self.call(operator.getitem, gate, (slice(None), None, slice(None)))
        return self.call("contiguous", self.call("expand", gate, batch, heads, kv_len))

    def check(self, admitted: fx.Node, expected: fx.Node, message: str) -> None:
        """``_assert_async`` that the mask's admitted entries are the expected grid."""
        same = self.call("all", self.call(operator.eq, admitted, expected))
        self.call(torch._assert_async, same, message)


def replace_with_retention(
    graph: fx.Graph,
    site: AttentionSite,
    decision: Decision,
    config: RetentionConfig,
    bring: Callable[[fx.Node], fx.Node] = lambda node: node,
) -> fx.Node:
    """Insert the op before the site's output node, route its users to the op's output, erase the node. ``bring``:
    a node of ``graph`` that holds a mask term's node (the term's node itself, or an input of the body it is passed
    into)."""
    key, value = decision.key or site.key, decision.value or site.value
    mask = decision.mask
    with graph.inserting_before(site.node):
        build = _Builder(graph, site, bring)
        query = build.query()
        dtype = example_value(site.query).dtype
        key, value = build.cast(key, dtype), build.cast(value, dtype)
        if decision.key_prefix:
            key, value = build.first_keys(key), build.first_keys(value)
        valid = log_gate = None
        if mask is not None:
            batch, kv_len = build.size(site.query, 0), build.size(site.key, 2)
            q_len = build.size(site.query, 2)
            if mask.padding and not mask.passed_in:
                valid = build.valid(mask.padding, batch, kv_len)
            heads = build.size(site.query, 1)
            if mask.slopes is not None:  # over the keys the op reads: the first Tq of them for a top-left grid
                log_gate = build.log_gate(mask.slopes, batch, heads, q_len if decision.key_prefix else kv_len)
            if mask.passed_in:
                alibi = f" with {mask.checked_slopes.describe()}" if mask.checked_slopes is not None else ""
                message = (
                    f"retention_compile: the attention mask passed in at {site.location} is not the {mask.reading()} "
                    f"mask{alibi} on its valid keys (those some query sees), as read from the call that compiled this "
                    "graph; call torch._dynamo.reset() to compile for another kind of mask"
                )
                admitted = build.four_dimensional(build.admitted_grid(mask, message))
                valid = build.keys_seen(admitted, batch, kv_len)
                seen = build.call(operator.getitem, valid, (slice(None), None, None, slice(None)))
                expected = build.call(operator.and_, build.expected_grid(mask, q_len, kv_len), seen)
                if mask.documents:
                    starts = build.call(grids.document_starts, admitted)
                    expected = build.call(operator.and_, expected, build.call(grids.same_document, starts))
                    resets = build.reset_gate(starts, batch, heads, kv_len)
                    log_gate = resets if log_gate is None else build.call(operator.add, log_gate, resets)
                build.check(admitted, expected, message)
                if decision.key_prefix:
                    valid = build.call(operator.getitem, valid, (slice(None), slice(None, q_len)))
            elif mask.buffers:
                message = (
                    f"retention_compile: the attention mask at {site.location} reads module buffers that no longer "
                    "hold the mask proven at compile time; call torch._dynamo.reset() after changing them"
                )
                expected = build.expected_grid(mask, q_len, kv_len)
                build.check(build.admitted_grid(mask, message), expected, message)
        call = build.retention(
            query,
            key,
            value,
            log_gate,
            valid,
            site_scale(site),
            config.deg,
            decision.causal,
            config.chunk_size or 0,
            config.codegen,
            for_backward=needs_gradient(site),
        )
        output = build.cast(build.call(operator.getitem, call, 0), example_value(site.node).dtype)
        if site.folded:  # (B, H, Tq, e) -> the site's (B H, Tq, e)
            output = build.call("flatten", output, 0, 1)
    output.meta.update({k: v for k, v in site.node.meta.items() if k in ("stack_trace", "nn_module_stack")})
    site.node.replace_all_uses_with(output)
    graph.erase_node(site.node)
    if site.replaces is not None:  # the op the site was read from: its output, then the op once unused
        source = site.replaces.args[0]
        site.replaces.replace_all_uses_with(output)
        graph.erase_node(site.replaces)
        if isinstance(source, fx.Node) and not source.users:
            graph.erase_node(source)
    return output
