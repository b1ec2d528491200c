"""The Triton backward of power retention (DESIGN.md section 1), launched through ``wrap_triton``.

    triton_backward(grad_y, q, k, v, y, denom, *, scale, deg, log_gate, causal, valid, plan) -> (dq, dk, dv, dg)

Same contract as ``chunked.chunked_backward``: gradients of ``sum(grad_y * y)`` in the input dtypes, ``dg`` in
log_gate's shape and dtype (None without a gate); the same cases as ``triton_forward`` (``triton_supports``) and
the same path choice (``forward.kernel_spec``: deg 2 past one chunk is chunked, everything else quadratic).

Math. With ``dO'_i = [dN_i, dZ_i] = [dy_i, -(dy_i . y_i)] / denom_i`` (y and denom saved by the forward) and
``w_ij = (s q_i . k_j)^p exp(G_{i+off} - G_j)`` on admissible pairs:

    dw_ij = dN_i . v_j + dZ_i,   ds_ij = s p (s q_i . k_j)^(p-1) exp(G_{i+off} - G_j) dw_ij
    dq_i  = sum_j ds_ij k_j,     dk_j = sum_i ds_ij q_i,   dv_j = sum_i w_ij dN_i
    dG_t  = qterm_i [i + off = t] - kterm_t,   qterm_i = sum_j w_ij dw_ij = (dy_i . y_i) eps / denom_i,
            kterm_j = sum_i w_ij dw_ij,        dg_u = sum_{t >= u} dG_t = -sum_{t < u} dG_t
            chunked causal: dg_u at each chunk start u = sum_{i + off >= u > j} w_ij dw_ij = <S_c, R_(c-1)> +
            <M_c, P_(c-1)> (the states below), and dG summed only from there (``gates.log_gate_grad_in_chunks``)

(G_t enters w_ij with + on the query side and - on the key side; ``g_u`` enters every ``G_t`` with t >= u.)

Precision. ``dw_ij = (dy_i . v_j) / denom_i + dZ_i`` is a small difference wherever y_i is close to v_j (rows
with few keys), and d log_gate sums such differences: a float64 simulation (T = 1000, bf16 inputs) moves d log_gate
by 2.0e-2 when dN = dy / denom is rounded to bf16 before the dot and by 7.0e-3 when y is saved in bf16. So the
dots read dy itself (rounded to the inputs' dtype once, so its products with v are exact in the fp32 accumulator)
and divide by denom after, and y arrives in float32 (the op's forward returns it so; autograd saves it).

Kernels (``templates/backward.py.j2``), all recomputing the weights from q and k (nothing T x T is stored):

quadratic   ``dq_kernel`` (grid: query blocks x B*Hq) walks the admissible keys of its rows;
            ``dkv_kernel`` (grid: key blocks x B*Hs) walks, for each query head reading its state, the rows
            that see its keys, accumulating dk, dv and kterm in registers.
chunked     the same two kernels restricted to the rows' / keys' own chunk, plus the chunk states:
            the forward states ``S_c, M_c`` before each chunk, saved by the forward or recomputed by the state kernel
            it ran (Triton's, or the CUDA one where ``select_state_kernel`` picked it) and the scan, give dq's
            inter-chunk part; ``reverse_state_kernel`` walks the chunks of a segment from its last and stores
            ``R_c = sum_{i after c} coef s^2 exp(G_i - E_c) phi(q_i) dN_i^T`` (pair tiles, like S_c; coef = 2 off
            the diagonal, or 1 where ``coordinate_state_terms`` reads R as ordered pairs: there ``boundary_kernel``
            doubles S's off-diagonal tiles instead; folding coef into the pair form's operands cost its ungated
            ``dkv_state_kernel`` 2.30 -> 2.50 ms at T=65536) and
            ``P_c = sum_{i after c} s^2 exp(G_i - E_c) dZ_i q_i q_i^T`` (d x d) within the segment;
            ``reverse_scan_kernel`` adds the later segments (segments as the forward's state kernel has them:
            ``forward.state_segments``; with one, at b=1 h=8 d=64, the kernel had 80 programs on 132 SMs).
            ``dkv_state_kernel`` adds them to the float32 dk, dv (and key term) that ``dkv_kernel`` stored (split
            so each part could be checked alone on the H200: the bf16 fault was the P term's wgmma dot, now an
            fp32 FMA dot). It walks the pair tiles, or for gated 16-bit tiles with d <= 64 the coordinates
            (``coordinate_state_terms``). Where the forward ran the CUDA state kernel, the reverse states and these
            terms run on wgmma instead where those kernels serve (``cuda_reverse``; ``cuda_state_terms``: bf16 on
            sm_90a, e = 64, d in {32, 64}). ``boundary_kernel`` (gated; grid: chunks x B*Hs) sums the forward and
            reverse states into d log_gate at each chunk start. phi(q) and phi(k) are built in registers, never in
            global memory.

Memory. The forward saves its inputs, ``y`` (B, Hq, Tq, e) and ``denom`` (B, Hq, Tq), both float32 (y is
4 bytes per element, twice a 16-bit copy: see "Precision"; 134 MB per layer at B=1, Hq=8, T=65536, e=64), and no
weights. Its chunk states are stored where the op's memory rule keeps them (``ops.keeps_states``: at most twice
y's bytes; 176 MB beside y's 134 MB at d = 64, C = 1024) and arrive here as ``saved_states``; else they are
recomputed (the state and scan kernels again: 1.1 ms of a 9.1 ms fwd+bwd step at T=65536 on the H200). The backward
allocates ``dZ`` (B, Hq, Tq) float32 and, on the chunked path, per state head and chunk the reverse states (Dt x e
in the dots' dtype plus d x d float32, Dt = 2560 for d = 64; the recomputed forward states take as much again):
``n_chunks * (Dt * e * 2 + d * d * 4)`` bytes per state head for 16-bit inputs (about 22 MB per head at T = 65536,
C = 1024), plus the reverse segment totals in float32 (``n_seg * (Dt * e + d * d) * 4`` bytes per state head:
5.4 MB with the 8 segments of b=1 h=8 d=64 on an H200). With a gate per query head (states per query head) dk and
dv are summed over the group from float32 per-head buffers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..gates import log_gate_grad, log_gate_grad_in_chunks
from ..planning import Plan
from ..reference import EPS
from ..sizes import contiguous_strides, pow2_at_least, size_hint
from .forward import (
    SCAN_WARPS,
    StateLayout,
    _cdiv,
    _chunk_states,
    _gate_cumsum,
    _launch,
    _strides,
    aligned_rows,
    kernel_inputs,
    kernel_spec,
    segment_major_programs_per_sm,
    shifted_rows,
    single_key_padded,
    small_chunk_float32,
    state_segments,
    with_a_key_of_zeros,
)
from .triton_source import SCAN_BLOCK, KernelSpec, load, load_forward, value_tile

BACKWARD_TEMPLATE = "backward.py.j2"
MAX_ROWS = 64  # query rows / keys per program: the (rows x b x b) pair tile of the state terms stays in registers
WIDE = 128  # d or e from this on: half the rows (the dk, dv accumulators are rows x d and rows x e in fp32)
QUADRATIC_WARPS = 4
CHUNKED_WARPS = 8  # the state terms hold (rows x 256) fp32 tiles (see chunked_warps for the 16-bit cases)
STATE_WARPS = 8
STAGES = 2
REVERSE_STAGES = 3  # H200 T=65536 d=64 bf16: reverse_state_kernel 1.13 ms at 2 stages, 0.94 at 3 (gated 1.20, 0.98)
PREP_ROWS = 64  # rows of the upstream gradient per program of prep_kernel
PREP_WARPS = 4
# Gated dkv_kernel at deg 2: the rows at or after a key block's last key take the gate as a factor per row and one
# per key (BackwardSpec.factored_gate_rows), not an exp per weight; the block's own rows keep one exp per weight. Off
# (False), and at deg 4, every row takes one exp per weight. Measured on the H200 (session 35): at T=65536 b1 h8 d64
# bf16 gated, dkv_kernel 0.910 ms against 0.978 off, fwd+bwd 5.41 against 5.49 (16384: 0.249 against 0.267). At deg 4
# the factored rows put bf16 d = 128's d log_gate at 2.1-2.4e-2 against the GPU tests' 2e-2 bound (per weight, under
# it): kterm has to cancel against the forward's weights, the factored rows round x^p without the gate where the
# forward rounded it with its own, and x^4 quadruples a rounding's relative error.
FACTORED_GATE_ROWS = True
# Gated dq_kernel: the key steps at or before the program's first row take exp(G_i - G_j) = exp(G_i - G_ref)
# exp(G_ref - G_j) with G_ref = G at that row, one exp per key and per row instead of one per weight
# (BackwardSpec.factored_dq_gate). On since session 35: at T=65536 b1 h8 d64 bf16 gated the H200 ran dq_kernel in
# 0.390 ms against 0.474 off (ungated 0.332), fwd+bwd 5.35 against 5.42; the GPU backward tests' grid (48 cases) and
# test_gate_factorings pass with it on (backward_notes.md, session 35).
FACTORED_DQ_GATE = True


def _value_pad(e: int) -> int:
    """The backward's padded value width: at least 16 columns. Not the forward's 32 (``value_tile``): with 32, the
    H200 faulted in the float16 backward of d=8 e=16 deg 4 (GPU fuzz seed 20261201 case 269), which passed with 16.
    float16 no longer reaches these kernels (``forward.kernel_inputs``); 16 is what the bf16 and fp32 backwards
    were validated with."""
    return max(16, pow2_at_least(e))


@dataclass(frozen=True)
class BackwardSpec:
    """One shape class of the backward: the forward's spec (path, chunk, pair tiles) and the backward's tiles.

    block_t / block_k: query rows of a dq program and keys of a dk/dv program;
    key_step / row_step: keys per step of ``dq_kernel``'s loop and query rows per step of ``dkv_kernel``'s;
    dq_stages / dkv_stages: the software pipeline depth of those two loops (their launches' ``num_stages``);
    block_s / block_e: rows per step and value columns per program of the reverse state kernel;
    dq_state_terms: whether the chunked ``dq_kernel`` adds the state terms itself (False where a CUDA kernel adds
    them after it: ``_dq_state_hook``);
    factored_gate_rows: gated ``dkv_kernel`` factors exp(G_i - G_j) = exp(G_i - G_E) exp(G_E - G_j) for the rows at
    or after the key block's last key E (``FACTORED_GATE_ROWS``, deg 2 only);
    factored_dq_gate: gated ``dq_kernel`` factors it at the rows' first position for the keys before it
    (``FACTORED_DQ_GATE``).
    """

    forward: KernelSpec
    block_t: int
    block_k: int
    key_step: int
    row_step: int
    block_s: int
    block_e: int
    dq_state_terms: bool = True
    dq_stages: int = 2
    dkv_stages: int = 2
    factored_gate_rows: bool = False
    factored_dq_gate: bool = False

    @staticmethod
    def of(forward: KernelSpec, dq_state_terms: bool = True) -> BackwardSpec:
        """Tiles from the forward's: at most ``MAX_ROWS`` (halved for wide heads) and never past the chunk.

        float32 heads count as wide from a padded width of ``WIDE`` on: fp32 d = e = 96 with 64 rows asked 264 KB
        of shared memory in dkv_state_kernel (over the H200's 227 KB), 196 KB with 32 rows (sm_90 compiles with
        Triton 3.6, ``.scratch/bwd_smem.py``); bf16 d = e = 96 with 64 rows takes 180 KB."""
        rows = min(forward.block_t, MAX_ROWS)
        widths = (forward.head_dim, forward.value_dim)
        if forward.dtype == "float32":
            widths = tuple(pow2_at_least(w) for w in widths)
        if max(widths) >= WIDE:
            rows = min(rows, MAX_ROWS // 2)
        if forward.chunked:
            rows = min(rows, forward.chunk_size)
        block_e = min(forward.block_e, _value_pad(forward.value_dim))
        spec = BackwardSpec(
            forward, rows, rows, rows, rows, rows, block_e, dq_state_terms, STAGES, STAGES,
            FACTORED_GATE_ROWS and forward.gated and forward.deg == 2, FACTORED_DQ_GATE and forward.gated,
        )  # fmt: skip
        return dataclasses.replace(spec, **_tuned_intra_loops(spec))

    def template_params(self) -> dict[str, object]:
        fwd = self.forward
        params = fwd.template_params()
        e_pad = _value_pad(fwd.value_dim)
        return {
            **params,
            "block_t": self.block_t,
            "block_k": self.block_k,
            "key_step": self.key_step,
            "row_step": self.row_step,
            "block_s": self.block_s,
            "block_e": self.block_e,
            "n_eb": -(-fwd.value_dim // self.block_e),
            "e_pad": e_pad,
            "prep_rows": PREP_ROWS,
            "coordinate_terms": coordinate_state_terms(fwd),
            "dq_state_terms": self.dq_state_terms,
            "factored_gate_rows": self.factored_gate_rows,
            "factored_dq_gate": self.factored_dq_gate,
            "summary": (
                f"{fwd.summary()}; backward rows={self.block_t} (key step {self.key_step}) keys={self.block_k}"
                f" (row step {self.row_step}) state rows={self.block_s}"
            ),
        }


def _tuned_intra_loops(spec: BackwardSpec) -> dict[str, int]:
    """Loop steps and stages of the intra-chunk kernels where measured better than the defaults (64-row steps, 2
    stages), for the shape they were measured on: bf16, d = e = 64, chunks of 1024 and 64-row programs.

    ``benchmarks/bench_intra_tiles.py`` on the H200 (``intra_tiles_NVIDIA-H200_2026-11-30_08c85aa.json``, T=65536,
    b1 h8, ms per launch, each kernel alone): ``dq_kernel`` without its state terms (the CUDA kernel adds them), 32
    keys per step and 3 stages: 0.419 -> 0.374 ungated (gated it was slower: 0.526 -> 0.561, so gated keeps the
    default); ``dkv_kernel`` gated, 32 rows per step and 3 stages: 1.130 -> 1.022 (ungated equal: 0.754 -> 0.756)."""
    fwd = spec.forward
    measured = (fwd.chunked, fwd.dtype, fwd.head_dim, fwd.value_dim, spec.block_t, spec.block_k)
    if measured != (True, "bfloat16", 64, 64, 64, 64):
        return {}
    if fwd.gated:
        return {"row_step": 32, "dkv_stages": 3}
    return {} if spec.dq_state_terms else {"key_step": 32, "dq_stages": 3}


# bf16 heads whose d is not a multiple of this run the backward zero-padded to their tile width, the power of 2 at
# or above d (``_padded_head_backward``): unpadded their tiles end in a half-masked 16-wide slice. d = 8 faulted on
# the H200 in the single-chunk dkv_kernel (GPU fuzz seed 20261204, cases 629 and 639: b=3 Tq=128 Tk=91 and b=1
# Tq=Tk=68, e=64, causal); d = 24 with e = 40 (non-causal, validity) faulted or gave dq and dk off by 90-110% (seed
# 20261301, cases 649, 779 and 939, at 3651d32 as at e529db5; with d = 32, 48, or e = 64, or float32 tiles the same
# inputs were within 3.4e-3). The same cases run clean under the interpreter's bounds checks in fp32, and the cause
# was not found. float16 d=8 e=16 had faulted before (``_value_pad``). fp32 tiles with d=8 pass the fuzz unpadded.
PADDED_HEAD_DIM = 16
PADDED_HEAD_DTYPES = (torch.bfloat16,)

# Widest value tile of the chunked backward with fp32 tiles (float32 and float16 inputs). With e > 128 (tile 256)
# its dq_kernel and dkv_state_kernel ask 299-348 KB of shared memory for d = 32..128 even with 32 rows (sm_90
# compiles with Triton 3.6, ``.scratch/bwd_smem.py``), past any GPU's per-block limit (227 KB on Hopper).
# bf16 tiles take e = 256 in 166 KB (d = 128).
FP32_CHUNKED_MAX_VALUE_TILE = 128


def backward_unsupported(
    q: torch.Tensor, v: torch.Tensor, deg: int, gated: bool, has_valid: bool, causal: bool, kv_len: int, plan: Plan
) -> str | None:
    """None when ``triton_backward`` serves a call the Triton forward serves, else why not (the op then runs the
    aten backward)."""
    fwd = kernel_spec(q, v, deg, gated, has_valid, causal, kv_len, plan)
    wide = value_tile(fwd.value_dim) > FP32_CHUNKED_MAX_VALUE_TILE
    fp32_tiles = q.dtype in (torch.float32, torch.float16) or small_chunk_float32(fwd)
    if fwd.chunked and fp32_tiles and wide:
        return (
            f"the chunked backward with {q.dtype} inputs (fp32 tiles) and value dim e={fwd.value_dim} > "
            f"{FP32_CHUNKED_MAX_VALUE_TILE} needs about 300 KB of shared memory, more than a GPU has per block; "
            "bfloat16 inputs with chunks of 64 keys or more run it in Triton"
        )
    return None


def triton_backward(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    denom: torch.Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None,
    causal: bool,
    valid: torch.Tensor | None,
    plan: Plan,
    segments: int | None = None,
    state_kernel: Callable[[KernelSpec, dict], dict] | None = None,
    saved_states: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum(grad_y * y)`` for ``(y, denom) = triton_forward(...)`` with the same ``plan`` (float16
    inputs run the float32 kernels, as in the forward: ``kernel_inputs``; the gradients come back in float16).
    ``segments`` overrides the segment count of the chunked path's state kernels (forward and reverse states);
    ``state_kernel`` recomputes the forward states as in ``triton_forward`` (the CUDA state kernel for bfloat16
    inputs; ignored for others, which run the Triton one). ``saved_states``: the forward's ``(S, M)``
    (``triton_forward``'s ``states_out``), read instead of recomputing them where their shapes and dtypes are the
    ``StateLayout`` of this call (else recomputed)."""
    if single_key_padded(k):  # the forward's key of zeros before a single key
        padded_k, padded_v, padded_valid, padded_gate = with_a_key_of_zeros(k, v, valid, log_gate)
        options = {"scale": scale, "deg": deg, "log_gate": padded_gate, "causal": causal, "valid": padded_valid}
        dq, dk, dv, dg = triton_backward(grad_y, q, padded_k, padded_v, y, denom, plan=plan, **options)
        dg = None if dg is None else dg[..., 1:].contiguous()
        return dq, dk[:, :, 1:].contiguous(), dv[:, :, 1:].contiguous(), dg
    if (shift := backward_rows(q, k, causal)) is not None:  # rows dropped or put before (``backward_rows``)
        fills = ((grad_y, 0.0), (q, 0.0), (y, 0.0), (denom, EPS))
        shifted_grad_y, shifted_q, shifted_y, shifted_denom = (shifted_rows(x, shift, fill) for x, fill in fills)
        dq, dk, dv, dg = triton_backward(
            shifted_grad_y, shifted_q, k, v, shifted_y, shifted_denom, scale=scale, deg=deg, log_gate=log_gate,
            causal=causal, valid=valid, plan=plan, segments=segments, state_kernel=state_kernel,
            saved_states=saved_states,
        )  # fmt: skip
        return shifted_rows(dq, -shift, 0.0).contiguous(), dk, dv, dg
    if q.dtype in PADDED_HEAD_DTYPES and size_hint(q.shape[-1]) % PADDED_HEAD_DIM:
        options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid}
        return _padded_head_backward(grad_y, q, k, v, y, denom, plan=plan, **options)
    given = kernel_spec(q, v, deg, log_gate is not None, valid is not None, causal, size_hint(k.shape[2]), plan)
    # the CUDA state kernel's 16-bit input is bf16 here: float16 and short chunks run fp32 tiles
    if q.dtype != torch.bfloat16 or small_chunk_float32(given):
        state_kernel = None
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v = kernel_inputs(q, k, v, given)
    B, Hq, Tq, d = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    e = v.shape[3]
    fwd = kernel_spec(q, v, deg, log_gate is not None, valid is not None, causal, size_hint(Tk), plan)
    dq_state_terms = _dq_state_hook(fwd, q, grad_y, state_kernel)
    spec = BackwardSpec.of(fwd, dq_state_terms=dq_state_terms is None)
    module, _ = load(BACKWARD_TEMPLATE, spec)
    state_heads = Hk if log_gate is None else log_gate.shape[1]
    den = denom.to(torch.float32).contiguous()
    grad_y, dz = _prepared_gradient(module, grad_y, y, den, q.dtype)
    shift = (Tq - Tk) % fwd.chunk_size if fwd.chunked else 0
    n_chunks = _cdiv(Tk + shift, fwd.chunk_size) if fwd.chunked else 1
    common = {**_strides("k", k), **_strides("v", v), "K": k, "V": v, "Hq": Hq, "group": Hq // Hk, "Tk": Tk}
    forward_module, _ = load_forward(fwd)
    extra: dict[str, object] = {}
    if log_gate is not None:
        extra["G"] = _gate_cumsum(forward_module, log_gate)
        extra["stride_g"] = extra["G"].stride(1)
    if valid is not None:
        extra["VALID"] = valid.contiguous()
    dy_strides = {f"stride_y{axis}": st for axis, st in zip("bhte", grad_y.stride())}
    rows = {**_strides("q", q), **dy_strides, "Q": q, "DY": grad_y, "DEN": den, "DZ": dz}
    sizes = {"Hq": Hq, "state_heads": state_heads, "shift": shift, "Tq": Tq, "Tk": Tk, "scale": scale}
    gate = {"G": extra["G"], "stride_g": extra["stride_g"]} if log_gate is not None else {}
    warps = chunked_warps(fwd, state_terms=False) if fwd.chunked else QUADRATIC_WARPS

    dq_args = {**common, **extra, **rows, **sizes, "state_slots": n_chunks}
    dkv_args = dict(dq_args)
    if fwd.chunked:
        per_sm = segment_major_programs_per_sm(state_kernel, fwd, k.device)
        layout = StateLayout.of(fwd, k, Tq, state_heads, segments, per_sm)
        if saved_states is not None and _fits(saved_states, layout):
            states = {"S_ST": saved_states[0], "M_ST": saved_states[1], "state_slots": layout.slots}
        else:
            states = _chunk_states(forward_module, layout, k, common, extra, state_kernel)
        dq_args.update(S_ST=states["S_ST"], M_ST=states["M_ST"], state_slots=states["state_slots"])
        reverse = state_terms = None
        if state_kernel is not None:  # the forward ran the CUDA state kernel: so do the backward's, where they serve
            from . import cuda_reverse, cuda_state_terms

            reverse = _cuda_hook(fwd, cuda_reverse.reverse_unsupported, cuda_reverse.reverse_states, q, grad_y)
            unsupported, hook = cuda_state_terms.state_terms_unsupported, cuda_state_terms.add_dkv_state_terms
            state_terms = _cuda_hook(fwd, unsupported, hook, k, v)
        dkv_args.update(_reverse_states(module, spec, q, rows, gate, sizes, n_chunks, segments, reverse_kernel=reverse))

    # float32 where the state terms are added after dq_kernel
    dq = torch.empty((B, Hq, Tq, d), dtype=q.dtype if dq_state_terms is None else torch.float32, device=q.device)
    _launch(module.dq_kernel, (_cdiv(Tq, spec.block_t), B * Hq), {**dq_args, "DQ": dq}, warps, spec.dq_stages)
    if dq_state_terms is not None:
        final = _final_buffers({"DQ": dq}, dtypes[0] == torch.bfloat16)
        dq_state_terms({**dq_args, "DQ": dq, **final})
        dq = final.get("DQ_OUT", dq)

    per_head = state_heads != Hk  # a state per query head: partial dk, dv per state head, summed below
    # float32 where more than one kernel adds to them: the group sum below, the chunked path's state kernel
    grad_dtype = torch.float32 if per_head or fwd.chunked else None
    dk = torch.empty((B, state_heads, Tk, d), dtype=grad_dtype or k.dtype, device=k.device)
    dv = torch.empty((B, state_heads, Tk, e), dtype=grad_dtype or v.dtype, device=k.device)
    outputs: dict[str, torch.Tensor] = {"DK": dk, "DV": dv}
    if log_gate is not None:
        outputs["KTERM"] = torch.empty((B, state_heads, Tk), dtype=torch.float32, device=k.device)
    grid = (_cdiv(Tk + shift, spec.block_k), B * state_heads)
    _launch(module.dkv_kernel, grid, {**dkv_args, **outputs}, warps, spec.dkv_stages)
    if fwd.chunked:
        finals = not per_head and dtypes[1] == dtypes[2] == torch.bfloat16
        final = _dkv_state_terms(module, fwd, grid, {**dkv_args, **outputs}, state_terms=state_terms, finals=finals)
        dk, dv = final.get("DK_OUT", dk), final.get("DV_OUT", dv)
    if per_head:
        dk, dv = dk.unflatten(1, (Hk, -1)).sum(2), dv.unflatten(1, (Hk, -1)).sum(2)
    dg = None
    if log_gate is not None:
        boundary = None
        if fwd.chunked and fwd.causal:
            states = {name: dq_args[name] for name in ("S_ST", "M_ST")} | {n: dkv_args[n] for n in ("R_ST", "P_ST")}
            boundary = _chunk_start_gate_grads(module, states, B * state_heads, n_chunks)
        dg = _gate_grad(dz, outputs["KTERM"], state_heads, boundary, fwd.chunk_size, shift).to(log_gate.dtype)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dg


def backward_rows(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int | torch.SymInt | None:
    """The query rows ``triton_backward`` drops (positive) or puts before the queries as rows of zeros (negative), as
    ``shifted_rows`` takes them, or None where the call runs as it is: the forward's ``aligned_rows``, and one row of
    zeros before a non-causal call's single query row, so that no kernel takes a length of 1 (why:
    ``forward.single_key_padded``; on the GPU, Tq 2 ran case 599's shapes clean, as did a causal call of one row and
    3126 keys, whose row bounds depend on the key block). The zero row adds nothing: q = 0 gives it weights 0, and
    its dy = 0 gives dz = 0."""
    if (shift := aligned_rows(q, k, causal)) is not None:
        return shift
    if not causal and statically_known_true(q.shape[2] == 1):
        return -1
    return None


def _padded_head_backward(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    denom: torch.Tensor,
    *,
    plan: Plan,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``triton_backward`` of a head whose d is not a multiple of ``PADDED_HEAD_DIM``, run on q and k zero-padded
    to the kernels' tile width (the power of 2 at or above d, at least ``PADDED_HEAD_DIM``: no masked columns, and
    no more tile work than unpadded).

    Zero columns leave every ``q_i . k_j`` (so every weight, y and dv) unchanged, and ``dq_i = sum_j ds_ij k_j``,
    ``dk_j = sum_i ds_ij q_i`` have zeros there: the first d columns are the gradients. The plan keeps one chunk,
    so the padded call runs the quadratic kernels as the forward did (``kernel_spec``: such a d has no 16-wide
    state tiles)."""
    d = q.shape[-1]
    width = max(PADDED_HEAD_DIM, pow2_at_least(size_hint(d)))
    padded_q, padded_k = (torch.nn.functional.pad(t, (0, width - d)) for t in (q, k))
    one_chunk = dataclasses.replace(plan, chunk_size=max(plan.chunk_size, size_hint(k.shape[2])))
    dq, dk, dv, dg = triton_backward(grad_y, padded_q, padded_k, v, y, denom, plan=one_chunk, **options)
    return dq[..., :d].contiguous(), dk[..., :d].contiguous(), dv, dg


def _fits(states: tuple[torch.Tensor, torch.Tensor], layout: StateLayout) -> bool:
    """Whether saved ``(S, M)`` are the states ``layout`` describes: shapes provably equal (no guard is added on
    symbolic sizes: what cannot be proven is recomputed), dtypes exact, contiguous (the kernels index them densely)."""
    dtypes = (layout.state_dtype, torch.float32)
    for tensor, shape, dtype in zip(states, layout.shapes(), dtypes):
        if tensor.dtype != dtype or tensor.dim() != len(shape):
            return False
        pairs = [*zip(tensor.shape, shape), *zip(tensor.stride(), contiguous_strides(shape))]
        if not all(statically_known_true(have == want) for have, want in pairs):
            return False
    return True


def coordinate_state_terms(fwd: KernelSpec) -> bool:
    """Whether the chunked ``dkv_state_kernel`` walks the coordinates b, ``dv_j += mu_j k_jb (k_j R_b^T)`` and
    ``dk_j += 2 mu_j k_jb (v_j R_b)`` (one pair of accumulating products per b, R read as the state of ordered
    coordinate pairs), rather than the pair tiles. Chosen for gated 16-bit tiles with d <= 64: on the H200 (T=65536,
    bf16, d=64, branch ``pending-gpu-bmajor`` at 080d5ee) this form took 2.96 ms per call at 4 warps, against 3.66 ms
    for the gated pair form at 8. Ungated, the pair form is faster (2.30 against 2.78 ms). d = 128 and float32 were
    not measured and keep the pair form."""
    return fwd.chunked and fwd.gated and fwd.dtype != "float32" and fwd.head_dim <= 64


def chunked_warps(fwd: KernelSpec, state_terms: bool) -> int:
    """Warps of the chunked path's ``dq_kernel`` and ``dkv_kernel`` (``state_terms=False``) or ``dkv_state_kernel``.

    4 for 16-bit tiles where the H200 measured them faster at T=65536 (bf16, ms per call at 8 -> 4 warps):
    d=64: dq 3.12 -> 1.81, dkv 1.45 -> 0.72, dkv_state 2.74 -> 2.31 ungated; gated dq 3.34 -> 2.05, dkv 1.96 -> 1.07.
    d=128: dq 20.8 -> 14.9, dkv 6.54 -> 3.49; gated dq 22.5 -> 15.1, dkv 8.67 -> 4.36.
    ``dkv_state_kernel`` keeps ``CHUNKED_WARPS`` where 4 was slower: gated (d=64 3.67 -> 3.84; d=128 23.9 -> 362, it
    spills) and d > 64 (ungated d=128 22.2 -> 29.0). Float32 tiles keep ``CHUNKED_WARPS`` (not measured at 4). The
    coordinate form of ``dkv_state_kernel`` (``coordinate_state_terms``) runs at 4, as measured."""
    if state_terms and coordinate_state_terms(fwd):
        return 4
    if fwd.dtype == "float32" or (state_terms and (fwd.gated or fwd.head_dim > 64)):
        return CHUNKED_WARPS
    return 4


def _cuda_hook(fwd: KernelSpec, unsupported: Callable[..., str | None], hook: Callable, *rows: torch.Tensor):
    """``hook`` bound to ``fwd`` and its ``coordinate_state_terms`` where the CUDA kernel behind it serves this call
    (``unsupported(fwd, arch, *rows)`` is None on the rows' GPU target), else None."""
    from . import nvrtc

    arch = nvrtc.tensor_arch(rows[0].device)
    if unsupported(fwd, arch, *rows) is not None:
        return None
    return functools.partial(hook, fwd, coordinate_state_terms(fwd))


def _dq_state_hook(fwd: KernelSpec, q: torch.Tensor, dy: torch.Tensor, state_kernel) -> Callable[[dict], None] | None:
    """The CUDA dq state-term kernel's hook (``cuda_state_terms.add_dq_state_terms``) where the forward ran the CUDA
    state kernel, ``cuda_state.CONFIG.wgmma_dq`` asks for it and it serves this call, else None (``dq_kernel`` adds
    the state terms itself)."""
    from . import cuda_state, cuda_state_terms

    if not (fwd.chunked and state_kernel is not None and cuda_state.CONFIG.wgmma_dq):
        return None
    return _cuda_hook(fwd, cuda_state_terms.state_terms_unsupported, cuda_state_terms.add_dq_state_terms, q, dy)


def _dkv_state_terms(
    module, fwd: KernelSpec, grid, args: dict, state_terms: Callable[[dict], None] | None = None, finals: bool = False
) -> dict[str, torch.Tensor]:
    """Add the inter-chunk terms of dk, dv (and the key term) to the buffers ``dkv_kernel`` filled: the CUDA kernels
    (``state_terms``, ``cuda_state_terms``: bf16 on sm_90a with e = 64) where given, else ``dkv_state_kernel``.
    With ``finals`` the CUDA kernels, the gradients' last writers, store the sums in bf16 instead: returned as
    ``DK_OUT``, ``DV_OUT`` (``{}`` where ``dkv_state_kernel`` ran)."""
    if state_terms is None:
        _launch(module.dkv_state_kernel, grid, args, chunked_warps(fwd, state_terms=True), STAGES)
        return {}
    final = _final_buffers({"DK": args["DK"], "DV": args["DV"]}, finals)
    state_terms({**args, **final})
    return final


def _final_buffers(buffers: dict[str, torch.Tensor], wanted: bool) -> dict[str, torch.Tensor]:
    """``NAME_OUT``: a bf16 tensor shaped like each float32 buffer, for a hook that stores the final gradient (saving
    a rounding pass over the buffer), where ``wanted`` (the gradient's dtype is bf16); else ``{}``."""
    if not wanted:
        return {}
    return {f"{name}_OUT": torch.empty_like(t, dtype=torch.bfloat16) for name, t in buffers.items()}


def reverse_state_buffers(
    like: torch.Tensor, heads, slots, n_seg, dims: tuple[int, int, int], state_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The reverse-state buffers on ``like``'s device, ``dims = (Dt, d, e)``: ``R_ST`` (heads, slots, Dt, e) in
    ``state_dtype``, ``P_ST`` (heads, slots, d, d) fp32 and the segment totals ``R_SEG``, ``P_SEG`` (heads, n_seg,
    ..) fp32 (filled by ``reverse_state_kernel`` or the CUDA one)."""
    dt, d, e = dims
    return {
        "R_ST": like.new_empty((heads, slots, dt, e), dtype=state_dtype),
        "P_ST": like.new_empty((heads, slots, d, d), dtype=torch.float32),
        "R_SEG": like.new_empty((heads, n_seg, dt, e), dtype=torch.float32),
        "P_SEG": like.new_empty((heads, n_seg, d, d), dtype=torch.float32),
    }


def _reverse_states(
    module,
    spec: BackwardSpec,
    q: torch.Tensor,
    rows: dict,
    gate: dict,
    sizes: dict,
    n_chunks,
    segments: int | None,
    reverse_kernel: Callable[[dict], dict] | None = None,
) -> dict[str, object]:
    """Run ``reverse_state_kernel`` (or ``reverse_kernel``, which takes its arguments and returns its buffers: the
    CUDA one) over segments of chunks (grid: pairs x value blocks, B*Hs, segments), then
    ``reverse_scan_kernel`` (causal) or a sum over the segments (non-causal): ``R_ST`` (B*Hs, slots, Dt, e) in the
    states' dtype and ``P_ST`` (.., d, d) fp32, the dk/dv kernel's state arguments. Non-causal calls have one slot,
    their segments cover chunks of rows. Segment totals live in float32 buffers of ``n_seg`` slots."""
    fwd = spec.forward
    params = spec.template_params()
    heads = q.shape[0] * sizes["state_heads"]
    programs = params["npairs"] * params["n_eb"]
    if not fwd.causal:
        n_chunks = _cdiv(q.shape[2], fwd.chunk_size)
    segments, per_segment, n_seg = state_segments(q.device, programs * heads, n_chunks, segments)
    slots = n_chunks if fwd.causal else 1
    state_dtype = torch.float32 if fwd.dtype == "float32" else torch.bfloat16
    d, e, dt = fwd.head_dim, fwd.value_dim, params["dt"]
    counts = {"state_slots": slots, "chunks_per_seg": per_segment, "n_seg": n_seg}
    if reverse_kernel is not None:  # it allocates its own buffers
        buffers = reverse_kernel({**rows, **gate, **sizes, **counts})
    else:
        buffers = reverse_state_buffers(q, heads, slots, n_seg, (dt, d, e), state_dtype)
        args = {**rows, **gate, **sizes, **buffers, **counts}
        _launch(module.reverse_state_kernel, (programs, heads, n_seg), args, STATE_WARPS, REVERSE_STAGES)
    r, p, r_seg, p_seg = (buffers[name] for name in ("R_ST", "P_ST", "R_SEG", "P_SEG"))
    if not fwd.causal:
        r, p = r_seg.sum(1, keepdim=True).to(state_dtype), p_seg.sum(1, keepdim=True)
    elif segments > 1:
        blocks = params["scan_s_blocks"] + _cdiv(d * d, SCAN_BLOCK)
        scan = {key: sizes[key] for key in ("Tk", "shift")}
        _launch(module.reverse_scan_kernel, (blocks, heads), {**buffers, **gate, **scan, **counts}, SCAN_WARPS, 2)
    return {"R_ST": r, "P_ST": p, "state_slots": slots}


def _prepared_gradient(
    module, grad_y: torch.Tensor, y: torch.Tensor, den: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prep_kernel``: the upstream gradient in ``dtype`` (the kernels' dots read dy exactly: see "Precision"), and
    ``dZ = -(dy . y) / denom`` (B, Hq, Tq) float32 from that rounded dy."""
    grad_y, y = grad_y.contiguous(), y.contiguous()
    dy = torch.empty(grad_y.shape, dtype=dtype, device=grad_y.device)
    dz = torch.empty(den.shape, dtype=torch.float32, device=grad_y.device)
    n_rows = dz.numel()
    args = {"GY": grad_y, "Y": y, "DEN": den, "DY": dy, "DZ": dz, "n_rows": n_rows}
    _launch(module.prep_kernel, (_cdiv(n_rows, PREP_ROWS),), args, PREP_WARPS, 1)
    return dy, dz


def _chunk_start_gate_grads(module, states: dict[str, torch.Tensor], heads: int, n_chunks) -> torch.Tensor:
    """``boundary_kernel``: d log_gate at the start of every chunk, (heads, n_chunks) float32 (0 at chunk 0), from
    the forward states (``S_ST``, ``M_ST``) and the reverse states (``R_ST``, ``P_ST``) of every chunk. No branch
    on the chunk count and no n_chunks - 1 sized buffer: neither adds a guard on the length when traced."""
    out = torch.empty((heads, n_chunks), dtype=torch.float32, device=states["R_ST"].device)
    _launch(module.boundary_kernel, (n_chunks, heads), {**states, "OUT": out, "state_slots": n_chunks}, 4, 1)
    return out


def _gate_grad(
    dz: torch.Tensor, kterm: torch.Tensor, gate_heads: int, boundary: torch.Tensor | None, chunk: int, shift: int
) -> torch.Tensor:
    """``dg`` (B, gate_heads, Tk) from ``dG_t = qterm at t - kterm_t`` with ``qterm_i = -dZ_i eps`` summed over the
    query heads of each gate head and placed at key position ``i + Tk - Tq`` (rows before key 0 drop): summed
    from the front (``gates.log_gate_grad``), or within chunks of ``chunk`` keys from ``boundary``
    ((B * gate_heads, n_chunks), dg at each chunk's start: ``gates.log_gate_grad_in_chunks``)."""
    B, Hq, Tq = dz.shape
    Tk = kterm.shape[-1]
    qterm = (-EPS * dz).unflatten(1, (gate_heads, Hq // gate_heads)).sum(2)
    aligned = qterm[..., torch.sym_max(Tq - Tk, 0) :]
    d_cum = torch.nn.functional.pad(aligned, (Tk - aligned.shape[-1], 0)) - kterm
    if boundary is None:
        return log_gate_grad(d_cum)
    return log_gate_grad_in_chunks(d_cum, boundary.view(B, gate_heads, -1), chunk, shift)
