"""The rewrite report: one record per attention site, as a table, Markdown or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

COLUMNS = ("graph", "site", "location", "module", "q", "k", "decision", "becomes", "reason")


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass
class SiteRecord:
    """What happened to one attention site."""

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


@dataclass
class Report:
    """Every site of every graph compiled under one report (a ``torch.compile`` call or ``rc.explain``)."""

    sites: list[SiteRecord] = field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "rewritten"]

    @property
    def kept(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "kept"]

    def extend(self, other: Report) -> None:
        self.sites.extend(other.sites)
        self.graphs += other.graphs

    def summary(self) -> str:
        return (
            f"retention: {len(self.sites)} attention site(s) in {self.graphs} graph(s): "
            f"{len(self.rewritten)} rewritten, {len(self.kept)} kept"
        )

    def __str__(self) -> str:
        rows = [COLUMNS, *(s.row() for s in self.sites)]
        widths = [min(max(len(r[i]) for r in rows), 60 if i == len(COLUMNS) - 1 else 40) for i in range(len(COLUMNS))]
        lines = [self.summary()]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        lines = [f"**{self.summary()}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell(c) for c in s.row()) + " |" for s in self.sites]
        plans = [s for s in self.sites if s.plan]
        if plans:
            lines += ["", "Plans:", ""]
            lines += [f"- graph {s.graph} site {s.site}: {s.plan}" for s in plans]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "sites": [asdict(s) for s in self.sites]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def shape(shape: tuple) -> str:
        return _shape(shape)
