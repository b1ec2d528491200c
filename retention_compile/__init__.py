"""retention_compile: a ``torch.compile`` backend that turns attention into power retention.

torch.compile(model, backend="retention")              # entry point, no import needed
rc.power_retention(q, k, v, *, scale=None, deg=2, log_gate=None, causal=True, valid=None, chunk_size=None)
rc.explain(model, *example_inputs) -> Report
"""

# decode and codegen's CUDA modules: imported for the custom ops they register. Every op a compiled graph may call is
# registered at import, as a graph that Inductor loads from its cache in a fresh process calls them without tracing the
# bodies whose modules would have registered them (session 68: a cached backward raised "no attribute
# 'cuda_reverse_states'").
from . import decode, hardware  # noqa: F401
from .backend import PROCESS_REPORT, retention_backend
from .checks import RetentionInputError
from .codegen import cuda_query, cuda_reverse, cuda_state, cuda_state_terms  # noqa: F401
from .config import RetentionConfig
from .explain import explain
from .ops import power_retention
from .passes import RetentionRewriteError
from .planning import Plan, plan
from .reference import power_retention_reference
from .report import Report

__all__ = [
    "PROCESS_REPORT",
    "Plan",
    "Report",
    "RetentionConfig",
    "RetentionInputError",
    "RetentionRewriteError",
    "explain",
    "hardware",
    "plan",
    "power_retention",
    "power_retention_reference",
    "retention_backend",
]
