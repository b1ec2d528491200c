"""The backend on hand-written SDPA calls: argument normalisation, decisions, report, strict mode,
dynamic shapes. Compiled results are compared with the float64 oracle."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import retention_compile as rc
from retention_compile import ops
from retention_compile.backend import collect_reports
from retention_compile.reference import power_retention_reference


def compile_and_report(fn, *args, options=None, dynamic=False):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", options=options, fullgraph=True, dynamic=dynamic)
    with collect_reports() as report:
        out = compiled(*args)
    return out, report


def tensors(B=2, Hq=4, Hk=2, Tq=24, Tk=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, Tq, d, generator=g),
        torch.randn(B, Hk, Tk, d, generator=g),
        torch.randn(B, Hk, Tk, d, generator=g),
    )


def oracle(q, k, v, **kwargs):
    return power_retention_reference(q.double(), k.double(), v.double(), **kwargs).float()


def assert_forward_and_gradients(compiled, leaves, *args):
    """``compiled(*leaves, *args)`` and its gradients (of a random weighting of y) against the float64 oracle's."""
    out = compiled(*leaves, *args)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want = power_retention_reference(*exact)
    expected = torch.autograd.grad((want * weights.double()).sum(), exact)
    for got, value in zip((out, *grads), (want, *expected)):
        torch.testing.assert_close(got.double(), value, rtol=1e-4, atol=1e-4)


def test_argument_forms_are_normalised():
    q, k, v = tensors(Hq=2, Hk=2)

    def fn(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v, None, 0, True)  # positional, dropout as int
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        c = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=None, is_causal=True)
        return a, b, c

    (a, b, c), report = compile_and_report(fn, q, k, v)
    assert [s.decision for s in report.sites] == ["rewritten"] * 3
    torch.testing.assert_close(a, oracle(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, oracle(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, a)


def test_gqa_and_decisions():
    q, k, v = tensors()
    q_short = q[:, :, :10].contiguous()
    q_one = q[:, :, -1:].contiguous()

    def fn(q, q_short, q_one, k, v):
        return (
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            F.scaled_dot_product_attention(q_short, k, v, is_causal=True, enable_gqa=True),
            F.scaled_dot_product_attention(q_one, k, v, enable_gqa=True),
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        )

    (full, short, one, noncausal), report = compile_and_report(fn, q, q_short, q_one, k, v)
    assert [s.becomes for s in report.sites] == [
        "causal retention",
        "causal retention over the first Tq keys",
        "decode step (causal, bottom-right)",
        "non-causal retention",
    ]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(full, oracle(q, k, v), **tol)
    torch.testing.assert_close(short, oracle(q_short, k[:, :, :10], v[:, :, :10]), **tol)
    torch.testing.assert_close(one, oracle(q_one, k, v), **tol)
    torch.testing.assert_close(noncausal, oracle(q, k, v, causal=False), **tol)


def test_kept_sites_say_why_and_still_run_sdpa():
    q, k, v = tensors(Hq=2, Hk=2, Tq=30, Tk=20)
    mask = torch.rand(30, 20) > 0.5

    def fn(q, k, v, mask):
        return (
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        )

    (a, b), report = compile_and_report(fn, q, k, v, mask)
    assert [s.decision for s in report.sites] == ["kept", "kept"]
    assert "Tq (30) > Tk (20)" in report.sites[0].reason
    assert "mask could not be proven" in report.sites[1].reason
    torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(b, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_policies_non_causal_keep_and_dropout():
    q, k, v = tensors(Hq=2, Hk=2)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(
            q, k, v, dropout_p=0.1, is_causal=True
        )

    _, report = compile_and_report(fn, q, k, v, options={"non_causal": "keep"})
    assert [s.decision for s in report.sites] == ["kept", "rewritten"]
    assert "non_causal='keep'" in report.sites[0].reason
    assert "dropout_p=0.1 ignored" in report.sites[1].notes[0]
    _, report = compile_and_report(fn, q, k, v, options={"dropout": "keep"})
    assert [s.decision for s in report.sites] == ["rewritten", "kept"]


def test_strict_raises_with_the_site():
    q, k, v = tensors(Hq=2, Hk=2, Tq=30, Tk=20)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with pytest.raises(Exception, match="strict.*cannot be rewritten.*Tq"):
        compile_and_report(fn, q, k, v, options={"strict": True})


def test_deg_option_reaches_the_op():
    q, k, v = tensors(Hq=2, Hk=2)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out, _ = compile_and_report(fn, q, k, v, options={"deg": 4})
    torch.testing.assert_close(out, oracle(q, k, v, deg=4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("lengths", "graphs"),
    [
        # one graph for every length with at least two chunks and a tail of two or more keys (Dynamo specialises
        # sizes 0 and 1, so the single-chunk case, a tail of 0 or 1 keys, may get a graph of its own)
        ((130, 157, 300, 700), 1),
        # lengths that fit one planned chunk run the quadratic form, longer ones the chunked form: the choice is a
        # guard on the length, so crossing it recompiles once and both graphs give the oracle's numbers
        ((40, 50, 130, 157), 2),
    ],
)
def test_dynamic_lengths_rewrite_with_one_graph_per_form(lengths, graphs):
    """Under dynamic shapes every length is rewritten and matches the oracle, with one graph per aten form."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", dynamic=True, options={"chunk_size": 64})
    with collect_reports() as report:
        for T in lengths:
            q, k, v = tensors(Tq=T, Tk=T, seed=T)
            torch.testing.assert_close(compiled(q, k, v), oracle(q, k, v), rtol=1e-5, atol=1e-5)
    assert report.graphs == graphs and all(site.decision == "rewritten" for site in report.sites)


def test_growing_lengths_compile_at_most_twice():
    """Under dynamic shapes with the chunk planned, the quadratic-or-chunked choice guards at a bound of the shape
    (``planning.single_chunk_limit``), not at the traced length's planned chunk: lengths doubling from 12 to 2100 (and
    back) take two graphs. Guarded at the traced length's chunk, each doubling recompiled; after 8 graphs Dynamo's
    recompile limit ran the function uncompiled, softmax attention, 2.0 from the oracle, with only a log warning."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", dynamic=True)
    with collect_reports() as report:
        for T in (12, 19, 33, 65, 130, 260, 520, 1040, 2100, 40):
            q, k, v = tensors(B=1, Hq=2, Hk=2, Tq=T, Tk=T, seed=T)
            torch.testing.assert_close(compiled(q, k, v), oracle(q, k, v), rtol=1e-5, atol=1e-5)
    assert report.graphs == 2 and all(site.decision == "rewritten" for site in report.sites)


def test_length_relations_are_guarded_not_assumed():
    """After a recompile Dynamo may give q and k separate length symbols: Tq == Tk is then decided at the
    traced sizes under a guard, never assumed; a call with Tq != Tk gets its own correct graph."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", dynamic=True, options={"chunk_size": 16})
    for tq, tk in ((40, 40), (90, 90), (30, 90)):
        q, k, v = tensors(Tq=tq, Tk=tk, seed=tq + tk)
        expected = oracle(q, k[:, :, :tq], v[:, :, :tq])  # SDPA's is_causal aligns top-left
        torch.testing.assert_close(compiled(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_report_formats():
    q, k, v = tensors(Hq=2, Hk=2)
    report = rc.explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    assert len(report.rewritten) == 1
    text = str(report)
    assert "causal retention" in text and "rewritten" in text
    assert "| rewritten | causal retention |" in report.to_markdown()
    data = report.to_dict()
    assert data["sites"][0]["decision"] == "rewritten" and data["sites"][0]["q_shape"] == "(2, 2, 24, 16)"
    assert '"becomes": "causal retention"' in report.to_json()


def test_compiled_code_is_keyed_by_the_package_code(monkeypatch):
    """Inductor's and AOTAutograd's caches see the package's code fingerprint in their key (the graph holds only
    the op's name): compile_fx runs under a cache_key_tag that contains it."""
    import torch._inductor.compile_fx as compile_fx_module

    from retention_compile.backend import code_fingerprint

    seen = []
    real = compile_fx_module.compile_fx

    def spy(*args, **kwargs):
        seen.append(torch.compiler.config.cache_key_tag)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    torch._dynamo.reset()
    q, k, v = tensors(Hq=2, Hk=2)
    torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend="retention")(q, k, v)
    fingerprint = code_fingerprint()
    assert len(fingerprint) == 16 and seen and all(fingerprint in tag for tag in seen)
    assert all(tag.endswith("-one-op-1") for tag in seen)
    assert torch.compiler.config.cache_key_tag == "", "the tag is restored after compiling"
    monkeypatch.setattr(ops, "TRACED_INFERENCE_IN_ONE_OP", False)  # what the traced graph holds: another key
    torch._dynamo.reset()
    torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend="retention")(q, k, v)
    assert seen[-1].endswith("-one-op-0")


def test_rewritten_graphs_are_cacheable_by_aot_autograd():
    """Every node the rewrite inserts carries an example value, so AOTAutograd's cache takes the rewritten graph
    (a method call on a node without one made it bypass the cache, and every warm process re-traced the op)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    q, k, v = tensors(Hq=2, Hk=2)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[0, :3] = False

    def fn(q, k, v, valid):  # a causal mask with a padding term: the rewrite inserts the `valid` argument's nodes
        positions = torch.arange(q.shape[2])
        mask = valid[:, None, None, :] & (positions[None, :] <= positions[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with collect_reports() as report:
        torch.compile(fn, backend="retention")(q, k, v, valid)
    assert report.rewritten, [site.reason for site in report.sites]
    aot = torch._dynamo.utils.counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0 and aot["autograd_cache_miss"] + aot["autograd_cache_hit"] == 1, dict(aot)


def test_the_backend_name_resolves_once_with_the_entry_point_installed():
    """Imported with its entry point installed (this environment), the package does not register the name itself:
    Dynamo's own registration from the entry point would then fail as a duplicate."""
    assert torch._dynamo.lookup_backend("retention") is rc.retention_backend


def test_the_backend_name_resolves_without_the_entry_point():
    """A checkout on PYTHONPATH has no entry point: importing the package registers ``backend="retention"``."""
    script = textwrap.dedent(
        """
        import importlib.metadata as metadata
        real = metadata.entry_points
        def without_ours(**selection):
            points = real(**selection)
            if selection.get("group") != "torch_dynamo_backends":
                return points
            return metadata.EntryPoints(p for p in points if p.name != "retention")
        metadata.entry_points = without_ours
        import torch
        import retention_compile
        compiled = torch.compile(lambda x: x * 2, backend="retention")
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
        assert torch._dynamo.lookup_backend("retention") is retention_compile.retention_backend
        print("resolved")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "resolved" in done.stdout, done.stderr[-3000:]


def test_importing_the_package_registers_every_op_it_defines():
    """A fresh process that imports the package has every custom op the package's sources define: a graph that
    Inductor loads from its cache calls them (the CUDA state ops, the backward's among them) without tracing the
    bodies that would otherwise import their modules (session 68: a cached backward on the GPU raised "no attribute
    'cuda_reverse_states'")."""
    import re

    package = Path(rc.__file__).parent
    sources = "\n".join(path.read_text() for path in package.rglob("*.py"))
    defined = set(re.findall(r'"retention_compile::(\w+)"', sources))
    defined |= set(re.findall(r'f"\{OP_NAMESPACE\}::(\w+)"', sources))
    assert {"power_retention", "power_retention_backward", "cuda_reverse_states", "decode_step"} <= defined, defined
    script = (
        "import json, torch, retention_compile\n"
        f"print(json.dumps([n for n in {sorted(defined)!r} if not hasattr(torch.ops.retention_compile, n)]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [], "ops not registered by importing the package"


def test_the_forward_keeps_nothing_for_a_backward_no_gradient_will_ask():
    """The rewrite's ``for_backward`` follows the traced operands' ``requires_grad``: under ``torch.no_grad`` the op
    returns no float32 y (``y_acc`` empty) and the same y; with gradients it keeps y_acc, and the backward runs."""
    from retention_compile.annotate import retention_calls
    from retention_compile.backend import rewrite_graph

    seen: list[tuple[bool, ...]] = []

    def recording_backend(gm, example_inputs):
        rewrite_graph(gm)
        seen.append(tuple(call["for_backward"] for call in retention_calls(gm)))
        return gm.forward

    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 48).to(torch.bfloat16)

    def fn(x):
        q, k, v = proj(x).view(2, 40, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    x = torch.randn(2, 40, 16, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        inference = compiled(x)
    training = compiled(x)
    assert seen == [(False,), (True,)]
    assert inference.dtype == training.dtype == torch.bfloat16
    assert torch.equal(inference, training)
    training.float().square().sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    q, k, v = (t.double() for t in proj(x).detach().view(2, 40, 3, 2, 8).permute(2, 0, 3, 1, 4))
    want = power_retention_reference(q, k, v, scale=8**-0.5)
    assert float((inference.double() - want).norm() / want.norm()) < 1e-2


def test_the_op_without_for_backward_returns_no_accumulators_and_refuses_a_gradient():
    """``for_backward=False``: y as with it, ``y_acc`` and the states empty; a gradient asked of it raises, naming
    the flag, instead of differentiating through a y the backward cannot use."""
    q, k, v = (t.to(torch.bfloat16) for t in tensors(Hq=2, Hk=2, Tq=40, Tk=40))
    args = (None, None, 0.25, 2, True, 16, "aten")
    kept = torch.ops.retention_compile.power_retention(q, k, v, *args)
    bare = torch.ops.retention_compile.power_retention(q, k, v, *args, False)
    assert torch.equal(kept[0], bare[0]) and torch.equal(kept[1], bare[1])
    assert kept[4].shape == (*q.shape[:3], v.shape[3]) and all(t.numel() == 0 for t in bare[2:])
    leaf = q.clone().requires_grad_()
    y = torch.ops.retention_compile.power_retention(leaf, k, v, *args, False)[0]
    with pytest.raises(RuntimeError, match="for_backward=False"):
        y.float().sum().backward()
    with torch.no_grad():
        assert torch.equal(rc.power_retention(leaf, k, v, scale=0.25, chunk_size=16), kept[0])


def _checkpointed(mask: str | None = None):
    """Causal SDPA inside ``torch.utils.checkpoint`` (a higher-order op's body under Dynamo); ``mask``: without one,
    ``is_causal``; ``"made"``, a causal mask made outside the body (``tril`` of ones) and passed in; ``"data"``, that
    mask as a tensor the function holds (read at the call that compiled the graph, checked at every call);
    ``"padded"``, the causal mask and-ed outside the body with the key validity ``valid`` (B, Tk), the function's last
    argument; ``"padded additive"``, that mask as 0 / -inf added to the scores; ``"padded nested"``, the padded mask
    passed through two nested checkpoints."""
    import torch.utils.checkpoint as checkpoint

    held = torch.ones(20, 20, dtype=torch.bool).tril()

    def body(q, k, v, causal=None):
        if causal is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)

    def outer_body(q, k, v, causal):
        return checkpoint.checkpoint(body, q, k, v, causal, use_reentrant=False) * 1.0

    def fn(q, k, v, valid=None):
        made = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        if valid is not None:
            made = made & valid[:, None, None, :]
        if mask == "padded additive":
            made = torch.zeros(made.shape, dtype=q.dtype).masked_fill(~made, float("-inf"))
        made = {None: None, "data": held}.get(mask, made)
        run = outer_body if mask == "padded nested" else body
        return checkpoint.checkpoint(run, q * 2.0, k, v, made, use_reentrant=False) + 1.0

    return fn


@pytest.mark.parametrize("mask", [None, "made", "data", "padded", "padded additive", "padded nested"])
def test_attention_inside_activation_checkpointing_is_rewritten(mask):
    """Dynamo puts checkpointed code in a body graph of its own (``tag_activation_checkpoint``): its attention was
    never found (0 sites, softmax run, strict silent; 0.62 from the oracle). Now the bodies' sites are rewritten
    (forward and gradients against the oracle), a causal mask made outside the body too: it is read where it is made
    (``bodies.body_inputs``; it was kept as an input of unknown value). Key padding and-ed into the mask outside the
    body is passed into it as one more operand of the checkpoint call (``bodies.pass_into``), through nested bodies
    too (those sites were kept: data varying along the query axis). A mask the function holds is data passed into
    the graph: read at the call that compiled it and checked at every call (it was kept)."""
    q, k, v = tensors(Tq=20, Tk=20)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, -4:] = False
    padded = mask is not None and mask.startswith("padded")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, report = compile_and_report(_checkpointed(mask), *leaves, *([valid] if padded else []))
    assert [site.becomes for site in report.sites] == ["causal retention"], report.summary()
    assert ("padding" in report.sites[0].mask) == padded, report.sites[0].mask
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    expected = power_retention_reference(2.0 * exact[0], *exact[1:], valid=valid if padded else None) + 1.0
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    for got, want in zip(grads, torch.autograd.grad((expected * weights.double()).sum(), exact)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


class _SoftmaxAttentionWithItsOwnBackward(torch.autograd.Function):
    """SDPA in a custom autograd.Function, whose backward is written for softmax attention."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    def backward(ctx, grad):  # dv of softmax attention; (dq, dk omitted)
        q, k, v = ctx.saved_tensors
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return None, None, weights.transpose(-1, -2) @ grad


def test_attention_inside_a_custom_autograd_function_is_left_alone():
    """Dynamo gives a custom ``autograd.Function`` forward and backward bodies (``autograd_function_apply``): a
    rewritten forward would no longer match the backward written for it, so its bodies are not searched."""
    q, k, v = tensors(Hk=4, Tq=12, Tk=12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, report = compile_and_report(lambda q, k, v: _SoftmaxAttentionWithItsOwnBackward.apply(q, k, v), *leaves)
    assert not report.sites, report.summary()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_a_one_key_tail_under_dynamic_shapes():
    """Called at T=6, then 5 (Dynamo recompiles with dynamic shapes) and 7, chunks of 4: at T=5 the last chunk holds
    one key, and the compiled chunked form returned garbage in its row (2e6 from the oracle; an Inductor miscompile of
    the one-chunk pieces' products, copied and flattened). Those products are now plain ``bmm`` calls."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", options={"chunk_size": 4})
    for T in (6, 5, 7):
        q, k, v = tensors(B=2, Hq=1, Hk=1, Tq=T, Tk=T, d=8, seed=T)
        torch.testing.assert_close(compiled(q, k, v), oracle(q, k, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("Tq, Tk", [(5, 6), (12, 12), (9, 5)])
def test_dynamic_shapes_at_edge_layouts(Tq, Tk):
    """Compiled with ``dynamic=True`` at its first call, chunks of 4, forward and gradients against the oracle.
    (5, 6): a one-key prefix and a one-key tail; y was 1.9 from the oracle and the gradients NaN (Inductor made the
    prefix's one-key state product a wrongly indexed outer product, ``chunked._contract``). (12, 12): whole chunks,
    an empty tail; Inductor failed a stride assertion (the tail now holds the last chunk, ``chunked._Layout``).
    (9, 5): more queries than keys, an empty prefix of length ``Max(0, Tk - Tq)``; the same assertion (its states'
    operands are now padded before the transpose, ``chunked._accumulate``)."""

    def fn(q, k, v):
        return rc.power_retention(q, k, v, chunk_size=4)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", dynamic=True)
    leaves = [t.requires_grad_() for t in tensors(B=1, Hq=2, Hk=1, Tq=Tq, Tk=Tk, d=4, seed=Tq + Tk)]
    assert_forward_and_gradients(compiled, leaves)


def test_a_chunk_size_argument_under_dynamic_shapes():
    """``chunk_size`` given by an int argument of a function compiled with ``dynamic=True`` reached the plan as a
    SymInt, which the plan's cache could not hash (the trace failed). It is specialised with a guard: each chunk
    runs, forward and gradients against the oracle."""

    def fn(q, k, v, chunk):
        return rc.power_retention(q, k, v, chunk_size=chunk)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", dynamic=True)
    for chunk in (2, 3):
        leaves = [t.requires_grad_() for t in tensors(B=1, Hq=2, Hk=2, Tq=8, Tk=8, d=4, seed=chunk)]
        assert_forward_and_gradients(compiled, leaves, chunk)


def test_gradients_of_a_one_key_tail_under_dynamic_shapes():
    """As ``test_a_one_key_tail_under_dynamic_shapes`` with gradients: dk and dv at T=5 (a one-key last chunk,
    compiled with dynamic shapes after T=6) were NaN or inf at the full chunk's keys. The tail's reverse state is a
    product over its one step, which Inductor made a broadcast outer product indexed wrongly
    (``chunked._contract``)."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", options={"chunk_size": 4})
    for T in (6, 5):
        assert_forward_and_gradients(
            compiled, [t.requires_grad_() for t in tensors(B=2, Hq=2, Hk=2, Tq=T, Tk=T, d=8, seed=T)]
        )


def test_a_warning_before_the_recompile_limit_turns_retention_back_into_softmax():
    """Past Dynamo's recompile limit a function runs uncompiled: its attention is softmax again, said only in a log
    line. The backend warns at the last compile the limit allows (here static shapes, one graph per length)."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="retention", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=3, automatic_dynamic_shapes=False):
        for T in (8, 9):
            compiled(*tensors(Tq=T, Tk=T))
        with pytest.warns(UserWarning, match="become softmax attention again"):
            compiled(*tensors(Tq=10, Tk=10))
        q, k, v = tensors(Tq=11, Tk=11)
        assert not torch.allclose(compiled(q, k, v), oracle(q, k, v), atol=1e-3)  # what the warning is about
    torch._dynamo.reset()
