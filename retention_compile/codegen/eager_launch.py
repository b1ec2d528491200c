"""Eager launches of compiled Triton kernels without Triton's per-call binding.

A short eager forward is bound by the host, not the GPU. On the H200's host (2026-12-01, 7b285d6) one
``kernel[grid](**kwargs)`` of the quadratic forward kernel took 38 us (Triton binds and specializes each of its 30
arguments, builds a cache key, looks the compiled kernel up) and ``triton_forward``'s own planning 80-120 us more,
against 31 us of GPU time (T=2048, b1 h8 d64 bf16; SDPA's whole eager call took 69 us on that host).

A caller that can tell that a call repeats an earlier one in everything its kernels were specialized and planned on
(``triton_forward`` keys its calls by each input's shape, strides, dtype and 16-byte alignment, the scalars and the
Plan) keeps what the first call launched as ``DirectLaunch``es: the compiled kernel, its grid, and every argument
that the key fixes (integers, floats, flags). A later call passes only its tensors, in the kernel's parameter order,
to the compiled kernel's launcher: what Triton itself does once it has found the kernel.

Only where the first call launched directly too (``direct_launches_allowed``): ``wrap_triton`` disabled (the body
of a ``triton_op`` run eagerly), not interpreting, and no Triton launch hooks (a profiler's) to call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_source import interpreting


def direct_launches_allowed() -> bool:
    """Whether a launch now goes straight to Triton's ``kernel[grid]`` (so a kept compiled kernel may replace it):
    ``wrap_triton`` disabled, not interpreting, no launch hooks set."""
    from torch._library.triton import is_wrap_triton_enabled
    from triton import knobs

    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return not is_wrap_triton_enabled() and not interpreting() and not any(map(_hook_set, hooks))


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook is set: a callable, or a non-empty chain of them (``knobs.HookChain``, which
    newer Triton versions hold even with no hook in it)."""
    return hook is not None and bool(getattr(hook, "calls", True))


@dataclass(frozen=True)
class DirectLaunch:
    """One kept launch of a compiled Triton kernel: ``arguments`` holds every parameter's value in the kernel's
    order, with ``None`` at the tensor parameters (``tensors``: their positions and names), which each call
    supplies."""

    name: str
    launcher: object
    function: object
    packed_metadata: object
    grid: tuple[int, int, int]
    device: int
    arguments: tuple
    tensors: tuple[tuple[int, str], ...]

    @staticmethod
    def of(kernel, grid: tuple, launch: dict, compiled) -> DirectLaunch | None:
        """The launch ``kernel[grid](**launch)`` that compiled (Triton's ``CompiledKernel``, what the launch
        returned) just ran, to repeat with other tensors of the same specialization; None where it cannot be
        repeated directly (no compiled kernel: the launch went through ``wrap_triton``'s tracing)."""
        launcher = getattr(compiled, "run", None)
        if launcher is None or getattr(compiled, "function", None) is None or len(grid) > 3:
            return None
        names = kernel.arg_names
        if set(names) != set(launch):
            raise ValueError(f"{kernel.__name__}: launched with {sorted(launch)}, its parameters are {names}")
        tensors = tuple((i, n) for i, n in enumerate(names) if isinstance(launch[n], torch.Tensor))
        arguments = tuple(None if isinstance(launch[n], torch.Tensor) else launch[n] for n in names)
        full_grid = (*(int(g) for g in grid), 1, 1)[:3]
        return DirectLaunch(
            kernel.__name__, launcher, compiled.function, compiled.packed_metadata, full_grid,
            torch.cuda.current_device(), arguments, tensors,
        )  # fmt: skip

    def __call__(self, tensors: dict[str, torch.Tensor]) -> None:
        """Launch on the current stream with ``tensors`` (by parameter name) at the tensor parameters; no launch
        metadata and no hooks (``direct_launches_allowed``: none are set)."""
        arguments = list(self.arguments)
        for position, name in self.tensors:
            arguments[position] = tensors[name]
        stream = current_stream(self.device)
        self.launcher(*self.grid, stream, self.function, self.packed_metadata, None, None, None, *arguments)


def current_stream(device: int) -> int:
    """The handle of the current CUDA stream of ``device``, as Triton's launches take it."""
    from triton.runtime.driver import driver

    return driver.active.get_current_stream(device)
