"""The query kernel launched beside the wgmma state kernel (``forward.QUERY_BESIDE_STATES``: a programmatic
dependent launch whose programs wait per chunk on the fold's counts) against the launch after it, alternated in one
process.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, the op's plan, the CUDA state kernel; T in ``--lengths``, ungated and
gated. Per (T, gated), ``--rounds`` rounds of both settings in turn (``alternate.alternated``), each: the whole eager
forward (``do_bench``'s median, and the median of calls queued back to back) and the device time per kernel (the
profiler's kernel times overlap where the launches do: their sum is not the forward's time); the summary counts the
rounds each setting won (the H200's clock under its power cap moves a run by a few percent). Also per (T, gated):
``y_rel``, ||y_beside - y_after|| / ||y_after||, which is 0: the same kernels read the same states, only the query
programs' order and start differ.

    python benchmarks/bench_query_beside_states.py [--lengths 16384 65536 131072] [--rounds 3] [--gated both]
        [--segments N ...] [--out DIR] [--commit SHA]

``--segments``: the state kernel's segment counts, a row each (default the op's, from its dispatch model, which counts
a partial last round of state programs as lost; beside the state kernel the query kernel can fill it).

Writes ``query_beside_states_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import alternate

from retention_compile.codegen import forward


def beside(on: bool) -> None:
    """Set the query kernel's launch (``launch_tunables`` holds the setting: a kept call of the other is not
    replayed)."""
    forward.QUERY_BESIDE_STATES = on


if __name__ == "__main__":
    default = forward.QUERY_BESIDE_STATES
    settings = {"after": lambda: beside(False), "beside": lambda: beside(True)}
    alternate.main("query_beside_states", __doc__.splitlines()[0], settings, lambda: beside(default))
