"""GpuSpec table and detection: published figures, cuda-python path (mocked), torch fallback, CPU-only."""

from __future__ import annotations

import enum
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from retention_compile import hardware
from retention_compile.hardware import KNOWN, GpuSpec, detect, match_known, spec_from_attributes

REQUIRED = ("A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L4", "L40S", "A10G", "RTX-3090", "RTX-4090")


@pytest.fixture(autouse=True)
def _fresh_detection():
    hardware._detect_index.cache_clear()
    yield
    hardware._detect_index.cache_clear()


def test_known_table_has_every_required_gpu_with_a_source():
    assert set(REQUIRED) <= KNOWN.keys()
    for key, spec in KNOWN.items():
        assert isinstance(spec, GpuSpec)
        assert spec.sm_count > 0 and spec.l2_bytes > 0 and spec.bf16_tflops > 0 and spec.mem_bandwidth_gbs > 0, key
        assert spec.smem_per_block_optin < spec.smem_per_sm, key
        assert "datasheet" in spec.source or "whitepaper" in spec.source, key
        assert "CUDA C++ Programming Guide" in spec.source, key


@pytest.mark.parametrize(
    ("key", "optin_kb", "sms", "cc"),
    [
        ("A100-40GB", 163, 108, (8, 0)),
        ("A100-80GB", 163, 108, (8, 0)),
        ("H100-SXM", 227, 132, (9, 0)),
        ("H100-PCIe", 227, 114, (9, 0)),
        ("H200", 227, 132, (9, 0)),
        ("L4", 99, 58, (8, 9)),
        ("L40S", 99, 142, (8, 9)),
        ("A10G", 99, 80, (8, 6)),
        ("RTX-3090", 99, 82, (8, 6)),
        ("RTX-4090", 99, 128, (8, 9)),
    ],
)
def test_published_limits(key, optin_kb, sms, cc):
    spec = KNOWN[key]
    assert spec.smem_per_block_optin == optin_kb * 1024
    assert spec.sm_count == sms
    assert spec.compute_capability == cc
    assert spec.regs_per_sm == 65536


def test_h200_matches_our_measurement():
    h200 = KNOWN["H200"]
    assert (h200.sm_count, h200.smem_per_block_optin, h200.l2_bytes) == (132, 232448, 62914560)
    assert h200.compute_capability == (9, 0)
    assert "789" in h200.source and "4245" in h200.source


@pytest.mark.parametrize(("key", "fp32"), [("A100-40GB", 19.5), ("H100-SXM", 66.9), ("L4", 30.3), ("RTX-4090", 82.6)])
def test_derived_fp32_rate_matches_datasheets(key, fp32):
    assert KNOWN[key].fp32_tflops == pytest.approx(fp32, rel=0.02)


def test_tensor_rate_per_clock():
    assert KNOWN["A100-40GB"].tensor_flops_per_clock == pytest.approx(2048, rel=0.01)
    assert KNOWN["L4"].tensor_flops_per_clock == pytest.approx(1024, rel=0.01)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA GeForce RTX 3090", "RTX-3090"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
    ],
)
def test_driver_names_match_the_table(name, key):
    assert match_known(name) is KNOWN[key]


def test_unknown_gpu_throughput_is_estimated_from_attributes():
    attrs = {"sm_count": 100, "cc_major": 9, "cc_minor": 0, "clock_khz": 1_500_000, "mem_clock_khz": 2_000_000}
    spec = spec_from_attributes("Mystery GPU", {**attrs, "mem_bus_bits": 4096}, "test")
    assert spec.bf16_tflops == pytest.approx(100 * 4096 * 1.5e9 / 1e12)
    assert spec.mem_bandwidth_gbs == pytest.approx(2 * 2e9 * 4096 / 8 / 1e9)
    assert spec.smem_per_block_optin == 227 * 1024  # from the cc 9.0 row when not reported
    assert "estimated" in spec.source


def test_detect_returns_none_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert detect() is None
    assert detect(0) is None
    assert detect("cuda:1") is None


def _hide_cuda_python(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `from cuda.bindings import runtime` raise ImportError


def test_detect_without_cuda_python_falls_back_to_torch(monkeypatch):
    _hide_cuda_python(monkeypatch)
    if not torch.cuda.is_available():
        assert detect() is None
    props = SimpleNamespace(
        name="NVIDIA L4",
        major=8,
        minor=9,
        multi_processor_count=58,
        L2_cache_size=48 * 1024 * 1024,
        shared_memory_per_multiprocessor=100 * 1024,
        max_threads_per_multi_processor=1536,
    )  # older torch: no optin / register fields -> the cc 8.9 row fills them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    hardware._detect_index.cache_clear()
    spec = detect()
    assert spec is not None and spec.sm_count == 58 and spec.compute_capability == (8, 9)
    assert spec.smem_per_block_optin == 99 * 1024 and spec.regs_per_sm == 65536
    assert spec.bf16_tflops == KNOWN["L4"].bf16_tflops
    assert "torch.cuda.get_device_properties" in spec.source


def test_detect_prefers_complete_torch_properties(monkeypatch):
    """Where torch reports every attribute, detection reads it even with cuda-python present (a stand-in here that
    reports another SM count): importing cuda-python's runtime cost 0.05 s of a GPU compile."""
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                            shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
                            regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                            L2_cache_size=62914560, clock_rate=1_980_000, memory_clock_rate=3_201_000,
                            memory_bus_width=6016)  # fmt: skip
    attrs = {"cudaDevAttrMultiProcessorCount": 7, "cudaDevAttrComputeCapabilityMajor": 9,
             "cudaDevAttrComputeCapabilityMinor": 0}  # fmt: skip
    _install_cuda_python(monkeypatch, attrs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    hardware._detect_index.cache_clear()
    spec = detect(0)
    hardware._detect_index.cache_clear()
    assert spec is not None and "torch.cuda.get_device_properties" in spec.source
    assert (spec.sm_count, spec.smem_per_block_optin, spec.mem_bus_bits, spec.clock_mhz) == (132, 232448, 6016, 1980)


class _Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorInvalidDevice = 101


def _fake_runtime(attrs: dict[str, int], name: bytes) -> ModuleType:
    """A stand-in for ``cuda.bindings.runtime`` with one device."""
    runtime = ModuleType("cuda.bindings.runtime")
    runtime.cudaError_t = _Err
    runtime.cudaDeviceAttr = enum.Enum("cudaDeviceAttr", {member: i for i, member in enumerate(attrs)})
    runtime.cudaGetDeviceCount = lambda: (_Err.cudaSuccess, 1)
    runtime.cudaDeviceGetAttribute = lambda attr, index: (_Err.cudaSuccess, attrs[attr.name])
    runtime.cudaGetDeviceProperties = lambda index: (_Err.cudaSuccess, SimpleNamespace(name=name + b"\0" * 8))
    return runtime


def _install_cuda_python(monkeypatch, attrs: dict[str, int]) -> None:
    """Put a stand-in ``cuda.bindings.runtime`` (one "NVIDIA H200" reporting ``attrs``) where imports find it."""
    bindings = ModuleType("cuda.bindings")
    bindings.runtime = _fake_runtime(attrs, b"NVIDIA H200")
    cuda = ModuleType("cuda")
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", bindings.runtime)


def test_detect_through_cuda_python(monkeypatch):
    attrs = {
        "cudaDevAttrMultiProcessorCount": 132,
        "cudaDevAttrComputeCapabilityMajor": 9,
        "cudaDevAttrComputeCapabilityMinor": 0,
        "cudaDevAttrMaxSharedMemoryPerBlockOptin": 232448,
        "cudaDevAttrMaxSharedMemoryPerMultiprocessor": 233472,
        "cudaDevAttrMaxRegistersPerMultiprocessor": 65536,
        "cudaDevAttrMaxThreadsPerMultiProcessor": 2048,
        "cudaDevAttrL2CacheSize": 62914560,
        "cudaDevAttrClockRate": 1_980_000,
        "cudaDevAttrMemoryClockRate": 3_201_000,
        "cudaDevAttrGlobalMemoryBusWidth": 6144,
    }
    _install_cuda_python(monkeypatch, attrs)
    spec = detect(0)
    assert spec is not None
    assert spec.name == "NVIDIA H200"
    assert (spec.sm_count, spec.smem_per_block_optin, spec.l2_bytes) == (132, 232448, 62914560)
    assert spec.clock_mhz == 1980 and spec.mem_bus_bits == 6144
    assert spec.bf16_tflops == KNOWN["H200"].bf16_tflops
    assert "cuda-python" in spec.source
    assert detect(0) is spec  # cached per device
