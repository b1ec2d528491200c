"""Concrete values of tensor sizes that may be symbolic (traced with dynamic shapes).

    size_hint(size) -> int    an int as is; a SymInt's example value, read without adding a guard
                              (``UNHINTED`` when it has none)
    specialized(size) -> int  an int as is; a SymInt guarded to its value (sizes a kernel's source is written for)
    pow2_at_least(n) -> int   the smallest power of 2 at or above n (tile and chunk widths)
    contiguous_strides(shape) the strides of a contiguous tensor of ``shape`` (products of the trailing sizes)

``size_hint`` is for a size that only steers a choice that never changes the result (a plan, a tile, a chunk): reading
the traced example instead of guarding on it keeps one graph for every length. ``specialized`` is for a size baked
into a kernel's source (d and e): a graph traced with it symbolic (``dynamic=True``) must not serve another value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_int

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


def specialized(size: int | torch.SymInt) -> int:
    """``size`` as an int that the compiled graph is specialized on: a SymInt is guarded to equal its value, so a call
    with another value recompiles instead of running kernels written for this one."""
    return guard_int(size) if isinstance(size, torch.SymInt) else int(size)


def contiguous_strides(shape: Sequence[int | torch.SymInt]) -> list[int | torch.SymInt]:
    """The strides (in elements) of a contiguous tensor of ``shape``: each the product of the sizes after it."""
    return [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
