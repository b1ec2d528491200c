"""FX passes of the backend: find attention sites, decide, rewrite, and report each decision."""

from __future__ import annotations

from torch import fx

from ..config import RetentionConfig
from ..report import Report, SiteRecord
from .decide import Decision, RetentionRewriteError, decide_sdpa
from .rewrite import replace_with_retention
from .sites import AttentionSite, find_sdpa_sites

__all__ = ["Decision", "RetentionRewriteError", "rewrite_attention"]


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
        notes=list(decision.notes),
    )


def rewrite_attention(gm: fx.GraphModule, config: RetentionConfig, graph_index: int = 0) -> Report:
    """Rewrite every attention site of ``gm`` that the config allows; return the per-site report."""
    report = Report(graphs=1)
    for index, site in enumerate(find_sdpa_sites(gm.graph)):
        decision = decide_sdpa(site, config)
        record = _record(graph_index, index, site, decision)
        if not decision.rewrite and config.strict:
            raise RetentionRewriteError(
                f"retention (strict): attention site {index} at {record.location} ({record.module or 'top level'}) "
                f"cannot be rewritten: {decision.reason}. Use strict=False to keep it as SDPA."
            )
        if decision.rewrite:
            replace_with_retention(gm.graph, site, decision, config)
        report.sites.append(record)
    gm.graph.lint()
    gm.recompile()
    return report
