"""Fixtures shared by the GPU tests."""

from __future__ import annotations

import pytest
import torch

from retention_compile.testing import nan_filled_empty


@pytest.fixture
def poison_allocations():
    """Fill every float torch.empty with NaN while a test runs eagerly: an element the kernels never write shows up."""
    with nan_filled_empty():
        yield


@pytest.fixture(autouse=True)
def no_kept_calls_between_tests():
    """Each test starts and ends with no kept eager calls (``codegen.replays``): a test's repeated calls are its own."""
    from retention_compile.codegen import replays

    replays.clear()
    yield
    replays.clear()


@pytest.fixture(autouse=True)
def cached_blocks_returned_after_each_test():
    """After each test the allocator's cached blocks go back to the card: ``.ci/gpu`` runs its parts side by side (some
    27 processes), and on an 80 GB card the blocks they kept cached ran the others out of memory."""
    yield
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
