"""The wgmma state kernel with the segments folded in (``StateKernelConfig.wgmma_fold``) against the state kernel
and the Triton scan after it, alternated in one process.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, the op's plan, the CUDA state kernel; T in {16384, 65536, 131072},
ungated and gated. Per (T, gated), ``--rounds`` rounds of both settings in turn (``alternate.alternated``), each:
the whole eager forward and the device time per kernel. Also per (T, gated): ``y_rel``, ||y_fold - y_scan|| /
||y_scan|| (both round the states to bf16 at the same points, so this is rounding noise, not a bias: the oracle
tests are tests/gpu/test_cuda_state.py).

    python benchmarks/bench_state_fold.py [--lengths 16384 65536 131072] [--rounds 3] [--gated both] [--out DIR]
        [--commit SHA]

Writes ``state_fold_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import dataclasses

import alternate

from retention_compile.codegen import cuda_state


def with_fold(fold: bool) -> None:
    """Set the wgmma state kernel's fold (``launch_tunables`` holds ``CONFIG``: a kept call of the other setting is
    not replayed)."""
    cuda_state.CONFIG = dataclasses.replace(cuda_state.CONFIG, wgmma_fold=fold)


if __name__ == "__main__":
    default = cuda_state.CONFIG
    settings = {"scan": lambda: with_fold(False), "fold": lambda: with_fold(True)}
    alternate.main("state_fold", __doc__.splitlines()[0], settings, lambda: setattr(cuda_state, "CONFIG", default))
