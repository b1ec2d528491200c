"""How far the float32 prefix sum of the log-gates takes the gate factors, and y with them: the kernels read
G = cumsum(log_gate) in float32, so exp(G_i - G_j) for nearby keys carries a relative error of about half an ulp of
|G| (|G| 2^-24), however small G_i - G_j is. A large |G| comes from long sequences under strong gates, or from a
reset: a log-gate of -1e4 at a document boundary would put every later G beyond 1e4, but every path takes a log-gate
into G no lower than ``gates.log_gate_floor`` (-105 in float32), where each decay it enters is 0 already.

    python benchmarks/gate_prefix_precision.py            (CPU: no GPU needed)

Prints (1) for constant log-gates per key and lengths T, the largest error of G_i - G_j over neighbouring keys in
float32 against float64 (the relative error of each gate factor), and (2) the relative error of y against the
float64 oracle for the rows after a reset of -1e3 .. -1e5 or -inf at key 10, with the float32 Triton kernels run by the
interpreter (``TRITON_INTERPRET=1``; T = 96, d = 32, the single-chunk kernel and chunks of 16) and with the op's CPU
path (``rc.power_retention``, whose aten forms take G in float64: ``gates.cumulative_log_gate``). The contract's bound
for float32 inputs is 1e-4.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

import retention_compile as rc  # noqa: E402
from retention_compile.codegen.forward import triton_forward  # noqa: E402
from retention_compile.planning import Plan  # noqa: E402
from retention_compile.reference import power_retention_reference  # noqa: E402

TINY = {"block_t": 16, "block_feature": 16, "block_e": 32}


def neighbour_difference_error(T: int, per_key: float) -> float:
    """The largest |(G_i - G_{i-1}) - exact| at the end of a float32 cumsum of ``per_key`` over T keys."""
    gate = torch.full((T,), per_key, dtype=torch.float32)
    err = torch.cumsum(gate, 0).double() - torch.cumsum(gate.double(), 0)
    return float((err[-64:] - err[-65:-1]).abs().max())


def error_after_reset(reset: float, chunk: int, kernels: bool, T: int = 96, d: int = 32) -> float:
    """Relative error of y against the oracle over the rows after a reset at key 10: the float32 Triton kernels in
    the interpreter (``kernels``), else the op's CPU path."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, d, generator=gen) for _ in range(3))
    gate = -0.1 * torch.rand(1, 1, T, generator=gen)
    gate[..., 10] += reset
    options = {"scale": d**-0.5, "deg": 2, "causal": True}
    if kernels:
        y, _ = triton_forward(q, k, v, **options, log_gate=gate, valid=None, plan=Plan(chunk_size=chunk, **TINY))
    else:
        y = rc.power_retention(q, k, v, **options, log_gate=gate, chunk_size=chunk)
    ref = power_retention_reference(q.double(), k.double(), v.double(), **options, log_gate=gate.double())
    after = slice(11, T)
    return float((y[..., after, :].double() - ref[..., after, :]).norm() / ref[..., after, :].norm())


def main() -> None:
    print("(1) error of G_i - G_{i-1} in float32 (so of each gate factor, relatively):")
    for T, per_key in ((65536, -0.025), (65536, -0.3), (65536, -1.67), (262144, -0.3), (1048576, -0.3)):
        error = neighbour_difference_error(T, per_key)
        print(f"    T={T} log-gate {per_key}/key, |G| ~ {T * -per_key:.3g}: {error:.2e}")
    print("(2) y after a reset at key 10, float32 (bound 1e-4): single chunk / chunks of 16")
    for reset in (0.0, -1e3, -1e4, -1e5, float("-inf")):
        kernels = [error_after_reset(reset, chunk, True) for chunk in (1024, 16)]
        cpu = [error_after_reset(reset, chunk, False) for chunk in (1024, 16)]
        print(f"    reset {reset:g}: kernels {kernels[0]:.2e} / {kernels[1]:.2e}, CPU path {cpu[0]:.2e} / {cpu[1]:.2e}")


if __name__ == "__main__":
    main()
