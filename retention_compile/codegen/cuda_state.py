"""The chunk-state kernel of the chunked forward in CUDA C++ (``cuda_templates/chunk_state.cu.j2``).

A drop-in for the Triton ``state_kernel`` of ``templates/forward.py.j2``: the same programs in a segment-major grid
(heads, pairs x value blocks, segments: the Triton kernel's is segment-minor; ``dispatch`` models why, and
``forward.state_segments`` picks the segment count by it), the same buffers, the same numbers up to rounding, so the
Triton scan and query kernels read its output unchanged. For every chunk c of its segment a program stores the state
before the chunk (but at a later segment's first chunk, where it is zero and the scan writes it) and then adds

    S += sum_j phi_p(k_j) (w_j v_j)^T,   M_IJ += sum_j k_jI (w_j k_jJ)^T,   w_j = exp(G_end - G_j)

(after decaying S and M by ``exp(G_end - G_{first-1})``) for its pair p of 16-coordinate blocks, on the tensor
cores. On Hopper (sm_90a) with bfloat16 inputs and value blocks of 64 the products run on warpgroup MMA
(``chunk_state_wgmma.cu.j2``: wgmma with the features built in registers); elsewhere on mma.sync
(``chunk_state.cu.j2``). See each template for its fragment scheme.

    cuda_state_unsupported(spec, k, v) -> None | reason      whether the kernel serves a forward's shape class
    select_state_kernel(q, k, v, ..., plan, impl) -> StateChoice
                                                             the op's choice for ``impl`` "triton" | "cuda" |
                                                             "auto" (measured once per GPU and shape: choice.py)
    CONFIG                                                   the launch shape (``StateKernelConfig``)
    CudaStateHook(q_shape)(spec, args, kept=None)            the ``triton_forward`` hook (``chunk_states``: one with
                                                             no q_shape): runs
                                                             the op below on the Triton state kernel's arguments,
                                                             returns its buffers
    torch.ops.retention_compile.cuda_chunk_states           the op (a torch.library custom op with a fake impl,
                                                             so ``torch.compile`` sees one opaque call)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..inspection import is_recording, record_kernel
from ..sizes import contiguous_strides, pow2_at_least, size_hint, specialized
from . import nvrtc
from .cherries import state_programs, supports_cherries
from .eager_launch import CudaLaunch
from .triton_source import KernelSpec

STATE_TEMPLATE = "chunk_state.cu.j2"
WGMMA_TEMPLATE = "chunk_state_wgmma.cu.j2"
WGMMA_BLOCK_E = 64  # value columns per wgmma program: N of m64n64k16, one 128-byte swizzle atom of bf16
WGMMA_BLOCK_S = 64  # keys per pipeline step of the wgmma kernel (four k16 slices)
WGMMA_STAGES = 4  # its copy stages: refilled two steps after use, once every warpgroup's products are done
WGMMA_THREADS = 256  # two warpgroups, 128 feature rows each
# per program, each warpgroup's 8 coordinates of a step's keys (or query rows) coordinate-major: 8 rows of the step's
# BS bf16 values and 16 bytes of padding (the forward's KI_T, the reverse-state kernel's QI_T)
WGMMA_COORDINATE_MAJOR_BYTES = 2 * 8 * (WGMMA_BLOCK_S + 8) * 2
KERNEL_NAME = "retention_chunk_state"
MAX_BLOCK_E = 64  # value columns per program: the fp32 accumulators of 4 coordinates x 64 columns fill 128 registers
_IO_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
INT32_MAX = (1 << 31) - 1
HOPPER_SHARED_LIMIT = 227 * 1024  # dynamic shared memory one program may opt in to on sm_90


@dataclass(frozen=True)
class StateKernelConfig:
    """Launch shape of the mma.sync kernel: ``warps`` per program (each owns ``16 / warps`` coordinates of block I),
    keys per pipeline step, how many 16-key tensor-core steps are unrolled, the programs per SM the registers are
    capped for (``__launch_bounds__``), and the copy buffers (loads issued ``stages - 1`` steps ahead). ``wgmma``:
    take the wgmma kernel instead where it applies (``uses_wgmma``), with registers capped for ``wgmma_min_blocks``
    programs per SM and ``wgmma_in_flight`` k16 slices' fragments held while their products run (more slices
    overlap more, but past the register cap ptxas serializes the wgmma or spills; a divisor of a step's 4 slices),
    ``wgmma_copy_slice`` the slice after whose products a step's copies are issued (-1: before the first; 0 and 2
    serialize the wgmma, -1 and 3 spill gated; 1 measured best, the template's header);
    ``wgmma_reverse_in_flight`` the slices in flight of the backward's reverse-state kernel (``cuda_reverse``);
    ``wgmma_dq``: the backward's dq state terms on the CUDA kernel of ``cuda_state_terms``; ``wgmma_fold``: the
    wgmma state kernel folds the segments in itself (``folds_segments``), so no scan runs after it."""

    warps: int = 4
    block_s: int = 64
    ks_unroll: int = 1
    min_blocks: int = 1
    stages: int = 2
    wgmma: bool = False
    wgmma_min_blocks: int = 2
    wgmma_in_flight: int = 2
    wgmma_copy_slice: int = 1
    # H200, T=65536 b1 h8 d64, reverse states and scan (ungated / gated, ms): 1 slice 0.832 / 0.921, 2 slices
    # (serialized by ptxas) 0.913 / 0.982, 4 slices with the cap for 1 program 1.055 / 1.149; Triton 1.081 / 1.171
    # (benchmarks/results/cuda_reverse_NVIDIA-H200_2026-11-30_bd780b9.json)
    wgmma_reverse_in_flight: int = 1
    # dq's state terms on wgmma (``cuda_state_terms``, after a Triton dq_kernel without them). H200, T=65536 b1 h8
    # d64, the whole triton_backward (ungated / gated, ms): Triton's dq_kernel with them 5.356 / 6.380, without them
    # plus the CUDA kernel 4.836 / 5.718 (benchmarks/results/cuda_dq_state_NVIDIA-H200_2026-11-30_d30b6db.json)
    wgmma_dq: bool = True
    wgmma_fold: bool = True


# 128 registers, no spills (sm_90a), 2 programs per SM. H200, b=1 h=8 d=64 T=65536 (ungated / gated, ms): 64 keys per
# step 1.011 / 1.086, 64 keys and 3 stages 1.021 / 1.060, 128 keys 1.000 / 1.020, 128 keys and 3 stages 1.013 / 1.015
# (benchmarks/results/cuda_state_NVIDIA-H200_2026-11-29_00b2a3a.json).
CONFIG = StateKernelConfig(warps=8, block_s=128, ks_unroll=4, min_blocks=2, stages=2, wgmma=True)


def uses_wgmma(spec: KernelSpec, config: StateKernelConfig, arch: str | None) -> bool:
    """Whether the wgmma kernel serves ``spec`` on a GPU of cubin target ``arch`` (None: no GPU): Hopper's
    ``sm_90a``, bfloat16 (float16 keeps mma.sync, which converts to bfloat16 in registers), e a multiple of 64, and
    shared memory within the opt-in limit."""
    wgmma = config.wgmma and arch == "sm_90a" and spec.dtype == "bfloat16" and spec.value_dim % WGMMA_BLOCK_E == 0
    return wgmma and wgmma_smem_bytes(spec) <= HOPPER_SHARED_LIMIT  # gated: w_j of a chunk (C > about 38k does not fit)


def folds_segments(spec: KernelSpec, config: StateKernelConfig, arch: str | None) -> bool:
    """Whether the state kernel leaves ``spec``'s states folded across segments (the wgmma kernel with
    ``wgmma_fold``): LOC the state before every chunk, SEG slot s + 1 the state after segment s, no scan after it."""
    return config.wgmma_fold and uses_wgmma(spec, config, arch)


def wgmma_smem_bytes(spec: KernelSpec) -> int:
    """Dynamic shared memory of one wgmma program (the template's ``Shared`` + 1024 bytes to align it): per stage
    the value rows and blocks I, J of the keys (48-byte rows), a 2 KB block of ones, and then w_j of a chunk and
    one step past it when gated, 2 KB per warp for the rows it stores (16 KB), 32 bytes per thread for its copy
    and fragment offsets, and per warpgroup its group A of a step's keys coordinate-major (8 rows of the keys and
    16 bytes); the struct is a multiple of its 1024-byte alignment."""
    stage = WGMMA_BLOCK_S * (WGMMA_BLOCK_E + 2 * 24) * 2
    outgoing = WGMMA_THREADS // 32 * 16 * 32 * 4
    lane_tables = WGMMA_THREADS * 2 * 16
    gate_weights = 4 * (spec.chunk_size + WGMMA_BLOCK_S) if spec.gated else 0
    shared = WGMMA_STAGES * stage + 2048 + outgoing + lane_tables + WGMMA_COORDINATE_MAJOR_BYTES + gate_weights
    return -(-shared // 1024) * 1024 + 1024


def smem_bytes(e: int, config: StateKernelConfig) -> int:
    """Dynamic shared memory of one program (the template's ``Shared``): per stage the staged key rows (32
    coordinates), value rows (padded by 8) and gate values; then k_J^T and c_ja in fp32."""
    bs = config.block_s
    stage = bs * 32 * 2 + bs * (block_e(e) + 8) * 2 + bs * 4
    return config.stages * stage + 16 * (bs + 8) * 4 + bs * 20 * 4


def tiled_features(d: int) -> int:
    """Features of the tiled symmetric state: C(d/16 + 1, 2) pairs of 16 x 16 (2560 for d = 64)."""
    nb = d // 16
    return nb * (nb + 1) // 2 * 256


def block_e(e: int) -> int:
    """Value columns per program: the largest multiple of 16 up to ``MAX_BLOCK_E`` that divides e."""
    return next(eb for eb in range(MAX_BLOCK_E, 15, -16) if e % eb == 0)


def cuda_state_unsupported(spec: KernelSpec, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the CUDA state kernel serves the forward of this shape class, else why not."""
    if not spec.chunked:
        return (
            "the call takes the single-chunk (quadratic) path, which has no state "
            f"(deg {spec.deg}; the CUDA state kernel serves the chunked deg-2 path)"
        )
    if spec.block_feature != 16:
        return f"state tiles of {spec.block_feature} coordinates (the CUDA kernel tiles by 16)"
    if k.dtype not in _IO_DTYPES:
        return f"dtype {k.dtype} (the CUDA state kernel takes bfloat16 and float16; float32 runs exact fp32 in Triton)"
    from ..planning import EXACT_CHUNK_BELOW
    from .forward import small_chunk_float32

    if small_chunk_float32(spec):
        return (
            f"chunks of {spec.chunk_size} keys (16-bit calls with chunks under {EXACT_CHUNK_BELOW} keys run the exact "
            "float32 Triton kernels: forward.small_chunk_float32)"
        )
    if spec.value_dim % 16:
        return f"value dim e={spec.value_dim} (the CUDA state kernel needs a multiple of 16)"
    if not strides_fit_32_bits(k, v):
        return "strides beyond 32 bits"
    if not step_offsets_fit_32_bits(k, v):
        return f"key rows too far apart: the kernel's offsets within a {WGMMA_BLOCK_S}-key step are 32-bit"
    try:
        nvrtc.compiler_id()
        from cuda.bindings import driver  # noqa: F401
    except (RuntimeError, ImportError) as error:
        return f"no CUDA toolchain: {error}"
    return None


@functools.lru_cache(maxsize=256)
def render_state_source(spec: KernelSpec, config: StateKernelConfig, arch: str | None = None) -> str:
    """The CUDA source of the state kernel for one shape class of the chunked forward, on target ``arch``."""
    params = spec.template_params()
    shape = {
        "d": spec.head_dim,
        "e": spec.value_dim,
        "gated": spec.gated,
        "has_valid": spec.has_valid,
        "causal": spec.causal,
        "chunk_size": spec.chunk_size,
        "npairs": params["npairs"],
        "dt": params["dt"],
    }
    if uses_wgmma(spec, config, arch):
        return nvrtc.render(
            WGMMA_TEMPLATE,
            **shape,
            cherries=spec.cherries,
            cherry_programs=state_programs(spec.head_dim) if spec.cherries else (),
            block_s=WGMMA_BLOCK_S,
            stages=WGMMA_STAGES,
            in_flight=config.wgmma_in_flight,
            copy_slice=config.wgmma_copy_slice,
            fold=config.wgmma_fold,
            min_blocks=config.wgmma_min_blocks,
            smem_bytes=wgmma_smem_bytes(spec),
        )
    if spec.cherries:
        raise ValueError("the cherry layout's states come from the wgmma state kernel only")
    return nvrtc.render(
        STATE_TEMPLATE,
        **shape,
        dtype=spec.dtype,
        block_e=block_e(spec.value_dim),
        block_s=config.block_s,
        warps=config.warps,
        ks_unroll=config.ks_unroll,
        min_blocks=config.min_blocks,
        stages=config.stages,
        smem_bytes=smem_bytes(spec.value_dim, config),
    )


@dataclass(frozen=True)
class _Launch:
    """What a launch needs besides the arguments, worked out once per shape class, config and device."""

    kernel: nvrtc.CudaKernel
    grid_y: int  # programs (pairs, or two cherries each) x value blocks
    threads: int
    smem: int
    folds_segments: bool  # the wgmma kernel: segments folded in (no scan after it), a zeroed SYNC buffer argument


@functools.lru_cache(maxsize=64)
def _launch_info(spec: KernelSpec, config: StateKernelConfig, device_index: int) -> _Launch:
    arch = nvrtc.gpu_arch(device_index)
    if uses_wgmma(spec, config, arch):
        smem, threads = wgmma_smem_bytes(spec), WGMMA_THREADS
    else:
        smem, threads = smem_bytes(spec.value_dim, config), 32 * config.warps
    kernel = load_with_shared_memory(render_state_source(spec, config, arch), KERNEL_NAME, smem, device_index)
    return _Launch(kernel, _grid_y(spec, config, arch), threads, smem, folds_segments(spec, config, arch))


def _grid_y(spec: KernelSpec, config: StateKernelConfig, arch: str | None) -> int:
    """Programs per head and segment: the state programs (pairs, or two cherries each) x value blocks."""
    programs = spec.template_params()["state_programs"]
    wide = WGMMA_BLOCK_E if uses_wgmma(spec, config, arch) else block_e(spec.value_dim)
    return programs * (spec.value_dim // wide)


@functools.lru_cache(maxsize=64)
def load_with_shared_memory(source: str, name: str, smem: int, device_index: int) -> nvrtc.CudaKernel:
    """Kernel ``name`` of ``source`` on the device, allowed ``smem`` bytes of dynamic shared memory (over 48 KB
    needs the opt-in); once per source, size and device."""
    from cuda.bindings import driver

    (kernel,) = nvrtc.load_kernels(source, (name,), device_index)
    attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    nvrtc._check(driver.cuFuncSetAttribute(kernel.function, attribute, smem))
    return kernel


def state_spec(
    k: torch.Tensor, v: torch.Tensor, chunk_size: int, causal: bool, gated: bool, valid: bool, cherries: bool = False
) -> KernelSpec:
    """The fields of the forward's KernelSpec the state kernels depend on (the query-side tiles do not matter): ``k``
    gives the dtype and d, ``v`` gives e (the reverse-state kernel passes q and dy); ``cherries`` the row layout."""
    d, e = specialized(k.shape[-1]), specialized(v.shape[-1])
    return KernelSpec(
        dtype=str(k.dtype).removeprefix("torch."),
        head_dim=d,
        value_dim=e,
        deg=2,
        gated=gated,
        has_valid=valid,
        causal=causal,
        chunked=True,
        chunk_size=chunk_size,
        block_t=16,
        block_k=16,
        block_s=16,
        block_e=e,
        block_feature=16,
        cherries=cherries,
    )


def strides_fit_32_bits(*tensors: torch.Tensor) -> bool:
    """Whether the kernels' ``int`` strides hold every stride of ``tensors``, and of the contiguous copies
    ``dense_rows`` may make of them (a copy's strides are the products of its trailing sizes)."""
    for t in tensors:
        if any(abs(stride) > INT32_MAX for stride in (*t.stride(), *contiguous_strides(t.shape))):
            return False
    return True


def step_offsets_fit_32_bits(*tensors: torch.Tensor) -> bool:
    """Whether each thread's byte offset from a step's first key row to its own (up to ``WGMMA_BLOCK_S`` - 1 rows on,
    plus its column) fits the 32 bits the state kernels keep it in, for ``tensors`` as passed or as ``dense_rows``
    copies them (rows ``shape[-1]`` elements apart)."""
    for t in tensors:
        row_bytes = max(abs(t.stride(-2)), t.shape[-1]) * t.element_size()
        if WGMMA_BLOCK_S * row_bytes + t.shape[-1] * t.element_size() > 2**32:
            return False
    return True


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows are dense (``has_dense_rows``), else a contiguous copy (a fresh one: a contiguous view at an
    odd storage offset is its own ``contiguous()``, and cp.async would fault on it)."""
    return t if has_dense_rows(t) else t.clone(memory_format=torch.contiguous_format)


def has_dense_rows(t: torch.Tensor) -> bool:
    """Whether the kernel reads ``t`` as it is: last dim contiguous, rows 16-byte aligned."""
    rows = all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and rows


@torch.library.custom_op("retention_compile::cuda_chunk_states", mutates_args=())
def cuda_chunk_states_op(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    valid: torch.Tensor | None,
    sizes: Sequence[int],
    chunk_size: int,
    causal: bool,
    cherries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S_LOC, M_LOC, S_SEG, M_SEG, SYNC)`` (LOC empty when non-causal), in the pair layout or, with ``cherries``,
    the cherry layout (``cherries.py``; the wgmma kernel only). ``SYNC``: the fold's int32 words (``sync_words``),
    empty without the fold; ``DONE``'s counts in it tell a query kernel started beside this one (a programmatic
    dependent launch) which chunk states are written.

    ``sizes = (Hq, group, state_heads, Tk, shift, n_chunks, chunks_per_seg, n_seg)``; ``g`` the cumulative log-gate
    (B, state_heads, >= Tk) fp32 (rows may be padded), ``valid`` (B, Tk) bool.

    The wgmma kernel folds the segments in (``folds_segments``, the default): LOC holds the state before every
    chunk, SEG slot s + 1 the state after segment s (but the last one's where causal), slot 0 unwritten; no scan
    follows. The mma.sync kernel leaves them as the Triton state kernel does, for the scan: SEG slot s + 1 segment
    s's own total and, causal, LOC slots ``chunks_per_seg, 2 * chunks_per_seg, ...`` (a later segment's first chunk
    state, zero before the scan) unwritten.
    """
    spec = state_spec(k, v, chunk_size, causal, g is not None, valid is not None, cherries)
    info = _launch_info(spec, CONFIG, k.device.index or 0)
    state_heads, n_chunks, n_seg = sizes[2], sizes[5], sizes[7]
    outputs = _allocate(spec, k, state_heads, n_chunks, n_seg)
    k, v = dense_rows(k), dense_rows(v)
    gate = None if g is None else g.contiguous()
    valid_bytes = None if valid is None else valid.contiguous().view(torch.uint8)
    grid = _grid(info, k.shape[0], state_heads, n_seg)
    arguments = _kernel_arguments(k, v, gate, valid_bytes, outputs, sizes, causal)
    sync = torch.zeros(sync_words(grid) if info.folds_segments else 0, dtype=torch.int32, device=k.device)
    if info.folds_segments:
        arguments = _with_sync(arguments, sync)
    with torch.cuda.device(k.device):
        info.kernel.launch(grid, (info.threads, 1, 1), arguments, shared_mem=info.smem)
    return (*outputs, sync)


def sync_words(grid: tuple) -> int | torch.SymInt:
    """The segment fold's int32 words for a wgmma launch of ``grid = (heads, programs, n_seg)``: the ticket counter,
    a flag per program, then ``DONE``, a count per head and segment (``done_offset``)."""
    return done_offset(grid) + grid[0] * grid[2]


def done_offset(grid: tuple) -> int | torch.SymInt:
    """Where ``DONE`` starts in the fold's words: ``DONE[h * n_seg + s]`` counts the programs of head h and segment
    s whose share of that segment's states is written (the query kernel waits for ``grid[1]`` of them)."""
    return 1 + grid[0] * grid[1] * grid[2]


def _grid(info: _Launch, batch: int, state_heads: int, n_seg: int) -> tuple[int, int, int]:
    """Segment-major: blocks are dispatched x first, so every program of segment 0 before any of segment 1, and the
    last (short) segment's programs fill the grid's last round."""
    return batch * state_heads, info.grid_y, n_seg


def _kernel_arguments(
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    outputs: tuple[torch.Tensor, ...],
    sizes: Sequence[int],
    causal: bool,
) -> tuple:
    """The kernel's arguments in its parameter order (``KEPT_TENSORS`` names the tensors' positions), but the wgmma
    kernel's ``SYNC`` (``_with_sync``)."""
    s_loc, m_loc, s_seg, m_seg = outputs
    g_row = 0 if gate is None else gate.stride(1)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), g_row)
    loc = (s_loc, m_loc) if causal else (None, None)
    return (k, v, gate, valid, *loc, s_seg, m_seg, *strides, *sizes)


def _with_sync(arguments: tuple, sync: torch.Tensor | None) -> tuple:
    """``arguments`` with the wgmma kernel's zeroed ``SYNC`` buffer at its position, after the state buffers."""
    return (*arguments[:SYNC_POSITION], sync, *arguments[SYNC_POSITION:])


# The kernel's tensor parameters by position, named as ``triton_forward`` names its buffers.
KEPT_TENSORS = ((0, "K"), (1, "V"), (2, "G"), (3, "VALID"), (4, "S_LOC"), (5, "M_LOC"), (6, "S_SEG"), (7, "M_SEG"))
SYNC_POSITION = len(KEPT_TENSORS)


def _allocate(spec: KernelSpec, k: torch.Tensor, state_heads, n_chunks, n_seg) -> tuple:
    """The buffers of ``state_spec``'s shape class ``spec``: its layout's rows (``dt``) per state."""
    heads = k.shape[0] * state_heads
    d, e, dt = spec.head_dim, spec.value_dim, spec.template_params()["dt"]
    slots = n_chunks if spec.causal else 0
    return (
        k.new_empty((heads, slots, dt, e), dtype=torch.bfloat16),
        k.new_empty((heads, slots, d, d), dtype=torch.float32),
        k.new_empty((heads, n_seg + 1, dt, e), dtype=torch.float32),
        k.new_empty((heads, n_seg + 1, d, d), dtype=torch.float32),
    )


@cuda_chunk_states_op.register_fake
def _cuda_chunk_states_fake(k, v, g, valid, sizes, chunk_size, causal, cherries=False):
    spec = state_spec(k, v, chunk_size, causal, g is not None, valid is not None, cherries)
    # the kernel that would run is the device's; with no GPU to ask (fake CUDA tensors on a CPU machine) none folds
    arch = nvrtc.tensor_arch(k.device) if torch.cuda.is_available() else None
    grid = (k.shape[0] * sizes[2], _grid_y(spec, CONFIG, arch), sizes[7])
    words = sync_words(grid) if folds_segments(spec, CONFIG, arch) else 0
    return (*_allocate(spec, k, sizes[2], sizes[5], sizes[7]), k.new_empty(words, dtype=torch.int32))


def wgmma_backward_unsupported(fwd: KernelSpec, arch: str | None, kernel: str) -> str | None:
    """What every backward wgmma kernel needs (``kernel`` names it in the reason): the chunked deg-2 path with
    16-coordinate state tiles, bfloat16, an sm_90a target."""
    if not (fwd.chunked and fwd.deg == 2 and fwd.block_feature == 16):
        return "not the chunked deg-2 path with 16-coordinate state tiles"
    if arch != "sm_90a":
        return f"target {arch} (the {kernel} needs sm_90a)"
    if fwd.dtype != "bfloat16":
        return f"dtype {fwd.dtype} (the {kernel} takes bfloat16)"
    return None


def wgmma_backward_params(fwd: KernelSpec, coordinate_terms: bool) -> dict[str, object]:
    """The template parameters the backward's wgmma kernels (``cuda_reverse``, ``cuda_state_terms``) share: the
    shape class's flags and pair tiles, and the copy stages."""
    params = fwd.template_params()
    return {
        "d": fwd.head_dim,
        "gated": fwd.gated,
        "causal": fwd.causal,
        "coordinate_terms": coordinate_terms,
        "chunk_size": fwd.chunk_size,
        "npairs": params["npairs"],
        "dt": params["dt"],
        "stages": WGMMA_STAGES,
    }


_RECORDED: set[str] = set()


def record_cuda_source(
    name: str, source: str, spec: KernelSpec, shapes: dict[str, Sequence[int]], kernel_path: str, arch: str | None
) -> None:
    """Register a CUDA kernel's source with the inspection (every call while compiling or inspecting; else once per
    source): ``shapes`` (``{"q_shape": ..}``, ``{"k_shape": .., "v_shape": ..}``), the spec's flags, the kernel path
    and, where compiled for ``arch``, the path of the cached source."""
    if not (is_recording() or source not in _RECORDED):
        return
    _RECORDED.add(source)
    meta: dict[str, object] = {key: tuple(size_hint(s) for s in shape) for key, shape in shapes.items()}
    meta.update(dtype=spec.dtype, deg=2, causal=spec.causal, gated=spec.gated, chunk_size=spec.chunk_size)
    meta["kernel_path"] = kernel_path
    if arch is not None:
        _, entry = nvrtc.cached_compile(source, arch)
        meta["path"] = str(entry.with_suffix(".cu"))
    record_kernel(name, source, meta, language="cuda")


def _record(spec: KernelSpec, k: torch.Tensor, v: torch.Tensor, q_shape: Sequence[int] | None) -> None:
    arch = nvrtc.tensor_arch(k.device)
    source = render_state_source(
        state_spec(k, v, spec.chunk_size, spec.causal, spec.gated, spec.has_valid, spec.cherries), CONFIG, arch
    )
    shapes = {"k_shape": k.shape, "v_shape": v.shape, **({"q_shape": q_shape} if q_shape is not None else {})}
    record_cuda_source("power_retention_chunk_state", source, spec, shapes, "chunked, CUDA state kernel", arch)


def run_chunk_states(
    spec: KernelSpec, args: dict, q_shape: Sequence[int] | None = None, kept: list | None = None
) -> dict[str, torch.Tensor]:
    """The body of ``triton_forward``'s state-kernel hook (``CudaStateHook``): ``args`` are the Triton state kernel's
    keyword arguments; returns the buffers it would have filled (``S_SEG``, ``M_SEG``, and ``S_LOC``, ``M_LOC`` when
    causal), and the fold's ``SYNC`` words where the kernel folds segments. ``kept`` receives the launch to repeat
    with another call's buffers of the same shapes (``eager_launch.CudaLaunch``), or None where it cannot be
    repeated as it is (inputs the op copies first, another device than the current)."""
    k, v = args["K"], args["V"]
    _record(spec, k, v, q_shape)
    sizes = [args[n] for n in ("Hq", "group", "state_heads", "Tk", "shift", "n_chunks", "chunks_per_seg", "n_seg")]
    s_loc, m_loc, s_seg, m_seg, sync = torch.ops.retention_compile.cuda_chunk_states(
        k, v, args.get("G"), args.get("VALID"), sizes, spec.chunk_size, spec.causal, spec.cherries
    )
    out = {"S_SEG": s_seg, "M_SEG": m_seg}
    if folds_segments(spec, CONFIG, nvrtc.tensor_arch(k.device)):
        out["SYNC"] = sync
    if spec.causal:
        out.update(S_LOC=s_loc, M_LOC=m_loc)
    if kept is not None:
        kept.append(_kept_launch(spec, k, v, args.get("G"), args.get("VALID"), sizes))
    return out


def _kept_launch(spec: KernelSpec, k, v, g, valid, sizes: Sequence[int]) -> CudaLaunch | None:
    """The launch ``cuda_chunk_states_op`` just made, to repeat with other tensors of the same layout (None where
    the op copied an input first, or ran on another device than the current one)."""
    device = k.device.index or 0
    copied = not (has_dense_rows(k) and has_dense_rows(v)) or any(
        t is not None and not t.is_contiguous() for t in (g, valid)
    )
    if copied or device != torch.cuda.current_device():
        return None
    gated, has_valid = g is not None, valid is not None
    info = _launch_info(state_spec(k, v, spec.chunk_size, spec.causal, gated, has_valid, spec.cherries), CONFIG, device)
    present = {"G": gated, "VALID": has_valid, "S_LOC": spec.causal, "M_LOC": spec.causal}
    tensors = tuple((i, name) for i, name in KEPT_TENSORS if present.get(name, True))
    grid = _grid(info, k.shape[0], sizes[2], sizes[7])
    arguments = _kernel_arguments(k, v, g, valid, (None,) * 4, sizes, spec.causal)
    zeroed = ((SYNC_POSITION, sync_words(grid), "SYNC"),) if info.folds_segments else ()
    if zeroed:
        arguments = _with_sync(arguments, None)
    pointers = len(KEPT_TENSORS) + len(zeroed)
    fixed = tuple(None if i < pointers else argument for i, argument in enumerate(arguments))
    return CudaLaunch.of(info.kernel, grid, (info.threads, 1, 1), info.smem, device, fixed, tensors, zeroed)


@dataclass(frozen=True)
class CudaStateHook:
    """The CUDA state kernel as ``triton_forward``'s ``state_kernel`` (``run_chunk_states``), able to hand over its
    launch for repeated eager calls (``keeps_launches``); ``q_shape`` for the inspection record. Its methods tell
    ``triton_forward`` how the kernel works (``folds_segments``: no scan after it), so a hook is always this class
    (a bare ``run_chunk_states`` would be taken for a kernel whose states the scan still folds)."""

    q_shape: tuple[int, ...] | None = None
    keeps_launches: ClassVar[bool] = True

    def __call__(self, spec: KernelSpec, args: dict, kept: list | None = None) -> dict[str, torch.Tensor]:
        return run_chunk_states(spec, args, self.q_shape, kept)

    @staticmethod
    def cherry_rows(spec: KernelSpec, device: torch.device) -> bool:
        """Whether this kernel can write shape class ``spec``'s states in the cherry layout (``cherries.py``): the
        wgmma kernel at a head dim the layout serves, for a query kernel that steps through cherries."""
        return _cherry_rows(spec, device, CONFIG)

    @staticmethod
    def folds_segments(spec: KernelSpec, device: torch.device) -> bool:
        """Whether the kernel leaves shape class ``spec``'s states folded across segments (the wgmma kernel), so
        that ``triton_forward`` launches no scan after it."""
        arch = nvrtc.tensor_arch(device)
        return folds_segments(spec, CONFIG, arch)

    @staticmethod
    def done_counts(spec: KernelSpec, device: torch.device, heads, n_seg) -> tuple:
        """``(offset, target)`` of the fold's ``DONE`` counts in its ``SYNC`` words for ``heads`` (B x state heads)
        and ``n_seg`` segments: a chunk's states are written once its head's and segment's count reaches target."""
        programs = _grid_y(spec, CONFIG, nvrtc.tensor_arch(device))
        return done_offset((heads, programs, n_seg)), programs

    @staticmethod
    def programs_per_sm(spec: KernelSpec, device: torch.device) -> int:
        """Programs of the kernel resident per SM (its launch bounds' register cap), for ``forward.state_segments``:
        the grid is segment-major, whose segment count ``dispatch`` models."""
        arch = nvrtc.tensor_arch(device)
        return CONFIG.wgmma_min_blocks if uses_wgmma(spec, CONFIG, arch) else CONFIG.min_blocks


# The hook with no query shape for the record.
chunk_states = CudaStateHook()


@functools.lru_cache(maxsize=256)
def _cherry_rows(spec: KernelSpec, device: torch.device, config: StateKernelConfig) -> bool:
    return cherry_rows_on(spec, config, nvrtc.tensor_arch(device))


def cherry_rows_on(spec: KernelSpec, config: StateKernelConfig, arch: str | None) -> bool:
    """Whether the state kernel writes ``spec``'s states in the cherry layout on a GPU of cubin target ``arch``
    (None: no GPU): the wgmma kernel, deg 2, the chunked query kernel on 16-coordinate pair blocks (not transposed)
    and a head dim the layout serves."""
    chunked = spec.chunked and spec.deg == 2 and not spec.query_t and spec.block_feature == 16
    chunked = chunked and supports_cherries(spec.head_dim)
    return chunked and uses_wgmma(spec, config, arch)


class StateChoice(NamedTuple):
    """The state kernel for one forward call: ``kernel`` the ``triton_forward`` hook (None: the Triton state
    kernel) and ``reason`` why the CUDA kernel is not used (None when it is)."""

    kernel: Callable[[KernelSpec, dict], dict] | None
    reason: str | None


def _candidates(q, k, v, log_gate, valid, scale: float, causal: bool, chunk: int) -> dict[str, Callable[[], object]]:
    """The forward with either state kernel, on random inputs of the call's shapes (built on first use; symbolic sizes
    at their hints: built from the symbolic sizes themselves, under ``dynamic=True``, the choice fell to the Triton
    state kernel, 1.23 ms against the CUDA kernel's 0.46 at T=65536 on the H200, session 66)."""
    from ..ops import power_retention_op

    def shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(size_hint(s) for s in t.shape)

    @functools.cache
    def inputs() -> tuple:
        q_, k_, v_ = (torch.randn(shape(t), dtype=t.dtype, device=t.device) for t in (q, k, v))
        g_ = None if log_gate is None else -0.05 * torch.rand(shape(log_gate), device=q.device).to(log_gate.dtype)
        valid_ = None if valid is None else torch.ones(shape(valid), dtype=torch.bool, device=q.device)
        return q_, k_, v_, g_, valid_

    def run(impl: str) -> Callable[[], object]:
        return lambda: power_retention_op(*inputs(), scale, 2, causal, chunk, impl)

    return {"triton": run("triton"), "cuda": run("cuda")}


def select_state_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    deg: int,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    causal: bool,
    scale: float,
    plan,
    impl: str,
) -> StateChoice:
    """Which state kernel serves a Triton forward call: none but Triton's for ``impl="triton"``; the CUDA kernel
    for ``"cuda"`` where ``cuda_state_unsupported`` finds nothing against it; for ``"auto"`` the faster of the two
    as measured by ``choice.choose`` for this GPU and shape class (sequence length and heads rounded up to powers
    of 2)."""
    from . import choice
    from .forward import kernel_spec

    if impl == "triton":
        return StateChoice(None, "codegen='triton'")
    if impl == "auto" and q.dtype == torch.float16:
        return StateChoice(None, "float16 runs the float32 Triton kernels (forward.kernel_inputs)")
    spec = kernel_spec(q, v, deg, log_gate is not None, valid is not None, causal, size_hint(k.shape[2]), plan)
    reason = cuda_state_unsupported(spec, k, v)
    if reason is not None:
        return StateChoice(None, reason)
    hook = CudaStateHook(tuple(size_hint(s) for s in q.shape))
    if impl == "cuda":
        return StateChoice(hook, None)
    B, Hq, Tq, _ = (size_hint(s) for s in q.shape)
    Hk, Tk = size_hint(k.shape[1]), size_hint(k.shape[2])
    state_heads = size_hint(log_gate.shape[1]) if log_gate is not None else Hk
    key = {
        "spec": spec.summary(),
        "keys": pow2_at_least(Tk),
        "heads": pow2_at_least(B * state_heads),
        "group": Hq // Hk,
    }
    key["queries"] = "all" if Tq == Tk else "fewer"
    candidates = _candidates(q, k, v, log_gate, valid, scale, causal, spec.chunk_size)
    if choice.choose("chunk_state", key, candidates, q.device) == "cuda":
        return StateChoice(hook, None)
    return StateChoice(None, "measured slower than the Triton state kernel on this GPU and shape")
