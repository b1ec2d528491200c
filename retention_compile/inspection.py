"""What the backend generated: the report, every generated kernel source and Inductor's output code.

    with rc.inspection.capture() as cap:        # or: python -m retention_compile inspect script.py
        loss = compiled(x).sum(); loss.backward()
    cap.report                                  # the Report of every graph compiled in the block
    cap.kernels                                 # KernelRecord: each Triton / CUDA source the codegen used
    cap.inductor                                # InductorCode: Inductor's output code, forward and backward
    cap.write("out/")                           # report.md, report.json, kernels/, inductor/

The code generators register each source they render or take from their cache with ``record_kernel``;
the backend brackets each graph's Inductor compile with ``compiling(report)`` so that a kernel (and
Inductor's code for the graph, forward and, later, backward) is named after the sites it serves.
Inside ``capture`` Inductor's FX-graph and AOTAutograd caches are off, so every graph is really
compiled (a cache hit would generate no code to show).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import Report, SiteRecord

LANGUAGES = {"triton": ("py", "#"), "cuda": ("cu", "//")}

_compiling: contextvars.ContextVar[Report | None] = contextvars.ContextVar("retention_compiling", default=None)
_KERNELS: dict[tuple[str, str], KernelRecord] = {}
_captures: list[Capture] = []


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _dims(shape: Any) -> str:
    return "x".join(str(s) for s in shape)


@dataclass
class KernelRecord:
    """One generated kernel source and what it was made for.

    meta: what the generator knows (see ``record_kernel``); graph: the graph being compiled when it was
    recorded (None outside a compile); sites: label (``g0s1``) -> "module at file:line: what it became",
    for the sites of that graph whose shapes the kernel serves.
    """

    name: str
    source: str
    language: str
    meta: dict[str, Any]
    graph: int | None = None
    sites: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:12]

    @property
    def file_name(self) -> str:
        """``g0s0+g0s1_<name>_<q dims>_<digest>.py``: the sites, the kernel, the query shape, the content."""
        sites = "+".join(self.sites) or (f"g{self.graph}" if self.graph is not None else "unattributed")
        shape = _dims(self.meta["q_shape"]) if "q_shape" in self.meta else ""
        stem = "_".join(part for part in (sites, _slug(self.name), shape, self.digest) if part)
        return f"{stem}.{LANGUAGES[self.language][0]}"

    def header(self) -> str:
        """A comment block: the kernel, its shapes, its plan, the GPU it was made for, the sites it serves."""
        meta = dict(self.meta)
        lines = [f"retention_compile generated {self.language} kernel: {self.name} (sha256 {self.digest})"]
        shapes = " ".join(f"{k[0]} {tuple(meta.pop(k))}" for k in ("q_shape", "k_shape", "v_shape") if k in meta)
        if shapes:
            lines.append(f"shape: {shapes}")
        plan = _plain(meta.pop("plan", None))
        if isinstance(plan, dict):
            reason = plan.pop("reason", "")
            lines.append("plan: " + " ".join(f"{k}={v}" for k, v in plan.items()))
            if reason:
                lines.append(f"plan reason: {reason}")
        elif plan is not None:
            lines.append(f"plan: {plan}")
        lines.append(f"gpu: {_describe_gpu(meta.pop('gpu', None))}")
        lines += [f"site {label}: {where}" for label, where in self.sites.items()]
        lines += [f"{key}: {_plain(value)}" for key, value in sorted(meta.items())]
        prefix = LANGUAGES[self.language][1]
        return "".join(f"{prefix} {line}\n" for line in lines)

    def text(self) -> str:
        """The file: the header, then the source unchanged (so it compiles standalone as it did in the cache)."""
        return self.header() + self.source

    def summary(self) -> dict[str, Any]:
        """For report.json."""
        return {
            "file": f"kernels/{self.file_name}",
            "name": self.name,
            "language": self.language,
            "graph": self.graph,
            "sites": list(self.sites),
            "meta": {k: _plain(v) for k, v in self.meta.items()},
        }


def _plain(value: Any) -> Any:
    """A JSON-friendly form of meta values (a Plan or GpuSpec dataclass, a dtype, a path)."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _describe_gpu(gpu: Any) -> str:
    """``NVIDIA H200 (cc 9.0, 132 SMs)`` for a ``GpuSpec``; a name or arch string as it is."""
    if gpu is None:
        return "not stated"
    name, cc, sms = (getattr(gpu, a, None) for a in ("name", "compute_capability", "sm_count"))
    if name is None:
        return str(gpu)
    return f"{name} (cc {cc[0]}.{cc[1]}, {sms} SMs)" if cc and sms else str(name)


def _current_gpu() -> Any:
    """The GpuSpec of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    from . import hardware

    return hardware.detect()


def _matching_sites(report: Report | None, meta: Mapping[str, Any]) -> dict[str, str]:
    """The rewritten sites of the graph being compiled whose q (and k, if given) shapes are the kernel's."""
    if report is None or "q_shape" not in meta:
        return {}
    q = Report.shape(tuple(meta["q_shape"]))
    k = Report.shape(tuple(meta["k_shape"])) if "k_shape" in meta else None
    return {
        s.label: f"{s.module or 'top level'} at {s.location}: {s.becomes}"
        for s in report.sites
        if s.decision == "rewritten" and s.q_shape == q and (k is None or s.k_shape == k)
    }


def record_kernel(name: str, source: str, meta: Mapping[str, Any] | None = None, *, language: str = "triton") -> None:
    """Register a generated kernel source (the code generators call this).

    Call it each time a kernel is chosen for a call being compiled or run, from the renderer or from the
    cache alike: an inspection only sees what is recorded while it runs. ``source`` must be the complete
    file as compiled (a Triton source: an importable Python module; a CUDA source: one translation unit);
    a header comment is added to it when written out. ``language``: "triton" or "cuda". ``meta`` keys read
    by the inspection (all optional, others are listed in the header as they are):

        q_shape, k_shape, v_shape   tuples of ints: the shapes the kernel was specialised for (they name the
                                    file and match the kernel to the sites with these shapes)
        plan                        the ``Plan`` (or a dict) it was generated from
        gpu                         the ``GpuSpec`` (or its name / arch string) it was made for; by default
                                    the current CUDA device's (``hardware.detect()``)
        dtype, deg, causal, gated, path (its cache file), ...
    """
    if language not in LANGUAGES:
        raise ValueError(f"record_kernel: language must be one of {sorted(LANGUAGES)}, got {language!r}")
    meta = dict(meta or {})
    if meta.get("gpu") is None:
        meta["gpu"] = _current_gpu()
    report = _compiling.get()
    graph = report.graph_indices[0] if report is not None and report.graph_indices else None
    record = KernelRecord(name, source, language, meta, graph, _matching_sites(report, meta))
    key = (name, record.digest)
    _KERNELS.setdefault(key, record).sites.update(record.sites)
    for cap in _captures:
        cap.add_kernel(record)


def is_recording() -> bool:
    """True while a graph is being compiled by the backend or an inspection capture is open: then every
    kernel choice should be recorded (outside, the first eager call per kernel is enough)."""
    return _compiling.get() is not None or bool(_captures)


def capturing() -> bool:
    """True while an inspection capture is open (``capture``, ``python -m retention_compile inspect``)."""
    return bool(_captures)


def recorded_kernels() -> list[KernelRecord]:
    """Every kernel recorded in this process, first recorded first."""
    return list(_KERNELS.values())


@contextlib.contextmanager
def compiling(report: Report) -> Iterator[None]:
    """Bracket the Inductor compile of the graph that ``report`` describes (the backend calls this)."""
    token = _compiling.set(report)
    try:
        yield
    finally:
        _compiling.reset(token)


@dataclass
class InductorCode:
    """Inductor's output code for one compiled graph (``kind``: forward, backward or inference)."""

    code: str
    kind: str
    inductor_graph: int | None
    graph: int | None
    sites: list[SiteRecord] = field(default_factory=list)

    def file_name(self, taken: set[str]) -> str:
        stem = f"g{self.graph}" if self.graph is not None else f"inductor{self.inductor_graph}"
        name, n = f"{stem}_{self.kind}.py", 1
        while name in taken:
            n += 1
            name = f"{stem}_{self.kind}_{n}.py"
        return name

    def text(self) -> str:
        graph = "an unknown graph" if self.graph is None else f"retention graph {self.graph}"
        lines = [f"Inductor output code ({self.kind}) for {graph} (Inductor graph id {self.inductor_graph})"]
        lines += [f"site {s.label} {s.module or 'top level'} at {s.location}: {s.becomes}" for s in self.sites]
        return "".join(f"# {line}\n" for line in lines) + self.code


def _inductor_kind(graph: Any) -> str:
    if getattr(graph, "is_backward", False):
        return "backward"
    return "inference" if getattr(graph, "is_inference", False) else "forward"


class Capture:
    """What one ``capture()`` block saw: reports, kernels, Inductor code."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.kernels: dict[tuple[str, str], KernelRecord] = {}
        self.inductor: list[InductorCode] = []
        self._graph_of: dict[int, Report] = {}

    def add_kernel(self, record: KernelRecord) -> None:
        self.kernels.setdefault((record.name, record.digest), record).sites.update(record.sites)

    def add_inductor_code(self, code: str) -> None:
        """``GraphLowering.save_output_code``'s hook: file the code under the graph being compiled."""
        from torch._inductor.virtualized import V

        lowering = V.graph  # the GraphLowering being compiled (a null handler outside one)
        inductor_id = getattr(lowering, "graph_id", None)
        report = _compiling.get()
        if report is not None and inductor_id is not None:
            self._graph_of[inductor_id] = report
        report = report or self._graph_of.get(inductor_id)
        graph = report.graph_indices[0] if report is not None and report.graph_indices else None
        sites = list(report.sites) if report is not None else []
        self.inductor.append(InductorCode(code, _inductor_kind(lowering), inductor_id, graph, sites))

    def write(self, out: str | Path, *, title: str = "", code: bool = True) -> dict[str, list[Path]]:
        """Write ``report.md``, ``report.json`` and (with ``code``) ``kernels/`` and ``inductor/`` under ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[Path]] = {"report": [], "kernels": [], "inductor": []}
        if code:
            for kernel in self.kernels.values():
                path = out / "kernels" / kernel.file_name
                path.parent.mkdir(exist_ok=True)
                path.write_text(kernel.text())
                written["kernels"].append(path)
            taken: set[str] = set()
            for item in self.inductor:
                name = item.file_name(taken)
                taken.add(name)
                path = out / "inductor" / name
                path.parent.mkdir(exist_ok=True)
                path.write_text(item.text())
                written["inductor"].append(path)
        data = {
            "title": title,
            **self.report.to_dict(),
            "kernels": [k.summary() for k in self.kernels.values()] if code else [],
            "inductor": [str(p.relative_to(out)) for p in written["inductor"]],
        }
        (out / "report.json").write_text(json.dumps(data, indent=2))
        (out / "report.md").write_text(self._markdown(title, out, written))
        written["report"] = [out / "report.md", out / "report.json"]
        return written

    def _markdown(self, title: str, out: Path, written: dict[str, list[Path]]) -> str:
        lines = [f"# retention_compile report{': ' + title if title else ''}", "", self.report.to_markdown()]
        for key, heading in (("kernels", "Generated kernels"), ("inductor", "Inductor output code")):
            if written[key]:
                lines += [f"## {heading}", ""]
                lines += [f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in written[key]]
                lines.append("")
        return "\n".join(lines)


def _cache_patches() -> contextlib.ExitStack:
    """Inductor's FX-graph cache and AOTAutograd's cache off (where this torch has them)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    stack = contextlib.ExitStack()
    for config, name in ((inductor_config, "fx_graph_cache"), (functorch_config, "enable_autograd_cache")):
        if hasattr(config, name):
            stack.enter_context(config.patch({name: False}))
    return stack


@contextlib.contextmanager
def capture(inductor_code: bool = True) -> Iterator[Capture]:
    """Collect the reports, kernels and (with ``inductor_code``) Inductor output code of the block."""
    from torch._inductor.graph import GraphLowering

    from .backend import collect_reports

    with collect_reports() as report, contextlib.ExitStack() as stack:
        cap = Capture(report)
        _captures.append(cap)
        stack.callback(_captures.remove, cap)
        if inductor_code:
            stack.enter_context(_cache_patches())
            previous = GraphLowering.save_output_code

            def save_output_code(code: str) -> None:
                cap.add_inductor_code(code)
                if previous is not None:
                    previous(code)

            GraphLowering.save_output_code = save_output_code
            stack.callback(setattr, GraphLowering, "save_output_code", previous)
        yield cap
