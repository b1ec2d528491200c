"""Eager launches of compiled Triton (and CUDA C++) kernels without Triton's per-call binding.

A short eager forward is bound by the host, not the GPU. On the H200's host (2026-12-01, 7b285d6) one
``kernel[grid](**kwargs)`` of the quadratic forward kernel took 38 us (Triton binds and specializes each of its 30
arguments, builds a cache key, looks the compiled kernel up) and ``triton_forward``'s own planning 80-120 us more,
against 31 us of GPU time (T=2048, b1 h8 d64 bf16; SDPA's whole eager call took 69 us on that host).

A caller that can tell that a call repeats an earlier one in everything its kernels were specialized and planned on
(``codegen/replays.py``) keeps what the first call launched as ``DirectLaunch``es: the compiled kernel, its grid,
and every argument that the repeat fixes (integers, floats, flags). A later call passes only its tensors, in the
kernel's parameter order, to the compiled kernel's launcher, which is what ``JITFunction.run`` itself does once it
has found the kernel:

    launcher(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)

Only where the first call launched directly too and nothing else would run at a launch (``direct_launches_allowed``):
``wrap_triton`` disabled (the body of a ``triton_op`` run eagerly), not interpreting, no Triton launch hooks (a
profiler's); and only for kernels with no pre-run hooks, whose launcher takes that argument order
(``launcher_takes_arguments_in_order``). The CUDA state kernel's launch is kept the same way (``CudaLaunch``),
without the custom op's dispatch around it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch._library.triton import is_wrap_triton_enabled

from .nvrtc import KernelParams, current_stream, packed_arguments
from .triton_source import interpreting

# The launcher's parameters before the kernel's arguments, as Triton's CUDA launchers (3.4 to 3.9) take them: 3.9
# names them all; 3.6 names the first five and passes the rest on (``*args``) in this order.
LAUNCHER_PARAMETERS = (
    "gridX", "gridY", "gridZ", "stream", "function", "kernel_metadata", "launch_metadata", "launch_enter_hook",
    "launch_exit_hook",
)  # fmt: skip
# The parameters a launcher must name before passing the rest on.
LAUNCHER_NAMED_AT_LEAST = 5


def direct_launches_allowed() -> bool:
    """Whether a launch now goes straight to Triton's ``kernel[grid]`` with nothing else to run at it (so a kept
    compiled kernel may replace it): ``wrap_triton`` disabled, not interpreting, no launch hooks set."""
    knobs = _knobs()
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return not is_wrap_triton_enabled() and not interpreting() and not any(map(_hook_set, hooks))


@functools.cache
def _knobs():
    """Triton's ``knobs``, imported on first use: this module serves the CUDA state kernel's launches too, on GPUs
    whose Python has no Triton."""
    from triton import knobs

    return knobs


def _hook_set(hook: object) -> bool:
    """Whether a Triton launch hook is set: a callable, or a non-empty chain of them (``knobs.HookChain``, which
    newer Triton versions hold even with no hook in it)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def compile_settings() -> tuple:
    """The Triton settings that pick a compiled kernel besides its arguments (part of ``JITFunction.run``'s cache
    key): a launch kept under other settings must not serve a call under these."""
    knobs = _knobs()
    return (
        getattr(knobs.runtime, "debug", None),
        getattr(knobs.compilation, "instrumentation_mode", None),
        getattr(knobs.compilation, "fpsan_homomorphic_casts", None),
        getattr(knobs.runtime, "add_stages_inspection_hook", None),
    )


@functools.cache
def launcher_takes_arguments_in_order(launcher_type: type) -> bool:
    """Whether this Triton version's launcher is called as ``DirectLaunch`` calls it: its named parameters are the
    first of ``LAUNCHER_PARAMETERS`` (at least ``LAUNCHER_NAMED_AT_LEAST`` of them), then ``*args`` takes the
    remaining ones and the kernel's arguments."""
    try:
        parameters = list(inspect.signature(launcher_type.__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    named = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    rest = parameters[len(named) :]
    passes_the_rest_on = bool(rest) and rest[0].kind is inspect.Parameter.VAR_POSITIONAL
    in_order = tuple(named) == LAUNCHER_PARAMETERS[: len(named)]
    return in_order and len(named) >= LAUNCHER_NAMED_AT_LEAST and passes_the_rest_on


@dataclass(frozen=True)
class DirectLaunch:
    """One kept launch of a compiled Triton kernel: ``arguments`` holds every parameter's value in the kernel's
    order, with ``None`` at the tensor parameters (``tensors``: their positions and names), which each call
    supplies. ``compiled`` keeps the compiled kernel alive (Triton unloads its module when it is collected)."""

    compiled: object
    grid: tuple[int, int, int]
    device: int
    arguments: tuple
    tensors: tuple[tuple[int, str], ...]

    @staticmethod
    def of(kernel: object, grid: tuple, launch: dict, compiled: object) -> DirectLaunch | None:
        """The launch ``kernel[grid](**launch)`` that ``compiled`` (Triton's ``CompiledKernel``, what the launch
        returned) just ran, to repeat with other tensors of the same specialization; None where it cannot be
        repeated directly (no compiled kernel: the launch went through ``wrap_triton``'s tracing; pre-run hooks;
        a launcher called otherwise)."""
        launcher = getattr(compiled, "run", None)
        if launcher is None or getattr(compiled, "function", None) is None or len(grid) > 3:
            return None
        if getattr(kernel, "pre_run_hooks", None) or not launcher_takes_arguments_in_order(type(launcher)):
            return None
        names = kernel.arg_names
        if set(names) != set(launch):
            raise ValueError(f"{kernel.__name__}: launched with {sorted(launch)}, its parameters are {names}")
        tensors = tuple((i, n) for i, n in enumerate(names) if isinstance(launch[n], torch.Tensor))
        arguments = tuple(None if isinstance(launch[n], torch.Tensor) else launch[n] for n in names)
        full_grid = (*(int(g) for g in grid), 1, 1)[:3]
        return DirectLaunch(compiled, full_grid, torch.cuda.current_device(), arguments, tensors)

    def __call__(self, tensors: dict[str, torch.Tensor]) -> None:
        """Launch on the current stream with ``tensors`` (by parameter name) at the tensor parameters; no launch
        metadata and no hooks (``direct_launches_allowed``: none are set)."""
        arguments = list(self.arguments)
        for position, name in self.tensors:
            arguments[position] = tensors[name]
        compiled = self.compiled
        stream = current_stream(self.device)
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *arguments)


@dataclass(frozen=True)
class CudaLaunch:
    """One kept launch of a CUDA C++ kernel (``nvrtc.CudaKernel``), its arguments packed once (``params``, an
    ``nvrtc.KernelParams``: null pointers at the tensor positions ``tensors`` names, which each call fills with its
    tensors' data pointers). ``zeroed``: (position, count, name) of the int32 scratch buffers the kernel takes
    zeroed, allocated and zeroed per call and left in the call's tensors under ``name`` for the launches after it
    (the fold's ``SYNC``, whose counts the query kernel reads). ``dependent``: launched as the previous kernel's
    programmatic dependent (``nvrtc.CudaKernel.launch_params``)."""

    kernel: object  # nvrtc.CudaKernel
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    device: int
    params: KernelParams
    tensors: tuple[tuple[int, str], ...]
    zeroed: tuple[tuple[int, int, str], ...] = ()
    dependent: bool = False

    @staticmethod
    def of(
        kernel,
        grid,
        block,
        shared_mem: int,
        device: int,
        arguments: tuple,
        tensors,
        zeroed: tuple = (),
        dependent: bool = False,
    ) -> CudaLaunch:
        """The launch of ``kernel`` with ``arguments`` in its order (None at the ``tensors`` and ``zeroed``
        positions, which are pointer arguments)."""
        filled = [position for position, _ in tensors] + [position for position, _, _ in zeroed]
        if any(arguments[position] is not None for position in filled):
            raise ValueError(f"{kernel.name}: the arguments at the tensor positions {filled} must be None")
        return CudaLaunch(
            kernel, grid, block, shared_mem, device, KernelParams(*packed_arguments(kernel.name, arguments)), tensors,
            zeroed, dependent,
        )  # fmt: skip

    def __call__(self, tensors: dict[str, torch.Tensor]) -> None:
        """Launch on the current stream with ``tensors`` (by name) at the tensor parameters; the zeroed scratch
        buffers are added to ``tensors``."""
        pointers = [(position, tensors[name].data_ptr()) for position, name in self.tensors]
        # freed with ``tensors``: the caching allocator hands the memory out again only to work ordered after that
        for position, count, name in self.zeroed:
            tensors[name] = torch.zeros(count, dtype=torch.int32, device=self.device)
            pointers.append((position, tensors[name].data_ptr()))
        params = self.params
        stream = current_stream(self.device)
        with params.lock:  # only the slots' rewrite and the launch: nothing in it runs other Python
            for position, pointer in pointers:
                params.set_pointer(position, pointer)
            self.kernel.launch_params(
                self.grid, self.block, params.address, shared_mem=self.shared_mem, stream=stream,
                dependent=self.dependent,
            )  # fmt: skip
