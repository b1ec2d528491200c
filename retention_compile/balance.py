"""The weight-state FLOP balance of a compiled model, before and after the rewrite.

Per token, a model spends FLOPs on its weights and on its state (the memory of earlier tokens):

    weight FLOPs  W = 2 x the parameters of the matmul-like layers the token passes through
                      (linear, matmul, conv, einsum; embeddings are look-ups and count 0)
    attention     2 T (d + e) per query head per layer  (scores and values: ~4 T d at the length T)
    retention     4 D e per kv head per layer            (D = C(d + p - 1, p); state update and read)

``ratio = W / state``. Attention's state grows with T, retention's does not: ``best_deg`` is the even
degree p whose retention state brings the ratio nearest 1 (on a log scale) for the model's rewritten
sites at the compiled length; ``balanced_length`` is the T at which the attention sites' state equals W.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sympy as sp
import torch
from torch import fx

from .bodies import body_calls
from .power_features import state_dim

DEGREES = tuple(range(2, 17, 2))

_MATMUL_TARGETS = {
    torch._C._nn.linear,
    torch.nn.functional.linear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.einsum,
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv3d,
    operator.matmul,
    "matmul",
    "mm",
    "bmm",
    "__matmul__",
    "__rmatmul__",
}
_VIEW_TARGETS = {
    torch.t,
    torch.transpose,
    torch.permute,
    torch.reshape,
    "t",
    "transpose",
    "permute",
    "view",
    "reshape",
    "contiguous",
    "to",
}


@dataclass
class SiteShape:
    """The sizes of one attention site that its state cost depends on (symbolic sizes at their hints)."""

    q_heads: int
    kv_heads: int
    kv_len: int
    head_dim: int
    value_dim: int
    rewritten: bool

    def attention_flops(self) -> float:
        """Scores and weighted values of one token against ``kv_len`` keys, every query head."""
        return 2.0 * self.kv_len * (self.head_dim + self.value_dim) * self.q_heads

    def retention_flops(self, deg: int) -> float:
        """State update and read of one token, ``4 D e`` per kv head."""
        return 4.0 * state_dim(self.head_dim, deg) * self.value_dim * self.kv_heads


@dataclass
class Balance:
    """One graph's weight-state FLOP balance per token (``merge`` adds graphs up).

    graph:             the graph index (-1 for several graphs merged into one model).
    length:            the longest key length T among its attention sites (0 without sites).
    deg:               the degree the rewrite used.
    weight_flops:      W, per token.
    state_before:      state FLOPs per token with every site as attention.
    kept_flops:        the state FLOPs of the sites kept as attention.
    retention_by_deg:  the rewritten sites' state FLOPs as retention of each even degree (empty if none).
    attention_per_key: the attention state FLOPs per token per key of context (``state_before / T``
                       when every site sees T keys).
    signature:         what the graph computes (its parameters and sites), so that ``merge`` counts a model
                       compiled twice (recompiled, explained then compiled, ...) once.
    """

    graph: int
    length: int
    deg: int
    weight_flops: float
    state_before: float
    kept_flops: float
    retention_by_deg: dict[int, float]
    attention_per_key: float
    signature: str = ""

    @property
    def state_after(self) -> float:
        return self.kept_flops + self.retention_by_deg.get(self.deg, 0.0)

    @property
    def ratio_before(self) -> float | None:
        return _ratio(self.weight_flops, self.state_before)

    @property
    def ratio_after(self) -> float | None:
        return _ratio(self.weight_flops, self.state_after)

    @property
    def best_deg(self) -> int | None:
        """The even degree whose retention brings ``W / state`` nearest 1 (log scale); None if nothing was rewritten."""
        if not self.retention_by_deg or self.weight_flops <= 0:
            return None
        return min(
            self.retention_by_deg,
            key=lambda p: abs(math.log(self.weight_flops / (self.kept_flops + self.retention_by_deg[p]))),
        )

    @property
    def best_ratio(self) -> float | None:
        best = self.best_deg
        return None if best is None else _ratio(self.weight_flops, self.kept_flops + self.retention_by_deg[best])

    @property
    def balanced_length(self) -> int | None:
        """The key length at which attention's state FLOPs per token equal the weight FLOPs."""
        return round(self.weight_flops / self.attention_per_key) if self.attention_per_key else None

    def summary(self) -> str:
        """One line: the ratios before and after, and the best degree."""
        scope = "model" if self.graph < 0 else f"graph {self.graph}"
        parts = [
            f"balance ({scope}, T={self.length}): weight {_flops(self.weight_flops)}/token",
            f"attention state {_flops(self.state_before)} (W/S {_fmt(self.ratio_before)})",
            f"after the rewrite (p={self.deg}) {_flops(self.state_after)} (W/S {_fmt(self.ratio_after)})",
        ]
        if self.best_deg:
            parts.append(f"nearest 1 at p={self.best_deg} (W/S {_fmt(self.best_ratio)})")
        if self.balanced_length:
            parts.append(f"attention balances at T~{self.balanced_length}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The fields and the derived figures, for JSON."""
        return {
            "graph": self.graph,
            "length": self.length,
            "deg": self.deg,
            "weight_flops": self.weight_flops,
            "state_before": self.state_before,
            "state_after": self.state_after,
            "ratio_before": self.ratio_before,
            "ratio_after": self.ratio_after,
            "best_deg": self.best_deg,
            "best_ratio": self.best_ratio,
            "balanced_length": self.balanced_length,
            "kept_flops": self.kept_flops,
            "retention_by_deg": {str(p): f for p, f in self.retention_by_deg.items()},
            "attention_per_key": self.attention_per_key,
            "signature": self.signature,
        }

    @classmethod
    def merge(cls, balances: Iterable[Balance]) -> Balance | None:
        """Several graphs as one model: a graph break splits a model and a token passes through every piece,
        so distinct graphs add up; a graph compiled again (same signature) counts once, at its latest."""
        items = list({b.signature or id(b): b for b in balances}.values())
        if len(items) <= 1:
            return items[0] if items else None
        by_deg: dict[int, float] = {}
        for b in items:
            for p, flops in b.retention_by_deg.items():
                by_deg[p] = by_deg.get(p, 0.0) + flops
        return cls(
            graph=-1,
            length=max(b.length for b in items),
            deg=items[0].deg,
            weight_flops=sum(b.weight_flops for b in items),
            state_before=sum(b.state_before for b in items),
            kept_flops=sum(b.kept_flops for b in items),
            retention_by_deg=by_deg,
            attention_per_key=sum(b.attention_per_key for b in items),
        )


def _ratio(weight: float, state: float) -> float | None:
    return weight / state if state > 0 else None


def _fmt(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}"


def _flops(value: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _is_parameter(node: fx.Node, gm: fx.GraphModule, received: frozenset[fx.Node] = frozenset()) -> bool:
    """Whether ``node`` is a parameter: one of the graph's, or a body placeholder in ``received`` (given one)."""
    if node in received:
        return True
    value = node.meta.get("example_value", node.meta.get("val"))
    if node.op == "get_attr":
        value = getattr(gm, str(node.target), value)
    return isinstance(value, torch.nn.Parameter)


def _parameter_source(node: object, gm: fx.GraphModule, received: frozenset[fx.Node] = frozenset()) -> fx.Node | None:
    """The parameter a matmul operand is, or is a view of (``w.t()``, ``w.view(...)``), else None."""
    while isinstance(node, fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return node if _is_parameter(node, gm, received) else None
        if node.op in ("call_function", "call_method") and node.target in _VIEW_TARGETS and node.args:
            node = node.args[0]
            continue
        return None
    return None


def weight_flops_per_token(gm: fx.GraphModule, received: frozenset[fx.Node] = frozenset()) -> float:
    """``2 x`` the elements of every parameter that a matmul-like call of the graph reads (once per call), the
    bodies of higher-order ops included (``bodies.body_calls``: for ``cond``, the costlier branch). ``received``: the
    placeholders of a body that receive a parameter."""
    total = 0.0
    for node in gm.graph.nodes:
        branches = [
            weight_flops_per_token(body, _received(body, operands, gm, received))
            for body, operands in body_calls(node, gm)
        ]
        total += max(branches, default=0.0)
        if node.op not in ("call_function", "call_method") or node.target not in _MATMUL_TARGETS:
            continue
        operands = [*node.args, *node.kwargs.values()]
        for operand in operands:
            param = _parameter_source(operand, gm, received)
            if param is not None:
                total += 2 * _parameter_numel(param, gm)
    return total


def _received(
    body: fx.GraphModule, operands: list[object], gm: fx.GraphModule, received: frozenset[fx.Node]
) -> frozenset[fx.Node]:
    """The placeholders of ``body`` whose operand in ``gm`` is a parameter."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    return frozenset(p for p, a in zip(placeholders, operands) if _parameter_source(a, gm, received) is not None)


def _parameter_numel(node: fx.Node, gm: fx.GraphModule) -> int:
    value = (
        getattr(gm, str(node.target)) if node.op == "get_attr" else node.meta.get("example_value", node.meta.get("val"))
    )
    return int(value.numel())


def shape_hints(gm: fx.GraphModule) -> dict[str, int]:
    """The hint of every symbolic size of the graph's shape environment, by symbol name (``{"s0": 96}``)."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        fake_mode = getattr(value, "fake_mode", None)
        shape_env = getattr(fake_mode, "shape_env", None)
        if shape_env is not None:
            renamed = hasattr(shape_env, "backed_var_to_val")  # torch 2.13 renamed var_to_val
            hints = shape_env.backed_var_to_val if renamed else shape_env.var_to_val
            return {str(sym): int(val) for sym, val in hints.items()}
    return {}


def parse_shape(text: str, hints: dict[str, int]) -> tuple[int, ...]:
    """``"(2, s0, 64)"`` -> ``(2, 96, 64)``: a report's shape string with symbolic sizes at their hints."""
    inner = text.strip().removeprefix("(").removesuffix(")")
    sizes = []
    for item in filter(None, (part.strip() for part in inner.split(","))):
        try:
            sizes.append(int(item))
        except ValueError:
            expr = sp.sympify(item).subs({sp.Symbol(k): v for k, v in hints.items()})
            if not expr.is_number:
                raise ValueError(f"size {item!r} has no hint") from None
            sizes.append(int(expr))
    return tuple(sizes)


def site_shape(q: str, k: str, v: str, rewritten: bool, hints: dict[str, int]) -> SiteShape | None:
    """A site's sizes from its report shapes, or None when they are not (B, H, T, d) with known hints."""
    try:
        qs, ks, vs = parse_shape(q, hints), parse_shape(k, hints), parse_shape(v, hints)
    except (ValueError, TypeError, sp.SympifyError):
        return None
    if not (len(qs) == len(ks) == len(vs) == 4):
        return None
    return SiteShape(q_heads=qs[1], kv_heads=ks[1], kv_len=ks[2], head_dim=qs[3], value_dim=vs[3], rewritten=rewritten)


def compute_balance(graph: int, weight_flops: float, sites: list[SiteShape], deg: int, signature: str = "") -> Balance:
    """The balance of one graph from its weight FLOPs and its attention sites."""
    rewritten = [s for s in sites if s.rewritten]
    return Balance(
        graph=graph,
        length=max((s.kv_len for s in sites), default=0),
        deg=deg,
        weight_flops=weight_flops,
        state_before=sum(s.attention_flops() for s in sites),
        kept_flops=sum(s.attention_flops() for s in sites if not s.rewritten),
        retention_by_deg={p: sum(s.retention_flops(p) for s in rewritten) for p in DEGREES} if rewritten else {},
        attention_per_key=sum(2.0 * (s.head_dim + s.value_dim) * s.q_heads for s in sites),
        signature=signature,
    )


def graph_balance(gm: fx.GraphModule, records: Iterable[Any], graph: int, deg: int) -> Balance:
    """The balance of one Dynamo graph from the report records of its sites (``SiteRecord``)."""
    records = list(records)
    hints = shape_hints(gm)
    shapes = (site_shape(r.q_shape, r.k_shape, r.v_shape, r.decision == "rewritten", hints) for r in records)
    params = sorted(
        str(n.target) for n in gm.graph.nodes if n.op in ("placeholder", "get_attr") and _is_parameter(n, gm)
    )
    identity = "\n".join([*params, *(f"{r.location} {r.module}" for r in records)])
    signature = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return compute_balance(graph, weight_flops_per_token(gm), [s for s in shapes if s is not None], deg, signature)
