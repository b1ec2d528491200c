"""Fixtures shared by the GPU tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def poison_allocations(monkeypatch: pytest.MonkeyPatch):
    """Fill every float torch.empty with NaN while a test runs eagerly: an element the kernels never write shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
    yield


@pytest.fixture(autouse=True)
def no_kept_calls_between_tests():
    """Each test starts and ends with no kept eager calls (``codegen.replays``): a test's repeated calls are its own."""
    from retention_compile.codegen import replays

    replays.clear()
    yield
    replays.clear()
