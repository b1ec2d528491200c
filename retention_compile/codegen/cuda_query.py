"""The chunked causal forward's query kernel on Hopper's wgmma (``cuda_templates/query_wgmma.cu.j2``).

It takes the Triton query kernel's place for one shape class: deg 2, bf16, d = e = 64, causal self-attention
(Tq = Tk), chunk states in the cherry layout from the wgmma state kernel, no key validity. Same inputs (the
``attention`` keyword arguments ``forward.triton_forward`` builds for ``attention_kernel``) and outputs (y, denom).

    render_query_source(chunk_size, gated, packed, y_fp32)   the CUDA source of one shape
    query_unsupported(spec)                                  why a shape class cannot take it (None: it can)
    query_unsupported_reason(attention, chunk_size)          why a call cannot
    query_launch(attention, chunk_size, packed)              its launch (``eager_launch.CudaLaunch``), kept for replays;
                                                             beside the state kernel where ``attention`` has its counts
    launch_query(attention, chunk_size, packed)              run it on the call's tensors
    cuda_query_op(q, k, v, g, s_st, m_st, ...)               the same as a custom op (traced calls), returning y, denom
"""

from __future__ import annotations

import functools

import torch

from ..reference import EPS
from . import nvrtc
from .cherries import cherries, cherry_features, supports_cherries
from .eager_launch import CudaLaunch
from .triton_source import KernelSpec

TEMPLATE = "query_wgmma.cu.j2"
KERNEL_NAME = "retention_query"
WARPGROUP_ROWS = 64  # query rows per warpgroup (its wgmma products' M)
# Copy stages of 16 KB (benchmarks and tests may set it, MIN_BLOCKS and WARPGROUPS before a launch). 3 at two programs
# per SM: the whole forward at T=65536 on an H100 (25c1bee, forward_notes.md session 73), 2 programs x stages [x
# warpgroups] ungated / gated: 2x3 0.948 / 1.036 ms, 2x4 0.992 / 1.037, 1x4x4 0.962 / 1.028 (Triton's 0.952 / 1.066).
STAGES = 3
MIN_BLOCKS = 2  # programs per SM the registers are capped for
WARPGROUPS = 2  # warpgroups per program (2 or 4; 4 stages each state slice and key block once for twice the rows)
STAGE_BYTES = 16384
MAX_CHUNK = 2048  # the gated key factors' tables: 8 KB per warpgroup of shared memory
MAX_WARPS_PER_SM = 16  # programs per SM x warpgroups per program x 4 at most: 128 registers per thread


def rows_per_program(warpgroups: int) -> int:
    """Query rows a program of ``warpgroups`` warpgroups holds."""
    return WARPGROUP_ROWS * warpgroups


def smem_bytes(chunk_size: int, gated: bool, stages: int, warpgroups: int = 2, packed: bool = True) -> int:
    """The kernel's dynamic shared memory: its ``Shared`` (stages, q's rows, M's halves, the ones, q^T M q per row;
    gated, the chunk's G and the key factors per warpgroup, bf16 with ``packed`` squares, else float32; a multiple of
    1024 bytes) and 1024 bytes to align it."""
    rows = rows_per_program(warpgroups) * (128 + 4)  # q's rows, q^T M q
    gate = (chunk_size + 4) * 4 + warpgroups * chunk_size * (2 if packed else 4) if gated else 0
    shared = stages * STAGE_BYTES + rows + 2 * 64 * 128 + 16 * 64 * 2 + gate
    return -(-shared // 1024) * 1024 + 1024


def render_query_source(
    chunk_size: int,
    gated: bool,
    packed: bool,
    y_fp32: bool,
    stages: int | None = None,
    min_blocks: int | None = None,
    parts: str = "both",
    warpgroups: int | None = None,
    waits: bool = False,
) -> str:
    """The CUDA source for chunk size ``chunk_size``, with or without a gate. ``packed``: the unmasked blocks' squares
    in packed bf16 (a forward no backward follows, ``KernelSpec.packed_squares``); ``y_fp32``: y stored in float32
    (else bf16); ``stages``, ``min_blocks``: the copy stages and the programs per SM the registers are capped for
    (default ``STAGES``, ``MIN_BLOCKS``); ``parts``: "both", or for a check of one term against its own reference
    "state" (the chunk-state term alone) or "keys" (the chunk's keys alone); ``warpgroups``: per program (default
    ``WARPGROUPS``); ``waits``: launched beside the state kernel (its programmatic dependent), each program waiting
    for its chunk's segment count (``SYNC``) before it reads the chunk's states."""
    stages = STAGES if stages is None else stages
    min_blocks = MIN_BLOCKS if min_blocks is None else min_blocks
    warpgroups = WARPGROUPS if warpgroups is None else warpgroups
    if parts not in ("both", "state", "keys"):
        raise ValueError(f"parts must be 'both', 'state' or 'keys', got {parts!r}")
    if warpgroups not in (2, 4):
        raise ValueError(f"warpgroups must be 2 or 4, got {warpgroups!r}")
    if (why := _launch_shape_reason(min_blocks, warpgroups)) is not None:
        raise ValueError(why)
    return _render(chunk_size, gated, packed, y_fp32, stages, min_blocks, parts, warpgroups, waits)


def _launch_shape_reason(min_blocks: int, warpgroups: int) -> str | None:
    """Why ``min_blocks`` programs per SM of ``warpgroups`` warpgroups cannot be built, or None."""
    if min_blocks * warpgroups * 4 > MAX_WARPS_PER_SM:
        return f"{min_blocks} programs per SM of {warpgroups} warpgroups: under 128 registers per thread"
    return None


@functools.lru_cache(maxsize=64)
def _render(
    chunk_size: int,
    gated: bool,
    packed: bool,
    y_fp32: bool,
    stages: int,
    min_blocks: int,
    parts: str,
    warpgroups: int,
    waits: bool,
) -> str:
    """``render_query_source`` with every launch setting given (cached by them, not by the module's defaults)."""
    return nvrtc.render(
        TEMPLATE,
        chunk_size=chunk_size,
        gated=gated,
        packed=packed,
        y_fp32=y_fp32,
        cherries=cherries(64),
        stages=stages,
        min_blocks=min_blocks,
        eps=repr(float(EPS)),
        smem_bytes=smem_bytes(chunk_size, gated, stages, warpgroups, packed),
        parts=parts,
        warpgroups=warpgroups,
        waits=waits,
    )


def query_unsupported(spec: KernelSpec) -> str | None:
    """Why a call of shape class ``spec`` cannot run this kernel (before the call's tensors are looked at), or None."""
    checks = (
        (spec.chunked and spec.causal, "not the chunked causal path"),
        (spec.cherries and supports_cherries(spec.head_dim), "chunk states not in the cherry layout"),
        (spec.deg == 2 and spec.dtype == "bfloat16", "deg 2 in bfloat16 only"),
        (spec.head_dim == 64 and spec.value_dim == 64, "d = e = 64 only"),
        (not spec.has_valid, "key validity"),
    )
    return next((why for ok, why in checks if not ok), None) or query_unsupported_reason(None, spec.chunk_size)


def query_unsupported_reason(attention: dict | None, chunk_size: int) -> str | None:
    """Why the call whose query-kernel arguments are ``attention`` cannot run this kernel, or None (shape-class checks
    are ``query_unsupported``'s)."""
    if (why := _launch_shape_reason(MIN_BLOCKS, WARPGROUPS)) is not None:
        return why
    rows = rows_per_program(WARPGROUPS)
    if chunk_size % rows or chunk_size > MAX_CHUNK:
        return f"a chunk size that is not a multiple of {rows} up to {MAX_CHUNK}"
    if attention is None:
        return None
    if "S_ST" not in attention:
        return "not the chunked path"
    from .cuda_state import has_dense_rows, strides_fit_32_bits
    from .fitting import has_storage

    q, k, v, y = attention["Q"], attention["K"], attention["V"], attention["Y"]
    checks = (
        (q.shape[2] == k.shape[2], "Tq != Tk"),
        (q.shape[3] == 64 and v.shape[3] == 64 and q.dtype == torch.bfloat16, "d = e = 64 in bfloat16 only"),
        (attention.get("VALID") is None, "key validity"),
        (attention.get("ROUNDED_OUT") is not True, "y stored twice (y_out)"),
        (y.dtype in (torch.bfloat16, torch.float32) and y.is_contiguous(), "y neither bf16 nor float32, contiguous"),
        (attention["S_ST"].shape[2] == cherry_features(64), "chunk states not in the cherry layout"),
        (strides_fit_32_bits(q, k, v), "strides past 32 bits"),
        (
            _gate_rows_fit(attention.get("G"), attention.get("stride_g", 0), q.shape[2]),
            "G's rows not in 16-byte pieces",
        ),
        (nvrtc.tensor_arch(q.device) == "sm_90a", "not a Hopper GPU (sm_90a)"),
        # (a traced call's tensors have no address: the custom op copies rows that are not dense)
        (not has_storage(q) or all(map(has_dense_rows, (q, k, v))), "q, k or v without 16-byte aligned, dense rows"),
    )
    return next((why for ok, why in checks if not ok), None)


def _gate_rows_fit(g: torch.Tensor | None, stride_g: int, T: int) -> bool:
    """Whether the kernel may copy the cumulative log-gate ``g`` (B, gate_heads, >= T) float32 in 16-byte pieces: rows
    16-byte aligned (row stride ``stride_g`` a multiple of 4 floats, contiguous along keys) and at least T rounded up
    to 4 floats long (a piece that starts below T lies in its row). True without a gate; a traced call's tensors
    have no address (the op's G comes from the gate's cumsum, whose rows are padded to 16 keys)."""
    from .fitting import has_storage

    if g is None:
        return True
    aligned = not has_storage(g) or g.data_ptr() % 16 == 0
    return aligned and g.stride(-1) == 1 and stride_g % 4 == 0 and g.shape[-1] >= -(-T // 4) * 4


# The kernel's tensor parameters by position, named as ``triton_forward`` names the query kernel's arguments.
TENSORS = ((0, "Q"), (1, "K"), (2, "V"), (3, "Y"), (4, "DEN"), (5, "G"), (6, "S_ST"), (7, "M_ST"))
# Launched beside the state kernel: the fold's words (``SYNC``) after the sizes, then where its counts are and what
# they must reach (``forward``'s names).
COUNTS = ("done_offset", "done_target", "chunks_per_seg", "n_seg")


@functools.lru_cache(maxsize=16)
def _kernel(
    chunk_size: int,
    gated: bool,
    packed: bool,
    y_fp32: bool,
    parts: str,
    stages: int,
    min_blocks: int,
    warpgroups: int,
    waits: bool,
    device: int,
) -> tuple[object, int]:
    from .cuda_state import load_with_shared_memory

    smem = smem_bytes(chunk_size, gated, stages, warpgroups, packed)
    source = render_query_source(chunk_size, gated, packed, y_fp32, stages, min_blocks, parts, warpgroups, waits)
    return load_with_shared_memory(source, KERNEL_NAME, smem, device), smem


def query_launch(attention: dict, chunk_size: int, packed: bool, parts: str = "both") -> CudaLaunch:
    """The launch for the query-kernel arguments ``attention`` (y into ``Y``, denom into ``DEN``) with chunks of
    ``chunk_size``, to call with those tensors (or a later call's of the same layout, by name); ``packed``,
    ``parts``: as ``render_query_source``'s. Where ``attention`` holds the fold's words (``SYNC``, which
    ``triton_forward`` passes where the query kernel may run beside the state kernel) the launch is the state
    kernel's programmatic dependent and its programs wait on the counts."""
    q, k, v, y = attention["Q"], attention["K"], attention["V"], attention["Y"]
    B, Hq, T = q.shape[:3]
    gated = attention.get("G") is not None
    waits = attention.get("SYNC") is not None
    device = q.device.index or 0
    y_fp32 = y.dtype == torch.float32
    kernel, smem = _kernel(chunk_size, gated, packed, y_fp32, parts, STAGES, MIN_BLOCKS, WARPGROUPS, waits, device)
    sizes = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), Hq, attention["group"], attention.get("gate_heads", 1), attention.get("stride_g", 0),
        attention["state_heads"], attention["state_slots"], T, float(attention["scale"]),
    )  # fmt: skip
    tensors = tuple((i, name) for i, name in TENSORS if attention.get(name) is not None)
    arguments = (None,) * len(TENSORS) + sizes
    if waits:
        tensors += ((len(arguments), "SYNC"),)
        arguments += (None, *(int(attention[name]) for name in COUNTS))
    grid = (-(-T // rows_per_program(WARPGROUPS)), B * Hq, 1)
    threads = (128 * WARPGROUPS, 1, 1)
    return CudaLaunch.of(kernel, grid, threads, smem, device, arguments, tensors, dependent=waits)


def launch_query(attention: dict, chunk_size: int, packed: bool, parts: str = "both") -> None:
    """Run the kernel on the query-kernel arguments ``attention`` (``query_launch``'s)."""
    query_launch(attention, chunk_size, packed, parts)(attention)


def record_query_source(spec: KernelSpec, attention: dict) -> None:
    """Register the source a call with these query-kernel arguments runs with the inspection (``inspect_kernels``,
    ``cuda_state.record_cuda_source``)."""
    from .cuda_state import record_cuda_source

    q, y = attention["Q"], attention["Y"]
    waits = attention.get("SYNC") is not None
    source = render_query_source(
        spec.chunk_size, spec.gated, spec.packed_squares, y.dtype == torch.float32, waits=waits
    )
    shapes = {"q_shape": q.shape, "k_shape": attention["K"].shape, "v_shape": attention["V"].shape}
    record_cuda_source("power_retention_query", source, spec, shapes, "chunked, CUDA query kernel", "sm_90a")


@torch.library.custom_op("retention_compile::cuda_query", mutates_args=())
def cuda_query_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    s_st: torch.Tensor,
    m_st: torch.Tensor,
    scale: float,
    chunk_size: int,
    packed: bool,
    y_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, denom)`` of the chunked causal forward, y (B, Hq, T, 64) in ``y_dtype`` (bf16 or float32) and denom
    (B, Hq, T) float32, from the chunk states ``s_st`` (B * state_heads, slots, cherry rows, 64) bf16 and ``m_st``
    (B * state_heads, slots, 64, 64) float32 that the wgmma state kernel wrote, ``g`` the cumulative log-gate
    (B, gate_heads, >= T) float32 or None: the kernel as a custom op, for traced calls (Inductor places a call of
    it in its code). q, k, v are copied first where their rows are not dense. The call's shape class must be one
    ``query_unsupported`` accepts; a call it cannot take raises ValueError naming the reason."""
    from .cuda_state import dense_rows

    q, k, v = dense_rows(q), dense_rows(k), dense_rows(v)
    y, denom = _outputs(q, v, y_dtype)
    attention = {
        "Q": q, "K": k, "V": v, "Y": y, "DEN": denom, "G": g, "S_ST": s_st, "M_ST": m_st, "scale": scale,
        "group": q.shape[1] // k.shape[1], "state_heads": s_st.shape[0] // q.shape[0], "state_slots": s_st.shape[1],
    }  # fmt: skip
    if g is not None:
        attention.update(G=g if g.stride(-1) == 1 else g.contiguous(), gate_heads=g.shape[1])
        attention["stride_g"] = attention["G"].stride(1)
    if (why := query_unsupported_reason(attention, chunk_size)) is not None:
        raise ValueError(f"retention_compile::cuda_query cannot run this call: {why}")
    with torch.cuda.device(q.device):
        launch_query(attention, chunk_size, packed)
    return y, denom


@cuda_query_op.register_fake
def _cuda_query_fake(q, k, v, g, s_st, m_st, scale, chunk_size, packed, y_dtype):
    return _outputs(q, v, y_dtype)


def _outputs(q: torch.Tensor, v: torch.Tensor, y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised y (B, Hq, T, e) in ``y_dtype`` and denom (B, Hq, T) float32, contiguous."""
    B, Hq, T = q.shape[:3]
    return q.new_empty((B, Hq, T, v.shape[3]), dtype=y_dtype), q.new_empty((B, Hq, T), dtype=torch.float32)
