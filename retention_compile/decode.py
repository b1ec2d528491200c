"""The decode step of power retention: one new token (Tq == 1) against a recurrent state.

One step of the recurrence of DESIGN.md section 1, for the state ``S (B, H, D, e)`` and normaliser
``z (B, H, D)`` of each kv head (fp32, updated in place):

    S <- e^g S + phi(k) v^T,    z <- e^g z + phi(k),    y_h = phi(s q_h)^T S / (phi(s q_h)^T z + eps)

for every query head ``h`` of the group that reads the kv head (GQA: query head ``a`` reads kv head
``a // (Hq/Hk)``). ``y`` is the last row of the oracle over the whole prefix. ``init_state`` builds
``S = sum_t e^{G_T - G_t} phi(k_t) v_t^T`` (and z alike) from a prefilled context, so decoding can continue it.

On CUDA the step runs as one pass over the state (``cuda_templates/decode_step.cu.j2``): blocks own slices of
feature rows, update them and write partial numerators/denominators per query head, and a second, tiny kernel
sums the slices. Two launches instead of atomics or a last-block-done counter: deterministic results, no
persistent counter buffer to reset (safe under CUDA graphs and concurrent streams), for one extra launch
(a few microseconds) and partials of ``G/(2 rows)`` of the state traffic. Elsewhere, and for calls the kernel
does not cover, the same step runs in plain PyTorch (``decode_step_torch``), which the kernel is tested against.
"""

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .checks import RetentionInputError, validate_retention_inputs
from .gates import cumulative_log_gate
from .ops import asks_for_gradient, runs_body_directly
from .power_features import multiset_index, power_embedding, state_dim
from .reference import EPS, default_scale

THREADS = 256
_SMEM_LIMIT = 48 * 1024  # static shared memory per block
_TABLE_LIMIT = 1 << 20  # multiset-table entries rendered into the source
_IO_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _fail(message: str) -> None:
    raise RetentionInputError(message)


def _check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    deg: int,
    log_gate: torch.Tensor | None,
) -> None:
    """Shapes of one decode step; the state may be kept per kv head or per query head."""
    shape = validate_retention_inputs(q, k, v, deg=deg, log_gate=log_gate, causal=True, valid=None)
    if shape.q_len != 1 or shape.kv_len != 1:
        _fail(f"decode_step: q, k, v must hold one token (dim 2 of size 1), got {shape.q_len} and {shape.kv_len}")
    features = state_dim(shape.head_dim, deg)
    heads = state.shape[1] if state.dim() == 4 else -1
    expected = (shape.batch, heads, features, shape.value_dim)
    if state.dim() != 4 or heads not in (shape.kv_heads, shape.q_heads) or tuple(state.shape) != expected:
        _fail(
            f"decode_step: state must have shape (B, Hk or Hq, D, e) = ({shape.batch}, {shape.kv_heads} or "
            f"{shape.q_heads}, {features}, {shape.value_dim}), got {tuple(state.shape)}"
        )
    if tuple(norm.shape) != expected[:3]:
        _fail(f"decode_step: norm must have shape {expected[:3]}, got {tuple(norm.shape)}")
    for name, t in (("state", state), ("norm", norm)):
        if t.dtype not in (torch.float32, torch.float64):
            _fail(f"decode_step: {name} must be float32 (or float64 for reference runs), got {t.dtype}")
        if t.device != q.device:
            _fail(f"decode_step: {name} is on {t.device}, q on {q.device}")
    if norm.dtype != state.dtype:
        _fail(f"decode_step: state and norm must share a dtype, got {state.dtype} and {norm.dtype}")
    if log_gate is not None and log_gate.shape[1] != heads:
        _fail(f"decode_step: log_gate has {log_gate.shape[1]} heads but the state has {heads}")


def decode_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decode step in plain PyTorch (CPU and fallback), in the state's dtype; state and norm in place.

    ``k``, ``v``, ``state``, ``norm`` and ``log_gate`` share a head count ``Hk`` dividing ``q``'s ``Hq``.
    """
    B, Hq, _, _ = q.shape
    Hk, e = k.shape[1], v.shape[-1]
    acc = state.dtype
    phi_k = power_embedding(k.to(acc), deg)[:, :, 0]  # (B, Hk, D)
    if log_gate is not None:
        decay = torch.exp(log_gate.to(acc))  # (B, Hk, 1)
        state.mul_(decay[..., None])
        norm.mul_(decay)
    state.addcmul_(phi_k[..., None], v.to(acc)[:, :, 0, None, :])
    norm.add_(phi_k)
    phi_q = power_embedding(scale * q.to(acc), deg).reshape(B, Hk, Hq // Hk, -1)  # (B, Hk, G, D)
    numerator = phi_q @ state  # (B, Hk, G, e)
    denominator = phi_q @ norm[..., None]  # (B, Hk, G, 1)
    return (numerator / (denominator + EPS)).reshape(B, Hq, 1, e).to(q.dtype)


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch shape of the CUDA decode step: feature rows per block, 16-byte state loads per thread per batch,
    and whether the next batch's loads are issued before the current batch is updated (register double buffer)."""

    rows: int = 256
    unroll: int = 4
    pipeline: bool = True


def default_config(group: int) -> DecodeKernelConfig:
    """256 rows per block keep the partials (``G/(2 rows)`` of the traffic) small for groups up to 16.

    Large groups spend more instructions per state byte (4 FMA per head per 16 bytes), so they keep 8 loads per
    thread in flight; small groups do as well with 4 at higher occupancy. Measured on an H200
    (``benchmarks/results/decode_NVIDIA-H200_2026-11-29_6429e36.json``): group 12 (256, 8) 51.6 us vs (256, 4)
    56.1 us; group 1 (256, 4) 154.8 us vs (256, 8) 161.6 us.
    """
    return DecodeKernelConfig(rows=256, unroll=8 if group > 4 else 4, pipeline=True)


def _static_smem(d: int, e: int, group: int, rows: int) -> int:
    """Bytes of the update kernel's shared arrays: s q, k, phi rows, per-warp denominators, numerators."""
    phi_stride = (group + 1 + 3) // 4 * 4
    return 4 * (group * d + d + rows * phi_stride + (THREADS // 32) * group + group * e)


def cuda_unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    deg: int,
    log_gate: torch.Tensor | None,
    config: DecodeKernelConfig | None = None,
) -> str | None:
    """Why the CUDA kernel cannot run this call (None when it can)."""
    if not q.is_cuda:
        return "inputs are not on a CUDA device"
    if q.dtype not in _IO_DTYPES:
        return f"dtype {q.dtype} (the kernel takes bfloat16, float16, float32)"
    if state.dtype != torch.float32 or norm.dtype != torch.float32:
        return "state and norm must be float32"
    if not (state.is_contiguous() and norm.is_contiguous()) or state.data_ptr() % 16:
        return "state and norm must be contiguous, the state 16-byte aligned"
    d, e = q.shape[-1], v.shape[-1]
    lanes = e // 4
    if e % 4 or lanes & (lanes - 1) or lanes > THREADS:
        return f"value dim {e} (the kernel needs e = 4 * 2^n <= {4 * THREADS})"
    if state_dim(d, deg) * deg > _TABLE_LIMIT:
        return f"multiset table of d={d}, deg={deg} is too large to render"
    group = q.shape[1] // k.shape[1]
    cfg = _plan(e, group, config)
    if _static_smem(d, e, group, cfg.rows) > _SMEM_LIMIT:
        return f"shared memory for group {group}, d={d}, e={e} exceeds {_SMEM_LIMIT} bytes"
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return "cuda-python (cuda.bindings) is not installed"
    return None


def _plan(e: int, group: int, config: DecodeKernelConfig | None) -> DecodeKernelConfig:
    """The config rounded so that rows is a multiple of the rows one block step touches times the unroll."""
    cfg = config or default_config(group)
    quantum = THREADS // (e // 4) * cfg.unroll
    return DecodeKernelConfig(max(quantum, cfg.rows // quantum * quantum), cfg.unroll, cfg.pipeline)


def render_decode_source(
    d: int, e: int, deg: int, group: int, dtype: torch.dtype, gate: bool, config: DecodeKernelConfig
) -> str:
    """The CUDA source of both decode kernels for one shape (``decode_step.cu.j2``)."""
    from .codegen import nvrtc

    index, _ = multiset_index(d, deg)
    return nvrtc.render(
        "decode_step.cu.j2",
        d=d,
        e=e,
        deg=deg,
        features=state_dim(d, deg),
        group=group,
        rows=config.rows,
        unroll=config.unroll,
        pipeline=config.pipeline,
        threads=THREADS,
        dtype=_IO_DTYPES[dtype],
        gate=gate,
        deg_factorial=math.factorial(deg),
        eps=f"{EPS!r}f",
        index_type="unsigned char" if d <= 256 else "unsigned short",
        multisets=index.flatten().tolist(),
    )


@lru_cache(maxsize=64)
def decode_kernels(
    device_index: int, d: int, e: int, deg: int, group: int, dtype: torch.dtype, gate: bool, config: DecodeKernelConfig
) -> tuple:
    """The loaded ``(update, reduce)`` kernels of one shape and (planned) config, compiled once per process."""
    from .codegen import nvrtc

    source = render_decode_source(d, e, deg, group, dtype, gate, config)
    return nvrtc.load_kernels(source, ("retention_decode_update", "retention_decode_reduce"), device_index)


def decode_step_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    *,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None = None,
    config: DecodeKernelConfig | None = None,
) -> torch.Tensor:
    """The decode step through the generated CUDA kernels (heads as in ``decode_step_torch``).

    Raises ``RetentionInputError`` when the kernel does not cover the call (``cuda_unsupported_reason``).
    """
    reason = cuda_unsupported_reason(q, k, v, state, norm, deg, log_gate, config)
    if reason is not None:
        _fail(f"decode_step_cuda: {reason}")
    return _launch_decode(q, k, v, state, norm, scale, deg, log_gate, config)


def _launch_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None,
    config: DecodeKernelConfig | None = None,
) -> torch.Tensor:
    """``decode_step_cuda`` for a call ``cuda_unsupported_reason`` already accepted: both launches (kept per shape,
    ``decode_launches``) on the current stream of q's device (made current for them only where it is not)."""
    B, Hq, _, d = q.shape
    Hk, e = k.shape[1], v.shape[-1]
    group = Hq // Hk
    update, reduce = decode_launches(
        q.device.index or 0, B, Hk, d, e, deg, group, q.dtype, log_gate is not None, _plan(e, group, config),
        float(scale),
    )  # fmt: skip
    partials = update.grid[0] * B * Hq
    workspace = torch.empty(partials * (e + 1), dtype=torch.float32, device=q.device)
    tensors = {
        "q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous(), "state": state, "norm": norm,
        "num": workspace[: partials * e], "den": workspace[partials * e :],
        "y": torch.empty(B, Hq, 1, e, dtype=q.dtype, device=q.device),
    }  # fmt: skip
    if log_gate is not None:
        tensors["gate"] = log_gate.to(torch.float32).contiguous()
    switch = q.device.index is not None and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if switch else contextlib.nullcontext():
        update(tensors)
        reduce(tensors)
    return tensors["y"]


# The tensor arguments of the two kernels, by position (``retention_decode_update``'s gate only where there is one).
_UPDATE_TENSORS = ("q", "k", "v", "gate", "state", "norm", "num", "den")
_REDUCE_TENSORS = ("num", "den", "y")


@lru_cache(maxsize=64)
def decode_launches(
    device_index: int,
    B: int,
    Hk: int,
    d: int,
    e: int,
    deg: int,
    group: int,
    dtype: torch.dtype,
    gate: bool,
    config: DecodeKernelConfig,
    scale: float,
) -> tuple:
    """The two launches of a step of this shape (``eager_launch.CudaLaunch``: grid and scale fixed, arguments packed
    once: ``nvrtc.KernelParams``), which each step repeats with its tensors by name (``_UPDATE_TENSORS``,
    ``_REDUCE_TENSORS``). A step at batch 1 is host-bound, and packing its arguments per launch cost cuda-python
    more than the launch itself."""
    from .codegen.eager_launch import CudaLaunch

    update, reduce = decode_kernels(device_index, d, e, deg, group, dtype, gate, config)
    slices = -(-state_dim(d, deg) // config.rows)
    update_tensors = tuple((i, n) for i, n in enumerate(_UPDATE_TENSORS) if gate or n != "gate")
    return (
        CudaLaunch.of(update, (slices, B * Hk, 1), (THREADS, 1, 1), 0, device_index,
                      (None,) * len(_UPDATE_TENSORS) + (scale,), update_tensors),
        CudaLaunch.of(reduce, (B * Hk * group, 1, 1), (e, 1, 1), 0, device_index, (None,) * len(_REDUCE_TENSORS),
                      tuple(enumerate(_REDUCE_TENSORS))),
    )  # fmt: skip


@torch.library.custom_op("retention_compile::decode_step", mutates_args=("state", "norm"))
def decode_step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None,
) -> torch.Tensor:
    """The op behind ``decode_step``: the CUDA kernel where it covers the call, else plain PyTorch."""
    if cuda_unsupported_reason(q, k, v, state, norm, deg, log_gate) is None:
        return _launch_decode(q, k, v, state, norm, scale, deg, log_gate)
    return decode_step_torch(q, k, v, state, norm, scale=scale, deg=deg, log_gate=log_gate)


@decode_step_op.register_fake
def _decode_step_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    deg: int,
    log_gate: torch.Tensor | None,
) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], 1, v.shape[-1]))


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step: ``q (B, Hq, 1, d)``, ``k (B, Hk, 1, d)``, ``v (B, Hk, 1, e)``, ``log_gate (B, H, 1)``.

    ``state (B, H, D, e)`` and ``norm (B, H, D)`` (fp32) are updated in place; ``H`` is ``Hk``, or ``Hq`` for a
    state kept per query head (a gate that differs between the query heads of a group). Returns
    ``y (B, Hq, 1, e)`` in q's dtype. ``scale`` defaults to ``1/sqrt(d)``.
    """
    _check_decode_inputs(q, k, v, state, norm, deg, log_gate)
    if state.shape[1] != k.shape[1]:  # state per query head: every query head has its own copy of k, v
        group = state.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = default_scale(q.shape[-1], scale)
    if _launches_directly(q, k, v, state, norm, log_gate) and not cuda_unsupported_reason(
        q, k, v, state, norm, deg, log_gate
    ):
        y = _launch_decode(q, k, v, state, norm, s, deg, log_gate)
        torch.autograd.graph.increment_version((state, norm))  # what the op's in-place-or-view layer does
        return y
    return torch.ops.retention_compile.decode_step(q, k, v, state, norm, s, deg, log_gate)


def _launches_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager step may launch the CUDA kernels itself instead of through the ``decode_step`` op: where the
    forward's eager entry runs its op's body itself (``ops.runs_body_directly``: plain tensors, nothing tracing,
    recording or transforming the call) and no input asks for a gradient (the op has no autograd formula, and its
    autograd layer says so). For such a call the op's dispatch (its autograd, in-place-or-view and alias-check layers
    in Python) only bumps the version counters of the state and the normaliser, which the direct call does itself.
    H100 host, b1 h8 d64 gated (``benchmarks/bench_decode.py --host`` at 3744f86): 87 us of host time per step
    against 100 through the op; with the support check and the stream query made once per step, 67-73 against
    104-112 before (the step is host-bound)."""
    return not asks_for_gradient(*tensors) and runs_body_directly(*tensors)


def _check_prefix(k: torch.Tensor, v: torch.Tensor, deg: int, log_gate: torch.Tensor | None, chunk: int) -> None:
    """``init_state``'s arguments, by the op's rules (``validate_retention_inputs``) with one query head per state:
    a gate of (B, 1, T) with two kv heads broadcast and was ignored, one of (B, Hk, 1) gave another state than the
    op's, ``chunk=-1`` an all-zero state."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        _fail(f"init_state: chunk must be a positive integer, got {chunk!r}")
    if k.dim() != 4:
        _fail(f"init_state: k must have 4 dims (B, Hk, T, d), got shape {tuple(k.shape)}")
    gate_heads = k.shape[1] if log_gate is None or log_gate.dim() != 3 else log_gate.shape[1]
    heads = gate_heads if gate_heads > 0 and gate_heads % max(k.shape[1], 1) == 0 else k.shape[1]
    queries = k.new_empty(k.shape[0], heads, 1, k.shape[3])  # one row per state: the op's shape rules
    validate_retention_inputs(queries, k, v, deg=deg, log_gate=log_gate, causal=True, valid=None)


def init_state(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state after a prefix: ``S = phi(K)^T (w * V)``, ``z = phi(K)^T w`` with ``w_t = exp(G_T - G_t)``.

    ``k (B, Hk, T, d)``, ``v (B, Hk, T, e)``, ``log_gate (B, Hk or Hq, T)`` (a per-query-head gate gives a
    per-query-head state). Returns ``(state (B, H, D, e), norm (B, H, D))`` in float32 (float64 for float64
    inputs), computed ``chunk`` tokens at a time so ``phi(K)`` is never held whole.
    """
    _check_prefix(k, v, deg, log_gate, chunk)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    B, Hk, T, d = k.shape
    if log_gate is not None and log_gate.shape[1] != Hk:
        group = log_gate.shape[1] // Hk
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    H, e = k.shape[1], v.shape[-1]
    state = torch.zeros(B, H, state_dim(d, deg), e, dtype=acc, device=k.device)
    norm = torch.zeros(B, H, state_dim(d, deg), dtype=acc, device=k.device)
    weight = None
    if log_gate is not None:
        cum = cumulative_log_gate(log_gate)  # G_t in float64
        weight = torch.exp((cum[..., -1:] - cum).to(acc))  # (B, H, T)
    for t0 in range(0, T, chunk):
        phi = power_embedding(k[:, :, t0 : t0 + chunk].to(acc), deg)  # (B, H, c, D)
        if weight is not None:
            phi = phi * weight[..., t0 : t0 + chunk, None]
        state += phi.transpose(-1, -2) @ v[:, :, t0 : t0 + chunk].to(acc)
        norm += phi.sum(dim=-2)
    return state, norm
