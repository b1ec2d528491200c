"""Replace one SDPA node by the ``retention_compile::power_retention`` op."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guard_int

from ..config import RetentionConfig
from .decide import Decision
from .sites import AttentionSite, example_value


def site_scale(site: AttentionSite) -> float:
    """SDPA's scale: the one given, else ``1/sqrt(d)`` (the head dim is fixed by a guard if symbolic)."""
    if site.scale is not None:
        return float(site.scale)
    head_dim = example_value(site.query).shape[-1]
    return 1.0 / math.sqrt(guard_int(head_dim) if isinstance(head_dim, torch.SymInt) else head_dim)


def _first_keys(graph: fx.Graph, tensor: fx.Node, query: fx.Node) -> fx.Node:
    """``tensor[:, :, :Tq]`` with Tq read from the query at run time."""
    q_len = example_value(query).shape[2]
    length = graph.call_method("size", (query, 2)) if isinstance(q_len, torch.SymInt) else int(q_len)
    return graph.call_function(operator.getitem, (tensor, (slice(None), slice(None), slice(None, length))))


def replace_with_retention(
    graph: fx.Graph, site: AttentionSite, decision: Decision, config: RetentionConfig
) -> fx.Node:
    """Insert the op before the SDPA node, route its users to the op's output and erase the SDPA node."""
    key, value = site.key, site.value
    with graph.inserting_before(site.node):
        if decision.key_prefix:
            key, value = _first_keys(graph, key, site.query), _first_keys(graph, value, site.query)
        call = graph.call_function(
            torch.ops.retention_compile.power_retention.default,
            (
                site.query,
                key,
                value,
                decision.log_gate,
                decision.valid,
                site_scale(site),
                config.deg,
                decision.causal,
                config.chunk_size or 0,
                config.codegen,
            ),
        )
        output = graph.call_function(operator.getitem, (call, 0))
    output.meta.update({k: v for k, v in site.node.meta.items() if k in ("stack_trace", "nn_module_stack")})
    site.node.replace_all_uses_with(output)
    graph.erase_node(site.node)
    return output
