"""The GPU the kernels run on: its published figures (``KNOWN``) and the detected device (``detect``).

A ``GpuSpec`` holds what the planner's cost model reads (``planning.py``):

    sm_count                 programs run ``sm_count x occupancy`` at a time (waves)
    smem_per_block_optin     bytes of shared memory one program may use (after cudaFuncSetAttribute opt-in)
    smem_per_sm, regs_per_sm, max_threads_per_sm    occupancy: programs resident per SM
    l2_bytes                 L2 size (reported; the model's L2 bandwidth is per SM and clock)
    clock_mhz                max SM clock; with the compute capability it gives the per-SM rates below
    mem_bandwidth_gbs        DRAM bandwidth, GB/s (published, or 2 x memory clock x bus width / 8)
    bf16_tflops              dense bf16 tensor-core peak with fp32 accumulation, TFLOP/s (no sparsity)

Derived rates:

    fp32_tflops              = sm_count x fp32 lanes per SM (64 on cc 8.0, else 128) x 2 x clock
    tensor_flops_per_clock   = bf16_tflops / (sm_count x clock)      (per SM: 2048 A100, 4096 H100, ...)

``detect()`` reads the device through ``torch.cuda.get_device_properties`` where this torch reports every
attribute, else through cuda-python (``cudaDeviceGetAttribute``), else from torch's partial properties; it returns
``None`` on a machine without a CUDA device. Throughput
figures are not device attributes: they come from the matching ``KNOWN`` entry, or are estimated from the
compute capability when the GPU is not in the table.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

KB = 1024
MB = 1024 * 1024

CUDA_GUIDE = "CUDA C++ Programming Guide, 'Technical Specifications per Compute Capability'"


@dataclass(frozen=True)
class GpuSpec:
    """One GPU, as the cost model sees it. Sizes in bytes, clocks in MHz, rates as documented per field."""

    name: str
    sm_count: int
    smem_per_block_optin: int
    smem_per_sm: int
    regs_per_sm: int
    l2_bytes: int
    compute_capability: tuple[int, int]
    clock_mhz: int
    mem_bandwidth_gbs: float
    bf16_tflops: float
    mem_bus_bits: int | None = None
    max_threads_per_sm: int = 2048
    source: str = ""

    @property
    def fp32_tflops(self) -> float:
        """Non-tensor fp32 peak: ``sm_count x lanes x 2 x clock`` (64 lanes per SM on cc 8.0, else 128)."""
        lanes = 64 if self.compute_capability == (8, 0) else 128
        return self.sm_count * lanes * 2 * self.clock_mhz * 1e6 / 1e12

    @property
    def tensor_flops_per_clock(self) -> float:
        """Dense bf16 tensor-core FLOP per SM per clock: ``bf16_tflops / (sm_count x clock)``."""
        return self.bf16_tflops * 1e12 / (self.sm_count * self.clock_mhz * 1e6)


# Per compute capability (CUDA guide table): smem opt-in per block, smem per SM, registers per SM,
# resident threads per SM, and dense bf16 tensor FLOP per SM per clock (datacenter parts; used only to
# estimate a GPU missing from KNOWN).
_CC_LIMITS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (8, 0): (163 * KB, 164 * KB, 65536, 2048, 2048),
    (8, 6): (99 * KB, 100 * KB, 65536, 1536, 1024),
    (8, 7): (163 * KB, 164 * KB, 65536, 2048, 1024),
    (8, 9): (99 * KB, 100 * KB, 65536, 1536, 1024),
    (9, 0): (227 * KB, 228 * KB, 65536, 2048, 4096),
    (10, 0): (227 * KB, 228 * KB, 65536, 2048, 8192),
    (12, 0): (99 * KB, 100 * KB, 65536, 1536, 1024),
}
_CC_DEFAULT = (99 * KB, 100 * KB, 65536, 1536, 1024)


def _known(
    name: str,
    cc: tuple[int, int],
    sm_count: int,
    l2_bytes: int,
    clock_mhz: int,
    mem_bandwidth_gbs: float,
    mem_bus_bits: int,
    bf16_tflops: float,
    source: str,
) -> GpuSpec:
    """A table entry: the per-SM limits follow from the compute capability (CUDA guide table)."""
    optin, per_sm, regs, threads, _ = _CC_LIMITS[cc]
    return GpuSpec(
        name=name,
        sm_count=sm_count,
        smem_per_block_optin=optin,
        smem_per_sm=per_sm,
        regs_per_sm=regs,
        l2_bytes=l2_bytes,
        compute_capability=cc,
        clock_mhz=clock_mhz,
        mem_bandwidth_gbs=mem_bandwidth_gbs,
        bf16_tflops=bf16_tflops,
        mem_bus_bits=mem_bus_bits,
        max_threads_per_sm=threads,
        source=f"{source}; smem/registers/threads per SM: {CUDA_GUIDE}, cc {cc[0]}.{cc[1]}",
    )


_A100 = "NVIDIA A100 Tensor Core GPU Architecture whitepaper (108 SMs, 40 MB L2, 1410 MHz boost, 5120-bit HBM2)"
_HOPPER = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (50 MB L2)"
_ADA = "NVIDIA Ada GPU Architecture whitepaper"
_GA102 = "NVIDIA Ampere GA102 GPU Architecture whitepaper (6 MB L2)"

KNOWN: dict[str, GpuSpec] = {
    "A100-40GB": _known(
        "NVIDIA A100-SXM4-40GB",
        (8, 0),
        108,
        40 * MB,
        1410,
        1555.0,
        5120,
        312.0,
        f"{_A100}; A100 datasheet: SXM4 40GB 1,555 GB/s, BF16 312 TFLOPS dense",
    ),
    "A100-80GB": _known(
        "NVIDIA A100-SXM4-80GB",
        (8, 0),
        108,
        40 * MB,
        1410,
        2039.0,
        5120,
        312.0,
        f"{_A100}; A100 datasheet: SXM4 80GB HBM2e 2,039 GB/s, BF16 312 TFLOPS dense",
    ),
    "H100-SXM": _known(
        "NVIDIA H100 80GB HBM3",
        (9, 0),
        132,
        50 * MB,
        1980,
        3350.0,
        5120,
        989.0,
        f"{_HOPPER}: SXM5 132 SMs; H100 datasheet: SXM 3.35 TB/s, BF16 1,979 TFLOPS with sparsity = 989 dense",
    ),
    "H100-PCIe": _known(
        "NVIDIA H100 PCIe",
        (9, 0),
        114,
        50 * MB,
        1755,
        2000.0,
        5120,
        756.0,
        f"{_HOPPER}: PCIe 114 SMs; H100 datasheet: PCIe 2 TB/s, BF16 1,513 TFLOPS with sparsity = 756 dense",
    ),
    "H200": _known(
        "NVIDIA H200",
        (9, 0),
        132,
        60 * MB,
        1980,
        4800.0,
        6144,
        989.0,
        "H200 datasheet: 4.8 TB/s HBM3e, BF16 1,979 TFLOPS with sparsity = 989 dense; measured on our H200: "
        "132 SMs, smem opt-in 232448 B, L2 62914560 B, cc 9.0, bf16 matmul ~789 TFLOP/s, copy ~4245 GB/s",
    ),
    "L4": _known(
        "NVIDIA L4",
        (8, 9),
        58,
        48 * MB,
        2040,
        300.0,
        192,
        121.0,
        f"{_ADA} (AD104, 48 MB L2); L4 datasheet: 58 SMs, 300 GB/s, BF16 242 TFLOPS with sparsity = 121 dense",
    ),
    "L40S": _known(
        "NVIDIA L40S",
        (8, 9),
        142,
        96 * MB,
        2520,
        864.0,
        384,
        362.0,
        f"{_ADA} (AD102, 96 MB L2); L40S datasheet: 142 SMs, 864 GB/s, BF16 733 TFLOPS with sparsity = 362 dense",
    ),
    "A10G": _known(
        "NVIDIA A10G",
        (8, 6),
        80,
        6 * MB,
        1710,
        600.0,
        384,
        70.0,
        f"{_GA102}; AWS EC2 G5 / A10G published figures: 80 SMs, 1710 MHz, 600 GB/s, ~70 TFLOPS BF16 dense",
    ),
    "RTX-3090": _known(
        "NVIDIA GeForce RTX 3090",
        (8, 6),
        82,
        6 * MB,
        1695,
        936.0,
        384,
        71.0,
        f"{_GA102}: RTX 3090 82 SMs, 1695 MHz, 936 GB/s, BF16 with FP32 accumulate 71 TFLOPS dense",
    ),
    "RTX-4090": _known(
        "NVIDIA GeForce RTX 4090",
        (8, 9),
        128,
        72 * MB,
        2520,
        1008.0,
        384,
        165.2,
        f"{_ADA}: RTX 4090 128 SMs, 72 MB L2, 2520 MHz, 1008 GB/s, BF16 with FP32 accumulate 165.2 TFLOPS dense",
    ),
}

# Device name (as the driver reports it) -> KNOWN key; first match wins.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"H200", "H200"),
    (r"H100.*PCIe", "H100-PCIe"),
    (r"H100", "H100-SXM"),
    (r"A100.*80GB", "A100-80GB"),
    (r"A100", "A100-40GB"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"A10G", "A10G"),
    (r"RTX 4090", "RTX-4090"),
    (r"RTX 3090", "RTX-3090"),
)


def match_known(device_name: str) -> GpuSpec | None:
    """The ``KNOWN`` entry for a driver-reported name such as "NVIDIA H100 80GB HBM3", or None."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return KNOWN[key]
    return None


def spec_from_attributes(name: str, attrs: dict[str, int], via: str) -> GpuSpec:
    """A ``GpuSpec`` from device attributes; missing limits come from the compute capability's table row.

    ``attrs`` keys: sm_count, cc_major, cc_minor, and where available smem_per_block_optin, smem_per_sm,
    regs_per_sm, max_threads_per_sm, l2_bytes, clock_khz, mem_clock_khz, mem_bus_bits. Throughput: the
    matching KNOWN entry's published figures, else ``bf16 = sm_count x FLOP/clock (cc row) x clock`` and
    ``bandwidth = 2 x memory clock x bus width / 8``.
    """
    cc = (attrs["cc_major"], attrs["cc_minor"])
    optin, per_sm, regs, threads, flops_per_clock = _CC_LIMITS.get(cc, _CC_DEFAULT)
    known = match_known(name)
    sm_count = attrs["sm_count"]
    clock_mhz = attrs.get("clock_khz", 0) // 1000 or (known.clock_mhz if known else 1500)
    bus = attrs.get("mem_bus_bits") or (known.mem_bus_bits if known else None)
    if known is not None:
        bandwidth, bf16, origin = known.mem_bandwidth_gbs, known.bf16_tflops, f"throughput from KNOWN: {known.source}"
    else:
        bandwidth = 2 * attrs.get("mem_clock_khz", 0) * 1e3 * (bus or 0) / 8 / 1e9 or 1000.0
        bf16 = sm_count * flops_per_clock * clock_mhz * 1e6 / 1e12
        origin = f"throughput estimated from cc {cc[0]}.{cc[1]} ({flops_per_clock} FLOP/clock/SM) and memory clocks"
    return GpuSpec(
        name=name,
        sm_count=sm_count,
        smem_per_block_optin=attrs.get("smem_per_block_optin") or optin,
        smem_per_sm=attrs.get("smem_per_sm") or per_sm,
        regs_per_sm=attrs.get("regs_per_sm") or regs,
        l2_bytes=attrs.get("l2_bytes") or (known.l2_bytes if known else 0),
        compute_capability=cc,
        clock_mhz=clock_mhz,
        mem_bandwidth_gbs=bandwidth,
        bf16_tflops=bf16,
        mem_bus_bits=bus,
        max_threads_per_sm=attrs.get("max_threads_per_sm") or threads,
        source=f"detected via {via}; {origin}",
    )


# GpuSpec attribute key -> cudaDeviceAttr member name.
_CUDA_ATTRIBUTES = {
    "sm_count": "cudaDevAttrMultiProcessorCount",
    "cc_major": "cudaDevAttrComputeCapabilityMajor",
    "cc_minor": "cudaDevAttrComputeCapabilityMinor",
    "smem_per_block_optin": "cudaDevAttrMaxSharedMemoryPerBlockOptin",
    "smem_per_sm": "cudaDevAttrMaxSharedMemoryPerMultiprocessor",
    "regs_per_sm": "cudaDevAttrMaxRegistersPerMultiprocessor",
    "max_threads_per_sm": "cudaDevAttrMaxThreadsPerMultiProcessor",
    "l2_bytes": "cudaDevAttrL2CacheSize",
    "clock_khz": "cudaDevAttrClockRate",
    "mem_clock_khz": "cudaDevAttrMemoryClockRate",
    "mem_bus_bits": "cudaDevAttrGlobalMemoryBusWidth",
}


def _detect_cuda_python(index: int) -> GpuSpec | None:
    """Read the device through cuda-python's runtime bindings; None if they are missing or see no device."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess or index >= count:
        return None
    attrs: dict[str, int] = {}
    for key, member in _CUDA_ATTRIBUTES.items():
        attr = getattr(runtime.cudaDeviceAttr, member, None)
        if attr is None:
            continue
        err, value = runtime.cudaDeviceGetAttribute(attr, index)
        if err == runtime.cudaError_t.cudaSuccess:
            attrs[key] = int(value)
    err, props = runtime.cudaGetDeviceProperties(index)
    if err != runtime.cudaError_t.cudaSuccess or not {"sm_count", "cc_major", "cc_minor"} <= attrs.keys():
        return None
    name = bytes(props.name).split(b"\0", 1)[0].decode(errors="replace")
    return spec_from_attributes(name, attrs, "cuda-python (cudaDeviceGetAttribute)")


# torch.cuda.get_device_properties field -> GpuSpec attribute key (fields vary across torch versions).
_TORCH_FIELDS = {
    "multi_processor_count": "sm_count",
    "major": "cc_major",
    "minor": "cc_minor",
    "shared_memory_per_block_optin": "smem_per_block_optin",
    "shared_memory_per_multiprocessor": "smem_per_sm",
    "regs_per_multiprocessor": "regs_per_sm",
    "max_threads_per_multi_processor": "max_threads_per_sm",
    "L2_cache_size": "l2_bytes",
    "clock_rate": "clock_khz",
    "memory_clock_rate": "mem_clock_khz",
    "memory_bus_width": "mem_bus_bits",
}


def _torch_attributes(index: int) -> tuple[str, dict[str, int]] | None:
    """The device's name and the ``_TORCH_FIELDS`` this torch's ``get_device_properties`` reports; None without a
    CUDA device."""
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    props: Any = torch.cuda.get_device_properties(index)
    attrs = {key: int(getattr(props, field)) for field, key in _TORCH_FIELDS.items() if hasattr(props, field)}
    return props.name, attrs


def _device_index(device: int | str | torch.device | None) -> int:
    """The CUDA ordinal of ``device`` (None or a bare "cuda": the current device, else 0)."""
    if isinstance(device, int):
        return device
    if device is not None and torch.device(device).index is not None:
        return torch.device(device).index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


@functools.lru_cache(maxsize=16)
def _detect_index(index: int) -> GpuSpec | None:
    read = _torch_attributes(index)
    from_torch = None if read is None else spec_from_attributes(*read, "torch.cuda.get_device_properties")
    if read is not None and len(read[1]) == len(_TORCH_FIELDS):
        return from_torch
    return _detect_cuda_python(index) or from_torch


def detect(device: int | str | torch.device | None = None) -> GpuSpec | None:
    """The ``GpuSpec`` of a CUDA device (default: the current one), or None on a machine without one.

    Reads torch's device properties where they hold every attribute (torch 2.11 and 2.13 do: the same values as
    cuda-python's, checked on the H200), since importing cuda-python's runtime cost 0.05 s of a compile on the H200;
    else cuda-python's runtime (imported lazily: it may be missing), then torch's partial properties; cached per
    device.
    """
    return _detect_index(_device_index(device))
