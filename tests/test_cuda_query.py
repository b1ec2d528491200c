"""Which calls the wgmma query kernel (``codegen/cuda_query.py``) takes, checked without a GPU; its source compiles in
``test_cuda_templates.py`` and runs in ``tests/gpu/test_cuda_query.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from retention_compile.codegen import cuda_query, forward
from retention_compile.planning import Plan

PLAN = Plan(chunk_size=1024, block_t=128, block_feature=16, block_e=64, num_warps=4, num_stages=3)


def _spec(d: int = 64, e: int = 64, dtype=torch.bfloat16, gated=True, valid=False, causal=True, cherries=True):
    q, v = torch.empty(1, 1, 1, d, dtype=dtype), torch.empty(1, 1, 1, e, dtype=dtype)
    spec = forward.kernel_spec(q, v, 2, gated, valid, causal, 65536, PLAN)
    return dataclasses.replace(spec, cherries=cherries)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"gated": False}, None),
        ({"valid": True}, "key validity"),
        ({"causal": False}, "not the chunked causal path"),
        ({"cherries": False}, "chunk states not in the cherry layout"),
        ({"dtype": torch.float16}, "deg 2 in bfloat16 only"),
        ({"e": 128}, "d = e = 64 only"),
    ],
)
def test_shape_classes_it_takes(changes: dict, reason: str | None) -> None:
    assert cuda_query.query_unsupported(_spec(**changes)) == reason


def test_chunk_sizes_it_takes() -> None:
    assert cuda_query.query_unsupported_reason(None, 1024) is None
    assert cuda_query.query_unsupported_reason(None, 2048) is None
    assert "multiple of 128" in cuda_query.query_unsupported_reason(None, 192)
    assert "up to 2048" in cuda_query.query_unsupported_reason(None, 4096)


def test_calls_off_hopper_keep_the_triton_kernel(monkeypatch) -> None:
    """On a CPU tensor (no sm_90a) the route stays Triton's even with the flag on, and with the flag off always."""
    q = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    attention = {"Q": q, "K": q, "V": q, "Y": torch.empty_like(q), "S_ST": torch.empty(1, 1, 2304, 64)}
    assert cuda_query.query_unsupported_reason(attention, 1024) == "not a Hopper GPU (sm_90a)"
    monkeypatch.setattr(forward, "CUDA_QUERY", True)
    monkeypatch.setattr(forward, "CUDA_QUERY_GATED", True)
    assert forward._cuda_query_launch(_spec(), attention) is None
    monkeypatch.setattr(forward, "CUDA_QUERY", False)
    assert forward._cuda_query_launch(_spec(), attention) is None


def test_gate_rows_must_copy_in_16_byte_pieces() -> None:
    """The kernel copies the chunk's G in 16-byte pieces: rows 16-byte aligned and at least T rounded up to 4 floats
    long, else the call keeps the Triton kernel (the reason names G)."""
    T = 250
    q = torch.zeros(1, 2, T, 64, dtype=torch.bfloat16)
    base = {"Q": q, "K": q, "V": q, "Y": torch.empty_like(q), "S_ST": torch.empty(1, 1, 2304, 64)}
    padded = torch.zeros(1, 2, 256)
    cases = {
        "padded rows": (padded, None),
        "rows of T": (torch.zeros(1, 2, T), "G's rows"),  # a stride of 250 floats: rows 8 bytes off
        "shorter than T rounded up": (padded[..., :T], "G's rows"),
        "8 bytes off": (torch.zeros(1, 2, 260)[..., 2:], "G's rows"),  # a stride of 260: only the start is off
    }
    for name, (g, reason) in cases.items():
        attention = {**base, "G": g, "stride_g": g.stride(1), "gate_heads": 2}
        got = cuda_query.query_unsupported_reason(attention, 1024)
        if reason is None:  # past the gate's check: the CPU tensors' own reason
            assert got == "not a Hopper GPU (sm_90a)", name
        else:
            assert got is not None and reason in got, (name, got)


def test_shared_memory_fits_a_hopper_sm() -> None:
    """Every launch shape the bench tries fits the 227 KB an H100 or H200 block may take, two programs per SM too."""
    for stages in (3, 4):
        for gated in (False, True):
            assert cuda_query.smem_bytes(1024, gated, stages) * 2 <= 227 * 1024
    assert cuda_query.smem_bytes(1024, True, 4, packed=False) * 2 <= 227 * 1024
    assert cuda_query.smem_bytes(2048, True, 4) <= 227 * 1024
    # four warpgroups, one program per SM: up to 6 stages at chunks of 1024, gated (the template's static_assert
    # checks the size against its Shared: test_cuda_templates compiles that render)
    assert cuda_query.smem_bytes(1024, True, 6, 4) <= 227 * 1024


def test_four_warpgroups_take_chunks_of_256_rows(monkeypatch) -> None:
    """With 4 warpgroups a program holds 256 rows, which must lie in one chunk, and one program per SM (128 registers
    per thread): two are refused with the reason, not left to ptxas; 2 and 4 are the counts it renders. The source
    follows the module's launch settings as they are when asked (no render cached under the defaults' old values)."""
    monkeypatch.setattr(cuda_query, "WARPGROUPS", 4)
    assert "2 programs per SM of 4 warpgroups" in cuda_query.query_unsupported_reason(None, 1024)
    with pytest.raises(ValueError, match="under 128 registers"):
        cuda_query.render_query_source(1024, True, True, False)
    monkeypatch.setattr(cuda_query, "MIN_BLOCKS", 1)
    assert "warpgroups = 4" in cuda_query.render_query_source(1024, True, True, False)
    monkeypatch.setattr(cuda_query, "WARPGROUPS", 2)
    assert "warpgroups = 2" in cuda_query.render_query_source(1024, True, True, False)
    monkeypatch.setattr(cuda_query, "WARPGROUPS", 4)
    assert cuda_query.query_unsupported_reason(None, 1024) is None
    assert "multiple of 256" in cuda_query.query_unsupported_reason(None, 128)
    with pytest.raises(ValueError, match="warpgroups must be 2 or 4"):
        cuda_query.render_query_source(1024, True, True, False, warpgroups=3)


def test_custom_op_fake_shapes() -> None:
    """The custom op's fake implementation gives torch.compile y (B, Hq, T, 64) in the asked dtype and denom float32,
    whatever the states' and the gate's shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fake(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="cuda")

    with FakeTensorMode():
        q, kv = fake(2, 4, 300, 64), fake(2, 2, 300, 64)
        g = fake(2, 2, 304, dtype=torch.float32)
        s, m = fake(4, 3, 2304, 64), fake(4, 3, 64, 64, dtype=torch.float32)
        for y_dtype in (torch.bfloat16, torch.float32):
            y, den = torch.ops.retention_compile.cuda_query(q, kv, kv, g, s, m, 0.125, 128, True, y_dtype)
            assert (y.shape, y.dtype, y.device.type) == ((2, 4, 300, 64), y_dtype, "cuda")
            assert (den.shape, den.dtype) == ((2, 4, 300), torch.float32)
        y, _ = torch.ops.retention_compile.cuda_query(q, kv, kv, None, s, m, 0.125, 128, False, torch.bfloat16)
        assert y.shape == (2, 4, 300, 64)


def test_the_flags_choose_the_route(monkeypatch) -> None:
    """By default calls take the CUDA kernel where they can, gated or not, at chunks up to ``CUDA_QUERY_MAX_CHUNK``
    (at 2048 it measured slower); ``CUDA_QUERY_GATED`` off keeps gated calls on Triton's kernel, ``CUDA_QUERY`` off
    every call."""
    q = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    attention = {"Q": q, "K": q, "V": q, "Y": torch.empty_like(q), "S_ST": torch.empty(1, 1, 2304, 64)}
    monkeypatch.setattr(cuda_query, "query_unsupported_reason", lambda *args: None)  # as if on an H200
    ungated, gated = _spec(gated=False), _spec(gated=True)
    assert forward._takes_cuda_query(ungated, attention) and forward._takes_cuda_query(gated, attention)
    long_chunks = dataclasses.replace(gated, chunk_size=2048)
    assert cuda_query.query_unsupported(long_chunks) is None and not forward._takes_cuda_query(long_chunks, attention)
    monkeypatch.setattr(forward, "CUDA_QUERY_GATED", False)
    assert forward._takes_cuda_query(ungated, attention) and not forward._takes_cuda_query(gated, attention)
    monkeypatch.setattr(forward, "CUDA_QUERY", False)
    assert not forward._takes_cuda_query(ungated, attention)
