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
    starts = (torch.arange(n) * chunk - shift).clamp_min(0)  # chunk c starts at c chunk - shift (chunk 0 at 0)
    at_starts = want[..., starts]
    assert (at_starts[..., 0] == 0).all()
    torch.testing.assert_close(log_gate_grad_in_chunks(d_cum, at_starts, chunk, shift), want, rtol=1e-12, atol=1e-12)
    if n > 2:
        moved = at_starts.clone()
        moved[..., 1] += 1.0
        changed = (log_gate_grad_in_chunks(d_cum, moved, chunk, shift) - want).abs() > 0.5
        assert changed[..., starts[1] : starts[2]].all() and changed.sum() == 2 * 3 * chunk
