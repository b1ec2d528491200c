"""The rewrite report: one record per attention site, with its plan, and the model's weight-state balance;
as a table (``str``), Markdown or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .balance import Balance

COLUMNS = ("graph", "site", "location", "module", "q", "k", "decision", "becomes", "reason")


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass
class SiteRecord:
    """What happened to one attention site.

    location: ``file:line`` of the call (from the FX node's stack trace); module: the dotted module path.
    mask:     the classification of the site's mask by the mask analysis ("" when there is none to classify).
    plan:     for a rewritten site, the planned ``Plan`` as a dict (chunk size, tiles, reason) plus the device,
              the key length ``T`` it was planned for, ``batch_heads`` and, on a GPU, ``query_launch``: how the
              compiled graph launches the query kernel (``forward.query_launch``).
    """

    graph: int
    site: int
    node: str
    location: str
    module: str
    q_shape: str
    k_shape: str
    v_shape: str
    decision: str  # "rewritten" or "kept"
    becomes: str
    reason: str
    notes: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    mask: str = ""

    @property
    def label(self) -> str:
        """``g0s1``: the site's short name, used in kernel file names."""
        return f"g{self.graph}s{self.site}"

    def row(self) -> tuple[str, ...]:
        return (
            str(self.graph),
            str(self.site),
            self.location.rsplit("/", 1)[-1],
            self.module or "-",
            self.q_shape,
            self.k_shape,
            self.decision,
            self.becomes,
            "; ".join([self.reason, *self.notes]),
        )

    def plan_summary(self) -> str:
        """``chunk 1024, tiles t64 f16 e64, 4 warps x 2 stages on NVIDIA H200`` (or "" without a plan), then, on a GPU,
        how the compiled graph launches the query kernel (``; query kernel: 128 query rows x 4 warps x 3 stages, ...``),
        which can differ from the planned tiles."""
        if not self.plan:
            return ""
        if "chunk_size" not in self.plan:
            return str(self.plan.get("error", self.plan))
        p = self.plan
        chunk = f"chunk {p['chunk_size']} at T={p.get('T', '?')}"
        if p.get("device") == "CPU":
            return f"{chunk} on the CPU (aten chunked form)"
        summary = (
            f"{chunk}, tiles t{p['block_t']} f{p['block_feature']} e{p['block_e']}, "
            f"{p['num_warps']} warps x {p['num_stages']} stages on {p.get('device', '?')}"
        )
        return f"{summary}; query kernel: {p['query_launch']}" if p.get("query_launch") else summary

    def markdown(self) -> list[str]:
        """The site as a Markdown section."""
        lines = [
            f"### graph {self.graph} site {self.site}: {self.module or 'top level'} — {self.decision}",
            "",
            f"- location: `{self.location}`",
            f"- node: `{self.node}`",
            f"- shapes: q {self.q_shape}, k {self.k_shape}, v {self.v_shape}",
            f"- mask: {self.mask or '-'}",
            f"- becomes: {self.becomes}",
            f"- reason: {self.reason}",
        ]
        lines += [f"- note: {note}" for note in self.notes]
        if self.plan:
            lines.append(f"- plan: {self.plan_summary()}")
            if self.plan.get("reason"):
                lines.append(f"  - why: {self.plan['reason']}")
        return [*lines, ""]


@dataclass(eq=False)
class Report:
    """Every site of every graph compiled under one report (a ``torch.compile`` call or ``rc.explain``),
    and each graph's weight-state FLOP balance. Reports compare by identity: each one is a collector.

    graph_breaks: Dynamo's graph breaks while the report collected (``backend.collect_reports``), by the first line
    of their reason: the code between the graphs runs uncompiled, so attention there is never seen, and stays
    softmax attention.
    """

    sites: list[SiteRecord] = field(default_factory=list)
    graphs: int = 0
    balances: list[Balance] = field(default_factory=list)
    graph_breaks: dict[str, int] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "rewritten"]

    @property
    def kept(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "kept"]

    @property
    def balance(self) -> Balance | None:
        """The balance of all graphs as one model (None before any graph was compiled)."""
        return Balance.merge(self.balances)

    @property
    def graph_indices(self) -> list[int]:
        """The indices of the graphs this report covers."""
        return sorted({s.graph for s in self.sites} | {b.graph for b in self.balances})

    def extend(self, other: Report) -> None:
        self.sites.extend(other.sites)
        self.graphs += other.graphs
        self.balances.extend(other.balances)
        for reason, count in other.graph_breaks.items():
            self.graph_breaks[reason] = self.graph_breaks.get(reason, 0) + count

    def summary(self) -> str:
        breaks = sum(self.graph_breaks.values())
        said = (
            f"; {breaks} graph break(s): code between graphs runs uncompiled, and attention there stays softmax"
            if breaks
            else ""
        )
        return (
            f"retention: {len(self.sites)} attention site(s) in {self.graphs} graph(s): "
            f"{len(self.rewritten)} rewritten, {len(self.kept)} kept{said}"
        )

    def __str__(self) -> str:
        rows = [COLUMNS, *(s.row() for s in self.sites)]
        widths = [min(max(len(r[i]) for r in rows), 60 if i == len(COLUMNS) - 1 else 40) for i in range(len(COLUMNS))]
        lines = [self.summary()]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"kept {s.label}: {'; '.join([s.reason, *s.notes])}" for s in self.kept]
        lines += [f"plan {s.label}: {s.plan_summary()}" for s in self.sites if s.plan]
        lines += [f"graph break ({count}x): {reason}" for reason, count in self.graph_breaks.items()]
        if self.balance:
            lines.append(self.balance.summary())
        return "\n".join(lines)

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        lines = [f"**{self.summary()}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell(c) for c in s.row()) + " |" for s in self.sites]
        lines.append("")
        if self.sites:
            lines += ["## Sites", ""]
            for site in self.sites:
                lines += site.markdown()
        if self.graph_breaks:
            lines += ["## Graph breaks", ""]
            lines += [f"- ({count}x) {cell(reason)}" for reason, count in self.graph_breaks.items()] + [""]
        if self.balances:
            lines += ["## Weight-state balance (FLOPs per token)", ""]
            lines += [f"- {b.summary()}" for b in self.balances]
            if self.balance.graph < 0:
                lines.append(f"- {self.balance.summary()}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "graphs": self.graphs,
            "graph_breaks": dict(self.graph_breaks),
            "sites": [asdict(s) for s in self.sites],
            "balances": [b.to_dict() for b in self.balances],
            "balance": self.balance.to_dict() if self.balance else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def shape(shape: tuple) -> str:
        return _shape(shape)
