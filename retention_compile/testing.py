"""Check a model's rewrite against the oracle: ``check_model``, ``check_script``, and the oracles they use.

``check_model(model, *inputs, **kwargs)`` runs three things and compares them:

1. the model compiled with the ``retention`` backend (Inductor), forward and a backward of a fixed random
   linear loss: the outputs and gradients under test;
2. the same graphs rewritten but run eagerly, with a tap after every rewritten site recording the op's
   output and the site's *original* inputs: the per-site error of the op against the oracle on the same
   inputs (this names the site when something is wrong);
3. the model run eagerly with every attention call replaced by the float64 oracle under the decision the
   backend took for that site (found by module path and source line): the reference outputs and gradients.

The oracle reads each call's mask as it is at run time, *not* as the mask analysis read it:

    SDPA, bool mask   w_ij = (s q.k)^p [mask_ij]
    SDPA, float mask  w_ij = (s q.k)^p exp(b_ij - max_j' b_ij') on entries above ``MASKED_BELOW`` (an ALiBi
                      bias gives exactly its gate's ``exp(-m (i - j))``; -inf/finfo.min entries give 0)
    no mask           causal for ``is_causal`` (over the first Tq keys if Tq < Tk), decode for Tq == 1,
                      non-causal otherwise
    softmax(scores)   of hand-written attention: ``scores^p`` on unmasked entries, normalised (+ eps)
    y_i = sum_j w_ij v_j / (sum_j w_ij + eps)

so a mask the analysis misread shows up as a disagreement. Only the sliding-window policy changes a mask on
purpose (``sliding_window='full'`` drops the window): for such sites the oracle keeps the mask's keys with the
causal grid. Kept sites run the original attention.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

from .backend import collect_reports, rewrite_graph
from .config import RetentionConfig
from .passes import rewrite_attention
from .passes.grids import MASKED_BELOW, causal_grid
from .passes.sites import AttentionSite
from .reference import EPS, default_scale, expand_kv_heads, power_retention_reference
from .report import Report, SiteRecord

_sdpa = F.scaled_dot_product_attention
_softmaxes = {"functional": F.softmax, "torch": torch.softmax, "method": torch.Tensor.softmax}
_multihead = F.multi_head_attention_forward
WINDOW = "sliding window"
MULTIHEAD = "multihead attention"  # the note of a site lowered from nn.MultiheadAttention


class ModelCheckError(AssertionError):
    """The compiled model disagrees with the oracle (the message names the site when one does)."""


# ------------------------------------------------------------------------------------------------- oracles


def _masked_retention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, deg: int, factor
) -> torch.Tensor:
    """``y = sum_j w v / (sum_j w + eps)`` with ``w = (s q.k)^p * factor`` in float64."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), expand_kv_heads(k.double(), group), expand_kv_heads(v.double(), group)
    weights = (scale * (qd @ kd.transpose(-1, -2))) ** deg * factor
    return ((weights @ vd) / (weights.sum(-1, keepdim=True) + EPS)).to(q.dtype)


def _mask_factor(mask: torch.Tensor, window_dropped: bool) -> torch.Tensor:
    """The weight factor of an SDPA mask (see the module docstring), (B|1, H|1, Tq, Tk) float64."""
    mask = mask.detach()
    while mask.dim() < 4:
        mask = mask[None]
    admitted = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
    if window_dropped:
        if mask.dtype != torch.bool:
            raise NotImplementedError("oracle: a dropped sliding window on a float mask")
        q_len, kv_len = mask.shape[-2:]
        keys = admitted.expand(admitted.shape[0], -1, -1, -1).any(1).any(1)  # (B, Tk): keys anyone may see
        return (causal_grid(q_len, kv_len, mask.device) & keys[:, None, None, :]).double()
    if mask.dtype == torch.bool:
        return mask.double()
    bias = mask.double().masked_fill(~admitted, -math.inf)
    top = bias.amax(-1, keepdim=True)
    return torch.where(admitted, torch.exp(bias - top.masked_fill(top == -math.inf, 0.0)), 0.0)


def oracle_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    deg: int = 2,
    window_dropped: bool = False,
) -> torch.Tensor:
    """SDPA's signature with power retention's meaning, computed in float64 (see the module docstring).
    Dropout is ignored, as the backend ignores it."""
    s = default_scale(query.shape[-1], scale)
    if attn_mask is not None:
        return _masked_retention(query, key, value, s, deg, _mask_factor(attn_mask, window_dropped))
    tq, tk = query.shape[-2], key.shape[-2]
    if is_causal and tq > tk:
        return _sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    if is_causal and tq < tk:
        key, value = key[:, :, :tq], value[:, :, :tq]
    causal = bool(is_causal) or tq == 1
    y = power_retention_reference(query.double(), key.double(), value.double(), scale=s, deg=deg, causal=causal)
    return y.to(query.dtype)


def oracle_softmax(scores: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None, *, deg: int = 2):
    """Hand-written attention's ``softmax(scores)`` with retention's weights: ``scores^p`` on the entries not
    masked (``> MASKED_BELOW``), over their sum + eps; so ``oracle_softmax(s q k^T + mask) @ v`` is retention."""
    if dim not in (-1, scores.dim() - 1):
        raise NotImplementedError("oracle_softmax: attention normalises over the last axis")
    x = scores.double()
    weights = torch.where(x > MASKED_BELOW, x**deg, 0.0)
    return (weights / (weights.sum(-1, keepdim=True) + EPS)).to(dtype or scores.dtype)


def single_key_gradient_floor(grad_y: torch.Tensor) -> float:
    """The least reference norm a dq or dk comparison divides by where a row may see only one key: 1e-2 |dy|.

    A row with a single key j has y = v_j w / (w + eps), so its dq and dk are O(eps / w): rounding residue that
    the kernels read off ``dy . (v - y)`` cannot resolve. Dividing by max(|reference|, this floor) keeps the
    bound relative where the gradient is real and makes it absolute (tol x 1e-2 |dy|) where it is residue."""
    return 1e-2 * float(grad_y.double().norm())


@contextlib.contextmanager
def nan_filled_empty() -> Iterator[None]:
    """Within the block every float ``torch.empty`` comes back filled with NaN: an element a kernel reads or returns
    before anything wrote it shows up as NaN (a fresh allocation is often zeros, which would hide it)."""
    real_empty = torch.empty

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    with mock.patch.object(torch, "empty", poisoned):
        yield


@contextlib.contextmanager
def oracle_attention(deg: int = 2) -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is ``oracle_sdpa`` (float64 oracle) for every
    call: the meaning the backend gives a model whose sites are all rewritten."""

    def patched(*args, **kwargs):
        return oracle_sdpa(*args, deg=deg, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", patched):
        yield


# ------------------------------------------------------------------------------------------- site matching


class _Sites:
    """The backend's decisions, looked up by (module path, source line) of an eager call."""

    def __init__(self, report: Report) -> None:
        self.latest: dict[tuple[str, str], SiteRecord] = {}
        for record in report.sites:
            self.latest[(record.module, record.location)] = record
        self.calls: dict[tuple[str, str], int] = {}

    def find(self, module: str, location: str) -> SiteRecord | None:
        record = self.latest.get((module, location))
        if record is None:  # a site lowered from nn.MultiheadAttention: SDPA runs inside PyTorch's code
            lowered = [r for (m, _), r in self.latest.items() if m == module and MULTIHEAD in r.notes]
            record = lowered[0] if len(lowered) == 1 else None
        if record is not None:
            key = (record.module, record.location)
            self.calls[key] = self.calls.get(key, 0) + 1
        return record


class _ModuleStack:
    """The dotted path of the innermost module of ``model`` running now (global forward hooks)."""

    def __init__(self, model: Any) -> None:
        modules = model.named_modules() if isinstance(model, torch.nn.Module) else []
        self.names = {id(m): name for name, m in modules}
        self.stack: list[str] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def enter(module, _args):
            self.stack.append(self.names.get(id(module)))

        def leave(module, _args, _out):
            self.stack.pop()

        handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def current(self) -> str:
        return next((name for name in reversed(self.stack) if name is not None), "")


def _caller() -> str:
    """``file:line`` of the code that called the patched function."""
    frame = sys._getframe(2)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


@contextlib.contextmanager
def _oracle_model(model: Any, sites: _Sites, deg: int) -> Iterator[None]:
    """Every attention call of ``model`` answered by the oracle under its site's decision."""
    stack = _ModuleStack(model)

    def sdpa(*args, **kwargs):
        record = sites.find(stack.current(), _caller())
        if record is None or record.decision != "rewritten":
            return _sdpa(*args, **kwargs)
        return oracle_sdpa(*args, deg=deg, window_dropped=record.mask.startswith(WINDOW), **kwargs)

    def softmax(kind: str):
        def patched(*args, **kwargs):
            record = sites.find(stack.current(), _caller())
            if record is None or record.decision != "rewritten":
                return _softmaxes[kind](*args, **kwargs)
            if "ALiBi" in record.mask:
                raise NotImplementedError("check_model: hand-written attention with an ALiBi bias")
            return oracle_softmax(*args, deg=deg, **kwargs)

        return patched

    def multihead(*args, **kwargs):
        # The weights of a rewritten site are unused; without them PyTorch calls SDPA (patched above). The
        # is_causal hint only replaces the mask when no weights are needed, so keep the mask's meaning.
        if kwargs.get("need_weights", True):
            kwargs.update(need_weights=False, is_causal=False)
        return _multihead(*args, **kwargs)

    with contextlib.ExitStack() as patches, stack.active():
        patches.enter_context(mock.patch.object(F, "scaled_dot_product_attention", sdpa))
        patches.enter_context(mock.patch.object(F, "softmax", softmax("functional")))
        patches.enter_context(mock.patch.object(torch, "softmax", softmax("torch")))
        patches.enter_context(mock.patch.object(torch.Tensor, "softmax", softmax("method")))
        patches.enter_context(mock.patch.object(F, "multi_head_attention_forward", multihead))
        yield


# ------------------------------------------------------------------------------------------------- taps


_TAPS: list[tuple[int, torch.Tensor, list[Any]]] = []


def _tap(slot: int, output: torch.Tensor, *inputs: Any) -> torch.Tensor:
    """Identity on ``output``; records it with the site's original inputs."""
    _TAPS.append((slot, output.detach(), [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]))
    return output


def _tap_inputs(site: AttentionSite) -> dict[str, Any]:
    """The original inputs of a site, as the oracle takes them."""
    if site.kind == "hand-written":
        return {"scores": site.scores, "value": site.value}
    return {
        "query": site.query,
        "key": site.key,
        "value": site.value,
        "attn_mask": site.attn_mask,
        "is_causal": site.is_causal,
        "scale": site.scale if not site.scale_factors else site.scale_factors[0][0],
        "enable_gqa": site.enable_gqa,
    }


def _tapping_backend(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, config: RetentionConfig, sites: list, publish: bool
) -> Callable[..., Any]:
    """Rewrite (published like the backend's when ``publish``), tap the output of every rewritten site, and
    run the graph eagerly (no Inductor)."""
    report = rewrite_graph(gm, config) if publish else rewrite_attention(gm, config, graph_index=-1)
    for node in list(gm.graph.nodes):
        site = node.meta.get("retention_site")
        if site is None:
            continue
        names = _tap_inputs(site)
        sites.append((report.sites[node.meta["retention_index"]], site, list(names)))
        with gm.graph.inserting_after(node):
            tapped = gm.graph.call_function(_tap, (len(sites) - 1, node, *names.values()))
        node.replace_all_uses_with(tapped, delete_user_cb=lambda user, tap=tapped: user is not tap)
    gm.recompile()
    return gm.forward


def _site_error(record: SiteRecord, site: AttentionSite, names: list[str], output, inputs, deg: int) -> float:
    """Max |op - oracle| of one tapped call, relative to the oracle's largest magnitude (at least 1)."""
    given = dict(zip(names, inputs))
    if site.kind == "hand-written":  # 3-D scores (B H, Tq, Tk) read as (B, H, Tq, Tk); a folded output is (B H, Tq, e)
        weights, value = oracle_softmax(given["scores"], deg=deg).double(), given["value"].double()
        weights = weights.unflatten(0, value.shape[:2]) if weights.dim() == 3 else weights
        expected = (weights @ value).flatten(0, 1) if site.folded else weights @ value
    else:
        scale = given.pop("scale")
        expected = oracle_sdpa(
            **given,
            scale=float(scale) if scale is not None else None,
            deg=deg,
            window_dropped=record.mask.startswith(WINDOW),
        ).double()
    return float((output.double() - expected).abs().max() / expected.abs().max().clamp(min=1.0))


# ------------------------------------------------------------------------------------------------- check


@dataclass
class SiteCheck:
    """One site: its record, how many eager calls the oracle answered for it, the tapped op error."""

    record: SiteRecord
    calls: int = 0
    error: float | None = None

    def row(self) -> tuple[str, ...]:
        r = self.record
        error = "-" if self.error is None else f"{self.error:.1e}"
        where = r.location.rsplit("/", 1)[-1]
        return (r.label, r.module or "-", where, r.decision, r.becomes, str(self.calls), error)


@dataclass
class ModelCheck:
    """The result of ``check_model``: per site, and for the outputs and gradients of each call; the graph
    breaks Dynamo made in the first call (Dynamo's counters: the backend runs after the graphs are cut, so
    any break is the model's own)."""

    report: Report
    sites: list[SiteCheck] = field(default_factory=list)
    output_error: float = 0.0
    grad_error: float = 0.0
    failures: list[str] = field(default_factory=list)
    graph_breaks: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        header = ("site", "module", "location", "decision", "becomes", "oracle calls", "site error")
        rows = [header, *(s.row() for s in self.sites)]
        widths = [min(max(len(r[i]) for r in rows), 44) for i in range(len(header))]
        lines = ["  ".join(c[:w].ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"outputs: max error {self.output_error:.2e}; gradients: relative error {self.grad_error:.2e}; "
            f"graph breaks: {self.graph_breaks}"
        )
        lines += [f"FAILED: {f}" for f in self.failures]
        return "\n".join(lines)


def _refuse_dropout(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        return
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"check_model: {name} is a dropout with p={module.p} in training mode, so outputs are random; "
                "compare with model.eval() or dropout 0"
            )


def _leaves(output: Any, select: Callable[[Any], Any] | None) -> list[torch.Tensor]:
    picked = select(output) if select is not None else output
    leaves = [x for x in pytree.tree_leaves(picked) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not leaves:
        raise ValueError("check_model: the model's output has no floating-point tensor to compare")
    return leaves


def _row_mask(leaf: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """1.0 where ``leaf`` is compared: rows (B, T) broadcast over the trailing axes of a (B, T, ...) leaf."""
    if rows is None or tuple(leaf.shape[: rows.dim()]) != tuple(rows.shape):
        return torch.ones((), dtype=leaf.dtype, device=leaf.device)
    return rows.to(leaf.dtype).reshape(*rows.shape, *([1] * (leaf.dim() - rows.dim())))


def _loss_weights(leaves: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x) for x in leaves]


def _differentiable(model: Any, inputs: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    params = list(model.named_parameters()) if isinstance(model, torch.nn.Module) else []
    found = [(n, p) for n, p in params if p.requires_grad]
    found += [(f"input {i}", x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    return found


def _forward_backward(fn, args, kwargs, select, rows, seed, wrt) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The selected outputs, and the gradients of ``sum(out * w * rows)`` for fixed random ``w``."""
    leaves = _leaves(fn(*args, **kwargs), select)
    weights = _loss_weights(leaves, seed)
    if not wrt:
        return [x.detach() for x in leaves], []
    loss = sum((x * w * _row_mask(x, rows)).sum() for x, w in zip(leaves, weights))
    grads = torch.autograd.grad(loss, [t for _, t in wrt], allow_unused=True)
    return [x.detach() for x in leaves], [g if g is not None else torch.zeros_like(t) for g, (_, t) in zip(grads, wrt)]


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, tol: float, relative: bool):
    """(error, failure message or None) over the compared entries: elementwise ``|got - expected|`` against
    ``tol (1 + |expected|)``, or with ``relative`` the largest ``|got - expected|`` over ``max |expected|``
    (gradients: a sum of many products, compared to their scale)."""
    keep = mask.expand_as(expected) > 0 if mask.dim() else torch.ones_like(expected, dtype=torch.bool)
    diff, ref = (got.double() - expected.double()).abs()[keep], expected.double().abs()[keep]
    if diff.numel() == 0:
        return 0.0, None
    if torch.isnan(diff).any():
        return math.inf, f"{name}: NaN where the oracle has {'NaN' if torch.isnan(ref).any() else 'numbers'}"
    if relative:
        error = float(diff.max() / ref.max().clamp(min=1e-30))
        return error, (f"{name}: relative error {error:.3e} > {tol}" if error > tol else None)
    error = float((diff / (1 + ref)).max())
    return error, (
        f"{name}: max error {float(diff.max()):.3e} (tolerance {tol} (1 + |oracle|))" if error > tol else None
    )


def _tapped_errors(sites: list, deg: int) -> dict[tuple[str, str], float]:
    """Per site (module, location): the largest error of the op against the oracle on the site's own inputs,
    over the calls tapped since the last ``_TAPS.clear()``."""
    errors: dict[tuple[str, str], float] = {}
    for slot, output, inputs in _TAPS:
        record, site, names = sites[slot]
        key = (record.module, record.location)
        errors[key] = max(errors.get(key, 0.0), _site_error(record, site, names, output, inputs, deg))
    _TAPS.clear()
    return errors


def check_model(
    model: Any,
    *inputs: Any,
    options: dict[str, Any] | RetentionConfig | None = None,
    more: Sequence[tuple] = (),
    rows: torch.Tensor | None = None,
    select: Callable[[Any], Any] | None = None,
    grad: bool = True,
    tol: float = 1e-5,
    grad_tol: float = 1e-3,
    dynamic: bool | None = None,
    inductor: bool = True,
    quiet: bool = False,
    **kwargs: Any,
) -> ModelCheck:
    """Compile ``model`` with the ``retention`` backend and check it against the oracle (module docstring).

    ``model(*inputs, **kwargs)`` is the call checked; ``more`` holds further calls ``(args, kwargs[, rows])``
    run on the same compiled model, outputs only (another sequence length: Dynamo recompiles with dynamic
    shapes). ``rows`` (B, T) bool restricts the comparison of (B, T, ...) outputs to those rows (padded query
    rows a model ignores); ``select`` picks the outputs to compare (default: every floating-point tensor of
    the output). With ``grad`` the gradients of a fixed random linear loss of the outputs are compared too,
    for every parameter and every input that requires grad.

    Outputs agree when ``|got - oracle| <= tol (1 + |oracle|)`` entry by entry, a site when its op output is
    within ``tol max(1, max |oracle|)`` of the oracle on the same inputs, gradients when
    ``max |got - oracle| <= grad_tol max |oracle|`` (a float32 backward through power weights against the
    float64 oracle: rows whose weights sum to little next to eps amplify rounding, up to ~1e-4 relative in
    small random models, hence 1e-3; a wrong mask or scale is off by O(1)).

    Dynamo's caches are reset first. ``inductor=False`` runs the rewritten graphs eagerly instead of compiling
    them with Inductor (the same rewrite; seconds instead of minutes on a CPU). Raises ``ModelCheckError``
    naming the offending site (or the outputs) on a disagreement; prints the per-site table unless ``quiet``.
    """
    config = RetentionConfig.from_options(options)
    _refuse_dropout(model)
    torch._dynamo.reset()
    counters.clear()
    _TAPS.clear()
    tap_sites: list = []
    tapping = functools.partial(_tapping_backend, config=config, sites=tap_sites, publish=not inductor)
    tapped = torch.compile(model, backend=tapping, dynamic=dynamic)
    compiled = (
        torch.compile(model, backend="retention", options={"config": config}, dynamic=dynamic) if inductor else tapped
    )
    report = Report()
    check = ModelCheck(report)
    site_errors: dict[tuple[str, str], float] = {}
    calls = [(inputs, kwargs, rows, grad), *((c[0], c[1], c[2] if len(c) > 2 else None, False) for c in more)]
    for number, (args, call_kwargs, rows, call_grad) in enumerate(calls):
        wrt = _differentiable(model, args) if call_grad else []
        with collect_reports() as compiled_report, torch.set_grad_enabled(call_grad):
            got, got_grads = _forward_backward(compiled, args, call_kwargs, select, rows, number, wrt)
        report.extend(compiled_report)
        if number == 0:
            check.graph_breaks = sum(counters["graph_break"].values())
        if inductor:  # the rewritten graphs once more, eagerly, for the taps
            with torch.no_grad():
                tapped(*args, **call_kwargs)
        sites = _Sites(report)
        for key, error in _tapped_errors(tap_sites, config.deg).items():
            site_errors[key] = max(site_errors.get(key, 0.0), error)
        with _oracle_model(model, sites, config.deg), torch.set_grad_enabled(call_grad):
            expected, expected_grads = _forward_backward(model, args, call_kwargs, select, rows, number, wrt)
        _check_call(check, number, (got, expected, rows, tol), (got_grads, expected_grads, wrt, grad_tol))
        _check_sites(check, sites, site_errors, tol)
    if not quiet:
        print(report.summary())
        print(check.table())
    if not check.ok:
        raise ModelCheckError("; ".join(check.failures) + "\n" + check.table())
    return check


def _check_call(check: ModelCheck, number: int, outputs: tuple, gradients: tuple) -> None:
    got, expected, rows, tol = outputs
    for index, (g, e) in enumerate(zip(got, expected)):
        error, failure = _compare(f"call {number} output {index}", g, e, _row_mask(e, rows), tol, relative=False)
        check.output_error = max(check.output_error, error)
        check.failures += [failure] if failure else []
    got, expected, wrt, tol = gradients
    for (name, _), g, e in zip(wrt, got, expected):
        error, failure = _compare(f"call {number} gradient of {name}", g, e, torch.ones(()), tol, relative=True)
        check.grad_error = max(check.grad_error, error)
        check.failures += [failure] if failure else []


def _check_sites(check: ModelCheck, sites: _Sites, errors: dict[tuple[str, str], float], tol: float) -> None:
    """The per-site rows (latest record per site); the first disagreeing or unreached site is the culprit."""
    check.sites = [SiteCheck(r, sites.calls.get(k, 0), errors.get(k)) for k, r in sites.latest.items()]
    culprits = []
    for site in check.sites:
        r = site.record
        where = f"site {r.label} ({r.module or 'top level'} at {r.location}, {r.becomes})"
        if r.decision == "rewritten" and site.calls == 0:
            culprits.append(f"{where} was never reached by the eager oracle")
        elif site.error is not None and site.error > tol:
            culprits.append(f"{where} disagrees with the oracle on its own inputs: error {site.error:.2e}")
    check.failures[:0] = [c for c in culprits if c not in check.failures]


# ------------------------------------------------------------------------------------------------- scripts


class _CheckedOnFirstCall:
    """What ``torch.compile(model, backend="retention")`` returns under ``check_script``: the compiled model,
    checked with ``check_model`` on its first call."""

    def __init__(self, model: Any, compiled: Any, options: Any, dynamic: bool | None, log: list) -> None:
        self._model, self._compiled, self._options, self._dynamic, self._log = model, compiled, options, dynamic, log
        self._checked = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._checked:
            self._checked = True
            options, dynamic = self._options, self._dynamic
            self._log.append(check_model(self._model, *args, options=options, dynamic=dynamic, **kwargs))
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


def check_script(path: str, argv: list[str]) -> int:
    """Run a script (``python -m retention_compile check SCRIPT.py -- ARGS``) with every model it compiles
    with ``backend="retention"`` checked by ``check_model`` on its first call. Returns the exit status: the
    script's (1 when a check failed, with the table), 2 when nothing was compiled with the backend."""
    from .__main__ import run_target
    from .backend import retention_backend

    compile_ = torch.compile
    log: list = []

    def compile_and_check(model: Any = None, **options: Any) -> Any:
        if model is None:
            return lambda fn: compile_and_check(fn, **options)
        compiled = compile_(model, **options)
        if options.get("backend") not in ("retention", retention_backend):
            return compiled
        return _CheckedOnFirstCall(model, compiled, options.get("options"), options.get("dynamic"), log)

    with mock.patch.object(torch, "compile", compile_and_check):
        status = run_target(path, argv)
    if not log:
        print(f"check: {path} compiled nothing with backend='retention'", file=sys.stderr)
        return status or 2
    print(f"check: {len(log)} model(s) checked, {'all agree' if status == 0 else 'see above'}")
    return status


def interpreted_fixture(script: str, timeout: int) -> Callable:
    """A module-scoped pytest fixture ``interpreted`` for the test module ``script``: its ``interpreted_results`` in a
    fresh kernel cache, run once for the module's tests (``timeout``: seconds, to catch a hang)."""
    import pytest

    @pytest.fixture(scope="module")
    def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
        return interpreted_results(script, tmp_path_factory.mktemp("cache"), timeout)

    return interpreted


def interpreted_results(script: str, cache: Path, timeout: int) -> dict:
    """The JSON that the test module ``script``, run as ``__main__`` (``run_interpreted_script``), prints last: with
    ``TRITON_INTERPRET=1`` (which must be set before triton is first imported, so kernel cases run in a subprocess),
    ``XDG_CACHE_HOME`` at ``cache`` and this checkout importable. A failing script fails with the tail of its
    stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "XDG_CACHE_HOME": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    runner = f"from {__name__} import run_interpreted_script; run_interpreted_script({script!r})"
    done = subprocess.run(
        [sys.executable, "-c", runner], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_interpreted_script(script: str) -> None:
    """Run the test module ``script`` as ``__main__`` in this process (started with ``TRITON_INTERPRET=1``), with the
    interpreter's integer-overflow checks off.

    The interpreter checks every 32-bit integer add, subtract and multiply for overflow (casts to 64 bits, two
    comparisons and an assert per operation); a compiled kernel asserts that only with ``debug=True``. The
    interpreted cases' shapes are tiny, and their indices stay orders of magnitude below 2^31, so the checks found
    nothing there, yet they took a third of the time: ``tests/test_triton_backward.py``'s cases ran in 140 s with
    them and 91 s without (2-core CPU, triton 3.9, 2026-12-08). The kernels are still compared with the oracle."""
    import runpy

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    if hasattr(builder.options, "sanitize_overflow"):
        builder.options = replace(builder.options, sanitize_overflow=False)
    sys.path.insert(0, str(Path(script).resolve().parent))  # as ``python script`` would: its folder first
    runpy.run_path(script, run_name="__main__")
