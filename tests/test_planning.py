"""The chunk/tile planner: plans fit their GPU, follow the model across GPUs, and are deterministic."""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

from retention_compile import planning
from retention_compile.hardware import KNOWN, GpuSpec
from retention_compile.planning import Plan, plan

SHAPES = [(T, d, bh) for T in (4096, 16384, 65536) for d in (64, 128) for bh in (1, 8, 32)]
DTYPE_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


def contract_smem(p: Plan, T: int, d: int, deg: int, dtype: torch.dtype) -> float:
    """Shared memory of the kernel the plan runs, written out independently of the model's sympy expressions:
    the quadratic kernel's q tile and 64-key k/v stages, or the chunked query kernel's phi(q)^T, q layouts and
    per stage an S^T tile and two coordinate blocks of q."""
    by, bt, fb = DTYPE_BYTES[dtype], p.block_t, p.block_feature**deg
    if p.chunk_size >= T:
        return by * (bt * d + p.num_stages * 64 * (d + p.block_e))
    return by * (fb * bt + 0.75 * bt * d + p.num_stages * (p.block_e * fb + 2 * bt * p.block_feature))


def regs_per_thread(p: Plan, deg: int, T: int) -> int:
    """The model's register estimate; a single-chunk plan has no state tile."""
    features = 1 if p.chunk_size >= T else p.block_feature**deg
    values = {"block_e": p.block_e, "block_t": p.block_t, "features_per_tile": features}
    values["warps"] = p.num_warps
    return int(planning.regs_per_thread().xreplace({sp.Symbol(k, positive=True): v for k, v in values.items()}))


def assert_fits(spec: GpuSpec, p: Plan, T: int, d: int, e: int, deg: int = 2, dtype: torch.dtype = torch.bfloat16):
    assert contract_smem(p, T, d, deg, dtype) <= spec.smem_per_block_optin, p
    assert regs_per_thread(p, deg, T) <= planning.MAX_REGS_PER_THREAD, p
    assert regs_per_thread(p, deg, T) * 32 * p.num_warps <= spec.regs_per_sm, p
    assert 32 * p.num_warps <= min(1024, spec.max_threads_per_sm), p
    assert d % p.block_feature == 0
    assert p.block_t <= max(p.chunk_size, 16) and p.block_e <= max(16, 1 << (e - 1).bit_length())
    assert p.chunk_size in planning.CHUNKS or p.chunk_size >= T
    assert p.modelled_s > 0 and p.reason


def tiles(p: Plan) -> tuple[int, ...]:
    return (p.chunk_size, p.block_t, p.block_feature, p.block_e, p.num_warps, p.num_stages)


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_every_plan_fits_its_gpu(key):
    spec = KNOWN[key]
    for T, d, bh in SHAPES:
        assert_fits(spec, plan(spec, T, d, batch_heads=bh), T, d, d)
    assert_fits(spec, plan(spec, 8192, 64, e=80, dtype=torch.float32, gated=True), 8192, 64, 80, 2, torch.float32)
    assert_fits(spec, plan(spec, 65536, 64, deg=4, batch_heads=8), 65536, 64, 64, 4)


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_a_given_chunk_gets_tiles_that_fit_its_kernels(key):
    """``chunk_size`` given (RetentionConfig, the op's argument): the tiles are planned for that chunk's kernels.
    Planning freely and then swapping the chunk in gave the GPU fuzz single-chunk tiles (128 rows, 128 value
    columns) for the chunked query kernel, which asked 448 KB of shared memory for fp32 d=48 e=128. Where no
    modelled tiles fit the chunk (fp32 there on GPUs with less shared memory), the free plan's tiles remain."""
    spec = KNOWN[key]
    cases = [
        (1014, 48, 128, torch.float32, 32),
        (4096, 96, 96, torch.bfloat16, 256),
        (1014, 48, 128, torch.float32, 1000),
    ]
    for T, d, e, dtype, chunk in cases:  # the last: a chunk that is no power of 2, just below T (the kernels: C=1024)
        p = plan(spec, T, d, e=e, dtype=dtype, gated=True, batch_heads=9, chunk_size=chunk)
        free = plan(spec, T, d, e=e, dtype=dtype, gated=True, batch_heads=9)
        if p != free:  # tiles for the chunk's kernels (else no modelled tiles fit them: the free plan's remain)
            assert p.chunk_size == 1 << (chunk - 1).bit_length() and "chunked C=" in p.reason.split(";")[0]
            assert p.block_t <= p.chunk_size
            chunked_T = p.chunk_size + 1  # contract_smem tells the paths apart by chunk >= T
            assert contract_smem(p, chunked_T, d, 2, dtype) <= spec.smem_per_block_optin, p
    p = plan(KNOWN["H200"], 1014, 48, e=128, dtype=torch.float32, gated=True, batch_heads=9, chunk_size=32)
    assert (p.chunk_size, p.block_t) == (32, 32)  # the fuzz's case on the H200
    p = plan(KNOWN["H200"], 1014, 48, e=128, dtype=torch.float32, gated=True, batch_heads=9, chunk_size=1000)
    assert "chunked C=1024" in p.reason  # chunk 1000 < 1014 keys: the kernels run chunked (C = 1024)
    assert plan(spec, 100, 64, chunk_size=4096).chunk_size >= 100  # a chunk past the keys: the single-chunk tiles


@pytest.mark.parametrize("key", ["H200", "A100-40GB", "L4", "RTX-3090"])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_short_sequences_take_the_single_chunk_path(key, T):
    p = plan(KNOWN[key], T, 64, batch_heads=4)
    assert p.chunk_size >= T
    assert "single-chunk" in p.reason.split(";")[0]


def test_a_single_chunk_plan_says_so():
    for key, (T, d, bh) in itertools.product(["H200", "L4"], SHAPES):
        p = plan(KNOWN[key], T, d, batch_heads=bh)
        assert ("single-chunk:" in p.reason.split(";")[0]) == (p.chunk_size >= T)


@pytest.mark.parametrize("key", ["H200", "H100-PCIe", "A100-80GB", "L4", "RTX-4090"])
@pytest.mark.parametrize("T", [4096, 65536, 1 << 20])
def test_deg4_d64_never_chunks(key, T):
    """D = C(67, 4) = 766480: the state costs more per token than attending to a million keys."""
    p = plan(KNOWN[key], T, 64, deg=4, batch_heads=8)
    assert p.chunk_size >= T


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_long_deg2_sequences_chunk(key):
    p = plan(KNOWN[key], 65536, 64, batch_heads=8)
    assert p.chunk_size < 65536
    assert "runner-up" in p.reason


def test_a_gate_moves_the_h200_to_the_chunked_path_sooner():
    """The gate's pointwise cost per score (``GATE_SCORE_OPS``) makes the single-chunk kernel lose at T=6144 only
    when gated, and both chunk at T=8192: as measured (b1 h8 d64 bf16, do_bench ms, single-chunk against chunks of
    1024: T=6144 0.134 / 0.160 ungated, 0.356 / 0.192 gated; T=8192 0.294 / 0.199 ungated;
    benchmarks/results/quad_vs_chunk_NVIDIA-H200_2026-12-01_2be7b50.json; on the preferred single-chunk tile T=6144
    0.120 / 0.160 ungated, 0.205 / 0.192 gated, T=8192 0.206 / 0.193 ungated, plan_..._096f548.json)."""

    def chunk(T: int, gated: bool) -> int:
        return plan(KNOWN["H200"], T, 64, dtype=torch.bfloat16, gated=gated, batch_heads=8).chunk_size

    assert chunk(6144, False) >= 6144 and chunk(6144, True) < 6144
    assert chunk(8192, False) < 8192 and chunk(8192, True) < 8192


def test_the_cuda_state_kernel_is_modelled_only_where_it_may_run():
    """On Hopper with bf16 the update is modelled as the CUDA wgmma kernel (``CUDA_UPDATE_SCALE``), faster than the
    Triton state kernel; with ``cuda_state=False`` (``codegen="triton"``, no CUDA compiler) as Triton's."""
    problem = dict(dtype=torch.bfloat16, batch_heads=8, chunk_size=1024)
    cuda = plan(KNOWN["H200"], 65536, 64, **problem)
    triton = plan(KNOWN["H200"], 65536, 64, **problem, cuda_state=False)
    ratio = triton.modelled_s / cuda.modelled_s
    assert 1.2 < ratio < 2.0, ratio
    assert plan(KNOWN["L4"], 65536, 64, **problem) == plan(KNOWN["L4"], 65536, 64, **problem, cuda_state=False)


def test_single_chunk_plans_take_at_most_16_rows_per_warp_and_the_most_stages_among_ties():
    """128 rows on 4 warps ran 1.4-2.2x their modelled time on the H200 (``MAX_ROWS_PER_WARP``); 3 copy stages ran
    faster than 2 at every measured length, which the model calls a tie (``_choose``)."""
    for T in (1024, 2048, 4096):
        for gated in (False, True):
            p = plan(KNOWN["H200"], T, 64, dtype=torch.bfloat16, gated=gated, batch_heads=8)
            assert p.chunk_size >= T and p.block_t <= planning.MAX_ROWS_PER_WARP * p.num_warps
            assert p.num_stages == 3, p


def test_single_chunk_plans_take_the_measured_tile_on_hopper():
    """Once the model chooses the single-chunk path, Hopper with 16-bit kernels and head dims up to
    ``PREFERRED_TILE_MAX_DIM`` takes ``PREFERRED_SINGLE_TILE`` (measured fastest at d = 32, 64, 128; the path stays
    the model's: the reason names the model's own tile); wider heads, other GPUs and float32 keep the model's tile."""
    rows, warps = planning.PREFERRED_SINGLE_TILE
    for T, d, gated in itertools.product((1024, 2048, 4096, 6144, 8192), (32, 64, 128), (False, True)):
        p = plan(KNOWN["H200"], T, d, dtype=torch.bfloat16, gated=gated, batch_heads=8)
        if p.chunk_size >= T:
            assert (p.block_t, p.num_warps) == (rows, warps), (T, d, p)
    # d=128: the model ranks 128 rows on 8 warps first by 1.27x; 64 rows on 4 ran 1.34x faster (0.135 / 0.181 ms)
    problem = (4096, 128, 128, 2, torch.bfloat16, False, 8)
    cands = planning.gpu_candidates(KNOWN["H200"], *problem)
    feasible = np.flatnonzero(cands.feasible)
    modelled = planning._choose(cands, feasible)
    assert cands.single[modelled] and (cands.block_t[modelled], cands.num_warps[modelled]) != (rows, warps)
    on_measured = planning._on_measured_single_tile(cands, KNOWN["H200"], feasible, modelled)
    assert cands.time[on_measured] > 1.2 * cands.time[modelled]
    taken = plan(KNOWN["H200"], *problem[:2], dtype=torch.bfloat16, batch_heads=8)
    assert (taken.block_t, taken.num_warps) == (rows, warps) and "PREFERRED_SINGLE_TILE" in taken.reason
    assert taken.modelled_s >= cands.time[modelled]
    on_tile = (cands.block_t == rows) & (cands.num_warps == warps)
    without_tile = np.flatnonzero(cands.feasible & ~on_tile)
    assert planning._on_measured_single_tile(cands, KNOWN["H200"], without_tile, modelled) == modelled
    for spec, d, dtype in ((KNOWN["H200"], 256, torch.bfloat16), (KNOWN["L4"], 64, torch.bfloat16),
                           (KNOWN["H200"], 64, torch.float32)):  # fmt: skip
        cands = planning.gpu_candidates(spec, 2048, d, d, 2, dtype, False, 8)
        feasible = np.flatnonzero(cands.feasible)
        modelled = planning._choose(cands, feasible)
        assert planning._on_measured_single_tile(cands, spec, feasible, modelled) == modelled
        assert "PREFERRED_SINGLE_TILE" not in plan(spec, 2048, d, dtype=dtype, batch_heads=8).reason


def test_small_heads_chunk_sooner_on_the_h200():
    """At d=32 the single-chunk kernel's time does not fall with d (per-score work binds, ``SCORE_OPS``) while the
    chunked path's does: chunks of 1024 ran faster from T=4096 (H200 b1 h8 bf16, do_bench ms, single-chunk on 64 rows
    / 4 warps against chunks of 1024: ungated 0.072 / 0.059, gated 0.108 / 0.080; plan_..._ae7f1a1_d32.json), and at
    T=2048 the single chunk (0.026 against 0.117). At d=64 ungated the single chunk still wins at T=6144 (0.117
    against 0.159)."""

    def chunk(T: int, d: int, gated: bool) -> int:
        return plan(KNOWN["H200"], T, d, dtype=torch.bfloat16, gated=gated, batch_heads=8).chunk_size

    assert chunk(2048, 32, False) >= 2048
    assert chunk(4096, 32, False) < 4096 and chunk(4096, 32, True) < 4096
    assert chunk(6144, 64, False) >= 6144


def test_plans_are_deterministic():
    for key, (T, d, bh) in itertools.product(("H200", "L4"), SHAPES[::2]):
        args = (KNOWN[key], T, d, None, 2, torch.bfloat16, False, bh)
        assert plan.__wrapped__(*args) == plan(*args) == plan.__wrapped__(*args)


def test_less_shared_memory_gives_smaller_tiles_or_fewer_stages():
    """Or the single-chunk path, whose kernel needs less shared memory than the chunked query kernel."""
    big = KNOWN["H200"]
    small = replace(big, smem_per_block_optin=99 * 1024, smem_per_sm=100 * 1024)
    bound = 0
    for T, d, bh in SHAPES:
        p_big, p_small = plan(big, T, d, batch_heads=bh), plan(small, T, d, batch_heads=bh)
        assert_fits(small, p_small, T, d, d)
        if contract_smem(p_big, T, d, 2, torch.bfloat16) > small.smem_per_block_optin:
            bound += 1
            shrunk = [getattr(p_small, f) < getattr(p_big, f) for f in ("block_t", "block_feature", "block_e")]
            to_single = p_small.chunk_size >= T > p_big.chunk_size
            assert any(shrunk) or p_small.num_stages < p_big.num_stages or to_single, (p_big, p_small)
            assert "KB smem >" in p_small.reason or "no resource limit binds" in p_small.reason
    assert bound > 0, "the 227 KB plans never needed more than 99 KB: the comparison shows nothing"


def test_known_gpus_with_less_smem_never_use_more():
    """Across the table: where one GPU's plan would not fit another's smem, the other's plan has smaller tiles."""
    for a, b in itertools.permutations(KNOWN.values(), 2):
        if a.smem_per_block_optin <= b.smem_per_block_optin:
            continue
        for T, d, bh in SHAPES[::3]:
            p_a, p_b = plan(a, T, d, batch_heads=bh), plan(b, T, d, batch_heads=bh)
            if contract_smem(p_a, T, d, 2, torch.bfloat16) > b.smem_per_block_optin:
                assert tiles(p_a) != tiles(p_b)


def test_fewer_sms_change_the_split():
    """Same GPU but half the SMs: the waves change, and for some shapes so does the chunk or the e-split."""
    full = KNOWN["H200"]
    half = replace(full, sm_count=66)
    changed = [
        (T, d, bh)
        for T, d, bh in SHAPES
        if tiles(plan(full, T, d, batch_heads=bh)) != tiles(plan(half, T, d, batch_heads=bh))
    ]
    assert changed
    assert "on 66 SMs" in plan(half, 16384, 64, batch_heads=8).reason


def test_known_gpus_differ():
    """L4 (58 SMs) and L40S (142 SMs) share cc 8.9 limits, A100 40/80 GB differ only in bandwidth."""
    for pair in (("L4", "L40S"), ("A100-40GB", "A100-80GB"), ("H100-PCIe", "H200")):
        a, b = (KNOWN[k] for k in pair)
        assert any(
            tiles(plan(a, T, d, batch_heads=bh)) != tiles(plan(b, T, d, batch_heads=bh)) for T, d, bh in SHAPES
        ), pair


def test_reason_states_the_numbers():
    p = plan(KNOWN["H200"], 65536, 64, batch_heads=8)
    assert p.reason.startswith("NVIDIA H200, T=65536 d=64 e=64 deg=2 (D=2080)")
    assert f"chunked C={p.chunk_size}: {p.modelled_s * 1e3:.3f} ms" in p.reason
    for words in ("update", "scan", "query", "runner-up", "waves", "regs/thread", "programs/SM on 132 SMs"):
        assert words in p.reason
    assert "binding:" in p.reason or "no resource limit binds" in p.reason


def test_sympy_model_and_numeric_fast_path_agree():
    cands = planning.gpu_candidates(KNOWN["A10G"], 10000, 64, 80, 2, torch.float16, True, 3)
    model = planning.gpu_model()
    for i in range(0, len(cands.chunk), max(1, len(cands.chunk) // 40)):
        sub = cands.substitution(i)
        names = ("chunked.time", "single.time", "smem.chunked", "regs", "occupancy", "update.waves", "query.tensor")
        for name in names:
            assert float(model[name].xreplace(sub)) == pytest.approx(cands.values[name][i], rel=1e-9), (name, i)


def _model_arguments(which: str) -> list[np.ndarray]:
    """Candidate inputs of the lambdified model ``which``: the H200's chunk and tile candidates at T=65536 (GPU), or
    chunks on both sides of T=2048 (CPU: the ``Piecewise`` terms take both branches)."""
    if which == "gpu":
        cands = planning.gpu_candidates(KNOWN["H200"], 65536, 64, 64, 2, torch.bfloat16, True, 8)
        return [np.broadcast_to(cands.inputs[str(s)], cands.chunk.shape) for s in planning.S.gpu]
    chunks = np.array([16.0, 64.0, 512.0, 2048.0, 4096.0])
    values = {"T": 2048.0, "C": chunks, "d": 64.0, "e": 64.0, "H": 8.0, "state_dim": float(planning.state_dim(64, 2))}
    return [np.broadcast_to(values[str(s)], chunks.shape) for s in planning.S.cpu]


# ids without "gpu": conftest skips items with that keyword on a machine without CUDA
@pytest.mark.parametrize("which", ["gpu", "cpu"], ids=["H200-model", "CPU-model"])
def test_cached_model_source_matches_a_fresh_print(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lambdified model comes back from the cache in a later call (no sympy printing), computes the same
    numbers as sympy's own function, and a truncated entry is printed again. The CPU model's source names the float
    ``nan`` (its ``Piecewise`` terms' default), which kept it out of the cache until it was recorded by value.
    The candidates are drawn with another cache: in a process that had not planned yet, drawing them printed the
    model into the test's cache first, and the first call below read it back (the test failed run alone)."""
    monkeypatch.setenv("RETENTION_COMPILE_CACHE", str(tmp_path / "candidates"))
    args = _model_arguments(which)
    monkeypatch.setenv("RETENTION_COMPILE_CACHE", str(tmp_path))

    def outputs(fn) -> list[np.ndarray]:
        with np.errstate(all="ignore"):
            return [np.broadcast_to(np.asarray(v, dtype=np.float64), args[0].shape) for v in fn(*args)]

    names, printed = planning._lambdified(which)
    (entry,) = (tmp_path / "planner").glob(f"{which}_*.json")
    cached_names, cached = planning._lambdified(which)
    assert cached_names == names and cached.__code__.co_filename.startswith("<retention_compile planner")
    assert printed.__code__.co_filename != cached.__code__.co_filename
    for fresh, again in zip(outputs(printed), outputs(cached), strict=True):
        np.testing.assert_array_equal(fresh, again)
    entry.write_bytes(entry.read_bytes()[:100])
    _, reprinted = planning._lambdified(which)
    assert not reprinted.__code__.co_filename.startswith("<retention_compile planner")
    assert planning._lambdified(which)[1].__code__.co_filename.startswith("<retention_compile planner")


def test_model_counts_the_formulas():
    """Spot values of the sympy expressions against the docstring formulas."""
    sub = {planning.S.T: 4096, planning.S.C: 256, planning.S.H: 1, planning.S.Dt: 2560, planning.S.e: 64}
    update_programs = planning.chunked_kernels()[0].programs.subs({**sub, planning.S.fb: 256, planning.S.be: 64})
    assert update_programs == 16 * 10  # 16 chunks x 10 (16x16 block pairs of d=64)
    assert planning.tiled_state_dim(64, 16, 2) == 2560
    assert planning.tiled_state_dim(64, 1, 2) == math.comb(65, 2)
    assert planning.tiled_state_dim(64, 1, 4) == 766480


# 2048: the single chunk took 140 ms and the chunks of 512 the old model chose 275 (eager, b1 h4 d64 float32, 2 cores,
# stop 62); from 4096 chunks of 256-512 were fastest (646-656 ms against 846 for one chunk)
@pytest.mark.parametrize(
    ("T", "expect_single"), [(1, True), (17, True), (256, True), (2048, True), (4096, False), (65536, False)]
)
def test_cpu_plan(T, expect_single):
    p = plan(None, T, 64, batch_heads=2, dtype=torch.float32)
    assert (p.chunk_size >= T) == expect_single
    assert p.reason.startswith("CPU (aten path)")
    assert p == plan(None, T, 64, batch_heads=2, dtype=torch.float32)


def test_bad_problem_sizes_are_rejected():
    with pytest.raises(ValueError, match="T, d, batch_heads"):
        plan(KNOWN["H200"], 0, 64)


def test_chunk_sweep_dry_run_on_cpu():
    """The GPU sweep script imports and plans without a GPU; its planned row is ``plan()``'s."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "chunk_sweep.py"
    module_spec = importlib.util.spec_from_file_location("chunk_sweep", path)
    sweep = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(sweep)
    record = sweep.main(["--dry-run", "--gpu", "L4", "--T", "4096", "16384", "--d", "64"])
    assert [p["T"] for p in record["problems"]] == [4096, 16384]
    for prob in record["problems"]:
        expected = plan(KNOWN["L4"], prob["T"], 64, 64, 2, torch.bfloat16, False, 8)
        assert prob["planned"]["chunk_size"] == expected.chunk_size == prob["configs"][0]["chunk_size"]
        assert {c["chunk_size"] for c in prob["configs"]} == {c for c in planning.CHUNKS if c < prob["T"]} | {prob["T"]}


@pytest.mark.parametrize(
    ("dtype", "on_cuda", "chunk", "expected"),
    [
        (torch.float16, True, 0, torch.float32),
        (torch.bfloat16, True, 0, torch.bfloat16),
        (torch.bfloat16, True, 32, torch.float32),
        (torch.bfloat16, True, planning.EXACT_CHUNK_BELOW, torch.bfloat16),
        (torch.bfloat16, True, 48, torch.bfloat16),  # the kernels round it up to 64
        (torch.bfloat16, False, 32, torch.bfloat16),
        (torch.float32, True, 16, torch.float32),
    ],
)
def test_kernel_dtype(dtype: torch.dtype, on_cuda: bool, chunk: int, expected: torch.dtype) -> None:
    """The kernels' dtype: float16 on CUDA runs float32, and so does a 16-bit call with a forced chunk under
    ``EXACT_CHUNK_BELOW`` keys; planned chunks (0) never are that short."""
    assert planning.kernel_dtype(dtype, on_cuda, chunk) == expected
    assert min(planning.CHUNKS) >= planning.EXACT_CHUNK_BELOW


@pytest.mark.parametrize(("d", "deg", "heads"), [(16, 2, 2), (64, 2, 2), (64, 2, 32), (64, 4, 2)])
def test_the_single_chunk_limit_is_where_the_cpu_plan_starts_to_chunk(d, deg, heads):
    """``single_chunk_limit``: every power of 2 up to it plans one chunk, twice it plans chunks (deg 4 at d = 64 never
    chunks: the search's end)."""
    problem = (None, d, d, deg, torch.float32, False, heads)
    limit = planning.single_chunk_limit(*problem)
    assert limit & (limit - 1) == 0 and limit >= 1
    lengths = [1 << n for n in range(limit.bit_length())]
    assert all(plan(None, T, d, d, deg, torch.float32, False, heads).chunk_size >= T for T in lengths)
    if limit < planning.SINGLE_CHUNK_SEARCH_MAX:
        assert plan(None, 2 * limit, d, d, deg, torch.float32, False, heads).chunk_size < 2 * limit
    else:
        assert deg == 4
