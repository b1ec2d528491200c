"""The Triton forward of power retention (DESIGN.md section 1), launched through ``wrap_triton``.

    triton_supports(q, k, v, deg, log_gate, valid, causal) -> None | reason
    triton_forward(q, k, v, *, scale, deg, log_gate, causal, valid, plan, for_backward=False) -> (y, denom)

Same contract as ``chunked.chunked_forward``: y (B, Hq, Tq, e) in q's dtype, denom (B, Hq, Tq) float32
``= sum_j w_ij + eps``. Written to run inside a ``torch.library.triton_op`` body: outputs come from
``torch.empty``, kernels are launched with ``wrap_triton(kernel)[grid](...)`` (so Inductor copies them into
its output code), there is no host sync, and sizes may be symbolic (decisions that only change speed read
the size hint and add no guard).

Two paths (the Plan's chunk size picks; the numbers do not depend on it):

quadratic (deg != 2, or ``chunk_size >= Tk``): one kernel, flash-style but with no softmax. A program owns
``block_t`` query rows and walks their admissible keys in blocks of ``block_k``:

    acc += ((s q K^T)^p * exp(G_i - G_j) * mask) V,   den += row sums,   y = acc / (den + eps)

At p = 2 the loops weigh (q K^T)^2 and s^2 multiplies acc and den once per row after them (den + eps after the
scaling); at p >= 4 the scale goes into q K^T before the power, which keeps (s q.k)^p's range. The weights are
positive and at most (s |q| |k|)^p (times s^-2 at p = 2): with fp32 accumulation and bf16 (fp32-range) operands for
the second product, |q|, |k| ~ 1e2 stay finite even for p = 6, so no running row maximum is needed and ``denom`` is
the true sum. Blocks left of the diagonal skip the causal mask; gated, they take
``exp(G_i - G_j) = exp(G_i - G_ref) exp(G_ref - G_j)`` with ``G_ref`` the G of the block of rows' first position:
one exp per key and one per row instead of one per weight (both factors <= 1 since G never rises: a factor
underflows only where the weight does). At deg 2 in 16 bits, a forward no backward follows squares q.k in packed
bf16 in those blocks (``KernelSpec.packed_squares``); one for a backward (``for_backward``) squares in float32 and
rounds once, as the backward's own weights do.

chunked (deg 2): keys are cut into chunks of C aligned to the query grid (chunk c starts at key
``c*C - shift`` with ``shift = (Tq - Tk) mod C``, so no block of query rows straddles a chunk; the first and last
chunks are partial, nothing is padded). The symmetric state is tiled in pairs of b-coordinate blocks (2560
features for d = 64, b = 16, against D = 2080; the extra 23% buys dense b^2-wide tiles), and the normaliser
state is the d x d matrix ``M = sum_j w_j k_j k_j^T`` (``phi(q).z = q^T M q``: one small dot instead of a
reduction over 2560 features). Where the CUDA wgmma state kernel serves d = 64 and the states stay within the call,
they take the cherry layout instead (``cherries.py``: every pair of 8-coordinate groups once, 2304 features;
``writes_cherry_rows``). Three kernels:

    state    grid (segments, pairs x e-blocks, B*Hs): each program walks the chunks of one segment in order,
             accumulating its (b^2 x block_e) tile of S in fp32 registers and storing it before every chunk
             but a later segment's first (zero there: the scan writes it) (phi(K) is built in registers and shared
             memory, never in global memory); the segment's total goes to a small fp32 buffer.
    scan     (only with more than one segment) turns segment totals into true segment-start states, writes the
             decayed start state as each later segment's first chunk state and adds it into the others. The wgmma
             state kernel does this itself (``folds_segments``: each program waits for the state after the segment
             before its own, publishes its own, and folds the former into its chunk states), and no scan runs.
    query    the quadratic kernel restricted to the keys of the query's own chunk, plus
             ``exp(G_i - G_b) phi(s q_i)^T S_c`` with phi(q) built per pair in registers. Beside the wgmma state
             kernel (causal, eager: ``QUERY_BESIDE_STATES``) it is launched as that kernel's programmatic dependent,
             so its programs start in the state kernel's last round, first chunks first, each waiting until the
             state kernel's count for its head and its chunk's segment says the chunk's states are written.

Eager calls that repeat an earlier call in everything its kernels were specialized and planned on are answered by
repeating that call's compiled launches (``ForwardReplay``, ``replays``, ``eager_launch``): a short call is bound
by the host, not the GPU, and so is a gated chunked one at T=8192 (four launches) on the H200's host.

Segments exist for parallelism: one segment per (head, pair) would leave most SMs idle at small batch
(b=1, h=8, d=64: 80 programs on 132 SMs, each walking all of T). With ``n`` segments the state kernel runs
``n`` times as many programs; the price is the scan: one write of each later segment's first chunk state and
one read-modify-write of its other chunk states.
The state before each chunk is kept in the dots' dtype (bf16 for 16-bit inputs): one state per chunk.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from ..inspection import is_recording
from ..planning import EXACT_CHUNK_BELOW, Plan
from ..reference import EPS
from ..sizes import size_hint, specialized
from . import replays
from .dispatch import modelled_segment_count
from .eager_launch import DirectLaunch, direct_launches_allowed
from .fitting import (
    compiled_shared_memory,
    device_shared_memory_limit,
    fit_shared_memory,
    has_storage,
    launch_specialization,
)
from .triton_source import SCAN_BLOCK, KernelSpec, interpreting, load_forward, value_tile, with_packed_squares

QUADRATIC_BLOCK_K = 64  # keys per step of the attention loop
# Keys per step of the state kernel. H200, T=65536 gated, C=1024, 3 stages (run 3): 128 keys 1.469 ms, 64 keys
# 1.472 ms: the kernel's time is per key, not per step; 128 keys need 233 KB of shared memory for fp32 inputs.
STATE_BLOCK_S = 64
MAX_BLOCK_FEATURE = 16  # b^2 = 256 features per state tile keeps the fp32 tile in registers
MIN_BLOCK_FEATURE = 16  # tl.dot needs every dimension >= 16 (the M_IJ block is b x b)
# Wide heads (d, e >= 128): a (128 x 128) query tile with 3 stages of (64 x 128) k/v tiles asked Triton 3.6 for
# 311 KB of shared memory on the H200 (limit 227 KB, chunk_sweep run of 2026-11-29); cap rows and stages there.
# The chunked query kernel at d = e = 128 with 128 rows and 2 stages needs 232 KB (sm_90 compile), 64 rows 180 KB.
WIDE_HEAD = 128
# The chunked query kernel holds the normaliser state M (d x d, fp32) in shared memory: 64 KB at d = 128, 256 KB
# at d = 256 (over the H200's 227 KB: OutOfResources, run of 2026-11-29). Wider heads take the quadratic kernel.
MAX_CHUNKED_HEAD = 128
WIDE_BLOCK_T = 64
WIDE_STAGES = 2
MIN_BLOCK_E = 64  # narrower value blocks would recompute phi(q), the scores and phi(k) once per block
# The state kernel aims at this many programs per SM when choosing the segment count. H200, b=1 h=8 d=64
# T=65536 gated (80 programs per segment): 8 segments 3.05 ms, 16: 3.09, 7 (4 per SM): 3.21 (Triton states, session
# 23). With the CUDA wgmma state kernel (session 38, segments_NVIDIA-H200_2026-12-02_db635f0.json), forward ms
# ungated / gated: 8 segments 1.079 / 1.332, 11: 1.148 / 1.384, 13: 1.180 / 1.343, 16: 1.180 / 1.304-1.377 (the
# scan grows with the count: 0.108 -> 0.135); T=16384: 4 segments 0.320, 8: 0.313.
STATE_WAVES = 4.5
# Warps per program. The state kernel (S^T tile 64 x 256 fp32, phi tile 64 x 256) spills at 4 warps, not at 8
# (ptxas, sm_90, triton 3.6). The chunked query kernel: run 2 (fp32 features, 1 stage) transposed state product
# with 4 warps 3.05 ms in all, transposed with 8 warps 3.58, plain with 8 warps 3.73; run 3 (bf16 features,
# 3 stages), query kernel alone at T=65536 gated C=1024: 8 warps 1.046 ms, 4 warps 1.389.
STATE_WARPS = 8
# Software-pipelining depth of the state kernel's key loop: with 2 stages Triton waits for the loads issued one
# step earlier at the top of every step (its product is synchronous), so each step pays the full load latency;
# 3 stages issue them two steps ahead (TTGIR, triton 3.6, sm_90). H200 T=65536 gated (run 3): 2 stages 1.68 ms,
# 3: 1.47, 4: 1.51.
STATE_STAGES = 3
CHUNK_QUERY_WARPS = 8
SCAN_WARPS = 4
GATE_SCAN_BLOCK = 4096  # keys per program of the gate's cumsum
GATE_SCAN_PREFIX_BLOCKS = 4  # blocks of earlier keys its programs sum per step
# The chunked query kernel's state product as acc^T += S^T phi(q)^T (see the template) when True. False (phi(q) on
# the left, 16 products in flight in the TTGIR) measured faster: H200 T=65536 d=64 bf16 forward 2.09 -> 1.79 ms
# ungated, 2.14 -> 1.83 gated.
QUERY_TRANSPOSED = False
# The attention loops' denominator as a product of w with a column of ones (KernelSpec.den_dot) when True, a float32
# row sum per key block when False. The sm_90a SASS of the T=65536 launch (Triton 3.6) has 96 instructions fewer
# (FADD 94 -> 34, SHFL 12 -> 8, 8 more HGMMA, 42 more F2FP/PRMT: w is packed once per product). H200, chunk 1024,
# query kernel alone (profiler mean of 20 calls; profile_forward.py --den-dot off on, session 38): T=65536 ungated
# 0.5555 -> 0.5445 ms, gated 0.6554 -> 0.6345, T=2048 0.0294 -> 0.0262; with pairs in quarters 0.676 -> 0.639.
# The 16-bit kernels only, unless DENOMINATOR_BY_DOT_FLOAT32: in the float32 kernels (float32 inputs, float16
# widened, bf16 with short chunks) the ieee product is FMA work, and a local sm_90 compile of the chunked float32
# query kernel (Triton 3.9) spilled more with it (stores 273 -> 400 bytes, loads 385 -> 701); not timed there. The
# interpreter tests set DENOMINATOR_BY_DOT_FLOAT32 to check the product's fold against the oracle (they run float32).
DENOMINATOR_BY_DOT = True
DENOMINATOR_BY_DOT_FLOAT32 = False
# Where the wgmma state kernel folds segments, causal, eager: the query kernel is launched as its programmatic
# dependent (``KernelSpec.waits_for_states``), so that its programs run in the state kernel's last round, each once
# its chunk's segment is written. False: launched after it as any kernel. H200, b1 h8 d64 bf16, do_bench medians of 8
# alternated rounds (benchmarks/bench_query_beside_states.py at a0ef214, forward_notes.md session 59): T=16384 0.273 ->
# 0.266 ms ungated, 0.300 -> 0.296 gated (lower in 8 of 8 rounds each), T=65536 ungated 0.945 -> 0.938 (8 of 8); gated
# T=65536 1.032 -> 1.027, within the noise (the state kernel's last round has few idle SMs to give).
QUERY_BESIDE_STATES = True
# The chunked causal query kernel on wgmma (``cuda_query``) where a call can take it, eager or traced (its custom op),
# gated too where ``CUDA_QUERY_GATED``, for chunks up to ``CUDA_QUERY_MAX_CHUNK``; eager calls launch it beside the
# state kernel (``QUERY_BESIDE_STATES``). b1 h8 d64 bf16, H100 at 25c1bee (benchmarks/bench_cuda_query.py, do_bench
# medians of 3 alternated rounds, forward_notes.md session 73): T=65536 chunk 1024, query kernel Triton -> CUDA
# ungated 0.515 -> 0.496 ms, gated 0.573 -> 0.533; the whole forward ungated 0.952 -> 0.948, gated 1.066 ->
# 1.036. At chunks of 2048 (the H100's plan at T=16384) it loses: ungated 0.158 -> 0.176, the forward 0.269 -> 0.278.
CUDA_QUERY = True
CUDA_QUERY_GATED = True
CUDA_QUERY_MAX_CHUNK = 1024


@dataclass(frozen=True)
class QueryLaunch:
    """How the chunked query kernel runs where it has a launch of its own (``query_launch``): query rows per
    program, warps, copy stages, parts per pair of its state product (``KernelSpec.query_split``) and a cap on
    registers per thread (Triton's ``maxnreg``; None: no cap)."""

    rows: int
    warps: int
    stages: int
    split: int
    max_registers: int | None


# bf16 dots, d <= 64, 64 value columns per program: 128 rows on one warpgroup (4 warps, both m64 tiles sharing each
# k16 slice's B operand; 252 registers ungated, 255 gated, no stack, 76 KB: two programs per SM), 3 stages, pairs in
# halves, no register cap. H200, T=65536 b1 h8 d64 chunk 1024, the query kernel alone, ungated / gated ms:
# - cf0e29b (profile_forward.py, 2026-12-03): 0.509 / 0.582; 64 rows on 4 warps (three per SM) 0.560 / 0.624; 128
#   rows on 8 warps capped at 128 registers (the eager launch until 2026-12-03) 0.493 / 0.585;
# - 0cc4503 (session 52, the same inputs in one process, profiler means of 20 calls): 0.466 / 0.526 against the
#   8-warp capped launch's 0.469 / 0.552, y bitwise equal (forward_notes.md, session 52 item 3).
# Inductor's launch of a user kernel drops ``maxnreg`` (``torch._inductor.runtime.triton_heuristics.config_to_dict``),
# so an uncapped launch is also the one a compiled graph runs: eager and compiled calls run one kernel.
NARROW_QUERY_LAUNCH = QueryLaunch(rows=128, warps=4, stages=3, split=2, max_registers=None)


def query_launch(spec: KernelSpec, plan: Plan) -> QueryLaunch:
    """The chunked query kernel's launch for shape class ``spec``: ``NARROW_QUERY_LAUNCH`` for bf16 dots with d <= 64
    and value blocks of at most 64 columns, whose chunks hold at least its rows; else the plan's rows and stages
    with ``CHUNK_QUERY_WARPS`` (the quadratic kernel: the plan's warps too), whole pairs, no cap."""
    narrow = spec.chunked and not spec.query_t and spec.dtype in ("bfloat16", "float16") and spec.head_dim <= 64
    if narrow and spec.block_e <= 64 and spec.chunk_size >= NARROW_QUERY_LAUNCH.rows:
        return NARROW_QUERY_LAUNCH
    warps = CHUNK_QUERY_WARPS if spec.chunked else plan.num_warps
    stages = min(plan.num_stages, WIDE_STAGES) if spec.head_dim >= WIDE_HEAD else plan.num_stages
    return QueryLaunch(rows=spec.block_t, warps=warps, stages=stages, split=1, max_registers=None)


@functools.lru_cache(maxsize=256)
def _with_query_tiles(spec: KernelSpec, rows: int, split: int) -> KernelSpec:
    """``spec`` with the query kernel's rows and pair split (one ``dataclasses.replace`` per shape class: a
    replace per call took about 10 us of the host's 30-110 us per forward, ``benchmarks/bench_host.py``)."""
    if (rows, split) == (spec.block_t, spec.query_split):
        return spec
    return replace(spec, block_t=rows, query_split=split)


MAX_GRID_Z = 65535
NONCAUSAL_GATE = "a log_gate with causal=False (gating is defined for causal calls only, DESIGN.md section 1)"


def triton_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    deg: int,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    causal: bool,
) -> str | None:
    """None if ``triton_forward`` serves this call, else the reason it does not (the op then uses aten)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (q.is_cuda or interpreting()):
        return f"tensors are on {q.device.type}, the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernels take float16, bfloat16 and float32)"
    if log_gate is not None and not causal:
        return NONCAUSAL_GATE
    d, e = size_hint(q.shape[-1]), size_hint(v.shape[-1])
    if d % 8 or not 8 <= d <= 256:
        return f"head dim d={d} (the kernels take multiples of 8 up to 256)"
    if not 1 <= e <= 256:
        return f"value dim e={e} (the kernels take up to 256)"
    if min(size_hint(n) for n in (*q.shape[:3], k.shape[2])) == 0:
        return "an empty dimension"
    if q.shape[0] * q.shape[1] > MAX_GRID_Z:  # guarded when symbolic: a graph traced below the limit stays below it
        return f"batch x query heads = {size_hint(q.shape[0]) * size_hint(q.shape[1])} > {MAX_GRID_Z} (one grid axis)"
    return None


def _block_feature(d: int, plan: Plan) -> int | None:
    """Coordinate-block size of the state tiles: the Plan's, clamped to what the kernels run well, dividing d."""
    b = min(max(plan.block_feature, MIN_BLOCK_FEATURE), MAX_BLOCK_FEATURE)
    while b >= MIN_BLOCK_FEATURE and d % b:
        b //= 2
    return b if b >= MIN_BLOCK_FEATURE else None


def kernel_spec(
    q: torch.Tensor, v: torch.Tensor, deg: int, gated: bool, has_valid: bool, causal: bool, kv_len: int, plan: Plan
) -> KernelSpec:
    """The shape class of one call: the chunked path when deg is 2, the chunk is shorter than the keys and d
    tiles (and is at most ``MAX_CHUNKED_HEAD``); otherwise the quadratic kernel. Tiles come from the Plan, clamped
    to what the kernels take: powers of 2, b = 16, query rows 16..128, value blocks of at least min(e, 64) columns."""
    d, e = specialized(q.shape[-1]), specialized(v.shape[-1])
    long_keys = plan.chunk_size < kv_len
    return _shape_class(q.dtype, d, e, deg, gated, has_valid, causal, long_keys, plan, *_tunables())


def _tunables() -> tuple[int, int, bool, bool, bool]:
    """The module constants a shape class depends on (benchmarks and tests set them): part of the memo's key."""
    return QUADRATIC_BLOCK_K, STATE_BLOCK_S, QUERY_TRANSPOSED, DENOMINATOR_BY_DOT, DENOMINATOR_BY_DOT_FLOAT32


@functools.lru_cache(maxsize=1024)
def _shape_class(
    dtype: torch.dtype,
    d: int,
    e: int,
    deg: int,
    gated: bool,
    has_valid: bool,
    causal: bool,
    long_keys: bool,
    plan: Plan,
    block_k: int,
    block_s: int,
    query_t: bool,
    den_dot: bool,
    den_dot_float32: bool,
) -> KernelSpec:
    """``kernel_spec`` once per argument tuple (built per call, it took about 5 us of the 30 a short call spends
    on the host); ``long_keys``: the plan's chunk is shorter than the keys."""
    block_feature = _block_feature(d, plan)
    chunked = deg == 2 and long_keys and block_feature is not None and d <= MAX_CHUNKED_HEAD
    block_e = min(max(plan.block_e, MIN_BLOCK_E), value_tile(e))
    block_t = min(max(16, plan.block_t), 128)
    if d >= WIDE_HEAD and block_e >= WIDE_HEAD:
        block_t = min(block_t, WIDE_BLOCK_T)
    chunk = 1 << max(plan.chunk_size - 1, 0).bit_length()
    return KernelSpec(
        dtype=str(dtype).removeprefix("torch."),
        head_dim=d,
        value_dim=e,
        deg=deg,
        gated=gated,
        has_valid=has_valid,
        causal=causal,
        chunked=chunked,
        chunk_size=max(chunk, block_t) if chunked else 0,
        block_t=block_t,
        block_k=block_k,
        block_s=block_s if chunked else 0,
        block_e=block_e,
        block_feature=block_feature if chunked else 0,
        query_t=chunked and query_t,
        den_dot=den_dot and (dtype != torch.float32 or den_dot_float32),
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _launch(
    kernel,
    grid: tuple,
    kwargs: dict,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None = None,
    kept: list | None = None,
    dependent: bool = False,
) -> None:
    """``wrap_triton(kernel)[grid](**kwargs)``: Inductor copies the kernel into its output code when tracing.
    ``maxnreg`` caps the registers per thread (None: no cap). ``kept`` receives the launch as a ``DirectLaunch``
    (None where it cannot be repeated directly). ``dependent``: a programmatic dependent launch of the kernel before
    it in the stream (``launch_pdl``), for launches that go straight to Triton only (``direct_launches_allowed``:
    ``wrap_triton``'s traced launch takes no such option)."""
    from torch.library import wrap_triton

    launch = dict(kwargs) if interpreting() else {**kwargs, "num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None and not interpreting():
        launch["maxnreg"] = maxnreg
    if dependent:
        launch["launch_pdl"] = True
    compiled = wrap_triton(kernel)[grid](**launch)
    if kept is not None:
        kept.append(DirectLaunch.of(kernel, grid, kwargs, compiled))


def _strides(prefix: str, t: torch.Tensor) -> dict[str, int | torch.SymInt]:
    """``stride_qb, stride_qh, stride_qt, stride_qd`` (``..._ve`` for v): any layout, no copies."""
    last = "e" if prefix == "v" else "d"
    return {f"stride_{prefix}{axis}": s for axis, s in zip(("b", "h", "t", last), t.stride())}


def _record(spec: KernelSpec, path, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> None:
    """Register the source with the inspection (every call while compiling or inspecting; else once per spec)."""
    from ..inspection import record_kernel

    record_kernel(
        "power_retention_forward",
        path.read_text(),
        {
            "q_shape": tuple(size_hint(s) for s in q.shape),
            "k_shape": tuple(size_hint(s) for s in k.shape),
            "v_shape": tuple(size_hint(s) for s in v.shape),
            "plan": plan,
            "path": str(path),
            "dtype": spec.dtype,
            "deg": spec.deg,
            "causal": spec.causal,
            "gated": spec.gated,
            "kernel_path": "chunked" if spec.chunked else "quadratic",
        },
    )


_RECORDED: set[KernelSpec] = set()


def small_chunk_float32(spec: KernelSpec) -> bool:
    """Whether a 16-bit call of shape class ``spec`` runs the float32 kernels because its chunks are short: chunked,
    with fewer than ``planning.EXACT_CHUNK_BELOW`` keys per chunk (a forced chunk size; planned ones are longer).

    Through a state, a weight (s q.k)^2 is a sum over the features of q_a q_b k_a k_b terms that cancel, so one bf16
    rounding per term moves it by percents; averaged over many keys this leaves y alone, over a few it does not
    (forward_notes.md, sessions 19 and 23). A chunk of C keys hands at most C keys to the next rows' states: every
    bf16 case of the GPU fuzz that missed its bar had chunks of 16 (or 64 keys with 4 in the first chunk, since
    aligned: ``keyless_rows``). The float32 kernels have exact products; the CUDA state kernel is not used."""
    return spec.dtype in ("bfloat16", "float16") and spec.chunked and spec.chunk_size < EXACT_CHUNK_BELOW


def kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: KernelSpec) -> tuple[torch.Tensor, ...]:
    """q, k, v as the Triton kernels take them for shape class ``spec`` (of the inputs as given): float16 becomes
    float32, and so does bfloat16 where ``small_chunk_float32(spec)``.

    The kernels run 16-bit inputs' dots in bf16, which keeps fp32's exponent range but not float16's precision:
    in the GPU fuzz (seed 20261201) float16 cases missed the 1e-2 / 2e-2 bars, by up to 0.14 in y and 3.3 in dq,
    and rounding the inputs to bf16 alone moves the oracle's dq by up to 0.12 there. float16 values are exact in
    float32, and the float32 kernels (exact products) passed every fuzz case, at the cost of fp32 tiles (twice the
    shared memory, no bf16 tensor cores). bfloat16 (with chunks of 64 keys or more) and float32 pass through
    unchanged."""
    widened = (torch.float16, torch.bfloat16) if small_chunk_float32(spec) else (torch.float16,)
    return tuple(t.float() if t.dtype in widened else t for t in (q, k, v))


def call_shape_class(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    deg: int,
    gated: bool,
    has_valid: bool,
    causal: bool,
    plan: Plan,
    cuda_states: bool,
) -> tuple[KernelSpec, tuple[torch.Tensor, torch.Tensor, torch.Tensor], bool]:
    """The shape class ``triton_forward`` runs a call in, the q, k, v its kernels take (``kernel_inputs``: float32
    copies where 16-bit inputs run the float32 kernels) and whether the CUDA state kernel (asked for by
    ``cuda_states``) still serves it: not where short chunks take the float32 kernels (``small_chunk_float32``).
    The CUDA state kernel takes 16-bit inputs as they are (``codegen="cuda"`` keeps float16)."""
    spec = kernel_spec(q, v, deg, gated, has_valid, causal, size_hint(k.shape[2]), plan)
    cuda_states = cuda_states and not small_chunk_float32(spec)
    if not cuda_states:
        widened = kernel_inputs(q, k, v, spec)
        if any(new is not old for new, old in zip(widened, (q, k, v))):  # the shape class of the float32 copies
            q, k, v = widened
            spec = kernel_spec(q, v, deg, gated, has_valid, causal, size_hint(k.shape[2]), plan)
    return spec, (q, k, v), cuda_states


def describe_query_launch(launch: QueryLaunch, cherries_possible: bool = False) -> str:
    """``128 query rows x 4 warps x 3 stages, pairs in 2 parts, no register cap``. ``cherries_possible``: the wgmma
    state kernel can write the call's states in the cherry layout (``writes_cherry_rows``: calls that keep no states
    for a backward), whose state steps are cherries; whether it serves the call is decided there, so the text names
    both."""
    parts = ", whole pairs" if launch.split == 1 else f", pairs in {launch.split} parts"
    parts += " (cherries with the wgmma state kernel where no backward follows)" if cherries_possible else ""
    cap = "no register cap" if launch.max_registers is None else f"<= {launch.max_registers} registers"
    return f"{launch.rows} query rows x {launch.warps} warps x {launch.stages} stages{parts}, {cap}"


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None,
    causal: bool,
    valid: torch.Tensor | None,
    plan: Plan,
    segments: int | None = None,
    state_kernel: Callable[[KernelSpec, dict], dict] | None = None,
    states_out: dict[str, torch.Tensor] | None = None,
    y_out: torch.Tensor | None = None,
    y_dtype: torch.dtype = torch.float32,
    for_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Power retention forward on the GPU: ``(y, denom)`` exactly as ``chunked_forward`` returns them.

    ``plan`` gives the chunk size (``>= Tk``: the quadratic kernel) and the tiles; ``segments`` overrides the
    number of sequential segments of the state kernel (default: enough programs for ``STATE_WAVES`` per SM).
    ``state_kernel`` replaces the Triton state kernel: called with the spec and that kernel's keyword arguments,
    it returns the buffers the kernel would fill (``cuda_state.CudaStateHook``: the CUDA C++ state kernel), or the
    states after the scan where its ``folds_segments`` says so (no scan is launched then).
    ``states_out``, on the chunked path, receives the chunk states the query kernel read (``"S"``, ``"M"``: shapes
    and dtypes in ``StateLayout``), which ``triton_backward(saved_states=...)`` takes instead of recomputing them.
    ``y_out`` (contiguous, shaped as y, any float dtype) receives y rounded to its dtype as well: the query kernel
    stores it beside the float32 y (in place of a cast after it). ``y_dtype``: the dtype of the returned y, which
    the query kernel stores rounded from its float32 accumulators; a 16-bit one (for a forward no backward follows)
    skips the float32 y's store (4 bytes per element) altogether, and excludes ``y_out``. ``for_backward``: a
    backward will take y and denom (as does ``states_out``), so the weights are the backward's float32 squares
    rounded once; otherwise deg 2 in 16 bits squares in packed bf16 (``KernelSpec.packed_squares``).

    An eager call whose launches go straight to Triton (``replays.replayable``), with neither ``y_out`` nor
    ``states_out`` nor ``for_backward`` and the Triton or CUDA state kernel, is kept; a later call with the same key
    (``_replay_key``) repeats its launches.
    """
    if y_out is not None and y_dtype != torch.float32:
        raise ValueError(f"triton_forward: y_out is stored beside a float32 y, but y_dtype is {y_dtype}")
    if log_gate is not None and not causal:  # the kernels' gate factors are at most 1 only for causal pairs
        raise ValueError(f"triton_forward: {NONCAUSAL_GATE}")
    if single_key_padded(k):
        k, v, valid, log_gate = with_a_key_of_zeros(k, v, valid, log_gate)
    if (shift := aligned_rows(q, k, causal)) is not None:
        y, denom = triton_forward(
            shifted_rows(q, shift, 0.0), k, v, scale=scale, deg=deg, log_gate=log_gate, causal=causal, valid=valid,
            plan=plan, segments=segments, state_kernel=state_kernel, states_out=states_out, y_dtype=y_dtype,
            for_backward=for_backward,
        )  # fmt: skip
        y = shifted_rows(y, -shift, 0.0).contiguous()
        if y_out is not None:  # a rare shape: cast after
            y_out.copy_(y)
        return y, shifted_rows(denom, -shift, EPS).contiguous()
    backward_follows = for_backward or states_out is not None  # float32 squares, as the backward recomputes them
    replay_key = None
    if y_out is None and not backward_follows:
        replay_key = _replay_key(q, k, v, log_gate, valid, scale, deg, causal, plan, segments, state_kernel, y_dtype)
        if replay_key is not None and (replay := replays.kept(replay_key)) is not None:
            return replay(q, k, v, log_gate, valid)
    given_q = q
    spec, (q, k, v), cuda_states = call_shape_class(
        q, k, v, deg, log_gate is not None, valid is not None, causal, plan, state_kernel is not None
    )
    if not cuda_states:
        state_kernel = None
    if states_out is None and writes_cherry_rows(state_kernel, spec, k.device):  # the states stay within the call
        spec = _with_cherries(spec)
    kept: list[Callable[[dict], None] | None] | None = [] if replay_key is not None else None
    B, Hq, Tq, _ = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    first_spec = spec
    module, _ = load_forward(spec)
    tensors = _call_tensors(q, k, v, log_gate, valid, y_dtype)
    y, denom = tensors["Y"], tensors["DEN"]
    common = {**_strides("k", k), **_strides("v", v), "K": k, "V": v, "Hq": Hq, "group": Hq // Hk, "Tk": Tk}
    extra: dict[str, object] = {}
    if log_gate is not None:
        extra["G"] = _launch_gate_cumsum(module, tensors["LOG_GATE"], tensors["G"], kept)
        extra["stride_g"] = extra["G"].stride(1)
    if valid is not None:
        extra["VALID"] = tensors["VALID"]
    if y_out is not None and (y_out.shape != y.shape or not y_out.is_contiguous()):
        raise ValueError(f"triton_forward: y_out must be contiguous and shaped {tuple(y.shape)}, got {y_out.shape}")
    attention = {"Q": q, "Y": y, "DEN": denom, **_strides("q", q), **common, **extra, "Tq": Tq, "scale": scale}
    # without ROUNDED_OUT the kernel never touches Y_OUT: None, not an alias of Y (were the kernel's mutation analysis
    # to fail, torch would clone every tensor argument, and two clones of one buffer would lose y's writes)
    attention.update(Y_OUT=y_out, ROUNDED_OUT=y_out is not None)
    if log_gate is not None:
        attention["gate_heads"] = log_gate.shape[1]
    buffers: dict[str, torch.Tensor] = {}
    if spec.chunked:
        state_heads = log_gate.shape[1] if log_gate is not None else Hk
        per_sm = segment_major_programs_per_sm(state_kernel, spec, k.device)
        layout = StateLayout.of(spec, k, Tq, state_heads, segments, per_sm)
        attention.update(_chunk_states(module, layout, k, common, extra, state_kernel, kept, buffers))
        if states_out is not None:
            states_out.update(S=attention["S_ST"], M=attention["M_ST"])
        if "SYNC" in attention:
            spec = _waiting_for_states(spec)
    launch = query_launch(spec, plan)
    spec = _with_query_tiles(spec, launch.rows, launch.split)
    if not backward_follows:  # the query kernel's module only: the state kernels are the same
        spec = with_packed_squares(spec)
    state_module = module
    if not has_storage(q) and _takes_cuda_query(spec, attention):  # traced: the kernel as a custom op
        return _cuda_query_call(spec, attention)
    if (cuda_launch := _cuda_query_launch(spec, attention)) is not None:
        cuda_launch(attention)
        if kept is not None:
            kept.append(cuda_launch)
        _keep_replay(replay_key, kept, ((first_spec, state_module),), q is not given_q, y_dtype, buffers, attention)
        return y, denom
    warps, stages = launch.warps, launch.stages
    # beside the state kernel where the launch goes straight to Triton (the interpreter's launch is ordinary: its wait
    # then finds the counts complete): the shared-memory fit below compiles the kernel this launch then runs
    dependent = spec.waits_for_states and direct_launches_allowed()

    def grid(candidate: KernelSpec) -> tuple:
        return (_cdiv(Tq, candidate.block_t), _cdiv(spec.value_dim, spec.block_e), B * Hq)

    def shared_of(candidate: KernelSpec, candidate_stages: int) -> int:
        kernel = load_forward(candidate)[0].attention_kernel
        return compiled_shared_memory(
            kernel, grid(candidate), attention, warps, candidate_stages, launch.max_registers, dependent
        )

    if (limit := device_shared_memory_limit(q.device)) is not None:  # the state kernels ignore block_t
        spec, stages = fit_shared_memory(spec, warps, stages, limit, shared_of, launch_specialization(attention))
    module, path = load_forward(spec)
    if is_recording() or spec not in _RECORDED:
        _RECORDED.add(spec)
        _record(spec, path, q, k, v, plan)
    _launch(
        module.attention_kernel, grid(spec), attention, warps, stages, launch.max_registers, kept,
        dependent=dependent,
    )  # fmt: skip
    modules = ((first_spec, state_module), (spec, module))
    _keep_replay(replay_key, kept, modules, q is not given_q, y_dtype, buffers, attention)
    return y, denom


def _takes_cuda_query(spec: KernelSpec, attention: dict) -> bool:
    """Whether this call runs the CUDA query kernel (``cuda_query``) in place of the Triton one: ``CUDA_QUERY`` on
    (and ``CUDA_QUERY_GATED`` for a gated call), and a shape class and tensors it takes."""
    from . import cuda_query

    return (
        CUDA_QUERY
        and (CUDA_QUERY_GATED or not spec.gated)
        and spec.chunk_size <= CUDA_QUERY_MAX_CHUNK
        and cuda_query.query_unsupported(spec) is None
        and cuda_query.query_unsupported_reason(attention, spec.chunk_size) is None
    )


def _cuda_query_launch(spec: KernelSpec, attention: dict) -> Callable[[dict], None] | None:
    """The CUDA query kernel's launch for an eager call that takes it (``_takes_cuda_query``), to run now and keep
    for replays; else None."""
    from . import cuda_query

    if not has_storage(attention["Q"]) or not _takes_cuda_query(spec, attention):
        return None
    cuda_query.record_query_source(spec, attention)
    return cuda_query.query_launch(attention, spec.chunk_size, spec.packed_squares)


def _cuda_query_call(spec: KernelSpec, attention: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """y and denom of a traced call that takes the CUDA query kernel, through its custom op (``cuda_query_op``)."""
    from . import cuda_query

    cuda_query.record_query_source(spec, attention)
    return torch.ops.retention_compile.cuda_query(
        attention["Q"], attention["K"], attention["V"], attention.get("G"), attention["S_ST"], attention["M_ST"],
        float(attention["scale"]), spec.chunk_size, spec.packed_squares, attention["Y"].dtype,
    )  # fmt: skip


def _keep_replay(
    key: tuple | None,
    kept: list | None,
    modules: tuple,
    widened: bool,
    y_dtype: torch.dtype,
    buffers: dict[str, torch.Tensor],
    attention: dict,
) -> None:
    """Keep the call's launches ``kept`` under ``key`` (``ForwardReplay``) where every one of them can be repeated."""
    if kept is not None and all(step is not None for step in kept):
        aliases = {name: attention[name] for name in ("S_ST", "M_ST") if name in attention}
        replays.keep(key, ForwardReplay.of(modules, widened, y_dtype, buffers, aliases, kept))


@dataclass(frozen=True)
class ForwardReplay:
    """An eager call of ``triton_forward`` kept for the calls after it with the same key (``replays.call_key``):
    each allocates its buffers as the first did (``_call_tensors``, and the chunked path's state buffers by shape
    and dtype) and repeats its launches in order (``eager_launch``: the gate's cumsum, the state kernel, Triton's or
    the CUDA one, the scan, the query or quadratic kernel), without planning or Triton's argument binding.
    ``modules``: the rendered kernels it launches, with their shape classes (current while ``load_forward`` still
    returns them); ``widen``: the first call's kernels took float32 copies of q, k, v (``kernel_inputs``: float16,
    or bfloat16 with short chunks); ``aliases``: the query kernel's names for state buffers (``S_ST``: ``S_LOC``
    or ``S_SEG``)."""

    modules: tuple[tuple[KernelSpec, object], ...]
    widen: bool
    y_dtype: torch.dtype
    buffers: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    aliases: tuple[tuple[str, str], ...]
    steps: tuple[Callable[[dict], None], ...]

    @staticmethod
    def of(
        modules: tuple[tuple[KernelSpec, object], ...],
        widen: bool,
        y_dtype: torch.dtype,
        buffers: dict[str, torch.Tensor],
        aliases: dict[str, torch.Tensor],
        steps: list,
    ) -> ForwardReplay:
        """The replay of a call that allocated the state ``buffers`` (by name), handed its query kernel
        ``aliases`` (a name of the kernel's for one of those buffers) and launched ``steps``."""
        shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in buffers.items())
        names = tuple((alias, next(n for n, t in buffers.items() if t is a)) for alias, a in aliases.items())
        return ForwardReplay(modules, widen, y_dtype, shapes, names, tuple(steps))

    def current(self) -> bool:
        return all(load_forward(spec)[0] is module for spec, module in self.modules)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        log_gate: torch.Tensor | None,
        valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.widen:  # as the first call's kernel_inputs did (its shape class is the float32 copies')
            q, k, v = q.float(), k.float(), v.float()
        tensors = _call_tensors(q, k, v, log_gate, valid, self.y_dtype)
        for name, shape, dtype in self.buffers:
            tensors[name] = torch.empty(shape, dtype=dtype, device=q.device)
        for alias, name in self.aliases:
            tensors[alias] = tensors[name]
        for step in self.steps:
            step(tensors)
        return tensors["Y"], tensors["DEN"]


def _keeps_launches(state_kernel: Callable | None) -> bool:
    """Whether a call with this state-kernel hook may be kept: the Triton state kernel's (None), or a hook that
    hands over its launch (``keeps_launches``: ``cuda_state.CudaStateHook``)."""
    return state_kernel is None or getattr(state_kernel, "keeps_launches", False)


def _replay_key(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float,
    deg: int,
    causal: bool,
    plan: Plan,
    segments: int | None,
    state_kernel: Callable | None,
    y_dtype: torch.dtype,
) -> tuple | None:
    """The key under which a call of ``triton_forward`` with these arguments and neither ``y_out`` nor ``states_out``
    is kept (``replays``), or None where none is (``replays.replayable``, ``_keeps_launches``)."""
    if not _keeps_launches(state_kernel) or not replays.replayable(q):
        return None
    settings = (scale, deg, causal, plan, segments, state_kernel is not None, y_dtype, *launch_tunables())
    return replays.call_key((q, k, v, log_gate, valid), settings)


def kept_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    *,
    scale: float,
    deg: int,
    causal: bool,
    plan: Plan,
    state_kernel: Callable | None,
    y_dtype: torch.dtype,
) -> ForwardReplay | None:
    """The kept launches that a ``triton_forward`` call with these arguments (no ``segments``, ``states_out`` or
    ``y_out``) repeats, or None where none is kept (a call with rows before the first key keeps its other rows')."""
    if aligned_rows(q, k, causal) is not None:
        return None
    key = _replay_key(q, k, v, log_gate, valid, scale, deg, causal, plan, None, state_kernel, y_dtype)
    replay = None if key is None else replays.kept(key)
    return replay if isinstance(replay, ForwardReplay) else None


def launch_tunables() -> tuple:
    """The module constants that a call's shape class, launches and buffers read (benchmarks and tests set some of
    them): part of a kept call's key."""
    from . import cuda_query
    from .cuda_state import CONFIG

    return (
        *_tunables(), GATE_SCAN_BLOCK, GATE_SCAN_PREFIX_BLOCKS, WIDE_HEAD, WIDE_BLOCK_T, WIDE_STAGES, MIN_BLOCK_E,
        MAX_CHUNKED_HEAD, STATE_WAVES, STATE_WARPS, STATE_STAGES, CHUNK_QUERY_WARPS, SCAN_WARPS, SCAN_BLOCK,
        NARROW_QUERY_LAUNCH, CONFIG, QUERY_BESIDE_STATES, CUDA_QUERY, CUDA_QUERY_GATED, CUDA_QUERY_MAX_CHUNK,
        cuda_query.STAGES, cuda_query.MIN_BLOCKS, cuda_query.WARPGROUPS,
    )  # fmt: skip


def keyless_rows(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int | torch.SymInt | None:
    """``Tq - Tk``, the causal queries before the first key, where Tq > Tk > 0 (rows i < Tq - Tk see no key: y = 0,
    denom = eps, no gradient), else None. Under dynamic shapes this guards on Tq > Tk (a graph recompiles when the
    relation flips); unbacked sizes keep the alignment with the queries, which is correct, only less precise.

    ``triton_forward`` and ``triton_backward`` run their kernels on the other rows only, so the chunks align with the
    keys (shift 0). Aligned with all the queries (shift = (Tq - Tk) mod C) the first chunk would hold only C - shift
    keys, which the next chunk's rows reach through the bf16 state alone, where the weights of a few keys lose
    percents (forward_notes.md, session 19). GPU fuzz seed 20261209, case 968 (Tq 219, Tk 159, chunk 64: 4 keys in
    the first chunk) had y off by 1.29e-2 that way."""
    Tq, Tk = q.shape[2], k.shape[2]
    if causal and guard_or_false(Tk > 0) and guard_or_false(Tq > Tk):
        return Tq - Tk
    return None


def rows_before_the_queries(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int | torch.SymInt | None:
    """``Tk - Tq`` where a causal call has 0 < Tk - Tq < ``EXACT_CHUNK_BELOW`` (a prefill after a short cache), else
    None. ``triton_forward`` and ``triton_backward`` then run Tk - Tq rows of zeros before the queries
    (``aligned_rows``; q = 0 gives w = 0, y = 0, dy = 0 there) and drop them, so that Tq = Tk and the chunks
    align with the keys. Aligned with the queries (shift = (Tq - Tk) mod C) the first chunk would hold only Tk - Tq
    keys, which the next chunk's first rows reach through the bf16 state alone, whose feature products cancel for a
    few keys (as ``keyless_rows`` says for Tq > Tk): GPU fuzz seed 67676767, case 769 (bf16, chunk 64, Tq 85, Tk 87:
    2 keys in the first chunk) had y off by 1.19e-2, a row with 4 keys by 22%, and 40 fresh draws of its shape
    missed 1e-2 in over 10% (session 67). A call on the single-chunk path runs the extra rows too (fewer than
    ``EXACT_CHUNK_BELOW``): deciding by the path would guard a dynamic length on the chunk size, a graph more
    (session 67's first GPU run of the change). Under dynamic shapes this guards on Tq < Tk only where the two
    lengths are not one symbol (self-attention's are)."""
    extra = k.shape[2] - q.shape[2]
    if causal and guard_or_false(extra > 0) and guard_or_false(extra < EXACT_CHUNK_BELOW):
        return extra
    return None


def aligned_rows(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int | torch.SymInt | None:
    """The query rows ``triton_forward`` and ``triton_backward`` drop (``keyless_rows``: positive) or put before the
    queries as rows of zeros (``rows_before_the_queries``: negative) so that the chunks align with the keys
    (``shifted_rows``; the outputs are shifted back), or None where the call runs as it is."""
    if (keyless := keyless_rows(q, k, causal)) is not None:
        return keyless
    extra = rows_before_the_queries(q, k, causal)
    return None if extra is None else -extra


def single_key_padded(k: torch.Tensor) -> bool:
    """Whether a call runs its kernels after one key of zeros put before its keys (``with_a_key_of_zeros``): a call
    whose single key is statically one. (The backward's single non-causal query row gets a row of zeros the same way:
    ``backward.backward_rows``.)

    Why: Triton takes an integer argument equal to 1 as a constant (eager launches; Inductor's launch of a user kernel
    does the same for a size statically 1, and Dynamo makes size-1 dimensions static), so a loop over the rows or keys
    of that length folds away, and ptxas 12.8 (the one Triton 3.6 ships) then miscompiled several such bf16 kernels:
    their SASS reads a uniform register that nothing writes, the address of a wgmma operand. GPU fuzz seed 69690001
    case 599 (d 8 padded to 16, e 64, deg 4, non-causal, Tq 1, Tk 3126, validity) faulted that way in ``dkv_kernel``
    on an H100. Offline (``benchmarks/miscompiled_lengths.py --raw``, sm_90, Triton 3.6), for d 16 and 32: the
    non-causal ``dkv_kernel`` at Tq 1, ``dq_kernel`` and ``attention_kernel`` at Tk 1, and causal calls of one row
    and one key; not d 64 or 128, not float32; none once both lengths are at least 2 (the default mode). ptxas 12.9
    (Triton 3.9) compiled that kernel correctly but miscompiled three others of length 1 (d 16 and 32, e = d), none
    once padded. A key of zeros takes no weight: ``(s q . 0)^p = 0``; before the keys, it changes no other key's
    position or gate factor (its log-gate is 0)."""
    return statically_known_true(k.shape[2] == 1)


def with_a_key_of_zeros(
    k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, log_gate: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """k and v (B, H, Tk, .) after one key of zeros, ``valid`` (B, Tk) with that key marked invalid and ``log_gate``
    (B, heads, Tk) with a log-gate of 0 there."""
    pad = torch.nn.functional.pad
    padded_valid = None if valid is None else pad(valid, (1, 0), value=False)
    return pad(k, (0, 0, 1, 0)), pad(v, (0, 0, 1, 0)), padded_valid, None if log_gate is None else pad(log_gate, (1, 0))


def shifted_rows(rows: torch.Tensor, count: int | torch.SymInt, fill: float) -> torch.Tensor:
    """``rows`` (B, H, T, ...) without its first ``count`` rows along dim 2 (a view) where ``count`` > 0, else after
    ``-count`` rows of ``fill``."""
    if guard_or_false(count > 0):
        return rows[:, :, count:]
    head = rows.new_full((*rows.shape[:2], -count, *rows.shape[3:]), fill)
    return torch.cat([head, rows], dim=2)


def _gate_cumsum(module, log_gate: torch.Tensor) -> torch.Tensor:
    """``G = cumsum(max(log_gate, F), -1)`` in float32 (``gates.log_gate_floor``) by the rendered
    ``gate_cumsum_kernel`` (torch's scan runs one program per row: 0.1 ms for 8 rows of 65536 on the H200), rows
    padded to a multiple of 16 keys (aligned)."""
    return _launch_gate_cumsum(module, *_gate_buffers(log_gate))


def _launch_gate_cumsum(module, lg: torch.Tensor, g: torch.Tensor, kept: list | None = None) -> torch.Tensor:
    """``g = cumsum(max(lg, F), -1)`` (buffers from ``_gate_buffers``); ``kept``: as ``_launch``'s."""
    B, heads, Tk = lg.shape
    grid = (_cdiv(Tk, GATE_SCAN_BLOCK), B * heads)
    args = {"LOG_GATE": lg, "G": g, "Tk": Tk, "stride_g": g.stride(1), "BLOCK": GATE_SCAN_BLOCK,
            "PREFIX": GATE_SCAN_PREFIX_BLOCKS * GATE_SCAN_BLOCK}  # fmt: skip
    _launch(module.gate_cumsum_kernel, grid, args, 8, 3, kept=kept)
    return g


def _gate_buffers(log_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate cumsum's input (contiguous) and its output G, rows padded to a multiple of 16 keys."""
    lg = log_gate.contiguous()
    B, heads, Tk = lg.shape
    return lg, torch.empty((B, heads, _cdiv(Tk, 16) * 16), dtype=torch.float32, device=lg.device)


def _call_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    y_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors of a forward call's launches by kernel parameter name: q, k, v as the kernels take them; y
    (B, Hq, Tq, e) in ``y_dtype`` and denom (B, Hq, Tq) float32, uninitialised; the log-gates made contiguous and G
    (``_gate_buffers``); the key validity made contiguous."""
    B, Hq, Tq = q.shape[:3]
    tensors = {
        "Q": q, "K": k, "V": v,
        "Y": torch.empty((B, Hq, Tq, v.shape[3]), dtype=y_dtype, device=q.device),
        "DEN": torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device),
    }  # fmt: skip
    if log_gate is not None:
        tensors["LOG_GATE"], tensors["G"] = _gate_buffers(log_gate)
    if valid is not None:
        tensors["VALID"] = valid.contiguous()
    return tensors


def _cdiv(a: int | torch.SymInt, b: int | torch.SymInt) -> int | torch.SymInt:
    return (a + b - 1) // b


def state_segments(
    device: torch.device, programs, n_chunks, segments: int | None, programs_per_sm: int | None = None
) -> tuple[int, int | torch.SymInt, int | torch.SymInt]:
    """``(segments, chunks per segment, segment count)`` for a state kernel with ``programs`` programs per segment
    over ``n_chunks`` chunks: ``segments`` as given, else enough for ``STATE_WAVES`` programs per SM (at most one
    segment per chunk) or, for a kernel with a segment-major grid and ``programs_per_sm`` programs resident per SM
    (the CUDA state kernels), the count up to that many whose grid ``dispatch.fastest_segment_count`` models to end
    first (H200, T=65536 b1 h8 d64: 7 instead of 8, the state kernel 0.418-0.428 -> 0.401-0.404 ms), or past that
    count where the model gains much more (``dispatch.modelled_segment_count``: the cherry layout's 72 programs take
    11). The count is ``segments`` or fewer (4 chunks in 3 segments take 2 of 2 chunks)."""
    if segments is None:
        wanted = STATE_WAVES * _sm_count(device) / size_hint(programs)
        segments = max(1, min(size_hint(n_chunks), math.ceil(wanted)))
        if programs_per_sm is not None:
            sms, chunks = _sm_count(device), size_hint(n_chunks)
            segments = modelled_segment_count(chunks, size_hint(programs), sms, programs_per_sm, segments)
    per_segment = _cdiv(n_chunks, segments)
    return segments, per_segment, _cdiv(n_chunks, per_segment)


def writes_cherry_rows(state_kernel: object, spec: KernelSpec, device: torch.device) -> bool:
    """Whether a ``state_kernel`` hook writes shape class ``spec``'s states in the cherry layout (its ``cherry_rows``:
    the wgmma state kernel at d = 64), which a call takes where no one reads its states after it (no ``states_out``):
    the backward, the decode and the other state kernels keep the pair layout. H200, T=65536 b1 h8 d64: 9 state
    programs per head and segment instead of 10, 18 query steps instead of 20."""
    cherry_rows = getattr(state_kernel, "cherry_rows", None)
    return cherry_rows is not None and cherry_rows(spec, device)


@functools.lru_cache(maxsize=256)
def _with_cherries(spec: KernelSpec) -> KernelSpec:
    return replace(spec, cherries=True)


@functools.lru_cache(maxsize=256)
def _waiting_for_states(spec: KernelSpec) -> KernelSpec:
    return replace(spec, waits_for_states=True)


def folds_segments(state_kernel: object, spec: KernelSpec, device: torch.device) -> bool:
    """Whether a ``state_kernel`` hook leaves the states folded across segments (its ``folds_segments``: the wgmma
    kernel), so that no scan follows it. H200, T=65536 b1 h8 d64: the scan took 0.09 ms of the forward's 1.0."""
    folds = getattr(state_kernel, "folds_segments", None)
    return folds is not None and folds(spec, device)


def segment_major_programs_per_sm(state_kernel: object, spec: KernelSpec, device: torch.device) -> int | None:
    """Programs per SM of a ``state_kernel`` hook whose grid is segment-major (its ``programs_per_sm``: the CUDA state
    kernels), else None (the Triton state kernel, segment-minor: ``STATE_WAVES`` alone sets its segment count)."""
    per_sm = getattr(state_kernel, "programs_per_sm", None)
    return None if per_sm is None else per_sm(spec, device)


@dataclass(frozen=True)
class StateLayout:
    """Where the chunked path keeps the states the query kernel reads, per state head (``B * Hs`` of them):

        causal      S (heads, n_chunks, Dt, e) in the dots' dtype, M (heads, n_chunks, d, d) float32: the state
                    before each chunk
        non-causal  S (heads, n_seg + 1, Dt, e) and M (heads, n_seg + 1, d, d), both float32: segment totals, the
                    last slot the state of every key

    ``n_chunks = ceil((Tk + shift) / C)`` with ``shift = (Tq - Tk) mod C``; segments as ``state_segments`` gives them.
    """

    spec: KernelSpec
    batch: int | torch.SymInt
    state_heads: int | torch.SymInt
    shift: int | torch.SymInt
    n_chunks: int | torch.SymInt
    segments: int
    per_segment: int | torch.SymInt
    n_seg: int | torch.SymInt

    @staticmethod
    def of(
        spec: KernelSpec, k: torch.Tensor, Tq, state_heads, segments: int | None, programs_per_sm: int | None = None
    ) -> StateLayout:
        """The layout of ``triton_forward``'s states for keys ``k`` and ``Tq`` queries (``segments`` as there;
        ``programs_per_sm`` as ``state_segments`` takes it: ``segment_major_programs_per_sm``)."""
        B, Tk, C = k.shape[0], k.shape[2], spec.chunk_size
        params = spec.template_params()
        shift = (Tq - Tk) % C
        n_chunks = _cdiv(Tk + shift, C)
        programs = params["state_programs"] * params["n_eb"] * B * state_heads
        segments, per_segment, n_seg = state_segments(k.device, programs, n_chunks, segments, programs_per_sm)
        return StateLayout(spec, B, state_heads, shift, n_chunks, segments, per_segment, n_seg)

    @property
    def heads(self) -> int | torch.SymInt:
        """``B * Hs``: the leading dimension of the state buffers."""
        return self.batch * self.state_heads

    @property
    def slots(self) -> int | torch.SymInt:
        return self.n_chunks if self.spec.causal else self.n_seg + 1

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.spec.causal and self.spec.dtype != "float32" else torch.float32

    def shapes(self) -> tuple[tuple, tuple]:
        """The shapes of S and M."""
        spec = self.spec
        dt, d = spec.template_params()["dt"], spec.head_dim
        return (self.heads, self.slots, dt, spec.value_dim), (self.heads, self.slots, d, d)


def launch_scan(module, spec: KernelSpec, heads, args: dict, kept: list | None = None) -> None:
    """The scan kernel of ``module`` (shape class ``spec``, ``heads = B * Hs``) over the state buffers in ``args``,
    a state kernel's arguments (its buffers, sizes and, gated, ``G`` and ``stride_g``): segment totals into true
    segment-start states. ``kept``: as ``_launch``'s."""
    names = ["S_SEG", "M_SEG", "Tk", "shift", "n_chunks", "chunks_per_seg", "n_seg"]
    names += ["S_LOC", "M_LOC"] if spec.causal else []
    names += ["G", "stride_g"] if "G" in args else []
    blocks = spec.template_params()["scan_s_blocks"] + _cdiv(spec.head_dim**2, SCAN_BLOCK)
    _launch(module.scan_kernel, (blocks, heads), {n: args[n] for n in names}, SCAN_WARPS, 2, kept=kept)


def _chunk_states(
    module,
    layout: StateLayout,
    k: torch.Tensor,
    common: dict,
    extra: dict,
    state_kernel: Callable[[KernelSpec, dict], dict] | None = None,
    kept: list | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> dict[str, object]:
    """Run the state kernel (and the scan, unless the state kernel ``folds_segments``) into the buffers ``layout``
    describes; return the query kernel's state arguments. ``kept``: as ``_launch``'s (the state kernel hook's launch
    too); ``buffers`` receives the state buffers by name."""
    spec, state_heads = layout.spec, layout.state_heads
    params = spec.template_params()
    s_shape, m_shape = layout.shapes()
    heads, n_chunks, n_seg = layout.heads, layout.n_chunks, layout.n_seg
    seg_s = torch.empty((heads, n_seg + 1, *s_shape[2:]), dtype=torch.float32, device=k.device)
    seg_m = torch.empty((heads, n_seg + 1, *m_shape[2:]), dtype=torch.float32, device=k.device)
    sizes = {"Tk": k.shape[2], "shift": layout.shift, "n_chunks": n_chunks, "chunks_per_seg": layout.per_segment,
             "n_seg": n_seg}  # fmt: skip
    buffers = {} if buffers is None else buffers
    buffers.update(S_SEG=seg_s, M_SEG=seg_m)
    if spec.causal:
        buffers["S_LOC"] = torch.empty(s_shape, dtype=layout.state_dtype, device=k.device)
        buffers["M_LOC"] = torch.empty(m_shape, dtype=torch.float32, device=k.device)
    state_args = {**common, **extra, **buffers, **sizes, "state_heads": state_heads}
    sync = None
    if state_kernel is not None:
        produced = state_kernel(spec, state_args) if kept is None else state_kernel(spec, state_args, kept=kept)
        sync = produced.pop("SYNC", None)  # the fold's words: zeroed per call, not a state buffer
        buffers.update(produced)
    else:  # the Triton state kernel writes the pair layout only (a cherry module has none)
        assert not spec.cherries, "the cherry layout's states come from the wgmma state kernel"
        pair_programs = params["npairs"] * params["n_eb"]
        _launch(module.state_kernel, (n_seg, pair_programs, heads), state_args, STATE_WARPS, STATE_STAGES, kept=kept)
    if layout.segments > 1 and not folds_segments(state_kernel, spec, k.device):
        launch_scan(module, spec, heads, {**state_args, **buffers}, kept)
    read = "LOC" if spec.causal else "SEG"  # the states the query kernel reads
    states = {"S_ST": buffers[f"S_{read}"], "M_ST": buffers[f"M_{read}"]}
    states.update(state_heads=state_heads, state_slots=layout.slots, shift=layout.shift)
    done_counts = getattr(state_kernel, "done_counts", None)
    # a traced call (fake or functional tensors) launches the query kernel as an ordinary one, after the state kernel:
    # a wait would gain nothing there, and its sleep (inline PTX with a side effect) ends Inductor's analysis of what
    # the kernel writes, which then takes every input as written
    beside = QUERY_BESIDE_STATES and has_storage(k)
    if sync is not None and done_counts is not None and spec.causal and beside:
        offset, target = done_counts(spec, k.device, heads, n_seg)  # the query kernel waits on the fold's counts
        states.update(SYNC=sync, done_offset=offset, done_target=target, chunks_per_seg=layout.per_segment, n_seg=n_seg)
    return states
