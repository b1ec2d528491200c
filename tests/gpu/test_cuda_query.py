"""The wgmma query kernel (``codegen/cuda_query.py``) on the op's route, against the float64 oracle and against the
Triton query kernel on the same states. Hopper only (sm_90a)."""

from __future__ import annotations

import pytest
import torch

from retention_compile.codegen import cuda_query, cuda_state, forward, nvrtc, replays
from retention_compile.planning import Plan
from retention_compile.reference import EPS, _weighted_powers

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _hopper() -> bool:
    return torch.cuda.is_available() and nvrtc.tensor_arch(torch.device(DEVICE)) == "sm_90a"


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the wgmma query kernel needs sm_90a")

# (name, B, Hq, Hk, T, chunk, gate heads (0: none), magnitude)
CASES = [
    ("short_tail", 1, 2, 2, 129, 128, 0, 1.0),
    ("gated_tails", 2, 2, 2, 1000, 256, 2, 1.0),
    ("gqa_gate_per_query_head", 1, 4, 1, 3000, 1024, 4, 1.0),
    ("gated_gqa", 1, 4, 2, 2500, 512, 2, 1.0),
    ("one_warpgroup_of_rows", 1, 2, 2, 1024 + 30, 1024, 2, 1.0),
    ("large_inputs", 1, 2, 2, 700, 256, 2, 100.0),
    ("ungated_gqa_long", 1, 4, 2, 5000, 1024, 0, 1.0),
]


def _inputs(case: tuple, seed: int = 0) -> dict:
    _, B, Hq, Hk, T, chunk, gate_heads, magnitude = case
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(heads: int) -> torch.Tensor:
        return (magnitude * torch.randn(B, heads, T, 64, generator=g, device=DEVICE)).to(torch.bfloat16)

    q, k, v = randn(Hq), randn(Hk), randn(Hk)
    log_gate = None
    if gate_heads:
        log_gate = -0.05 * torch.rand(B, gate_heads, T, generator=g, device=DEVICE)
        log_gate[:, 0] = 0.0  # one head never decays
    plan = Plan(chunk_size=chunk, block_t=64, block_feature=16, block_e=64, num_warps=4, num_stages=2)
    return {"q": q, "k": k, "v": v, "log_gate": log_gate, "plan": plan}


def _forward(x: dict, monkeypatch, cuda: bool, **options) -> tuple[torch.Tensor, torch.Tensor, list]:
    """y and denom through ``triton_forward`` with the CUDA state kernel, and the CUDA query kernel where ``cuda``;
    with the CUDA query launches the call made (``eager_launch.CudaLaunch``)."""
    launches = []
    original = cuda_query.query_launch

    def counted(*args, **kwargs):
        launches.append(original(*args, **kwargs))
        return launches[-1]

    monkeypatch.setattr(forward, "CUDA_QUERY", cuda)
    monkeypatch.setattr(forward, "CUDA_QUERY_GATED", cuda)
    monkeypatch.setattr(cuda_query, "query_launch", counted)
    replays.clear()
    try:
        y, den = forward.triton_forward(
            x["q"], x["k"], x["v"], scale=0.125, deg=2, log_gate=x["log_gate"], causal=True, valid=None,
            plan=x["plan"], state_kernel=cuda_state.CudaStateHook(), **options,
        )  # fmt: skip
    finally:  # (a later call's counter must not count through this one)
        monkeypatch.setattr(cuda_query, "query_launch", original)
    return y, den, launches


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values (an unwritten element?)"
    return ((x - ref).norm() / ref.norm()).item()


@needs_hopper
@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float32], ids=["inference", "float32_y"])
def test_matches_the_oracle_and_the_triton_query_kernel(case: tuple, y_dtype: torch.dtype, monkeypatch) -> None:
    _check_against_the_oracle_and_triton(case, y_dtype, monkeypatch)


FOUR_WARPGROUP_CASES = [c for c in CASES if c[5] % 256 == 0]  # a program's 256 rows lie in one chunk


@needs_hopper
@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("case", FOUR_WARPGROUP_CASES, ids=[c[0] for c in FOUR_WARPGROUP_CASES])
@pytest.mark.parametrize("stages", [6, 3])
def test_four_warpgroups_per_program(case: tuple, stages: int, monkeypatch) -> None:
    """The launch with 4 warpgroups (256 rows) per program and one program per SM (the bench's 1x6x4, and 3 stages,
    where a warpgroup's last P V shares its stage with a copy three blocks on): the same checks, with tails where
    whole warpgroups hold no row."""
    monkeypatch.setattr(cuda_query, "WARPGROUPS", 4)
    monkeypatch.setattr(cuda_query, "MIN_BLOCKS", 1)
    monkeypatch.setattr(cuda_query, "STAGES", stages)
    _check_against_the_oracle_and_triton(case, torch.bfloat16, monkeypatch)


BESIDE_CASES = [CASES[1], CASES[2], CASES[6]]


@needs_hopper
@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("case", BESIDE_CASES, ids=[c[0] for c in BESIDE_CASES])
@pytest.mark.parametrize("warpgroups", [2, 4])
@pytest.mark.parametrize("segments", [None, 3])
def test_beside_the_state_kernel_as_after_it(case: tuple, warpgroups: int, segments: int | None, monkeypatch) -> None:
    """Launched as the wgmma state kernel's programmatic dependent (``forward.QUERY_BESIDE_STATES``), every program
    waiting for its chunk's segment count before it reads the chunk's states, in the order first chunks first: y and
    denom bitwise those of the launch after the state kernel (the same work per program), and both match the oracle.
    The planner's segment count and 3 (a fold across segments at every length here)."""
    if case[5] % cuda_query.rows_per_program(warpgroups):
        pytest.skip("a program's rows must lie in one chunk")
    monkeypatch.setattr(cuda_query, "WARPGROUPS", warpgroups)
    monkeypatch.setattr(cuda_query, "MIN_BLOCKS", 2 if warpgroups == 2 else 1)
    x = _inputs(case)
    options = {"y_dtype": torch.bfloat16, "segments": segments}
    monkeypatch.setattr(forward, "QUERY_BESIDE_STATES", False)
    y_after, den_after, after = _forward(x, monkeypatch, True, **options)
    monkeypatch.setattr(forward, "QUERY_BESIDE_STATES", True)
    y_beside, den_beside, beside = _forward(x, monkeypatch, True, **options)
    assert [launch.dependent for launch in after] == [False]
    assert [launch.dependent for launch in beside] == [True], "not launched beside the state kernel"
    assert torch.equal(y_beside, y_after) and torch.equal(den_beside, den_after)
    gate = None if x["log_gate"] is None else x["log_gate"].double()
    numerator, want_den = _weighted_powers(
        x["q"].double(), x["k"].double(), x["v"].double(), 1, EPS, scale=0.125, deg=2, log_gate=gate, causal=True,
        valid=None,
    )  # fmt: skip
    assert _rel(y_beside, numerator / want_den) <= 1e-2


def _check_against_the_oracle_and_triton(case: tuple, y_dtype: torch.dtype, monkeypatch) -> None:
    x = _inputs(case)
    options = {"y_dtype": y_dtype} if y_dtype != torch.float32 else {"for_backward": True}
    y, den, launched = _forward(x, monkeypatch, True, **options)
    assert len(launched) == 1, "the call did not take the CUDA query kernel"
    y_triton, den_triton, triton_launched = _forward(x, monkeypatch, False, **options)
    assert not triton_launched
    gate = None if x["log_gate"] is None else x["log_gate"].double()
    numerator, want_den = _weighted_powers(
        x["q"].double(), x["k"].double(), x["v"].double(), 1, EPS, scale=0.125, deg=2, log_gate=gate, causal=True,
        valid=None,
    )  # fmt: skip
    want = numerator / want_den
    assert y.dtype == y_dtype
    assert _rel(y, want) <= 1e-2
    assert _rel(den, want_den.squeeze(-1)) <= 1e-2
    # the same states and the same rounding points: as close to the Triton kernel as to the oracle, or closer
    assert _rel(y, y_triton) <= max(1e-2, 2 * _rel(y_triton, want))
    assert _rel(den, den_triton) <= 1e-2
    # per row too: no row (or head) off where the norms above would dilute it
    row_error = (y.double() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
    triton_row_error = (y_triton.double() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
    assert row_error.max() <= max(5e-2, 2 * triton_row_error.max())


@needs_hopper
@pytest.mark.usefixtures("poison_allocations")
def test_replayed_calls_take_the_cuda_launch(monkeypatch) -> None:
    """A kept eager call (launches straight to Triton, as the op's eager body makes them) repeats the CUDA query
    launch on the next call's tensors (fresh inputs, same shapes), with no planning: the result matches a direct
    call's."""
    from torch._library.triton import set_wrap_triton_enabled

    x, fresh = _inputs(CASES[2]), _inputs(CASES[2], seed=1)
    with set_wrap_triton_enabled(False):
        _, _, launched = _forward(x, monkeypatch, True, y_dtype=torch.bfloat16)
        assert len(launched) == 1
        assert len(replays._KEPT) == 1, "the call was not kept"
        monkeypatch.setattr(forward, "call_shape_class", _never_called)
        y_replayed, _ = forward.triton_forward(
            fresh["q"], fresh["k"], fresh["v"], scale=0.125, deg=2, log_gate=fresh["log_gate"], causal=True,
            valid=None, plan=fresh["plan"], state_kernel=cuda_state.CudaStateHook(), y_dtype=torch.bfloat16,
        )  # fmt: skip
        monkeypatch.undo()
        y_direct, _, launched = _forward(fresh, monkeypatch, True, y_dtype=torch.bfloat16)
        assert len(launched) == 1
    assert _rel(y_replayed, y_direct) <= 1e-6


def _never_called(*args, **kwargs):
    raise AssertionError("a kept call planned again")


def _compiled_afresh_on_the_cuda_state_kernel(monkeypatch) -> None:
    """``impl="auto"`` calls take the CUDA state kernel (``select_state_kernel``'s measured choice forced), and nothing
    from an earlier test answers the next compile or call: no kept route or launches, no Dynamo graph, no cached
    Inductor code (the caches' keys hold the graph Dynamo traced, not the module flags a test sets)."""
    from retention_compile.codegen import choice

    monkeypatch.setattr(choice, "choose", lambda *args, **kwargs: "cuda")
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    replays.clear()
    torch._dynamo.reset()


@needs_hopper
@pytest.mark.parametrize(
    ("impl", "one_op", "expected"),
    [("auto", True, "power_retention_inference"), ("auto", False, "cuda_query"), ("cuda", True, "cuda_query")],
    ids=["one_op", "flag_off", "impl_cuda"],
)
def test_compiled_calls_take_the_custom_ops(monkeypatch, impl: str, one_op: bool, expected: str) -> None:
    """Under torch.compile (no grad, as inference runs; the CUDA state kernel, whose cherry layout the kernel reads)
    the forward is one custom op in Inductor's code (``ops.power_retention_inference``: the eager forward, its
    launches kept), or, with ``TRACED_INFERENCE_IN_ONE_OP`` off or ``impl="cuda"`` (``ops._in_one_op``), the state and
    query kernels' two custom ops; either way the compiled result matches the float64 oracle, and the one op's is the
    eager call's exactly. (No poisoned allocations: the fixture's fills would be traced into the graph as mutations.)"""
    from torch._inductor.utils import run_and_get_code

    import retention_compile as rc
    from retention_compile import ops

    monkeypatch.setattr(forward, "CUDA_QUERY", True)
    monkeypatch.setattr(forward, "CUDA_QUERY_GATED", True)
    monkeypatch.setattr(ops, "TRACED_INFERENCE_IN_ONE_OP", one_op)
    _compiled_afresh_on_the_cuda_state_kernel(monkeypatch)  # else the other case's cached code would come back
    x = _inputs(CASES[3])

    def attention(q, k, v, gate):
        return rc.power_retention(q, k, v, scale=0.125, log_gate=gate, causal=True, chunk_size=512, impl=impl)

    with torch.no_grad():
        compiled = torch.compile(attention, fullgraph=True)
        y, code = run_and_get_code(compiled, x["q"], x["k"], x["v"], x["log_gate"])
        again = compiled(x["q"], x["k"], x["v"], x["log_gate"])  # the one op's second call repeats the kept launches
        eager = attention(x["q"], x["k"], x["v"], x["log_gate"])
    text = "\n".join(code)
    absent = {"power_retention_inference": "cuda_query", "cuda_query": "power_retention_inference"}[expected]
    assert f"retention_compile.{expected}" in text, f"the compiled code does not call {expected}"
    assert f"retention_compile.{absent}" not in text
    numerator, den = _weighted_powers(
        x["q"].double(), x["k"].double(), x["v"].double(), 1, EPS, scale=0.125, deg=2,
        log_gate=x["log_gate"].double(), causal=True, valid=None,
    )  # fmt: skip
    assert _rel(y, numerator / den) <= 1e-2
    assert _rel(again, numerator / den) <= 1e-2
    if expected == "power_retention_inference":
        assert torch.equal(y, eager) and torch.equal(again, eager)


@needs_hopper
def test_one_op_compiled_with_dynamic_lengths(monkeypatch) -> None:
    """Compiled with ``dynamic=True`` (impl "auto" on the CUDA state kernel, the planner's chunks), first at a chunked
    length, so the graph holds the one op; then lengths on either side of a chunk boundary, an odd one and one the
    planner gives a single chunk (which ``ops.resolve_plan``'s guard sends to a second graph): each of the one op's
    results is the eager call's exactly (it plans per concrete length), the single chunk's within 1e-3, gated, GQA."""
    from torch._inductor.utils import run_and_get_code

    import retention_compile as rc

    _compiled_afresh_on_the_cuda_state_kernel(monkeypatch)

    def attention(q, k, v, gate):
        return rc.power_retention(q, k, v, scale=0.125, log_gate=gate, causal=True)

    compiled = torch.compile(attention, fullgraph=True, dynamic=True)
    for i, T in enumerate((9000, 8192, 12345, 2048)):
        x = _inputs(("dynamic", 1, 4, 2, T, 1024, 2, 1.0), seed=T)
        with torch.no_grad():
            if i == 0:
                y, code = run_and_get_code(compiled, x["q"], x["k"], x["v"], x["log_gate"])
                assert "retention_compile.power_retention_inference" in "\n".join(code)
            else:
                y = compiled(x["q"], x["k"], x["v"], x["log_gate"])
            eager = attention(x["q"], x["k"], x["v"], x["log_gate"])
        if T > 2048:  # the one op's graph
            assert torch.equal(y, eager), f"T={T}: the compiled call differs from the eager one"
        else:  # the single-chunk graph: Inductor launches the quadratic kernel, specialised for symbolic sizes
            assert _rel(y, eager) <= 1e-3


@needs_hopper
def test_one_op_under_cuda_graphs(monkeypatch) -> None:
    """``mode="reduce-overhead"`` (no grad): Inductor captures the graph holding the one op (its state and query
    kernels, the query one launched beside the state one and waiting on its counts) in a CUDA graph and replays it on
    new data; every replay's y is the eager call's exactly, gated with GQA, and no graph was skipped."""
    from torch._dynamo.utils import counters

    import retention_compile as rc

    _compiled_afresh_on_the_cuda_state_kernel(monkeypatch)
    counters.clear()

    def attention(q, k, v, gate):
        return rc.power_retention(q, k, v, scale=0.125, log_gate=gate, causal=True, chunk_size=1024)

    compiled = torch.compile(attention, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(4):  # warm-up, capture, then replays
            x = _inputs(CASES[2], seed=seed)
            y = compiled(x["q"], x["k"], x["v"], x["log_gate"]).clone()  # a replay overwrites its outputs
            eager = attention(x["q"], x["k"], x["v"], x["log_gate"])
            assert torch.equal(y, eager), f"call {seed}: the CUDA graph's result differs from the eager call's"
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor skipped the CUDA graph"
