"""``benchmarks/forward_timeline.py``'s reading of a profiler trace (the GPU part is a benchmark, not tested here)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _event(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"name": name, "ts": ts, "dur": dur, "cat": cat}


def test_calls_split_at_each_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush (a fill of >= 30 us) opens a call; the forward's own short fill, its kernels and the gaps between
    them are placed after the flush's end; host events and device events before the first flush are dropped."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import forward_timeline

    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>>"
    events = [
        _event("warm-up kernel", 0.0, 5.0),
        _event(fill, 10.0, 80.0),  # the flush: ends at 90
        _event("cudaLaunchKernel", 91.0, 3.0, cat="cuda_runtime"),
        _event(fill, 91.2, 0.8),  # the ticket buffer's fill
        _event("retention_chunk_state", 93.0, 477.0),
        _event("attention_kernel", 572.0, 520.0),
        _event("Memset (Device)", 1100.0, 70.0, cat="gpu_memset"),  # the next flush: ends at 1170
        _event("attention_kernel", 1175.5, 500.0),
    ]
    calls = forward_timeline.calls_from_trace(events)
    assert [len(call["kernels"]) for call in calls] == [3, 1]
    first = calls[0]["kernels"]
    assert [k["name"] for k in first] == [fill, "retention_chunk_state", "attention_kernel"]
    assert [k["start_us"] for k in first] == pytest.approx([1.2, 3.0, 482.0])
    assert [k["dur_us"] for k in first] == pytest.approx([0.8, 477.0, 520.0])
    assert [call["span_us"] for call in calls] == pytest.approx([1002.0, 505.5])
    assert forward_timeline.calls_from_trace(events[:1]) == []
