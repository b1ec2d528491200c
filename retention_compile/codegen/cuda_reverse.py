"""The reverse states of the chunked backward in CUDA C++ on wgmma (``cuda_templates/reverse_state_wgmma.cu.j2``).

A drop-in for the Triton ``reverse_state_kernel`` of ``templates/backward.py.j2`` (same grid, same buffers, so
``reverse_scan_kernel`` and the dk/dv kernels read its output unchanged). Per state head and pair p of
16-coordinate blocks it sums, chunk by chunk from the last,

    R += sum_i coef phi_p(q_i) (lam_i / den_i) dy_i^T,   P_IJ += sum_i q_iI q_iJ^T lam_i dZ_i

with the features built in registers as the wgmma A operand, exactly as the forward's ``chunk_state_wgmma``
builds phi(k) (see the template). The backward runs it where the forward ran the CUDA state kernel (the
``codegen`` choice) and it applies:

    reverse_unsupported(fwd, arch, q, dy) -> None | reason
                                                           whether it serves a backward's shape class on ``arch``
    reverse_states(fwd, coordinate_terms, args) -> dict    ``_reverse_states``' hook (bound to the call's forward
                                                           spec): the Triton kernel's arguments in, its four
                                                           buffers out
    torch.ops.retention_compile.cuda_reverse_states       the op (a custom op with a fake impl, so
                                                           ``torch.compile`` sees one opaque call)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import cuda_state, nvrtc
from .backward import reverse_state_buffers
from .cuda_state import (
    HOPPER_SHARED_LIMIT,
    WGMMA_BLOCK_E,
    WGMMA_BLOCK_S,
    WGMMA_COORDINATE_MAJOR_BYTES,
    WGMMA_STAGES,
    WGMMA_THREADS,
    StateKernelConfig,
    dense_rows,
    load_with_shared_memory,
    record_cuda_source,
    state_spec,
    strides_fit_32_bits,
    tiled_features,
    wgmma_backward_params,
    wgmma_backward_unsupported,
)
from .triton_source import KernelSpec

TEMPLATE = "reverse_state_wgmma.cu.j2"
KERNEL_NAME = "retention_reverse_state"


def reverse_unsupported(fwd: KernelSpec, arch: str | None, *rows: torch.Tensor) -> str | None:
    """None when the wgmma reverse-state kernel serves the chunked backward of ``fwd`` on cubin target ``arch``, with
    ``rows`` (q, dy) addressed by 32-bit strides, and its shared memory (which grows with the chunk) fits."""
    if (reason := wgmma_backward_unsupported(fwd, arch, "wgmma reverse-state kernel")) is not None:
        return reason
    if fwd.value_dim % WGMMA_BLOCK_E:
        return f"value dim e={fwd.value_dim} (the wgmma reverse-state kernel needs a multiple of {WGMMA_BLOCK_E})"
    if not strides_fit_32_bits(*rows):
        return "strides beyond 32 bits"
    if (smem := smem_bytes(fwd.chunk_size)) > HOPPER_SHARED_LIMIT:
        return f"chunk {fwd.chunk_size}: the row weights take {smem} bytes of shared memory (> {HOPPER_SHARED_LIMIT})"
    return None


def smem_bytes(chunk_size: int) -> int:
    """Dynamic shared memory of one program (the template's ``Shared`` + 1024 bytes to align it): the copy stages
    (dy rows, q's blocks I and J), P's B column replicated 8 times and the row weights, both over a chunk and one
    step past it, and per warpgroup its 8 coordinates of a step's q_I, coordinate-major (8 rows of the step's rows
    and 16 bytes)."""
    rows = chunk_size + WGMMA_BLOCK_S
    stage = WGMMA_BLOCK_S * (WGMMA_BLOCK_E + 2 * 24) * 2
    shared = WGMMA_STAGES * stage + rows * 16 + rows * 4 + WGMMA_COORDINATE_MAJOR_BYTES
    return -(-shared // 1024) * 1024 + 1024


@functools.lru_cache(maxsize=128)
def render_reverse_source(fwd: KernelSpec, coordinate_terms: bool, config: StateKernelConfig) -> str:
    """The CUDA source of the reverse-state kernel for one shape class of the chunked backward, with the wgmma
    launch shape of ``config`` (``cuda_state.CONFIG``: registers capped per SM, slices in flight)."""
    return nvrtc.render(
        TEMPLATE,
        **wgmma_backward_params(fwd, coordinate_terms),
        e=fwd.value_dim,
        block_s=WGMMA_BLOCK_S,
        in_flight=config.wgmma_reverse_in_flight,
        min_blocks=config.wgmma_min_blocks,
        smem_bytes=smem_bytes(fwd.chunk_size),
    )


def _allocate(q: torch.Tensor, dy: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``(R_ST, P_ST, R_SEG, P_SEG)`` for ``sizes`` (the op's), R_ST in bf16."""
    _, state_heads, slots, _, _, _, _, n_seg = sizes
    d = q.shape[-1]
    dims = (tiled_features(d), d, dy.shape[-1])
    buffers = reverse_state_buffers(q, q.shape[0] * state_heads, slots, n_seg, dims, torch.bfloat16)
    return tuple(buffers[name] for name in ("R_ST", "P_ST", "R_SEG", "P_SEG"))


@torch.library.custom_op("retention_compile::cuda_reverse_states", mutates_args=())
def cuda_reverse_states_op(
    q: torch.Tensor,
    dy: torch.Tensor,
    den: torch.Tensor,
    dz: torch.Tensor,
    g: torch.Tensor | None,
    sizes: Sequence[int],
    chunk_size: int,
    causal: bool,
    coordinate_terms: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R_ST, P_ST, R_SEG, P_SEG)`` as the Triton reverse-state kernel leaves them (before the scan).

    ``sizes = (Hq, state_heads, state_slots, shift, Tq, Tk, chunks_per_seg, n_seg)``; ``q`` (B, Hq, Tq, d) and
    ``dy`` (B, Hq, Tq, e) bf16, ``den``, ``dz`` (B, Hq, Tq) fp32, ``g`` the cumulative log-gate (B, state_heads,
    >= Tk) fp32 or None."""
    Hq, state_heads, slots, shift, Tq, Tk, chunks_per_seg, n_seg = sizes
    fwd = state_spec(q, dy, chunk_size, causal, g is not None, False)
    source = render_reverse_source(fwd, coordinate_terms, cuda_state.CONFIG)
    smem = smem_bytes(chunk_size)
    kernel = load_with_shared_memory(source, KERNEL_NAME, smem, q.device.index or 0)
    r, p, r_seg, p_seg = _allocate(q, dy, sizes)
    q, dy = dense_rows(q), dense_rows(dy)
    den, dz = den.contiguous(), dz.contiguous()
    gate = None if g is None else g.contiguous()
    g_row = 0 if gate is None else gate.stride(1)
    params = fwd.template_params()
    grid = (params["npairs"] * (fwd.value_dim // WGMMA_BLOCK_E), q.shape[0] * state_heads, n_seg)
    strides = (q.stride(0), q.stride(1), q.stride(2), dy.stride(0), dy.stride(1), dy.stride(2), g_row)
    with torch.cuda.device(q.device):
        kernel.launch(
            grid,
            (WGMMA_THREADS, 1, 1),
            (q, dy, den, dz, gate, r, p, r_seg, p_seg, *strides, Hq, state_heads, slots, shift, Tq, Tk,
             float(scale), chunks_per_seg, n_seg),
            shared_mem=smem,
        )  # fmt: skip
    return r, p, r_seg, p_seg


@cuda_reverse_states_op.register_fake
def _cuda_reverse_states_fake(q, dy, den, dz, g, sizes, chunk_size, causal, coordinate_terms, scale):
    return _allocate(q, dy, sizes)


def _record(fwd: KernelSpec, coordinate_terms: bool, q: torch.Tensor) -> None:
    source = render_reverse_source(fwd, coordinate_terms, cuda_state.CONFIG)
    path = "chunked backward, CUDA reverse-state kernel (wgmma)"
    record_cuda_source("power_retention_reverse_state", source, fwd, {"q_shape": q.shape}, path, "sm_90a")


def reverse_states(fwd: KernelSpec, coordinate_terms: bool, args: dict) -> dict[str, torch.Tensor]:
    """``_reverse_states``' hook: ``args`` are the Triton reverse-state kernel's keyword arguments; returns the
    buffers it would have filled (``R_ST``, ``P_ST``, ``R_SEG``, ``P_SEG``)."""
    _record(fwd, coordinate_terms, args["Q"])
    names = ("Hq", "state_heads", "state_slots", "shift", "Tq", "Tk", "chunks_per_seg", "n_seg")
    r, p, r_seg, p_seg = torch.ops.retention_compile.cuda_reverse_states(
        args["Q"], args["DY"], args["DEN"], args["DZ"], args.get("G"), [args[n] for n in names],
        fwd.chunk_size, fwd.causal, coordinate_terms, args["scale"],
    )  # fmt: skip
    return {"R_ST": r, "P_ST": p, "R_SEG": r_seg, "P_SEG": p_seg}
