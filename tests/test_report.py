"""The report: plans, the weight-state balance, the mask field and the three formats (rc.explain, no Inductor)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retention_compile as rc
from retention_compile.backend import collect_reports, rewrite_only_backend
from retention_compile.balance import Balance, compute_balance, parse_shape, site_shape
from retention_compile.power_features import state_dim

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from tiny_gpt import TinyGPT  # noqa: E402


@pytest.fixture(scope="module")
def gpt_report():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT()
    return model, rc.explain(model, torch.randint(0, 256, (2, 64)))


def test_balance_of_the_quickstart_model(gpt_report):
    model, report = gpt_report
    cfg = model.cfg
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    (balance,) = report.balances
    assert balance.weight_flops == 2 * linear  # the embedding is a look-up: not counted
    head_dim = cfg.dim // cfg.heads
    assert balance.length == 64
    assert balance.state_before == cfg.layers * cfg.heads * 2 * 64 * (head_dim + head_dim)
    assert balance.state_after == cfg.layers * cfg.kv_heads * 4 * state_dim(head_dim, 2) * head_dim
    assert balance.ratio_before == pytest.approx(balance.weight_flops / balance.state_before)
    assert balance.best_deg == 2  # p=4 already costs 4 * 6545 * 32 * 4 FLOP, far beyond the weights
    assert balance.balanced_length == round(balance.weight_flops / (balance.state_before / 64))
    assert report.balance is balance


def test_plans_are_attached_to_rewritten_sites(gpt_report):
    _, report = gpt_report
    for site in report.sites:
        assert site.decision == "rewritten"
        assert site.plan["device"] == "CPU" and site.plan["T"] == 64 and site.plan["batch_heads"] == 2 * 2
        assert site.plan["chunk_size"] >= 1 and "T=64" in site.plan["reason"]
        assert site.mask == ""


def test_formats_carry_sites_plans_and_balance(gpt_report):
    _, report = gpt_report
    text = str(report)
    assert "plan g" in text and "on the CPU" in text and "balance (graph" in text
    markdown = report.to_markdown()
    assert "## Sites" in markdown and "### graph" in markdown and "- plan: chunk" in markdown
    assert "## Weight-state balance" in markdown and "tiny_gpt.py:44" in markdown
    data = json.loads(report.to_json())
    assert data["summary"] == report.summary()
    assert data["sites"][0]["plan"]["chunk_size"] == report.sites[0].plan["chunk_size"]
    assert data["sites"][0]["mask"] == ""
    assert data["balance"]["best_deg"] == 2 and data["balance"]["ratio_after"] == report.balance.ratio_after


def test_configured_chunk_size_overrides_the_plan():
    torch._dynamo.reset()
    q = torch.randn(1, 2, 40, 8)
    report = rc.explain(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), q, config={"chunk_size": 8})
    plan = report.sites[0].plan
    assert plan["chunk_size"] == 8 and "chunk_size=8 set by RetentionConfig" in plan["reason"]


def test_kept_sites_have_no_plan_and_count_as_attention_after():
    torch._dynamo.reset()
    q, k = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 20, 8)
    bias = torch.randn(30, 20)

    def fn(q, k):
        return F.scaled_dot_product_attention(q, k, k, attn_mask=bias), F.scaled_dot_product_attention(
            q[:, :, :20], k, k, is_causal=True
        )

    report = rc.explain(fn, q, k)
    kept, rewritten = report.sites
    assert kept.decision == "kept" and kept.plan is None and kept.reason
    assert rewritten.plan is not None
    (balance,) = report.balances
    assert balance.kept_flops == 2 * 20 * (8 + 8) * 2
    assert balance.state_after == balance.kept_flops + 4 * state_dim(8, 2) * 8 * 2
    assert balance.weight_flops == 0 and balance.best_deg is None and balance.ratio_before == 0


def test_weight_flops_follow_views_of_parameters():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 8))
            self.embed = nn.Embedding(10, 8)
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, tokens):
            x = self.embed(tokens) * self.scale
            h = (x @ self.w.t()).view(1, 6, 2, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(h, h, h, is_causal=True)

    torch._dynamo.reset()
    report = rc.explain(Model(), torch.randint(0, 10, (1, 6)))
    assert report.balances[0].weight_flops == 2 * 16 * 8


def test_weight_flops_count_checkpointed_code():
    """Under ``torch.utils.checkpoint`` the layer's linears are in a body graph whose placeholders receive the
    parameters: they were not counted (weight 0 FLOP/token). They count as without checkpointing."""
    import torch.utils.checkpoint as checkpoint

    class Model(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.qkv, self.out, self.checkpointed = nn.Linear(16, 48), nn.Linear(16, 16), checkpointed

        def attention(self, x):
            q, k, v = self.qkv(x).view(1, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(1, 6, 16))

        def forward(self, x):
            return (
                checkpoint.checkpoint(self.attention, x, use_reentrant=False)
                if self.checkpointed
                else self.attention(x)
            )

    x = torch.randn(1, 6, 16)
    for checkpointed in (False, True):
        torch._dynamo.reset()
        assert rc.explain(Model(checkpointed), x).balances[0].weight_flops == 2 * (16 * 48 + 48 + 16 * 16 + 16)


def test_dynamic_shapes_use_hints():
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), backend=rewrite_only_backend, dynamic=True
    )
    with collect_reports() as report:
        compiled(torch.randn(1, 2, 33, 8))
    assert "s" in report.sites[0].q_shape  # symbolic length
    assert report.balances[0].length == 33
    assert report.sites[0].plan["T"] == 33


def test_parse_shape_and_site_shape():
    assert parse_shape("(2, s0, 2*s1)", {"s0": 5, "s1": 3}) == (2, 5, 6)
    with pytest.raises(ValueError, match="no hint"):
        parse_shape("(s9,)", {})
    assert site_shape("(1, 2)", "(1, 2)", "(1, 2)", True, {}) is None
    shape = site_shape("(1, 8, 5, 4)", "(1, 2, 7, 4)", "(1, 2, 7, 6)", True, {})
    assert (shape.q_heads, shape.kv_heads, shape.kv_len, shape.head_dim, shape.value_dim) == (8, 2, 7, 4, 6)


def test_merge_adds_graphs():
    shape = site_shape("(1, 2, 8, 4)", "(1, 2, 8, 4)", "(1, 2, 8, 4)", True, {})
    a, b = compute_balance(0, 100.0, [shape], 2), compute_balance(1, 300.0, [shape, shape], 2)
    merged = Balance.merge([a, b])
    assert merged.graph == -1 and merged.weight_flops == 400.0
    assert merged.state_before == a.state_before + b.state_before
    assert merged.retention_by_deg[4] == a.retention_by_deg[4] + b.retention_by_deg[4]
    assert Balance.merge([a]) is a and Balance.merge([]) is None
    again = compute_balance(2, 100.0, [shape], 2, signature="same")
    assert Balance.merge([compute_balance(0, 100.0, [shape], 2, signature="same"), again]) is again


def test_a_model_explained_then_compiled_counts_once():
    torch._dynamo.reset()
    model, tokens = TinyGPT(), torch.randint(0, 256, (1, 16))
    with collect_reports() as report:
        rc.explain(model, tokens)
        rc.explain(model, tokens[:, :8])
    assert len(report.balances) == 2 and report.balance is report.balances[-1]


def test_nested_collectors_are_distinct_reports():
    torch._dynamo.reset()
    q = torch.randn(1, 2, 8, 4)
    with collect_reports() as outer:
        inner = rc.explain(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), q)
    assert len(outer.sites) == len(inner.sites) == 1 and outer is not inner


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_query_launch_names_cherries_where_the_wgmma_kernel_would_write_them(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an sm_90a GPU with the CUDA state kernel allowed, a bf16 d=64 chunked call's query kernel may step through
    cherries (the wgmma kernel's layout); float16 and float32 calls, which that kernel does not serve, never do."""
    pytest.importorskip("triton")
    from retention_compile import annotate, hardware, planning
    from retention_compile.codegen import nvrtc

    monkeypatch.setattr(nvrtc, "tensor_arch", lambda device: "sm_90a")
    T = 65536
    operands = tuple(torch.empty(1, 8, T, 64, dtype=dtype, device="meta") for _ in range(3))
    plan = planning.plan(hardware.KNOWN["H200"], T=T, d=64, e=64, deg=2, dtype=torch.bfloat16, gated=False,
                         batch_heads=8)  # fmt: skip
    args = {"log_gate": None, "valid": None, "deg": 2, "causal": True}
    launch = annotate.query_launch_of_call(args, operands, T, plan, cuda_state=True)
    cherries = "(cherries with the wgmma state kernel where no backward follows)" in launch
    assert cherries == (dtype == torch.bfloat16)
    assert "cherries" not in annotate.query_launch_of_call(args, operands, T, plan, cuda_state=False)


def test_report_names_the_query_kernels_launch_on_a_gpu():
    """On a GPU the plan record says how the compiled graph launches the query kernel: at T=65536 (bf16, d=64) the
    narrow launch (128 rows on 4 warps, pairs in halves, no register cap) where the plan's tiles say 8 warps; on the
    single-chunk path the plan's own tiles."""
    pytest.importorskip("triton")
    from retention_compile import hardware, planning
    from retention_compile.annotate import query_launch_of_call
    from retention_compile.report import SiteRecord

    args = {"log_gate": None, "valid": None, "deg": 2, "causal": True}
    for T in (65536, 2048):
        operands = tuple(torch.empty(1, 8, T, 64, dtype=torch.bfloat16, device="meta") for _ in range(3))
        plan = planning.plan(hardware.KNOWN["H200"], T=T, d=64, e=64, deg=2, dtype=torch.bfloat16, gated=False,
                             batch_heads=8)  # fmt: skip
        launch = query_launch_of_call(args, operands, T, plan, cuda_state=False)
        if plan.chunk_size < T:
            narrow = "128 query rows x 4 warps x 3 stages, pairs in 2 parts, no register cap"
            assert plan.num_warps == 8 and launch == narrow
        else:  # the quadratic kernel: the plan's rows, warps and stages
            assert launch.startswith(f"{plan.block_t} query rows x {plan.num_warps} warps x {plan.num_stages} stages")
        planned = {"device": "NVIDIA H200", "T": T, **dataclasses.asdict(plan), "query_launch": launch}
        record = SiteRecord(
            graph=0, site=0, node="", location="", module="", q_shape="", k_shape="", v_shape="", decision="rewritten",
            becomes="", reason="", plan=planned,
        )  # fmt: skip
        assert record.plan_summary().endswith(f"; query kernel: {launch}")
    # the key prefix k[:, :, :Tq]: the operand holds 65536 keys, the op reads the 2048 it was planned for
    longer = tuple(torch.empty(1, 8, 65536, 64, dtype=torch.bfloat16, device="meta") for _ in range(3))
    assert query_launch_of_call(args, longer, 2048, plan, cuda_state=False) == launch


def test_graph_breaks_are_reported():
    """Code between Dynamo's graphs runs uncompiled, so attention there is never rewritten: the report said nothing
    (``nn.Transformer`` with a float causal mask: 0 sites, 0 graphs, no word why). It now counts the graph breaks
    made while it collected, by reason, in its summary, its table, markdown and JSON."""

    def fn(q, k, v):
        first = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(first, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    report = rc.explain(fn, q, k, v)
    assert report.graphs == 2 and len(report.rewritten) == 2
    assert sum(report.graph_breaks.values()) == 1 and "1 graph break(s)" in report.summary(), report.graph_breaks
    (reason,) = report.graph_breaks
    assert f"graph break (1x): {reason}" in str(report) and "## Graph breaks" in report.to_markdown()
    assert json.loads(report.to_json())["graph_breaks"] == report.graph_breaks
    assert rc.explain(fn, q, k, v).graph_breaks == report.graph_breaks  # counted per report, not cumulated
