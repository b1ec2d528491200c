"""Logging of the backend's decisions, through the ``retention_compile`` logger and torch's structured trace.

    TORCH_LOGS="retention_compile"   each site's decision at INFO, in torch's log format, during any
                                     ``torch.compile(..., backend="retention")`` run
    TORCH_LOGS="+retention_compile"  also each site's plan and each graph's weight-state balance (DEBUG)
    TORCH_TRACE=/some/dir            the whole report of each graph as the JSON artifact ``retention_report``
                                     (shown by tlparse next to Dynamo's and Inductor's artifacts)

In a running process, ``torch._logging.set_logs(modules={"retention_compile": logging.INFO})`` does the
same as the environment variable; plain ``logging`` configuration of the logger works too.
"""

from __future__ import annotations

import logging

from torch._logging import trace_structured

from .report import Report

LOGGER_NAME = "retention_compile"
TRACE_ARTIFACT = "retention_report"

log = logging.getLogger(LOGGER_NAME)


def log_report(report: Report) -> None:
    """Log one compiled graph's report: decisions at INFO, plans and balance at DEBUG, the JSON to the trace."""
    for site in report.sites:
        log.info(
            "graph %d site %d at %s [%s]: %s -> %s (%s)",
            site.graph,
            site.site,
            site.location,
            site.module or "top",
            site.decision,
            site.becomes,
            "; ".join([site.reason, *site.notes]),
        )
        if site.plan:
            log.debug(
                "graph %d site %d plan: %s; %s", site.graph, site.site, site.plan_summary(), site.plan.get("reason")
            )
    for balance in report.balances:
        log.debug("%s", balance.summary())
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": TRACE_ARTIFACT, "encoding": "json"},
        payload_fn=report.to_json,
    )
