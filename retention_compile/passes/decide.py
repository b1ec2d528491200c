"""Decide what each attention site becomes, by the policies of DESIGN.md section 2.

The decision is made from what is certain about the call: ``is_causal``, the mask as proven by
``masks.MaskAnalyser`` (causal, sliding window, full, padding, ALiBi), the shapes (symbolic sizes are
compared only when the comparison is provable), ``dropout_p`` and the config. Anything else keeps the
site as SDPA (or as the hand-written code it is), with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import RetentionConfig
from .fxutils import in_place_changes
from .masks import MaskAnalyser, MaskAnalysis
from .patterns import unrepeat_kv
from .shapes import holds
from .sites import AttentionSite, example_value

KEPT = "kept as SDPA"
KEPT_AS_WRITTEN = "kept as written"  # a hand-written attention left as the model has it
KEPT_AS = {"hand-written": KEPT_AS_WRITTEN, "flex": "kept as flex_attention"}


class RetentionRewriteError(RuntimeError):
    """Raised under ``RetentionConfig(strict=True)`` for a site that cannot be rewritten."""


@dataclass
class Decision:
    """What one site becomes.

    rewrite:     replace the attention by power retention.
    mapping:     a short name of the result ("causal retention", "non-causal retention", ...).
    reason:      why, in words a user can act on.
    causal:      causal (bottom-right aligned) retention, else non-causal.
    key_prefix:  use only the first Tq keys (SDPA's top-left aligned ``is_causal`` with Tq < Tk).
    mask:        the proven mask (padding terms -> ``valid``, ALiBi slopes -> the log-gate, buffer checks).
    key, value:  the kv tensors the op reads when a repeat of kv heads was folded (None: the site's own).
    notes:       things the user should know (dropout ignored, GQA folded, window ignored, ...).
    """

    rewrite: bool
    mapping: str
    reason: str
    causal: bool = True
    key_prefix: bool = False
    mask: MaskAnalysis | None = None
    key: fx.Node | None = None
    value: fx.Node | None = None
    notes: list[str] = field(default_factory=list)


def keep(reason: str, mask: MaskAnalysis | None = None) -> Decision:
    return Decision(rewrite=False, mapping=KEPT, reason=reason, mask=mask)


def _constant(value: object, name: str) -> Decision | None:
    if isinstance(value, fx.Node):
        return keep(f"{name} is computed at run time ({value.name}); retention needs it known at compile time")
    return None


def _dropout(value: float | fx.Node) -> str:
    return f"dropout_p computed at run time ({value.name})" if isinstance(value, fx.Node) else f"dropout_p={value}"


def _check_operands(site: AttentionSite) -> Decision | None:
    try:
        q, k, v = (example_value(n) for n in (site.query, site.key, site.value))
    except TypeError as error:
        return keep(f"operands are not tensors with known shapes ({error})")
    if not (q.dim() == k.dim() == v.dim() == 4):
        return keep(f"operands have {q.dim()}/{k.dim()}/{v.dim()} dims; retention needs (B, H, T, d) tensors")
    if any(t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for t in (q, k, v)):
        return keep(f"dtypes {q.dtype}/{k.dtype}/{v.dtype} are not supported by power retention")
    if not holds(q.shape[0] == k.shape[0]) or not holds(k.shape[0] == v.shape[0]):
        return keep(f"batch sizes differ or broadcast (q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]})")
    if not holds(k.shape[1] == v.shape[1]):
        return keep(f"k and v have different head counts ({k.shape[1]}, {v.shape[1]})")
    hq, hk = q.shape[1], k.shape[1]
    if not holds(hq % hk == 0):
        return keep(f"query heads ({hq}) are not a multiple of kv heads ({hk})")
    out = getattr(site.node.meta.get("example_value"), "shape", None)
    expected = (q.shape[0], hq, q.shape[2], v.shape[3])
    if site.folded and out is not None and len(out) == 3:  # (B H, Tq, e): the op's output flattened (rewrite)
        out = (q.shape[0], out[0] // q.shape[0], *out[1:])
    if out is None or len(out) != 4 or not all(holds(a == b) for a, b in zip(out, expected)):
        # a mask that broadcasts the scores to more batches or heads than q has (a (1, 4, T, T) mask over one head)
        shown = "unknown" if out is None else tuple(out)
        return keep(f"the attention's output has shape {shown}, not (B, Hq, Tq, e) = {tuple(expected)} of q and v")
    return None


def _fold_kv(site: AttentionSite, decision: Decision) -> None:
    """Give the op the kv tensors before a repeat of their heads (never materialise the repeat), unless a source is
    changed in place after its repeat copied it (the op, reading the source at the site, would see the change)."""
    key, value = unrepeat_kv(site.key), unrepeat_kv(site.value)
    if key is None or value is None:
        return
    (k_source, k_times, form), (v_source, v_times, _) = key, value
    if not holds(k_times == v_times):
        return
    for source, repeated in ((k_source, site.key), (v_source, site.value)):
        if any(repeated < change < site.node for change in in_place_changes(source)):
            decision.notes.append(f"GQA: {form} not folded: {source.name} is changed in place after the repeat")
            return
    decision.key, decision.value = k_source, v_source
    decision.notes.append(f"GQA: {form} x{k_times} folded into the op's grouped heads")


def decide(site: AttentionSite, config: RetentionConfig, analyser: MaskAnalyser) -> Decision:
    """The decision for one site (a hand-written one that is kept stays as written, a flex_attention one as
    flex_attention, not as SDPA)."""
    decision = _decide(site, config, analyser)
    if not decision.rewrite and site.kind in KEPT_AS:
        decision.mapping = KEPT_AS[site.kind]
    return decision


def _decide(site: AttentionSite, config: RetentionConfig, analyser: MaskAnalyser) -> Decision:
    """``decide`` before the kept mapping is named for the site's kind."""
    if site.unsupported:
        return keep(site.unsupported)
    found = _constant(site.is_causal, "is_causal") or _check_operands(site)
    if found:
        return found
    notes = []
    if isinstance(site.dropout_p, fx.Node) or site.dropout_p > 0:
        if config.dropout == "keep":
            return keep(f"{_dropout(site.dropout_p)} and RetentionConfig(dropout='keep')")
        notes.append(f"{_dropout(site.dropout_p)} ignored: retention has no attention matrix to drop")
    decision = _decide_masked(site, config, analyser.analyse(site)) if site.parts else _decide_unmasked(site, config)
    decision.notes = notes + decision.notes
    if decision.rewrite:
        _fold_kv(site, decision)
    return decision


def _decide_masked(site: AttentionSite, config: RetentionConfig, mask: MaskAnalysis) -> Decision:
    """Causal, sliding-window or full mask, with padding and an ALiBi bias, as proven by the analysis."""
    if mask.unknown:
        given = "attn_mask" if site.attn_mask is not None else "mask"
        return keep(f"the {given} could not be proven: {mask.unknown}", mask)
    grid, notes = mask.grid, []
    if grid.causal:
        causal, what = True, "causal mask"
    elif grid.window is not None:
        if config.sliding_window == "keep":
            return keep(f"sliding-window mask ({grid.window} keys) and RetentionConfig(sliding_window='keep')", mask)
        causal, what = True, f"sliding-window mask ({grid.window} keys)"
        notes.append(f"the window of {grid.window} keys is dropped: full causal retention (sliding_window='full')")
    elif config.non_causal == "keep":
        return keep("the mask admits every query-key pair (non-causal) and RetentionConfig(non_causal='keep')", mask)
    else:
        causal, what = False, "mask admitting every query-key pair"
    mapping = "causal retention" if causal else "non-causal retention"
    if mask.key_prefix:
        mapping, what = "causal retention over the first Tq keys", "causal mask aligned top-left (Tq < Tk)"
    if mask.documents:
        mapping, what = "causal retention within documents", "causal mask within documents (packed sequences)"
        notes.append("each document's first key (read from each call's mask) -> a log-gate of -inf there: a reset")
    if mask.slopes is not None:
        if config.gate != "alibi":
            return keep(f"{mask.slopes.describe()} bias found; RetentionConfig(gate='alibi') maps it to a gate", mask)
        if not causal:
            return keep(f"{mask.slopes.describe()} bias on a non-causal mask: gating is causal only", mask)
        mapping = f"{mapping} with ALiBi gate"
        notes.append(f"{mask.slopes.describe()} -> constant per-head log-gate -m_h")
    if mask.passed_in:
        notes.append(
            f"mask passed in ({', '.join(mask.passed_in)}): each call's valid keys (those some query sees) -> valid, "
            "and the mask checked at run time to be this grid on them"
        )
    elif mask.padding:
        notes.append("key padding -> valid (" + ", ".join(t.node.name for t in mask.padding) + ")")
    if mask.buffers:
        notes.append(f"mask read from module buffers ({', '.join(mask.buffers)}): checked again at run time")
    where = "static shapes" if len(mask.sizes) == 1 and not mask.sizes[0].values else f"{len(mask.sizes)} sizes"
    reason = f"{what} proven by evaluation on the index grid ({where})"
    if mask.passed_in:
        reason = f"{what} read from the mask passed in at the call that compiled the graph, checked at every call"
    return Decision(True, mapping, reason, causal=causal, key_prefix=mask.key_prefix, mask=mask, notes=notes)


def _decide_unmasked(site: AttentionSite, config: RetentionConfig) -> Decision:
    tq, tk = site.q_shape[2], site.k_shape[2]
    if site.is_causal:
        if holds(tq == tk):
            return Decision(True, "causal retention", "is_causal=True with Tq == Tk")
        if holds(tq < tk):
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
    if holds(tq == 1) and config.rewrite_decode:
        return Decision(
            True,
            "decode step (causal, bottom-right)",
            "no mask and Tq == 1: the decode step of a causal model (the new token sees every key)",
        )
    if config.non_causal == "keep":
        return keep("no mask (non-causal) and RetentionConfig(non_causal='keep')")
    kind = "self" if holds(tq == tk) else "cross"
    return Decision(True, "non-causal retention", f"no mask and is_causal=False ({kind}-attention)", causal=False)
