"""Chunk size and kernel tiles for one power-retention call, chosen from the GPU it runs on.

``plan(spec, T, d, e, deg, dtype, gated, batch_heads)`` minimises a modelled time over candidate chunk
sizes C in {64, ..., 2048} (powers of 2, C < T), the single-chunk path (``chunk_size >= T``) and the kernel
tiles. Chunk size never changes results (DESIGN.md section 1), only speed. The cost model is written in
sympy (``gpu_model()``, ``cpu_model()``) and evaluated over all candidates at once through ``lambdify``.

Notation (per batch-head; H = batch_heads, n = ceil(T/C) chunks, by = bytes per element of q/k/v):

    b = block_feature, p = deg      state tiled in blocks of p coordinate blocks: fb = b^p features per tile,
                                    Dt = C(d/b + p - 1, p) * b^p features in all (D = C(d+p-1, p) untiled;
                                    d=64, p=2, b=16: 2560 against 2080)
    bt = block_t, be = block_e      chunk rows and value columns per program; ne = ceil(e/be)

Kernels of the chunked path (FLOP and bytes per program; causal, so a query row sees (C + bt)/2 keys of
its chunk on average):

    update  H*n*(Dt/fb)*ne programs: dS = phi(K_c)^T V_c on one (fb x be) state tile
            tensor 2*C*fb*be; phi C*fb*p CUDA-core ops; L2 C*(d + be)*by; DRAM K, V once + n*Dt*e*4 out
    scan    H*(Dt/fb)*ne programs, sequential over the n chunks: S_i = decay * S_{i-1} + dS_i (fp32)
            DRAM 2*n*Dt*e*4 (the state traffic ~ (T/C)*D*e per head)
    query   H*n*ceil(C/bt)*ne programs: y = phi(Q) S_{i-1} + intra-chunk power attention
            tensor 2*bt*Dt*be + 2*bt*(C+bt)/2*(d + be); CUDA-core bt*Dt*p + bt*(C+bt)/2*score_ops;
            L2 bt*d*by + (C+bt)/2*(d + be)*by + Dt*be*4 + bt*be*by; DRAM q, k, v, y once + n*Dt*e*4

so per token the state costs ~ 4*Dt*e FLOP whatever C, the intra-chunk attention ~ C*(d + e) FLOP, and the
state traffic ~ 16*Dt*e/C bytes (four fp32 passes over the per-chunk states). The single-chunk path is the
query kernel's attention part alone with C = T: H*ceil(T/bt)*ne programs, ~ T^2*(d + e) FLOP per head, no
state; it wins when T <= C or when Dt*e is so large that the state never pays (deg 4, d=64: D = 766480).

Time of a kernel with P programs, ``occ`` resident per SM (shared memory, registers, threads):

    occ_used = min(occ, ceil(P/SMs)),  waves = ceil(P / (SMs * occ_used))
                                       (single-chunk kernel, rows of unequal length: max(1, P / (SMs * occ_used)))
    busy     = max(tensor / (F_tc * warp_eff), cuda / F_cc, l2 / BW_l2, dram / (P * BW_dram))   per SM rates
    exposed  = loads / stage_bytes * latency / num_stages        (load latency the pipeline leaves exposed)
    t        = launch + waves * max(occ_used * busy, busy + exposed)

with ``tensor = sum over dots of FLOP / mma_efficiency(M, N)`` and ``warp_eff = min(1, occ_used*num_warps/8)``.
Constraints (the kernel tiling contract): shared memory per program
``num_stages*(bt*d + bt*be)*by + fb*be*4 <= smem_per_block_optin`` and registers per thread
``ceil(max(fb*be, bt*be + bt*bt) / (32*num_warps)) + 40 <= 255``, on both paths (a single-chunk kernel may be
the query kernel with one chunk; there b only sizes the unused state tile). The fastest feasible candidate
wins; candidates within ``TIE_TOLERANCE`` of it are a tie, broken toward the ``Plan`` default tiles. On Hopper with
16-bit kernels and heads up to ``PREFERRED_TILE_MAX_DIM`` a single-chunk winner then takes the tile measured
fastest, ``PREFERRED_SINGLE_TILE``.

On the CPU (``spec=None``) the aten chunked form runs: ``cpu_model()`` times it by terms fitted to measurements (the
C x C blocks, the states, the features, a cost per chunk, fresh pages past the mmap threshold), and only the chunk
size is chosen.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import sympy as sp
import torch

from .hardware import GpuSpec
from .power_features import state_dim
from .sizes import pow2_at_least


@dataclass(frozen=True)
class Plan:
    """How one call is computed. Chunk size never changes results, only speed (DESIGN.md section 1).

    chunk_size:    tokens per chunk; ``chunk_size >= T`` is the single-chunk (quadratic) path.
    block_t:       chunk rows (queries or keys) handled by one kernel program.
    block_feature: coordinate-block size b: the symmetric state is tiled in (b x b) feature blocks
                   (b^p features per tile for degree p).
    block_e:       value columns handled by one kernel program.
    num_warps, num_stages: Triton launch parameters.
    reason:        the numbers behind the choice, for the report.
    modelled_s:    the cost model's time for the whole call, in seconds.
    """

    chunk_size: int
    block_t: int = 64
    block_feature: int = 16
    block_e: int = 64
    num_warps: int = 4
    num_stages: int = 2
    reason: str = ""
    modelled_s: float = 0.0


CHUNKS = (64, 128, 256, 512, 1024, 2048)
# 16-bit calls on the chunked path with chunks shorter than this (only a forced chunk_size: CHUNKS start here) run
# the float32 kernels: a chunk of few keys hands few keys to each state, whose bf16 feature products cancel
# (codegen.forward.small_chunk_float32)
EXACT_CHUNK_BELOW = 64
# Tiles that reach the kernels (codegen/forward.py clamps value blocks to >= 64 columns and b to 16, and runs the
# chunked query kernel with its own warps): only these are considered.
BLOCK_T = (32, 64, 128)
BLOCK_E = (64, 128)
NUM_WARPS = (4, 8)
NUM_STAGES = (2, 3)
BLOCK_FEATURE = 16  # the chunked kernels' coordinate block
CHUNK_QUERY_WARPS = 8  # codegen.forward.CHUNK_QUERY_WARPS: the chunked path's warps are not the plan's
STATE_STAGES = 3  # codegen.forward.STATE_STAGES: the state kernel's pipeline depth (64-key steps)
PLAN_GRANULE = 1024  # lengths above this plan as if rounded up to a multiple of it: nearby T get one plan
MAX_FEATURES_PER_TILE = 4096
TIE_TOLERANCE = 1e-3  # modelled times this close are a tie: the tiles nearest the Plan defaults win

# Achieved fractions of the published peaks, measured on our H200: bf16 matmul ~789 of 989 TFLOP/s,
# device copy ~4245 of 4800 GB/s.
TENSOR_EFFICIENCY = 789 / 989
DRAM_EFFICIENCY = 4245 / 4800
SMEM_BYTES_PER_CLOCK = 128  # shared-memory bandwidth per SM (cc 8.x, 9.0)
L2_BYTES_PER_CLOCK = 32  # modelled L2 -> SM bandwidth per SM (calibrated by benchmarks/chunk_sweep.py)
LOAD_LATENCY_S = 6e-7  # global load latency hidden by num_stages loads in flight
LAUNCH_S = 3e-6  # per kernel launch
# Measured / modelled time per kernel (benchmarks/calibrate_planner.py over a chunk sweep on the H200): what the
# roofline terms leave out (feature construction, synchronous products, layout conversions).
KERNEL_SCALE = {"update": 3.71, "scan": 0.358, "query": 1.07, "attention": 1.95}
# The same for the CUDA wgmma state kernel, which the chunk sweeps above predate: H200, T=65536 b1 h8 d64 bf16, C=1024,
# 0.49 ms (profiler, forward_notes.md sessions 27-29) where the Triton state kernel's scale models 1.128 ms.
CUDA_UPDATE_SCALE = 2.47
# Query rows per warp of the single-chunk kernel: 128 rows on 4 warps (32 per warp) measured 1.4-2.2x their modelled
# time on the H200 (b1 h8 d64 bf16 causal ungated, do_bench ms, measured / modelled: T=4096 0.104 / 0.048, 8192
# 0.294 / 0.181, 12288 0.548 / 0.401), 128 rows on 8 warps at T=6144 0.134 / 0.136
# (benchmarks/results/quad_vs_chunk_NVIDIA-H200_2026-12-01_2be7b50.json): the model leaves out what a warp's share
# of a 128-row tile costs in registers.
MAX_ROWS_PER_WARP = 16
# The single-chunk tile (rows, warps) taken on Hopper with 16-bit kernels wherever it fits and the head dims are within
# PREFERRED_TILE_MAX_DIM. Of the tiles within MAX_ROWS_PER_WARP, 64 rows on 4 warps with 3 stages ran within 6% of the
# fastest single-chunk tile at every measured point (H200 b1 h8 bf16 causal, d = e in {32, 64, 128}, T = 4096, 6144,
# 8192, ungated and gated, do_bench ms; benchmarks/results/plan_NVIDIA-H200_2026-12-01_ace6222.json and
# ..._ae7f1a1_d32.json, ..._ae7f1a1_d128.json; their T=2048 rows are host noise, up to 1.3x either way): e.g. ungated
# at T = 4096 / 8192, d=64 0.074 / 0.204 against 0.085 / 0.230 for 128 rows on 8 warps, d=128 0.135 / 0.395 against
# 0.181 / 0.548. The model, which leaves out what splitting 128 rows over two warpgroups costs, ranks 128 rows on 8
# warps first (by up to 1.3x at d=128). The path stays the model's choice; only the tile is replaced.
PREFERRED_SINGLE_TILE = (64, 4)
PREFERRED_TILE_MAX_DIM = 128
# CUDA-core work per score of the power attention, in fp32-op equivalents, besides the log2(p) multiplies of the power
# itself: SCORE_OPS ungated (scale, causal mask, the fp32 -> 16-bit conversion of the weights and the layout changes
# between the two products), GATE_SCORE_OPS more with a gate (load G_j, subtract, exp, multiply). Not counts: fitted
# (least squares in log time) to the single-chunk kernel on 64 rows / 4 warps / 3 stages on the H200 (b1 h8 bf16
# causal, d = e in {32, 64, 128}, T = 4096, 6144, 8192, ungated and gated; the plan_ files named above), where at
# d <= 64 the kernel's time does not fall with d (ungated T=4096: 0.072 ms at d=32, 0.074 at d=64): per-score work,
# not the products, binds there. The fit's rms error is 18% (35% before, with 1 and 48).
SCORE_OPS = 24.0
GATE_SCORE_OPS = 18.0
MAX_REGS_PER_THREAD = 255
BASE_REGS_PER_THREAD = 40  # addresses, indices, loop state besides the fp32 accumulators
RESERVED_SMEM_PER_BLOCK = 1024  # the runtime's share per resident block (cc 8.0+)
MAX_BLOCKS_PER_SM = 32
WARPS_TO_FEED_TENSOR_CORES = 8  # two per SM sub-partition

# The CPU (aten path): seconds per term of ``cpu_model``'s time, fitted to the eager op's forward on 2 cores
# (x86_64, float32, b1 h4 d=e=64, T 1024-8192, chunks 64 to a single chunk; stop 62's table, session 63's fit): it then
# picks the measured best form at every T of the table (single chunk up to 2048, chunks of 256 or 512 from 4096) with
# at most 1.5% regret. Only their ratios shape the choice.
CPU_BLOCK_S = 3.0e-11  # per score and head dim of the C x C blocks: H T min(C, T) (d + e)
CPU_STATE_S = 6.2e-11  # per state product term: H (T - C) D e (the chunk states built and read)
CPU_FEATURE_S = 1.3e-8  # per embedded feature: H T D (the chunked form's phi(q), phi(k))
CPU_CHUNK_S = 6.6e-4  # per chunk and head: the aten ops' fixed costs
CPU_PAGED_S = 7.0e-9  # per block entry where a block matrix passes glibc's mmap threshold (fresh pages, zero-filled)
CPU_MMAP_BYTES = 32 * 2**20


class S:
    """The model's sympy symbols: the problem, the tiles, and the hardware (per-SM rates)."""

    T, C, d, e, H, nbytes = sp.symbols("T C d e H nbytes", positive=True)
    bt, be, fb, Dt, nw, ns = sp.symbols("block_t block_e features_per_tile tiled_state warps stages", positive=True)
    score_ops, feature_ops, update_scale = sp.symbols("score_ops feature_ops update_scale", positive=True)
    sms, f_tc, f_cc, bw_dram, bw_l2, mma_clock = sp.symbols(
        "sm_count tensor_flops_per_sm cuda_flops_per_sm dram_bytes_per_sm l2_bytes_per_sm tensor_flops_per_clock",
        positive=True,
    )
    smem_sm, regs_sm, threads_sm = sp.symbols("smem_per_sm regs_per_sm threads_per_sm", positive=True)
    D = sp.Symbol("state_dim", positive=True)

    gpu = (
        T, C, d, e, H, nbytes, bt, be, fb, Dt, nw, ns, score_ops, feature_ops, update_scale,
        sms, f_tc, f_cc, bw_dram, bw_l2, mma_clock, smem_sm, regs_sm, threads_sm,
    )  # fmt: skip
    cpu = (T, C, d, e, H, D)


def _max(*args: sp.Expr) -> sp.Expr:
    """``Max`` without sympy's pairwise simplification (seconds on these expressions, and it finds nothing)."""
    return sp.Max(*args, evaluate=False)


def _min(*args: sp.Expr) -> sp.Expr:
    return sp.Min(*args, evaluate=False)


class Kernel(NamedTuple):
    """One kernel of a path: program count, and per program its dots (FLOP, M, N), CUDA-core ops and loads."""

    name: str
    programs: sp.Expr
    dots: tuple[tuple[sp.Expr, sp.Expr, sp.Expr], ...]
    cuda_ops: sp.Expr
    l2_bytes: sp.Expr
    dram_bytes: sp.Expr  # the whole kernel's DRAM traffic
    stage_bytes: sp.Expr
    smem: sp.Expr  # per program
    uneven: bool = False  # programs of unequal length (causal rows), each started as a slot frees


def mma_efficiency(rows: sp.Expr, cols: sp.Expr) -> sp.Expr:
    """Fraction of the tensor peak an output tile (rows x cols) sustains.

    Rows pad to the 64-row MMA granule; per 16-deep k-step the SM reads (64 + cols) x 16 operands from shared
    memory at ``SMEM_BYTES_PER_CLOCK`` while the tensor cores take 2*64*cols*16 / F clocks:
    ``min(1, rows/64) * min(1, 128*cols*SMEM_BW / (F*(64 + cols)*by))`` (Hopper bf16: cols >= 64 saturates).
    """
    operand_bound = 128 * cols * SMEM_BYTES_PER_CLOCK / (S.mma_clock * (64 + cols) * S.nbytes)
    return _min(1, rows / 64) * _min(1, operand_bound)


def smem_query() -> sp.Expr:
    """Shared memory of the chunked query kernel: ``by*(fb*bt + 3/4*bt*d + ns*(be*fb + 2*bt*b))``.

    phi(q)^T (fb x bt) and the q tile's layout conversions, plus per stage the S^T tile (be x fb) and the two
    (bt x b) coordinate blocks of q; fitted to Triton 3.6's allocation for sm_90 (d = 64, 128; within 5%).
    """
    b = sp.sqrt(S.fb)
    return S.nbytes * (S.fb * S.bt + sp.Rational(3, 4) * S.bt * S.d + S.ns * (S.be * S.fb + 2 * S.bt * b))


def smem_single() -> sp.Expr:
    """Shared memory of the quadratic kernel: ``by*(bt*d + ns*64*(d + be))`` (q tile, 64-key k/v stages)."""
    return S.nbytes * (S.bt * S.d + S.ns * 64 * (S.d + S.be))


def smem_state() -> sp.Expr:
    """Shared memory of the state kernel: ``by*(STATE_STAGES*64*(2*b + be) + 64*fb)`` (k/v stages, phi(k))."""
    return S.nbytes * (STATE_STAGES * 64 * (2 * sp.sqrt(S.fb) + S.be) + 64 * S.fb)


def regs_per_thread() -> sp.Expr:
    """fp32 accumulators of the larger kernel (state tile, or y plus scores) spread over the threads, plus a base."""
    accumulators = _max(S.fb * S.be, S.bt * S.be + S.bt * S.bt)
    return sp.ceiling(accumulators / (32 * S.nw)) + BASE_REGS_PER_THREAD


def occupancy(smem: sp.Expr) -> sp.Expr:
    """Programs resident per SM (at least 1: infeasible tiles are rejected by ``feasible`` instead)."""
    by_smem = S.smem_sm / (smem + RESERVED_SMEM_PER_BLOCK)
    by_regs = S.regs_sm / (regs_per_thread() * 32 * S.nw)
    by_threads = S.threads_sm / (32 * S.nw)
    return _max(1, sp.floor(_min(by_smem, by_regs, by_threads, MAX_BLOCKS_PER_SM)))


def attention_part(keys: sp.Expr) -> tuple[tuple[tuple[sp.Expr, sp.Expr, sp.Expr], ...], sp.Expr, sp.Expr]:
    """Power attention of bt query rows against ``keys`` keys: (dots, CUDA-core ops, L2 bytes) per program."""
    dots = ((2 * S.bt * keys * S.d, S.bt, S.bt), (2 * S.bt * keys * S.be, S.bt, S.be))
    return dots, S.bt * keys * S.score_ops, (S.bt * S.d + keys * (S.d + S.be) + S.bt * S.be) * S.nbytes


def chunked_kernels() -> tuple[Kernel, ...]:
    """update, scan and query kernels of the chunked path (see the module docstring)."""
    chunks, e_blocks, tiles = sp.ceiling(S.T / S.C), sp.ceiling(S.e / S.be), S.Dt / S.fb
    state_pass = S.H * chunks * S.Dt * S.e * 4
    update = Kernel(
        "update",
        programs=S.H * chunks * tiles * e_blocks,
        dots=((2 * S.C * S.fb * S.be, S.fb, S.be),),
        cuda_ops=S.C * S.fb * S.feature_ops,
        l2_bytes=S.C * (S.d + S.be) * S.nbytes,
        dram_bytes=S.H * S.T * (S.d + S.e) * S.nbytes + state_pass,
        stage_bytes=S.bt * (S.d + S.be) * S.nbytes,
        smem=smem_state(),
    )
    scan = Kernel(
        "scan",
        programs=S.H * tiles * e_blocks,
        dots=(),
        cuda_ops=2 * chunks * S.fb * S.be,
        l2_bytes=sp.Integer(0),
        dram_bytes=2 * state_pass,
        stage_bytes=S.fb * S.be * 4,
        smem=sp.Integer(0),
    )
    dots, cuda_ops, l2_bytes = attention_part((S.C + S.bt) / 2)
    query = Kernel(
        "query",
        programs=S.H * chunks * sp.ceiling(S.C / S.bt) * e_blocks,
        dots=((2 * S.bt * S.Dt * S.be, S.bt, S.be), *dots),
        cuda_ops=S.bt * S.Dt * S.feature_ops + cuda_ops,
        l2_bytes=l2_bytes + S.Dt * S.be * 4,
        dram_bytes=S.H * S.T * (2 * S.d + 2 * S.e) * S.nbytes + state_pass,
        stage_bytes=S.bt * (S.d + S.be) * S.nbytes,
        smem=smem_query(),
    )
    return update, scan, query


def single_chunk_kernels() -> tuple[Kernel, ...]:
    """The single-chunk path: causal power attention over all T keys (no state)."""
    dots, cuda_ops, l2_bytes = attention_part((S.T + S.bt) / 2)
    attention = Kernel(
        "attention",
        programs=S.H * sp.ceiling(S.T / S.bt) * sp.ceiling(S.e / S.be),
        dots=dots,
        cuda_ops=cuda_ops,
        l2_bytes=l2_bytes,
        dram_bytes=S.H * S.T * (2 * S.d + 2 * S.e) * S.nbytes,
        stage_bytes=S.bt * (S.d + S.be) * S.nbytes,
        smem=smem_single(),
        uneven=True,
    )
    return (attention,)


def kernel_terms(kernel: Kernel) -> dict[str, sp.Expr]:
    """Per-SM times of one kernel (tensor, cuda, l2, dram, latency), its waves and total time."""
    occ = _min(occupancy(kernel.smem), sp.ceiling(kernel.programs / S.sms))
    slots = S.sms * occ
    # Programs of one length finish together: a partial wave costs a whole one. Unequal ones (the causal rows of the
    # single-chunk kernel) fill the slots as they free: a partial wave costs its share.
    waves = _max(1, kernel.programs / slots) if kernel.uneven else sp.ceiling(kernel.programs / slots)
    warp_eff = _min(1, occ * S.nw / WARPS_TO_FEED_TENSOR_CORES)
    tensor = sum((flops / mma_efficiency(m, n) for flops, m, n in kernel.dots), sp.Integer(0))
    dram_per_program = kernel.dram_bytes / kernel.programs
    terms = {
        "tensor": tensor / (S.f_tc * warp_eff),
        "cuda": kernel.cuda_ops / S.f_cc,
        "l2": kernel.l2_bytes / S.bw_l2,
        "dram": dram_per_program / S.bw_dram,
    }
    busy = _max(*terms.values())
    exposed = (kernel.l2_bytes + dram_per_program) / kernel.stage_bytes * LOAD_LATENCY_S / S.ns
    return {
        **terms,
        "latency": exposed,
        "resident": occ,
        "waves": waves,
        "programs": kernel.programs,
        "time": LAUNCH_S + kernel_scale(kernel.name) * waves * _max(occ * busy, busy + exposed),
    }


def kernel_scale(name: str) -> sp.Expr | float:
    """Measured / modelled time of kernel ``name``: ``KERNEL_SCALE``'s, but for the state update a model input
    (``update_scale``: which state kernel runs depends on the GPU and dtype)."""
    return S.update_scale if name == "update" else KERNEL_SCALE[name]


def update_scale(spec: GpuSpec, dtype: torch.dtype, e: int) -> float:
    """``CUDA_UPDATE_SCALE`` where ``codegen="auto"`` takes the CUDA wgmma state kernel (Hopper, bf16, value
    blocks of 64: ``codegen/cuda_state``), else the Triton state kernel's ``KERNEL_SCALE["update"]``."""
    wgmma = spec.compute_capability == (9, 0) and dtype == torch.bfloat16 and e % 64 == 0
    return CUDA_UPDATE_SCALE if wgmma else KERNEL_SCALE["update"]


@functools.cache
def gpu_model() -> dict[str, sp.Expr]:
    """The sympy model: per-kernel terms (``"update.tensor"``, ...), path times, and the constraints."""
    exprs: dict[str, sp.Expr] = {
        "smem.chunked": smem_query(),
        "smem.single": smem_single(),
        "regs": regs_per_thread(),
        "occupancy": occupancy(smem_query()),
    }
    for path, kernels in (("chunked", chunked_kernels()), ("single", single_chunk_kernels())):
        total = sp.Integer(0)
        for kernel in kernels:
            terms = kernel_terms(kernel)
            exprs.update({f"{kernel.name}.{key}": value for key, value in terms.items()})
            total += terms["time"]
        exprs[f"{path}.time"] = total
    return exprs


@functools.cache
def cpu_model() -> dict[str, sp.Expr]:
    """The aten chunked form on the CPU, per chunk size C (``C >= T``: one chunk, no state).

    FLOP:  H*(2*T*min(C,T)*(d+e) + 4*max(T-C, 0)*D*e)     full C x C blocks, state update + query
    bytes: H*(12*T*min(C,T) + max(T-C, 0)*(8*D + 8*D*e/C)) fp32 weights (3 passes), phi, state per chunk
    time:  CPU_BLOCK_S H T min(C,T) (d+e) + CPU_STATE_S H max(T-C, 0) D e + CPU_FEATURE_S H T D [C < T]
           + CPU_CHUNK_S H ceil(T/C) + CPU_PAGED_S H T min(C,T) [4 H T min(C,T) > CPU_MMAP_BYTES]

    The time is fitted to measurements (the constants' comment), not derived from FLOP and bytes at fixed rates: such
    a form fitted them with a negative bytes rate and chose chunks of 512 at T=2048, where the single chunk took half
    the time (275 against 140 ms). The single chunk's time grows about 6-7x per doubling of T past a few thousand
    keys, not 4x: its float32 block matrices pass glibc's mmap threshold, and every call's fresh pages are
    zero-filled by the kernel (the last term).
    """
    rows, rest = _min(S.C, S.T), _max(S.T - S.C, 0)
    flops = S.H * (2 * S.T * rows * (S.d + S.e) + 4 * rest * S.D * S.e)
    traffic = S.H * (12 * S.T * rows + rest * (8 * S.D + 8 * S.D * S.e / S.C))
    chunked = sp.Piecewise((1, S.C < S.T), (0, True))
    paged = sp.Piecewise((1, 4 * S.H * S.T * rows > CPU_MMAP_BYTES), (0, True))
    time = (
        CPU_BLOCK_S * S.H * S.T * rows * (S.d + S.e)
        + CPU_STATE_S * S.H * rest * S.D * S.e
        + CPU_FEATURE_S * S.H * S.T * S.D * chunked
        + CPU_CHUNK_S * S.H * sp.ceiling(S.T / S.C)
        + CPU_PAGED_S * S.H * S.T * rows * paged
    )
    return {"flops": flops, "bytes": traffic, "time": time}


@functools.cache
def _compiled(which: str) -> Callable[..., dict[str, np.ndarray]]:
    """The numeric fast path: the model's expressions lambdified to numpy, evaluated over candidate arrays."""
    symbols = S.gpu if which == "gpu" else S.cpu
    names, fn = _lambdified(which)

    def evaluate(**values: np.ndarray | float) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            outputs = fn(*(values[str(s)] for s in symbols))
        shape = np.broadcast_shapes(*(np.shape(v) for v in values.values()))
        return {name: np.broadcast_to(np.asarray(out, dtype=np.float64), shape) for name, out in zip(names, outputs)}

    return evaluate


def _lambdified(which: str) -> tuple[list[str], Callable[..., list]]:
    """The names of model ``which`` and its expressions as one numpy function.

    Printing the GPU model's ~40 expressions (``sp.lambdify``) takes ~0.2 s, in every process: the printed source
    and the globals it names (numpy's ufuncs, ``reduce``; float constants such as the ``nan`` that a ``Piecewise``
    prints for its default, by value) are kept in the kernel cache under a key of the package's code and the sympy
    and numpy versions, and later processes execute that source. An entry that cannot be read or rebuilt (missing,
    truncated, another version) is printed again."""
    from .codegen import cache

    path = cache.code_keyed_entry("planner", f"{which}_", which, f"sympy={sp.__version__}", f"numpy={np.__version__}")
    record = cache.load_json(path)
    if record is not None:
        try:
            return _rebuild(record)
        except (ValueError, KeyError, TypeError, ImportError, AttributeError, SyntaxError):
            pass
    model, symbols = (gpu_model(), S.gpu) if which == "gpu" else (cpu_model(), S.cpu)
    names = list(model)
    fn = sp.lambdify(symbols, [model[name] for name in names], modules="numpy")
    used = {name: fn.__globals__[name] for name in fn.__code__.co_names if name in fn.__globals__}
    constants = {name: repr(value) for name, value in used.items() if isinstance(value, float)}
    try:
        record = {
            "names": names,
            "function": fn.__name__,
            "source": inspect.getsource(fn),
            "globals": {name: [value.__name__, ""] if inspect.ismodule(value) else [value.__module__, value.__name__]
                        for name, value in used.items() if name not in constants},
            "constants": constants,
        }  # fmt: skip
    except (OSError, TypeError, AttributeError):  # a source or a global it cannot name: nothing to keep
        return names, fn
    cache.store_json(path, record)
    return names, fn


def _rebuild(record: dict) -> tuple[list[str], Callable[..., list]]:
    """The function of a cached ``_lambdified`` record: its source executed over the globals and constants it names."""
    namespace: dict[str, object] = {name: float(value) for name, value in record["constants"].items()}
    for name, (module, attribute) in record["globals"].items():
        value = importlib.import_module(module)
        namespace[name] = getattr(value, attribute) if attribute else value
    exec(compile(record["source"], f"<retention_compile planner model {record['function']}>", "exec"), namespace)
    return list(record["names"]), namespace[record["function"]]


def tiled_state_dim(head_dim: int, block_feature: int, deg: int) -> int:
    """``Dt = C(d/b + p - 1, p) * b^p``: features when the state is tiled in p-tuples of b-coordinate blocks."""
    return math.comb(head_dim // block_feature + deg - 1, deg) * block_feature**deg


def hardware_values(spec: GpuSpec, dtype: torch.dtype) -> dict[str, float]:
    """The hardware symbols' values: per-SM achieved rates (fp32 inputs run tf32 at half the bf16 rate)."""
    rate = 1.0 if dtype.itemsize == 2 else 0.5
    clock = spec.clock_mhz * 1e6
    return {
        "sm_count": spec.sm_count,
        "tensor_flops_per_sm": spec.bf16_tflops * 1e12 * rate * TENSOR_EFFICIENCY / spec.sm_count,
        "cuda_flops_per_sm": spec.fp32_tflops * 1e12 / spec.sm_count,
        "dram_bytes_per_sm": spec.mem_bandwidth_gbs * 1e9 * DRAM_EFFICIENCY / spec.sm_count,
        "l2_bytes_per_sm": L2_BYTES_PER_CLOCK * clock,
        "tensor_flops_per_clock": spec.tensor_flops_per_clock * rate,
        "smem_per_sm": spec.smem_per_sm,
        "regs_per_sm": spec.regs_per_sm,
        "threads_per_sm": spec.max_threads_per_sm,
    }


class Candidates(NamedTuple):
    """Every configuration considered for one problem, as parallel arrays, with the model evaluated on them."""

    chunk: np.ndarray
    single: np.ndarray  # bool: the single-chunk path (chunk >= T)
    block_t: np.ndarray
    block_feature: np.ndarray
    block_e: np.ndarray
    num_warps: np.ndarray
    num_stages: np.ndarray
    inputs: dict[str, np.ndarray | float]  # the value of every model symbol, by name, per candidate or shared
    values: dict[str, np.ndarray]  # model outputs ("smem", "update.time", ...) per candidate
    time: np.ndarray
    feasible: np.ndarray

    def plan(self, i: int, reason: str = "") -> Plan:
        return Plan(
            chunk_size=int(self.chunk[i]),
            block_t=int(self.block_t[i]),
            block_feature=int(self.block_feature[i]),
            block_e=int(self.block_e[i]),
            num_warps=int(self.num_warps[i]),
            num_stages=int(self.num_stages[i]),
            reason=reason,
            modelled_s=float(self.time[i]),
        )

    def substitution(self, i: int) -> dict[sp.Symbol, sp.Number]:
        """Candidate i's symbol values as sympy numbers: ``gpu_model()[name].xreplace(...)`` evaluates exactly."""
        values = (float(np.broadcast_to(self.inputs[str(sym)], self.chunk.shape)[i]) for sym in S.gpu)
        return {sym: sp.Integer(int(v)) if v.is_integer() else sp.Float(v) for sym, v in zip(S.gpu, values)}


def _block_feature(head_dim: int) -> int:
    """The coordinate block b: ``BLOCK_FEATURE``, or the largest power of 2 dividing d below it (single-chunk only)."""
    return next(b for b in (BLOCK_FEATURE, 8, 4, 2, 1) if head_dim % b == 0)


def _chunks_capable(d: int, deg: int) -> bool:
    """Whether the chunked kernels take the shape: deg 2 and ``BLOCK_FEATURE`` dividing d."""
    return deg == 2 and d % BLOCK_FEATURE == 0


def _tile_grid(T: int, d: int, e: int, deg: int, given_chunk: tuple[int, bool] | None) -> list[np.ndarray]:
    """Columns chunk, block_t, block_feature, block_e, num_warps, num_stages of every candidate.

    Chunks: CHUNKS below T when the chunked kernels take the shape, plus the single-chunk size (T rounded up to a
    power of 2); ``given_chunk = (chunk, chunked)``: that chunk alone (rounded up to a power of 2, as the kernels
    take it) on the path the call takes. block_t <= chunk; block_e: ``BLOCK_E`` up to e rounded up to a power of 2
    (that alone when it is narrower); warps vary on the single-chunk path only.
    """
    chunks = [c for c in CHUNKS if c < T and _chunks_capable(d, deg)] + [pow2_at_least(T)]
    if given_chunk is not None:
        chunks = [pow2_at_least(given_chunk[0]) if given_chunk[1] else pow2_at_least(T)]
    e_pad = pow2_at_least(e)
    e_blocks = [x for x in BLOCK_E if x <= e_pad] or [e_pad]
    grid = itertools.product(chunks, BLOCK_T, [_block_feature(d)], e_blocks, NUM_WARPS, NUM_STAGES)

    def single(chunk: int) -> bool:
        return chunk >= T if given_chunk is None else not given_chunk[1]

    rows = [
        r for r in grid
        if r[1] <= max(r[0], BLOCK_T[0])
        and (r[4] == CHUNK_QUERY_WARPS if not single(r[0]) else r[1] <= MAX_ROWS_PER_WARP * r[4])
    ]  # fmt: skip
    return [np.array(col, dtype=np.int64) for col in zip(*rows)]


def gpu_candidates(
    spec: GpuSpec,
    T: int,
    d: int,
    e: int,
    deg: int,
    dtype: torch.dtype,
    gated: bool,
    batch_heads: int,
    given_chunk: tuple[int, bool] | None = None,
    cuda_state: bool = True,
) -> Candidates:
    """Every (chunk, tiles) the model considers (``given_chunk = (chunk, chunked)``: that chunk alone, on the path
    the call takes), evaluated; infeasible ones are kept but flagged. ``cuda_state``: as ``plan``'s."""
    chunk, block_t, block_feature, block_e, warps, stages = _tile_grid(T, d, e, deg, given_chunk)
    single = chunk >= T if given_chunk is None else np.full(chunk.shape, not given_chunk[1])
    inputs: dict[str, np.ndarray | float] = {
        "T": float(T),
        "C": chunk.astype(np.float64),
        "d": float(d),
        "e": float(e),
        "H": float(batch_heads),
        "nbytes": float(dtype.itemsize),
        "block_t": block_t.astype(np.float64),
        "block_e": block_e.astype(np.float64),
        "features_per_tile": np.where(single, 1.0, block_feature.astype(np.float64) ** deg),  # no state: none
        "tiled_state": np.vectorize(lambda b: float(tiled_state_dim(d, int(b), deg)))(block_feature),
        "warps": warps.astype(np.float64),
        "stages": stages.astype(np.float64),
        "score_ops": math.log2(deg) + SCORE_OPS + GATE_SCORE_OPS * gated,
        "feature_ops": float(deg),
        "update_scale": update_scale(spec, dtype, e) if cuda_state else KERNEL_SCALE["update"],
        **hardware_values(spec, dtype),
    }
    values = _compiled("gpu")(**inputs)
    values["smem"] = np.where(single, values["smem.single"], values["smem.chunked"])
    time = np.where(single, values["single.time"], values["chunked.time"])
    feasible = (
        (values["smem"] <= spec.smem_per_block_optin)
        & (values["regs"] <= MAX_REGS_PER_THREAD)
        & (values["regs"] * 32 * warps <= spec.regs_per_sm)
        & (32 * warps <= spec.max_threads_per_sm)
    )
    return Candidates(chunk, single, block_t, block_feature, block_e, warps, stages, inputs, values, time, feasible)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _dominant(values: dict[str, np.ndarray], kernel: str, i: int) -> str:
    """The resource that sets a kernel's wave time: the largest busy term, or the exposed load latency."""
    busy_terms = {term: values[f"{kernel}.{term}"][i] for term in ("tensor", "cuda", "l2", "dram")}
    busy = max(busy_terms.values())
    if busy + values[f"{kernel}.latency"][i] > values[f"{kernel}.resident"][i] * busy:
        return "latency"
    return max(busy_terms, key=busy_terms.__getitem__)


def _describe_path(cands: Candidates, i: int) -> str:
    """``chunked C=1024: 0.512 ms = update 0.210 ms (tensor-bound) + ...`` for candidate i."""
    kernels = ("attention",) if cands.single[i] else ("update", "scan", "query")
    parts = " + ".join(
        f"{k} {_ms(cands.values[f'{k}.time'][i])} ({_dominant(cands.values, k, i)}-bound, "
        f"{cands.values[f'{k}.waves'][i]:.3g} waves)"
        for k in kernels
    )
    path = "single-chunk" if cands.single[i] else f"chunked C={cands.chunk[i]}"
    return f"{path}: {_ms(cands.time[i])} = {parts}"


def _binding(cands: Candidates, spec: GpuSpec, best: int) -> str:
    """The limit that excludes the nearest configuration the model would prefer to the chosen one.

    Nearest: fewest doublings/halvings of chunk and tiles away from the chosen configuration (ties: faster).
    """
    excluded = np.flatnonzero(~cands.feasible & (cands.time < cands.time[best]))
    if excluded.size == 0:
        return "no resource limit binds (these tiles are the model's unconstrained optimum)"
    distance = sum(
        np.abs(np.log2(getattr(cands, f)[excluded] / getattr(cands, f)[best]))
        for f in ("chunk", "block_t", "block_feature", "block_e", "num_warps", "num_stages")
    )
    j = excluded[np.lexsort((cands.time[excluded], distance))[0]]
    smem, regs = cands.values["smem"][j], cands.values["regs"][j]
    if smem > spec.smem_per_block_optin:
        limit = f"needs {smem / 1024:.1f} KB smem > {spec.smem_per_block_optin / 1024:.1f} KB opt-in per block"
    else:
        limit = f"needs {regs:.0f} registers/thread x {cands.num_warps[j]} warps (limit {MAX_REGS_PER_THREAD}/thread)"
    tiles = (
        f"C={cands.chunk[j]} block_t={cands.block_t[j]} b={cands.block_feature[j]} block_e={cands.block_e[j]} "
        f"warps={cands.num_warps[j]} stages={cands.num_stages[j]}"
    )
    return f"binding: {tiles} would model {_ms(cands.time[j])} but {limit}"


def _gpu_reason(cands: Candidates, spec: GpuSpec, best: int, modelled_best: int, problem: str) -> str:
    """Why ``best``: its path and kernels, the runner-up chunk size against the model's fastest (``modelled_best``,
    on the same path), its tiles, and what binds them (or that the measured single-chunk tile replaced the model's)."""
    order = np.flatnonzero(cands.feasible)
    other_chunk = order[cands.chunk[order] != cands.chunk[best]]
    runner = other_chunk[np.argmin(cands.time[other_chunk])] if other_chunk.size else None
    margin = (cands.time[runner] / cands.time[modelled_best] - 1) * 100 if runner is not None else 0.0
    replaced = best != modelled_best
    runner_up = (
        f"runner-up {_describe_path(cands, runner)} (+{margin:.1f}%{' over the model tile' if replaced else ''})"
        if runner is not None
        else "no other chunk size considered"
    )
    v = cands.values
    tiles = (
        f"tiles block_t={cands.block_t[best]} block_feature={cands.block_feature[best]} "
        f"block_e={cands.block_e[best]} warps={cands.num_warps[best]} stages={cands.num_stages[best]}: "
        f"smem {v['smem'][best] / 1024:.1f}/{spec.smem_per_block_optin / 1024:.1f} KB, "
        f"{v['regs'][best]:.0f} regs/thread, {v['occupancy'][best]:.0f} programs/SM on {spec.sm_count} SMs"
    )
    why = _binding(cands, spec, modelled_best)
    if replaced:  # the model's tile, its time and what binds it, in place of the chosen tile's
        why = (
            f"the single-chunk tile measured fastest on Hopper (PREFERRED_SINGLE_TILE) in place of the model tile "
            f"block_t={cands.block_t[modelled_best]} warps={cands.num_warps[modelled_best]} "
            f"stages={cands.num_stages[modelled_best]} at {_ms(cands.time[modelled_best])} (model tile: "
            f"{why})"
        )
    return f"{spec.name}, {problem}: {_describe_path(cands, best)}; {runner_up}; {tiles}; {why}"


def _problem(T: int, d: int, e: int, deg: int, dtype: torch.dtype, gated: bool, batch_heads: int) -> str:
    dim = state_dim(d, deg)
    gate = "gated" if gated else "ungated"
    return f"T={T} d={d} e={e} deg={deg} (D={dim}) {str(dtype).removeprefix('torch.')} {gate} x{batch_heads} heads"


def _distance_from_defaults(cands: Candidates) -> np.ndarray:
    """``sum |log2(tile / default tile)|`` over the Plan's tile fields: the tie-break among equal times."""
    defaults = Plan(chunk_size=0)
    fields = ("block_t", "block_feature", "block_e", "num_warps", "num_stages")
    return sum(np.abs(np.log2(getattr(cands, f) / getattr(defaults, f))) for f in fields)


def _choose(cands: Candidates, feasible: np.ndarray) -> int:
    """The fastest feasible candidate; within ``TIE_TOLERANCE`` of it, on the single-chunk path the most copy stages,
    then the tiles closest to the defaults.

    The model rarely tells 2 single-chunk stages from 3, and 3 ran faster at every measured length (H200 b1 h8 d64
    bf16 causal, 64 rows / 4 warps, do_bench ms, 3 against 2 stages: T=2048 0.031 / 0.042 ungated, 0.047 / 0.055
    gated; 4096 0.073 / 0.082, 0.107 / 0.115; 8192 0.205 / 0.236; plan_check_NVIDIA-H200_2026-12-01_7a58156.json
    under benchmarks/results)."""
    times = cands.time[feasible]
    tied = feasible[times <= times.min() * (1 + TIE_TOLERANCE)]
    stages_first = np.where(cands.single[tied], -cands.num_stages[tied], 0)
    order = np.lexsort((cands.time[tied], _distance_from_defaults(cands)[tied], stages_first))
    return int(tied[order[0]])


def _on_measured_single_tile(cands: Candidates, spec: GpuSpec, feasible: np.ndarray, best: int) -> int:
    """``best``, or where it is a single-chunk candidate on Hopper with 16-bit kernels and head dims within
    ``PREFERRED_TILE_MAX_DIM``, the fastest feasible one on ``PREFERRED_SINGLE_TILE`` (ties as ``_choose`` breaks
    them), where one fits."""
    measured = (
        spec.compute_capability[0] == 9
        and cands.inputs["nbytes"] == 2
        and max(cands.inputs["d"], cands.inputs["e"]) <= PREFERRED_TILE_MAX_DIM
    )
    if not cands.single[best] or not measured:
        return best
    rows, warps = PREFERRED_SINGLE_TILE
    on_tile = feasible[
        cands.single[feasible] & (cands.block_t[feasible] == rows) & (cands.num_warps[feasible] == warps)
    ]
    return _choose(cands, on_tile) if on_tile.size else best


def _plan_gpu(spec: GpuSpec, given_chunk: tuple[int, bool] | None, cuda_state: bool, *problem) -> Plan | None:
    """The best feasible candidate for ``problem = (T, d, e, deg, dtype, gated, batch_heads)``, or None when no
    candidate fits the GPU."""
    cands = gpu_candidates(spec, *problem, given_chunk, cuda_state)
    feasible = np.flatnonzero(cands.feasible)
    if feasible.size == 0:
        return None
    modelled_best = _choose(cands, feasible)
    best = _on_measured_single_tile(cands, spec, feasible, modelled_best)
    return cands.plan(best, _gpu_reason(cands, spec, best, modelled_best, _problem(*problem)))


def _plan_cpu(T: int, d: int, e: int, deg: int, dtype: torch.dtype, gated: bool, bh: int) -> Plan:
    chunks = np.array([c for c in CHUNKS if c < T] + [pow2_at_least(T)], dtype=np.int64)
    values = _compiled("cpu")(
        T=float(T), C=chunks.astype(np.float64), d=float(d), e=float(e), H=float(bh), state_dim=float(state_dim(d, deg))
    )
    order = np.argsort(values["time"], kind="stable")
    best = order[0]

    def describe(i: int) -> str:
        path = "single-chunk" if chunks[i] >= T else f"chunked C={chunks[i]}"
        flops, traffic = values["flops"][i], values["bytes"][i]
        return f"{path} {_ms(values['time'][i])} ({flops / 1e9:.2f} GFLOP, {traffic / 1e6:.1f} MB)"

    runner = f"runner-up {describe(order[1])}" if order.size > 1 else "no other chunk size considered"
    reason = f"CPU (aten path), {_problem(T, d, e, deg, dtype, gated, bh)}: {describe(best)}; {runner}"
    return Plan(chunk_size=int(chunks[best]), reason=reason, modelled_s=float(values["time"][best]))


# The longest power-of-2 length ``single_chunk_limit`` tries
SINGLE_CHUNK_SEARCH_MAX = 1 << 20


@functools.lru_cache(maxsize=64)
def single_chunk_limit(
    spec: GpuSpec | None,
    d: int,
    e: int,
    deg: int,
    dtype: torch.dtype,
    gated: bool,
    batch_heads: int,
    cuda_state: bool = True,
) -> int:
    """The longest length ``2^n <= SINGLE_CHUNK_SEARCH_MAX`` such that ``plan`` gives every power of 2 up to it one
    chunk: where a graph traced with a symbolic length switches from one chunk (the quadratic kernel, the aten path's
    quadratic form) to chunks for this shape, whatever the length it was traced at (``ops.resolve_plan``)."""
    limit, length = 0, 1
    while length <= SINGLE_CHUNK_SEARCH_MAX:
        if plan(spec, length, d, e, deg, dtype, gated, batch_heads, 0, cuda_state).chunk_size < length:
            break
        limit, length = length, 2 * length
    return limit


def kernel_dtype(dtype: torch.dtype, on_cuda: bool, chunk_size: int = 0) -> torch.dtype:
    """The dtype the kernels run for inputs of ``dtype``: float16 on CUDA runs the float32 Triton kernels
    (``codegen.forward.kernel_inputs``; ``codegen="cuda"`` keeps it beside the CUDA state kernel), and so do both
    16-bit dtypes with a forced ``chunk_size`` under ``EXACT_CHUNK_BELOW`` (0: planned, never that short)."""
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    # the chunk rounded up to a power of 2, as the kernels run it
    short = sixteen_bit and chunk_size > 0 and pow2_at_least(chunk_size) < EXACT_CHUNK_BELOW
    return torch.float32 if on_cuda and (dtype == torch.float16 or short) else dtype


@functools.lru_cache(maxsize=512)
def plan(
    spec: GpuSpec | None,
    T: int,
    d: int,
    e: int | None = None,
    deg: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    gated: bool = False,
    batch_heads: int = 1,
    chunk_size: int = 0,
    cuda_state: bool = True,
) -> Plan:
    """The chunk size and tiles with the least modelled time for one call (``spec=None``: the CPU aten path).

    T: key length; d, e: head dims of q/k and v (e defaults to d); batch_heads: B x Hk programs' worth of
    independent heads; ``chunk_size > 0``: the tiles for that chunk (the caller's choice), not the best chunk;
    ``cuda_state``: the CUDA state kernel may run (``update_scale``; not with ``codegen="triton"`` or without a CUDA
    compiler).
    On a GPU, T above ``PLAN_GRANULE`` is planned rounded up to a multiple of it, so that nearby lengths run the
    same kernels. Deterministic (cached); never changes results, only speed.
    """
    if T < 1 or d < 1 or batch_heads < 1:
        raise ValueError(f"plan needs T, d, batch_heads >= 1, got T={T}, d={d}, batch_heads={batch_heads}")
    e = d if e is None else e
    if spec is None:
        return _plan_cpu(T, d, e, deg, dtype, gated, batch_heads)
    given_chunk = None if chunk_size <= 0 else (chunk_size, chunk_size < T and _chunks_capable(d, deg))
    if T > PLAN_GRANULE:
        T = -(-T // PLAN_GRANULE) * PLAN_GRANULE
    problem = (T, d, e, deg, dtype, gated, batch_heads)
    if given_chunk is not None:  # where no modelled tiles fit that chunk: the free plan's (fitting.py shrinks them)
        chosen = _plan_gpu(spec, given_chunk, cuda_state, *problem)
        if chosen is not None:
            return chosen
    chosen = _plan_gpu(spec, None, cuda_state, *problem)
    if chosen is None:
        raise ValueError(f"no tile configuration fits {spec.name} for d={d}, e={e}, deg={deg}")
    return chosen
