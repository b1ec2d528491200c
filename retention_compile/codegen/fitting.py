"""Shrink a forward attention kernel's tiles until its compiled form fits the device's shared memory.

The planner's shared-memory model and ``kernel_spec``'s clamps are estimates; what Triton allocates depends on
its pipeliner and layouts. fp32 (or wide-value) chunked query kernels overran the H200's 227 KB opt-in limit in the
GPU fuzz of 2026-11-29 (d=96 e=64 fp32, 64 rows x 3 stages: 240 KB; d=48 e=128 fp32, 128 rows: 448 KB), and
Triton refused the launch (``OutOfResources``). Here the kernel is compiled first (``JITFunction.warmup``: the
compile the launch would do, cached under the same key when the arguments are real) and its ``metadata.shared``
is compared with the device's limit; while it does not fit, the query rows halve (down to 16), then the pipeline
stages drop (down to 1). Each answer is remembered per (spec, warps, stages, device).

Under tracing (fake tensors, symbolic sizes) the arguments are replaced by ``MockTensor`` placeholders and size
hints, so the check compiles the same source once more with the default 16-byte alignment specialization.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import torch

from ..sizes import size_hint
from .triton_source import KernelSpec

MIN_BLOCK_T = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use: the limit Triton checks at launch."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def _compile_args(launch: dict) -> dict:
    """The launch's keyword arguments, with fake tensors as ``MockTensor`` and symbolic sizes as their hints."""
    from torch._subclasses.fake_tensor import is_fake
    from triton.runtime.jit import MockTensor

    def concrete(value):
        if isinstance(value, torch.Tensor) and is_fake(value):
            return MockTensor(value.dtype)
        if isinstance(value, torch.SymInt):
            return size_hint(value)
        return value

    return {name: concrete(value) for name, value in launch.items()}


def compiled_shared_memory(kernel, grid: tuple, launch: dict, num_warps: int, num_stages: int) -> int:
    """Shared memory (bytes) of ``kernel`` compiled for these arguments: compiles without launching."""
    compiled = kernel.warmup(grid=grid, num_warps=num_warps, num_stages=num_stages, **_compile_args(launch))
    if hasattr(compiled, "result"):  # Triton's async compile mode hands back a future
        compiled = compiled.result()
    return int(compiled.metadata.shared)


_FITTED: dict[tuple, tuple[KernelSpec, int]] = {}


def fit_shared_memory(
    spec: KernelSpec, num_warps: int, num_stages: int, limit: int, shared_of: Callable[[KernelSpec, int], int]
) -> tuple[KernelSpec, int]:
    """The largest ``(spec, num_stages)`` at or below the given ones whose attention kernel needs at most ``limit``
    bytes of shared memory; ``shared_of(spec, stages)`` compiles that kernel and returns what it needs.

    Raises ``RuntimeError`` naming the shape when even 16 rows and one stage do not fit."""
    key = (spec, num_warps, num_stages, limit)
    if key in _FITTED:
        return _FITTED[key]
    candidate, stages = spec, num_stages
    while (used := shared_of(candidate, stages)) > limit:
        if candidate.block_t > MIN_BLOCK_T:
            candidate = dataclasses.replace(candidate, block_t=candidate.block_t // 2)
        elif stages > 1:
            stages -= 1
        else:
            raise RuntimeError(
                f"retention_compile: the forward attention kernel for {spec.summary()} needs {used} bytes of shared "
                f"memory even with {MIN_BLOCK_T} query rows and one stage (limit {limit}); use impl='aten'"
            )
    _FITTED[key] = (candidate, stages)
    return candidate, stages


def device_shared_memory_limit(device: torch.device) -> int | None:
    """The device's per-program shared memory, or None where nothing is compiled for a GPU (the interpreter)."""
    if _interpreting() or device.type != "cuda":
        return None
    return shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())
