"""Find the attention sites of a Dynamo FX graph and normalise their arguments.

A site is a call of ``F.scaled_dot_product_attention``. Its arguments may be positional or keyword,
``scale`` may be absent, ``dropout_p`` an int: ``AttentionSite`` holds them by name with SDPA's
defaults filled in, plus the shapes read from the nodes' example values (fake tensors; sizes may be
symbolic under dynamic shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class AttentionSite:
    """One attention call found in the graph, with its arguments by name."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    dropout_p: float | fx.Node
    is_causal: bool | fx.Node
    scale: float | fx.Node | None
    enable_gqa: bool | fx.Node

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
        return source_location(self.node)

    @property
    def module_path(self) -> str:
        """Dotted path of the innermost ``nn.Module`` that made the call ('' at top level)."""
        stack = self.node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path, _cls = list(stack.values())[-1]
        return str(path).replace("L['self'].", "").replace("L['self']", "")


def example_value(node: fx.Node | object) -> torch.Tensor:
    """The fake tensor Dynamo recorded for a node."""
    if not isinstance(node, fx.Node):
        raise TypeError(f"expected a graph node, got {type(node).__name__}")
    value = node.meta.get("example_value", node.meta.get("val"))
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
    dropout = bound["dropout_p"]
    return AttentionSite(
        node=node,
        query=bound["query"],
        key=bound["key"],
        value=bound["value"],
        attn_mask=bound["attn_mask"],
        dropout_p=float(dropout) if isinstance(dropout, (int, float)) else dropout,
        is_causal=bound["is_causal"],
        scale=float(bound["scale"]) if isinstance(bound["scale"], (int, float)) else bound["scale"],
        enable_gqa=bound["enable_gqa"],
    )


def find_sdpa_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every SDPA call of the graph, in graph order."""
    return [normalise_sdpa(node) for node in graph.nodes if is_sdpa(node)]
