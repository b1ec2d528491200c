"""Find the attention sites of a Dynamo FX graph and normalise their arguments.

A site is a call of ``F.scaled_dot_product_attention`` (or, found by ``patterns``, a hand-written
``softmax(q k^T * s + mask) @ v``). Its arguments may be positional or keyword, ``scale`` may be absent or
computed at run time, ``dropout_p`` an int: ``AttentionSite`` holds them by name with SDPA's defaults filled
in, the mask as a list of ``MaskPart``s, plus the shapes read from the nodes' example values (fake tensors;
sizes may be symbolic under dynamic shapes).

The scores of a site are ``scale * prod(run-time factors) * q.k + mask``; a run-time factor (a node) is
folded into the query when the site is rewritten, since ``(c s q . k)^p = ((c q) . (s k))^p`` for a per-row c.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


Polarity = Literal["allow", "block", "add"]


@dataclass(frozen=True)
class MaskPart:
    """One mask applied to the scores, aligned right with ``(B, H, Tq, Tk)``.

    polarity: "allow" (bool, True = may attend, SDPA's bool mask), "block" (bool, True = masked, as
              ``masked_fill``'s mask), "add" (float, added to the scores).
    factor:   for "add": the number the part is multiplied by before the softmax (1.0 for SDPA's mask;
              None when a run-time factor scales it).
    """

    node: fx.Node
    polarity: Polarity
    factor: float | None = 1.0


@dataclass
class AttentionSite:
    """One attention call found in the graph, with its arguments by name.

    kind:          "sdpa", "hand-written" or "multihead" (an ``nn.MultiheadAttention`` lowered to SDPA).
    parts:         the masks (``attn_mask`` for SDPA), see ``MaskPart``.
    scale_factors: run-time factors of the scale, ``(node, divide)``: the scores are multiplied (divided) by them.
    scores:        for hand-written attention, the node fed to the softmax (``anchor`` is the softmax: the
                   site's location is the softmax call's).
    unsupported:   why the site cannot be rewritten whatever its mask (set by the finder).
    folded:        hand-written attention with the heads folded into the batch axis whose output node is
                   (B H, Tq, e) (BLOOM, XGLM): the op's (B, H, Tq, e) is flattened back. (q, k, v are the finder's
                   (B, H, T, d) views of such tensors whatever the output.)
    replaces:      the node a rewritten site's output stands for, where ``node`` is an SDPA call inserted to read
                   another op (``flex.FlexLowering``: the op's attention output); None: ``node`` itself.
    inserted:      the nodes inserted to read such an op, removed again when the site is kept.
    """

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    dropout_p: float | fx.Node
    is_causal: bool | fx.Node
    scale: float | fx.Node | None
    enable_gqa: bool | fx.Node
    kind: str = "sdpa"
    parts: list[MaskPart] = field(default_factory=list)
    scale_factors: list[tuple[fx.Node, bool]] = field(default_factory=list)
    scores: fx.Node | None = None
    anchor: fx.Node | None = None
    unsupported: str | None = None
    folded: bool = False
    replaces: fx.Node | None = None
    inserted: list[fx.Node] = field(default_factory=list)

    @property
    def q_shape(self) -> tuple:
        return tuple(example_value(self.query).shape)

    @property
    def k_shape(self) -> tuple:
        return tuple(example_value(self.key).shape)

    @property
    def v_shape(self) -> tuple:
        return tuple(example_value(self.value).shape)

    @property
    def location(self) -> str:
        """``file:line`` of the user's call, from the node's stack trace."""
        return source_location(self.anchor or self.node)

    @property
    def module_path(self) -> str:
        """Dotted path of the innermost ``nn.Module`` that made the call ('' at top level)."""
        stack = (self.anchor or self.node).meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path, _cls = list(stack.values())[-1]
        return module_path(str(path))


def module_path(dynamo_path: str) -> str:
    """``model.layers.0.self_attn`` from Dynamo's ``L['self'].model.layers[0].self_attn`` (or
    ``L['args'][0]._modules['model']...``): the root local dropped, as ``named_modules`` spells the rest."""
    path = re.sub(r"^L\[[^\]]*\](\[[^\]]*\])*\.?", "", dynamo_path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", "." + path if path.startswith("_modules") else path)
    return re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")


def traced_value(node: fx.Node) -> object:
    """What tracing recorded for a node (Dynamo's ``example_value``, else ``val``): a fake tensor, a symbolic or
    Python number, or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def example_value(node: fx.Node | object) -> torch.Tensor:
    """The fake tensor Dynamo recorded for a node."""
    if not isinstance(node, fx.Node):
        raise TypeError(f"expected a graph node, got {type(node).__name__}")
    value = traced_value(node)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"node {node.name} has no tensor example value")
    return value


def source_location(node: fx.Node) -> str:
    """The last ``File "...", line N`` frame of a node's stack trace, as ``file:line``."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith('File "')]
    if not frames:
        return "<unknown>"
    last = frames[-1]
    path = last.split('"')[1]
    line = last.split("line ")[1].split(",")[0] if "line " in last else "?"
    return f"{path}:{line}"


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def normalise_sdpa(node: fx.Node) -> AttentionSite:
    """Bind an SDPA call's positional and keyword arguments to SDPA's parameter names."""
    if len(node.args) > len(SDPA_PARAMETERS):
        raise ValueError(f"{node.name}: scaled_dot_product_attention called with {len(node.args)} positional args")
    bound = dict(SDPA_DEFAULTS)
    bound.update(zip(SDPA_PARAMETERS, node.args))
    unknown = set(node.kwargs) - set(SDPA_PARAMETERS)
    if unknown:
        raise ValueError(f"{node.name}: unknown scaled_dot_product_attention argument(s) {sorted(unknown)}")
    bound.update(node.kwargs)
    dropout, scale, mask = bound["dropout_p"], bound["scale"], bound["attn_mask"]
    factors = []
    if isinstance(scale, fx.Node):  # computed at run time (e.g. a float attribute made dynamic)
        factors, scale = [(scale, False)], 1.0
    return AttentionSite(
        node=node,
        query=bound["query"],
        key=bound["key"],
        value=bound["value"],
        attn_mask=mask,
        dropout_p=float(dropout) if isinstance(dropout, (int, float)) else dropout,
        is_causal=bound["is_causal"],
        scale=float(scale) if isinstance(scale, (int, float)) else scale,
        enable_gqa=bound["enable_gqa"],
        kind=node.meta.get("retention_kind", "sdpa"),
        parts=[] if mask is None else [MaskPart(mask, _sdpa_polarity(mask))],
        scale_factors=factors,
    )


def _sdpa_polarity(mask: fx.Node) -> Polarity:
    """SDPA reads a bool mask as "may attend" and adds any other mask to the scores."""
    try:
        return "allow" if example_value(mask).dtype == torch.bool else "add"
    except TypeError:
        return "add"


def find_sdpa_sites(graph: fx.Graph, skip: list[fx.Node] = ()) -> list[AttentionSite]:
    """Every SDPA call of the graph, in graph order (but those in ``skip``: read already)."""
    return [normalise_sdpa(node) for node in graph.nodes if is_sdpa(node) and node not in skip]
