"""Optional pieces that may be missing degrade clearly: without triton the aten path serves CUDA tensors with one
warning (the CPU op and the backend work as before); ``codegen``/``impl="cuda"``, which has no forward
kernel, raises an error that says why (no CUDA device, no CUDA compiler) and what to use instead.

Without cuda-python, ``hardware.detect`` reads torch's device properties: tests/test_hardware.py covers it.
CUDA tensors are simulated by ``FakeTensorMode`` (shapes and devices, no memory), which needs no GPU; the real
GPU runs are in tests/gpu/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import retention_compile as rc
from retention_compile.codegen import nvrtc

REPO_ROOT = Path(__file__).resolve().parent.parent

WITHOUT_TRITON = """
    import json, sys, warnings
    sys.modules["triton"] = None  # as if triton were not installed: ``import triton`` raises ImportError
    import torch
    import retention_compile as rc
    from retention_compile import ops
    from retention_compile.codegen import triton_supports
    from retention_compile.reference import power_retention_reference
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    cpu_error = (rc.power_retention(q, k, v, chunk_size=4) - power_retention_reference(q, k, v)).abs().max()
    with FakeTensorMode():
        cuda = torch.empty(1, 2, 9, 16, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reasons = [ops._triton_unavailable(cuda, cuda, cuda, 2, None, None, True, "auto") for _ in range(2)]

    import retention_compile.backend  # the backend imports (compiling on the CPU never needed triton)
    from retention_compile.codegen import cuda_state, eager_launch  # the CUDA state kernel launches without triton
    print(json.dumps({
        "cpu_error": float(cpu_error), "backend": "retention" in torch._dynamo.list_backends(), "reasons": reasons,
        "supports": triton_supports(q, k, v, 2, None, None, True), "warnings": [str(w.message) for w in caught],
    }))
"""


def test_without_triton_the_aten_path_serves_with_one_warning() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_TRITON)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cpu_error"] < 1e-12 and result["backend"]
    assert result["reasons"] == ["triton is not installed"] * 2 and result["supports"] == "triton is not installed"
    assert len(result["warnings"]) == 1 and "aten path" in result["warnings"][0]


def test_cuda_target_on_cpu_tensors_is_a_clear_error() -> None:
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*need a CUDA device.*Use 'auto'"):
        rc.power_retention(q, q, q, impl="cuda")


def test_cuda_target_without_a_compiler_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: None)
    monkeypatch.setattr(nvrtc, "_nvcc_path", lambda: None)
    nvrtc._nvcc_version.cache_clear()
    try:
        with FakeTensorMode():
            q = torch.empty(1, 2, 8, 16, device="cuda")
            with pytest.raises(RuntimeError, match=r"impl='cuda'.*no CUDA compiler.*pip install cuda-python"):
                rc.power_retention(q, q, q, impl="cuda")
    finally:
        nvrtc._nvcc_version.cache_clear()


def test_cuda_target_in_the_backend_fails_the_compile_with_the_reason() -> None:
    class Attention(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)

    torch._dynamo.reset()
    model = torch.compile(Attention(), backend="retention", options={"codegen": "cuda"})
    with pytest.raises(Exception, match=r"impl='cuda'.*need a CUDA device"):
        model(torch.randn(1, 2, 16, 8))
    torch._dynamo.reset()
