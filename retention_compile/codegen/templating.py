"""The Jinja environment every code template (Triton modules, CUDA sources) is rendered with."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2


@functools.cache
def environment(directory: Path) -> jinja2.Environment:
    """Templates of ``directory``: an undefined name is an error (never an empty string in generated code), the
    trailing newline is kept, nothing is escaped (the output is code, not HTML)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
