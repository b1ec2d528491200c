"""``benchmarks/sass_loops.py``: the loops it reads from SASS, and one offline sm_90a compile of the query kernel
(Triton's bundled ptxas and cuobjdump: no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retention_compile.hardware import KNOWN

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
H200 = KNOWN["H200"]


@pytest.fixture
def sass_loops(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import sass_loops

    return sass_loops


SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   HMUL2.BF16_V2 R4, R2, R3 ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, R4, gdesc[UR4], R24 ;
        /*0130*/              @P0  BRA 0x110 ;
        /*0140*/                   FADD R5, R6, R7 ;
        /*0150*/                   FMUL R5, R5, R5 ;
        /*0160*/              @P1  BRA 0x140 ;
        /*0170*/                   EXIT ;
"""


def test_the_loops_holding_wgmma_are_the_backward_branches_around_hgmma(sass_loops) -> None:
    """A backward branch whose range holds an HGMMA is a loop, counted from its target to the branch itself; a loop
    without one (the FADD loop) is not reported."""
    loops = sass_loops.wgmma_loops(SASS)
    assert len(loops) == 1
    assert (loops[0]["start"], loops[0]["end"], loops[0]["instructions"]) == ("0x110", "0x130", 3)
    assert loops[0]["opcodes"] == {"HMUL2": 1, "HGMMA": 1, "BRA": 1}


def run_sass_loops(*flags: str) -> tuple[dict, list[str]]:
    """``benchmarks/sass_loops.py`` with ``flags``: its result line (parsed) and its loop lines."""
    command = [sys.executable, str(BENCHMARKS / "sass_loops.py"), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    return json.loads(lines[0]), [line for line in lines[1:] if line.strip().startswith("loop ")]


def assert_two_programs_per_sm(result: dict, threads: int) -> None:
    """Two programs of ``threads`` threads fit on an H200 SM by registers and by shared memory (each program also
    takes 1 KB the runtime reserves)."""
    assert 2 * threads * result["registers"] <= H200.regs_per_sm, result
    assert 2 * (result["shared_bytes"] + 1024) <= H200.smem_per_sm, result


# shape classes that take forward.NARROW_QUERY_LAUNCH (bf16 or fp16 dots, d <= 64): (d, dtype, gated, the file's tag)
NARROW_CLASSES = {
    "d64-bf16": (64, "bf16", False, ""),
    "d64-bf16-gated": (64, "bf16", True, "_gated"),
    "d32-bf16-gated": (32, "bf16", True, "_d32_gated"),  # the pair layout (the cherry layout needs d = 64)
    "d64-fp16-gated": (64, "fp16", True, "_fp16_gated"),  # the pair layout (the wgmma state kernel is bf16 only)
}


@pytest.mark.parametrize("name", list(NARROW_CLASSES))
def test_the_query_kernel_compiles_for_sm90_offline(tmp_path: Path, name: str) -> None:
    """The T=65536 chunked query kernel, rendered and compiled as eager and compiled calls launch it (one warpgroup,
    no register cap), for each shape class the launch serves: two programs fit on an SM (registers and shared
    memory; gated at d = 64 it takes 255 registers of the 256 that allow two), and its state loop and both key
    loops hold wgmma. bf16 spills nothing (no stack) but, on Triton 3.9, 8 bytes of the gated d = 64 kernel launched
    beside the state kernel (its wait on the state kernel's counts; none on Triton 3.6, the device's, 2026-12-04); fp16
    gated does spill a few bytes on Triton 3.9 (24, 2026-12-04). Neither is held against it."""
    pytest.importorskip("triton")
    d, dtype, gated, tag = NARROW_CLASSES[name]
    result, loops = run_sass_loops("--keep", str(tmp_path), "--d", str(d), "--dtype", dtype, *(["--gated"] * gated))
    assert result["kernel"] == "attention_kernel" and "maxnreg" not in result["options"]
    assert_two_programs_per_sm(result, 32 * result["options"]["num_warps"])
    assert dtype != "bf16" or result["stack_bytes"] <= (8 if name == "d64-bf16-gated" else 0), result
    assert len(loops) == 3, loops
    assert (tmp_path / f"attention_T65536{tag}.sass").is_file()


# --kernel: (the kernel's name, wgmma instructions in its one step loop)
CUDA_KERNELS = {"state": ("retention_chunk_state", 8), "reverse": ("retention_reverse_state", 16)}


@pytest.mark.parametrize("kernel", list(CUDA_KERNELS))
def test_the_cuda_state_kernels_disassemble_offline(tmp_path: Path, kernel: str) -> None:
    """``--kernel state`` (the forward's T=65536 CUDA wgmma state kernel, cherry layout) and ``--kernel reverse`` (the
    backward's reverse-state kernel), compiled by the package's NVRTC or nvcc and disassembled: two programs of 256
    threads per SM (at most 128 registers, their launch bounds) and one step loop holding the kernel's wgmma; its
    source, cubin and SASS are kept."""
    pytest.importorskip("triton")
    from retention_compile.codegen import nvrtc

    try:
        nvrtc.compiler_id()
    except RuntimeError:
        pytest.skip("neither NVRTC nor nvcc is available")
    name, wgmma = CUDA_KERNELS[kernel]
    result, loops = run_sass_loops("--kernel", kernel, "--keep", str(tmp_path))
    assert result["kernel"] == name and result["threads"] == 256
    assert_two_programs_per_sm(result, result["threads"])
    assert len(loops) == 1 and f"HGMMA {wgmma} " in loops[0], loops
    assert {path.suffix for path in tmp_path.iterdir()} >= {".cu", ".cubin", ".sass"}
