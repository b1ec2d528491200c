"""The dispatch model behind the CUDA state kernels' segment count (``codegen/dispatch.py``), and the grid order it
assumes (segment-major) in the kernels' launch and sources."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from unittest import mock

import pytest
import torch

from retention_compile.codegen import cuda_state, dispatch, forward
from retention_compile.codegen.cuda_state import CONFIG, StateKernelConfig, state_spec


def test_makespan_of_programs_alone_and_paired() -> None:
    """One slot runs programs one after another at the speed of a program alone; two programs on one SM each take
    ``PAIRED_CHUNK_TIME`` per chunk, and a program left alone goes on at full speed."""
    assert dispatch.makespan([3, 2], sms=1, per_sm=1) == pytest.approx(5.0)
    assert dispatch.makespan([1, 1], sms=1, per_sm=2) == pytest.approx(dispatch.PAIRED_CHUNK_TIME)
    # lengths 2 and 1 side by side: both at 1.6 per chunk until the short one ends (1.6), then 1 chunk - 1 done alone
    assert dispatch.makespan([2, 1], sms=1, per_sm=2) == pytest.approx(1.6 + 1.0)
    # two SMs fill breadth first: two programs run alone, one per SM
    assert dispatch.makespan([4, 4], sms=2, per_sm=2) == pytest.approx(4.0)


def test_segment_lengths_leave_the_short_segment_last() -> None:
    assert dispatch.segment_lengths(64, 7) == [10, 10, 10, 10, 10, 10, 4]
    assert dispatch.segment_lengths(64, 8) == [8] * 8
    assert dispatch.segment_lengths(4, 3) == [2, 2]  # as state_segments: 3 segments asked, 2 of 2 chunks


def test_fastest_segment_count_on_the_h200_shape() -> None:
    """b1 h8 d64 T=65536 chunk 1024 on 132 SMs x 2: 8 segments leave 112 programs for a third round, where each runs
    alone (0.418-0.428 ms measured); 7 segments of 10 end with the 80 programs of 4 chunks (0.401-0.404 measured)."""
    spans = {
        s: dispatch.makespan(dispatch.segment_major(dispatch.segment_lengths(64, s), 80), 132, 2) for s in (6, 7, 8, 9)
    }
    assert spans[7] < spans[8] == spans[9] < spans[6]
    assert dispatch.fastest_segment_count(64, 80, 132, 2, 8) == 7


def test_fastest_segment_count_prefers_fewer_segments_on_a_tie() -> None:
    """Counts that end together: the fewest (fewer segment totals, less for the scan)."""
    spans = {
        s: dispatch.makespan(dispatch.segment_major(dispatch.segment_lengths(64, s), 40), 132, 2) for s in range(1, 16)
    }
    best = min(spans.values())
    tied = [s for s, span in spans.items() if span <= best * 1.01]
    assert len(tied) > 1 and dispatch.fastest_segment_count(64, 40, 132, 2, 15) == min(tied)


def test_state_segments_model_only_segment_major_kernels() -> None:
    """With programs per SM (a segment-major grid) the count follows the model; without, ``STATE_WAVES`` alone."""
    device = torch.device("cpu")
    with mock.patch.object(forward, "_sm_count", return_value=132):
        assert forward.state_segments(device, 80, 64, None) == (8, 8, 8)
        assert forward.state_segments(device, 80, 64, None, 2) == (7, 10, 7)
        assert forward.state_segments(device, 80, 64, 5, 2) == (5, 13, 5)  # given: kept


def test_cuda_state_grid_is_segment_major() -> None:
    """The launch puts segments on the grid's z axis and heads on x, and both kernels read them from there."""
    launch = mock.Mock(grid_y=10)
    assert cuda_state._grid(launch, 2, 4, 7) == (8, 10, 7)
    bf16 = torch.empty(1, 1, 64, 64, dtype=torch.bfloat16)
    spec = state_spec(bf16, bf16, 64, True, False, False)
    no_fold = dataclasses.replace(CONFIG, wgmma_fold=False)
    for config, arch, wgmma in ((no_fold, "sm_90a", True), (StateKernelConfig(), "sm_80", False)):
        source = cuda_state.render_state_source(spec, config, arch)
        assert ("chunk_state_wgmma.cu.j2" in source) == wgmma
        assert "const int seg = blockIdx.z;" in source and "const long long bs = blockIdx.x;" in source
    # with the fold, in the same order by tickets (blocks started before it have a lower one)
    source = cuda_state.render_state_source(spec, CONFIG, "sm_90a")
    assert "ticket = static_cast<int>(atomicAdd(SYNC, 1u));" in source and "blockIdx" not in source
    assert "const int seg = ticket / (gridDim.x * gridDim.y);" in source
    assert "const long long bs = ticket % gridDim.x;" in source


def test_state_dispatch_benchmark_edits_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/state_dispatch.py`` edits the rendered state kernels by pattern (its segment-minor grid and its
    first-N-programs variant): every pattern still matches both kernels, and its model queues hold every program."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import state_dispatch

    bf16 = torch.empty(1, 1, 64, 64, dtype=torch.bfloat16)
    spec = state_spec(bf16, bf16, 64, True, False, False)
    for config, arch in ((state_dispatch.STUDIED_CONFIG, "sm_90a"), (StateKernelConfig(), "sm_80")):
        assert state_dispatch.edits_apply(cuda_state.render_state_source(spec, config, arch)) == []
    major, minor = (state_dispatch.model_queue(64, 7, 80, order) for order in ("segment-major", "segment-minor"))
    assert sorted(major) == sorted(minor) and len(major) == 7 * 80 and sum(major) == 64 * 80
    assert major[-80:] == [4] * 80 and minor[:7] == [10] * 6 + [4]


def test_fastest_segment_count_fills_every_slot_once_where_it_can() -> None:
    """Under one round the GPU's first placement is not the model's: 30 programs per segment over 64 chunks tie at 8
    segments (240 programs, under 264 slots) and 16 in the model; 16 is taken, as its grid fills every slot."""
    span = {s: dispatch.makespan(dispatch.segment_major(dispatch.segment_lengths(64, s), 30), 132, 2) for s in (8, 16)}
    assert span[8] == pytest.approx(span[16])
    assert dispatch.fastest_segment_count(64, 30, 132, 2, 20) == 16


def test_segments_past_the_usual_count_only_for_a_large_modelled_gain() -> None:
    """The cherry layout's 72 programs at T=65536 take 11 segments (the model: 10% sooner than 7); the pair layout's
    80 keep 7 and at T=16384 8 (16 would be 4.8% sooner, less than the scan's extra folds cost)."""
    assert dispatch.modelled_segment_count(64, 72, 132, 2, 9) == 11
    assert dispatch.modelled_segment_count(64, 80, 132, 2, 8) == 7
    assert dispatch.modelled_segment_count(16, 80, 132, 2, 8) == 8
    assert dispatch.fastest_segment_count(16, 80, 132, 2, 16) == 16  # what the model alone would take
