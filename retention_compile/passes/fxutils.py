"""Graph helpers shared by the passes: what a node's value depends on, and evaluating a node for real.

Data dependence. A node *depends on data* when the values (not just the shapes) of a tensor graph input
flow into it. Reading a tensor's metadata (``size``, ``dim``, ``new_ones``, ``device`` ...) carries no data,
and symbolic sizes are not data: so a mask built from ``arange`` comparisons depends on no data, and its
value is a function of the sizes alone. Random ops count as data (their values are not reproducible).

Evaluation. ``Evaluator.run(node, sizes)`` executes the part of the graph that computes ``node`` with real
tensors on the CPU: symbolic sizes take the values of ``sizes`` (an assignment of the shape symbols),
inputs read only for their metadata become uninitialised tensors of the right shape, module buffers take
their value at compile time, and tensors passed in take the value of the call that compiled the graph at its own
sizes (``input_value``). When ``node`` depends on no data, the result is exactly what the compiled graph
computes at those sizes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from ..bodies import Operand

# Methods and functions that read only a tensor's metadata from their first argument.
METADATA_METHODS = frozenset(
    {"size", "dim", "numel", "stride", "new_ones", "new_zeros", "new_empty", "new_full", "get_device", "is_contiguous"}
)
METADATA_FUNCTIONS = (
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
)
METADATA_ATTRIBUTES = frozenset({"shape", "device", "dtype", "ndim", "is_cuda"})
RANDOM_FUNCTIONS = frozenset(
    {
        torch.rand,
        torch.randn,
        torch.randint,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        torch.bernoulli,
        torch.multinomial,
        torch.normal,
        torch.randperm,
        torch.nn.functional.dropout,
        torch.dropout,
    }
)
RANDOM_METHODS = frozenset({"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_"})
INPLACE_OPERATORS = frozenset(
    {
        operator.iadd, operator.iand, operator.ior, operator.ixor, operator.isub, operator.imul, operator.itruediv,
        operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.ilshift, operator.irshift,
    }
)  # fmt: skip
# Ops whose result may share storage with their first argument (``_may_alias_first``), by method or function name
# (``x.view(...)``, ``torch.transpose(x, ...)``; ``x[i]`` is ``operator.getitem``), and the attributes that are views.
ALIASING_METHODS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "unsqueeze", "squeeze", "expand",
        "expand_as", "narrow", "select", "flatten", "unflatten", "split", "split_with_sizes", "chunk", "unbind",
        "tensor_split", "hsplit", "vsplit", "dsplit", "diagonal", "unfold", "movedim", "moveaxis", "swapaxes",
        "swapdims", "as_strided", "detach", "contiguous", "to", "type", "type_as", "float", "double", "half",
        "bfloat16", "int", "long", "bool", "real", "imag", "view_as_real", "view_as_complex", "__getitem__", "ravel",
        "adjoint", "broadcast_to", "atleast_1d", "atleast_2d", "atleast_3d", "resolve_neg", "resolve_conj", "conj",
        "positive", "align_to", "rename", "refine_names",
    }
)  # fmt: skip
ALIASING_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
# A grid larger than this many elements is not evaluated at extra sizes (the example size is always evaluated).
MAX_SAMPLE_ELEMENTS = 1 << 24


def source_name(node: fx.Node) -> str:
    """Dynamo's name for where a graph input comes from (``L['self']._buffers['bias']``), or ''."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def buffer_value(node: fx.Node) -> torch.Tensor | None:
    """The compile-time value of a graph input that is a module buffer (not a parameter, not a user input)."""
    if node.op != "placeholder" or "._buffers[" not in source_name(node):
        return None
    value = getattr(node.meta.get("grapharg"), "example", None)
    return value if isinstance(value, torch.Tensor) else None


def input_value(node: fx.Node) -> torch.Tensor | None:
    """The compile-time value of a graph input that is a tensor the caller passed in (an argument, a tensor attribute
    of a module), not a parameter and not a buffer: the value of the call that compiled the graph."""
    if node.op != "placeholder" or buffer_value(node) is not None:
        return None
    value = getattr(node.meta.get("grapharg"), "example", None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
        return None
    return None if "._parameters[" in source_name(node) else value


def compile_time_value(node: fx.Node) -> torch.Tensor | None:
    """The value a graph input had when the graph was compiled: a module buffer's (``buffer_value``) or a tensor
    passed in (``input_value``); None for anything else (a parameter, a node computed in the graph)."""
    buffer = buffer_value(node)
    return buffer if buffer is not None else input_value(node)


def _metadata_only(user: fx.Node, arg_index: int) -> bool:
    """``user`` reads only the metadata of its argument number ``arg_index``."""
    if arg_index != 0:
        return False
    if user.op == "call_method":
        return user.target in METADATA_METHODS
    if user.op == "call_function":
        if user.target in METADATA_FUNCTIONS:
            return True
        return user.target is getattr and len(user.args) > 1 and user.args[1] in METADATA_ATTRIBUTES
    return False


def mutated_operand(node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` changes in place, or None: the first argument of an in-place op
    (``x.add_(...)``, ``x &= ...``, ``x[i] = y``), or the ``out=`` tensor of any call."""
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    first = _first_operand(node)
    if _inplace_flag(node):
        return first
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.endswith("__") else None
    if node.op != "call_function":
        return None
    if node.target in INPLACE_OPERATORS or node.target is operator.setitem:
        return first
    if getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return None  # operator.and_, operator.not_ ... are not in place
    name = getattr(node.target, "__name__", "")
    return first if name.endswith("_") and not name.endswith("__") and not name.startswith("_") else None


def _first_operand(node: fx.Node) -> fx.Node | None:
    """The tensor a call acts on: its first positional argument, or ``input=`` / ``self=`` given by keyword."""
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, fx.Node) else None


def _inplace_flag(node: fx.Node) -> bool:
    """A call with ``inplace=True`` (``F.relu(x, inplace=True)``, ``F.dropout(x, p, training, True)``), by keyword or
    at the position of the function's ``inplace`` parameter."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function":
        return False
    try:
        position = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


@functools.lru_cache(maxsize=1024)
def _inplace_position(target: Callable[..., Any]) -> int | None:
    """The position of ``target``'s ``inplace`` parameter, or None (no such parameter, no signature)."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def is_mutation(node: fx.Node) -> bool:
    """An op that changes a tensor in place (``mutated_operand``)."""
    return mutated_operand(node) is not None


def _may_alias_first(node: fx.Node) -> bool:
    """Whether ``node``'s value may share storage with its first argument: a view (``view``, ``transpose``, basic
    indexing, ``split`` ...), an op that returns its input unchanged when it can (``contiguous``, ``to``), or an
    in-place op (which returns its input)."""
    if _first_operand(node) is None:
        return False
    if node.op == "call_method":
        return node.target in ALIASING_METHODS or is_mutation(node)
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ALIASING_ATTRIBUTES
    if node.target is operator.getitem:
        return True
    return getattr(node.target, "__name__", "") in ALIASING_METHODS or is_mutation(node)


def aliases(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that may share its storage: views of it, what it is a view of, and their views
    (siblings included: two views of one tensor may overlap)."""

    def neighbours(current: fx.Node) -> list[fx.Node]:
        views = [user for user in current.users if _may_alias_first(user) and _first_operand(user) is current]
        return [_first_operand(current), *views] if _may_alias_first(current) else views

    return _closure(node, neighbours)


def in_place_changes(node: fx.Node) -> list[fx.Node]:
    """Every op that changes ``node``'s tensor in place, through ``node`` or any of its ``aliases``, in graph order."""
    group = aliases(node)
    return sorted({user for alias in group for user in alias.users if mutated_operand(user) in group})


class DataDependence:
    """Which tensor graph inputs' *values* flow into each node (memoised). ``links``: body placeholders by the operand
    they receive (``bodies.body_inputs``), followed into the graph around the body (``link``)."""

    def __init__(self, links: Mapping[fx.Node, Operand] | None = None) -> None:
        self._sources: dict[fx.Node, frozenset[fx.Node]] = {}
        self._links = links or {}
        self._followed: dict[fx.Node, Operand | None] = {}

    def link(self, node: fx.Node) -> Operand | None:
        """The operand a body placeholder ``node`` is followed to, or None: not in ``links``, or its operand is
        changed in place in the graph around the body (``mutated_from_outside``). Checked once, when first reached:
        the links span every body of the graph, and most are never reached from a mask."""
        if node not in self._links:
            return None
        if node not in self._followed:
            operand = self._links[node]
            value = operand.value
            changed = isinstance(value, fx.Node) and mutated_from_outside(backward_slice(value)) is not None
            self._followed[node] = None if changed else operand
        return self._followed[node]

    def module_of(self, graph: fx.Graph) -> fx.GraphModule | None:
        """The graph module of ``graph``, where a link leads into it, else None."""
        return next((operand.module for operand in self._links.values() if operand.module.graph is graph), None)

    def sources(self, node: fx.Node) -> frozenset[fx.Node]:
        """The tensor inputs (or random ops) whose values ``node`` depends on."""
        if node not in self._sources:
            for current in backward_slice(node):  # graph order: every argument comes first
                if current not in self._sources:
                    self._sources[current] = self._own_sources(current)
        return self._sources[node]

    def _own_sources(self, node: fx.Node) -> frozenset[fx.Node]:
        if (link := self.link(node)) is not None:
            return self.sources(link.value) if isinstance(link.value, fx.Node) else frozenset()
        if node.op == "placeholder":
            return frozenset({node}) if isinstance(node.meta.get("example_value"), torch.Tensor) else frozenset()
        if node.op == "get_attr":
            return frozenset()
        if self._is_random(node):
            return frozenset({node})
        found: frozenset[fx.Node] = frozenset()
        for index, arg in enumerate(_node_args(node)):
            if not _metadata_only(node, index):
                found |= self._sources[arg]
        return found

    @staticmethod
    def _is_random(node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in RANDOM_METHODS
        return node.op == "call_function" and node.target in RANDOM_FUNCTIONS

    def describe(self, node: fx.Node) -> str:
        """The data ``node`` depends on, for a reason string."""
        names = sorted(source_name(s) or s.name for s in self.sources(node))
        return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _node_args(node: fx.Node) -> list[Any]:
    """The node arguments of ``node`` in order (positional first, then keyword), flattened."""
    flat: list[Any] = []
    fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return [a for a in flat if isinstance(a, fx.Node)]


def backward_slice(node: fx.Node) -> list[fx.Node]:
    """Every node ``node`` is computed from (itself included), in graph order."""
    seen = _closure(node, lambda current: current.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _closure(start: fx.Node, neighbours: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """``start`` and every node reached from it through ``neighbours``."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(neighbours(current))
    return seen


def mutated_from_outside(nodes: list[fx.Node]) -> fx.Node | None:
    """A node of ``nodes`` changed in place (through any alias, ``in_place_changes``) by a node outside them: its
    value would then depend on order."""
    inside = set(nodes)
    for node in nodes:
        if any(change not in inside for change in in_place_changes(node)):
            return node
    return None


@dataclass(frozen=True)
class Sizes:
    """An assignment of the graph's shape symbols; ``{}`` for a graph with static shapes."""

    values: tuple[tuple[sympy.Symbol, int], ...] = ()

    @cached_property
    def mapping(self) -> dict[sympy.Symbol, int]:
        return dict(self.values)

    def of(self, size: int | torch.SymInt) -> int:
        """A (possibly symbolic) size under this assignment (symbols it does not assign take their hint)."""
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr, env = size.node.expr, size.node.shape_env
        values = {s: sympy.Integer(self.mapping.get(s, hint(env, s))) for s in expr.free_symbols}
        return int(expr.xreplace(values))

    def shape(self, shape: Iterable[int | torch.SymInt]) -> tuple[int, ...]:
        return tuple(self.of(s) for s in shape)

    def __str__(self) -> str:
        return ", ".join(f"{s}={v}" for s, v in self.values) or "static shapes"


def hint(env: ShapeEnv, symbol: sympy.Symbol) -> int:
    """The example value of a shape symbol (``backed_var_to_val`` in newer torch, ``var_to_val`` before)."""
    values = getattr(env, "backed_var_to_val", None)
    return int((values if values is not None else env.var_to_val)[symbol])


def shape_env_of(nodes: Iterable[fx.Node]) -> ShapeEnv | None:
    """The ShapeEnv of the graph's symbolic sizes, if any of ``nodes`` has one."""
    for node in nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return value.node.shape_env
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


def free_symbols(values: Iterable[Any]) -> set[sympy.Symbol]:
    """The shape symbols in the (possibly symbolic) sizes of ``values``."""
    found: set[sympy.Symbol] = set()
    for value in values:
        sizes = value.shape if isinstance(value, torch.Tensor) else [value]
        for size in sizes:
            if isinstance(size, torch.SymInt | torch.SymFloat | torch.SymBool):
                found |= size.node.expr.free_symbols
    return found


def _satisfies_guards(env: ShapeEnv, mapping: dict[sympy.Symbol, int]) -> bool:
    for symbol, value in mapping.items():
        bounds = env.var_to_range.get(symbol)
        if bounds is not None and not (bounds.lower <= value <= bounds.upper):
            return False
    for guard in env.guards:
        expr = guard.expr
        if not expr.free_symbols <= set(mapping):
            continue
        try:
            if not bool(expr.xreplace({s: sympy.Integer(v) for s, v in mapping.items()})):
                return False
        except TypeError:
            return False
    return True


def sample_sizes(symbols: set[sympy.Symbol], env: ShapeEnv | None, candidates: Iterable[int]) -> list[Sizes]:
    """The example sizes first, then assignments that vary the symbols (one at a time and all together)
    through ``candidates``, kept only where the graph's guards hold."""
    if not symbols or env is None:
        return [Sizes()]
    ordered = sorted(symbols, key=str)
    example = {s: hint(env, s) for s in ordered}
    assignments = [example]
    for value in candidates:
        assignments.append(dict.fromkeys(ordered, value))
        assignments.extend({**example, s: value} for s in ordered)
    found: list[Sizes] = []
    for mapping in assignments:
        sizes = Sizes(tuple((s, mapping[s]) for s in ordered))
        if sizes not in found and _satisfies_guards(env, mapping):
            found.append(sizes)
    return found


def _on_cpu(value: Any) -> Any:
    """Evaluation runs on the CPU: device arguments are replaced."""
    if isinstance(value, torch.device):
        return torch.device("cpu")
    return value


class Evaluator:
    """Executes the slice of the graph that computes a node, with real tensors, at given sizes."""

    def __init__(self, gm: fx.GraphModule, data: DataDependence) -> None:
        self.gm = gm
        self.data = data

    def evaluable(self, node: fx.Node) -> bool:
        """``node`` depends on no data other than module buffers, so it can be evaluated at compile time."""
        return all(buffer_value(s) is not None for s in self.data.sources(node))

    def run(self, node: fx.Node, sizes: Sizes) -> Any:
        """The value of ``node`` at ``sizes`` (``evaluable(node)`` must hold); ``node`` may be one of a graph around
        this one, that a link leads to (``DataDependence.module_of``)."""
        if node.graph is not self.gm.graph:
            return Evaluator(self.data.module_of(node.graph), self.data).run(node, sizes)
        nodes = backward_slice(node)
        values: dict[fx.Node, Any] = {}
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            for current in nodes:
                values[current] = self._run_node(current, values, sizes)
        return values[node]

    def _run_node(self, node: fx.Node, values: dict[fx.Node, Any], sizes: Sizes) -> Any:
        if node.op == "placeholder":
            return self._placeholder(node, sizes)
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value.detach().cpu() if isinstance(value, torch.Tensor) else value
        args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), lambda a: _on_cpu(values.get(a, a)))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":  # a subgraph Dynamo keeps as a module (flex_attention's mask_mod)
            return getattr(self.gm, str(node.target))(*args, **kwargs)
        raise NotImplementedError(f"cannot evaluate {node.op} node {node.name}")

    def _placeholder(self, node: fx.Node, sizes: Sizes) -> Any:
        link = self.data.link(node)
        if link is not None:  # a body's input: its operand, evaluated in the graph around the body
            if not isinstance(link.value, fx.Node):
                return link.value
            return self.run(link.value, sizes)
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return sizes.of(value) if isinstance(value, torch.SymInt) else type(value.node.hint)(value.node.hint)
        if not isinstance(value, torch.Tensor):
            return value
        buffer = buffer_value(node)
        if buffer is not None:
            return buffer.detach().cpu()
        passed_in = input_value(node)
        if passed_in is not None and sizes.shape(value.shape) == tuple(passed_in.shape):
            return passed_in.detach().cpu()  # the call that compiled the graph (``MaskAnalyser``'s input terms)
        # Read for its metadata only (the data analysis guarantees it): an uninitialised tensor of its shape.
        return torch.empty(sizes.shape(value.shape), dtype=value.dtype)


def elements(value: torch.Tensor, sizes: Sizes) -> int:
    """How many elements ``value`` (an example value) has at ``sizes``."""
    count = 1
    for size in sizes.shape(value.shape):
        count *= size
    return count


def insert_call(
    graph: fx.Graph, target: Callable[..., Any] | str, args: tuple, kwargs: dict | None = None, *, like: fx.Node
) -> fx.Node:
    """Insert a call (a method call when ``target`` is a str) at the graph's insertion point, with its example
    value computed on the fake tensors of its arguments, and ``like``'s source location and module stack."""
    from torch._subclasses.fake_tensor import FakeTensor

    kwargs = kwargs or {}
    node = (
        graph.call_method(target, args, kwargs)
        if isinstance(target, str)
        else graph.call_function(target, args, kwargs)
    )
    fake_args, fake_kwargs = fx.node.map_aggregate(
        (args, kwargs), lambda a: a.meta["example_value"] if isinstance(a, fx.Node) else a
    )
    tensors: list[torch.Tensor] = []
    fx.node.map_aggregate((fake_args, fake_kwargs), lambda a: tensors.append(a) if isinstance(a, torch.Tensor) else a)
    tensors.append(like.meta.get("example_value"))  # the fake mode for calls on no tensor (torch.tensor, arange)
    mode = next((t.fake_mode for t in tensors if isinstance(t, FakeTensor)), None)
    with mode or contextlib.nullcontext():
        if isinstance(target, str):
            value = getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
        else:
            value = target(*fake_args, **fake_kwargs)
    node.meta["example_value"] = value
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node
