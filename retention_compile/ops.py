"""The ``retention_compile::power_retention`` op, its backward op, and the public eager entry.

Both ops are ``torch.library.triton_op``s: when ``torch.compile`` meets them, Inductor traces into their
bodies. On CPU tensors the body is plain PyTorch, so Inductor compiles it to C++ like any aten code: the
quadratic form (``quadratic.py``) when every key fits in one planned chunk, else the chunked form
(``chunked.py``); on CUDA tensors the body launches the shape-specialised Triton kernels
(``codegen.triton_forward`` / ``codegen.triton_backward``, where ``triton_supports`` the case) through
``wrap_triton``, so Inductor's generated code contains them.

    power_retention(q, k, v, log_gate?, valid?, scale, deg, causal, chunk_size, impl, for_backward=True)
        -> (y, denom, S, M, y_acc)
    power_retention_backward(dy, q, k, v, log_gate?, valid?, y_acc, denom, S, M, scale, deg, causal, chunk_size, impl)
        -> (dq, dk, dv, dlog_gate)

``y`` is in q's dtype, the one differentiable output: its gradient reaches the backward in that dtype, with no
float32 cast of it in between (at T=65536, b=1, h=8, e=64 on the H200 that cast took 0.10 ms of a 5.4 ms fwd+bwd
step). ``y_acc`` is the same y in the accumulators' precision (``compute_dtype``: float32 for 16-bit inputs), which
the backward reads; it is an empty float32 tensor where that is q's dtype already (an op's outputs cannot alias).
``denom`` (B, Hq, Tq) is ``sum_j w_ij + eps`` in float32: with ``y_acc`` it is all the backward needs besides the
inputs (``dN = dy / denom``, ``dZ = -(dy . y) / denom``). ``S, M`` are the chunk states the Triton forward's query
kernel read (``codegen.forward.StateLayout``), returned so that the Triton backward reads them instead of running the
state and scan kernels again (at T=65536, b=1, h=8, d=64 on the H200 those took 1.1 of the 9.1 ms of a fwd+bwd
step). They are kept only where that backward takes the call and they cost at most ``KEPT_STATES_MAX_RATIO`` times
y's bytes (``keeps_states``): at d = 64, e = 64, chunk 1024 (2560 tiled features) they are 1.3x y, at d = 128 4.5x
(recomputed). Elsewhere (the aten path, the quadratic kernels, wider heads) both are empty float32 tensors.
``chunk_size = 0`` means "planned per call from the concrete shape" (``planning.plan``); ``impl`` is the
codegen target of ``RetentionConfig`` ("auto", "triton", "cuda", "aten"; "cuda" runs the CUDA C++ chunk-state
kernel with the Triton scan and query kernels, and raises, naming why, where it cannot; "auto" picks the state
kernel measured faster per GPU and shape, ``codegen/cuda_state.select_state_kernel``).
``for_backward=False`` (no gradient will be asked of this call: ``power_retention`` under ``torch.no_grad`` or
with no input requiring one, the rewrite where the traced query, key and value need none) returns ``y_acc``, ``S``
and ``M`` empty, and the Triton query kernel stores y in q's dtype alone, without the float32 y (4 bytes per output
element, 134 MB at T=65536, b=1, h=8, e=64); its backward raises. ``dlog_gate`` is an empty tensor when there is no
gate. Calls with no query or no key return ``y = 0``, ``denom = eps`` (and zero gradients) without planning or
launching anything.

A third op, ``power_retention_inference(q, k, v, log_gate?, valid?, scale, deg, causal, chunk_size, impl) -> (y,
denom)``, is a plain custom op whose body is the eager forward that keeps nothing for a backward. A traced call
(``torch.compile``) that keeps nothing for a backward and runs the CUDA state kernel goes into Inductor's code as this
one op (``_in_one_op``) instead of the gate's cumsum and the state and query kernels' two custom ops: every call of it
then repeats the launches the first one kept (``codegen.replays``), plans per concrete shape, and launches the query
kernel beside the state kernel, as eager calls do.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import warnings
from collections.abc import Callable

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.library import triton_op
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

from . import checks, chunked, hardware, inspection, planning, quadratic
from .checks import validate_retention_inputs
from .planning import Plan
from .reference import EPS, compute_dtype, default_scale
from .sizes import size_hint

OP_NAMESPACE = "retention_compile"
IMPLS = ("auto", "triton", "cuda", "aten")
KEPT_STATES_MAX_RATIO = 2  # the forward's chunk states are saved for the backward up to this many times y's bytes


def _problem(q: torch.Tensor, v: torch.Tensor, deg: int, gated: bool, chunk_size: int, impl: str) -> dict:
    """``planning.plan``'s arguments but the length and the chunk, for this call on q's device (the CUDA state kernel
    modelled only where ``impl`` and the machine allow it)."""
    return {
        "spec": hardware.detect(q.device) if q.is_cuda else None,
        "d": size_hint(q.shape[3]),
        "e": size_hint(v.shape[3]),
        "deg": deg,
        "dtype": planning.kernel_dtype(q.dtype, q.is_cuda, chunk_size),
        "gated": gated,
        "batch_heads": size_hint(q.shape[0]) * size_hint(v.shape[1]),
        "cuda_state": cuda_state_modelled(q, impl),
    }


def resolve_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, deg: int, gated: bool, chunk_size: int, impl: str = "auto"
) -> Plan:
    """The plan for this shape on q's device (``planning.plan``, ``_problem``); ``chunk_size > 0`` overrides its
    chunk (tiles fit the given chunk's kernels: the chunked query kernel needs the most).

    Under dynamic shapes the plan is made for the size hint of the traced call; any chunk gives the same numbers for
    every length, so a graph traced at one length stays correct at another. Which form runs, one chunk (the quadratic
    kernel, the aten path's quadratic form) or chunks, is read from that plan too, and the one chunk costs O(T^2): so
    where the hint plans one chunk, the length is guarded at ``planning.single_chunk_limit``, a bound of the shape and
    not of the traced length, and a graph traced short recompiles once for lengths past it, with a chunked plan
    (planned at twice the bound where the hint itself lies past it). A plan that chunks takes no guard: chunks serve
    every length."""
    problem = _problem(q, v, deg, gated, chunk_size, impl)
    length = k.shape[2]
    hint = size_hint(length)
    chosen = planning.plan(T=hint, chunk_size=chunk_size, **problem)
    if chunk_size > 0:
        return dataclasses.replace(chosen, chunk_size=chunk_size)
    if isinstance(length, torch.SymInt) and chosen.chunk_size >= hint:
        limit = planning.single_chunk_limit(**problem)
        if limit < planning.SINGLE_CHUNK_SEARCH_MAX and not length <= limit:
            chosen = planning.plan(T=2 * limit, chunk_size=0, **problem)
    return chosen


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


_WARNED: set[str] = set()


def _triton_unavailable(q, k, v, deg, log_gate, valid, causal, impl) -> str | None:
    """None when the Triton kernels serve this call, else why the aten path does (warned once per reason)."""
    if impl == "aten" or not q.is_cuda:
        return "aten"
    if not _has_triton():
        reason = "triton is not installed"
    else:
        from .codegen import triton_supports

        reason = triton_supports(q, k, v, deg, log_gate, valid, causal)
    if reason is not None:
        _warn_once(f"retention_compile: the Triton kernels do not serve this call ({reason}); using the aten path")
    return reason


def _is_empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No query or no key: the result is known without a kernel (adds no guard for symbolic sizes >= 2)."""
    return guard_or_false(q.numel() == 0) or guard_or_false(k.shape[2] == 0)


def _cuda_blocker(q: torch.Tensor) -> str | None:
    """Why no CUDA kernel can run on these tensors at all (device, compiler), or None."""
    from .codegen import nvrtc

    if not q.is_cuda:
        return f"the tensors are on {q.device.type}, the CUDA kernels need a CUDA device"
    try:
        nvrtc.compiler_id()
    except RuntimeError as error:  # names what to install
        return str(error)
    return None


def cuda_state_modelled(q: torch.Tensor, impl: str) -> bool:
    """Whether the plan models the CUDA state kernel for a call (``planning.plan``'s ``cuda_state``): ``impl``
    allows it and a CUDA kernel can run on q's device."""
    return impl != "triton" and _cuda_blocker(q) is None


def _cuda_target_error(why: str | None) -> RuntimeError:
    """Why ``impl="cuda"`` cannot serve the forward, and what to use instead."""
    return RuntimeError(
        f"retention_compile: codegen/impl='cuda' cannot serve power_retention: {why}. Use 'auto' (Triton on CUDA "
        "tensors, aten elsewhere), 'triton' or 'aten'."
    )


def _quadratic_serves(k: torch.Tensor, plan: Plan, chunk_size: int) -> bool:
    """The aten path's choice: the quadratic form (``quadratic.py``) when every key fits in the planned chunk. The
    chunked form would then have no state to carry but would still embed q and k (``D`` features each, 766480
    for d=64, p=4) beside the same (Tq, Tk) intra-chunk weights, so this form never costs more memory or time.
    A symbolic length with the chunk planned is compared by its hint, as the plan was made (``resolve_plan`` guards
    it); with a chunk given, by a guard at that chunk, one bound for every length.

    (Guarded at the planned chunk, a power of 2 at least the traced length, a graph recompiled at every doubling of
    the length until Dynamo's recompile limit ran the function uncompiled: softmax attention, 2.0 from the oracle.)"""
    length = k.shape[2]
    if isinstance(length, torch.SymInt) and chunk_size <= 0:
        return size_hint(length) <= plan.chunk_size
    return bool(length <= plan.chunk_size)


def _forward_body(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float,
    deg: int,
    causal: bool,
    chunk_size: int,
    impl: str,
    for_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's forward: ``_forward``'s outputs."""
    return _forward(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl, for_backward)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float,
    deg: int,
    causal: bool,
    chunk_size: int,
    impl: str,
    for_backward: bool,
    route: Route | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(y, denom, S, M, y_acc)`` (``_with_output_y``) with ``y_i = sum_j w_ij v_j / denom_i``,
    ``denom_i = sum_j w_ij + eps``, computed in ``compute_dtype(q.dtype)`` (float32 for 16-bit inputs), and the chunk
    states kept for the backward (``keeps_states``; empty otherwise). Autograd saves the accumulators' y: the
    backward's ``dZ_i = -(dy_i . y_i) / denom_i`` is a small difference that a 16-bit y would swamp (B*Hq*Tq*e*4
    bytes). Without ``for_backward`` nothing is kept for a backward: ``S``, ``M`` and ``y_acc`` are empty. ``route``:
    the call's ``_route`` where the caller found it already."""
    if impl == "cuda" and (blocker := _cuda_blocker(q)) is not None:
        raise _cuda_target_error(blocker)
    if _is_empty(q, k):  # rows without keys: y = 0, denom = eps
        shape = (q.shape[0], q.shape[1], q.shape[2])
        acc = compute_dtype(q.dtype)
        y = q.new_zeros(*shape, v.shape[3], dtype=acc)
        return _with_output_y(y, q.dtype, q.new_full(shape, EPS, dtype=acc), *_no_states(q), keep_acc=for_backward)
    route = route if route is not None else _route(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl)
    if not for_backward and (launches := _kept_launches(route)) is not None:
        y, denom = launches(q, k, v, log_gate, valid)
        return _with_output_y(y, q.dtype, denom, *_no_states(q), keep_acc=False)
    plan, triton_reason, state = route.plan, route.triton_reason, route.state
    if triton_reason is None:
        if not for_backward and _in_one_op(q, state, impl):
            y, denom = torch.ops.retention_compile.power_retention_inference(
                q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl
            )
            return _with_output_y(y, q.dtype, denom, *_no_states(q), keep_acc=False)
        from .codegen import triton_forward
        from .codegen.forward import kept_call

        if impl == "cuda" and state.kernel is None:
            raise _cuda_target_error(state.reason)
        states: dict[str, torch.Tensor] = {}
        rows = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        # y in q's dtype, stored by the query kernel: beside the float32 y for a backward, else alone
        rounded = None if compute_dtype(q.dtype) == q.dtype or not for_backward else q.new_empty(rows)
        y, denom = triton_forward(
            q, k, v, scale=scale, deg=deg, log_gate=log_gate, causal=causal, valid=valid, plan=plan,
            state_kernel=state.kernel, states_out=states if for_backward else None, y_out=rounded,
            y_dtype=compute_dtype(q.dtype) if for_backward else q.dtype, for_backward=for_backward,
        )  # fmt: skip
        if not for_backward and route.key is not None:  # the launches triton_forward kept, for the calls after this
            route.forward = kept_call(
                q, k, v, log_gate, valid, scale=scale, deg=deg, causal=causal, plan=plan, state_kernel=state.kernel,
                y_dtype=q.dtype,
            )  # fmt: skip
        kept = _no_states(q)
        if for_backward and states and _triton_backward_serves(q, k, v, deg, log_gate, valid, causal, plan, False):
            kept = (states["S"], states["M"]) if keeps_states(states, y) else kept
        return _with_output_y(y, q.dtype, denom, *kept, rounded=rounded)
    if impl == "cuda":
        raise _cuda_target_error(f"the Triton kernels run with the CUDA state kernel do not serve it ({triton_reason})")
    options = {"scale": scale, "deg": deg, "log_gate": log_gate, "causal": causal, "valid": valid, "eps": EPS}
    k, v = _padding_zeroed(k, v, valid)
    if _quadratic_serves(k, plan, chunk_size):
        y, denom = quadratic.quadratic_forward(q, k, v, **options)
    else:
        y, denom = chunked.chunked_forward(q, k, v, chunk_size=plan.chunk_size, **options)
    return _with_output_y(y, q.dtype, denom, *_no_states(q), keep_acc=for_backward)


def _padding_zeroed(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` and ``v`` with the keys ``valid`` masks out set to 0, for the aten forms. Their weight is exactly 0, but
    whatever a padded position holds still met the other keys in the forms' products (0 times NaN, or times an inf
    from phi of a key of 1e20, is NaN): one such key turned every row NaN, where SDPA and the oracle are finite. The
    gradients at those keys are 0 either way."""
    if valid is None:
        return k, v
    padded = ~valid[:, None, :, None]
    return k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)


def _route(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    scale: float,
    deg: int,
    causal: bool,
    chunk_size: int,
    impl: str,
) -> Route:
    """The call's ``Route``: the plan (``resolve_plan``), ``_triton_unavailable`` and ``select_state_kernel``'s
    ``StateChoice``. Kept for eager calls that launch directly (``codegen.replays``: by each input's layout, the
    scalars, the CUDA state kernel's launch shape and the forward's module tunables), where the three took a quarter
    of a short call's host time on the H200's host (cProfile of 300 eager calls at T=2048, 4715846: 47 of the public
    call's 187 us per call under the profiler). A symbolic ``chunk_size`` (an int argument of a function compiled
    with ``dynamic=True``) is specialised here, with a guard: it sizes the tiles and the kernels built for them."""
    chunk_size = int(chunk_size)
    key = _route_key(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl)
    if key is not None and (kept := _kept_route(key)) is not None:
        return kept
    plan = resolve_plan(q, k, v, deg, log_gate is not None, chunk_size, impl)
    reason = _triton_unavailable(q, k, v, deg, log_gate, valid, causal, impl)
    if reason is not None:
        return Route(plan, reason, None)
    from .codegen.cuda_state import select_state_kernel

    route = Route(plan, None, select_state_kernel(q, k, v, deg, log_gate, valid, causal, scale, plan, impl), key)
    if key is not None:
        _replay_modules()[2].keep(key, route)
    return route


@dataclasses.dataclass
class Route:
    """How the op's body serves a call: ``plan``; ``triton_reason``, why the Triton kernels do not serve it (None
    where they do); ``state``, ``select_state_kernel``'s choice where they do. Kept among the eager replays under
    ``key`` (None: not kept; forgotten with the replays), with ``forward``: once such a call that keeps nothing for a
    backward has run, the launches ``triton_forward`` kept for it (``forward.ForwardReplay``), which the calls after
    it with the key repeat without going through ``triton_forward`` (its arguments' checks and a second key: about
    a quarter of a short public call's host time)."""

    plan: Plan
    triton_reason: str | None
    state: object
    key: tuple | None = None
    forward: Callable | None = None

    def current(self) -> bool:
        return True


def _route_key(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl) -> tuple | None:
    """The key of a call's kept route, or None where none is kept (not an eager CUDA call that launches directly)."""
    if not q.is_cuda or not _has_triton():
        return None
    cuda_state, forward, replays = _replay_modules()
    if not replays.replayable(q):
        return None
    settings = ("route", scale, deg, causal, chunk_size, impl, cuda_state.CONFIG, *forward.launch_tunables())
    return replays.call_key((q, k, v, log_gate, valid), settings)


@functools.cache
def _replay_modules() -> tuple:
    """``codegen``'s ``cuda_state``, ``forward`` and ``replays``, imported on first use (they import Triton) and held
    for ``_route_key`` and ``_kept_route``, which every eager CUDA call runs: no import statement per call."""
    from .codegen import cuda_state, forward, replays

    return cuda_state, forward, replays


def _kept_launches(route: Route) -> Callable | None:
    """The launches ``route`` keeps for the calls that keep nothing for a backward, while they are current."""
    return route.forward if route.forward is not None and route.forward.current() else None


def _kept_route(key: tuple) -> Route | None:
    kept = _replay_modules()[2].kept(key)
    return kept if isinstance(kept, Route) else None


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _with_output_y(
    y: torch.Tensor,
    dtype: torch.dtype,
    *rest: torch.Tensor,
    rounded: torch.Tensor | None = None,
    keep_acc: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y in dtype, *rest, y_acc)``: ``y_acc`` is the accumulators' y where the cast changed it and ``keep_acc``
    (a backward will read it), else empty (an op's outputs cannot alias one another); ``rounded``: y in dtype
    already (stored by the query kernel)."""
    if y.dtype == dtype:
        return y, *rest, y.new_empty(0, dtype=torch.float32)
    y_acc = y if keep_acc else y.new_empty(0, dtype=torch.float32)
    return (y.to(dtype) if rounded is None else rounded), *rest, y_acc


def _no_states(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's ``S, M`` where no states are kept: empty float32 tensors."""
    return q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)


def keeps_states(states: dict[str, torch.Tensor], y: torch.Tensor) -> bool:
    """Whether the forward's chunk states (``S``, ``M``) cost at most ``KEPT_STATES_MAX_RATIO`` times y's bytes.

    Read from the size hints (no guard: the answer only trades memory for time). States and y both grow with
    the length, so the ratio barely moves with it: at d = 64, e = 64, chunk 1024, 1.3x (2560 x 64 bf16 + 64 x 64
    float32 per state head and chunk, against 1024 x 64 float32 of y per query head and chunk)."""

    def nbytes(t: torch.Tensor) -> int:
        return math.prod(size_hint(n) for n in t.shape) * t.element_size()

    return nbytes(states["S"]) + nbytes(states["M"]) <= KEPT_STATES_MAX_RATIO * nbytes(y)


def _triton_backward_serves(q, k, v, deg, log_gate, valid, causal, plan: Plan, warn: bool = True) -> bool:
    """Whether the Triton backward takes a call the Triton forward serves (warned once per reason when not, if
    ``warn``: the forward asks without warning, to decide whether to keep its states)."""
    from .codegen.backward import backward_unsupported

    reason = backward_unsupported(
        q, v, deg, log_gate is not None, valid is not None, causal, size_hint(k.shape[2]), plan
    )  # fmt: skip
    if reason is not None and warn:
        _warn_once(f"retention_compile: the Triton backward does not serve this call ({reason}); using the aten path")
    return reason is None


def _backward_body(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    valid: torch.Tensor | None,
    y: torch.Tensor,
    denom: torch.Tensor,
    kept_s: torch.Tensor,
    kept_m: torch.Tensor,
    scale: float,
    deg: int,
    causal: bool,
    chunk_size: int,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: gradients of ``sum(grad_y * y)`` with respect to q, k, v and the log-gate. ``kept_s, kept_m``: the
    forward's ``S, M`` (read by the Triton backward where kept, else empty)."""
    if _is_empty(q, k):
        dg = q.new_empty(0, dtype=torch.float32) if log_gate is None else torch.zeros_like(log_gate)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dg
    route = _route(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl)
    plan, triton_reason, state = route.plan, route.triton_reason, route.state
    if triton_reason is None and _triton_backward_serves(q, k, v, deg, log_gate, valid, causal, plan):
        from .codegen import triton_backward

        # states the forward did not keep are recomputed by the state kernel it ran (the choice is cached)
        saved = (kept_s, kept_m) if kept_s.dim() == 4 else None
        backward, options = triton_backward, {"plan": plan, "state_kernel": state.kernel, "saved_states": saved}
    else:
        single_chunk = _quadratic_serves(k, plan, chunk_size)
        backward = quadratic.quadratic_backward if single_chunk else chunked.chunked_backward
        options = {} if single_chunk else {"chunk_size": plan.chunk_size, "eps": EPS}
        k, v = _padding_zeroed(k, v, valid)  # the aten forms, as in _forward
    dq, dk, dv, dg = backward(
        grad_y.contiguous(), q, k, v, y, denom, scale=scale, deg=deg, log_gate=log_gate, causal=causal, valid=valid,
        **options,
    )  # fmt: skip
    return dq, dk, dv, (q.new_empty(0, dtype=torch.float32) if dg is None else dg)


# Registered by a call, not as decorators, and the aten forms are called through their modules: at import, torch's
# ``triton_op`` reads the source of the function it registers (its decorator lines included) and, recursively, of
# every function that source calls by bare name, to list the Triton kernels it launches. These bodies launch theirs
# through ``wrap_triton`` in ``codegen``, which the scan does not follow either way; what it did read (the aten
# forms, torch's own ``triton_op`` and ``custom_op``) took 0.07 s of this package's 0.14 s import (CPU).
power_retention_op = triton_op(f"{OP_NAMESPACE}::power_retention", mutates_args=())(_forward_body)
power_retention_backward_op = triton_op(f"{OP_NAMESPACE}::power_retention_backward", mutates_args=())(_backward_body)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl, *for_backward = inputs
    ctx.for_backward = not for_backward or for_backward[0]  # the schema's default when not given
    y, denom, kept_s, kept_m, y_acc = output
    accumulated = y if y.dtype == compute_dtype(q.dtype) else y_acc
    ctx.save_for_backward(q, k, v, log_gate, valid, accumulated, denom, kept_s, kept_m)
    ctx.options = (scale, deg, causal, chunk_size, impl)
    ctx.mark_non_differentiable(denom, kept_s, kept_m, y_acc)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the states (and of denom) reach _backward


def _backward(ctx, grad_y, _grad_denom, _grad_s, _grad_m, _grad_y_acc):
    no_inputs = (None,) * 7
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None, *no_inputs
    if not ctx.for_backward:
        raise RuntimeError(
            "retention_compile: a gradient was asked of a power_retention call made with for_backward=False, whose "
            "forward kept nothing for a backward; call it with for_backward=True (power_retention decides this "
            "from torch.is_grad_enabled() and the inputs' requires_grad)"
        )
    q, k, v, log_gate, valid, *saved = ctx.saved_tensors
    dq, dk, dv, dg = power_retention_backward_op(grad_y, q, k, v, log_gate, valid, *saved, *ctx.options)
    return dq, dk, dv, (dg if log_gate is not None else None), *no_inputs


power_retention_op.register_autograd(_backward, setup_context=_setup_context)


# Traced calls that keep nothing for a backward and run the CUDA state kernel go into Inductor's code as one op
# (``_in_one_op``). Through the cumsum and the two kernels' custom ops instead, each compiled call planned and packed
# both launches again: on an H100 (b1 h8 d64 bf16, T=8192) the compiled call took 312 us of host time ungated and 380
# gated per call against the eager call's 87 and 122, so the compiled forward read 0.27 / 0.35 ms against 0.15 / 0.16.
TRACED_INFERENCE_IN_ONE_OP = True


def _in_one_op(q: torch.Tensor, state: object, impl: str) -> bool:
    """Whether this call of the op's body, which keeps nothing for a backward, is traced (fake CUDA tensors, functional
    or not: ``is_fake``, which a real ``nn.Parameter`` is not, so the one op's own body never takes this branch) on the
    CUDA state kernel's route (whose launches are custom ops either way): then it is one ``power_retention_inference``
    op in the traced graph. Not for ``impl="cuda"``: the op plans each call from its concrete length, and a length
    of one chunk, which a graph traced with a symbolic length may meet, has no CUDA state kernel, so that call would
    raise where the traced kernels ran. Not while an inspection capture is open (``inspect``): kernels the one op
    loads are recorded when it first runs, outside the graph's compile, so the capture could not attribute them to
    their graph and sites; it sees the kernels traced one by one, as a training graph's are."""
    return (
        TRACED_INFERENCE_IN_ONE_OP
        and impl != "cuda"
        and q.is_cuda
        and is_fake(q)
        and getattr(state, "kernel", None) is not None
        and not inspection.capturing()
    )


def _inference_body(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, denom)`` of the forward that keeps nothing for a backward (``_y_and_denom``'s arguments, the op's schema),
    run as the op's eager kernel runs its body (``wrap_triton`` off): y (B, Hq, Tq, e) in q's dtype and denom (B, Hq,
    Tq) in ``compute_dtype``, both contiguous. Planned per call from the concrete shape (``chunk_size = 0``), so a
    graph traced with a symbolic length serves every length; a later call with the same key repeats the first one's
    launches."""
    with set_wrap_triton_enabled(False):
        y, denom = _y_and_denom(*args)
    return y.contiguous(), denom.contiguous()


def _inference_fake(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl):
    """The op's outputs for tracing: y (B, Hq, Tq, e) in q's dtype, denom (B, Hq, Tq) in ``compute_dtype``."""
    B, Hq, Tq = q.shape[:3]
    return q.new_empty((B, Hq, Tq, v.shape[3])), q.new_empty((B, Hq, Tq), dtype=compute_dtype(q.dtype))


# Registered through ``torch.library.Library``, not ``custom_op``: a call of a ``custom_op`` goes through its Python
# autograd and alias-checking layers, 27 us per call against 8 us for a kernel registered as here (CPU, an op of these
# arguments that allocates two tensors; 2.7 us for the bare function), host time a compiled call pays on every call.
# Without an autograd formula the op is only traced where nothing is kept for a backward (``_in_one_op``).
_INFERENCE_LIBRARY = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
_INFERENCE_LIBRARY.define(
    "power_retention_inference(Tensor q, Tensor k, Tensor v, Tensor? log_gate, Tensor? valid, float scale, int deg, "
    "bool causal, SymInt chunk_size, str impl) -> (Tensor, Tensor)"
)
_INFERENCE_LIBRARY.impl("power_retention_inference", _inference_body, "CompositeExplicitAutograd")
torch.library.register_fake(f"{OP_NAMESPACE}::power_retention_inference", _inference_fake, lib=_INFERENCE_LIBRARY)


def power_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    deg: int = 2,
    log_gate: torch.Tensor | None = None,
    causal: bool = True,
    valid: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Power retention (DESIGN.md section 1), differentiable, in SDPA's layout.

        w_ij = (s q_i . k_j)^p exp(G_{i+off} - G_j)  [j <= i + off if causal; valid[j]]
        y_i  = sum_j w_ij v_j / (sum_j w_ij + 1e-6)

    q (B, Hq, Tq, d), k (B, Hk, Tk, d), v (B, Hk, Tk, e), Hq % Hk == 0; ``log_gate`` (B, Hk or Hq, Tk),
    ``<= 0`` (eager calls on the CPU check it: ``checks.CHECK_GATE_VALUES``), causal only; ``valid`` (B, Tk)
    bool. ``scale`` defaults to ``1/sqrt(d)``; ``chunk_size`` None plans it from the hardware (it never changes the
    result). Returns y (B, Hq, Tq, e) in q's dtype. Under ``torch.no_grad`` or with no input requiring a gradient the op
    keeps nothing for a backward (``for_backward=False``: no float32 y, no chunk states).
    """
    validate_retention_inputs(
        q, k, v, deg=deg, log_gate=log_gate, causal=causal, valid=valid, scale=scale, chunk_size=chunk_size
    )
    if impl not in IMPLS:
        raise ValueError(f"power_retention: impl must be one of {IMPLS}, got {impl!r}")
    if log_gate is not None and checks.gate_check_applies(log_gate) and _holds_values(log_gate):
        checks.check_gate_values(log_gate)
    for_backward = asks_for_gradient(q, k, v, log_gate)
    args = (q, k, v, log_gate, valid, default_scale(q.shape[-1], scale), deg, causal, chunk_size or 0, impl)
    if not for_backward and runs_body_directly(q, k, v, log_gate, valid):
        with set_wrap_triton_enabled(False):  # as the op's own eager kernel runs its body
            return _y_and_denom(*args)[0]
    # after the direct path, which no functorch transform or forward-AD level reaches: off the short calls' host time
    if _differentiated_by_transform(q, k, v, log_gate):
        raise NotImplementedError(
            "power_retention is differentiated by torch.autograd only (loss.backward(), torch.autograd.grad), not "
            "by torch.func's grad / vjp / jvp / jacfwd / jacrev / hessian or torch.autograd.forward_ad: it has no "
            "forward-mode rule (the tangent would come back as zeros) and no functorch setup for reverse mode"
        )
    y, *_ = power_retention_op(*args, for_backward)
    return y


def _differentiated_by_transform(*tensors: torch.Tensor | None) -> bool:
    """Whether a derivative other than torch.autograd's reverse mode is asked of the call: inside a ``torch.func``
    transform that differentiates (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``), or an input is
    a dual tensor of ``torch.autograd.forward_ad``. The op registers no forward-mode rule, and PyTorch then drops the
    tangent instead of raising (a zero tangent, or None, where the oracle's had norm 2.3); reverse mode under
    ``torch.func`` raised PyTorch's own error about ``setup_context``. ``vmap`` runs (through PyTorch's fallback)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the interpreter stack; it runs functorch itself
        return False
    differentiating = (TransformType.Grad, TransformType.Jvp)
    if any(i.key() in differentiating for i in retrieve_all_functorch_interpreters()):
        return True
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


def _holds_values(t: torch.Tensor) -> bool:
    """Whether an eager call may read ``t``'s values: a plain tensor (or parameter) with data, not while compiling or
    tracing (Dynamo, ``make_fx`` and other dispatch modes, ``torch.jit.trace``), inside a functorch transform (its
    tensors look plain) or while a CUDA graph is being captured (a read would break the capture)."""
    return (
        _untraced()
        and type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type != "meta"
        and not (t.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def _untraced() -> bool:
    """Nothing records or transforms the call: not compiling (Dynamo, export), no ``torch.jit.trace``, no dispatch
    mode (``make_fx``, fake and functional tensors' modes), no functorch transform (vmap, grad)."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._get_tracing_state() is None
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _y_and_denom(q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl) -> tuple[torch.Tensor, torch.Tensor]:
    """y and denom of an eager call that keeps nothing for a backward (``_forward_body``'s arguments): its kept
    route's launches where they are current, the body's other outputs left unbuilt (three empty tensors: about 5% of
    a short call's host time on the H200), else the body's on the route found here (one route key per call)."""
    args = (q, k, v, log_gate, valid, scale, deg, causal, chunk_size, impl)
    route = None
    if impl != "cuda" and not _is_empty(q, k):  # the checks the body makes before it routes
        route = _route(*args)
        if (launches := _kept_launches(route)) is not None:
            return launches(q, k, v, log_gate, valid)
    y, denom, *_ = _forward(*args, for_backward=False, route=route)
    return y, denom


def asks_for_gradient(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record this call: grad mode on and some input requiring a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def runs_body_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call that keeps nothing for a backward may run the op's body itself, as the op's eager
    kernel would (``triton_op``: the body with ``wrap_triton`` disabled), without the dispatcher's layers around it
    (the autograd kernel, alias checks, the Dynamo guard): on the H200's host (2026-12-01, f585557) a T=2048 call
    through the op took 195-200 us of host time against 53-66 us for ``triton_forward`` alone. Not where anything
    must see the op: while compiling or tracing (Dynamo, export, ``torch.jit.trace``; fake and functional tensors
    are subclasses), under a dispatch mode or a function mode other than a default device's, inside a functorch
    transform (vmap, grad: their tensors look plain) or a forward-mode AD level, or while the profiler records (its
    trace names the op)."""
    return (
        _untraced()
        and all(t is None or type(t) is torch.Tensor for t in tensors)
        and _only_default_device_modes()
        and forward_ad._current_level < 0
        and not torch._C._autograd._profiler_enabled()
    )


def _only_default_device_modes() -> bool:
    """No function mode is active but ``torch.device(...)`` / ``torch.set_default_device``'s, which only fills in the
    device of factory calls that name none (the body names its tensors' device everywhere)."""
    if not torch._C._is_torch_function_mode_enabled():
        return True
    return all(isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())
