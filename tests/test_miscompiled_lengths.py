"""``benchmarks/miscompiled_lengths.py``: its scan of SASS for uniform registers read and never written, and the
lengths it compiles each kernel at (the op's rows and keys of zeros)."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def scanner(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import miscompiled_lengths

    return miscompiled_lengths


# case 599's dkv_kernel as ptxas 12.8 compiled it (Triton 3.6, Tq 1): the third descriptor's address is built from
# UR12, which nothing writes; the lines around it write what they read
MISCOMPILED = """
        /*0d00*/                   USHF.R.U32.HI UR8, URZ, 0x4, UR13 ;
        /*0d10*/                   UMOV UR13, 0x400 ;
        /*1d80*/                   UMOV UR10, UR8 ;
        /*1d90*/                   UMOV UR11, 0xc0000010 ;
        /*1db0*/                   HGMMA.64x16x16.F32.BF16 R56, R76, gdesc[UR8].tnspB, RZ, !UPT ;
        /*1dc0*/                   UIADD3 UR4, UP0, UR12, 0x20, URZ ;
        /*1dd0*/                   UIADD3.X UR5, UR12, -0x3ffffff0, URZ, UP0, !UPT ;
"""
# the same kernel at Tq 2 reads the high half of a wide product and B's descriptor of a register-A wgmma
WELL_FORMED = """
        /*01e0*/                   UIMAD.WIDE.U32 UR48, UR4, UR10, URZ ;
        /*0200*/                   UIMAD UR21, UR5, UR4, URZ ;
        /*0240*/                   UIADD3 UR21, UR49, UR21, URZ ;
        /*0250*/                   ULDC.64 UR4, c[0x0][0x240] ;
        /*0260*/                   ULDC UR10, c[0x0][0x250] ;
        /*0270*/                   UIADD3.64 UR38, UR4, 0x20, URZ ;
        /*5b70*/                   HGMMA.64x16x16.F32.BF16 R120, R24, gdesc[UR36].tnspB, R120 ;
"""


def test_reads_of_unwritten_uniform_registers_are_found(scanner) -> None:
    found = scanner.unwritten_uniform_reads(MISCOMPILED)
    assert len(found) == 2 and all("UR12" in line for line in found)


def test_wide_results_and_register_a_descriptors_count_as_written(scanner) -> None:
    """``.WIDE`` and ``.64`` results write two registers; a wgmma with A in registers reads only B's descriptor
    (``gdesc[URn]``: URn+2, URn+3). ``UR36`` and ``UR37`` (A's slot) are never written here, and must not count."""
    assert scanner.unwritten_uniform_reads(WELL_FORMED) == []
    assert scanner.unwritten_uniform_reads(WELL_FORMED.replace("R24, gdesc", "gdesc")) != []  # A from shared


def test_kernels_take_lengths_of_at_least_two_where_the_op_pads(scanner) -> None:
    """The op runs a single key after a key of zeros (forward and backward) and the backward's single non-causal row
    after a row of zeros; other lengths stay as called, or as the forward's alignment makes them."""
    assert scanner.kernel_lengths("attention_kernel", 1000, 1, False, raw=False) == (1000, 2)
    assert scanner.kernel_lengths("attention_kernel", 1, 3126, False, raw=False) == (1, 3126)
    assert scanner.kernel_lengths("dkv_kernel", 1, 3126, False, raw=False) == (2, 3126)
    assert scanner.kernel_lengths("dq_kernel", 1, 1, False, raw=False) == (2, 2)
    assert scanner.kernel_lengths("dq_kernel", 1, 3126, True, raw=False) == (1, 3126)
    assert scanner.kernel_lengths("attention_kernel", 1, 1, True, raw=False) == (2, 2)  # then a prefill of 1 key
    assert scanner.kernel_lengths("dkv_kernel", 1000, 1, True, raw=False) == (2, 2)  # keyless rows dropped
    assert scanner.kernel_lengths("dkv_kernel", 1, 1, False, raw=True) == (1, 1)


# the kernels Triton 3.9's ptxas (12.9) miscompiled at the lengths as called (``--raw``), 3 of the scan's 162
# (``miscompiled_lengths_triton3.9.0_e1a5cef_raw.json``): (shape class, (Tq, Tk, heads), kernel)
RAW_MISCOMPILED_WITH_TRITON_3_9 = [
    (("bf16", 16, 16, 2, False, False, False), (1, 3126, 1), "dkv_kernel"),
    (("bf16", 32, 32, 2, False, False, False), (1000, 1, 4), "dq_kernel"),
    (("bf16", 32, 32, 2, True, False, False), (1000, 1, 4), "dq_kernel"),
]


@pytest.mark.parametrize(("shape_class", "lengths", "kernel"), RAW_MISCOMPILED_WITH_TRITON_3_9)
def test_the_op_never_launches_a_kernel_that_reads_unwritten_registers(
    scanner, tmp_path: Path, shape_class: tuple, lengths: tuple, kernel: str
) -> None:
    """Compiled offline for sm_90 with the installed Triton at the lengths the op gives it (a key or row of zeros
    before a single one), the kernel reads no uniform register that nothing writes. Without the op's padding these
    three read such a register under Triton 3.9 (a later Triton's ptxas may compile them right either way)."""
    pytest.importorskip("triton")
    row = scanner.scan_kernel(shape_class, lengths, kernel, raw=False, folder=tmp_path)
    assert min(row["Tq"], row["Tk"]) >= 2
    assert row["unwritten_reads"] == [], f"{kernel} at {lengths}: {row['unwritten_reads'][:2]}"
