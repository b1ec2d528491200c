"""``flex_attention``: its higher-order op read as an SDPA call whose mask is the call's mask_mod.

Dynamo traces ``flex_attention(q, k, v, block_mask=bm)`` to ``torch.ops.higher_order.flex_attention(q, k, v,
score_mod, block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers)``. ``block_mask`` is
``BlockMask.as_tuple()``: the lengths (Tq, Tk), the partial and full kv blocks of each query block, ...,
the block sizes and the mask_mod graph last. Its first output is attention's.

Softmax attention there admits entry (i, j) of head h in batch row b iff j lies in a full block of i's query
block, or in a partial one and ``mask_mod(b, h, i, j)``. Where the listed blocks cover exactly the mask_mod's
entries (as ``create_block_mask`` makes them) that is ``M = mask_mod(b, h, i, j)``, and with a score_mod that
returns the score unchanged the call is ``scaled_dot_product_attention(q, k, v, attn_mask=M, scale=s)``. This
pass inserts that call beside the op, with ``M`` evaluated on broadcast index grids (``b`` (B, 1, 1, 1), ``h``
(1, H, 1, 1), ``i`` (1, 1, Tq, 1), ``j`` (1, 1, 1, Tk)) by the mask_mod graph itself, so the site is read like
any other (index masks proven by evaluation; a mask_mod reading a tensor it captured from a local, document ids say,
is a mask passed in; from a module buffer, a buffer mask). The blocks are read at compile time and must cover ``M``
exactly; at run time an ``_assert_async`` holds them to it: for a mask_mod that reads tensors, the call's blocks
against the call's ``M`` (``blocks_admit_the_mask``), else the call's block tensors against the ones read. A rewritten
site's output replaces the op's and the inserted nodes it no longer needs go; a kept one leaves the op as it was,
and every node inserted for it is removed (``AttentionSite.inserted``).

Left as they are (a site kept, with the reason): a score_mod that changes the score, the log-sum-exp or max outputs
used, symbolic lengths, block tensors that are not graph inputs or hold more than ``MAX_CHECKED_BLOCK_ENTRIES``,
blocks that do not cover the mask_mod's entries exactly, a layout of the block mask tuple other than the above.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .fxutils import compile_time_value, insert_call
from .sites import AttentionSite, example_value, normalise_sdpa

KIND = "flex"
# BlockMask.as_tuple(): (Tq, Tk, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, ..., the query and kv
# block sizes, mask_mod)
KV_BLOCKS = slice(2, 6)
# For a mask_mod that reads no tensor, the run-time check compares each call's kv block tensors with their compile-time
# values, written into the graph as constants: up to this many entries in all (T = 32768 in blocks of 128, one mask
# for every batch row and head: 256 query blocks, each with 256 partial and 256 full kv indices and their counts).
MAX_CHECKED_BLOCK_ENTRIES = 2 * 256 + 2 * 256 * 256
# The compile-time check that the blocks cover the mask_mod evaluates it on every entry, in slices of query rows of
# up to MAX_SLICE_ELEMENTS entries each, up to MAX_COVERED_ELEMENTS in all (T = 46340 for one mask of every row)
MAX_SLICE_ELEMENTS = 1 << 24
MAX_COVERED_ELEMENTS = 1 << 31


def is_flex(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr(torch.ops.higher_order, "flex_attention", None)


def _submodule(gm: fx.GraphModule, node: object) -> fx.GraphModule | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        module = getattr(gm, str(node.target), None)
        return module if isinstance(module, fx.GraphModule) else None
    return None


def _returns_the_score(score_mod: fx.GraphModule) -> bool:
    """The score_mod graph returns its first input (the score) unchanged."""
    inputs = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    output = next(n for n in score_mod.graph.nodes if n.op == "output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    return bool(inputs) and result is inputs[0]


def _cpu(node: object) -> torch.Tensor | None:
    """A graph input's compile-time value on the CPU (``fxutils.compile_time_value``), or None."""
    value = compile_time_value(node) if isinstance(node, fx.Node) else None
    return None if value is None else value.detach().cpu()


def block_grids(
    blocks: list[torch.Tensor | None], block_sizes: tuple[int, int], rows: torch.Tensor, kv_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): (B, H, len(rows), Tk) bool, the query ``rows``' entries that a partial (full) kv block lists,
    from ``kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices`` (the full ones may be None)."""
    grids = []
    for count, indices in (blocks[:2], blocks[2:]):
        if count is None or indices is None:
            grids.append(torch.zeros(1, 1, rows.numel(), kv_len, dtype=torch.bool, device=rows.device))
            continue
        slots = indices.shape[-1]
        listed = torch.arange(slots, device=indices.device) < count[..., None].long()  # the first count[b, h, r]
        dense = torch.zeros(*indices.shape[:-1], slots + 1, dtype=torch.bool, device=indices.device)
        dense = dense.scatter(-1, torch.where(listed, indices.long(), slots), True)[..., :-1]
        dense = dense[..., torch.div(rows, block_sizes[0], rounding_mode="floor"), :]
        grids.append(dense.repeat_interleave(block_sizes[1], -1)[..., :kv_len])
    return grids[0], grids[1]


def blocks_admit_the_mask(
    mask: torch.Tensor, blocks: list[torch.Tensor | None], block_sizes: tuple[int, int], rows: torch.Tensor
) -> torch.Tensor:
    """0-d bool: the entries flex admits on ``rows`` (full blocks, and the mask's entries in partial ones) are
    ``mask``'s there ((B, H, len(rows), Tk), broadcastable)."""
    partial, full = block_grids(blocks, block_sizes, rows, mask.shape[-1])
    return ((full | (partial & mask)) == mask).all()


class FlexLowering:
    """One flex_attention op read as an SDPA site (``lower``), or the reason it is not (``reason``)."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node) -> None:
        self.gm, self.node = gm, node
        self.reason = ""
        q, k, v, score_mod, block_mask, scale = node.args[:6]
        self.q, self.k, self.v, self.scale = q, k, v, scale
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            self.reason = "the log-sum-exp or max of flex_attention is used"
            return
        self.output = users[0]
        self.mask_buffers = tuple(node.args[8]) if len(node.args) > 8 else ()
        score = _submodule(gm, score_mod)
        if score is None or not _returns_the_score(score) or (len(node.args) > 7 and node.args[7]):
            self.reason = "flex_attention's score_mod changes the scores"
            return
        self.block_mask = tuple(block_mask)
        self.mask_mod = self.block_mask[-1]
        self.sizes = (*example_value(q).shape, *example_value(k).shape)
        q_len, kv_len = self.sizes[2], self.sizes[6]
        blocks = self.block_mask[KV_BLOCKS]
        # the compile-time values of the block tensors and the mask_mod's buffers, read (and copied) once
        self.values = {n: _cpu(n) for n in (*blocks, *self.mask_buffers) if n is not None}
        if not all(isinstance(n, int) for n in (*self.sizes, *self.block_mask[:2], *self.block_mask[-3:-1])):
            self.reason = "flex_attention with symbolic sizes (dynamic shapes)"
        elif self.block_mask[:2] != (q_len, kv_len):
            self.reason = (
                f"flex_attention's block mask is for lengths {self.block_mask[:2]}, not ({q_len}, {kv_len}) (no block "
                "mask given, or one laid out otherwise than this torch's BlockMask.as_tuple())"
            )
        elif (module := _submodule(gm, self.mask_mod)) is None:
            self.reason = "flex_attention's block mask has no mask_mod graph"
        elif any(value is None for value in self.values.values()):
            self.reason = "flex_attention's block tensors or mask_mod buffers are computed in the graph, not passed in"
        elif not self.mask_buffers and (entries := self._block_entries()) > MAX_CHECKED_BLOCK_ENTRIES:
            self.reason = (
                f"flex_attention's block tensors hold {entries} entries, more than the "
                f"{MAX_CHECKED_BLOCK_ENTRIES} its run-time check takes as constants"
            )
        else:
            self.mask_module = module
            self.reason = self._blocks_cover_the_mask(q_len, kv_len)

    def _block_entries(self) -> int:
        return sum(self.values[n].numel() for n in self.block_mask[KV_BLOCKS] if n is not None)

    def _blocks_cover_the_mask(self, q_len: int, kv_len: int) -> str:
        """'' where the entries flex admits (full blocks, and the mask_mod's within partial ones) are the mask_mod's
        at compile time, else why not (evaluated in slices of query rows)."""
        buffers = [self.values[n] for n in self.mask_buffers]
        blocks = [None if n is None else self.values[n] for n in self.block_mask[KV_BLOCKS]]
        batch, heads = self.sizes[0], self.sizes[1]
        step = max(1, min(q_len, MAX_SLICE_ELEMENTS // kv_len))
        for start in range(0, q_len, step):
            rows = torch.arange(start, min(start + step, q_len))
            index = (torch.arange(batch), torch.arange(heads), rows, torch.arange(kv_len))
            index = [axis.view([-1 if a == n else 1 for a in range(4)]) for n, axis in enumerate(index)]
            with torch.no_grad():
                mask = self.mask_module(*index, *buffers).to(torch.bool)
            if not bool(blocks_admit_the_mask(mask, blocks, self.block_mask[-3:-1], rows)):
                return "flex_attention's blocks do not cover its mask_mod's entries exactly (a hand-made BlockMask?)"
            entries = mask.numel() // rows.numel() * q_len
            if start == 0 and entries > MAX_COVERED_ELEMENTS:
                return (
                    f"flex_attention's mask_mod has {entries} entries, more than the {MAX_COVERED_ELEMENTS} checked "
                    "against its blocks at compile time"
                )
        return ""

    def kept(self) -> AttentionSite:
        """The op as a site that stays as it is, with ``reason``."""
        return AttentionSite(
            node=self.node, query=self.q, key=self.k, value=self.v, attn_mask=None, dropout_p=0.0, is_causal=False,
            scale=self.scale, enable_gqa=False, kind=KIND, unsupported=self.reason,
        )  # fmt: skip

    def lower(self) -> AttentionSite:
        """Insert ``M`` and the SDPA call before the op; the site, whose inserted nodes a kept site removes."""
        graph, like, call = self.gm.graph, self.output, self._call
        self.inserted: list[fx.Node] = []
        q, k = example_value(self.q), example_value(self.k)
        with graph.inserting_before(self.node):
            indices = []
            for axis, size in enumerate((q.shape[0], q.shape[1], q.shape[2], k.shape[2])):
                shape = [1, 1, 1, 1]
                shape[axis] = -1
                indices.append(call("view", call(torch.arange, size, device=q.device), *shape))
            mask = graph.call_module(str(self.mask_mod.target), (*indices, *self.mask_buffers))
            with q.fake_mode:
                fakes = [a.meta["example_value"] for a in mask.args]
                mask.meta["example_value"] = self.mask_module(*fakes)
            mask.meta.update({key: like.meta[key] for key in ("stack_trace", "nn_module_stack") if key in like.meta})
            self.inserted.append(mask)
            self._check_blocks(mask)
            sdpa = call(
                torch.nn.functional.scaled_dot_product_attention,
                self.q,
                self.k,
                self.v,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        site = normalise_sdpa(sdpa)
        site.kind, site.anchor, site.replaces, site.inserted = KIND, self.node, self.output, self.inserted
        return site

    def _call(self, target, *args, **kwargs) -> fx.Node:
        """``insert_call`` with the op's output as the model node, kept in ``inserted``."""
        self.inserted.append(insert_call(self.gm.graph, target, args, kwargs, like=self.output))
        return self.inserted[-1]

    def _check_blocks(self, mask: fx.Node) -> None:
        """``_assert_async`` that each call's blocks cover its mask: for a mask_mod that reads tensors (its mask is
        computed at every call anyway), ``blocks_admit_the_mask`` on the call's mask; for one that reads none, that
        the call's kv block tensors are those read at compile time (which cover the mask_mod's fixed grid)."""
        blocks = list(self.block_mask[KV_BLOCKS])
        if self.mask_buffers:
            rows = self._call(torch.arange, self.sizes[2], device=example_value(self.q).device)
            same = self._call(blocks_admit_the_mask, mask, blocks, tuple(self.block_mask[-3:-1]), rows)
            message = "does not cover the call's mask_mod entries exactly"
            self._call(
                torch._assert_async,
                same,
                f"retention_compile: the flex_attention block mask at {self.node.name} {message}",
            )
            return
        for node in (n for n in blocks if n is not None):
            value, device = self.values[node], example_value(node).device
            constant = self._call(torch.tensor, value.tolist(), dtype=value.dtype, device=device)
            same = self._call("all", self._call(operator.eq, node, constant))
            self._call(
                torch._assert_async,
                same,
                f"retention_compile: the flex_attention block mask at {self.node.name} is not the one read when the "
                "graph was compiled; call torch._dynamo.reset() to compile for another",
            )
