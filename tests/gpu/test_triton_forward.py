"""The Triton forward on a GPU against the float64 oracle (DESIGN.md section 1).

Relative error ``|y - ref| / |ref|`` <= 1e-2 for bf16/fp16 and <= 1e-4 for fp32, never NaN, over head dims,
degrees, lengths (1 to 65535, odd tails), GQA, gates (per kv head and per query head), key validity, decode
(Tq = 1), prefill against a cache (Tq < Tk), non-causal, non-contiguous inputs and |q|, |k| up to 1e2. For long
sequences the oracle runs on blocks of query rows (a causal row block [r0, r1) needs keys [0, r1 + Tk - Tq)).
Outputs are poisoned with NaN before each call, so an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from retention_compile import codegen
from retention_compile.codegen import forward, replays
from retention_compile.codegen.forward import kernel_spec, triton_forward, triton_supports
from retention_compile.planning import Plan
from retention_compile.reference import power_retention_reference

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# The denominator of a bf16 deg-2 call that no backward follows (``check``'s calls): its unmasked blocks' weights are
# packed bf16 products (``KernelSpec.packed_squares``) rounded up to five unit roundoffs u = 2^-9 apart from the
# float32 weight, gated (x rounded: 2u on x^2, the square, the key's factor, their product), 9.8e-3; a row whose
# denominator is one such weight (|q|, |k| ~ 1e2 under a gate of -1.67 per key) reads that, plus G's float32 rounding
# at |G| ~ 5000: 1.00e-2 on the H200 once (span-105, quadratic, session 60). A CPU emulation of the rounding chain
# (benchmarks/denominator_rounding.py, 6 seeds, one head) reads 4.8e-3 to 8.9e-3, and 3.6e-3 to 3.8e-3 with float32
# squares. y is not affected the same way: it divides the sums of the same rounded weights.
PACKED_DENOMINATOR_TOL = 1.5e-2
ORACLE_ROWS = 512  # query rows per oracle block
ORACLE_BLOCKS = 3  # long sequences: first, middle and last row blocks


def oracle(q, k, v, *, scale, deg, log_gate, causal, valid, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (y, denom) of query rows ``rows``, straight from the contract (y via the project's oracle)."""
    Tq, Tk = q.shape[2], k.shape[2]
    stop = min(Tk, rows.stop + Tk - Tq) if causal else Tk
    if stop <= 0:
        shape = (q.shape[0], q.shape[1], len(rows))
        return torch.zeros(*shape, v.shape[-1], dtype=torch.float64, device=q.device), torch.full(
            shape, 1e-6, dtype=torch.float64, device=q.device
        )
    qb = q[:, :, rows.start : rows.stop].double()
    kb, vb = k[:, :, :stop].double(), v[:, :, :stop].double()
    gate = None if log_gate is None else log_gate[..., :stop].double()
    keep = None if valid is None else valid[:, :stop]
    y = power_retention_reference(qb, kb, vb, scale=scale, deg=deg, log_gate=gate, causal=causal, valid=keep)
    # the oracle's y for v = 1 and eps = E is Z / (Z + E); with E far above every Z, Z = E y / (1 - y) is exact
    # to float64 rounding
    big = 1e30
    frac = power_retention_reference(
        qb, kb, torch.ones_like(vb[..., :1]), scale=scale, deg=deg, log_gate=gate, causal=causal, valid=keep, eps=big
    )[..., 0]
    return y, big * frac / (1 - frac) + 1e-6


def row_blocks(Tq: int) -> list[range]:
    if Tq <= ORACLE_ROWS * ORACLE_BLOCKS:
        return [range(r, min(r + ORACLE_ROWS, Tq)) for r in range(0, Tq, ORACLE_ROWS)]
    mid = (Tq // 2) - ORACLE_ROWS // 2
    return [range(0, ORACLE_ROWS), range(mid, mid + ORACLE_ROWS), range(Tq - ORACLE_ROWS, Tq)]


def make_inputs(B, Hq, Hk, Tq, Tk, d, e, dtype, *, gate_heads=0, has_valid=False, magnitude=1.0, transposed=False):
    dev = "cuda"

    def randn(b, h, t, x):
        if transposed:  # (B, T, H, x) storage seen through SDPA's (B, H, T, x) layout
            return (torch.randn(b, t, h, x, device=dev) * magnitude).to(dtype).transpose(1, 2)
        return (torch.randn(b, h, t, x, device=dev) * magnitude).to(dtype)

    q, k, v = randn(B, Hq, Tq, d), randn(B, Hk, Tk, d), randn(B, Hk, Tk, e)
    gate = -0.05 * torch.rand(B, gate_heads, Tk, device=dev) if gate_heads else None
    valid = torch.rand(B, Tk, device=dev) > 0.2 if has_valid else None
    if valid is not None:
        valid[:, -1] = True  # keep the last rows' denominators away from eps
    return q, k, v, gate, valid


def check(q, k, v, gate, valid, *, deg, causal, plan, scale=None, segments=None) -> None:
    d = q.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    assert triton_supports(q, k, v, deg, gate, valid, causal) is None
    y, den = triton_forward(
        q, k, v, scale=scale, deg=deg, log_gate=gate, causal=causal, valid=valid, plan=plan, segments=segments
    )
    torch.cuda.synchronize()
    assert y.dtype == torch.float32 and den.dtype == torch.float32
    assert not y.isnan().any() and not den.isnan().any(), "NaN in the output"
    assert torch.isfinite(y).all() and torch.isfinite(den).all()
    tol = TOL[q.dtype]
    den_tol = PACKED_DENOMINATOR_TOL if deg == 2 and q.dtype == torch.bfloat16 else tol
    for rows in row_blocks(q.shape[2]):
        ref_y, ref_den = oracle(q, k, v, scale=scale, deg=deg, log_gate=gate, causal=causal, valid=valid, rows=rows)
        got_y, got_den = y[:, :, rows.start : rows.stop].double(), den[:, :, rows.start : rows.stop].double()
        err = (got_y - ref_y).norm() / ref_y.norm().clamp_min(1e-300)
        assert err <= tol, f"rows {rows}: relative error of y {err:.2e} > {tol}"
        den_err = ((got_den - ref_den).abs() / ref_den).max()
        assert den_err <= den_tol, f"rows {rows}: relative error of denom {den_err:.2e} > {den_tol}"


CHUNK = Plan(chunk_size=256, block_t=64, block_feature=16, block_e=64)
SMALL_CHUNK = Plan(chunk_size=64, block_t=64, block_feature=16, block_e=64)
QUADRATIC = Plan(chunk_size=1 << 20, block_t=64, block_e=64)

# (B, Hq, Hk, Tq, Tk, d, e, deg, dtype, gate heads: 0 none / "k" / "q", valid, causal, plan)
bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
CASES = {
    # lengths, deg 2 (chunked past one chunk) and deg 4 (quadratic), d = 64
    **{f"T{T}-deg{p}": (1, 4, 1, T, T, 64, 64, p, bf16, "k", False, True, CHUNK) for T in (1, 17, 1000, 4096)
       for p in (2, 4)},
    "T65535-deg2": (1, 2, 1, 65535, 65535, 64, 64, 2, bf16, "k", True, True, Plan(chunk_size=1024, block_t=128)),
    "T65535-deg4": (1, 1, 1, 65535, 65535, 64, 64, 4, bf16, "k", False, True, QUADRATIC),
    # head dims
    **{f"d{d}-deg{p}": (2, 4, 4, 1000, 1000, d, d, p, bf16, "k", True, True, CHUNK) for d in (32, 128) for p in (2, 4)},
    "d128-e64-noncontiguous": (1, 4, 2, 777, 777, 128, 64, 2, f16, "q", False, True, SMALL_CHUNK),
    # GQA, gates, validity
    "mha-nogate-valid": (2, 4, 4, 1000, 1000, 64, 64, 2, bf16, 0, True, True, SMALL_CHUNK),
    "gqa-query-head-gate": (1, 4, 1, 1000, 1000, 64, 64, 2, bf16, "q", True, True, SMALL_CHUNK),
    "gqa-query-head-gate-deg4": (1, 4, 1, 1000, 1000, 64, 64, 4, bf16, "q", True, True, QUADRATIC),
    "gqa-nogate-deg4-valid": (2, 4, 1, 1000, 1000, 32, 32, 4, f16, 0, True, True, QUADRATIC),
    # decode and prefill against a cache, bottom-right aligned
    "decode-deg2": (2, 4, 1, 1, 5000, 64, 64, 2, bf16, "k", True, True, CHUNK),
    "decode-deg4": (2, 4, 1, 1, 5000, 64, 64, 4, bf16, "k", False, True, QUADRATIC),
    "decode-deg2-quadratic": (1, 4, 4, 1, 5000, 64, 64, 2, f16, 0, False, True, QUADRATIC),
    "prefill-cache": (1, 4, 1, 700, 4000, 64, 64, 2, bf16, "k", True, True, CHUNK),
    # non-causal
    "noncausal-deg2": (1, 4, 1, 1000, 3000, 64, 64, 2, bf16, 0, True, False, CHUNK),
    "noncausal-deg2-quadratic": (1, 4, 4, 1000, 1000, 64, 64, 2, f16, 0, False, False, QUADRATIC),
    "noncausal-deg4": (1, 4, 1, 333, 2000, 32, 32, 4, bf16, 0, True, False, QUADRATIC),
    # float32 (exact fp32 products): the 1e-4 bar
    "fp32-chunked": (1, 4, 2, 1000, 1000, 64, 64, 2, f32, "k", True, True, SMALL_CHUNK),
    "fp32-quadratic-deg4": (1, 2, 1, 1000, 1000, 32, 32, 4, f32, "k", True, True, QUADRATIC),
    "fp32-decode": (1, 4, 1, 1, 5000, 64, 64, 2, f32, "k", False, True, CHUNK),
    # tiles past the 227 KB of shared memory until fitted (OutOfResources in the GPU fuzz of 2026-11-29: 240 KB, 448 KB)
    "fp32-d96-noncausal-fitted": (2, 6, 3, 535, 473, 96, 64, 2, f32, 0, False, False,
                                  Plan(chunk_size=32, block_t=64, block_e=64, num_warps=8, num_stages=3)),
    "fp32-d48-e128-decode-fitted": (3, 6, 3, 1, 1014, 48, 128, 2, f32, "k", True, True,
                                    Plan(chunk_size=32, block_t=128, block_e=128, num_warps=8, num_stages=3)),
}  # fmt: skip


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_oracle(name: str) -> None:
    B, Hq, Hk, Tq, Tk, d, e, deg, dtype, gate, has_valid, causal, plan = CASES[name]
    gate_heads = {0: 0, "k": Hk, "q": Hq}[gate]
    q, k, v, g, valid = make_inputs(
        B, Hq, Hk, Tq, Tk, d, e, dtype, gate_heads=gate_heads, has_valid=has_valid,
        transposed="noncontiguous" in name,
    )  # fmt: skip
    check(q, k, v, g, valid, deg=deg, causal=causal, plan=plan)


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("segments", [1, 3, 7])
def test_segments_do_not_change_results(segments: int) -> None:
    q, k, v, g, valid = make_inputs(1, 2, 1, 3000, 3000, 64, 64, bf16, gate_heads=1, has_valid=True)
    check(q, k, v, g, valid, deg=2, causal=True, plan=SMALL_CHUNK, segments=segments)


@pytest.mark.parametrize("dtype", [f16, bf16])
@pytest.mark.parametrize("e", [1, 8, 16])
def test_narrow_values(e: int, dtype: torch.dtype) -> None:
    """e <= 16, 64 rows, 4 warps, 2 stages, the tiles with which Triton 3.6 miscompiled the float16 quadratic kernel
    (16-column value tiles: illegal address for e = 1 and 8, relative error 6.6 for e = 16 on the H200). float16
    now runs the float32 kernels (``forward.kernel_inputs``) and value tiles are at least 32 columns
    (``MIN_VALUE_TILE``); this checks both dtypes' narrow values against the oracle."""
    q, k, v, gate, valid = make_inputs(2, 8, 2, 100, 100, 24, e, dtype, gate_heads=2, has_valid=True, transposed=True)
    plan = Plan(chunk_size=1 << 20, block_t=64, block_e=64, num_warps=4, num_stages=2)
    check(q, k, v, gate, valid, deg=2, causal=True, plan=plan)


@pytest.mark.parametrize("dtype", [bf16, f16])
@pytest.mark.parametrize("deg", [2, 4])
def test_large_inputs_stay_finite(dtype: torch.dtype, deg: int) -> None:
    """|q|, |k| entries ~ 1e2: (s q.k)^4 reaches ~1e19, beyond fp16; the kernels keep it in fp32 / bf16 range."""
    q, k, v, g, _ = make_inputs(1, 2, 1, 2000, 2000, 64, 64, dtype, gate_heads=1, magnitude=100.0)
    plan = CHUNK if deg == 2 else QUADRATIC
    check(q, k, v, g, None, deg=deg, causal=True, plan=plan)


# the nats G falls over one row block's masked keys in the query kernel (G_first - G_last); None: a cliff, 15 nats
# over the first row block, then -10 per key
GATE_SPANS = {"span-15.9": 15.9, "span-16.5": 16.5, "span-105": 105.0, "cliff": None}


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("magnitude", [1.0, 100.0])
@pytest.mark.parametrize("path", ["chunked", "quadratic"])
@pytest.mark.parametrize("name", list(GATE_SPANS))
def test_gate_spans_and_cliffs(name: str, path: str, magnitude: float) -> None:
    """Constant log-gates whose span over the query kernel's row block (128 rows chunked, 64 quadratic) is just
    under, just over or far over 16 nats, and a cliff after the first row block, with |q|, |k| ~ 1 and ~ 1e2: the
    diagonal key blocks' exp(G_i - G_j) = inf for keys after the row never reaches y, and y matches the oracle."""
    T = 3000
    plan = Plan(chunk_size=1024, block_t=128) if path == "chunked" else QUADRATIC
    rows = forward.NARROW_QUERY_LAUNCH.rows if path == "chunked" else QUADRATIC.block_t
    q, k, v, _, _ = make_inputs(1, 2, 1, T, T, 64, 64, bf16, magnitude=magnitude)
    span = GATE_SPANS[name]
    if span is None:
        gate = torch.cat([torch.full((rows,), -15.0 / (rows - 1)), torch.full((T - rows,), -10.0)])
    else:
        gate = torch.full((T,), -span / (rows - 1))
    check(q, k, v, gate.view(1, 1, T).cuda(), None, deg=2, causal=True, plan=plan)


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize(
    ("dtype", "plan"), [(bf16, Plan(chunk_size=1024, block_t=128)), (bf16, QUADRATIC), (f32, SMALL_CHUNK)]
)
def test_document_resets(dtype: torch.dtype, plan: Plan) -> None:
    """Hard resets (log-gate -inf: documents packed in one sequence) at a chunk's first key, mid-chunk and past the
    middle: y within the bound, never NaN (before ``gates.log_gate_floor``, G differences of -inf - -inf)."""
    q, k, v, gate, _ = make_inputs(1, 2, 1, 4096, 4096, 64, 64, dtype, gate_heads=1)
    gate[..., [1024, 1500, 3001]] = float("-inf")
    check(q, k, v, gate, None, deg=2, causal=True, plan=plan)


# (B, Hq, Hk, Tq, Tk, d, e, deg, dtype, gate heads: 0 none / "k" / "q", valid, causal, y dtype, SDPA's layout):
# quadratic-path calls, then chunked ones (``CHUNKED_REPLAYS``)
REPLAY_CASES = {
    "bf16-gqa-gate-valid": (1, 4, 2, 1000, 1000, 64, 64, 2, bf16, "k", True, True, f32, False),
    "fp16-widened-query-head-gate": (2, 4, 4, 300, 300, 32, 32, 2, f16, "q", False, True, f32, False),
    "fp32-noncausal-valid": (1, 2, 1, 500, 500, 64, 48, 2, f32, 0, True, False, f32, False),
    "bf16-deg4": (1, 2, 2, 777, 777, 64, 64, 4, bf16, 0, False, True, f32, False),
    # as the op's eager body calls it with nothing kept for a backward: y in the inputs' dtype
    "bf16-sdpa-layout-y-bf16": (1, 8, 8, 2048, 2048, 64, 64, 2, bf16, "k", False, True, bf16, True),
    "bf16-rows-before-the-first-key": (1, 4, 1, 300, 200, 64, 64, 2, bf16, "q", True, True, bf16, False),
    "chunked-cuda-state-gated": (1, 8, 8, 8192, 8192, 64, 64, 2, bf16, "k", False, True, bf16, True),
    "chunked-cuda-state-gqa-valid-query-head-gate": (2, 4, 2, 2500, 2500, 64, 64, 2, bf16, "q", True, True, f32, False),
    "chunked-triton-state-gqa-valid": (1, 4, 2, 3000, 3000, 64, 64, 2, bf16, "k", True, True, bf16, False),
    "chunked-fp16-widened-noncausal": (1, 2, 2, 1500, 1500, 32, 32, 2, f16, 0, False, False, f32, False),
    "chunked-cuda-state-noncausal-valid": (1, 2, 2, 2100, 2100, 64, 64, 2, bf16, 0, True, False, f32, False),
    # bf16 with chunks under 64 keys runs the float32 kernels on float32 copies (forward.small_chunk_float32)
    "chunked-bf16-short-chunks-widened": (1, 2, 1, 300, 300, 64, 64, 2, bf16, "k", False, True, f32, False),
}  # fmt: skip
# the chunked cases: (plan, state kernel: "cuda" or Triton's)
CHUNKED_REPLAYS = {
    "chunked-cuda-state-gated": (Plan(chunk_size=1024, block_t=128, block_feature=16, block_e=64), "cuda"),
    "chunked-cuda-state-gqa-valid-query-head-gate": (Plan(chunk_size=512, block_t=64, block_e=64), "cuda"),
    "chunked-triton-state-gqa-valid": (Plan(chunk_size=512, block_t=64, block_e=64), "triton"),
    "chunked-fp16-widened-noncausal": (CHUNK, "triton"),
    "chunked-cuda-state-noncausal-valid": (Plan(chunk_size=512, block_t=64, block_e=64), "cuda"),
    "chunked-bf16-short-chunks-widened": (Plan(chunk_size=16, block_t=16, block_e=64), "triton"),
}


def replayed_call(name: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_forward`` on case ``name``'s path: the quadratic kernel, or the chunked kernels with the state
    kernel ``CHUNKED_REPLAYS`` names."""
    from retention_compile.codegen.cuda_state import CudaStateHook

    d, _, deg, _, _, _, causal, y_dtype, _ = REPLAY_CASES[name][5:]
    plan, state = CHUNKED_REPLAYS.get(name, (QUADRATIC, "triton"))
    q, k, v, gate, valid = inputs
    options = dict(scale=d**-0.5, deg=deg, log_gate=gate, causal=causal, valid=valid, plan=plan)
    hook = CudaStateHook() if state == "cuda" else None
    return triton_forward(q, k, v, **options, y_dtype=y_dtype, state_kernel=hook)


def replay_inputs(name: str, offset: int = 0) -> tuple:
    """Fresh random inputs of case ``name``; ``offset`` > 0 moves q that many elements past an aligned address."""
    B, Hq, Hk, Tq, Tk, d, e, _, dtype, gate, has_valid, _, _, transposed = REPLAY_CASES[name]
    gate_heads = {0: 0, "k": Hk, "q": Hq}[gate]
    q, k, v, g, valid = make_inputs(
        B, Hq, Hk, Tq, Tk, d, e, dtype, gate_heads=gate_heads, has_valid=has_valid, transposed=transposed
    )
    if offset:
        moved = torch.empty(q.numel() + offset, dtype=q.dtype, device=q.device)[offset:].view(q.shape)
        q = moved.copy_(q)
    return q, k, v, g, valid


def assert_same(replayed: tuple, planned: tuple) -> None:
    torch.cuda.synchronize()
    assert not replayed[0].isnan().any() and not replayed[1].isnan().any()
    assert torch.equal(replayed[0], planned[0]) and torch.equal(replayed[1], planned[1])


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("name", list(REPLAY_CASES))
def test_repeated_eager_calls_replay_the_first_calls_launches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager call (launches straight to Triton, as in the op's body) keeps its launches: the quadratic kernel's,
    or the gate cumsum, state kernel (Triton's or the CUDA one), scan and query kernel of the chunked path; a later
    call with the same key repeats them with its own tensors and freshly allocated state buffers, without planning
    (``call_shape_class`` is not called), and returns exactly what the planned path returns for those tensors."""
    from torch._library.triton import set_wrap_triton_enabled

    first, second = replay_inputs(name), replay_inputs(name)
    real_shape_class = forward.call_shape_class
    with set_wrap_triton_enabled(False):
        replayed_call(name, first)
        assert len(replays._KEPT) == 1
        monkeypatch.setattr(forward, "call_shape_class", lambda *args: pytest.fail("a repeated call was planned"))
        replayed = replayed_call(name, second)
    monkeypatch.setattr(forward, "call_shape_class", real_shape_class)
    assert_same(replayed, replayed_call(name, second))  # wrap_triton enabled: the planned path, nothing replayed


@pytest.mark.usefixtures("poison_allocations")
def test_an_unaligned_input_is_planned_again() -> None:
    """Triton specializes pointers on 16-byte alignment: q two bytes past an aligned address is a new key, planned
    (and kept) on its own, and right."""
    from torch._library.triton import set_wrap_triton_enabled

    name = "bf16-gqa-gate-valid"
    moved = replay_inputs(name, offset=1)
    with set_wrap_triton_enabled(False):
        replayed_call(name, replay_inputs(name))
        replayed = replayed_call(name, moved)
    assert len(replays._KEPT) == 2
    assert_same(replayed, replayed_call(name, moved))


@pytest.mark.parametrize("name", ["bf16-sdpa-layout-y-bf16", "chunked-cuda-state-gated"])
def test_a_replay_launches_on_the_current_stream(name: str) -> None:
    """A repeated call made on a side stream runs there (its outputs are ready once that stream is): the Triton
    launches and the CUDA state kernel's."""
    from torch._library.triton import set_wrap_triton_enabled

    first, second = replay_inputs(name), replay_inputs(name)
    side = torch.cuda.Stream()
    with set_wrap_triton_enabled(False):
        replayed_call(name, first)
        torch.cuda.synchronize()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(10_000_000)  # the side stream is busy: a launch on the default one would finish first
            replayed = replayed_call(name, second)
            done = torch.cuda.Event()
            done.record(side)
    assert not done.query()  # still queued behind the sleep on the side stream
    side.synchronize()
    assert_same(replayed, replayed_call(name, second))


def test_the_public_eager_call_replays_and_matches_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rc.power_retention`` under ``torch.no_grad``, twice: the second call is replayed and bitwise what the op
    computes with nothing kept (every call planned)."""
    import retention_compile as rc

    q, k, v, gate, _ = replay_inputs("bf16-sdpa-layout-y-bf16")
    chunk = 1 << 20  # one chunk: the quadratic path
    with torch.no_grad():
        rc.power_retention(q, k, v, log_gate=gate, chunk_size=chunk)
        kept = len(replays._KEPT)
        with monkeypatch.context() as patched:  # the route holds the launches: the repeat skips triton_forward
            patched.setattr(codegen, "triton_forward", lambda *args, **kwargs: pytest.fail("not replayed by the route"))
            y = rc.power_retention(q, k, v, log_gate=gate, chunk_size=chunk)
    assert kept == 2 and len(replays._KEPT) == 2  # the call's route (ops._route) and its launches
    monkeypatch.setattr(replays, "MAX_KEPT", 0)
    planned = torch.ops.retention_compile.power_retention(q, k, v, gate, None, 0.125, 2, True, chunk, "auto", False)
    torch.cuda.synchronize()
    assert y.dtype == q.dtype and torch.equal(y, planned[0])


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_the_public_eager_chunked_call_replays_and_matches_the_op(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same at T=8192 gated with chunks of 1024 (the chunked path, host-bound on the H200's host before its
    launches were kept), with either state kernel; and right against the float64 oracle."""
    import retention_compile as rc
    from retention_compile import ops

    q, k, v, gate, _ = replay_inputs("chunked-cuda-state-gated")
    with torch.no_grad():
        rc.power_retention(q, k, v, log_gate=gate, chunk_size=1024, impl=impl)
        with monkeypatch.context() as patched:  # the call's route is kept too: no planning on the repeat
            patched.setattr(ops, "resolve_plan", lambda *args: pytest.fail("a repeated call was planned"))
            patched.setattr(codegen, "triton_forward", lambda *args, **kwargs: pytest.fail("not replayed by the route"))
            y = rc.power_retention(q, k, v, log_gate=gate, chunk_size=1024, impl=impl)
    assert len(replays._KEPT) == 2  # the route and the launches
    monkeypatch.setattr(replays, "MAX_KEPT", 0)
    planned = torch.ops.retention_compile.power_retention(q, k, v, gate, None, 0.125, 2, True, 1024, impl, False)
    torch.cuda.synchronize()
    assert y.dtype == q.dtype and torch.equal(y, planned[0])
    rows = range(8192 - ORACLE_ROWS, 8192)
    ref, _ = oracle(q, k, v, scale=0.125, deg=2, log_gate=gate, causal=True, valid=None, rows=rows)
    last = y[:, :, rows.start :].double()
    assert ((last - ref).norm() / ref.norm()).item() <= TOL[torch.bfloat16]


def test_odd_tail_and_chunk_choice() -> None:
    """A length that is no multiple of anything: masked tails, no padding; the chunked path is taken."""
    q, k, v, g, _ = make_inputs(1, 2, 2, 12345, 12345, 64, 64, bf16, gate_heads=2)
    plan = Plan(chunk_size=512, block_t=128)
    assert kernel_spec(q, v, 2, True, False, True, 12345, plan).chunked
    check(q, k, v, g, None, deg=2, causal=True, plan=plan)


def test_inside_triton_op_and_compile() -> None:
    """Called from a triton_op body, the kernels appear in Inductor's output code; dynamic T compiles once."""
    from torch._inductor.utils import run_and_get_code
    from torch.library import triton_op

    @triton_op("retention_compile_test::forward", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_forward(q, k, v, scale=0.125, deg=2, log_gate=None, causal=True, valid=None, plan=CHUNK)

    def model(q, k, v):
        return forward(q * 1.0, k, v)[0] + 1.0

    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    for T in (1000, 1500):
        q, k, v, _, _ = make_inputs(1, 4, 1, T, T, 64, 64, bf16)
        out, code = run_and_get_code(compiled, q, k, v)
        expected = triton_forward(q, k, v, scale=0.125, deg=2, log_gate=None, causal=True, valid=None, plan=CHUNK)
        torch.testing.assert_close(out, expected[0] + 1.0, rtol=2e-2, atol=2e-2)
    text = "\n".join(code)
    for kernel in ("attention_kernel", "state_kernel"):
        assert kernel in text, f"{kernel} not in Inductor's output code"


def test_dynamic_lengths_compile_at_most_twice() -> None:
    """``backend="retention"`` with ``dynamic=True``, first called short (the plan at that hint takes one chunk, the
    quadratic kernel): ``ops.resolve_plan`` guards the length at ``planning.single_chunk_limit``, so longer inputs
    recompile once, with chunks, and every later length reuses one of the two graphs (before session 65 a graph traced
    short ran the quadratic kernel, O(T^2), at every length). Outputs against the eager op at each length."""
    import torch.nn.functional as F

    import retention_compile as rc
    from retention_compile.backend import collect_reports

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="retention", dynamic=True)
    with collect_reports() as report, torch.no_grad():
        for T in (1000, 1500, 5000, 12345, 1200):
            q, k, v, _, _ = make_inputs(1, 4, 4, T, T, 64, 64, torch.bfloat16)
            got, expected = compiled(q, k, v), rc.power_retention(q, k, v, causal=True)
            error = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
            assert float(error) <= TOL[torch.bfloat16], (T, float(error))
    assert report.graphs <= 2 and all(site.decision == "rewritten" for site in report.sites), report.summary()


def test_the_op_compiled_with_dynamic_shapes() -> None:
    """``rc.power_retention`` called directly in a function compiled with ``dynamic=True`` (no rewrite: Dynamo runs
    the op on fake tensors with every size symbolic), first at T=1000 (one chunk), then at 65536 (chunked, the CUDA
    state kernel where it is faster), then at d = 128 (the graph is specialized on d and e, whose values the kernels'
    sources are written for: a recompile, not d = 64 kernels on d = 128 inputs): the outputs are the eager op's; and a
    backward at T=5000 gives the eager op's gradients. The scale is passed and e differs from d, so that nothing
    outside the op's body guards d (a default scale would, 1/sqrt(d), and so would d == e). (``backend="retention"``
    takes another way, ``test_dynamic_lengths_compile_at_most_twice``; session 67 found the chunked recompile failing
    on the state kernel's spec holding a SymInt.)"""
    import retention_compile as rc

    def attention(q, k, v, gate):
        return rc.power_retention(q, k, v, log_gate=gate, causal=True, scale=0.125)

    def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
        return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for T, d in ((1000, 64), (65536, 64), (5000, 128)):
            q, k, v, gate, _ = make_inputs(1, 2, 2, T, T, d, 32, torch.bfloat16, gate_heads=2)
            error = relative_error(compiled(q, k, v, gate), attention(q, k, v, gate))
            assert error <= TOL[torch.bfloat16], (T, d, error)
    inputs = [t.requires_grad_() for t in make_inputs(1, 2, 2, 5000, 5000, 64, 32, torch.bfloat16, gate_heads=2)[:4]]
    dy = torch.randn(1, 2, 5000, 32, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad(compiled(*inputs), inputs, dy)
    expected = torch.autograd.grad(attention(*inputs), inputs, dy)
    for name, g, e in zip("qkvg", got, expected):
        assert relative_error(g, e) <= TOL[torch.bfloat16], (name, relative_error(g, e))


def test_a_mask_passed_in_with_documents_and_padding() -> None:
    """A 4-D mask passed in, causal within documents (packed sequences) with left padding, compiled with
    ``backend="retention"`` at T=5000 (the chunked kernels): the rewrite reads each call's valid keys and document
    starts from its mask (a log-gate of -inf at each start), and its output is the eager op's with that ``valid``
    and gate, at two layouts of documents with no recompile. (A mask that fails the run-time check is a device-side
    assert on CUDA, which ends the process's CUDA context: the CPU tests check that it raises.)"""
    import torch.nn.functional as F

    import retention_compile as rc
    from retention_compile.backend import collect_reports

    T = 5000

    def mask_of(starts: list[list[int]], pads: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = torch.zeros(2, T, dtype=torch.bool, device="cuda")
        for row, keys in enumerate(starts):
            first[row, [0, *keys]] = True
        document = first.long().cumsum(-1)
        valid = torch.arange(T, device="cuda")[None, :] >= torch.tensor(pads, device="cuda")[:, None]
        causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
        mask = causal & (document[:, :, None] == document[:, None, :]) & valid[:, None, :]
        gate = torch.where(first, -math.inf, 0.0)[:, None, :].expand(2, 4, T).contiguous()
        return mask[:, None], valid, gate

    def attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="retention")
    q, k, v, _, _ = make_inputs(2, 4, 4, T, T, 64, 64, torch.bfloat16)
    with collect_reports() as report, torch.no_grad():
        for starts, pads in (([[1200, 3000], [4100]], [0, 700]), ([[17], [2500, 2501]], [300, 0])):
            mask, valid, gate = mask_of(starts, pads)
            got = compiled(q, k, v, mask)
            expected = rc.power_retention(q, k, v, log_gate=gate, valid=valid, causal=True)
            error = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
            assert float(error) <= TOL[torch.bfloat16], (starts, pads, float(error))
    assert [s.becomes for s in report.sites] == ["causal retention within documents"], report.summary()


def test_flex_attention_with_a_causal_block_mask() -> None:
    """``flex_attention(q, k, v, block_mask=create_block_mask(causal))`` compiled with ``backend="retention"`` at
    T=4096 bf16: rewritten as causal retention (its block tensors checked at every call), the output the eager op's
    and the gradients of q, k, v the eager op's (flex_attention takes gradients on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import retention_compile as rc
    from retention_compile.backend import collect_reports

    T = 4096
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    q, k, v, _, _ = make_inputs(1, 4, 4, T, T, 64, 64, torch.bfloat16)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    exact = [x.detach().requires_grad_() for x in (q, k, v)]
    torch._dynamo.reset()
    with collect_reports() as report:
        got = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), backend="retention")(
            *leaves
        )
    assert [s.becomes for s in report.sites] == ["causal retention"], report.summary()
    expected = rc.power_retention(*exact, causal=True)
    error = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert float(error) <= TOL[torch.bfloat16], float(error)
    weights = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), leaves), torch.autograd.grad((expected * weights).sum(), exact)
    ):
        assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("T", [700, 5000])
def test_forward_without_a_backward_stores_y_alone(T: int) -> None:
    """``power_retention`` under ``torch.no_grad`` (the op's ``for_backward=False``: y stored in bf16 alone, no
    float32 y, no kept states), eager and compiled: y within the oracle's tolerance and near the one of the forward
    that keeps them (not bitwise since session 55: without a backward, deg 2 squares in packed bf16,
    ``KernelSpec.packed_squares``); T = 700 runs the quadratic kernel, 5000 the chunked one. The compiled call is
    bitwise the eager one: since session 53 both take ``forward.NARROW_QUERY_LAUNCH`` (uncapped, as Inductor's
    launch drops ``maxnreg``). Before, the compiled chunked call ran another launch (until 2026-12-03 64-row blocks,
    whose gated unmasked keys take another row's G as their reference, so their weights rounded differently)."""
    import retention_compile as rc

    q, k, v, g, _ = make_inputs(1, 4, 2, T, T, 64, 64, bf16, gate_heads=2)
    args = (g, None, 0.125, 2, True, 1024, "triton")
    kept = torch.ops.retention_compile.power_retention(q, k, v, *args)
    bare = torch.ops.retention_compile.power_retention(q, k, v, *args, False)
    assert kept[4].numel() > 0 and all(t.numel() == 0 for t in bare[2:])
    assert bare[0].dtype == bf16
    assert float((bare[0].double() - kept[0].double()).norm() / kept[0].double().norm()) < 5e-3
    assert float(((bare[1].double() - kept[1].double()).abs() / kept[1].double()).max()) < 5e-3
    with torch.no_grad():
        options = {"scale": 0.125, "log_gate": g, "chunk_size": 1024, "impl": "triton"}
        compiled = torch.compile(lambda *x: rc.power_retention(*x, **options))(q, k, v)
    assert torch.equal(compiled, bare[0])
    rows = row_blocks(T)[-1]
    want, _ = oracle(q, k, v, scale=0.125, deg=2, log_gate=g, causal=True, valid=None, rows=rows)
    for y in (bare[0], compiled):
        got = y[:, :, rows.start : rows.stop].double()
        assert float((got - want).norm() / want.norm()) < TOL[bf16]


@pytest.mark.parametrize("T", [700, 5000])
def test_packed_squares_only_where_no_backward_follows(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The query kernel squares in packed bf16 (``KernelSpec.packed_squares``) in a forward no backward follows; with
    ``for_backward`` or ``states_out`` (the backward takes y and denom as sums of its own float32 squares) it does
    not. Each y is within the oracle's tolerance."""
    loaded = []
    real = forward.load_forward

    def spy(spec):
        loaded.append(spec)
        return real(spec)

    monkeypatch.setattr(forward, "load_forward", spy)
    replays.clear()  # a kept call would load nothing
    q, k, v, g, _ = make_inputs(1, 4, 2, T, T, 64, 64, bf16, gate_heads=2)
    plan = Plan(chunk_size=1024, block_t=128)  # T = 700: the quadratic kernel alone; 5000: chunked
    options = {"scale": 0.125, "deg": 2, "log_gate": g, "causal": True, "valid": None, "plan": plan}
    rows = row_blocks(T)[-1]
    want, _ = oracle(q, k, v, **{n: options[n] for n in ("scale", "deg", "log_gate", "causal", "valid")}, rows=rows)
    for extra, packed in (({}, True), ({"for_backward": True}, False), ({"states_out": {}}, False)):
        loaded.clear()
        y, _ = triton_forward(q, k, v, **options, **extra)
        assert loaded[-1].packed_squares == packed, extra  # the query kernel's module is loaded last
        assert not loaded[0].packed_squares  # the gate's and the state kernels' module is the same either way
        got = y[:, :, rows.start : rows.stop].double()
        assert float((got - want).norm() / want.norm()) < TOL[bf16], extra
