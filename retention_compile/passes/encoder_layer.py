"""``nn.TransformerEncoderLayer``'s inference fast path, ``torch._transformer_encoder_layer_fwd``, lowered to SDPA.

In ``eval()`` with no gradient needed (``torch.no_grad()``, or no parameter requiring one), PyTorch runs the whole
layer as one native op, and Dynamo keeps it as one node. It computes what the layer's Python path computes
(inputs ``(B, T, E)``, ``batch_first``; ``act`` ReLU, or GELU for ``use_gelu``):

    attention(x) = out_proj(SDPA(heads(x W_q + b_q), heads(x W_k + b_k), heads(x W_v + b_v), mask))
    feedforward(x) = act(x W_1 + b_1) W_2 + b_2
    norm_first:  x = x + attention(norm_1(x));  x = x + feedforward(norm_2(x))
    otherwise:   x = norm_1(x + attention(x));   x = norm_2(x + feedforward(x))

with ``mask`` by ``mask_type`` (``nn.MultiheadAttention.merge_masks``; masks are float, ``-inf`` where masked):
None, no mask; 1, a key padding mask (B, S) read as ``mask[:, None, None, :]``; 2, the merged (B, H, L, S) mask.
The fast path ignores ``is_causal`` (the source mask carries the causality). This pass writes that form into the
graph, so the SDPA call is a site like any other; a call whose flags are computed at run time is kept and
reported.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .fxutils import insert_call
from .multihead import as_bool_mask
from .sites import AttentionSite, example_value

KIND = "encoder-layer"
ARGUMENTS = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu", "norm_first",
    "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1",
    "ffn_weight_2", "ffn_bias_2", "mask", "mask_type",
)  # fmt: skip
FLAGS = ("embed_dim", "num_heads", "use_gelu", "norm_first", "eps", "mask_type")


def is_encoder_layer(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch._transformer_encoder_layer_fwd


def _arguments(node: fx.Node) -> dict:
    """The call's arguments by name (``mask`` and ``mask_type`` default to None)."""
    named = dict(zip(ARGUMENTS, node.args))
    named.update(node.kwargs)
    return {name: named.get(name) for name in ARGUMENTS}


def _why_not(args: dict) -> str | None:
    """Why this call is not lowered (None: it is)."""
    for name in FLAGS:
        if isinstance(args[name], fx.Node):
            return f"nn.TransformerEncoderLayer fast path with {name} computed at run time"
    if args["mask_type"] not in (None, 1, 2) or (args["mask"] is None) != (args["mask_type"] is None):
        return f"nn.TransformerEncoderLayer fast path with mask_type {args['mask_type']!r}"
    return None


def _merged_padding(mask: fx.Node) -> fx.Node | None:
    """``b`` where ``mask`` is ``merge_masks``'s ``attn + padding.view(B, 1, 1, S).expand(...)`` with ``padding`` the
    float form of a bool (B, S) mask ``b``; else None."""
    if mask.op != "call_function" or mask.target is not operator.add or len(mask.args) != 2:
        return None
    expanded = mask.args[1]
    if not (isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand"):
        return None
    viewed = expanded.args[0]
    if not (isinstance(viewed, fx.Node) and viewed.op == "call_method" and viewed.target == "view"):
        return None
    source, shape = viewed.args[0], tuple(example_value(viewed).shape)
    if not isinstance(source, fx.Node) or example_value(source).dim() != 2 or shape[1:3] != (1, 1):
        return None
    padding = as_bool_mask(source)
    return padding if padding is not source else None


class _Lowering:
    """Writes the layer's Python-path form of one call before it."""

    def __init__(self, graph: fx.Graph, node: fx.Node, args: dict) -> None:
        self.graph, self.node, self.args = graph, node, args

    def call(self, target, *args, **kwargs) -> fx.Node:
        return insert_call(self.graph, target, args, kwargs, like=self.node)

    def norm(self, x: fx.Node, which: int) -> fx.Node:
        a = self.args
        weight, bias = a[f"norm_weight_{which}"], a[f"norm_bias_{which}"]
        return self.call(F.layer_norm, x, (a["embed_dim"],), weight, bias, a["eps"])

    def keys(self, padding: fx.Node) -> fx.Node:
        """A (B, S) key padding mask as (B, 1, 1, S)."""
        return self.call(operator.getitem, padding, (slice(None), None, None, slice(None)))

    def mask(self) -> fx.Node | None:
        """SDPA's attn_mask. A key padding mask is read back as the bool mask it came from (``as_bool_mask``), so
        that it is proven as padding: alone, ``~b`` broadcast; merged with a source mask (``attn + padding``,
        each a view of its (L, S) or (B, S) form), ``attn`` with ``-inf`` where ``b``. Else the float mask, added."""
        mask, kind = self.args["mask"], self.args["mask_type"]
        if kind == 1:
            keys = self.keys(as_bool_mask(mask))
            return self.call(operator.invert, keys) if example_value(keys).dtype == torch.bool else keys
        if kind == 2 and (padding := _merged_padding(mask)) is not None:
            return self.call("masked_fill", mask.args[0], self.keys(padding), float("-inf"))
        return mask

    def heads(self, x: fx.Node) -> fx.Node:
        """(B, T, E) -> (B, H, T, E/H)."""
        return self.call("transpose", self.call("unflatten", x, -1, (self.args["num_heads"], -1)), 1, 2)

    def attention(self, x: fx.Node) -> fx.Node:
        a = self.args
        projected = self.call(F.linear, x, a["qkv_weight"], a["qkv_bias"])
        thirds = self.call("chunk", projected, 3, -1)
        q, k, v = (self.heads(self.call(operator.getitem, thirds, i)) for i in range(3))
        attention = self.call(F.scaled_dot_product_attention, q, k, v, attn_mask=self.mask())
        attention.meta["retention_kind"] = KIND
        merged = self.call("flatten", self.call("transpose", attention, 1, 2), -2)
        return self.call(F.linear, merged, a["proj_weight"], a["proj_bias"])

    def feedforward(self, x: fx.Node) -> fx.Node:
        a = self.args
        hidden = self.call(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
        activated = self.call(F.gelu if a["use_gelu"] else F.relu, hidden)
        return self.call(F.linear, activated, a["ffn_weight_2"], a["ffn_bias_2"])

    def lower(self) -> fx.Node:
        x = self.args["src"]
        if self.args["norm_first"]:
            x = self.call(operator.add, x, self.attention(self.norm(x, 1)))
            return self.call(operator.add, x, self.feedforward(self.norm(x, 2)))
        x = self.norm(self.call(operator.add, x, self.attention(x)), 1)
        return self.norm(self.call(operator.add, x, self.feedforward(x)), 2)


def lower_encoder_layers(graph: fx.Graph) -> list[AttentionSite]:
    """Lower every lowerable ``_transformer_encoder_layer_fwd`` call; return the others as kept sites."""
    kept = []
    for node in list(graph.nodes):
        if not is_encoder_layer(node):
            continue
        args = _arguments(node)
        problem = _why_not(args)
        if problem is not None:
            src = args["src"]
            kept.append(
                AttentionSite(
                    node=node, query=src, key=src, value=src, attn_mask=args["mask"], dropout_p=0.0,
                    is_causal=False, scale=None, enable_gqa=False, kind=KIND, unsupported=problem,
                )
            )  # fmt: skip
            continue
        with graph.inserting_before(node):
            output = _Lowering(graph, node, args).lower()
        node.replace_all_uses_with(output)
        graph.erase_node(node)
    return kept
