"""The Triton backward kernels on the CPU: rendered sources and the kernels run by Triton's interpreter on tiny
float32 shapes against the float64 oracle's autograd (dq, dk, dv and d log_gate, random per-token per-head gates).

As in tests/test_triton_forward.py, ``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernel
cases run in one subprocess that executes this file as a script and reports JSON; 16-bit inputs are covered by
the GPU tests only (tests/gpu/test_triton_backward.py).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from retention_compile.codegen import backward, forward, triton_source  # noqa: E402
from retention_compile.codegen.backward import (  # noqa: E402
    BACKWARD_TEMPLATE,
    BackwardSpec,
    backward_rows,
    backward_unsupported,
    triton_backward,
)
from retention_compile.codegen.forward import kernel_spec, triton_forward  # noqa: E402
from retention_compile.codegen.triton_source import KernelSpec, load, render  # noqa: E402
from retention_compile.planning import Plan  # noqa: E402
from retention_compile.reference import power_retention_reference  # noqa: E402
from retention_compile.testing import interpreted_fixture, single_key_gradient_floor  # noqa: E402

TINY = {"block_t": 16, "block_feature": 16, "block_e": 32}
GRADS = ("q", "k", "v", "g")

CASES = [
    # name: (B, Hq, Hk, Tq, Tk, d, e, deg, gate heads (0: none), valid, causal, chunk[, gate strength])
    ("quadratic", (1, 2, 1, 37, 37, 32, 32, 2, 0, False, True, 1024)),
    ("quadratic-deg4-gate-valid", (2, 2, 2, 29, 29, 32, 16, 4, 2, True, True, 1024)),
    ("quadratic-decode-deg4", (1, 4, 1, 1, 70, 32, 32, 4, 1, False, True, 1024)),
    ("quadratic-noncausal-d48", (1, 2, 2, 21, 45, 48, 24, 2, 0, True, False, 1024)),
    ("quadratic-tq-gt-tk", (1, 1, 1, 40, 25, 32, 32, 2, 1, False, True, 1024)),
    ("quadratic-query-head-gate", (1, 4, 2, 33, 33, 32, 32, 2, 4, True, True, 1024)),
    ("chunked", (1, 2, 1, 40, 40, 32, 32, 2, 0, False, True, 16)),
    ("chunked-gate-valid", (2, 2, 1, 45, 45, 32, 32, 2, 1, True, True, 16)),
    ("chunked-query-head-gate", (1, 4, 2, 33, 33, 32, 32, 2, 4, False, True, 16)),
    ("chunked-prefill-cache", (1, 2, 2, 19, 61, 32, 24, 2, 2, True, True, 16)),
    ("chunked-decode", (1, 2, 1, 1, 50, 32, 32, 2, 1, False, True, 16)),
    ("chunked-tq-gt-tk", (1, 1, 1, 45, 30, 32, 32, 2, 1, False, True, 16)),
    ("chunked-noncausal", (1, 2, 1, 27, 50, 32, 32, 2, 0, True, False, 16)),
    # one non-causal query row: run after a row of zeros (``backward_rows``; GPU fuzz seed 69690001 case 599)
    ("quadratic-noncausal-one-row", (2, 1, 1, 1, 70, 32, 32, 4, 0, True, False, 1024)),
    ("chunked-noncausal-one-row", (1, 2, 1, 1, 50, 32, 32, 2, 0, True, False, 16)),
    ("chunked-d48", (1, 1, 1, 40, 40, 48, 40, 2, 1, False, True, 16)),
    ("chunked-d64", (1, 2, 1, 40, 40, 64, 64, 2, 1, False, True, 16)),  # 4 coordinate blocks, 10 pair tiles
    ("chunked-d128", (1, 1, 1, 33, 33, 128, 48, 2, 1, True, True, 16)),  # 8 blocks, 36 pair tiles
    # gates of -4 per step: G spans -100 over 50 keys, so exp(G_i - G_j) of masked pairs overflows to inf
    ("quadratic-strong-gate", (1, 2, 1, 50, 50, 32, 32, 2, 1, False, True, 1024, 8.0)),
    ("chunked-strong-gate", (1, 2, 1, 50, 50, 32, 32, 2, 1, True, True, 16, 8.0)),
    ("chunked-one-chunk", (1, 2, 1, 12, 12, 32, 32, 2, 1, False, True, 10)),  # chunk 10 runs as 16: one chunk
    # Tq > Tk in chunks of 64 (untrimmed too, below): shifted chunks whose first key step starts mid-chunk, and
    # programs with rows before the first key, some of them mixed, beside dq_kernel's factored key steps
    ("chunked-64-tq-gt-tk", (1, 2, 1, 150, 100, 32, 32, 2, 1, True, True, 64)),
]

# document boundaries at keys 10 and 30 with log-gates of -1e4 and -inf (a hard reset), taken into G at the floor
# ``gates.log_gate_floor``: without it -inf gave NaN (G differences of -inf - -inf)
RESET_KEYS = [10, 30]
RESETS = {"-1e4": -1e4, "-inf": float("-inf")}
RESET_CASES = ("quadratic-query-head-gate", "chunked-gate-valid")


def _inputs(
    case: tuple, dtype: torch.dtype, tiles: dict | None = None, reset: float | None = None
) -> tuple[tuple, dict, torch.Tensor, Plan]:
    """``(q, k, v), options, grad_y, plan`` of a case, drawn in float32 and rounded to ``dtype``; the plan's tiles
    ``tiles`` (default ``TINY``); ``reset``: the log-gate of the keys in ``RESET_KEYS`` (document boundaries)."""
    B, Hq, Hk, Tq, Tk, d, e, deg, gate_heads, has_valid, causal, chunk, *strength = case
    gen = torch.Generator().manual_seed(sum(map(hash, case)) % 2**31)
    q = torch.randn(B, Hq, Tq, d, generator=gen).to(dtype)
    k = torch.randn(B, Hk, Tk, d, generator=gen).to(dtype)
    v = torch.randn(B, Hk, Tk, e, generator=gen).to(dtype)
    gate = -(strength or [0.5])[0] * torch.rand(B, gate_heads, Tk, generator=gen) if gate_heads else None
    if reset is not None:
        gate[..., RESET_KEYS] = reset
    valid = torch.rand(B, Tk, generator=gen) > 0.25 if has_valid else None
    grad_y = torch.randn(B, Hq, Tq, e, generator=gen).to(dtype)
    plan = Plan(chunk_size=chunk, **(tiles or TINY))
    assert kernel_spec(q, v, deg, gate is not None, has_valid, causal, Tk, plan).chunked == (chunk < Tk)
    options = {"scale": 0.7 / d**0.5, "deg": deg, "log_gate": gate, "causal": causal, "valid": valid}
    return (q, k, v), options, grad_y, plan


def _oracle_errors(inputs: tuple, options: dict, grad_y: torch.Tensor, grads: tuple) -> dict[str, float]:
    """Relative error of each gradient against the float64 oracle's autograd (shapes and dtypes checked)."""
    gate = options["log_gate"]
    leaves = [t.double().requires_grad_() for t in inputs + (() if gate is None else (gate,))]
    ref = power_retention_reference(*leaves[:3], **{**options, "log_gate": leaves[3] if gate is not None else None})
    ref.backward(grad_y.double())
    assert (grads[3] is None) == (gate is None)
    errors = {}
    for name, got, leaf in zip(GRADS, grads, leaves):
        assert got.shape == leaf.shape and got.dtype == (torch.float32 if name == GRADS[3] else inputs[0].dtype)
        errors[name] = float((got.double() - leaf.grad).norm() / leaf.grad.norm().clamp_min(1e-30))
    return errors


def _assert_below(errors: dict[str, float], bound: float, what: str) -> None:
    """Every relative error of ``errors`` (gradient name -> error) is below ``bound``; ``what`` names the case."""
    bad = {g: f"{err:.2e}" for g, err in errors.items() if not err < bound}
    assert not bad, f"{what}: relative errors {bad}"


def run_case(
    case: tuple,
    dtype: torch.dtype = torch.float32,
    segments: int | None = None,
    tiles: dict | None = None,
    reset: float | None = None,
) -> dict[str, float]:
    """Relative error of each gradient of ``triton_backward`` against the float64 oracle's autograd; q, k, v are
    drawn in float32 and rounded to ``dtype`` (their gradients come back in it). ``segments``: the state kernels'
    segment count (the interpreter's default is one: it counts one SM); ``tiles`` and ``reset``: ``_inputs``'."""
    inputs, options, grad_y, plan = _inputs(case, dtype, tiles, reset)
    y, den = triton_forward(*inputs, plan=plan, **options, for_backward=True)
    grads = triton_backward(grad_y, *inputs, y, den, plan=plan, segments=segments, **options)
    return _oracle_errors(inputs, options, grad_y, grads)


def run_kept_case(case: tuple, segments: int | None = None, misfits: bool = False) -> dict[str, float]:
    """The backward reading the forward's states (``states_out`` -> ``saved_states``), float32 tiles:

    ``kept-<g>``      relative error of gradient g against the oracle
    ``doubled-<g>``   relative change of g when the saved states are doubled (dq and d log_gate read them; dk and
                      dv must not move: they read the reverse states only)
    ``misshapen-<g>`` with ``misfits``: the error with a slot cut off the saved states, and ``wrong-dtype-<g>``
                      with bf16 states (both must be recomputed, so they stay exact)
    """
    inputs, options, grad_y, plan = _inputs(case, torch.float32)
    states: dict[str, torch.Tensor] = {}
    y, den = triton_forward(*inputs, plan=plan, segments=segments, states_out=states, **options)

    def grads(saved: tuple) -> tuple:
        return triton_backward(grad_y, *inputs, y, den, plan=plan, segments=segments, saved_states=saved, **options)

    kept = grads((states["S"], states["M"]))
    doubled = grads((2 * states["S"], 2 * states["M"]))
    results = {f"kept-{g}": err for g, err in _oracle_errors(inputs, options, grad_y, kept).items()}
    for g, a, b in zip(GRADS, kept, doubled):
        if a is not None:
            results[f"doubled-{g}"] = float((a - b).norm() / a.norm().clamp_min(1e-30))
    variants = {
        "misshapen": (states["S"][:, 1:], states["M"][:, 1:]),
        "wrong-dtype": (states["S"].bfloat16(), states["M"]),
    }
    for variant, saved in variants.items() if misfits else ():
        errors = _oracle_errors(inputs, options, grad_y, grads(saved))
        results.update({f"{variant}-{g}": err for g, err in errors.items()})
    return results


def _count_calls(module: object, name: str) -> tuple[list[int], Callable[[], None]]:
    """Replace ``module.name`` by a wrapper that records each call: the record and a function that puts it back."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(module, name, counted)
    return calls, lambda: setattr(module, name, real)


def run_op_case(case: tuple, max_ratio: float) -> dict[str, float]:
    """Through the op's autograd, with the Triton kernels on CPU tensors (the interpreter; ``ops._triton_unavailable``
    patched) and ``ops.KEPT_STATES_MAX_RATIO = max_ratio``: ``op-<g>`` the gradients' errors against the oracle,
    ``kept`` whether the op returned states, ``recomputed`` how often the backward ran the state kernels, and
    ``state-fills`` how many zero-filled tensors of the states' shape the backward made (autograd materialises
    zero gradients of unused outputs unless told not to)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from retention_compile import ops

    inputs, options, grad_y, plan = _inputs(case, torch.float32)
    ops._triton_unavailable = lambda *args: None
    ops.KEPT_STATES_MAX_RATIO = max_ratio
    recomputed, restore = _count_calls(backward, "_chunk_states")
    gate = options["log_gate"]
    leaves = [t.clone().requires_grad_() for t in inputs + (() if gate is None else (gate,))]
    flags = (options["scale"], options["deg"], options["causal"], plan.chunk_size, "triton")
    y, _, kept_s, *_ = ops.power_retention_op(
        *leaves[:3], leaves[3] if gate is not None else None, options["valid"], *flags
    )
    fills: list[str] = []

    class FillLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if ("zero" in name or "fill" in name or "full" in name) and getattr(out, "shape", None) == kept_s.shape:
                fills.append(name)
            return out

    with FillLog():
        (y * grad_y).sum().backward()
    restore()
    grads = tuple(leaf.grad for leaf in leaves) + ((None,) if gate is None else ())
    results = {f"op-{g}": err for g, err in _oracle_errors(inputs, options, grad_y, grads).items()}
    return {**results, "kept": float(kept_s.dim() == 4), "recomputed": len(recomputed), "state-fills": len(fills)}


FLOAT16_CASES = ("chunked-gate-valid", "quadratic-deg4-gate-valid")
# chunked cases whose forward and reverse states run in segments (a segment scan after the state kernels):
# name: (case, segments); 7 chunks in 3 segments leave a last segment of one chunk
SEGMENT_CASES = {
    "chunked-long-gate-segments": ((1, 2, 1, 100, 100, 32, 32, 2, 1, True, True, 16), 3),
    "chunked-long-segments": ((1, 2, 1, 100, 100, 32, 32, 2, 0, False, True, 16), 4),
    "chunked-prefill-cache-segments": (dict(CASES)["chunked-prefill-cache"], 2),
    "chunked-query-head-gate-segments": (dict(CASES)["chunked-query-head-gate"], 2),
    "chunked-strong-gate-segments": (dict(CASES)["chunked-strong-gate"], 3),
    "chunked-noncausal-segments": (dict(CASES)["chunked-noncausal"], 2),
}


# chunked cases rerun with dkv_state_kernel's coordinate form (``backward.coordinate_state_terms``, chosen on the GPU
# for gated 16-bit tiles with d <= 64) forced on their float32 tiles: 2, 3 (d = 48, padded) and 4 coordinate blocks
# (mirrored pair tiles), padded value tiles, GQA, segments, non-causal
COORDINATE_CASES = (
    "chunked-gate-valid", "chunked-d48", "chunked-d64", "chunked-query-head-gate", "chunked-prefill-cache",
    "chunked-noncausal", "chunked-strong-gate",
)  # fmt: skip


# the backward reading the forward's kept states (``run_kept_case``): causal and not, gated (d log_gate at chunk
# starts reads S and M), GQA with a gate per query head, prefill with a cache (Tq < Tk), segments
KEPT_CASES = {  # name: (case, segments, misfits); the misfitting states are tried on one case (each costs a backward)
    "chunked-gate-valid": (dict(CASES)["chunked-gate-valid"], None, True),
    "chunked-query-head-gate": (dict(CASES)["chunked-query-head-gate"], None, False),
    "chunked-prefill-cache": (dict(CASES)["chunked-prefill-cache"], 2, False),
    "chunked-noncausal": (dict(CASES)["chunked-noncausal"], 2, False),
    "chunked-long-gate-segments": (*SEGMENT_CASES["chunked-long-gate-segments"], False),
}
OP_CASES = ("chunked-gate-valid", "chunked-noncausal")
# heads whose d is not a multiple of 16 run padded to the next one (``backward._padded_head_backward``, bf16 on the
# GPU; forced on float32 tiles here): GQA with a gate per kv head, validity, non-causal with Tq < Tk, decode with
# deg 4, and d = 24 (padded to 32) with e = 40, non-causal with validity (the class of GPU fuzz seed 20261301's
# faults)
PADDED_CASES = {
    "padded-gate-gqa": (1, 4, 2, 37, 37, 8, 32, 2, 2, False, True, 1024),
    "padded-valid": (2, 2, 1, 29, 29, 8, 16, 2, 0, True, True, 1024),
    "padded-noncausal": (1, 2, 2, 21, 45, 8, 24, 2, 0, True, False, 1024),
    "padded-decode-deg4": (1, 4, 1, 1, 70, 8, 32, 4, 1, False, True, 1024),
    "padded-d24-e40": (2, 2, 1, 33, 50, 24, 40, 2, 0, True, False, 1024),
}


# chunked cases rerun with the state terms added by hooks in place of Triton's: dq_kernel without them, then
# ``backward._dq_state_hook``'s, and ``backward._dkv_state_terms``' instead of dkv_state_kernel (on the GPU the CUDA
# kernels of ``cuda_state_terms``, here their PyTorch forms ``dq_state_terms_reference`` and
# ``dkv_state_terms_reference``): gate and validity, prefill against a cache (shift), Tq > Tk (trimmed to the rows
# with keys by ``keyless_rows``; once more untrimmed, so the queries before the first key reach the hooks),
# non-causal (the last slot), 4 blocks; and two in the coordinate form (R without the factor 2)
STATE_HOOK_CASES = (
    "chunked-gate-valid",
    "chunked-prefill-cache",
    "chunked-tq-gt-tk",
    "chunked-noncausal",
    "chunked-d64",
)
STATE_HOOK_COORDINATE_CASES = ("chunked-query-head-gate", "chunked-d64")


def run_state_hook_cases(names: tuple[str, ...], suffix: str) -> dict[str, dict[str, float]]:
    """``run_case`` of ``names`` with the state terms added by the PyTorch hooks, and how often each ran."""
    import functools

    from retention_compile.codegen import cuda_state_terms

    def dq_hook(fwd, q, dy, state_kernel):
        return functools.partial(cuda_state_terms.dq_state_terms_reference, fwd, False) if fwd.chunked else None

    real_dkv = backward._dkv_state_terms

    def dkv_terms(module, fwd, grid, args, state_terms=None, finals=False):
        hook = functools.partial(cuda_state_terms.dkv_state_terms_reference, fwd, backward.coordinate_state_terms(fwd))
        return real_dkv(module, fwd, grid, args, state_terms=hook, finals=finals)

    real_dq = backward._dq_state_hook
    backward._dq_state_hook, backward._dkv_state_terms = dq_hook, dkv_terms
    dq_calls, restore_dq = _count_calls(cuda_state_terms, "dq_state_terms_reference")
    dkv_calls, restore_dkv = _count_calls(cuda_state_terms, "dkv_state_terms_reference")
    results = {}
    for name in names:
        results[f"{name}-{suffix}"] = run_case(dict(CASES)[name])
        results[f"{name}-{suffix}"].update({"dq-hook-calls": len(dq_calls), "dkv-hook-calls": len(dkv_calls)})
        dq_calls.clear()
        dkv_calls.clear()
    restore_dq()
    restore_dkv()
    backward._dq_state_hook, backward._dkv_state_terms = real_dq, real_dkv
    return results


def run_padded_cases() -> dict[str, dict[str, float]]:
    """``run_case`` of ``PADDED_CASES`` with float32 heads padded, and how often the padded backward ran."""
    padded_dtypes = backward.PADDED_HEAD_DTYPES
    backward.PADDED_HEAD_DTYPES = (torch.float32,)
    padded, restore = _count_calls(backward, "_padded_head_backward")
    results = {}
    for name, case in PADDED_CASES.items():
        results[name] = run_case(case)
        results[name]["padded"] = len(padded)
        padded.clear()
    restore()
    backward.PADDED_HEAD_DTYPES = padded_dtypes
    return results


# a single key, and a non-causal single row, which the kernels take after a key (a row) of zeros
# (``forward.single_key_padded``, ``backward.backward_rows``: ptxas 12.8 miscompiled kernels of length-1 loops)
ONE_LENGTH_CASES = {
    "one-key-gated": (1, 2, 1, 1, 1, 32, 32, 2, 1, False, True, 1024),
    "one-key-keyless-rows": (1, 1, 1, 30, 1, 32, 32, 2, 1, False, True, 1024),
    "one-key-noncausal": (1, 2, 1, 20, 1, 32, 32, 4, 0, False, False, 1024),
    "one-row-one-key-noncausal": (2, 1, 1, 1, 1, 32, 32, 4, 0, True, False, 1024),
}


def run_one_length_cases() -> dict[str, dict[str, float]]:
    """Per ``ONE_LENGTH_CASES`` case: ``raw-<x>``, the relative difference of y, denom and each gradient from the same
    call run without the key and row of zeros (adding them adds exact zeros), ``oracle-v``, dv's error against
    the oracle, and ``shortest-length``, the least Tk of any launch and Tq of the backward's (the forward's kernels
    at Tq 1 compiled clean, ``benchmarks/miscompiled_lengths.py``).

    A row that sees one key has y = v w / (w + eps), so its dq, dk are O(eps / w), mostly rounding residue: as in the
    GPU tests, their norm is floored at 1e-2 |dy| (where they are below it, the bound on them is absolute).
    Unfloored, the relative difference of two residues depends on the CPU's rounding: ``one-key-keyless-rows`` gave
    2.7e-2 on an AVX-512 machine (2026-12-06) after passing 1e-3 in earlier CI runs."""

    def outputs(inputs: tuple, options: dict, grad_y: torch.Tensor, plan: Plan) -> dict[str, torch.Tensor]:
        y, den = triton_forward(*inputs, plan=plan, **options, for_backward=True)
        grads = triton_backward(grad_y, *inputs, y, den, plan=plan, **options)
        return {"y": y, "denom": den, **{g: t for g, t in zip(GRADS, grads) if t is not None}}

    lengths: list[int] = []

    def recorded(launch, names: tuple[str, ...]):
        def launch_recording(kernel, grid, kwargs, *args, **kw):
            lengths.extend(kwargs[n] for n in names if n in kwargs)
            return launch(kernel, grid, kwargs, *args, **kw)

        return launch_recording

    results = {}
    for name, case in ONE_LENGTH_CASES.items():
        inputs, options, grad_y, plan = _inputs(case, torch.float32)
        lengths.clear()
        with (
            mock.patch.object(forward, "_launch", recorded(forward._launch, ("Tk",))),  # a single row is fine there
            mock.patch.object(backward, "_launch", recorded(backward._launch, ("Tq", "Tk"))),
        ):
            padded = outputs(inputs, options, grad_y, plan)
        shortest = min(lengths)
        with (
            mock.patch.object(forward, "single_key_padded", lambda k: False),
            mock.patch.object(backward, "single_key_padded", lambda k: False),
            mock.patch.object(backward, "backward_rows", forward.aligned_rows),
        ):
            raw = outputs(inputs, options, grad_y, plan)
        residue_floor = single_key_gradient_floor(grad_y)
        floors = {x: residue_floor if x in ("q", "k") else 1e-30 for x in raw}
        results[name] = {
            f"raw-{x}": float((padded[x] - raw[x]).norm()) / max(float(raw[x].norm()), floors[x]) for x in raw
        }
        grads = tuple(padded.get(g) for g in GRADS)
        results[name]["oracle-v"] = _oracle_errors(inputs, options, grad_y, grads)["v"]
        results[name]["shortest-length"] = shortest
    return results


UNTRIMMED_CASES = ("quadratic-tq-gt-tk", "chunked-tq-gt-tk", "chunked-64-tq-gt-tk")
# programs of 32 rows (keys) whose loops step over 16 keys (rows) at a time, 3 stages: what
# ``backward._tuned_intra_loops`` asks of the measured bf16 shape, here on fp32 tiles with chunks of 32
SHORT_STEP_CASES = {
    "short-steps-gate-valid": (2, 2, 1, 70, 70, 32, 32, 2, 1, True, True, 32),
    "short-steps-prefill": (1, 4, 2, 40, 75, 32, 16, 2, 0, False, True, 32),
}


def run_short_step_cases(cases: dict[str, tuple] = SHORT_STEP_CASES) -> dict[str, dict[str, float]]:
    """``run_case`` of ``cases`` with both loop steps half the program, and the steps the kernels saw."""
    real = backward._tuned_intra_loops
    seen: list[tuple[int, int]] = []

    def short_steps(spec):
        seen.append((spec.block_t, spec.block_k))
        return {"key_step": spec.block_k // 2, "row_step": spec.block_t // 2, "dq_stages": 3, "dkv_stages": 3}

    backward._tuned_intra_loops = short_steps
    try:
        results = {}
        for name, case in cases.items():
            results[name] = run_case(case, tiles={**TINY, "block_t": 32})
            results[name]["program-rows"] = float(min(rows for pair in seen for rows in pair))
            seen.clear()
        return results
    finally:
        backward._tuned_intra_loops = real


# the backward's gate factorings, both on by default (the gated cases above run them): dkv_kernel's rows after each
# key block (backward.FACTORED_GATE_ROWS; chunks of 16 keys hold one key block, no row after it in the chunk, so
# chunks of 64 reach that loop) and dq_kernel's key steps before its rows (FACTORED_DQ_GATE; reached by the gated
# single-chunk cases and by chunks of 64, not by chunks of 16)
FACTORED_CHUNKED_CASES = {
    "chunked-64-gate-valid": (2, 2, 1, 150, 150, 32, 32, 2, 1, True, True, 64),
    # Tk = 2 mod 16: the last key block's split row lands one past a step boundary (a split one row early fails here)
    "chunked-64-short-tail": (1, 2, 1, 146, 146, 32, 32, 2, 1, False, True, 64),
    "chunked-64-prefill-query-head-gate": (1, 4, 2, 70, 160, 32, 24, 2, 4, True, True, 64),
    "chunked-64-strong-gate": (1, 2, 1, 150, 150, 32, 32, 2, 1, False, True, 64, 8.0),
}
# programs of 32 keys stepping 16 rows in chunks of 64: the split rounds up to a row step shorter than the key block
FACTORED_SHORT_STEP_CASES = {
    "short-steps-chunk-64-gate-valid-factored": (2, 2, 1, 150, 150, 32, 32, 2, 1, True, True, 64),
}
# the gated cases once more with both switches off (one exp per weight in every row and key): strong gates, decode,
# Tq > Tk, query-head gates, validity. Only those whose gradients the switches change: in the other eight gated cases
# (quadratic-decode-deg4, chunked-gate-valid, -prefill-cache, -tq-gt-tk, -d48, -d64, -strong-gate, -one-chunk) both
# settings gave bitwise the same gradients (each case run with both on and with both off, interpreter, 2026-12-04),
# so the factored loops do not run there and a second run would repeat the first (about 36 s of the module's fixture)
PER_WEIGHT_CASES = [
    "quadratic-deg4-gate-valid",
    "quadratic-tq-gt-tk",
    "quadratic-query-head-gate",
    "quadratic-strong-gate",
    "chunked-query-head-gate",
    "chunked-decode",
    "chunked-d128",
    "chunked-64-tq-gt-tk",
]
GATE_SWITCHES = ("FACTORED_GATE_ROWS", "FACTORED_DQ_GATE")


def run_gate_factoring_cases() -> dict[str, dict[str, float]]:
    """``run_case`` of the chunked cases of 64 keys (and the short-step one) with both gate factorings on, then of
    the gated cases with both off."""
    with mock.patch.multiple(backward, **dict.fromkeys(GATE_SWITCHES, True)):
        results = {name: run_case(case) for name, case in FACTORED_CHUNKED_CASES.items()}
        results.update(run_short_step_cases(FACTORED_SHORT_STEP_CASES))
    with mock.patch.multiple(backward, **dict.fromkeys(GATE_SWITCHES, False)):
        results.update({f"{name}-per-weight": run_case(dict(CASES)[name]) for name in PER_WEIGHT_CASES})
    return results


def run_untrimmed(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run()`` with ``keyless_rows`` off: the kernels then handle the queries before the first key themselves
    (chunks aligned with the queries, negative positions), as they do where symbolic sizes leave Tq > Tk open."""
    real = forward.keyless_rows
    forward.keyless_rows = lambda q, k, causal: None  # read by forward.aligned_rows, which the backward calls too
    try:
        return run()
    finally:
        forward.keyless_rows = real


def _interpreted() -> dict[str, dict[str, float]]:
    results = {name: run_case(case) for name, case in CASES}
    for name in UNTRIMMED_CASES:
        results[f"{name}-untrimmed"] = run_untrimmed(lambda case=dict(CASES)[name]: run_case(case))
    results.update(run_untrimmed(lambda: run_state_hook_cases(("chunked-tq-gt-tk",), "state-hooks-untrimmed")))
    results.update({name: run_case(case, segments=segments) for name, (case, segments) in SEGMENT_CASES.items()})
    for label, reset in RESETS.items():
        results.update({f"{name}-reset{label}": run_case(dict(CASES)[name], reset=reset) for name in RESET_CASES})
    # float16 inputs run the float32 kernels (forward.kernel_inputs); only the gradients' final rounding remains
    results.update({f"{name}-float16": run_case(dict(CASES)[name], torch.float16) for name in FLOAT16_CASES})
    # bfloat16 with chunks of 16 keys runs the float32 kernels too (forward.small_chunk_float32)
    results["chunked-gate-valid-bfloat16"] = run_case(dict(CASES)["chunked-gate-valid"], torch.bfloat16)
    results.update({f"{name}-kept": run_kept_case(*KEPT_CASES[name]) for name in KEPT_CASES})
    results.update(run_padded_cases())
    results.update(run_one_length_cases())
    results.update(run_short_step_cases())
    results.update(run_gate_factoring_cases())
    results.update(run_state_hook_cases(STATE_HOOK_CASES, "state-hooks"))
    results.update(
        {f"{name}-op-{ratio}": run_op_case(dict(CASES)[name], ratio) for name in OP_CASES for ratio in (0, 1000)}
    )
    backward.coordinate_state_terms = lambda fwd: fwd.chunked
    triton_source._load.cache_clear()  # the modules loaded above, per spec, hold the pair form
    results.update({f"{name}-coordinates": run_case(dict(CASES)[name], segments=2) for name in COORDINATE_CASES})
    results.update(run_state_hook_cases(STATE_HOOK_COORDINATE_CASES, "state-hooks-coordinates"))
    return results


# about 340 s on CI's 2-core machine alone (2026-12-03); 604 s in CI beside the other test worker, 641 s alone on a
# slower 2-core machine (2026-12-04, before the per-weight cases were cut to eight); 100 s in a fresh-clone CI run with
# the interpreter's overflow checks off (2026-12-08, ``testing.run_interpreted_script``): the limit only catches a
# hang, so it leaves room for a slower machine
interpreted = interpreted_fixture(__file__, 1500)


def test_bfloat16_with_short_chunks_runs_the_float32_kernels(interpreted: dict[str, dict[str, float]]) -> None:
    """bfloat16 inputs with chunks of 16 keys (under ``planning.EXACT_CHUNK_BELOW``): the float32 kernels (the
    interpreter cannot run the bf16 ones at all), then one rounding of each gradient to bfloat16 (unit 3.9e-3)."""
    _assert_below(interpreted["chunked-gate-valid-bfloat16"], 8e-3, "chunked-gate-valid in bfloat16")


@pytest.mark.parametrize("name", FLOAT16_CASES)
def test_float16_runs_the_float32_kernels(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """float16 inputs: the float32 kernels, then one rounding of each gradient to float16 (unit roundoff 4.9e-4)."""
    _assert_below(interpreted[f"{name}-float16"], 1e-3, f"{name} in float16")


@pytest.mark.parametrize(
    "name",
    [n for n, _ in CASES]
    + list(SEGMENT_CASES)
    + [f"{n}-coordinates" for n in COORDINATE_CASES]
    + [f"{n}-untrimmed" for n in UNTRIMMED_CASES],
)
def test_gradients_match_oracle(interpreted: dict[str, dict[str, float]], name: str) -> None:
    errors = interpreted[name]
    cases = {**dict(CASES), **{n: c for n, (c, _) in SEGMENT_CASES.items()}}
    gated = cases[name.removesuffix("-coordinates").removesuffix("-untrimmed")][8] > 0
    assert set(errors) == set(GRADS if gated else GRADS[:3])
    _assert_below(errors, 2e-5, name)


@pytest.mark.parametrize("name", [f"{n}-reset{label}" for n in RESET_CASES for label in RESETS])
def test_gradients_after_document_resets(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """Log-gates of -1e4 and -inf at two keys: every gradient finite and within the bound of the other cases."""
    _assert_below(interpreted[name], 2e-5, name)


@pytest.mark.parametrize("name", list(SHORT_STEP_CASES))
def test_loops_step_shorter_than_their_programs(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """dq_kernel's key loop and dkv_kernel's row loop in steps of 16 inside programs of 32 rows (keys), 3 stages."""
    errors = dict(interpreted[name])
    assert errors.pop("program-rows") == 32
    _assert_below(errors, 2e-5, name)


@pytest.mark.parametrize("name", [*FACTORED_CHUNKED_CASES, *FACTORED_SHORT_STEP_CASES])
def test_factored_gate_rows_match_oracle(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """dkv_kernel with exp(G_i - G_j) = exp(G_i - G_E) exp(G_E - G_j) for the rows after each key block's last key E
    (``backward.FACTORED_GATE_ROWS``) and dq_kernel with exp(G_i - G_ref) exp(G_ref - G_j) for the key steps before
    its first row (``FACTORED_DQ_GATE``), in chunks long enough to have both: every gradient within the bound."""
    errors = dict(interpreted[name])
    errors.pop("program-rows", None)
    assert set(errors) == set(GRADS)
    _assert_below(errors, 2e-5, name)


@pytest.mark.parametrize("name", [f"{n}-per-weight" for n in PER_WEIGHT_CASES])
def test_per_weight_gate_rows_match_oracle(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """The gated cases with both gate factorings off (one exp per weight in dkv_kernel and dq_kernel)."""
    errors = interpreted[name]
    assert set(errors) == set(GRADS)
    _assert_below(errors, 2e-5, name)


@pytest.mark.parametrize("name", list(ONE_LENGTH_CASES))
def test_keys_and_rows_of_zeros_change_nothing(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """A single key (and a non-causal single row) run after one of zeros: y, denom, dv and d log_gate as without them
    (exact zeros added; 1e-6 leaves dv's sum order room), dq and dk within 1e-3 of their norm floored at 1e-2 |dy|
    (where a row sees one key they are O(eps / w), left after cancellation), dv within the other cases' bound of the
    oracle."""
    results = dict(interpreted[name])
    assert results.pop("oracle-v") < 2e-5
    assert results.pop("shortest-length") >= 2  # no kernel took a single key, no backward kernel a single row
    assert {"raw-y", "raw-denom", "raw-q", "raw-k", "raw-v"} <= set(results)
    _assert_below({x: results.pop(x) for x in ("raw-q", "raw-k")}, 1e-3, name)
    _assert_below(results, 1e-6, name)


def test_a_noncausal_single_query_row_runs_after_a_row_of_zeros() -> None:
    """A non-causal call with Tq = 1 gets one row of zeros before its query (``backward_rows``): with Tq = 1 the
    kernels' row loop folded away and ``dkv_kernel`` faulted on the H100 (GPU fuzz seed 69690001, case 599). Causal
    calls, and non-causal ones of more rows, keep the forward's alignment."""
    k = torch.empty(2, 1, 5000, 16)
    assert backward_rows(torch.empty(2, 1, 1, 16), k, causal=False) == -1
    assert backward_rows(torch.empty(2, 1, 2, 16), k, causal=False) is None
    assert backward_rows(torch.empty(2, 1, 1, 16), k, causal=True) is None
    assert backward_rows(torch.empty(2, 1, 1, 16), torch.empty(2, 1, 3, 16), causal=True) == -2  # a short cache


def test_tuned_intra_loops_only_where_measured() -> None:
    """The shorter loop steps and 3 stages apply to the bf16 d = 64 shape they were measured on, nowhere else."""
    ungated, gated = _spec(gated=False), _spec()
    assert (ungated.key_step, ungated.row_step, ungated.dq_stages, ungated.dkv_stages) == (64, 64, 2, 2)
    cuda_dq = BackwardSpec.of(ungated.forward, dq_state_terms=False)
    assert (cuda_dq.key_step, cuda_dq.row_step, cuda_dq.dq_stages, cuda_dq.dkv_stages) == (32, 64, 3, 2)
    assert (gated.key_step, gated.row_step, gated.dq_stages, gated.dkv_stages) == (64, 32, 2, 3)
    for other in (_spec(dtype="float32"), _spec(head_dim=32, value_dim=32), _spec(gated=False, head_dim=128)):
        spec = BackwardSpec.of(other.forward, dq_state_terms=False)
        assert (spec.key_step, spec.row_step, spec.dq_stages, spec.dkv_stages) == (
            spec.block_k, spec.block_t, 2, 2,
        )  # fmt: skip
    assert "for start in range(lo, hi, 32):" in render(BACKWARD_TEMPLATE, cuda_dq)


@pytest.mark.parametrize(
    "name",
    [f"{n}-state-hooks" for n in STATE_HOOK_CASES]
    + [f"{n}-state-hooks-coordinates" for n in STATE_HOOK_COORDINATE_CASES]
    + ["chunked-tq-gt-tk-state-hooks-untrimmed"],
)
def test_state_terms_added_by_hooks(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """dq_kernel without its state terms and no dkv_state_kernel, the hooks adding them instead (the PyTorch forms
    of the CUDA kernels' terms): the gradients still match the oracle, and each hook ran once."""
    results = dict(interpreted[name])
    assert (results.pop("dq-hook-calls"), results.pop("dkv-hook-calls")) == (1, 1)
    _assert_below(results, 2e-5, name)


@pytest.mark.parametrize("name", list(KEPT_CASES))
def test_kept_states_are_read_and_checked(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """The backward given the forward's states: exact; doubling them moves dq (and d log_gate), not dk, dv; states
    of another shape or dtype are recomputed (exact again; tried on one case)."""
    results = interpreted[f"{name}-kept"]
    _assert_below({key: err for key, err in results.items() if key.split("-")[0] != "doubled"}, 2e-5, name)
    assert results["doubled-q"] > 1e-2 and results["doubled-k"] == 0 and results["doubled-v"] == 0
    if "doubled-g" in results:
        assert results["doubled-g"] > 1e-3
    assert ("misshapen-q" in results and "wrong-dtype-q" in results) == KEPT_CASES[name][2]


@pytest.mark.parametrize("name", OP_CASES)
def test_op_keeps_states_within_the_memory_rule(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """Through the op's autograd: with the ratio 1000 (at these tiny shapes, d = 32 over 16-key chunks, the states
    take 25x y's bytes) the states are kept, and the backward runs no state kernel and zero-fills no state-sized
    gradient; with the ratio 0 nothing is kept and the backward recomputes them once. The gradients match the
    oracle either way."""
    kept, dropped = interpreted[f"{name}-op-1000"], interpreted[f"{name}-op-0"]
    assert (kept["kept"], kept["recomputed"], kept["state-fills"]) == (1, 0, 0)
    assert (dropped["kept"], dropped["recomputed"]) == (0, 1)
    for results in (kept, dropped):
        _assert_below({key: err for key, err in results.items() if key.startswith("op-")}, 2e-5, name)


def _spec(**changes: object) -> BackwardSpec:
    fields = dict(
        dtype="bfloat16", head_dim=64, value_dim=64, deg=2, gated=True, has_valid=False, causal=True, chunked=True,
        chunk_size=1024, block_t=128, block_k=64, block_s=64, block_e=64, block_feature=16,
    )  # fmt: skip
    fields.update(changes)
    return BackwardSpec.of(KernelSpec(**fields))


def test_gate_factorings_by_default() -> None:
    """dkv_kernel's factored rows are on for gated deg 2 (where they were timed), off at deg 4 and without a gate;
    dq_kernel's factored key steps for every gated spec. Off, the rendered kernels have neither."""
    assert backward.FACTORED_GATE_ROWS and backward.FACTORED_DQ_GATE
    assert _spec().factored_gate_rows and _spec().factored_dq_gate and _spec(deg=4).factored_dq_gate
    assert not _spec(deg=4).factored_gate_rows
    assert not _spec(gated=False).factored_gate_rows and not _spec(gated=False).factored_dq_gate
    assert "row_factor" in render(BACKWARD_TEMPLATE, _spec())
    assert "row_factor" not in render(BACKWARD_TEMPLATE, _spec(deg=4))
    assert "g_ref" in render(BACKWARD_TEMPLATE, _spec(deg=4))
    assert "g_ref" not in render(BACKWARD_TEMPLATE, _spec(gated=False))


def test_rendered_source_bakes_the_shape() -> None:
    spec = _spec()
    assert (spec.block_t, spec.block_k, spec.block_s) == (64, 64, 64)
    source = render(BACKWARD_TEMPLATE, spec)
    ast.parse(source)
    assert source == render(BACKWARD_TEMPLATE, spec)  # deterministic
    for name in ("def dq_kernel", "def dkv_kernel", "def reverse_state_kernel", "KTERM, G"):
        assert name in source
    # d = 64, b = 16: 4 blocks, 10 pair tiles as a loop at run time in dq and dk (each pair adds to two blocks of
    # the full-width accumulator); the source does not grow with the pairs. Gated 16-bit d <= 64: dk and dv walk
    # the 64 coordinates instead (``coordinate_state_terms``)
    ungated = render(BACKWARD_TEMPLATE, _spec(gated=False))
    assert ungated.count("for p in range(10):") == 2 and ungated.count("blk_j = (blk_i + delta) % 4") == 3
    assert ungated.count("dq += tl.where((dims // 16 == blk_") == 2 and ungated.count("dk += tl.where((dims // 16") == 2
    assert source.count("for p in range(10):") == 1 and source.count("for bb in range(64):") == 1
    assert "for bb in range" not in render(BACKWARD_TEMPLATE, _spec(head_dim=128, value_dim=128))
    assert len(render(BACKWARD_TEMPLATE, _spec(head_dim=128, value_dim=128, gated=False)).splitlines()) == len(
        ungated.splitlines()
    )
    quadratic = render(BACKWARD_TEMPLATE, _spec(chunked=False, chunk_size=0, block_feature=0, gated=False, deg=4))
    ast.parse(quadratic)
    assert "reverse_state_kernel" not in quadratic and "KTERM" not in quadratic and "blk_i" not in quadratic
    assert "dpow = 4.0 * x * hp" in quadratic
    wide = _spec(head_dim=128, value_dim=128)
    assert wide.block_t == 32


def test_source_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = _spec(head_dim=32, value_dim=32, chunk_size=64)
    module, path = load(BACKWARD_TEMPLATE, spec)
    assert path.name.startswith("backward_") and path.read_text() == render(BACKWARD_TEMPLATE, spec)
    assert load(BACKWARD_TEMPLATE, spec) == (module, path)
    assert hasattr(module, "dkv_kernel") and hasattr(module, "reverse_state_kernel")


if __name__ == "__main__":
    print(json.dumps(_interpreted()))


def test_float32_wide_heads_take_half_the_rows() -> None:
    """float32 heads count as wide from a padded width of 128 (d = e = 96: 64 rows overflowed shared memory on
    sm_90); 16-bit heads from a width of 128."""

    def rows(dtype: torch.dtype, d: int) -> int:
        q, v = torch.empty(1, 1, 1, d, dtype=dtype), torch.empty(1, 1, 1, d, dtype=dtype)
        return BackwardSpec.of(kernel_spec(q, v, 2, True, False, True, 4096, Plan(chunk_size=64, block_t=64))).block_t

    assert (rows(torch.float32, 96), rows(torch.float32, 64), rows(torch.bfloat16, 96), rows(torch.bfloat16, 128)) == (
        32, 64, 64, 32,
    )  # fmt: skip


def test_wide_fp32_chunked_backward_is_left_to_aten() -> None:
    """fp32 tiles (float32 and float16 inputs) with e > 128 on the chunked path need ~300 KB of shared memory in
    the backward (sm_90): ``backward_unsupported`` names it, so the op runs the aten backward; bf16, e <= 128 and
    the single-chunk path stay on Triton."""
    plan = Plan(chunk_size=64, block_t=64, block_e=128)

    def reason(dtype: torch.dtype, e: int, T: int = 1000) -> str | None:
        q, v = torch.empty(1, 1, 1, 64, dtype=dtype), torch.empty(1, 1, 1, e, dtype=dtype)
        return backward_unsupported(q, v, 2, True, False, True, T, plan)

    assert "e=256 > 128" in reason(torch.float32, 256) and "float16" in reason(torch.float16, 160)
    assert reason(torch.bfloat16, 256) is None and reason(torch.float32, 128) is None
    assert reason(torch.float32, 256, T=64) is None  # one chunk: the quadratic kernels


@pytest.mark.parametrize("name", list(PADDED_CASES))
def test_narrow_heads_run_padded(interpreted: dict[str, dict[str, float]], name: str) -> None:
    """Heads whose d is not a multiple of 16, padded with zero columns of q and k: one padded call, gradients exact."""
    results = dict(interpreted[name])
    assert results.pop("padded") == 1
    _assert_below(results, 2e-5, name)


def test_narrow_bf16_heads_stay_on_triton() -> None:
    """bf16 heads narrower than 16 are no longer left to aten (they run padded); fp32 d = 8 runs unpadded."""
    plan = Plan(chunk_size=32, block_t=32)
    for dtype in (torch.bfloat16, torch.float32):
        q, v = torch.empty(1, 1, 1, 8, dtype=dtype), torch.empty(1, 1, 1, 64, dtype=dtype)
        assert all(backward_unsupported(q, v, 2, False, False, True, T, plan) is None for T in (91, 1000))
    assert torch.float32 not in backward.PADDED_HEAD_DTYPES


@pytest.mark.parametrize(("d", "kept"), [(64, True), (128, False)])
def test_memory_rule_at_the_benchmark_shape(d: int, kept: bool) -> None:
    """b=1, h=8, T=65536, bf16, chunk 1024, e = d (meta tensors, the forward's state layout): at d = 64 the states
    take 1.3x y's float32 bytes and are kept, at d = 128 (9216 tiled features) 4.6x and are recomputed."""
    from retention_compile.codegen.forward import StateLayout
    from retention_compile.ops import KEPT_STATES_MAX_RATIO, keeps_states

    q = k = torch.empty(1, 8, 65536, d, dtype=torch.bfloat16, device="meta")
    y = torch.empty(1, 8, 65536, d, dtype=torch.float32, device="meta")
    plan = Plan(chunk_size=1024, block_t=128, block_feature=16, block_e=64)
    layout = StateLayout.of(kernel_spec(q, k, 2, False, False, True, 65536, plan), k, 65536, 8, segments=8)
    s_shape, m_shape = layout.shapes()
    states = {"S": torch.empty(s_shape, dtype=layout.state_dtype, device="meta"),
              "M": torch.empty(m_shape, dtype=torch.float32, device="meta")}  # fmt: skip
    ratio = sum(t.numel() * t.element_size() for t in states.values()) / (y.numel() * y.element_size())
    assert s_shape == (8, 64, 2560 if d == 64 else 9216, d) and round(ratio, 1) == (1.3 if d == 64 else 4.6)
    assert keeps_states(states, y) == kept and (ratio <= KEPT_STATES_MAX_RATIO) == kept
