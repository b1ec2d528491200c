"""FX passes of the backend: find attention sites, prove masks, decide, rewrite, and report each decision.

multihead  lower ``nn.MultiheadAttention``'s opaque call to an SDPA call (or report why not)
flex       ``flex_attention``'s op read as an SDPA call whose mask is its mask_mod
sites      SDPA calls, their arguments by name
patterns   hand-written softmax attention; repeated kv heads (folded into GQA)
masks      what a mask means (index terms evaluated, padding, ALiBi), on ``grids`` and ``fxutils``
decide     the policy of DESIGN.md section 2
rewrite    the op inserted in place of the site
"""

from __future__ import annotations

import functools

from torch import fx

from ..bodies import body_callers, body_inputs, graph_modules, pass_into
from ..config import RetentionConfig
from ..report import Report, SiteRecord
from .decide import Decision, RetentionRewriteError, decide
from .encoder_layer import lower_encoder_layers
from .flex import FlexLowering, is_flex
from .masks import MaskAnalyser
from .multihead import lower_multihead
from .patterns import find_handwritten
from .rewrite import replace_with_retention
from .sites import AttentionSite, find_sdpa_sites

__all__ = ["AttentionSite", "Decision", "RetentionRewriteError", "find_sites", "graph_modules", "rewrite_attention"]


def _record(graph_index: int, index: int, site: AttentionSite, decision: Decision) -> SiteRecord:
    return SiteRecord(
        graph=graph_index,
        site=index,
        node=site.node.name,
        location=site.location,
        module=site.module_path,
        q_shape=Report.shape(site.q_shape),
        k_shape=Report.shape(site.k_shape),
        v_shape=Report.shape(site.v_shape),
        decision="rewritten" if decision.rewrite else "kept",
        becomes=decision.mapping,
        reason=decision.reason,
        notes=[f"{site.kind} attention", *decision.notes] if site.kind != "sdpa" else list(decision.notes),
        mask=decision.mask.summary() if decision.mask is not None else "",
    )


def _remove(graph: fx.Graph, inserted: list[fx.Node], unused_only: bool) -> None:
    """Erase the nodes inserted to read a site, last first: all of them, or those still in the graph with no user and
    no side effect (the run-time checks stay)."""
    present = set(graph.nodes)
    for node in reversed(inserted):
        if node in present and (not unused_only or (not node.users and not node.is_impure())):
            graph.erase_node(node)


def find_sites(gm: fx.GraphModule, analyser: MaskAnalyser) -> list[AttentionSite]:
    """Every attention site of the graph in graph order (``nn.TransformerEncoderLayer``'s fast path and
    ``nn.MultiheadAttention`` calls lowered first)."""
    kept = lower_encoder_layers(gm.graph) + lower_multihead(gm.graph)
    flex = [FlexLowering(gm, node) for node in gm.graph.nodes if is_flex(node)]
    read = [lowering.kept() if lowering.reason else lowering.lower() for lowering in flex]
    sites = kept + find_sdpa_sites(gm.graph, skip=[s.node for s in read]) + read
    sites += list(find_handwritten(gm.graph, analyser.evaluator))
    order = {node: position for position, node in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda site: order[site.node])


def rewrite_attention(gm: fx.GraphModule, config: RetentionConfig, graph_index: int = 0) -> Report:
    """Rewrite every attention site of ``gm`` and of its higher-order ops' bodies (``graph_modules``) that the config
    allows; return the per-site report, the sites of ``gm`` first, then each body's.

    Every site is decided on the untouched graphs, then the rewritten ones are replaced last to first: a
    site never reads a node created after it, so none of its nodes is replaced before it is rewritten.
    """
    modules, links = graph_modules(gm), body_inputs(gm)
    found: list[tuple[fx.GraphModule, MaskAnalyser, AttentionSite]] = []
    for module in modules:
        analyser = MaskAnalyser(module, in_body=module is not gm, links=links)
        found += [(module, analyser, site) for site in find_sites(module, analyser)]
    sites = [site for _, _, site in found]
    decisions = [decide(site, config, analyser) for _, analyser, site in found]
    records = [_record(graph_index, index, s, d) for index, (s, d) in enumerate(zip(sites, decisions))]
    for record, decision in zip(records, decisions):
        if not decision.rewrite and config.strict:
            raise RetentionRewriteError(
                f"retention (strict): attention site {record.site} at {record.location} "
                f"({record.module or 'top level'}) cannot be rewritten: {decision.reason}. "
                "Use strict=False to keep it as SDPA."
            )
    callers = body_callers(gm)
    for index in reversed(range(len(found))):
        module, _, site = found[index]
        if decisions[index].rewrite:
            bring = functools.partial(pass_into, body=module, callers=callers)
            output = replace_with_retention(module.graph, site, decisions[index], config, bring)
            output.meta.update(retention_site=site, retention_index=index)
            _remove(module.graph, site.inserted, unused_only=True)  # what only the site's reading used
        else:  # an op read through inserted nodes stays as it was
            _remove(module.graph, site.inserted, unused_only=False)
    for module in modules:
        module.graph.lint()
        module.recompile()
    return Report(sites=records, graphs=1)
