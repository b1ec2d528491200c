"""``nn.MultiheadAttention``: its opaque ``F.multi_head_attention_forward`` call, lowered to an SDPA call.

Dynamo keeps ``F.multi_head_attention_forward(query, key, value, ...)`` as one node (inputs ``(L, B, E)``).
When its attention weights are not used, PyTorch's own implementation is: in-projection, heads split
into ``(B, H, T, E/H)``, ``scaled_dot_product_attention`` with the masks merged into one, heads merged,
out-projection. This pass writes exactly that into the graph, so the SDPA call is a site like any other:

    attn_mask (L, S)       bool (True = masked) -> ``~attn_mask``; float -> added
    key_padding_mask (B, S) bool (True = padded) -> ``~kpm[:, None, None, :]``; float -> added
                           (``nn.MultiheadAttention`` turns bool masks into float ones with -inf; that
                           form is read back as the bool mask it came from)
    is_causal              PyTorch uses it only when there is no key_padding_mask and no weights are
                           needed (the attn_mask is then a hint and is dropped); otherwise the mask is used.

Forms PyTorch computes differently (``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``,
a 3-D ``attn_mask``, unbatched input, the weights used) are left as they are and reported as kept.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

from .fxutils import insert_call
from .sites import AttentionSite, example_value

SIGNATURE = inspect.signature(F.multi_head_attention_forward)
KIND = "multihead"


def is_multihead(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.multi_head_attention_forward


def _dim(node: object) -> int | None:
    try:
        return example_value(node).dim()
    except TypeError:
        return None


def _why_not(args: dict, node: fx.Node) -> str | None:
    """Why this call is not lowered (None: it is)."""
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if args[name] is not None:
            return f"nn.MultiheadAttention with {name}: PyTorch adds extra keys, not expressible as one SDPA"
    if args["add_zero_attn"] is not False:
        return "nn.MultiheadAttention with add_zero_attn=True"
    if _dim(args["query"]) != 3:
        return "unbatched nn.MultiheadAttention input"
    if args["attn_mask"] is not None and _dim(args["attn_mask"]) != 2:
        return "a 3-D (batch * heads) attn_mask"
    if args["key_padding_mask"] is not None and _dim(args["key_padding_mask"]) != 2:
        return "key_padding_mask is not (B, S)"
    for name in ("embed_dim_to_check", "num_heads", "dropout_p", "training", "need_weights", "is_causal"):
        if isinstance(args[name], fx.Node):
            return f"{name} is computed at run time"
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return "the result tuple is used as a whole"
        if user.args[1] == 1 and user.users:
            return "the attention weights are used (need_weights)"
    return None


def _bool(node: fx.Node) -> bool:
    return example_value(node).dtype == torch.bool


def as_bool_mask(mask: fx.Node | None) -> fx.Node | None:
    """``b`` when ``mask`` is ``nn.MultiheadAttention``'s float form of a bool mask ``b``
    (``zeros_like(b, dtype=float).masked_fill_(b, -inf)``, as ``F._canonical_mask`` writes it)."""
    if mask is None or mask.op != "call_method" or mask.target not in ("masked_fill", "masked_fill_"):
        return mask
    zeros, condition, fill = mask.args
    if not (isinstance(zeros, fx.Node) and zeros.target is torch.zeros_like and zeros.args[0] is condition):
        return mask
    if fill != float("-inf") or len(zeros.users) != 1 or not _bool(condition):
        return mask
    return condition


class _Lowering:
    """Writes the lowered form of one call before it."""

    def __init__(self, graph: fx.Graph, node: fx.Node, args: dict) -> None:
        self.graph, self.node, self.args = graph, node, args

    def call(self, target, *args, **kwargs) -> fx.Node:
        return insert_call(self.graph, target, args, kwargs, like=self.node)

    def heads(self, x: fx.Node) -> fx.Node:
        """(T, B, E) -> (B, H, T, E/H)."""
        split = self.call("unflatten", x, -1, (self.args["num_heads"], -1))
        return self.call("permute", split, 1, 2, 0, 3)

    def projections(self) -> tuple[fx.Node, fx.Node, fx.Node]:
        a = self.args
        bias = a["in_proj_bias"]
        biases = [self.call(operator.getitem, self.call("chunk", bias, 3), i) for i in range(3)] if bias else [None] * 3
        if a["use_separate_proj_weight"]:
            weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        else:
            chunks = self.call("chunk", a["in_proj_weight"], 3)
            weights = [self.call(operator.getitem, chunks, i) for i in range(3)]
        inputs = (a["query"], a["key"], a["value"])
        return tuple(self.heads(self.call(F.linear, x, w, b)) for x, w, b in zip(inputs, weights, biases))

    def mask(self) -> tuple[fx.Node | None, bool]:
        """SDPA's attn_mask (bool = may attend, float = added) and is_causal, by PyTorch's rules."""
        a = self.args
        attn, padding = as_bool_mask(a["attn_mask"]), as_bool_mask(a["key_padding_mask"])
        if a["is_causal"] and padding is None and not a["need_weights"]:
            return None, True
        if padding is not None:
            padding = self.call(operator.getitem, padding, (slice(None), None, None, slice(None)))
        if attn is None and padding is None:
            return None, False
        if attn is None or padding is None:
            only = attn if padding is None else padding
            return (self.call(operator.invert, only) if _bool(only) else only), False
        if _bool(attn) and _bool(padding):
            return self.call(
                operator.and_, self.call(operator.invert, attn), self.call(operator.invert, padding)
            ), False
        if _bool(padding):
            return self.call("masked_fill", attn, padding, float("-inf")), False
        if _bool(attn):
            return self.call("masked_fill", padding, attn, float("-inf")), False
        return self.call(operator.add, attn, padding), False

    def lower(self) -> fx.Node:
        a = self.args
        q, k, v = self.projections()
        mask, causal = self.mask()
        dropout = a["dropout_p"] if a["training"] else 0.0
        attention = self.call(
            F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
        )
        attention.meta["retention_kind"] = KIND
        merged = self.call("flatten", self.call("permute", attention, 2, 0, 1, 3), -2)
        return self.call(F.linear, merged, a["out_proj_weight"], a["out_proj_bias"])


def lower_multihead(graph: fx.Graph) -> list[AttentionSite]:
    """Lower every lowerable ``multi_head_attention_forward`` call; return the others as kept sites."""
    kept = []
    for node in list(graph.nodes):
        if not is_multihead(node):
            continue
        bound = SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        problem = _why_not(args, node)
        if problem is not None:
            kept.append(
                AttentionSite(
                    node=node,
                    query=args["query"],
                    key=args["key"],
                    value=args["value"],
                    attn_mask=args["attn_mask"],
                    dropout_p=0.0,
                    is_causal=False,
                    scale=None,
                    enable_gqa=False,
                    kind=KIND,
                    unsupported=problem,
                )
            )
            continue
        with graph.inserting_before(node):
            output = _Lowering(graph, node, args).lower()
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(output)
            graph.erase_node(user)
        graph.erase_node(node)
    return kept
