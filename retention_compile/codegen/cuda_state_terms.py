"""The inter-chunk (state) terms of the chunked backward in CUDA C++ on wgmma
(``cuda_templates/state_terms_wgmma.cu.j2``).

Drop-ins for the state-term parts of the Triton backward (``templates/backward.py.j2``): they read the same states
and add into the same float32 gradient buffers. For the keys j of chunk c (slot 0 when non-causal), with
``mu_j = exp(G_end(c) - G_j)`` gated and causal, 1 otherwise, 0 for keys out of range or not valid (the Triton
``dkv_state_kernel``, pair form):

    dv_j += mu_j phi(k_j)^T R_c
    dk_j += mu_j J_phi(k_j)^T (R_c v_j) + 2 mu_j P_c k_j
    kterm_j += v_j . (mu_j phi(k_j)^T R_c) + mu_j (P_c k_j) . k_j        (gated)

in two kernels (dv, then dk) over key blocks of 128 rows; and for the queries i (the state terms of the Triton
``dq_kernel``, which then leaves them out: ``BackwardSpec.dq_state_terms``), with ``dN_i = lam_i dy_i / den_i``:

    dq_i += J_phi(q_i)^T (S_c dN_i) + dZ_i lam_i (M_c + M_c^T) q_i

(``dq_state_terms_reference`` is the same in PyTorch, the form the CPU tests run). The backward takes them where it
took the CUDA reverse-state kernel (``cuda_reverse``) and they apply; the dq kernel only where ``cuda_state.CONFIG``
asks for it (``wgmma_dq``).

    state_terms_unsupported(fwd, arch, *rows) -> None | reason   whether they serve a backward's shape class on ``arch``
    add_dkv_state_terms(fwd, coordinate_terms, args)       the backward's hooks: the Triton kernels' arguments
    add_dq_state_terms(fwd, coordinate_terms, args)        (gradient buffers included) in, buffers updated
    torch.ops.retention_compile.cuda_dkv_state / cuda_dq_state
                                                           the ops (custom ops mutating the gradient buffers, so
                                                           ``torch.compile`` sees one opaque call each)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import nvrtc
from .cuda_state import (
    HOPPER_SHARED_LIMIT,
    WGMMA_STAGES,
    WGMMA_THREADS,
    dense_rows,
    load_with_shared_memory,
    record_cuda_source,
    state_spec,
    strides_fit_32_bits,
    wgmma_backward_params,
    wgmma_backward_unsupported,
)
from .triton_source import KernelSpec

TEMPLATE = "state_terms_wgmma.cu.j2"
KERNEL_NAMES = ("retention_dkv_state_dv", "retention_dkv_state_dk", "retention_dq_state")
ROWS = 128  # keys per program: two warpgroups of 64 rows
VALUE_DIM = 64  # the one value width the kernels take (N of the dv product, K of the dk product)
HEAD_DIMS = (32, 64)  # the dk and dq kernels unroll 4 * pairs quarter steps: d = 128 (144 steps) is left to Triton
IN_FLIGHT = 4  # dv's k16 slices whose fragments are held while their products run (probe: 109 registers)
MIN_BLOCKS = 2  # programs per SM the registers are capped for


def state_terms_unsupported(fwd: KernelSpec, arch: str | None, *rows: torch.Tensor) -> str | None:
    """None when the wgmma kernels serve the state terms of ``fwd``'s backward on cubin target ``arch`` with
    ``rows`` (k, v or q, dy) addressed by 32-bit strides."""
    if (reason := wgmma_backward_unsupported(fwd, arch, "wgmma state-term kernel")) is not None:
        return reason
    if fwd.value_dim != VALUE_DIM:
        return f"value dim e={fwd.value_dim} (the wgmma state-term kernels take e={VALUE_DIM})"
    if fwd.head_dim not in HEAD_DIMS:
        return f"head dim d={fwd.head_dim} (the wgmma state-term kernels take d in {HEAD_DIMS})"
    if fwd.chunk_size % ROWS:
        return f"chunk {fwd.chunk_size} (the wgmma state-term kernels need a multiple of {ROWS})"
    if not strides_fit_32_bits(*rows):
        return "strides beyond 32 bits"
    if max(smem_bytes(fwd.head_dim)) > HOPPER_SHARED_LIMIT:
        return f"shared memory {max(smem_bytes(fwd.head_dim))} bytes (> {HOPPER_SHARED_LIMIT})"
    return None


def smem_bytes(d: int) -> tuple[int, int, int]:
    """Dynamic shared memory of the dv, dk and dq programs (the template's ``DvShared``, ``DkShared``, ``DqShared``
    + 1024 bytes to align them): the copy stages of the state (half pairs for dv, quarter pairs for dk and dq), the
    block's k or q rows (padded by 8), and for dk its v rows and P_c, for dq its dN rows (and 2 dN), M_c and dZ lam
    per row."""
    x_rows = ROWS * (d + 8) * 2
    y_rows = ROWS * VALUE_DIM * 2
    quarters = WGMMA_STAGES * 64 * VALUE_DIM * 2 + y_rows + x_rows + d * d * 4
    dv = WGMMA_STAGES * 128 * VALUE_DIM * 2 + x_rows
    return tuple(-(-shared // 1024) * 1024 + 1024 for shared in (dv, quarters, quarters + y_rows + ROWS * 4))


@functools.lru_cache(maxsize=128)
def render_state_terms_source(fwd: KernelSpec, coordinate_terms: bool) -> str:
    """The CUDA source of the three kernels for one shape class of the chunked backward."""
    dv_smem, dk_smem, dq_smem = smem_bytes(fwd.head_dim)
    return nvrtc.render(
        TEMPLATE,
        **wgmma_backward_params(fwd, coordinate_terms),
        has_valid=fwd.has_valid,
        in_flight=IN_FLIGHT,
        min_blocks=MIN_BLOCKS,
        dv_smem_bytes=dv_smem,
        dk_smem_bytes=dk_smem,
        dq_smem_bytes=dq_smem,
    )


def _launch_strides(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> tuple[int, ...]:
    """The kernels' stride arguments: batch, head and row strides of the two row tensors (k, v or q, dy), then the
    gate's row stride (0 without a gate)."""
    return (*x.stride()[:3], *y.stride()[:3], 0 if gate is None else gate.stride(1))


def _check_final_outputs(op: str, *pairs: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """A final output is stored at its float32 buffer's offsets: bf16, the same shape, both contiguous."""
    for buffer, final in pairs:
        if final is not None and (final.dtype != torch.bfloat16 or final.shape != buffer.shape
                                  or not (final.is_contiguous() and buffer.is_contiguous())):  # fmt: skip
            raise ValueError(f"{op}: a final output must be a contiguous bf16 tensor shaped like its float32 buffer "
                             f"{tuple(buffer.shape)}, got {final.dtype} {tuple(final.shape)}")  # fmt: skip


def _check_bf16_states(op: str, states: torch.Tensor) -> None:
    """The kernels read the states as bf16 tiles: anything else would be read as wrong numbers, so it is refused."""
    if states.dtype != torch.bfloat16:
        raise ValueError(f"{op} reads bf16 states, got {states.dtype} (convert them, as add_dq_state_terms does)")


@torch.library.custom_op("retention_compile::cuda_dkv_state", mutates_args=("dk", "dv", "kterm", "dk_out", "dv_out"))
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
    dk_out: torch.Tensor | None,
    dv_out: torch.Tensor | None,
    sizes: Sequence[int],
    chunk_size: int,
    causal: bool,
    coordinate_terms: bool,
) -> None:
    """Add the inter-chunk terms into ``dk`` (B, state_heads, Tk, d), ``dv`` (.., 64) and ``kterm`` (B, state_heads,
    Tk), all float32 and contiguous; where ``dk_out`` / ``dv_out`` (bf16, shaped and laid out as ``dk`` / ``dv``) are
    given, the sums are stored there, rounded, and ``dk`` / ``dv`` keep what they held.

    ``sizes = (Hq, group, state_heads, state_slots, shift, Tk)``; ``k`` (B, Hk, Tk, d) and ``v`` bf16, ``r`` the
    reverse states R (B * state_heads, state_slots, Dt, 64) bf16, ``p`` P (.., d, d) fp32, ``g`` the cumulative
    log-gate (B, state_heads, >= Tk) fp32 or None, ``valid`` (B, Tk) bool or None."""
    _check_bf16_states("cuda_dkv_state", r)
    _check_final_outputs("cuda_dkv_state", (dk, dk_out), (dv, dv_out))
    Hq, group, state_heads, slots, shift, Tk = sizes
    fwd = state_spec(k, v, chunk_size, causal, g is not None, valid is not None)
    source = render_state_terms_source(fwd, coordinate_terms)
    if k.numel() == 0 or dk.numel() == 0:
        return
    k, v = dense_rows(k), dense_rows(v)
    r, p = dense_rows(r.contiguous()), dense_rows(p.contiguous())
    gate = None if g is None else g.contiguous()
    valid_bytes = None if valid is None else valid.contiguous().view(torch.uint8)
    grid = (-(-(Tk + shift) // ROWS), k.shape[0] * state_heads, 1)
    strides = _launch_strides(k, v, gate)
    sizes_args = (Hq, group, state_heads, slots, shift, Tk)
    dv_smem, dk_smem, _ = smem_bytes(fwd.head_dim)
    device = k.device.index or 0
    dv_kernel = load_with_shared_memory(source, KERNEL_NAMES[0], dv_smem, device)
    dk_kernel = load_with_shared_memory(source, KERNEL_NAMES[1], dk_smem, device)
    with torch.cuda.device(k.device):
        dv_kernel.launch(
            grid, (WGMMA_THREADS, 1, 1), (k, v, r, gate, valid_bytes, dv, dv_out, kterm, *strides, *sizes_args),
            shared_mem=dv_smem,
        )  # fmt: skip
        dk_kernel.launch(
            grid, (WGMMA_THREADS, 1, 1), (k, v, r, p, gate, valid_bytes, dk, dk_out, kterm, *strides, *sizes_args),
            shared_mem=dk_smem,
        )  # fmt: skip


@cuda_dkv_state_op.register_fake
def _cuda_dkv_state_fake(
    k, v, r, p, g, valid, dk, dv, kterm, dk_out, dv_out, sizes, chunk_size, causal, coordinate_terms
):
    return None


@torch.library.custom_op("retention_compile::cuda_dq_state", mutates_args=("dq", "dq_out"))
def cuda_dq_state_op(
    q: torch.Tensor,
    dy: torch.Tensor,
    den: torch.Tensor,
    dz: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor,
    g: torch.Tensor | None,
    dq: torch.Tensor,
    dq_out: torch.Tensor | None,
    sizes: Sequence[int],
    chunk_size: int,
    causal: bool,
    has_valid: bool,
    coordinate_terms: bool,
    scale: float,
) -> None:
    """Add the state terms into ``dq`` (B, Hq, Tq, d) float32, contiguous, or store the sums, rounded, in ``dq_out``
    (bf16, shaped and laid out as ``dq``) where given.

    ``sizes = (Hq, state_heads, state_slots, shift, Tq, Tk)``; ``q`` (B, Hq, Tq, d) and ``dy`` (.., 64) bf16,
    ``den``, ``dz`` (B, Hq, Tq) fp32, ``s`` the forward states S (B * state_heads, state_slots, Dt, 64) bf16, ``m``
    M (.., d, d) fp32, ``g`` the cumulative log-gate (B, state_heads, >= Tk) fp32 or None. ``has_valid`` and
    ``coordinate_terms`` do not change dq's terms: they select the source the dk/dv kernels of the same call were
    compiled from (one module for the three kernels)."""
    if dq.dtype != torch.float32 or not dq.is_contiguous():
        raise ValueError(f"cuda_dq_state adds into a contiguous float32 dq, got {dq.dtype} with strides {dq.stride()}")
    _check_bf16_states("cuda_dq_state", s)
    _check_final_outputs("cuda_dq_state", (dq, dq_out))
    if q.numel() == 0:
        return
    Hq, state_heads, slots, shift, Tq, Tk = sizes
    fwd = state_spec(q, dy, chunk_size, causal, g is not None, has_valid)
    source = render_state_terms_source(fwd, coordinate_terms)
    q, dy = dense_rows(q), dense_rows(dy)
    s, m = dense_rows(s.contiguous()), dense_rows(m.contiguous())
    den, dz = den.contiguous(), dz.contiguous()
    gate = None if g is None else g.contiguous()
    grid = (-(-Tq // ROWS), q.shape[0] * Hq, 1)
    strides = _launch_strides(q, dy, gate)
    smem = smem_bytes(fwd.head_dim)[2]
    kernel = load_with_shared_memory(source, KERNEL_NAMES[2], smem, q.device.index or 0)
    with torch.cuda.device(q.device):
        kernel.launch(
            grid, (WGMMA_THREADS, 1, 1),
            (q, dy, den, dz, s, m, gate, dq, dq_out, *strides, Hq, state_heads, slots, shift, Tq, Tk, float(scale)),
            shared_mem=smem,
        )  # fmt: skip


@cuda_dq_state_op.register_fake
def _cuda_dq_state_fake(
    q, dy, den, dz, s, m, g, dq, dq_out, sizes, chunk_size, causal, has_valid, coordinate_terms, scale
):
    return None


def _record(fwd: KernelSpec, coordinate_terms: bool, shapes: dict[str, torch.Size]) -> None:
    source = render_state_terms_source(fwd, coordinate_terms)
    path = "chunked backward, CUDA state-term kernels (wgmma)"
    record_cuda_source("power_retention_state_terms", source, fwd, shapes, path, "sm_90a")


def add_dkv_state_terms(fwd: KernelSpec, coordinate_terms: bool, args: dict) -> None:
    """The backward's hook in place of ``dkv_state_kernel``: ``args`` are that kernel's keyword arguments
    (``DK``, ``DV`` and, gated, ``KTERM`` are updated in place; with ``DK_OUT`` and ``DV_OUT``, bf16, the sums go
    there instead)."""
    _record(fwd, coordinate_terms, {"k_shape": args["K"].shape})
    names = ("Hq", "group", "state_heads", "state_slots", "shift", "Tk")
    torch.ops.retention_compile.cuda_dkv_state(
        args["K"], args["V"], args["R_ST"], args["P_ST"], args.get("G"), args.get("VALID"), args["DK"], args["DV"],
        args.get("KTERM"), args.get("DK_OUT"), args.get("DV_OUT"), [args[n] for n in names], fwd.chunk_size,
        fwd.causal, coordinate_terms,
    )  # fmt: skip


def add_dq_state_terms(fwd: KernelSpec, coordinate_terms: bool, args: dict) -> None:
    """The backward's hook for the state terms ``dq_kernel`` left out: ``args`` are that kernel's keyword
    arguments, ``DQ`` (float32, holding the intra-chunk part) is updated in place, or with ``DQ_OUT`` (bf16) the sum
    is stored there. ``coordinate_terms`` does not change dq's terms (S holds no factor 2 either way); it names the
    module the dk/dv kernels share."""
    _record(fwd, coordinate_terms, {"q_shape": args["Q"].shape})
    states, totals, slots = args["S_ST"], args["M_ST"], args["state_slots"]
    if not fwd.causal:  # float32 segment totals (forward.StateLayout): every query reads the last slot, in bf16
        states, totals, slots = states[:, -1:].to(torch.bfloat16), totals[:, -1:], 1
    sizes = [args["Hq"], args["state_heads"], slots, args["shift"], args["Tq"], args["Tk"]]
    torch.ops.retention_compile.cuda_dq_state(
        args["Q"], args["DY"], args["DEN"], args["DZ"], states, totals, args.get("G"), args["DQ"], args.get("DQ_OUT"),
        sizes, fwd.chunk_size, fwd.causal, fwd.has_valid, coordinate_terms, args["scale"],
    )  # fmt: skip


def _pairs(d: int) -> list[tuple[int, int]]:
    """The pair tiles' 16-coordinate blocks (I, J) in the kernels' order: p = delta * nb + I, J = (I + delta) % nb."""
    nb = d // 16
    return [(i, (i + delta) % nb) for delta in range(nb // 2 + 1) for i in range(nb)][: nb * (nb + 1) // 2]


def _pair_features(x: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """phi(x) over the pair tiles: (rows, Dt) with x_I[a] x_J[b] at p * 256 + 16 a + b."""
    tiles = [x[:, 16 * i : 16 * i + 16, None] * x[:, None, 16 * j : 16 * j + 16] for i, j in pairs]
    return torch.stack(tiles, 1).flatten(1)


def _pair_jacobian_t(grad: torch.Tensor, x: torch.Tensor, pairs: list[tuple[int, int]], coef: list[float]):
    """J_phi(x)^T grad for grad over the pair tiles (rows, Dt): block I gets sum_b X[a, b] x_J[b], block J gets
    sum_a X[a, b] x_I[a], X the pair's tile times its coefficient."""
    out = torch.zeros_like(x)
    for p, (i, j) in enumerate(pairs):
        tile = grad[:, p * 256 : (p + 1) * 256].reshape(-1, 16, 16) * coef[p]
        out[:, 16 * i : 16 * i + 16] += (tile * x[:, None, 16 * j : 16 * j + 16]).sum(2)
        out[:, 16 * j : 16 * j + 16] += (tile * x[:, 16 * i : 16 * i + 16, None]).sum(1)
    return out


def dkv_state_terms_reference(fwd: KernelSpec, coordinate_terms: bool, args: dict) -> None:
    """``add_dkv_state_terms`` in PyTorch (any device and dtype; phi(k) rounded to the states' dtype as the CUDA
    kernel rounds it, float32 elsewhere), key by key of each state head:

        dv_j += mu_j phi(k_j)^T R_c,   dk_j += mu_j J_phi(k_j)^T (R_c v_j) + 2 mu_j P_c k_j,
        kterm_j += v_j . (mu_j phi(k_j)^T R_c) + mu_j (P_c k_j) . k_j   (gated)

    with c = (j + shift) // C (causal; slot 0 otherwise), mu_j = exp(G_end(c) - G_j) gated and causal, 1
    otherwise, 0 for keys not valid; off-diagonal pairs count twice with ``coordinate_terms`` (R holds no 2). Given
    ``DK_OUT``, ``DV_OUT``, the sums are stored there instead."""
    k, v, r_states, p_states = (args[n] for n in ("K", "V", "R_ST", "P_ST"))
    dk, dv = (_working_copy(args, n) for n in ("DK", "DV"))
    gate, valid, kterm = args.get("G"), args.get("VALID"), args.get("KTERM")
    Hq, group, state_heads, shift, Tk = (args[n] for n in ("Hq", "group", "state_heads", "shift", "Tk"))
    chunk, d = fwd.chunk_size, k.shape[-1]
    pairs = _pairs(d)
    coef = [2.0 if coordinate_terms and i != j else 1.0 for i, j in pairs]
    feature_coef = torch.tensor(coef, device=k.device).repeat_interleave(256)
    keys = torch.arange(Tk, device=k.device)
    chunks = (keys + shift) // chunk if fwd.causal else torch.zeros_like(keys)
    for b in range(k.shape[0]):
        for hs in range(state_heads):
            bs, hk = b * state_heads + hs, hs * (Hq // state_heads) // group
            ok = torch.ones(Tk, dtype=torch.bool, device=k.device) if valid is None else valid[b].bool()
            x, vals = k[b, hk].float() * ok[:, None], v[b, hk].float() * ok[:, None]
            mu = ok.float()
            if gate is not None and fwd.causal:
                g = gate[b, hs].float()
                ends = torch.clamp((chunks + 1) * chunk - shift, max=Tk) - 1
                mu = torch.where(ok, torch.exp(g[ends] - g[keys]), 0.0)
            for c in chunks.unique().tolist():
                rows = chunks == c
                r, pmat = r_states[bs, c if fwd.causal else 0].float(), p_states[bs, c if fwd.causal else 0]
                phi = _pair_features(x[rows], pairs).to(r_states.dtype).float() * feature_coef
                dv_state = mu[rows, None] * (phi @ r)
                pk = x[rows] @ pmat
                grad = vals[rows] @ r.T
                dk[b, hs, rows] += mu[rows, None] * (_pair_jacobian_t(grad, x[rows], pairs, coef) + 2.0 * pk)
                dv[b, hs, rows] += dv_state
                if kterm is not None:
                    kterm[b, hs, rows] += (vals[rows] * dv_state).sum(1) + mu[rows] * (pk * x[rows]).sum(1)
    _store_finals(args, DK=dk, DV=dv)


def _working_copy(args: dict, name: str) -> torch.Tensor:
    """The buffer a reference adds into: ``args[name]`` itself, or a copy where ``NAME_OUT`` is to get the sum (the
    CUDA kernels then leave the buffer as it was)."""
    return args[name] if args.get(f"{name}_OUT") is None else args[name].clone()


def _store_finals(args: dict, **sums: torch.Tensor) -> None:
    for name, total in sums.items():
        if (final := args.get(f"{name}_OUT")) is not None:
            final.copy_(total)


def dq_state_terms_reference(fwd: KernelSpec, coordinate_terms: bool, args: dict) -> None:
    """``add_dq_state_terms`` in PyTorch (any device and dtype, the Triton ``dq_kernel``'s arithmetic: dN rounded
    to the states' dtype, float32 elsewhere), row by row of each query head:

        dq_i += J_phi(q_i)^T (S_c dN_i) + dZ_i lam_i (M_c + M_c^T) q_i,   dN_i = lam_i dy_i / den_i,
        lam_i = s^2 exp(G_(i + off) - G_(c C - shift - 1))   (gated, causal; 0 for a position before the first key)

    with c = max(i + off + shift, 0) // C (causal) or the last slot, J_phi^T of pair tile X giving block I
    sum_b X[a, b] q_J[b] and block J sum_a X[a, b] q_I[a], off-diagonal tiles counted twice. Given ``DQ_OUT``, the
    sum is stored there instead."""
    q, dy, den, dz, states, m_states = (args[n] for n in ("Q", "DY", "DEN", "DZ", "S_ST", "M_ST"))
    dq = _working_copy(args, "DQ")
    gate = args.get("G")
    Hq, state_heads, slots, shift, Tq, Tk = (args[n] for n in ("Hq", "state_heads", "state_slots", "shift", "Tq", "Tk"))
    B, chunk, s2 = q.shape[0], fwd.chunk_size, args["scale"] ** 2
    pairs = _pairs(q.shape[-1])
    coef = [1.0 if i == j else 2.0 for i, j in pairs]
    pos = torch.arange(Tq, device=q.device) + (Tk - Tq)
    chunks = (pos + shift).clamp_min(0) // chunk if fwd.causal else torch.zeros_like(pos)
    for b in range(B):
        for hq in range(Hq):
            bs = b * state_heads + hq // (Hq // state_heads)
            lam = torch.full((Tq,), s2, device=q.device)
            if gate is not None and fwd.causal:
                g = gate[b, hq // (Hq // state_heads)].float()
                g_pos = torch.where(pos >= 0, g[pos.clamp_min(0)], 0.0)
                bnd = chunks * chunk - shift - 1
                lam = s2 * torch.exp(g_pos - torch.where(bnd >= 0, g[bnd.clamp_min(0)], 0.0))
            dn = (dy[b, hq].float() * (lam / den[b, hq])[:, None]).to(states.dtype).float()
            x = q[b, hq].float()
            for c in chunks.unique().tolist():
                rows = chunks == c
                slot = c if fwd.causal else slots - 1
                grad = dn[rows] @ states[bs, slot].float().T  # (rows, Dt)
                m = m_states[bs, slot]
                add = (dz[b, hq][rows] * lam[rows])[:, None] * (x[rows] @ (m + m.T))
                dq[b, hq, rows] += add + _pair_jacobian_t(grad, x[rows], pairs, coef)
    _store_finals(args, DQ=dq)
