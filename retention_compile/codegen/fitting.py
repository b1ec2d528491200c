"""Shrink a forward attention kernel's tiles until its compiled form fits the device's shared memory.

The planner's shared-memory model and ``kernel_spec``'s clamps are estimates; what Triton allocates depends on
its pipeliner and layouts. fp32 (or wide-value) chunked query kernels overran the H200's 227 KB opt-in limit in the
GPU fuzz of 2026-11-29 (d=96 e=64 fp32, 64 rows x 3 stages: 240 KB; d=48 e=128 fp32, 128 rows: 448 KB), and
Triton refused the launch (``OutOfResources``). Here the kernel is compiled first (``JITFunction.warmup``: the
compile the launch would do, cached under the same key when the arguments are real) and its ``metadata.shared``
is compared with the device's limit; while it does not fit, the query rows halve (down to 16), then the pipeline
stages drop (down to 1). Each answer is remembered per (spec, warps, stages, limit, argument specialization), in
the process and in the kernel cache (keyed by the GPU's compute capability, the package's code and the torch,
Triton and driver versions too), so a later process skips the check (0.18 s under cProfile in a warm run of the
GPU compile benchmark: a Triton cache hit).

Under tracing (fake or functional tensors, symbolic sizes) the arguments are replaced by ``MockTensor``
placeholders and size hints, so the check may compile the same source once more, assuming 16-byte alignment.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from ..sizes import size_hint
from . import cache
from .triton_source import KernelSpec, interpreting

MIN_BLOCK_T = 16


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use: the limit Triton checks at launch."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def has_storage(value: torch.Tensor) -> bool:
    """A plain tensor with data; tracing's fake and functional tensors (subclasses) have no address for Triton."""
    return type(value) is torch.Tensor


def _compile_args(launch: dict) -> dict:
    """The launch's keyword arguments, with tensors that have no storage as ``MockTensor`` (16-byte aligned) and
    symbolic sizes as their hints."""
    from triton.runtime.jit import MockTensor

    def concrete(value):
        if isinstance(value, torch.Tensor) and not has_storage(value):
            return MockTensor(value.dtype)
        if isinstance(value, torch.SymInt):
            return size_hint(value)
        return value

    return {name: concrete(value) for name, value in launch.items()}


def launch_specialization(launch: dict) -> tuple:
    """What Triton specializes a compile on besides the source and options: each pointer's dtype and 16-byte
    alignment, and whether each integer is 1 or a multiple of 16. Shared memory can differ between
    specializations (an unaligned pointer is not pipelined), so fitted tiles are remembered per specialization."""

    # the launch dict is built in one fixed order; ints and plain tensors (most values) are marked inline: a call
    # per value took about a third of a short call's host time
    Tensor = torch.Tensor
    return tuple(
        (value == 1, value % 16 == 0)
        if type(value) is int
        else (value.dtype, value.data_ptr() % 16 == 0)
        if type(value) is Tensor
        else _mark(value)
        for value in launch.values()
    )


def _mark(value) -> object:
    """``launch_specialization``'s mark of a value other than an int or a plain tensor."""
    if type(value) is bool:  # a constexpr flag: each value compiles its own kernel
        return value
    if isinstance(value, torch.Tensor):  # without storage (a subclass): a MockTensor, aligned
        return (value.dtype, value.data_ptr() % 16 == 0 if has_storage(value) else True)
    if isinstance(value, torch.SymInt):
        n = size_hint(value)
        return (n == 1, n % 16 == 0)
    return type(value).__name__


def compiled_shared_memory(
    kernel,
    grid: tuple,
    launch: dict,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None = None,
    launch_pdl: bool = False,
) -> int:
    """Shared memory (bytes) of ``kernel`` compiled for these arguments: compiles without launching. ``maxnreg``
    (the launch's register cap) and ``launch_pdl`` as the launch takes them, so the kernel compiled here is the one
    the launch then finds in Triton's cache."""
    options = {"num_warps": num_warps, "num_stages": num_stages} | ({"maxnreg": maxnreg} if maxnreg else {})
    options |= {"launch_pdl": True} if launch_pdl else {}
    compiled = kernel.warmup(grid=grid, **options, **_compile_args(launch))
    if hasattr(compiled, "result"):  # Triton's async compile mode hands back a future
        compiled = compiled.result()
    return int(compiled.metadata.shared)


_FITTED: dict[tuple, tuple[KernelSpec, int]] = {}


def fit_shared_memory(
    spec: KernelSpec,
    num_warps: int,
    num_stages: int,
    limit: int,
    shared_of: Callable[[KernelSpec, int], int],
    specialization: tuple = (),
) -> tuple[KernelSpec, int]:
    """The largest ``(spec, num_stages)`` at or below the given ones whose attention kernel needs at most ``limit``
    bytes of shared memory; ``shared_of(spec, stages)`` compiles that kernel and returns what it needs. The answer
    is remembered per (spec, warps, stages, limit, ``specialization``: ``launch_specialization``).

    Raises ``RuntimeError`` naming the shape when even 16 rows and one stage do not fit."""
    key = (spec, num_warps, num_stages, limit, specialization)
    if key in _FITTED:
        return _FITTED[key]
    path = _cache_path(key)
    known = _load(path)
    if known is not None:
        _FITTED[key] = (dataclasses.replace(spec, block_t=known[0]), known[1])
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
    cache.store_json(path, [candidate.block_t, stages])
    return candidate, stages


def _cache_path(key: tuple) -> Path:
    """The kernel-cache entry of one fitting answer: ``repr`` of the key (the spec, launch and specialization) and
    the current GPU's compute capability (Triton compiles for it: GPUs with equal limits allocate differently)."""
    target = repr(torch.cuda.get_device_capability()) if torch.cuda.is_available() else "no-gpu"
    return cache.code_keyed_entry("fitting", "", repr(key), target)


def _load(path: Path) -> tuple[int, int] | None:
    """``(rows, stages)`` stored by an earlier process; None when missing, unreadable or malformed."""
    entry = cache.load_json(path)
    try:
        rows, stages = entry if entry is not None else (None, None)
    except (ValueError, TypeError):
        return None
    return (rows, stages) if type(rows) is int and type(stages) is int and rows >= MIN_BLOCK_T and stages >= 1 else None


def device_shared_memory_limit(device: torch.device) -> int | None:
    """The device's per-program shared memory, or None where nothing is compiled for a GPU (the interpreter)."""
    if interpreting() or device.type != "cuda":
        return None
    return shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())
