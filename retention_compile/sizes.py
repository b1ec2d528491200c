"""Concrete values of tensor sizes that may be symbolic (traced with dynamic shapes).

    size_hint(size) -> int    an int as is; a SymInt's example value, read without adding a guard
                              (``UNHINTED`` when it has none)
    pow2_at_least(n) -> int   the smallest power of 2 at or above n (tile and chunk widths)
    contiguous_strides(shape) the strides of a contiguous tensor of ``shape`` (products of the trailing sizes)

Used where a size only steers a choice that never changes the result (a plan, a tile, a chunk), so reading the
traced example instead of guarding on it keeps one graph for every length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

UNHINTED = 4096  # a SymInt without an example value: a typical length


def pow2_at_least(n: int) -> int:
    """The smallest power of 2 at or above n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def size_hint(size: int | torch.SymInt) -> int:
    """``size`` as an int: its example value when symbolic (no guard), ``UNHINTED`` when there is none."""
    if isinstance(size, torch.SymInt):
        node = size.node
        return int(node.hint) if node.has_hint() else UNHINTED
    return int(size)


def contiguous_strides(shape: Sequence[int | torch.SymInt]) -> list[int | torch.SymInt]:
    """The strides (in elements) of a contiguous tensor of ``shape``: each the product of the sizes after it."""
    return [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
