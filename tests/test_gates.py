"""d log_gate from the gradients of the cumulative gate: the prefix form and the chunk-start form agree."""

import pytest
import torch

from retention_compile.gates import log_gate_grad, log_gate_grad_in_chunks


@pytest.mark.parametrize(("Tk", "chunk", "shift"), [(37, 8, 0), (37, 8, 3), (16, 16, 0), (5, 16, 11), (64, 4, 1)])
def test_chunk_start_form_matches_the_prefix_form(Tk: int, chunk: int, shift: int) -> None:
    """Given dg at each chunk start (here from the prefix form), the chunk-local sums rebuild every position; a
    boundary's error stays in its own chunk."""
    gen = torch.Generator().manual_seed(Tk * 31 + chunk + shift)
    d_cum = torch.randn(2, 3, Tk, generator=gen, dtype=torch.float64)
    want = log_gate_grad(d_cum)
    n = -(-(Tk + shift) // chunk)
    starts = torch.arange(1, n) * chunk - shift  # chunk c + 1 starts at (c + 1) chunk - shift
    boundary = want[..., starts]
    torch.testing.assert_close(log_gate_grad_in_chunks(d_cum, boundary, chunk, shift), want, rtol=1e-12, atol=1e-12)
    if n > 2:
        moved = boundary.clone()
        moved[..., 0] += 1.0
        changed = (log_gate_grad_in_chunks(d_cum, moved, chunk, shift) - want).abs() > 0.5
        assert changed[..., starts[0] : starts[1]].all() and changed.sum() == 2 * 3 * chunk
