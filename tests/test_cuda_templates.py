"""CUDA templates without a GPU: rendering, compiling (NVRTC or nvcc) for sm_80 and sm_90, the binary cache, the
decode step's plain-PyTorch path against the float64 oracle, and the chunk-state op's fake implementation and
measured choice."""

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from retention_compile.codegen import choice, cuda_query, cuda_reverse, cuda_state, cuda_state_terms, nvrtc
from retention_compile.codegen.cuda_state import StateKernelConfig, cuda_state_unsupported, state_spec
from retention_compile.codegen.forward import kernel_spec
from retention_compile.decode import (
    DecodeKernelConfig,
    _plan,
    decode_step,
    init_state,
    render_decode_source,
)
from retention_compile.planning import Plan
from retention_compile.reference import power_retention_reference


def _decode_cases() -> list[str]:
    """Decode sources covering each branch of the template: dtypes, gate, GQA, deg 4, narrow and wide e."""
    cases = [
        (128, 128, 2, 12, torch.bfloat16, True, DecodeKernelConfig(256, 4)),
        (64, 64, 2, 1, torch.float32, False, DecodeKernelConfig(128, 4, pipeline=False)),
        (16, 32, 4, 2, torch.float16, True, DecodeKernelConfig(128, 2)),
    ]
    return [render_decode_source(d, e, p, g, dt, gate, _plan(e, g, cfg)) for d, e, p, g, dt, gate, cfg in cases]


def _state_cases() -> list[str]:
    """Chunk-state sources covering each branch of the template: dtypes, gate, validity, non-causal, two value
    blocks, a 48-column block, and the launch shapes (4 or 8 warps, 32 to 128 keys per step, 2 or 3 stages)."""
    cases = [  # (d, e, dtype, gated, valid, causal, chunk, config)
        (64, 64, torch.bfloat16, True, False, True, 1024, cuda_state.CONFIG),
        (64, 64, torch.float16, False, True, False, 256, StateKernelConfig(4, 64, 1, 1, stages=3)),
        (128, 128, torch.bfloat16, False, False, True, 512, StateKernelConfig(8, 32, 2, 2)),
        (32, 48, torch.bfloat16, True, True, True, 64, StateKernelConfig(8, 128, 4, 2, stages=3)),
    ]
    sources = []
    for d, e, dtype, gated, valid, causal, chunk, config in cases:
        k, v = torch.empty(1, 1, 1, d, dtype=dtype), torch.empty(1, 1, 1, e, dtype=dtype)
        sources.append(cuda_state.render_state_source(state_spec(k, v, chunk, causal, gated, valid), config))
    return sources


def _wgmma_state_cases() -> list[str]:
    """wgmma chunk-state sources (sm_90a): gate, validity, non-causal, two value blocks, d = 32 and 128, the
    register caps for one or two programs per SM with 1, 2 or 4 slices in flight, and the cherry layout (gated and
    not, causal and not)."""
    wgmma = dataclasses.replace(cuda_state.CONFIG, wgmma=True)
    cases = [  # (d, e, gated, valid, causal, chunk, config, cherries)
        (64, 64, True, False, True, 1024, wgmma, False),
        (64, 64, False, True, False, 256, dataclasses.replace(wgmma, wgmma_min_blocks=1, wgmma_in_flight=4), False),
        (128, 128, True, True, True, 512, dataclasses.replace(wgmma, wgmma_in_flight=1), False),
        (32, 64, False, False, True, 64, wgmma, False),
        (64, 64, False, False, True, 1024, wgmma, True),
        (64, 128, True, True, False, 256, wgmma, True),
    ]
    sources = []
    for d, e, gated, valid, causal, chunk, config, cherries in cases:
        k, v = torch.empty(1, 1, 1, d, dtype=torch.bfloat16), torch.empty(1, 1, 1, e, dtype=torch.bfloat16)
        spec = state_spec(k, v, chunk, causal, gated, valid, cherries)
        assert cuda_state.uses_wgmma(spec, config, "sm_90a")
        sources.append(cuda_state.render_state_source(spec, config, "sm_90a"))
    return sources


def _wgmma_reverse_cases() -> list[str]:
    """wgmma reverse-state sources (sm_90a): gate, coordinate terms, non-causal, two value blocks, d = 32 and 128."""
    cases = [  # (d, e, gated, causal, chunk, coordinate terms)
        (64, 64, True, True, 1024, True),
        (64, 64, False, True, 512, False),
        (128, 128, False, False, 256, False),
        (32, 64, True, True, 256, False),
    ]
    sources = []
    for d, e, gated, causal, chunk, coordinate_terms in cases:
        q, dy = torch.empty(1, 1, 1, d, dtype=torch.bfloat16), torch.empty(1, 1, 1, e, dtype=torch.bfloat16)
        fwd = state_spec(q, dy, chunk, causal, gated, False)
        assert cuda_reverse.reverse_unsupported(fwd, "sm_90a") is None
        sources.append(cuda_reverse.render_reverse_source(fwd, coordinate_terms, cuda_state.CONFIG))
    return sources


def _wgmma_state_terms_cases() -> list[str]:
    """wgmma state-term sources (dv, dk, dq) (sm_90a): ungated, gated with validity and coordinate terms, non-causal,
    d = 32."""
    cases = [  # (d, gated, valid, causal, chunk, coordinate terms)
        (64, False, False, True, 1024, False),
        (64, True, True, True, 512, True),
        (64, False, True, False, 256, False),
        (32, True, False, True, 256, True),
    ]
    sources = []
    for d, gated, valid, causal, chunk, coordinate_terms in cases:
        k, v = torch.empty(1, 1, 1, d, dtype=torch.bfloat16), torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
        fwd = state_spec(k, v, chunk, causal, gated, valid)
        assert cuda_state_terms.state_terms_unsupported(fwd, "sm_90a") is None
        sources.append(cuda_state_terms.render_state_terms_source(fwd, coordinate_terms))
    return sources


def _wgmma_query_cases() -> list[str]:
    """wgmma query sources (sm_90a): gated with packed squares and bf16 y (the op's inference route), ungated with
    float32 squares and a float32 y (a forward a backward follows), chunks of 256, the keys-alone render of the
    GPU check, and the gated route with 4 warpgroups per program (one program per SM, 4 stages) beside the state
    kernel (waiting on the fold's counts)."""
    cases = [  # (chunk, gated, packed, y float32, parts, warpgroups, min_blocks, stages, waits)
        (1024, True, True, False, "both", 2, None, None, False),
        (1024, False, False, True, "both", 2, None, None, False),
        (256, True, False, False, "both", 2, None, None, False),
        (1024, False, True, False, "keys", 2, None, None, False),
        (1024, True, True, False, "both", 4, 1, 4, True),
    ]
    return [
        cuda_query.render_query_source(c, g, p, y, stages, blocks, parts, groups, waits)
        for c, g, p, y, parts, groups, blocks, stages, waits in cases
    ]


RENDERERS = {
    "query_wgmma.cu.j2": _wgmma_query_cases,
    "state_terms_wgmma.cu.j2": _wgmma_state_terms_cases,
    "decode_step.cu.j2": _decode_cases,
    "chunk_state.cu.j2": _state_cases,
    "chunk_state_wgmma.cu.j2": _wgmma_state_cases,
    "reverse_state_wgmma.cu.j2": _wgmma_reverse_cases,
}
ARCHS = {  # the others: sm_80, sm_90a, compute_90
    "query_wgmma.cu.j2": ("sm_90a", "compute_90a"),
    "state_terms_wgmma.cu.j2": ("sm_90a", "compute_90a"),
    "chunk_state_wgmma.cu.j2": ("sm_90a", "compute_90a"),
    "reverse_state_wgmma.cu.j2": ("sm_90a", "compute_90a"),
}
PTX_MARKERS = {  # what each template's PTX must contain: its kernels and the instructions it is built around
    "query_wgmma.cu.j2": (
        ".entry retention_query",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",  # the state term, q M and q K^T, A from registers
        "wgmma.mma_async.sync.aligned.m64n72k16.f32.bf16.bf16",  # P V with the weight sums in columns 64-71
        "mul.rn.bf16x2",  # phi(q), rounded once
        "cp.async.cg.shared.global",
    ),
    "decode_step.cu.j2": (
        ".entry retention_decode_update",
        ".entry retention_decode_reduce",
        "ld.global.v4.f32",  # 16-byte state accesses
        "st.global.v4.f32",
    ),
    "chunk_state.cu.j2": (
        ".entry retention_chunk_state",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",  # tensor cores, bf16 operands
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global",  # the copy pipeline
    ),
    "chunk_state_wgmma.cu.j2": (
        ".entry retention_chunk_state",
        # the state product, A from registers, and the normaliser in columns 64-71 (times a block of ones)
        "wgmma.mma_async.sync.aligned.m64n72k16.f32.bf16.bf16",
        "mul.rn.bf16x2",  # the features, rounded once
        "cp.async.cg.shared.global",
    ),
    "state_terms_wgmma.cu.j2": (
        ".entry retention_dkv_state_dv",
        ".entry retention_dkv_state_dk",
        ".entry retention_dq_state",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",  # both products
        "mul.rn.bf16x2",  # phi(k), rounded once
        "shfl.sync.bfly.b32",  # block I's sums over b across the quad
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",  # P_c k and (M_c + M_c^T) q, hi and lo parts
        "cp.async.cg.shared.global",
    ),
    "reverse_state_wgmma.cu.j2": (
        ".entry retention_reverse_state",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",  # R, A (the features) from registers
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16",  # P, times the dZ column
        "mul.rn.bf16x2",
        "cp.async.cg.shared.global",
    ),
}
TEMPLATE_ARCHS = [(t, a) for t in sorted(RENDERERS) for a in ARCHS.get(t, ("sm_80", "sm_90a", "compute_90"))]
# Templates whose machine code (ptxas) is built for a subset of their cases, the others' PTX only (compute_*): the
# state-term sources take about 28 s each through ptxas on the CI's 2-core machine (111 s for the four; two took 181 s
# on a slow day, 2026-12-04); the gated, valid, coordinate-terms case (the most code) keeps the SASS check.
SASS_CASES = {"state_terms_wgmma.cu.j2": (1,), "query_wgmma.cu.j2": (0, 4)}


def _have_compiler() -> bool:
    try:
        nvrtc.compiler_id()
    except RuntimeError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _have_compiler(), reason="neither NVRTC nor nvcc is available")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_every_template_has_a_render_case() -> None:
    assert nvrtc.template_names(), "no CUDA templates found"
    assert set(nvrtc.template_names()) == set(RENDERERS)


@needs_compiler
@pytest.mark.parametrize(("template", "arch"), TEMPLATE_ARCHS)
def test_template_compiles(template: str, arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = RENDERERS[template]()
    if not arch.startswith("compute_") and template in SASS_CASES:
        sources = [sources[i] for i in SASS_CASES[template]]
    for index, source in enumerate(sources):
        binary = nvrtc.compile_source(source, arch)
        if arch.startswith("compute_"):
            text = binary.decode()
            assert all(marker in text for marker in PTX_MARKERS[template])
        else:
            assert binary[:4] == b"\x7fELF"
            if arch == "sm_90a":
                cubin = tmp_path / f"case{index}.cubin"
                cubin.write_bytes(binary)
                _assert_no_unwritten_uniform_reads(cubin, monkeypatch)


def _assert_no_unwritten_uniform_reads(cubin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sm_90a machine code reads no uniform register that nothing writes: the form of ptxas 12.8's miscompile of a
    Triton kernel (backward_notes, session 69), by ``benchmarks/miscompiled_lengths.py``'s scan of the SASS that
    ``benchmarks/sass_loops.py`` disassembles with Triton's bundled ``cuobjdump``, where it is installed."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import miscompiled_lengths
    import sass_loops

    try:
        sass, _ = sass_loops.disassemble(cubin, None)
    except FileNotFoundError:
        pytest.skip("Triton's bundled cuobjdump is missing")
    assert "HGMMA" in sass or "HMMA" in sass or "FFMA" in sass, "cuobjdump printed no machine code"
    assert miscompiled_lengths.unwritten_uniform_reads(sass) == []


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


@pytest.mark.parametrize("gated", [False, True])
def test_a_decode_steps_launches_pass_its_tensors_in_the_kernels_parameter_order(
    gated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_launch_decode``'s two launches (kept per shape), their arguments read as the driver would, against the
    parameter lists of the rendered kernels: each tensor at its parameter (the gate a null pointer without one), the
    partial sums' halves of one workspace, y returned, the scale a float32 last, and the launches' grids."""
    from retention_compile import decode
    from retention_compile.codegen import eager_launch

    d, e, deg, Hk, group, B, scale = 16, 32, 2, 2, 2, 3, 0.1
    cfg = _plan(e, group, DecodeKernelConfig(128, 2))
    source = render_decode_source(d, e, deg, group, torch.bfloat16, gated, cfg)

    def parameters(kernel: str) -> list[str]:
        listed = re.sub(r"//[^\n]*", "", re.search(kernel + r"\((.*?)\)\s*\{", source, re.S).group(1))
        return [p.split()[-1].lstrip("*") for p in listed.split(",")]

    assert parameters("retention_decode_update") == [
        "q", "k", "v", "log_gate", "state", "norm", "num_part", "den_part", "scale"
    ]  # fmt: skip
    assert parameters("retention_decode_reduce") == ["num_part", "den_part", "y"]
    pointer, single = nvrtc.ctypes.c_void_p, nvrtc.ctypes.c_float
    reads = []

    class Kernel:
        def __init__(self, *types: type) -> None:
            self.name, self.types = "sample", types

        def launch_params(self, grid, block, params, **options) -> None:
            reads.append((grid, block, nvrtc.arguments_at(params, self.types)))

    kernels = (Kernel(*[pointer] * 8, single), Kernel(pointer, pointer, pointer))
    monkeypatch.setattr(decode, "decode_kernels", lambda *key: kernels)
    monkeypatch.setattr(eager_launch, "current_stream", lambda device: 0)
    decode.decode_launches.cache_clear()
    q = torch.randn(B, Hk * group, 1, d, dtype=torch.bfloat16)
    k, v = torch.randn(B, Hk, 1, d, dtype=torch.bfloat16), torch.randn(B, Hk, 1, e, dtype=torch.bfloat16)
    state, norm = torch.zeros(B, Hk, math.comb(d + 1, 2), e), torch.zeros(B, Hk, math.comb(d + 1, 2))
    gate = -torch.rand(B, Hk, 1) if gated else None
    y = decode._launch_decode(q, k, v, state, norm, scale, deg, gate, cfg)
    decode.decode_launches.cache_clear()
    (update_grid, update_block, update), (reduce_grid, reduce_block, reduce) = reads
    slices = -(-math.comb(d + 1, 2) // cfg.rows)
    num = update[6]
    assert update == (q.data_ptr(), k.data_ptr(), v.data_ptr(), gate.data_ptr() if gated else None, state.data_ptr(),
                      norm.data_ptr(), num, num + 4 * slices * B * Hk * group * e, single(scale).value)  # fmt: skip
    assert reduce == (update[6], update[7], y.data_ptr())
    assert y.shape == (B, Hk * group, 1, e) and y.dtype == torch.bfloat16
    assert (update_grid, update_block) == ((slices, B * Hk, 1), (decode.THREADS, 1, 1))
    assert (reduce_grid, reduce_block) == ((B * Hk * group, 1, 1), (e, 1, 1))


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


@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_under_torch_compile(dynamic: bool) -> None:
    """One graph, state updated in place as eagerly. ``dynamic=True`` makes the head dim symbolic: the check of the
    state's shape computed D with ``math.comb`` and broke the graph (fullgraph raised)."""
    q, k, v, state, norm, scale, deg, gate = _op_args()
    state2, norm2 = state.clone(), norm.clone()

    def step(q, k, v, state, norm, gate):
        return decode_step(q, k, v, state, norm, scale=scale, deg=deg, log_gate=gate) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(q, k, v, state, norm, gate), step(q, k, v, state2, norm2, gate))
    torch.testing.assert_close(state, state2)
    torch.testing.assert_close(norm, norm2)


def test_decode_rejects_bad_state() -> None:
    q, k, v, state, norm, scale, deg, gate = _op_args()
    with pytest.raises(ValueError, match="state must have shape"):
        decode_step(q, k, v, state[:, :, :-1], norm, scale=scale, log_gate=gate)
    with pytest.raises(ValueError, match="one token"):
        decode_step(q.expand(-1, -1, 2, -1), k, v, state, norm)


def _fake_cuda(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_chunk_state_op_fake_shapes() -> None:
    """The fake implementation gives torch.compile the buffers' shapes: LOC per chunk, SEG per segment + 1."""
    with FakeTensorMode():
        k, v, g = _fake_cuda(2, 3, 100, 64), _fake_cuda(2, 3, 100, 32), _fake_cuda(2, 6, 112, dtype=torch.float32)
        sizes = [6, 1, 6, 100, 28, 4, 2, 2]  # Hq, group, state_heads, Tk, shift, n_chunks, chunks_per_seg, n_seg
        s_loc, m_loc, s_seg, m_seg, sync = torch.ops.retention_compile.cuda_chunk_states(k, v, g, None, sizes, 32, True)
        assert (s_loc.shape, s_loc.dtype) == ((12, 4, 2560, 32), torch.bfloat16)
        assert sync.dtype == torch.int32 and sync.dim() == 1
        assert (m_loc.shape, s_seg.shape, m_seg.shape) == ((12, 4, 64, 64), (12, 3, 2560, 32), (12, 3, 64, 64))
        s_loc, *_ = torch.ops.retention_compile.cuda_chunk_states(k, v, None, None, sizes, 32, False)
        assert s_loc.shape[1] == 0  # non-causal: no per-chunk states
        s_loc, _, s_seg, _, _ = torch.ops.retention_compile.cuda_chunk_states(k, v, g, None, sizes, 32, True, True)
        assert s_loc.shape == (12, 4, 2304, 32) and s_seg.shape == (12, 3, 2304, 32)  # the cherry layout's rows


def test_reverse_state_op_fake_shapes() -> None:
    """The reverse-state op's fake implementation: R bf16 and P per slot, R and P fp32 per segment (no extra slot)."""
    op = torch.ops.retention_compile.cuda_reverse_states
    with FakeTensorMode():
        q, dy = _fake_cuda(2, 6, 90, 64), _fake_cuda(2, 6, 90, 128)
        den, dz, g = (_fake_cuda(2, 6, 90, dtype=torch.float32) for _ in range(3))
        sizes = [6, 3, 4, 30, 90, 120, 2, 2]  # Hq, state_heads, state_slots, shift, Tq, Tk, chunks_per_seg, n_seg
        r, p, r_seg, p_seg = op(q, dy, den, dz, g, sizes, 32, True, True, 0.125)
        assert (r.shape, r.dtype) == ((6, 4, 2560, 128), torch.bfloat16)
        assert (p.shape, p.dtype) == ((6, 4, 64, 64), torch.float32)
        assert (r_seg.shape, p_seg.shape) == ((6, 2, 2560, 128), (6, 2, 64, 64))


def test_dkv_state_op_fake_updates_in_place() -> None:
    """The dk/dv state-term op mutates its three gradient buffers and returns nothing: under fake tensors it traces
    as one call with the buffers' shapes untouched."""
    op = torch.ops.retention_compile.cuda_dkv_state
    with FakeTensorMode():
        k, v = _fake_cuda(2, 2, 300, 64), _fake_cuda(2, 2, 300, 64)
        r, p = _fake_cuda(4, 3, 2560, 64), _fake_cuda(4, 3, 64, 64, dtype=torch.float32)
        dk, dv = _fake_cuda(2, 2, 300, 64, dtype=torch.float32), _fake_cuda(2, 2, 300, 64, dtype=torch.float32)
        kterm = _fake_cuda(2, 2, 300, dtype=torch.float32)
        g = _fake_cuda(2, 2, 300, dtype=torch.float32)
        sizes = [4, 2, 2, 3, 84, 300]  # Hq, group, state_heads, state_slots, shift, Tk
        dk_out = _fake_cuda(2, 2, 300, 64)
        assert op(k, v, r, p, g, None, dk, dv, kterm, dk_out, None, sizes, 128, True, True) is None
        assert dk.shape == (2, 2, 300, 64) and kterm.shape == (2, 2, 300)
    schema = op.default._schema
    assert [a.name for a in schema.arguments if a.is_write] == ["dk", "dv", "kterm", "dk_out", "dv_out"]


def test_dq_state_op_fake_updates_in_place() -> None:
    """The dq state-term op mutates dq alone and returns nothing."""
    op = torch.ops.retention_compile.cuda_dq_state
    with FakeTensorMode():
        q, dy = _fake_cuda(2, 4, 300, 64), _fake_cuda(2, 4, 300, 64)
        den, dz = _fake_cuda(2, 4, 300, dtype=torch.float32), _fake_cuda(2, 4, 300, dtype=torch.float32)
        s, m = _fake_cuda(4, 3, 2560, 64), _fake_cuda(4, 3, 64, 64, dtype=torch.float32)
        dq = _fake_cuda(2, 4, 300, 64, dtype=torch.float32)
        sizes = [4, 2, 3, 84, 300, 300]  # Hq, state_heads, state_slots, shift, Tq, Tk
        assert op(q, dy, den, dz, s, m, None, dq, None, sizes, 128, True, False, False, 0.125) is None
    schema = op.default._schema
    assert [a.name for a in schema.arguments if a.is_write] == ["dq", "dq_out"]


def test_state_term_ops_refuse_what_they_would_misread() -> None:
    """The kernels read bf16 state tiles and store bf16 final gradients: float32 states (the non-causal segment
    totals; ``add_dq_state_terms`` converts the last slot first) and a float32 final output are refused by name,
    not read or written as wrong numbers."""
    q, dy = torch.randn(1, 2, 130, 64, dtype=torch.bfloat16), torch.randn(1, 2, 130, 64, dtype=torch.bfloat16)
    den, dz = torch.ones(1, 2, 130), torch.zeros(1, 2, 130)
    s, m = torch.randn(2, 1, 2560, 64), torch.randn(2, 1, 64, 64)
    dq = torch.zeros(1, 2, 130, 64)
    with pytest.raises(ValueError, match="bf16 states, got torch.float32"):
        torch.ops.retention_compile.cuda_dq_state(q, dy, den, dz, s, m, None, dq, None, [2, 2, 1, 0, 130, 130], 128,
                                                  False, False, False, 0.125)  # fmt: skip
    with pytest.raises(ValueError, match="bf16 states, got torch.float32"):
        torch.ops.retention_compile.cuda_dkv_state(q, dy, s, m, None, None, dq, dq.clone(), None, None, None,
                                                   [2, 1, 2, 1, 0, 130], 128, False, False)  # fmt: skip
    with pytest.raises(ValueError, match="final output must be a contiguous bf16 tensor"):
        torch.ops.retention_compile.cuda_dq_state(q, dy, den, dz, s.bfloat16(), m, None, dq, dq.clone(),
                                                  [2, 2, 1, 0, 130, 130], 128, False, False, False, 0.125)  # fmt: skip


@pytest.mark.parametrize(
    ("d", "e", "chunk", "arch", "reason"),
    [
        (128, 64, 256, "sm_90a", "d=128"),
        (64, 128, 256, "sm_90a", "e=128"),
        (64, 64, 64, "sm_90a", "chunk 64"),
        (64, 64, 256, "sm_80", "sm_90a"),
    ],
)
def test_state_term_kernels_name_what_they_need(d, e, chunk, arch, reason) -> None:
    """The wgmma state terms take bf16 with e = 64, d in {32, 64} and chunks of whole 128-key blocks on sm_90a;
    elsewhere Triton's dkv_state_kernel serves, with the reason named."""
    k, v = torch.empty(1, 1, 1, d, dtype=torch.bfloat16), torch.empty(1, 1, 1, e, dtype=torch.bfloat16)
    assert reason in cuda_state_terms.state_terms_unsupported(state_spec(k, v, chunk, True, False, False), arch)
    k = torch.empty(1, 1, 1, 32, dtype=torch.bfloat16)
    v = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    served = state_spec(k, v, 128, True, True, True)
    assert cuda_state_terms.state_terms_unsupported(served, "sm_90a") is None
    huge = torch.empty(0, device="meta").as_strided((2, 1, 8, 64), (1 << 31, 512, 64, 1))
    assert "32 bits" in cuda_state_terms.state_terms_unsupported(served, "sm_90a", huge)


def _state_spec_of(dtype: torch.dtype, e: int):
    k, v = torch.empty(1, 1, 1, 64, dtype=dtype), torch.empty(1, 1, 1, e, dtype=dtype)
    return state_spec(k, v, 256, True, False, False)


@pytest.mark.parametrize(
    ("arch", "dtype", "e", "reason"),
    [
        ("sm_80", torch.bfloat16, 64, "sm_90a"),
        ("sm_90a", torch.float16, 64, "float16"),
        ("sm_90a", torch.bfloat16, 48, "e=48"),
        (None, torch.bfloat16, 64, "target None"),
    ],
)
def test_wgmma_state_kernels_name_what_they_need(arch, dtype, e, reason) -> None:
    """The wgmma kernels serve bf16 with e a multiple of 64 on sm_90a; elsewhere the forward keeps mma.sync (or
    Triton) and the backward's reverse states stay on Triton, with the reason named."""
    fwd = _state_spec_of(dtype, e)
    assert reason in cuda_reverse.reverse_unsupported(fwd, arch)
    assert not cuda_state.uses_wgmma(fwd, cuda_state.CONFIG, arch)
    served = _state_spec_of(torch.bfloat16, 128)
    assert cuda_reverse.reverse_unsupported(served, "sm_90a") is None
    assert cuda_state.uses_wgmma(served, cuda_state.CONFIG, "sm_90a")
    assert not cuda_state.uses_wgmma(served, StateKernelConfig(), "sm_90a")  # mma.sync unless the config asks
    huge = torch.empty(0, device="meta").as_strided((2, 1, 8, 64), (1 << 31, 512, 64, 1))
    assert "32 bits" in cuda_reverse.reverse_unsupported(served, "sm_90a", huge)
    # strided rows that dense_rows would copy: the copy's batch stride (32 x 2^19 x 128) is past 32 bits
    copied = torch.empty(0, device="meta").as_strided((2, 32, 1 << 19, 128), (128, 256, 8192, 2))
    assert "32 bits" in cuda_reverse.reverse_unsupported(served, "sm_90a", copied)


def test_wgmma_state_kernels_fit_shared_memory() -> None:
    """The reverse kernel keeps a chunk's row weights in shared memory, the gated forward a chunk's w_j: past the
    opt-in limit they are not chosen (Triton's kernels, or mma.sync, serve instead) rather than failing to launch."""
    k = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    assert cuda_reverse.reverse_unsupported(state_spec(k, k, 4096, True, True, False), "sm_90a") is None
    assert "shared memory" in cuda_reverse.reverse_unsupported(state_spec(k, k, 16384, True, True, False), "sm_90a")
    assert cuda_state.uses_wgmma(state_spec(k, k, 16384, True, False, False), cuda_state.CONFIG, "sm_90a")
    assert not cuda_state.uses_wgmma(state_spec(k, k, 65536, True, True, False), cuda_state.CONFIG, "sm_90a")


def _spec(dtype=torch.bfloat16, T=4096, d=64, e=64, chunk=512, deg=2, block_t=64):
    plan = Plan(chunk_size=chunk, block_t=block_t, block_feature=16, block_e=64, num_warps=4, num_stages=2, reason="")
    with FakeTensorMode():
        q, v = _fake_cuda(1, 2, T, d, dtype=dtype), _fake_cuda(1, 2, T, e, dtype=dtype)
        return kernel_spec(q, v, deg, False, False, True, T, plan), q, v


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"chunk": 8192}, "single-chunk"),
        ({"deg": 4}, "single-chunk"),
        ({"dtype": torch.float32}, "float32"),
        ({"e": 40}, "e=40"),
        ({"chunk": 32, "block_t": 16}, "chunks of 32 keys"),
    ],
)
def test_cuda_state_unsupported_names_why(kwargs: dict, reason: str) -> None:
    spec, q, v = _spec(**kwargs)
    assert reason in cuda_state_unsupported(spec, q, v)


def test_cuda_state_unsupported_names_far_apart_key_rows() -> None:
    """Key rows 128 MB apart fit the kernels' int strides but not their 32-bit offsets within a step: Triton serves."""
    spec, q, v = _spec()
    far = torch.empty_strided((1, 2, 4096, 64), (0, 0, 2**26, 1), dtype=torch.bfloat16, device="meta")
    assert "32-bit" in cuda_state_unsupported(spec, far, v)
    assert cuda_state.step_offsets_fit_32_bits(q, v)


def test_choice_measures_once_and_reuses_the_stored_winner(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RETENTION_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(choice, "_gpu_name", lambda device: "Test GPU")
    monkeypatch.setattr(choice, "_CHOSEN", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    measured = []

    def measure(candidates):
        measured.append(sorted(candidates))
        return {"triton": 2.0, "cuda": 1.0}

    monkeypatch.setattr(choice, "_measure", measure)
    candidates = {"triton": lambda: None, "cuda": lambda: None}
    key = {"spec": "d=64", "keys": 4096}
    assert choice.choose("chunk_state", key, candidates, torch.device("cpu")) == "cuda"
    assert choice.choose("chunk_state", key, candidates, torch.device("cpu")) == "cuda"
    assert measured == [["cuda", "triton"]]
    (entry,) = (tmp_path / "choices").glob("chunk_state_*.json")
    assert '"winner": "cuda"' in entry.read_text()
    monkeypatch.setattr(choice, "_CHOSEN", {})  # a new process: read from the file, not measured again
    assert choice.choose("chunk_state", key, candidates, torch.device("cpu")) == "cuda"
    assert len(measured) == 1
    assert choice.choose("chunk_state", {**key, "keys": 8192}, candidates, torch.device("cpu")) == "cuda"
    assert len(measured) == 2  # another shape class is measured
    monkeypatch.setattr(choice, "_CHOSEN", {})  # another version of this package's code: its kernels measured anew
    monkeypatch.setattr("retention_compile.backend.code_fingerprint", lambda: "other code")
    assert choice.choose("chunk_state", key, candidates, torch.device("cpu")) == "cuda"
    assert len(measured) == 3


def test_auto_keeps_float16_on_the_float32_triton_kernels() -> None:
    """``impl="auto"`` never picks the CUDA state kernel for float16: those calls run the float32 Triton kernels
    (``forward.kernel_inputs``); ``impl="cuda"`` still may."""
    q, k, v = (torch.randn(1, 2, 300, 64, dtype=torch.float16) for _ in range(3))
    plan = Plan(chunk_size=64, block_t=64, block_e=64)
    chosen = cuda_state.select_state_kernel(q, k, v, 2, None, None, True, 0.125, plan, "auto")
    assert chosen.kernel is None and "float16 runs the float32 Triton kernels" in chosen.reason


@needs_compiler
def test_wgmma_state_probe_compiles() -> None:
    """The benchmark probe of the wgmma state product (``benchmarks/wgmma_state_probe.cu``) compiles for sm_90a, and
    its PTX issues wgmma with A from registers and B through a shared-memory descriptor."""
    source = (BENCHMARKS / "wgmma_state_probe.cu").read_text()
    assert nvrtc.compile_source(source, "sm_90a")[:4] == b"\x7fELF"
    ptx = nvrtc.compile_source(source, "compute_90a").decode()
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in ptx and "wgmma.wait_group.sync.aligned" in ptx


@needs_compiler
def test_wgmma_rates_source_compiles() -> None:
    """``benchmarks/wgmma_rates.py``'s kernels compile for sm_90a and issue every shape they are named for, with A from
    registers and from shared memory."""
    spec = importlib.util.spec_from_file_location("wgmma_rates", BENCHMARKS / "wgmma_rates.py")
    rates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rates)
    ptx = nvrtc.compile_source(rates.source(), "compute_90a").decode()
    for rs, n, *_ in rates.SHAPES:
        operands = r"\{[^}]*\}" if rs else r"%rd\d+"
        assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{n}k16\.f32\.bf16\.bf16 \{{[^}}]*\}}, {operands}", ptx)
    assert all(f".entry {rates.kernel_name(*shape)}(" in ptx for shape in rates.SHAPES)


def test_dense_rows_copies_misaligned_rows() -> None:
    """The CUDA kernels copy rows 16 bytes at a time: a contiguous view at an odd offset gets a fresh aligned copy;
    aligned rows pass through unchanged."""
    from retention_compile.codegen.cuda_state import dense_rows

    storage = torch.randn(1 + 4 * 64).to(torch.bfloat16)
    shifted = storage[1:].view(1, 4, 64)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    copy = dense_rows(shifted)
    assert copy.data_ptr() % 16 == 0 and torch.equal(copy, shifted)
    aligned = torch.randn(1, 4, 64).to(torch.bfloat16)
    assert dense_rows(aligned) is aligned


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"log_gate": -torch.rand(1, 2, 1)}, "log_gate must have shape"),  # broadcast over the keys: another state
        ({"log_gate": -torch.rand(1, 1, 6)}, "log_gate must have shape"),  # one gate head for two kv heads: empty
        ({"chunk": -1}, "chunk must be a positive integer"),  # an all-zero state
        ({"deg": 3}, "even integer"),
    ],
)
def test_init_state_checks_its_arguments(kwargs: dict, message: str) -> None:
    """``init_state`` takes the op's shape rules (one query head per state); each of these was accepted silently."""
    from retention_compile.checks import RetentionInputError

    with pytest.raises(RetentionInputError, match=message):
        init_state(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3), **kwargs)
