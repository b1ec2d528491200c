"""``flex_attention`` sites (``passes/flex.py``): its op read as SDPA with the mask_mod's grid, rewritten like any
other site and checked against the float64 oracle (which reads the same grid as a mask); forms retention cannot hold
are kept with the reason and still run flex_attention. On the CPU flex_attention refuses inputs that require grad
(while tracing too), so these check the forward; the op's gradients are checked for every mask form elsewhere."""

import functools

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from retention_compile.backend import collect_reports, rewrite_only_backend
from retention_compile.testing import oracle_sdpa

B, H, T, D = 2, 4, 256, 16
TOL = {"rtol": 1e-5, "atol": 1e-5}
DOCUMENT = (torch.arange(T) >= 100).long() + (torch.arange(T) >= 180).long()  # three packed documents
MASK_MODS = {
    "causal": (lambda b, h, i, j: i >= j, "causal retention"),
    "sliding window": (lambda b, h, i, j: (i >= j) & (i - j < 64), "causal retention"),
    "documents": (lambda b, h, i, j: (i >= j) & (DOCUMENT[i] == DOCUMENT[j]), "causal retention within documents"),
    "full": (lambda b, h, i, j: j >= 0, "non-causal retention"),
}


def qkv(kv_heads=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, T, D), (B, kv_heads, T, D), (B, kv_heads, T, D))
    return [torch.randn(*shape, generator=g) for shape in shapes]


def dense(mask_mod):
    """The mask_mod's grid (B, H, T, T)."""
    index = [torch.arange(n).view([-1 if a == axis else 1 for a in range(4)]) for axis, n in enumerate((B, H, T, T))]
    return mask_mod(*index).expand(B, H, T, T)


def compiled(fn, backend=None):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend or functools.partial(rewrite_only_backend, options=None))


@pytest.mark.parametrize("name", list(MASK_MODS))
@pytest.mark.parametrize("gqa", [False, True])
def test_flex_attention_with_a_block_mask_is_rewritten(name, gqa):
    """A flex_attention site was not found at all (no report line, softmax run). Its mask_mod is now read as the
    site's mask: causal, a window (dropped, as for SDPA), packed documents (a mask_mod reading a tensor it captured:
    read at the first call, each document's first key a reset) and full; GQA by ``enable_gqa``."""
    mask_mod, becomes = MASK_MODS[name]
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    q, k, v = qkv(kv_heads=2 if gqa else H)
    with collect_reports() as report:
        out = compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa))(q, k, v)
    (site,) = report.sites
    assert (site.decision, site.becomes) == ("rewritten", becomes), site.reason
    expected = oracle_sdpa(q, k, v, attn_mask=dense(mask_mod), window_dropped=name == "sliding window", enable_gqa=gqa)
    torch.testing.assert_close(out, expected, **TOL)


def test_flex_attention_compiled_with_inductor():
    """``backend="retention"``: the op and the run-time check of the block tensors through AOTAutograd and
    Inductor."""
    block_mask = create_block_mask(MASK_MODS["causal"][0], B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    q, k, v = qkv()
    with collect_reports() as report:
        out = compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), "retention")(q, k, v)
    assert [s.becomes for s in report.sites] == ["causal retention"], report.summary()
    torch.testing.assert_close(out, oracle_sdpa(q, k, v, is_causal=True), **TOL)


def test_forms_retention_cannot_hold_are_kept_and_still_run_flex_attention():
    """A score_mod that changes the scores, the log-sum-exp used, and a hand-made BlockMask whose full blocks admit
    entries its mask_mod does not: kept, each with its reason, and the output is flex_attention's own. A site read
    and then kept by a policy leaves the op as it was."""
    q, k, v = qkv()
    causal = MASK_MODS["causal"][0]
    blocks = T // 128
    everything = BlockMask.from_kv_blocks(
        torch.zeros(1, 1, blocks, dtype=torch.int32),
        torch.zeros(1, 1, blocks, blocks, dtype=torch.int32),
        torch.full((1, 1, blocks), blocks, dtype=torch.int32),
        torch.arange(blocks, dtype=torch.int32).repeat(1, 1, blocks, 1),
        mask_mod=causal,
    )
    forms = {
        "score_mod": (lambda q, k, v: flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + 0.1 * (j - i)),
                      "score_mod changes the scores"),
        "lse": (lambda q, k, v: flex_attention(q, k, v, return_lse=True)[1], "log-sum-exp or max"),
        "hand-made blocks": (lambda q, k, v: flex_attention(q, k, v, block_mask=everything), "do not cover"),
    }  # fmt: skip
    for name, (fn, reason) in forms.items():
        with collect_reports() as report:
            out = compiled(fn)(q, k, v)
        (site,) = report.sites
        assert site.decision == "kept" and reason in site.reason, (name, site)
        torch.testing.assert_close(out, fn(q, k, v), **TOL)
    full = create_block_mask(MASK_MODS["full"][0], B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    torch._dynamo.reset()  # read as an SDPA site, then kept by the policy: the nodes read it through are removed
    backend = functools.partial(rewrite_only_backend, options={"non_causal": "keep"})
    with collect_reports() as report:
        out = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=full), backend=backend)(q, k, v)
    assert report.sites[0].decision == "kept" and "non_causal='keep'" in report.sites[0].reason, report.sites[0]
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=full), **TOL)


def test_a_block_mask_passed_in_is_checked_at_every_call():
    """The blocks are read at compile time; a later call with a BlockMask of the same shapes but other blocks (a
    hand-made one that no longer covers its mask_mod exactly) raises instead of being read as the first."""
    causal = MASK_MODS["causal"][0]
    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    q, k, v = qkv()
    run = compiled(lambda q, k, v, block_mask: flex_attention(q, k, v, block_mask=block_mask))
    torch.testing.assert_close(run(q, k, v, block_mask), oracle_sdpa(q, k, v, is_causal=True), **TOL)
    (kv_num, kv_index, full_num, full_index) = block_mask.as_tuple()[2:6]
    widened = BlockMask.from_kv_blocks(kv_num, kv_index, full_num + 1, (full_index + 1) % (T // 128), mask_mod=causal)
    with pytest.raises(RuntimeError, match="flex_attention block mask"):
        run(q, k, v, widened)


def _documents(starts, length=T):
    """Document ids of ``length`` keys (documents starting at 0 and at ``starts``), the mask_mod reading them, its
    block mask."""
    document = torch.zeros(length, dtype=torch.long)
    for first in starts:
        document[first:] += 1

    def mask_mod(b, h, i, j):
        return (i >= j) & (document[i] == document[j])

    return document, mask_mod, create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device="cpu")


def test_packed_documents_with_a_new_block_mask_at_every_step():
    """Packed training builds a BlockMask for each step's document boundaries. A mask_mod that reads a tensor is read
    at every call, and its blocks are checked to cover it at every call (not compared with the first call's, which
    raised at the first new layout): each layout against the oracle, one graph. Document ids changed in place under a
    stale block mask (flex would apply blocks and mask_mod together) raise."""
    q, k, v = qkv()
    run = compiled(lambda q, k, v, block_mask: flex_attention(q, k, v, block_mask=block_mask))
    with collect_reports() as report:
        for starts in ([100, 180], [128], [], [60]):
            _, mask_mod, block_mask = _documents(starts)
            torch.testing.assert_close(run(q, k, v, block_mask), oracle_sdpa(q, k, v, attn_mask=dense(mask_mod)), **TOL)
    assert [s.becomes for s in report.sites] == ["causal retention within documents"], report.summary()
    document, _, block_mask = _documents([100], length=384)  # rows 256-383 see keys 128-255 as a full block
    q, k, v = (torch.randn(B, H, 384, D) for _ in range(3))
    stale = compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask))
    stale(q, k, v)
    document[300:] = 2  # a third document the blocks do not know of: that full block now admits entries it masks
    with pytest.raises(RuntimeError, match="does not cover"):
        stale(q, k, v)


def test_flex_attention_with_symbolic_sizes_or_no_block_mask_is_kept():
    """A batch marked dynamic crashed the compile (the index grids fixed B as a constant); symbolic sizes are now
    kept, saying so. A call without a block mask (torch's empty one) is kept naming the lengths."""
    block_mask = create_block_mask(MASK_MODS["causal"][0], B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    q, k, v = qkv()
    for x in (q, k, v):
        torch._dynamo.mark_dynamic(x, 0)
    with collect_reports() as report:
        out = compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask))(q, k, v)
    assert report.sites[0].decision == "kept" and "symbolic sizes" in report.sites[0].reason, report.sites[0]
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=block_mask), **TOL)
    q, k, v = qkv()
    with collect_reports() as report:
        compiled(lambda q, k, v: flex_attention(q, k, v))(q, k, v)
    assert report.sites[0].decision == "kept" and "block mask is for lengths" in report.sites[0].reason
