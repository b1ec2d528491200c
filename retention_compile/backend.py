"""The ``retention`` backend: Dynamo FX graph -> attention passes -> Inductor ``compile_fx``.

``torch.compile(model, backend="retention", options={...})`` reaches ``retention_backend`` through the
``torch_dynamo_backends`` entry point (no import needed; without the installed entry point, importing the package
registers it: ``register_by_name``); ``options`` are ``RetentionConfig`` fields.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import ops  # (importing it registers the retention_compile ops)
from .annotate import annotate
from .config import RetentionConfig
from .inspection import compiling
from .logs import log_report
from .passes import rewrite_attention
from .report import Report

_graph_counter = itertools.count()
_collectors: list[Report] = []
PROCESS_REPORT = Report()


@contextlib.contextmanager
def collect_reports() -> Iterator[Report]:
    """Collect the report of every graph the backend compiles inside the ``with`` block, and Dynamo's graph breaks
    there (``Report.graph_breaks``, known when the block ends)."""
    report = Report()
    before = _graph_breaks()
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)
        for reason, count in _graph_breaks().items():
            if count > before.get(reason, 0):
                report.graph_breaks[reason] = count - before.get(reason, 0)


def _graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks so far in this process, by the first line of their reason (its counters)."""
    from torch._dynamo.utils import counters

    found: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        line = str(reason).strip().splitlines()[0] if str(reason).strip() else "(no reason given)"
        found[line] = found.get(line, 0) + count
    return found


def _publish(report: Report, config: RetentionConfig) -> None:
    PROCESS_REPORT.extend(report)
    for collector in _collectors:
        collector.extend(report)
    log_report(report)
    if config.verbose:
        print(report)


@functools.cache
def code_fingerprint() -> str:
    """A hash of the package's Python sources and templates.

    The backend's graphs call the ``retention_compile`` ops, whose bodies (the code Inductor compiles) live in
    this package: Inductor's and AOTAutograd's caches key the graph, not that code, so the fingerprint goes into
    their key (``torch.compiler.config.cache_key_tag``) and an upgraded package never reuses stale compiled code."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in {".py", ".j2"} and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_key_tag() -> contextlib.AbstractContextManager:
    """``torch.compiler.config.cache_key_tag`` extended with ``code_fingerprint()`` while Inductor compiles, and with
    ``ops.TRACED_INFERENCE_IN_ONE_OP``, which decides what the traced graph holds (read while tracing, in no key)."""
    one_op = int(ops.TRACED_INFERENCE_IN_ONE_OP)
    tag = f"{torch.compiler.config.cache_key_tag}retention_compile-{code_fingerprint()}-one-op-{one_op}"
    return torch.compiler.config.patch(cache_key_tag=tag)


def rewrite_graph(gm: fx.GraphModule, options: dict[str, Any] | RetentionConfig | None = None) -> Report:
    """Run the attention passes on ``gm`` in place, add plans and the balance, and publish the report."""
    config = RetentionConfig.from_options(options)
    graph_index = next(_graph_counter)
    report = rewrite_attention(gm, config, graph_index=graph_index)
    annotate(gm, report, config, graph_index)
    _publish(report, config)
    _warn_at_the_recompile_limit(report)
    return report


def _warn_at_the_recompile_limit(report: Report) -> None:
    """Warn where Dynamo compiles a frame for the last time its recompile limit allows and the graph has rewritten
    sites: at the frame's next recompile Dynamo runs it uncompiled, and its attention is softmax attention again,
    with nothing but a log line (unless ``fail_on_recompile_limit_hit``)."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if compile_id is None or compile_id.frame_compile_id is None or limit is None or not report.rewritten:
        return
    if compile_id.frame_compile_id + 1 == limit and not torch._dynamo.config.fail_on_recompile_limit_hit:
        warnings.warn(
            f"retention_compile: Dynamo compiled this code {limit} times, its recompile limit "
            f"(torch._dynamo.config.recompile_limit). At the next recompile it runs the code uncompiled, and its "
            f"{len(report.rewritten)} rewritten attention site(s) become softmax attention again. Mark the varying "
            "sizes dynamic (torch.compile(..., dynamic=True), torch._dynamo.mark_dynamic), raise the limit, or set "
            "torch._dynamo.config.fail_on_recompile_limit_hit = True to make that an error.",
            stacklevel=2,
        )


def retention_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    options: dict[str, Any] | RetentionConfig | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Rewrite attention into power retention, then compile the graph with Inductor."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    report = rewrite_graph(gm, options)
    patches = list_mode_options(mode) if mode else None
    with compiling(report), _cache_key_tag():  # kernels generated and Inductor code written belong to this graph
        return compile_fx(gm, example_inputs, config_patches=patches)


def rewrite_only_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    options: dict[str, Any] | RetentionConfig | None = None,
) -> Callable[..., Any]:
    """The same rewrite, run eagerly without Inductor (used by ``explain``)."""
    rewrite_graph(gm, options)
    return gm.forward


BACKEND_NAME = "retention"


def register_by_name() -> None:
    """Make ``backend="retention"`` resolve when the package is imported without its installed entry point (run from
    a checkout on ``PYTHONPATH``). With the ``torch_dynamo_backends`` entry point installed nothing happens here:
    Dynamo registers the backend from it on first lookup and would refuse a second registration as a duplicate. The
    name is registered directly rather than first looked up in ``torch._dynamo.list_backends()``, which imports every
    one of Dynamo's backend modules (0.17 s on a 2-core CPU) that a lookup of a registered name never needs."""
    from importlib.metadata import entry_points

    import torch._dynamo

    if any(point.name == BACKEND_NAME for point in entry_points(group="torch_dynamo_backends")):
        return
    with contextlib.suppress(AssertionError):  # "duplicate name": registered already (a reload of this module)
        torch._dynamo.register_backend(retention_backend, name=BACKEND_NAME)


register_by_name()
