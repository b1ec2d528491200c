"""The chunked query kernel launched as a programmatic dependent of the wgmma state kernel, its key loops before
its state product (``forward.QUERY_AFTER_STATE_GRID``, ``KernelSpec.states_after_keys``), against the plain order
(state product first, launched after the state kernel's grid), alternated in one process.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, the op's plan, the CUDA state kernel; T in {16384, 65536, 131072},
ungated (gated calls keep the plain order: ``--gated yes`` measures that both settings run the same). Per T,
``--rounds`` rounds of both settings in turn (``alternate.alternated``), each: the whole eager forward and the
device time per kernel (the profiler's; under it the two kernels may not overlap). ``y_rel``: ||y_after -
y_first|| / ||y_first||, rounding noise of the float32 sums in another order (the oracle tests are
tests/gpu/test_forward.py's).

    python benchmarks/bench_query_after_states.py [--lengths 16384 65536 131072] [--rounds 3] [--gated no]
        [--out DIR] [--commit SHA]

Writes ``query_after_states_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import alternate

from retention_compile.codegen import forward


def with_order(after_keys: bool) -> None:
    """Set the query kernel's order (``launch_tunables`` holds the constant: a kept call of the other setting is not
    replayed)."""
    forward.QUERY_AFTER_STATE_GRID = after_keys


if __name__ == "__main__":
    default = forward.QUERY_AFTER_STATE_GRID
    settings = {"states_first": lambda: with_order(False), "after_keys": lambda: with_order(True)}
    alternate.main("query_after_states", __doc__.splitlines()[0], settings, lambda: with_order(default))
