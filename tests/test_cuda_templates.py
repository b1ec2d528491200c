"""CUDA templates without a GPU: rendering, compiling (NVRTC or nvcc), the binary cache, and the decode step's
plain-PyTorch path against the float64 oracle."""

import math

import pytest
import torch

from retention_compile.codegen import nvrtc
from retention_compile.decode import (
    DecodeKernelConfig,
    _plan,
    decode_step,
    init_state,
    render_decode_source,
)
from retention_compile.reference import power_retention_reference


def _decode_cases() -> list[str]:
    """Decode sources covering each branch of the template: dtypes, gate, GQA, deg 4, narrow and wide e."""
    cases = [
        (128, 128, 2, 12, torch.bfloat16, True, DecodeKernelConfig(256, 4)),
        (64, 64, 2, 1, torch.float32, False, DecodeKernelConfig(128, 4, pipeline=False)),
        (16, 32, 4, 2, torch.float16, True, DecodeKernelConfig(128, 2)),
    ]
    return [render_decode_source(d, e, p, g, dt, gate, _plan(e, g, cfg)) for d, e, p, g, dt, gate, cfg in cases]


RENDERERS = {"decode_step.cu.j2": _decode_cases}


def _have_compiler() -> bool:
    try:
        nvrtc.compiler_id()
    except RuntimeError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _have_compiler(), reason="neither NVRTC nor nvcc is available")


def test_every_template_has_a_render_case() -> None:
    assert nvrtc.template_names(), "no CUDA templates found"
    assert set(nvrtc.template_names()) == set(RENDERERS)


@needs_compiler
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "compute_90"])
@pytest.mark.parametrize("template", sorted(RENDERERS))
def test_template_compiles(template: str, arch: str) -> None:
    for source in RENDERERS[template]():
        binary = nvrtc.compile_source(source, arch)
        if arch.startswith("compute_"):
            text = binary.decode()
            assert ".entry retention_decode_update" in text and ".entry retention_decode_reduce" in text
            assert "ld.global.v4.f32" in text and "st.global.v4.f32" in text  # 16-byte state accesses
        else:
            assert binary[:4] == b"\x7fELF"


def test_render_rejects_missing_parameter() -> None:
    with pytest.raises(Exception, match="undefined"):
        nvrtc.render("decode_step.cu.j2", d=64)


@needs_compiler
def test_cache_keeps_source_and_reuses_binary(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    binary, entry = nvrtc.cached_compile(source, "sm_80")
    assert entry.parent == tmp_path / "retention_compile" / "cuda"
    assert entry.with_suffix(".cu").read_text() == source
    assert entry.read_bytes() == binary
    monkeypatch.setattr(nvrtc, "compile_source", lambda *a, **k: pytest.fail("cache miss"))
    assert nvrtc.cached_compile(source, "sm_80") == (binary, entry)
    assert not list(entry.parent.glob("*.tmp"))


@needs_compiler
def test_compile_error_quotes_the_rendered_line() -> None:
    source = "// line 1\n__global__ void k(float* x) {\n  x[0] = undefined_name;\n}\n"
    with pytest.raises(nvrtc.CudaCompileError, match=r"line 3: x\[0\] = undefined_name;"):
        nvrtc.compile_source(source, "sm_80")


def test_arch_is_validated() -> None:
    with pytest.raises(ValueError, match="arch"):
        nvrtc.compile_source("", "hopper")


def _random_decode_problem(B, Hk, group, T, d, e, dtype, gate_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * group, T, d, generator=g).to(dtype)
    k = torch.randn(B, Hk, T, d, generator=g).to(dtype)
    v = torch.randn(B, Hk, T, e, generator=g).to(dtype)
    gate = None
    if gate_heads is not None:
        gate = -0.2 * torch.rand(B, gate_heads, T, generator=g, dtype=torch.float64)
        gate[:, 0] = 0.0  # one head never decays: the longest accumulation
        gate = gate.to(dtype)
    return q, k, v, gate


def _decode_chain(q, k, v, state, norm, gate, start, **kwargs) -> torch.Tensor:
    """Decode tokens ``start..T-1`` one at a time on (state, norm); the outputs concatenated along time."""
    ys = []
    for t in range(start, q.shape[2]):
        step_gate = None if gate is None else gate[..., t : t + 1]
        one = slice(t, t + 1)
        ys.append(decode_step(q[:, :, one], k[:, :, one], v[:, :, one], state, norm, log_gate=step_gate, **kwargs))
    return torch.cat(ys, dim=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_decode_chain_matches_oracle(dtype: torch.dtype, group: int, gated: bool) -> None:
    """7 prefilled tokens, then 50 chained decode steps: every y equals the oracle over the full prefix."""
    B, Hk, prefix, steps, d, e = 2, 2, 7, 50, 8, 6
    T = prefix + steps
    q, k, v, gate = _random_decode_problem(B, Hk, group, T, d, e, dtype, gate_heads=Hk if gated else None)
    scale = 0.7 / math.sqrt(d)
    state, norm = init_state(
        k[:, :, :prefix], v[:, :, :prefix], deg=2, log_gate=None if gate is None else gate[..., :prefix]
    )
    y = _decode_chain(q, k, v, state, norm, gate, prefix, scale=scale, deg=2)
    ref = power_retention_reference(
        q.double(), k.double(), v.double(), scale=scale, deg=2, log_gate=None if gate is None else gate.double()
    )[:, :, prefix:]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert y.dtype == dtype
    per_step = (y.double() - ref).square().sum(dim=(0, 1, 3)).sqrt() / ref.square().sum(dim=(0, 1, 3)).sqrt()
    assert per_step.max() < tol
    full_state, full_norm = init_state(k.double(), v.double(), deg=2, log_gate=None if gate is None else gate.double())
    assert torch.allclose(state.double(), full_state, rtol=1e-4, atol=1e-4)
    assert torch.allclose(norm.double(), full_norm, rtol=1e-4, atol=1e-4)


def test_decode_state_per_query_head() -> None:
    """A gate per query head keeps one state per query head; decode matches the oracle."""
    B, Hk, group, T, d, e = 1, 2, 2, 12, 4, 5
    q, k, v, gate = _random_decode_problem(B, Hk, group, T, d, e, torch.float64, gate_heads=Hk * group, seed=3)
    state, norm = init_state(k[:, :, :4], v[:, :, :4], deg=2, log_gate=gate[..., :4])
    assert state.shape[1] == Hk * group
    y = _decode_chain(q, k, v, state, norm, gate, 4)
    ref = power_retention_reference(q, k, v, deg=2, log_gate=gate)[:, :, 4:]
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-12)


def test_decode_deg4() -> None:
    B, Hk, group, T, d, e = 1, 1, 2, 20, 4, 3
    q, k, v, gate = _random_decode_problem(B, Hk, group, T, d, e, torch.float64, gate_heads=Hk, seed=5)
    state, norm = init_state(k[:, :, :0], v[:, :, :0], deg=4)
    y = _decode_chain(q, k, v, state, norm, gate, 0, deg=4)
    ref = power_retention_reference(q, k, v, deg=4, log_gate=gate)
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-12)


def _op_args(dtype=torch.float32):
    q, k, v, gate = _random_decode_problem(2, 2, 2, 1, 8, 8, dtype, gate_heads=2, seed=7)
    state, norm = init_state(*_random_decode_problem(2, 2, 1, 5, 8, 8, dtype, seed=8)[1:3], deg=2)
    return q, k, v, state, norm, 0.3, 2, gate


def test_decode_op_opcheck() -> None:
    torch.library.opcheck(torch.ops.retention_compile.decode_step.default, _op_args())


def test_decode_under_torch_compile() -> None:
    q, k, v, state, norm, scale, deg, gate = _op_args()
    state2, norm2 = state.clone(), norm.clone()

    def step(q, k, v, state, norm, gate):
        return decode_step(q, k, v, state, norm, scale=scale, deg=deg, log_gate=gate) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, state, norm, gate), step(q, k, v, state2, norm2, gate))
    torch.testing.assert_close(state, state2)
    torch.testing.assert_close(norm, norm2)


def test_decode_rejects_bad_state() -> None:
    q, k, v, state, norm, scale, deg, gate = _op_args()
    with pytest.raises(ValueError, match="state must have shape"):
        decode_step(q, k, v, state[:, :, :-1], norm, scale=scale, log_gate=gate)
    with pytest.raises(ValueError, match="one token"):
        decode_step(q.expand(-1, -1, 2, -1), k, v, state, norm)
