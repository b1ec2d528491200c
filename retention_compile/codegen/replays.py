"""Eager calls kept for the calls that repeat them (``eager_launch``): their keys and the store.

A call may be answered by a kept one only where everything its kernels were specialized and planned on is the same:
each input's shape, strides, dtype and 16-byte alignment (what Triton specializes pointers and integers on; every
integer argument is a size or a stride), the caller's scalars and tunables (``call_key``'s ``settings``), the current
device and Triton's compile settings. The data, and the buffers allocated per call, may differ.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from ..inspection import is_recording
from .eager_launch import compile_settings, direct_launches_allowed

# Kept calls, the least recently used first out (a workload of ever new lengths replaces them); 0 keeps none.
MAX_KEPT = 256


class Replay(Protocol):
    """A kept call: ``current()`` while the kernels it launches are still those its caller would load."""

    def current(self) -> bool: ...


_KEPT: OrderedDict[tuple, Replay] = OrderedDict()


def replayable(q: torch.Tensor) -> bool:
    """Whether an eager call may be kept or answered by a kept one: a plain CUDA tensor, launches that go straight to
    Triton (``direct_launches_allowed``), no inspection recording every call, keeping switched on."""
    return MAX_KEPT > 0 and q.is_cuda and type(q) is torch.Tensor and direct_launches_allowed() and not is_recording()


def call_key(tensors: tuple[torch.Tensor | None, ...], settings: tuple) -> tuple:
    """The key of a call with these tensors (None: absent) and the caller's ``settings`` (its scalars and the
    module tunables its planning reads)."""

    def described(t: torch.Tensor | None) -> tuple | None:
        return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)

    return (torch.cuda.current_device(), tensors[0].device, settings, compile_settings(), *map(described, tensors))


def kept(key: tuple) -> Replay | None:
    """The call kept under ``key`` while it is current, else None."""
    replay = _KEPT.get(key)
    if replay is None or not replay.current():
        return None
    _KEPT.move_to_end(key)  # the least recently used goes first
    return replay


def keep(key: tuple, replay: Replay) -> None:
    """Keep ``replay`` under ``key`` (dropping the oldest beyond ``MAX_KEPT``)."""
    _KEPT[key] = replay
    while len(_KEPT) > MAX_KEPT:
        _KEPT.popitem(last=False)


def clear() -> None:
    """Forget every kept call."""
    _KEPT.clear()
