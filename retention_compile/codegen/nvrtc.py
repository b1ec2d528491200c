"""CUDA templates, rendered per shape, compiled at run time, cached on disk, loaded and launched.

    render(name, **params)            jinja2 template in ``retention_compile/cuda_templates`` -> CUDA C++ source
    compile_source(source, arch)      NVRTC through cuda-python (nvcc when NVRTC's library is missing) -> bytes:
                                      a cubin for ``arch = "sm_XY[a]"``, PTX text for ``arch = "compute_XY[a]"``
    cached_compile(source, arch)      the same, cached under sha256(source, arch, options, compiler, versions) in
                                      ``cache.cache_dir("cuda")``, with the rendered ``.cu`` beside each entry and
                                      a checksum that turns a truncated entry into a rebuild (``cache.py``)
    load_kernels(source, names, dev)  cuModuleLoadData + cuModuleGetFunction, once per device and source
    CudaKernel.launch(grid, block, args)  cuLaunchKernel on PyTorch's current stream
    KernelParams(values, types)       a launch's arguments packed once, for launches that repeat it

``compile_source`` needs no GPU. The architecture of a device comes from ``hardware.detect`` (``sm_90a`` on
compute capability 9.0, so Hopper-only instructions are available).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .cache import driver_version as driver_version  # re-exported: benchmarks record it
from .templating import environment

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "cuda_templates"
DEFAULT_OPTIONS = ("-std=c++17", "-lineinfo")
_ARCH = re.compile(r"^(sm|compute)_(\d+)(a?)$")
_DIAGNOSTIC = re.compile(r"\((\d+)\): (?:catastrophic )?error")


class CudaCompileError(RuntimeError):
    """A rendered CUDA source failed to compile; the message quotes the offending source lines."""


class CudaDriverError(RuntimeError):
    """A CUDA driver API call returned an error."""


def template_names() -> list[str]:
    """Every CUDA template shipped with the package (``*.cu.j2``)."""
    return sorted(p.name for p in TEMPLATE_DIR.glob("*.cu.j2"))


def render(name: str, **params: object) -> str:
    """Render template ``name`` with ``params``; an undefined parameter raises instead of rendering empty."""
    return environment(TEMPLATE_DIR).get_template(name).render(**params)


def _parse_arch(arch: str) -> tuple[str, str]:
    """``"sm_90a"`` -> ``("sm", "90a")``; rejects anything else."""
    match = _ARCH.match(arch)
    if match is None:
        raise ValueError(f"arch must look like 'sm_90', 'sm_90a' or 'compute_80', got {arch!r}")
    return match.group(1), match.group(2) + match.group(3)


def gpu_arch(device: torch.device | int | None = None) -> str:
    """The cubin target of a CUDA device: ``sm_90a`` for compute capability 9.0, else ``sm_<major><minor>``."""
    from .. import hardware

    spec = hardware.detect(device)
    major, minor = spec.compute_capability if spec is not None else torch.cuda.get_device_capability(device)
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def tensor_arch(device: torch.device) -> str | None:
    """``gpu_arch`` of a tensor's device, None for one off the GPU."""
    return gpu_arch(device.index or 0) if device.type == "cuda" else None


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int] | None:
    """NVRTC's (major, minor) through cuda-python, or None where cuda-python or its NVRTC library is missing."""
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
    except Exception:  # ImportError, or the shared library not found when first used
        return None
    return (major, minor) if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else None


def _nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate is not None and candidate.exists() else shutil.which("nvcc")


@functools.lru_cache(maxsize=1)
def _nvcc_version() -> str | None:
    nvcc = _nvcc_path()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else None


def compiler_id(compiler: str | None = None) -> str:
    """The compiler ``compile_source`` uses (NVRTC first, nvcc where NVRTC's library is missing), with version."""
    version = nvrtc_version()
    if compiler in (None, "nvrtc") and version is not None:
        return f"nvrtc-{version[0]}.{version[1]}"
    if compiler in (None, "nvcc") and _nvcc_version() is not None:
        return f"nvcc-{_nvcc_version()}"
    raise RuntimeError(
        f"no CUDA compiler available (asked for {compiler or 'any'}): install cuda-python with its NVRTC "
        "library (pip install cuda-python nvidia-cuda-nvrtc) or put nvcc on PATH / CUDA_HOME"
    )


def _compile_error(source: str, log: str, arch: str, compiler: str) -> CudaCompileError:
    """Quote each source line a diagnostic points at, so the error is readable without the file."""
    lines = source.splitlines()
    quoted = []
    for number in sorted({int(m.group(1)) for m in _DIAGNOSTIC.finditer(log)}):
        text = lines[number - 1] if 0 < number <= len(lines) else "<outside the source>"
        quoted.append(f"  line {number}: {text.strip()}")
    where = "\n".join(quoted) if quoted else "  (no line reported)"
    return CudaCompileError(
        f"{compiler} failed to compile for {arch}:\n{log.strip()}\noffending source lines:\n{where}"
    )


def _compile_nvrtc(source: str, arch: str, options: Sequence[str], name: str) -> bytes:
    from cuda.bindings import nvrtc

    def check(result: tuple) -> tuple:
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {result[0]}")
        return result[1:]

    (program,) = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        (status,) = nvrtc.nvrtcCompileProgram(program, len(opts), opts)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = check(nvrtc.nvrtcGetProgramLogSize(program))
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(program, log))
            raise _compile_error(source, log.rstrip(b"\x00").decode(errors="replace"), arch, "NVRTC")
        cubin = arch.startswith("sm_")
        get_size, get = (
            (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if cubin else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        )
        (size,) = check(get_size(program))
        out = b" " * size
        check(get(program, out))
        return out if cubin else out.rstrip(b"\x00")
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _compile_nvcc(source: str, arch: str, options: Sequence[str], name: str) -> bytes:
    kind, number = _parse_arch(arch)
    nvcc = _nvcc_path()
    assert nvcc is not None  # compiler_id checked it
    with tempfile.TemporaryDirectory(prefix="retention_nvcc_") as tmp:
        src, out = Path(tmp, name), Path(tmp, "out.bin")
        src.write_text(source)
        target = (
            ["--cubin", f"-gencode=arch=compute_{number},code=sm_{number}"]
            if kind == "sm"
            else ["--ptx", f"-arch=compute_{number}"]
        )
        proc = subprocess.run([nvcc, *target, *options, "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise _compile_error(source, proc.stderr + proc.stdout, arch, "nvcc")
        return out.read_bytes()


def compile_source(
    source: str,
    arch: str,
    *,
    options: Sequence[str] = DEFAULT_OPTIONS,
    compiler: str | None = None,
    name: str = "kernel.cu",
) -> bytes:
    """Compile ``source`` for ``arch``: a cubin for ``sm_XY[a]``, PTX for ``compute_XY[a]``. No GPU needed.

    ``compiler`` forces ``"nvrtc"`` or ``"nvcc"``; by default NVRTC, and nvcc where NVRTC's library is missing.
    Raises ``CudaCompileError`` quoting the rendered source lines the compiler complains about.
    """
    _parse_arch(arch)
    chosen = compiler_id(compiler)
    compile_with = _compile_nvrtc if chosen.startswith("nvrtc") else _compile_nvcc
    return compile_with(source, arch, options, name)


def cache_key(source: str, arch: str, options: Sequence[str], compiler: str) -> str:
    """sha256 over everything that changes the binary: source, arch, options, compiler, and (through
    ``cache.cache_key``) the torch, triton and driver versions."""
    return cache.cache_key(source, arch, "\0".join(options), compiler)


def cached_compile(
    source: str, arch: str, *, options: Sequence[str] = DEFAULT_OPTIONS, compiler: str | None = None
) -> tuple[bytes, Path]:
    """``compile_source`` through the on-disk cache; returns the binary and the path of its cache entry.

    The rendered source is kept as ``<key>.cu`` beside the entry (``<key>.cubin`` or ``<key>.ptx``), also when
    the compile fails, so a generated kernel can always be read.
    """
    chosen = compiler_id(compiler)
    key = cache_key(source, arch, options, chosen)
    entry = cache.cache_dir("cuda") / f"{key}.{'cubin' if arch.startswith('sm_') else 'ptx'}"
    binary = cache.load_checked(entry)  # None when missing, truncated or corrupt: rebuilt below
    if binary is not None:
        return binary, entry
    cache.store(entry.with_suffix(".cu"), source.encode())
    binary = compile_source(source, arch, options=options, compiler=compiler, name=f"{key[:16]}.cu")
    cache.store_checked(entry, binary)
    return binary, entry


def _check(result: tuple) -> object:
    """Unwrap a cuda-python driver result ``(CUresult, *values)``; raise ``CudaDriverError`` on failure."""
    from cuda.bindings import driver

    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaDriverError(f"CUDA driver error {name.decode() if isinstance(name, bytes) else name} ({err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def packed_arguments(name: str, args: Sequence[torch.Tensor | float | int | None]) -> tuple[list, list]:
    """Kernel ``name``'s arguments as ``cuLaunchKernel`` takes them, values and C types: a tensor as its data pointer,
    None as a null pointer, float as ``float``, int as ``int``."""
    values: list[object] = []
    types: list[object] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            values.append(arg.data_ptr())
            types.append(ctypes.c_void_p)
        elif arg is None:
            values.append(0)
            types.append(ctypes.c_void_p)
        elif isinstance(arg, float):
            values.append(arg)
            types.append(ctypes.c_float)
        elif isinstance(arg, int):
            if not -(2**31) <= arg < 2**31:
                raise OverflowError(f"{name}: the integer argument {arg} does not fit the kernel's 32-bit int")
            values.append(arg)
            types.append(ctypes.c_int)
        else:
            raise TypeError(f"{name}: cannot pass a {type(arg).__name__} to a kernel")
    return values, types


class KernelParams:
    """A launch's arguments as ``cuLaunchKernel`` reads them (``kernelParams``, a ``void**``): one C value per
    argument, of ``packed_arguments``' types, and the array of their addresses, whose own address (``address``) is
    what a launch passes. The driver copies the arguments during the call, so one block serves launch after launch of
    a kept launch, its pointers rewritten before each (``set_pointer``) while ``lock`` is held: two threads
    launching it must not interleave. Passed this way a launch costs cuda-python no packing: an empty kernel of ten
    arguments took 4.3 us of host time per launch on an H100's host, against 6.9 with values and types packed once
    and 14.5 packed per launch (``CudaKernel.launch``); 8.7 against 13.7 and 18.5 on an H200's slower host
    (``benchmarks/bench_launch.py``, 2026-12-07)."""

    def __init__(self, values: Sequence[object], types: Sequence[object]) -> None:
        self.slots = tuple(ctype(value) for value, ctype in zip(values, types, strict=True))
        self._addresses = (ctypes.c_void_p * len(self.slots))(*map(ctypes.addressof, self.slots))
        self.address = ctypes.addressof(self._addresses)
        self.lock = threading.Lock()

    def set_pointer(self, position: int, pointer: int) -> None:
        """The pointer argument at ``position`` is now ``pointer`` (a data pointer; 0 for null)."""
        self.slots[position].value = pointer

    def values(self) -> tuple[object, ...]:
        """The arguments as the next launch passes them (``arguments_at``)."""
        return arguments_at(self.address, tuple(map(type, self.slots)))


def arguments_at(address: int, types: Sequence[type]) -> tuple[object, ...]:
    """The arguments a launch passes at ``address`` (a ``KernelParams.address``), read as the driver reads them:
    each through the ``void*`` array, as a value of its C type in ``types`` (a null pointer reads None)."""
    addresses = (ctypes.c_void_p * len(types)).from_address(address)
    return tuple(ctype.from_address(at).value for ctype, at in zip(types, addresses, strict=True))


def current_stream(device_index: int | None = None) -> int:
    """The handle of PyTorch's current CUDA stream on ``device_index`` (the current device by default), as
    ``cuLaunchKernel`` takes it: 0.1 us per query, against 5.5 for ``torch.cuda.current_stream().cuda_stream`` on an
    H100's host (2026-12-07), which builds a Python stream object first."""
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if device_index is None else device_index)


@dataclass(frozen=True)
class CudaKernel:
    """One ``extern "C"`` kernel of a loaded module."""

    name: str
    function: object  # cuda.bindings.driver.CUfunction
    module: object  # the CUmodule, kept alive with the function

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[torch.Tensor | float | int | None],
        *,
        shared_mem: int = 0,
        stream: int | None = None,
    ) -> None:
        """``cuLaunchKernel`` on ``stream`` (PyTorch's current stream by default), with ``args`` as
        ``packed_arguments`` maps them to C types."""
        values, types = packed_arguments(self.name, args)
        self.launch_params(grid, block, (tuple(values), tuple(types)), shared_mem=shared_mem, stream=stream)

    def launch_params(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        params: int | tuple[tuple, tuple],
        *,
        shared_mem: int = 0,
        stream: int | None = None,
        dependent: bool = False,
    ) -> None:
        """``cuLaunchKernel`` with ``params`` as cuda-python takes ``kernelParams``: ``(values, types)``
        (``packed_arguments``), or the address of the arguments' ``void*`` array (``KernelParams.address``), which
        must hold still until the call returns. ``dependent``: ``cuLaunchKernelEx`` with programmatic stream
        serialization, so that the kernel may start once every program of the kernel before it in the stream has
        executed ``griddepcontrol.launch_dependents`` (or exited); it must then wait for what it reads by itself."""
        from cuda.bindings import driver

        if stream is None:
            stream = current_stream()
        if not dependent:
            _check(driver.cuLaunchKernel(self.function, *grid, *block, shared_mem, stream, params, 0))
            return
        _check(
            driver.cuLaunchKernelEx(_dependent_launch_config(grid, block, shared_mem, stream), self.function, params, 0)
        )

    def max_active_blocks(self, block_threads: int, shared_mem: int = 0) -> int:
        """Blocks of ``block_threads`` threads one multiprocessor holds at once (registers, shared memory)."""
        from cuda.bindings import driver

        return int(_check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, block_threads, shared_mem)))

    @property
    def num_regs(self) -> int:
        """Registers per thread, as compiled."""
        from cuda.bindings import driver

        attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS
        return int(_check(driver.cuFuncGetAttribute(attribute, self.function)))


@functools.lru_cache(maxsize=64)
def _dependent_launch_config(grid: tuple, block: tuple, shared_mem: int, stream: int) -> object:
    """``cuLaunchKernelEx``'s configuration of a launch with programmatic stream serialization allowed, kept per
    launch shape and stream (building one took 7 us of Python on the CI's CPU, looking it up 0.4)."""
    from cuda.bindings import driver

    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes = shared_mem
    config.hStream = driver.CUstream(stream)
    config.attrs = [attribute]
    config.numAttrs = 1
    return config


_LOADED: dict[tuple[int, str, tuple[str, ...]], tuple[CudaKernel, ...]] = {}


def _make_context_current(device_index: int) -> None:
    """Make the device's primary context (the one PyTorch uses) current on this thread."""
    from cuda.bindings import driver

    _check(driver.cuCtxSetCurrent(_primary_context(device_index)))


@functools.cache
def _primary_context(device_index: int) -> object:
    """Retain the primary context once per device (a retain per call would leak references)."""
    from cuda.bindings import driver

    torch.cuda.init()
    _check(driver.cuInit(0))
    return _check(driver.cuDevicePrimaryCtxRetain(_check(driver.cuDeviceGet(device_index))))


def load_kernels(source: str, names: Sequence[str], device: torch.device | int) -> tuple[CudaKernel, ...]:
    """Compile ``source`` for the device (through the cache), load it, and return the kernels ``names``."""
    from cuda.bindings import driver

    index = device if isinstance(device, int) else (device.index if device.index is not None else 0)
    key = (index, hashlib.sha256(source.encode()).hexdigest(), tuple(names))
    if key not in _LOADED:
        binary, _ = cached_compile(source, gpu_arch(index))
        with torch.cuda.device(index):
            _make_context_current(index)
            image = ctypes.create_string_buffer(binary, len(binary))  # an address every cuda-python takes
            module = _check(driver.cuModuleLoadData(ctypes.addressof(image)))
            kernels = tuple(
                CudaKernel(name, _check(driver.cuModuleGetFunction(module, name.encode())), module) for name in names
            )
        _LOADED[key] = kernels
    return _LOADED[key]
