"""``rc.explain``: what the backend would do to each attention site of a model, without compiling it."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .backend import collect_reports, rewrite_only_backend
from .config import RetentionConfig
from .report import Report


def explain(model: Any, *example_inputs: Any, config: RetentionConfig | dict | None = None, **kwargs: Any) -> Report:
    """Trace ``model(*example_inputs, **kwargs)`` with Dynamo, run the attention passes, and return the
    per-site report (site, location, shapes, decision, reason). The model runs once, under ``no_grad``,
    with the rewritten graph executed eagerly; nothing is compiled by Inductor."""
    backend = functools.partial(rewrite_only_backend, options=RetentionConfig.from_options(config))
    traced = torch.compile(model, backend=backend)
    with collect_reports() as report, torch.no_grad():
        traced(*example_inputs, **kwargs)
    return report
