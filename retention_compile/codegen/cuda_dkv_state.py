"""The inter-chunk terms of dk and dv in CUDA C++ on wgmma (``cuda_templates/dkv_state_wgmma.cu.j2``).

A drop-in for the Triton ``dkv_state_kernel`` of ``templates/backward.py.j2`` (pair form): it reads the same
reverse states and adds into the same float32 gradient buffers that ``dkv_kernel`` filled. For the keys j of
chunk c (slot 0 when non-causal), with ``mu_j = exp(G_end(c) - G_j)`` gated and causal, 1 otherwise, 0 for keys
out of range or not valid:

    dv_j += mu_j phi(k_j)^T R_c
    dk_j += mu_j J_phi(k_j)^T (R_c v_j) + 2 mu_j P_c k_j
    kterm_j += v_j . (mu_j phi(k_j)^T R_c) + mu_j (P_c k_j) . k_j        (gated)

in two kernels (dv, then dk) over key blocks of 128 rows. The backward takes it where it took the CUDA
reverse-state kernel (``cuda_reverse``) and it applies:

    dkv_state_unsupported(fwd, arch, k, v) -> None | reason  whether it serves a backward's shape class on ``arch``
    add_state_terms(fwd, coordinate_terms, args)              the backward's hook: the Triton kernel's arguments
                                                              (gradient buffers included) in, buffers updated
    torch.ops.retention_compile.cuda_dkv_state                the op (a custom op mutating dk, dv and kterm, so
                                                              ``torch.compile`` sees one opaque call)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..inspection import is_recording, record_kernel
from ..sizes import size_hint
from . import nvrtc
from .cuda_state import (
    HOPPER_SHARED_LIMIT,
    WGMMA_STAGES,
    WGMMA_THREADS,
    dense_rows,
    load_with_shared_memory,
    state_spec,
    strides_fit_32_bits,
)
from .triton_source import KernelSpec

TEMPLATE = "dkv_state_wgmma.cu.j2"
KERNEL_NAMES = ("retention_dkv_state_dv", "retention_dkv_state_dk")
ROWS = 128  # keys per program: two warpgroups of 64 rows
VALUE_DIM = 64  # the one value width the kernels take (N of the dv product, K of the dk product)
HEAD_DIMS = (32, 64)  # the dk kernel unrolls its 4 * pairs quarter steps: d = 128 (144 steps) is left to Triton
IN_FLIGHT = 4  # dv's k16 slices whose fragments are held while their products run (probe: 109 registers)
MIN_BLOCKS = 2  # programs per SM the registers are capped for


def dkv_state_unsupported(fwd: KernelSpec, arch: str | None, *rows: torch.Tensor) -> str | None:
    """None when the wgmma kernels serve the inter-chunk dk/dv terms of ``fwd``'s backward on cubin target
    ``arch`` with ``rows`` (k, v) addressed by 32-bit strides."""
    if not (fwd.chunked and fwd.deg == 2 and fwd.block_feature == 16):
        return "not the chunked deg-2 path with 16-coordinate state tiles"
    if arch != "sm_90a":
        return f"target {arch} (the wgmma dk/dv state kernels need sm_90a)"
    if fwd.dtype != "bfloat16":
        return f"dtype {fwd.dtype} (the wgmma dk/dv state kernels take bfloat16)"
    if fwd.value_dim != VALUE_DIM:
        return f"value dim e={fwd.value_dim} (the wgmma dk/dv state kernels take e={VALUE_DIM})"
    if fwd.head_dim not in HEAD_DIMS:
        return f"head dim d={fwd.head_dim} (the wgmma dk/dv state kernels take d in {HEAD_DIMS})"
    if fwd.chunk_size % ROWS:
        return f"chunk {fwd.chunk_size} (the wgmma dk/dv state kernels need a multiple of {ROWS})"
    if not strides_fit_32_bits(*rows):
        return "strides beyond 32 bits"
    if max(smem_bytes(fwd.head_dim)) > HOPPER_SHARED_LIMIT:
        return f"shared memory {max(smem_bytes(fwd.head_dim))} bytes (> {HOPPER_SHARED_LIMIT})"
    return None


def smem_bytes(d: int) -> tuple[int, int]:
    """Dynamic shared memory of the dv and dk programs (the template's ``DvShared``, ``DkShared`` + 1024 bytes to
    align them): the copy stages of R (half pairs for dv, quarter pairs for dk), the block's k rows (padded by 8),
    and for dk its v rows and P_c."""
    k_rows = ROWS * (d + 8) * 2
    dv = WGMMA_STAGES * 128 * VALUE_DIM * 2 + k_rows
    dk = WGMMA_STAGES * 64 * VALUE_DIM * 2 + ROWS * VALUE_DIM * 2 + k_rows + d * d * 4
    return tuple(-(-shared // 1024) * 1024 + 1024 for shared in (dv, dk))


@functools.lru_cache(maxsize=128)
def render_dkv_state_source(fwd: KernelSpec, coordinate_terms: bool) -> str:
    """The CUDA source of both kernels for one shape class of the chunked backward."""
    params = fwd.template_params()
    dv_smem, dk_smem = smem_bytes(fwd.head_dim)
    return nvrtc.render(
        TEMPLATE,
        d=fwd.head_dim,
        gated=fwd.gated,
        has_valid=fwd.has_valid,
        causal=fwd.causal,
        coordinate_terms=coordinate_terms,
        chunk_size=fwd.chunk_size,
        npairs=params["npairs"],
        dt=params["dt"],
        stages=WGMMA_STAGES,
        in_flight=IN_FLIGHT,
        min_blocks=MIN_BLOCKS,
        dv_smem_bytes=dv_smem,
        dk_smem_bytes=dk_smem,
    )


@torch.library.custom_op("retention_compile::cuda_dkv_state", mutates_args=("dk", "dv", "kterm"))
def cuda_dkv_state_op(
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    g: torch.Tensor | None,
    valid: torch.Tensor | None,
    dk: torch.Tensor,
    dv: torch.Tensor,
    kterm: torch.Tensor | None,
    sizes: Sequence[int],
    chunk_size: int,
    causal: bool,
    coordinate_terms: bool,
) -> None:
    """Add the inter-chunk terms into ``dk`` (B, state_heads, Tk, d), ``dv`` (.., 64) and ``kterm`` (B, state_heads,
    Tk), all float32 and contiguous.

    ``sizes = (Hq, group, state_heads, state_slots, shift, Tk)``; ``k`` (B, Hk, Tk, d) and ``v`` bf16, ``r`` the
    reverse states R (B * state_heads, state_slots, Dt, 64) bf16, ``p`` P (.., d, d) fp32, ``g`` the cumulative
    log-gate (B, state_heads, >= Tk) fp32 or None, ``valid`` (B, Tk) bool or None."""
    Hq, group, state_heads, slots, shift, Tk = sizes
    fwd = state_spec(k, v, chunk_size, causal, g is not None, valid is not None)
    source = render_dkv_state_source(fwd, coordinate_terms)
    k, v = dense_rows(k), dense_rows(v)
    r, p = r.contiguous(), p.contiguous()
    gate = None if g is None else g.contiguous()
    valid_bytes = None if valid is None else valid.contiguous().view(torch.uint8)
    g_row = 0 if gate is None else gate.stride(1)
    grid = (-(-(Tk + shift) // ROWS), k.shape[0] * state_heads, 1)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), g_row)
    sizes_args = (Hq, group, state_heads, slots, shift, Tk)
    dv_smem, dk_smem = smem_bytes(fwd.head_dim)
    device = k.device.index or 0
    dv_kernel = load_with_shared_memory(source, KERNEL_NAMES[0], dv_smem, device)
    dk_kernel = load_with_shared_memory(source, KERNEL_NAMES[1], dk_smem, device)
    with torch.cuda.device(k.device):
        dv_kernel.launch(
            grid, (WGMMA_THREADS, 1, 1), (k, v, r, gate, valid_bytes, dv, kterm, *strides, *sizes_args),
            shared_mem=dv_smem,
        )  # fmt: skip
        dk_kernel.launch(
            grid, (WGMMA_THREADS, 1, 1), (k, v, r, p, gate, valid_bytes, dk, kterm, *strides, *sizes_args),
            shared_mem=dk_smem,
        )  # fmt: skip


@cuda_dkv_state_op.register_fake
def _cuda_dkv_state_fake(k, v, r, p, g, valid, dk, dv, kterm, sizes, chunk_size, causal, coordinate_terms):
    return None


_RECORDED: set[str] = set()


def _record(fwd: KernelSpec, coordinate_terms: bool, k: torch.Tensor) -> None:
    """Register the source with the inspection (every call while compiling or inspecting; else once per source)."""
    source = render_dkv_state_source(fwd, coordinate_terms)
    if not (is_recording() or source not in _RECORDED):
        return
    _RECORDED.add(source)
    meta: dict[str, object] = {
        "k_shape": tuple(size_hint(s) for s in k.shape),
        "dtype": fwd.dtype,
        "deg": 2,
        "causal": fwd.causal,
        "gated": fwd.gated,
        "chunk_size": fwd.chunk_size,
        "kernel_path": "chunked backward, CUDA dk/dv state-term kernels (wgmma)",
    }
    _, entry = nvrtc.cached_compile(source, "sm_90a")
    meta["path"] = str(entry.with_suffix(".cu"))
    record_kernel("power_retention_dkv_state", source, meta, language="cuda")


def add_state_terms(fwd: KernelSpec, coordinate_terms: bool, args: dict) -> None:
    """The backward's hook in place of ``dkv_state_kernel``: ``args`` are that kernel's keyword arguments
    (``DK``, ``DV`` and, gated, ``KTERM`` are updated in place)."""
    _record(fwd, coordinate_terms, args["K"])
    names = ("Hq", "group", "state_heads", "state_slots", "shift", "Tk")
    torch.ops.retention_compile.cuda_dkv_state(
        args["K"], args["V"], args["R_ST"], args["P_ST"], args.get("G"), args.get("VALID"), args["DK"], args["DV"],
        args.get("KTERM"), [args[n] for n in names], fwd.chunk_size, fwd.causal, coordinate_terms,
    )  # fmt: skip
