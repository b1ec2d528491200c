"""The query kernel's denominator rounding, emulated on the CPU: the per-row relative error of denom against float64
for the single-chunk kernel's rounding chain (64-row tiles over 64-key blocks, deg 2, bf16 inputs, gated), with the
unmasked blocks' weights as packed bf16 products (``KernelSpec.packed_squares``: a forward no backward follows) or as
float32 squares rounded once (a training forward). The inputs are ``tests/gpu/test_triton_forward.py``'s
``test_gate_spans_and_cliffs[span-105-quadratic-100.0]``: |q|, |k| ~ 1e2, a constant log-gate of -105/63 per key,
T = 3000, one head.

    python benchmarks/denominator_rounding.py [--seeds 6] [--T 3000]

Per weight the kernel forms, in the unmasked blocks, w = bf16(bf16(bf16(x)^2) bf16(exp(G_ref - G_j))) (packed) or
bf16(x^2 exp(G_ref - G_j)) (float32), times exp(G_i - G_ref) per row after the loop; in the masked block
bf16(x^2 exp(G_i - G_j)). G is a float32 cumsum, x = q . k in float32. Prints, per seed, the largest and the 99.9th
percentile per-row error of each form. Nothing here runs the kernels: it is the arithmetic they do, in torch.
"""

from __future__ import annotations

import argparse
import math

import torch

LOG2E = 1.4426950408889634
HEAD_DIM = 64
BLOCK = 64


def bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 (to nearest even), as float32."""
    return t.to(torch.bfloat16).to(torch.float32)


def denominator_errors(seed: int, packed: bool, T: int, span: float = 105.0, magnitude: float = 100.0) -> torch.Tensor:
    """Per-row relative errors of the emulated denominator against float64 (scale 1/sqrt(d), eps 1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    q = bf16(torch.randn(T, HEAD_DIM, generator=gen) * magnitude)
    k = bf16(torch.randn(T, HEAD_DIM, generator=gen) * magnitude)
    gate = torch.full((T,), -span / (BLOCK - 1), dtype=torch.float32)
    g = torch.cumsum(gate, 0)
    x = q @ k.T
    s2 = 1.0 / HEAD_DIM
    g64 = torch.cumsum(gate.double(), 0)
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    decay = torch.exp((g64[:, None] - g64[None, :]).clamp(max=0))
    want = (s2 * (q.double() @ k.double().T) ** 2 * decay * causal).sum(1) + 1e-6
    den = torch.zeros(T, dtype=torch.float32)
    for first in range(0, T, BLOCK):
        rows = slice(first, min(T, first + BLOCK))
        unmasked = torch.zeros(rows.stop - first)
        if first > 0:  # keys before the tile's first row, whole blocks: the key's factor, the row's after the loop
            xu = x[rows, :first]
            key_factor = torch.exp2(g[:first] * -LOG2E + float(g[first] * LOG2E))
            if packed:
                w = bf16(bf16(bf16(xu) * bf16(xu)) * bf16(key_factor)[None, :])
            else:
                w = bf16(xu * xu * key_factor[None, :])
            unmasked = w.sum(1) * torch.exp(g[rows] - g[first])
        own = torch.arange(first, rows.stop)
        keep = own[None, :] <= own[:, None]
        factor = torch.exp2(g[rows][None, :] * -LOG2E + (g[rows] * LOG2E)[:, None])
        masked = bf16(x[rows, rows] ** 2 * torch.where(keep, factor, torch.zeros_like(factor)))
        den[rows] = unmasked + masked.sum(1)
    den = den * s2 + 1e-6
    return (den.double() - want).abs() / want


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--T", type=int, default=3000)
    args = parser.parse_args()
    for packed in (True, False):
        errors = [denominator_errors(seed, packed, args.T) for seed in range(args.seeds)]
        worst = " ".join(f"{float(e.max()):.2e}" for e in errors)
        tail = " ".join(f"{float(e.quantile(0.999)):.1e}" for e in errors)
        print(f"{'packed bf16' if packed else 'float32 squares'}: max {worst}; 99.9th percentile {tail}")
    tiles = math.ceil(args.T / BLOCK)
    print(f"(bf16's unit roundoff {2**-9:.2e}, five of them {5 * 2**-9:.2e}; T={args.T}, {tiles} tiles)")


if __name__ == "__main__":
    main()
