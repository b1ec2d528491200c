"""The graphs a Dynamo graph runs: its own, and the bodies of its higher-order ops where attention may be rewritten.

Dynamo puts the code under ``torch.utils.checkpoint`` (``tag_activation_checkpoint``), ``torch.cond`` and the like in
graphs of their own, submodules of the top-level graph reached through ``get_attr`` operands of the op's call. Their
attention and their matmuls do not show in the top-level graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import fx

# Higher-order ops whose bodies are plain code to run, where attention may be rewritten like anywhere else. Not, for
# one, ``autograd_function_apply`` (a custom ``autograd.Function``): its forward body rewritten would no longer match
# the backward the user wrote for it.
REWRITABLE_BODIES = frozenset({"tag_activation_checkpoint", "wrap", "invoke_subgraph", "cond"})
# Of those, the ops whose call can pass its body one more operand (``pass_into``): the operands follow the body in the
# call, one body per call. Not ``cond`` (its operands are one tuple shared by two bodies) nor ``invoke_subgraph`` (one
# body shared by calls, keyed by an identifier).
OPEN_BODIES = frozenset({"tag_activation_checkpoint", "wrap"})


def _body(operand: object, gm: fx.GraphModule) -> fx.GraphModule | None:
    """The graph module an op's operand names (a ``get_attr`` of a ``GraphModule``), else None."""
    if isinstance(operand, fx.Node) and operand.op == "get_attr":
        module = gm.get_submodule(str(operand.target))
        return module if isinstance(module, fx.GraphModule) else None
    return None


def body_calls(node: fx.Node, gm: fx.GraphModule) -> list[tuple[fx.GraphModule, list[object]]]:
    """The bodies ``node`` runs if it is a higher-order op of ``REWRITABLE_BODIES`` (both branches of a ``cond``),
    each with the operands its placeholders receive, in order: ``cond(pred, true_fn, false_fn, operands)``, else
    the arguments after the body (an ``invoke_subgraph`` identifier skipped)."""
    if node.op != "call_function" or getattr(node.target, "_name", None) not in REWRITABLE_BODIES:
        return []
    if node.target._name == "cond":
        return [(b, list(node.args[3])) for b in (_body(a, gm) for a in node.args[1:3]) if b is not None]
    found = [(i, b) for i, b in enumerate(_body(a, gm) for a in node.args) if b is not None]
    if not found:
        return []
    last, body = found[-1]
    return [(body, [a for a in node.args[last + 1 :] if not isinstance(a, str)])]


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and the bodies of its higher-order ops in ``REWRITABLE_BODIES``, nested ones included, each once, in
    graph order."""
    found = [gm]
    for module in found:  # grows while it is read: a body's own bodies come after it
        for node in module.graph.nodes:
            for body, _ in body_calls(node, module):
                if all(body is not seen for seen in found):
                    found.append(body)
    return found


@dataclass(frozen=True)
class Operand:
    """What a body's placeholder receives: ``value`` (a node of ``module``, or a constant) from the op's call;
    ``open``: the call's op is one of ``OPEN_BODIES``, so a node of ``module`` can be passed into the body."""

    value: object
    module: fx.GraphModule
    open: bool = False


def _body_call_sites(gm: fx.GraphModule) -> Iterator[tuple[fx.GraphModule, fx.Node, fx.GraphModule, list[object]]]:
    """``(module, call, body, operands)`` for every body call in ``gm`` and in its bodies (``graph_modules``)."""
    for module in graph_modules(gm):
        for node in module.graph.nodes:
            for body, operands in body_calls(node, module):
                yield module, node, body, operands


def body_inputs(gm: fx.GraphModule) -> dict[fx.Node, Operand]:
    """The placeholders of every body of ``gm`` (``graph_modules``), each with the operand it receives from the graph
    around it. A body run by more than one call (or a ``cond`` branch pair sharing operands) is linked only where
    every call passes the same operand; a placeholder left out reads as an input of unknown value."""
    received: dict[fx.Node, list[Operand]] = {}
    for module, node, body, operands in _body_call_sites(gm):
        placeholders = [p for p in body.graph.nodes if p.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue
        opened = node.target._name in OPEN_BODIES
        for placeholder, operand in zip(placeholders, operands):
            received.setdefault(placeholder, []).append(Operand(operand, module, opened))
    return {p: found[0] for p, found in received.items() if all(o == found[0] for o in found)}


def body_callers(gm: fx.GraphModule) -> dict[fx.GraphModule, list[tuple[fx.GraphModule, fx.Node]]]:
    """Every body of ``gm`` with its calls, each as ``(the module it is in, the call)``: what ``pass_into`` reads,
    found once for all the terms a rewrite passes into bodies (a call's operands are read from the call itself, so
    operands ``pass_into`` appends keep this current)."""
    callers: dict[fx.GraphModule, list[tuple[fx.GraphModule, fx.Node]]] = {}
    for module, node, body, _ in _body_call_sites(gm):
        callers.setdefault(body, []).append((module, node))
    return callers


def pass_into(
    value: fx.Node, body: fx.GraphModule, callers: dict[fx.GraphModule, list[tuple[fx.GraphModule, fx.Node]]]
) -> fx.Node:
    """A node of ``body`` that holds ``value``, a node of a graph around it: ``value`` itself when it is ``body``'s
    own, else a placeholder of ``body`` that receives it. ``callers``: ``body_callers`` of the graph. A placeholder is
    added, and ``value`` appended to the operands of every call of ``body``, where no call passes it yet; through every
    body on the way down from ``value``'s graph. Every call of every body on the way must be of ``OPEN_BODIES``
    (``Operand.open``) and in one graph."""
    if value.graph is body.graph:
        return value
    calls = callers.get(body, [])
    modules = {id(module): module for module, _ in calls}
    if not calls or len(modules) != 1 or any(node.target._name not in OPEN_BODIES for _, node in calls):
        raise ValueError(f"{value.name} cannot be passed into a body whose calls are not open calls of one graph")
    outer = pass_into(value, next(iter(modules.values())), callers)
    placeholders = [node for node in body.graph.nodes if node.op == "placeholder"]
    for index, operand in enumerate(body_calls(calls[0][1], calls[0][0])[0][1]):
        if operand is outer and all(body_calls(node, module)[0][1][index] is outer for module, node in calls):
            return placeholders[index]
    with body.graph.inserting_after(placeholders[-1]) if placeholders else body.graph.inserting_before():
        placeholder = body.graph.placeholder(outer.name)
    placeholder.meta["example_value"] = outer.meta.get("example_value")
    for _, node in calls:
        node.args = (*node.args, outer)
    return placeholder
