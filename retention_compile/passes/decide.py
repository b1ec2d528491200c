"""Decide what each attention site becomes, by the policies of DESIGN.md section 2.

The decision is made from what is certain about the call: ``is_causal``, the absence of a mask, the
shapes (symbolic sizes are compared only when the comparison is provable), ``dropout_p`` and the config.
Anything else keeps the site as SDPA, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import RetentionConfig
from .sites import AttentionSite, example_value

KEPT = "kept as SDPA"


class RetentionRewriteError(RuntimeError):
    """Raised under ``RetentionConfig(strict=True)`` for a site that cannot be rewritten."""


@dataclass
class Decision:
    """What one site becomes.

    rewrite:     replace the SDPA call by power retention.
    mapping:     a short name of the result ("causal retention", "non-causal retention", ...).
    reason:      why, in words a user can act on.
    causal:      causal (bottom-right aligned) retention, else non-causal.
    key_prefix:  use only the first Tq keys (SDPA's top-left aligned ``is_causal`` with Tq < Tk).
    valid:       graph node of a (B, Tk) bool key-validity mask, when padding was proven.
    log_gate:    graph node of a (B, H, Tk) log-gate (ALiBi), when one was derived.
    notes:       things the user should know (dropout ignored, ...).
    """

    rewrite: bool
    mapping: str
    reason: str
    causal: bool = True
    key_prefix: bool = False
    valid: fx.Node | None = None
    log_gate: fx.Node | None = None
    notes: list[str] = field(default_factory=list)


def keep(reason: str) -> Decision:
    return Decision(rewrite=False, mapping=KEPT, reason=reason)


def _constant(value: object, name: str) -> Decision | None:
    if isinstance(value, fx.Node):
        return keep(f"{name} is computed at run time ({value.name}); retention needs it known at compile time")
    return None


def _check_operands(site: AttentionSite) -> Decision | None:
    try:
        q, k, v = (example_value(n) for n in (site.query, site.key, site.value))
    except TypeError as error:
        return keep(f"operands are not tensors with known shapes ({error})")
    if not (q.dim() == k.dim() == v.dim() == 4):
        return keep(f"operands have {q.dim()}/{k.dim()}/{v.dim()} dims; retention needs (B, H, T, d) tensors")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return keep(f"dtype {q.dtype} is not supported by power retention")
    if not statically_known_true(q.shape[0] == k.shape[0]):
        return keep(f"batch sizes differ or broadcast (q {q.shape[0]}, k {k.shape[0]})")
    hq, hk = q.shape[1], k.shape[1]
    if not statically_known_true(hq % hk == 0):
        return keep(f"query heads ({hq}) are not a multiple of kv heads ({hk})")
    return None


def decide_sdpa(site: AttentionSite, config: RetentionConfig) -> Decision:
    """The decision for one SDPA site whose meaning is certain without mask analysis."""
    for value, name in ((site.is_causal, "is_causal"), (site.dropout_p, "dropout_p"), (site.scale, "scale")):
        found = _constant(value, name)
        if found:
            return found
    found = _check_operands(site)
    if found:
        return found
    notes = []
    if site.dropout_p > 0:
        if config.dropout == "keep":
            return keep(f"dropout_p={site.dropout_p} and RetentionConfig(dropout='keep')")
        notes.append(f"dropout_p={site.dropout_p} ignored: retention has no attention matrix to drop")
    if site.attn_mask is not None:
        decision = keep("an attn_mask is given and its meaning could not be proven")
    else:
        decision = _decide_unmasked(site, config)
    decision.notes = notes + decision.notes
    return decision


def _decide_unmasked(site: AttentionSite, config: RetentionConfig) -> Decision:
    tq, tk = site.q_shape[2], site.k_shape[2]
    if site.is_causal:
        if statically_known_true(tq == tk):
            return Decision(True, "causal retention", "is_causal=True with Tq == Tk")
        if statically_known_true(tq < tk):
            return Decision(
                True,
                "causal retention over the first Tq keys",
                f"is_causal=True with Tq ({tq}) < Tk ({tk}): SDPA aligns the causal mask top-left, so query i "
                "sees keys 0..i; retention runs over the first Tq keys",
                key_prefix=True,
            )
        return keep(
            f"is_causal=True with Tq ({tq}) > Tk ({tk}) or not provably <=: top-left alignment leaves rows empty"
        )
    if tq == 1 and config.rewrite_decode:
        return Decision(
            True,
            "decode step (causal, bottom-right)",
            "no mask and Tq == 1: the decode step of a causal model (the new token sees every key)",
        )
    if config.non_causal == "keep":
        return keep("no mask (non-causal) and RetentionConfig(non_causal='keep')")
    kind = "self" if statically_known_true(tq == tk) else "cross"
    return Decision(True, "non-causal retention", f"no mask and is_causal=False ({kind}-attention)", causal=False)
