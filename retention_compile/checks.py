"""Input validation shared by the oracle, the chunked form and the op.

Every check raises ``RetentionInputError`` (a ``ValueError``) whose message names the offending
argument, what was found and what is expected, so a bad call never turns into a silent wrong answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RetentionInputError(ValueError):
    """A call to power retention whose arguments break the contract of DESIGN.md section 1."""


@dataclass(frozen=True)
class RetentionShape:
    """Sizes of one power-retention call: ``q (B, Hq, Tq, d)``, ``k (B, Hk, Tk, d)``, ``v (B, Hk, Tk, e)``."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    gate_heads: int | None  # None: no gate; else Hk or Hq

    @property
    def group(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.q_heads // self.kv_heads

    @property
    def offset(self) -> int:
        """Bottom-right alignment: query ``i`` sits at key position ``i + offset``."""
        return self.kv_len - self.q_len


# Which eager calls of ``rc.power_retention`` check that log_gate <= 0 (``check_gate_values``): "cpu" (default) those
# on the CPU, where reading the gate costs no device sync; "all" GPU calls too, which then wait for the device once
# (H200, eager gated bf16 b1 h8 d64 under no_grad, session 38: 0.089 -> 0.145 ms per call at T=2048, 0.373 -> 0.500
# at T=16384; gate_check_cost_NVIDIA-H200_2026-12-02_412ec2a.json); "none". Unchecked, a positive gate gives inf /
# NaN in the rows whose weights overflow and the formula's value below that; no finite wrong row in the tests
# (tests/gpu/test_bad_inputs.py), though a row whose denominator alone overflows would read 0.
CHECK_GATE_VALUES = "cpu"
GATE_CHECK_SETTINGS = ("cpu", "all", "none")


def _fail(message: str) -> None:
    raise RetentionInputError(message)


def gate_check_applies(log_gate: torch.Tensor) -> bool:
    """Whether ``CHECK_GATE_VALUES`` asks for ``check_gate_values`` on a gate on this device."""
    if CHECK_GATE_VALUES not in GATE_CHECK_SETTINGS:
        raise ValueError(
            f"retention_compile.checks.CHECK_GATE_VALUES must be one of {GATE_CHECK_SETTINGS}, "
            f"got {CHECK_GATE_VALUES!r}"
        )
    return CHECK_GATE_VALUES == "all" or (CHECK_GATE_VALUES == "cpu" and log_gate.device.type == "cpu")


def check_gate_values(log_gate: torch.Tensor) -> None:
    """Raise if an entry of ``log_gate`` is > 0 (NaN propagates to the rows that read it, as in SDPA).

    The kernels take ``exp(G_i - G_j) <= 1`` for keys before a query (G non-increasing): with a positive log-gate
    the weights grow with distance and overflow float32 once G rises by about 88 within the keys a state sums
    (a chunk, or all of them), giving inf or NaN where the formula is finite. Only reads values, so callers skip it
    on tensors without data (fake, meta) and while compiling or capturing a CUDA graph."""
    flat = log_gate.detach().reshape(-1)
    positive = flat > 0
    if not bool(positive.any()):
        return
    first = int(positive.nonzero()[0, 0])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), log_gate.shape))
    _fail(
        f"power_retention: log_gate must be <= 0 (the log of a per-step decay in [0, 1]; -inf is a hard reset); found "
        f"{float(flat[first]):g} at index {where}, {int(positive.sum())} positive entries in all. "
        "Pass e.g. logsigmoid(x) or -softplus(x)"
    )


def validate_retention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    deg: int,
    log_gate: torch.Tensor | None,
    causal: bool,
    valid: torch.Tensor | None,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> RetentionShape:
    """Check every argument of a power-retention call and return its sizes.

    Works on real, fake and meta tensors (only shapes, dtypes and devices are read).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"power_retention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(
                f"power_retention: {name} must have 4 dims (batch, heads, seq, dim) as in SDPA, "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(
                f"power_retention: {name} has dtype {t.dtype}; supported dtypes are "
                "float16, bfloat16, float32 and float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"power_retention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        _fail(
            f"power_retention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; "
            "move them with .to(device) first"
        )
    B, Hq, Tq, d = q.shape
    Bk, Hk, Tk, dk = k.shape
    Bv, Hv, Tv, e = v.shape
    if dk != d:
        _fail(f"power_retention: head dims differ: q has d={d}, k has d={dk}")
    if (Bk, Hk, Tk) != (Bv, Hv, Tv):
        _fail(
            f"power_retention: k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and sequence length"
        )
    if Bk != B:
        _fail(f"power_retention: batch sizes differ: q has {B}, k/v have {Bk}")
    if Hk == 0 or Hq % Hk != 0:
        _fail(
            f"power_retention: query heads ({Hq}) must be a multiple of kv heads ({Hk}) "
            "(grouped-query attention reads kv head a // (Hq/Hk))"
        )
    if isinstance(deg, bool) or not isinstance(deg, int) or deg < 2 or deg % 2 != 0:
        _fail(
            f"power_retention: deg must be an even integer >= 2 (the weights (s q.k)^p must be "
            f"non-negative), got {deg!r}"
        )
    if not isinstance(causal, bool):  # a truthy string or None was taken for a flag
        _fail(f"power_retention: causal must be True or False, got {causal!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        _fail(f"power_retention: scale must be a number or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        _fail(f"power_retention: scale must be finite, got {scale!r}")
    if scale is None and d == 0:
        _fail("power_retention: the head dim d is 0, so there is no default scale 1/sqrt(d); pass scale")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        _fail(f"power_retention: chunk_size must be a positive integer or None, got {chunk_size!r}")
    gate_heads = None
    if log_gate is not None:
        if not causal:
            _fail(
                "power_retention: a log_gate was given with causal=False; gating is defined for causal "
                "retention only (pass causal=True or drop the gate)"
            )
        if log_gate.device != q.device:
            _fail(f"power_retention: log_gate is on {log_gate.device}, q on {q.device}; move it with .to(q.device)")
        if not log_gate.dtype.is_floating_point:
            _fail(f"power_retention: log_gate must be floating point, got {log_gate.dtype}")
        if (
            log_gate.dim() != 3
            or log_gate.shape[0] != B
            or log_gate.shape[2] != Tk
            or log_gate.shape[1] not in (Hk, Hq)
        ):
            _fail(
                f"power_retention: log_gate must have shape (B, Hk, Tk) = ({B}, {Hk}, {Tk}) or "
                f"(B, Hq, Tk) = ({B}, {Hq}, {Tk}), got {tuple(log_gate.shape)}"
            )
        gate_heads = log_gate.shape[1]
    if valid is not None:
        if valid.dtype != torch.bool:
            _fail(f"power_retention: valid must be a bool tensor (True = key is real), got {valid.dtype}")
        if valid.device != q.device:
            _fail(f"power_retention: valid is on {valid.device}, q on {q.device}; move it with .to(q.device)")
        if tuple(valid.shape) != (B, Tk):
            _fail(f"power_retention: valid must have shape (B, Tk) = ({B}, {Tk}), got {tuple(valid.shape)}")
    return RetentionShape(B, Hq, Hk, Tq, Tk, d, e, gate_heads)
