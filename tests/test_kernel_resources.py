"""Every Triton kernel the GPU path launches fits an H200's shared memory, checked on the CPU.

The forward and backward launchers run on CPU tensors with the launch itself captured instead of run; each captured
kernel is then compiled for sm_90 (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``, ptxas ships with
Triton) with the signature a CUDA launch would specialise: tensor arguments and integers divisible by 16 marked so,
integers equal to 1 baked in, and the launch's warps and stages. The compiled kernel's ``shared`` must not exceed
the H200's 227 KB per block: a kernel over it raises OutOfResources at its first launch on the GPU. Two such bugs
reached the H200 before this test (the chunked dq kernel at 393 KB, the d = 256 chunked query kernel at 272 KB);
with the code of efd2058 this test fails on the first (dq_kernel: 393472 bytes, Triton 3.9 as on 3.6).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from retention_compile import hardware, planning
from retention_compile.codegen import backward, forward

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

H200 = hardware.KNOWN["H200"]
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.bool: "i1"}
CASES = {
    # name: (T, d, e, deg, dtype, gated, chunk override or None: the H200's plan)
    "bf16-d64-gated-65536": (65536, 64, 64, 2, torch.bfloat16, True, None),
    "bf16-d128-chunked": (16384, 128, 128, 2, torch.bfloat16, False, None),
    "bf16-d256-chunk64": (300, 256, 64, 2, torch.bfloat16, True, 64),
}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: object
    kwargs: dict
    warps: int
    stages: int
    max_registers: int | None = None


def captured_launches(monkeypatch: pytest.MonkeyPatch, case: tuple) -> list[Launch]:
    """Run ``triton_forward`` and ``triton_backward`` for the case on CPU tensors, recording every launch."""
    T, d, e, deg, dtype, gated, chunk = case
    launches: list[Launch] = []

    def record(kernel, grid, kwargs, num_warps, num_stages, maxnreg=None, kept=None, dependent=False) -> None:
        launches.append(Launch(kernel, dict(kwargs), num_warps, num_stages, maxnreg))

    monkeypatch.setattr(forward, "_launch", record)
    monkeypatch.setattr(backward, "_launch", record)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = planning.plan(H200, T=T, d=d, e=e, deg=deg, dtype=dtype, gated=gated, batch_heads=8)
    if chunk is not None:
        plan = dataclasses.replace(plan, chunk_size=chunk)
    q, k = (torch.randn(1, 1, T, d, dtype=dtype) for _ in range(2))
    v, dy = (torch.randn(1, 1, T, e, dtype=dtype) for _ in range(2))
    gate = -torch.rand(1, 1, T) if gated else None
    options = {"scale": d**-0.5, "deg": deg, "log_gate": gate, "causal": True, "valid": None, "plan": plan}
    y, denom = forward.triton_forward(q, k, v, **options)
    backward.triton_backward(dy, q, k, v, y, denom.fill_(1.0), **options)
    return launches


def compile_for_sm90(launch: Launch):
    """The kernel compiled for sm_90 as a CUDA launch with these arguments would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    signature, constants, attributes = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = launch.kwargs.get(name)
        if param.is_constexpr or value is None or (isinstance(value, int) and value == 1):
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(int(value)) < 2**31 else "i64"
            if int(value) % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constants, attributes)
    options = {"num_warps": launch.warps, "num_stages": launch.stages}
    if launch.max_registers is not None:
        options["maxnreg"] = launch.max_registers
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_fit_h200_shared_memory(monkeypatch: pytest.MonkeyPatch, tmp_path, name: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    launches = captured_launches(monkeypatch, CASES[name])
    names = {launch.kernel.fn.__name__ for launch in launches}
    assert {"attention_kernel", "dq_kernel", "dkv_kernel"} <= names, names
    over, crowded = {}, {}
    seen = set()
    for launch in launches:
        fn = launch.kernel.fn
        key = (fn.__name__, fn.__module__, launch.warps, launch.stages, launch.max_registers)
        if key in seen:
            continue
        seen.add(key)
        shared = compile_for_sm90(launch).metadata.shared
        if shared > H200.smem_per_block_optin:
            over[key[0]] = shared
        # a register cap is there to put two programs on an SM: their shared memory must fit beside each other
        # (each program also takes 1 KB the runtime reserves)
        if launch.max_registers is not None and 2 * (shared + 1024) > H200.smem_per_sm:
            crowded[key[0]] = shared
    assert not over, f"{name}: shared memory (bytes) over the H200's {H200.smem_per_block_optin}: {over}"
    assert not crowded, f"{name}: capped kernels whose shared memory keeps them one per SM: {crowded}"
