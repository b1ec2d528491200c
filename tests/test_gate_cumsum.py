"""The gate's cumsum kernel (the rendered ``gate_cumsum_kernel``, launched by ``forward._gate_cumsum``) in Triton's
interpreter against ``G_t = sum_{u <= t} max(g_u, F)`` in float64 with float32's floor ``F``
(``gates.log_gate_floor``: a reset of -inf adds F, whose decay is 0 in float32). Blocks of a few keys
(``forward.GATE_SCAN_BLOCK``), so that rows span several blocks and each block adds the sum of the blocks before it
(at the default 4096 keys the other CPU cases are one block). ``TRITON_INTERPRET=1`` must be set before triton is
first imported, so the cases run in one subprocess that executes this file as a script and reports JSON."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from retention_compile.testing import interpreted_fixture  # noqa: E402

# name: (B, heads, T, keys per block), two rows at least (the last holds a NaN); T past a multiple of the block, at
# it, below it, and one key
CASES = {
    "tail": (2, 3, 150, 16),
    "whole_blocks": (1, 2, 128, 32),
    "one_block_short": (1, 2, 20, 32),
    "one_key": (1, 2, 1, 16),
    "many_blocks": (2, 1, 1000, 16),
}


def run_case(B: int, heads: int, T: int, block: int) -> dict[str, float]:
    """G of fresh random log-gates with two resets (-inf) and a NaN in the last row: the largest error of the finite
    rows' G relative to max(1, |G|), whether G's padding keys past T are left alone, and whether the NaN reaches
    exactly the keys from its own on."""
    from retention_compile.codegen import forward
    from retention_compile.codegen.triton_source import load_forward
    from retention_compile.gates import log_gate_floor
    from retention_compile.planning import Plan

    forward.GATE_SCAN_BLOCK = block
    gen = torch.Generator().manual_seed(1000 * T + block)
    log_gate = -0.05 * torch.rand(B, heads, T, generator=gen)
    log_gate[0, 0, T // 3] = log_gate[-1, 0, (2 * T) // 3] = float("-inf")
    nan_at = T // 2
    log_gate[-1, -1, nan_at] = float("nan")
    plan = Plan(chunk_size=64, block_t=16, block_e=32, num_warps=4, num_stages=1)
    spec = forward.kernel_spec(torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16), 2, True, False, True, T, plan)
    g = forward._gate_cumsum(load_forward(spec)[0], log_gate)
    expected = log_gate.double().clamp_min(log_gate_floor(torch.float32)).cumsum(-1)
    finite = torch.ones(B, heads, dtype=torch.bool)
    finite[-1, -1] = False
    error = (g[..., :T].double() - expected)[finite].abs() / expected[finite].abs().clamp_min(1.0)
    nan_row = g[-1, -1, :T].isnan()
    return {
        "g": error.max().item(),
        "padded": float(g.shape[-1] % 16 == 0 and g.shape[-1] >= T),
        "nan_from_its_key_on": float(nan_row[nan_at:].all().item() and not nan_row[:nan_at].any().item()),
    }


interpreted = interpreted_fixture(__file__, 300)


@pytest.mark.parametrize("name", list(CASES))
def test_gate_cumsum_matches_the_float64_prefix(interpreted: dict[str, dict[str, float]], name: str) -> None:
    result = interpreted[name]
    assert result["g"] < 1e-6, f"{name}: G off by {result['g']:.2e} of |G|"
    assert result["padded"] == 1.0, f"{name}: G's rows are not padded to a multiple of 16 keys"
    assert result["nan_from_its_key_on"] == 1.0, f"{name}: a NaN gate did not reach exactly the keys from its own on"


if __name__ == "__main__":
    print(json.dumps({name: run_case(*case) for name, case in CASES.items()}))
