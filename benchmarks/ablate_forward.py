"""What holds the forward's kernels at long context: each variant removes one piece of work from one kernel's source.

Shape: b=1, h=8, d=e=64, deg 2, bf16, causal, T=65536 (``--T``), ungated (``--gated`` for a random gate), the planner's
plan, the CUDA state kernel. A variant edits the rendered source of a kernel by regular expressions before it is
compiled: the CUDA state kernel's (``STATE_EDITS``), and the query kernel's: with ``--query cuda`` (the default) the
CUDA wgmma query kernel, which the forward runs at this shape since session 73 (``CUDA_QUERY_EDITS``: gated variants
only), with ``--query triton`` the Triton one (``QUERY_EDITS``; ``forward.CUDA_QUERY`` turned off for the whole run, and
the variants that edit both kernels, ``FORWARD_EDITS``). Its results are wrong and only its time counts: the time a
variant saves bounds what that piece of work costs inside the kernel (pieces overlap, so the savings do not add up;
where the compiler drops more as dead code the variant's name says so). A variant that changes the operands' values also
changes the tensor cores' power draw, and under the H200's power cap the clock (session 57: the same state kernel 8-11%
faster on zero operands): its saving then bounds the work and the data together. Per variant: the whole forward
(``bench_forward.bench_ms``) and each kernel's device time (profiler, mean of 20 calls). The base runs first, between
the two groups and last: the spread of its three rows is the run's noise. But the GPU slows as a run goes on (the H200's
power cap): in session 57's four gated runs the state kernel read 0.469-0.472 ms as the first base, 0.479-0.492 between
and 0.483-0.495 last, so a variant late in the run reads up to 4% slow against the first base. ``--paired`` runs a base
after every variant instead and adds to each variant's row its times relative to the mean of the two bases beside it
(``vs_bases``: 0.95 is 5% faster); the run takes twice as long.

    python benchmarks/ablate_forward.py [--T 65536] [--gated] [--query cuda|triton] [--only REGEX] [--paired]
                                        [--out DIR] [--commit SHA]
    python benchmarks/ablate_forward.py --dry-run [--compile] [--gated] [--query cuda|triton]
                                        (no GPU: every edit applies to this checkout's templates; --compile: the CUDA
                                         ones also compile; --gated: the gated templates, with the gated variants)

``--only`` keeps the variants whose name matches REGEX (``re.search``), with the three base rows: a short run of a
few variants (``--only "V copies|K copies|step wait"``: the state kernel's copies and step barrier, six variants).

Writes ``ablate_forward_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``). An edit that
no longer matches its template (the kernel changed) fails the variant with that message.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from provenance import command_line, git_commit

import retention_compile
from retention_compile.codegen import cuda_query, cuda_state, forward, nvrtc, triton_source

Edit = tuple[str, str]  # (pattern, replacement) for re.subn
NO_V_COPIES: Edit = (r"cp_async16\(stage \+ o\.v_dst[^;]*;", "")
NO_K_COPIES: Edit = (r"cp_async16\(stage \+ o\.k_dst[^;]*;", "")
NO_STEP_WAIT: Edit = (r"cp_async_wait<AHEAD - 1>\(\);", "")
NO_STEP_BARRIER: Edit = (r"__syncthreads\(\);  // the step is staged[^\n]*", "")
# the copies still issued and still writing shared memory, but zero-filled (source size 0): no global read
ZERO_FILL_K: Edit = (r"(cp_async16\(stage \+ o\.k_dst[^;]*), (?:ok|true)\);", r"\1, false);")
ZERO_FILL_V: Edit = (r"(cp_async16\(stage \+ o\.v_dst[^;]*), (?:ok|true)\);", r"\1, false);")


def copy_bytes(size: int) -> Edit:
    """Every cp.async of the state kernel moves ``size`` bytes instead of 16 (the same instructions and addresses,
    fewer bytes read and written): whether the copies cost issue slots or bytes."""
    return (
        r"cp\.async\.cg\.shared\.global \[%0\], \[%1\], 16, %2;\" ::\"r\"\(dst\), \"l\"\(src\), \"r\"\(ok \? 16 : 0\)",
        f'cp.async.ca.shared.global [%0], [%1], {size}, %2;" ::"r"(dst), "l"(src), "r"(ok ? {size} : 0)',
    )


# The state product's loads by Triton tensor descriptors (TMA on Hopper; device-side, so ``measure`` sets an allocator
# for their global scratch), for the benchmarked shape only: d = e = 64 (2560 state rows), 128 rows and 128 features
# per step. The results are unchanged (y bitwise equal, session 41), so these are candidates, not ablations.
_S_DESCRIPTOR = "s_desc = tl.make_tensor_descriptor(s_ptr, shape=[2560, 64], strides=[64, 1], block_shape=[128, 64])"
_Q_DESCRIPTORS = "; ".join(
    f"q{part}_desc = tl.make_tensor_descriptor(q_ptr, shape=[Tq, 64], strides=[stride_qt, 1], block_shape=[128, {n}])"
    for part, n in (("i", 8), ("j", 16))
)
_M_LINE = r"(\n( +)m_ptr = M_ST \+ \(bs \* state_slots \+ slot\) \* \d+)"
STATE_TILES_BY_DESCRIPTOR: Edit = (
    r"st = tl\.load\(s_ptr \+ f\[:, None\] \* 64 \+ cols_e\[None, :\]\)",
    "st = s_desc.load([p * 256 + part * 128, 0])",
)
Q_BLOCKS_BY_DESCRIPTOR: list[Edit] = [
    (
        r"q_i = tl\.load\(q_ptr \+ rows\[:, None\] \* stride_qt \+ a\[None, :\] \* stride_qd,"
        r"\s*mask=row_ok\[:, None\], other=0\.0\)",
        "q_i = qi_desc.load([pid_t * 128, blk_i * 16 + part * 8])",
    ),
    (
        r"q_j = tl\.load\(q_ptr \+ rows\[:, None\] \* stride_qt \+ \(blk_j \* 16 \+ coords\)\[None, :\] \* stride_qd,"
        r"\s*mask=row_ok\[:, None\], other=0\.0\)",
        "q_j = qj_desc.load([pid_t * 128, blk_j * 16])",
    ),
]

# L2 eviction priorities by createpolicy (PTX ISA 7.4+): the helpers go in before the fold's flag functions
_L2_POLICY_HELPERS: Edit = (
    r"// The segment fold's flags:",
    "__device__ __forceinline__ unsigned long long l2_policy_last() {\n"
    "  unsigned long long p;\n"
    '  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));\n'
    "  return p;\n"
    "}\n"
    "__device__ __forceinline__ unsigned long long l2_policy_first() {\n"
    "  unsigned long long p;\n"
    '  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));\n'
    "  return p;\n"
    "}\n"
    "__device__ __forceinline__ void stg_v4_policy(unsigned long long policy, void* p, uint4 x) {\n"
    '  asm volatile("st.global.L2::cache_hint.v4.b32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(p), "r"(x.x), "r"(x.y), '
    '"r"(x.z), "r"(x.w), "l"(policy) : "memory");\n'
    "}\n"
    "// The segment fold's flags:",
)
_CHUNK_STORES_EVICT_LAST: Edit = (
    r"stg_v4_b32\(dst \+ 4 \* k \* VALUE_DIM, ",
    "stg_v4_policy(seg > 0 ? l2_policy_last() : l2_policy_first(), dst + 4 * k * VALUE_DIM, ",
)
_STATE_PRODUCT = r"wgmma_n72\(acc\[m\], frag\[f\]\[m\], v_desc\);"  # a tile's product of one slice
N64_NO_ONES: Edit = (_STATE_PRODUCT, "wgmma_n64(*reinterpret_cast<float(*)[32]>(acc[m]), frag[f][m], v_desc);")
K_J_BY_WARPGROUP_0: Edit = (
    r"ldmatrix_x4_trans\(kj, (kj_row \+ 2 \* 16 \* s \* KROW)\);\n(\s*)(ldmatrix_x4\(ki, [^;]*;)",
    r"\3\n\2if (gr == 0) ldmatrix_x4_trans(kj, \1); else { for (int i = 0; i < 4; ++i) kj[i] = ki[i]; }",
)

NO_STATE_STEPS: Edit = (r"for step in range\((\d+)\):", "for step in range(0):")
# The query grid longest first: the row blocks with the most keys of their chunk first (block 7 of every chunk, then
# block 6, ...), so that the grid's last round holds the blocks with one key block each. For the benchmarked plan only
# (chunk 1024, 128-row blocks: 8 per chunk) and Tq a multiple of the chunk (each row block once).
LONGEST_FIRST: Edit = (
    r"pid_t = tl\.cdiv\(Tq, 128\) - 1 - tl\.program_id\(0\)",
    "n_c = tl.cdiv(Tq, 1024); pid_t = (tl.program_id(0) % n_c) * 8 + 7 - tl.program_id(0) // n_c",
)
# The state product skipped by the rows of the first chunk, whose state is zero (causal: the state before any key)
FIRST_CHUNK_SKIPS_STATE: Edit = (r"for step in range\((\d+)\):", r"for step in range(tl.where(slot == 0, 0, \1)):")
# The step and program counts a layout of 8-coordinate groups would have at d = 64 (2304 state rows: 18 query steps of
# 128 features, 9 state programs of 256, against 20 and 10 with pairs of 16-coordinate blocks)
NINE_TENTHS_OF_STATE_STEPS: Edit = (NO_STATE_STEPS[0], "for step in range(\\1 * 9 // 10):")
NINE_OF_TEN_STATE_PROGRAMS: Edit = (
    r"(const int p = (?:blockIdx\.y|program_y) / NEB, eb = (?:blockIdx\.y|program_y) % NEB;)",
    r"\1\n  if (p == DT / FB - 1) return;  // ablation: the last pair's programs exit at once",
)
# The fold's fix-up moved into the query kernel, as a bound: the state kernel leaves its chunk states local (no fix-up)
# and each query step adds a second state tile, bf16, at the row block's segment start, scaled (0.5 standing for the
# chunk's decay), before its product; M likewise. The second tile is read from the segment's first chunk slot (chunks
# of 6, the plan's 11 segments at T=65536), which no kernel writes here: the values are wrong, the traffic is the
# design's (one P_{s-1} per segment, read by every row block of its chunks from L2).
_SEGMENT_SLOT = "(slot // 6) * 6"
SEGMENT_START_TILE: list[Edit] = [
    (
        r"(\n( +)s_ptr = S_ST \+ \(bs \* state_slots \+ slot\) \* (\d+))",
        rf"\1\n\2p_ptr = S_ST + (bs * state_slots + {_SEGMENT_SLOT}) * \3",
    ),
    (
        r"(\n( +)m_ptr = M_ST \+ \(bs \* state_slots \+ slot\) \* (\d+))",
        rf"\1\n\2pm_ptr = M_ST + (bs * state_slots + {_SEGMENT_SLOT}) * \3",
    ),
    (
        r"st = tl\.load\(s_ptr \+ (f\[:, None\] \* \d+ \+ cols_e\[None, :\])\)",
        r"st = (tl.load(s_ptr + \1).to(tl.float32) + 0.5 * tl.load(p_ptr + \1).to(tl.float32)).to(tl.bfloat16)",
    ),
    (
        r"mm = tl\.load\(m_ptr \+ (dims\[:, None\] \* \d+ \+ dims\[None, :\])\)",
        r"mm = tl.load(m_ptr + \1) + 0.5 * tl.load(pm_ptr + \1)",
    ),
]
NO_FOLD_WAIT: Edit = (r"while \(ld_acquire\(flags \+ seg - 1\) == 0\) __nanosleep\(100\);", "")
NO_FOLD_FIX_UP: Edit = (r"if \(!CAUSAL \|\| seg == 0\) \{", "if (true) {")  # every program counts itself and ends
NO_UNMASKED_BLOCKS: Edit = (r"for blk in range\(n_full\):", "for blk in range(0):")
NO_MASKED_BLOCKS: Edit = (r"for start in range\(lo \+ n_full \* \d+, hi, \d+\):", "for start in range(0):")

# The state loop's q blocks from registers instead of a load per step, for the benchmarked shape (d = 64: 4 blocks of
# 16 coordinates, 8 halves of 8; 128 rows): loaded once before the loop, then picked per step by selects.
_Q_IN_LOOP_I = (
    r"q_i = tl\.load\(q_ptr \+ rows\[:, None\] \* stride_qt \+ a\[None, :\] \* stride_qd,"
    r"\s*mask=row_ok\[:, None\], other=0\.0\)\.to\(tl\.bfloat16\)"
)
_Q_IN_LOOP_J = (
    r"q_j = tl\.load\(q_ptr \+ rows\[:, None\] \* stride_qt \+ \(blk_j \* 16 \+ coords\)\[None, :\] \* stride_qd,"
    r"\s*mask=row_ok\[:, None\], other=0\.0\)\.to\(tl\.bfloat16\)"
)
_STATE_LOOP = r"(\n( +)for step in range\(20\):)"


def _q_block(name: str, first: str, width: str) -> str:
    return (
        f"{name} = tl.load(q_ptr + rows[:, None] * stride_qt + ({first} + {width})[None, :] * stride_qd, "
        "mask=row_ok[:, None], other=0.0).to(tl.bfloat16)"
    )


def _select(name: str, index: str, count: int) -> str:
    expression = f"{name}{count - 1}"
    for i in range(count - 2, -1, -1):
        expression = f"tl.where({index} == {i}, {name}{i}, {expression})"
    return expression


_Q_HALVES = "; ".join(_q_block(f"qh{h}", str(8 * h), "part_coords") for h in range(8))
_Q_BLOCKS = "; ".join(_q_block(f"qb{j}", str(16 * j), "coords") for j in range(4))
Q_LOADED_ONCE: list[Edit] = [
    (_STATE_LOOP, r"\n\2" + _q_block("q_i0", "0", "part_coords") + r"\n\2" + _q_block("q_j0", "0", "coords") + r"\1"),
    (_Q_IN_LOOP_I, "q_i = q_i0"),
    (_Q_IN_LOOP_J, "q_j = q_j0"),
]
Q_BY_SELECTS: list[Edit] = [
    (_STATE_LOOP, r"\n\2" + _Q_HALVES + r"\n\2" + _Q_BLOCKS + r"\1"),
    (_Q_IN_LOOP_I, "q_i = " + _select("qh", "blk_i * 2 + part", 8)),
    (_Q_IN_LOOP_J, "q_j = " + _select("qb", "blk_j", 4)),
]

QUERY_EDITS: dict[str, list[Edit]] = {
    "query: q blocks loaded once before the state loop (the same blocks every step)": Q_LOADED_ONCE,
    "query: q blocks loaded once, picked per step by selects (same results)": Q_BY_SELECTS,
    "query: state product over half of its steps": [(NO_STATE_STEPS[0], "for step in range(\\1 // 2):")],
    "query: no state product": [NO_STATE_STEPS],
    "query: nine tenths of the state steps (18 of 20 in pairs, 16 of 18 in cherries)": [NINE_TENTHS_OF_STATE_STEPS],
    "query: no key loops (no intra-chunk attention)": [NO_UNMASKED_BLOCKS, NO_MASKED_BLOCKS],
    # what the kernel costs besides its three loops: q's load, the M term, the row scaling and the stores
    "query: no state product and no key loops (the rest)": [NO_STATE_STEPS, NO_UNMASKED_BLOCKS, NO_MASKED_BLOCKS],
    "query: phi a constant (no q loads, no products)": [
        (
            r"phi = tl\.reshape\(q_i\[:, :, None\] \* q_j\[:, None, :\], \((\d+), (\d+)\)\)",
            "phi = tl.full((\\1, \\2), 1.0, q_j.dtype)",
        ),
    ],
    "query: state tiles a constant (not loaded; still staged in shared memory per step)": [
        (
            r"st = tl\.load\(s_ptr \+ f\[:, None\] \* (\d+) \+ cols_e\[None, :\]\)",
            "st = tl.full((f.shape[0], cols_e.shape[0]), 1.0, tl.bfloat16)",
        ),
    ],
    "query: the pair factor 2 on q_j left out": [
        (r"q_j = q_j \* tl\.where\(delta == 0, 1\.0, 2\.0\)\.to\(tl\.bfloat16\)", "pass")
    ],
    "query: row blocks longest first (same results; T a multiple of the chunk)": [LONGEST_FIRST],
    "query: the first chunk's rows skip the state product (same results)": [FIRST_CHUNK_SKIPS_STATE],
    "query: longest first and the first chunk without the state product (same results)": [
        LONGEST_FIRST,
        FIRST_CHUNK_SKIPS_STATE,
    ],
    "query: state tiles by tensor descriptor (same results)": [
        (_M_LINE, r"\1\n\2" + _S_DESCRIPTOR),
        STATE_TILES_BY_DESCRIPTOR,
    ],
    "query: state tiles and q blocks by tensor descriptor (same results)": [
        (_M_LINE, r"\1\n\2" + _S_DESCRIPTOR + "; " + _Q_DESCRIPTORS),
        STATE_TILES_BY_DESCRIPTOR,
        *Q_BLOCKS_BY_DESCRIPTOR,
    ],
    "query: no quadratic form of M (the state part of the denominator; M not loaded)": [
        (r"    den = tl\.sum\(qm \* q\.to\(tl\.float32\), 1\)", "    den = tl.zeros((q.shape[0],), dtype=tl.float32)")
    ],
    # the product with a column of ones (forward.DENOMINATOR_BY_DOT, the default) or the float32 row sum
    "query: a second state tile per step at the segment start (the fix-up kept)": SEGMENT_START_TILE,
    "query: no denominator sums (intra-chunk)": [
        (r"den_part = tl\.dot\(w, unit_col, den_part\)|den \+= tl\.sum\(w\.to\(tl\.float32\), 1\)", "pass")
    ],
}
STATE_EDITS: dict[str, list[Edit]] = {
    "state: fragments = K_J (no multiplies; the K_I loads go dead too)": [
        (r"mul_bf16x2\((lo|hi), (kj\[\d\])\)", r"\2")
    ],
    "state: no stores at chunk boundaries": [
        (r"if \(CAUSAL && \(c > c_lo \|\| seg == 0\)\) store\(S_LOC, nullptr, M_LOC, bs \* n_chunks \+ c\);", "")
    ],
    "state: no V copies": [NO_V_COPIES],
    "state: 9 of the 10 pair programs (the count with 8-coordinate groups)": [NINE_OF_TEN_STATE_PROGRAMS],
    "state: no K copies": [NO_K_COPIES],
    # the ceiling of a kernel whose copies need no thread and no step barrier (a TMA issuer with mbarriers): the
    # copies and the step's wait and barrier removed, alone and together (the bytes go too, so it is optimistic)
    "state: no K and no V copies": [NO_K_COPIES, NO_V_COPIES],
    "state: no step wait or barrier": [NO_STEP_WAIT, NO_STEP_BARRIER],
    # the same copies with no global read: what the copies cost in L2 traffic against issue and shared-memory writes
    "state: K and V copies zero-filled (no global reads)": [ZERO_FILL_K, ZERO_FILL_V],
    "state: copies of 8 bytes (the same instructions, half the bytes)": [copy_bytes(8)],
    "state: copies of 4 bytes (the same instructions, a quarter of the bytes)": [copy_bytes(4)],
    "state: no copies, no step wait or barrier": [NO_K_COPIES, NO_V_COPIES, NO_STEP_WAIT, NO_STEP_BARRIER],
    # the normaliser's block of ones dropped from B (m64n64k16): what M's 8 columns cost in products and B reads
    "state: B without the ones (n64, no M)": [N64_NO_ONES],
    # session 42's descriptor by one add per slice, undone: the B descriptor built again for every slice
    "state: B descriptor built per slice (before 2026-12-02)": [
        (
            r"const u64 v_desc = static_cast<u64>\(desc_hi\) << 32 \| \(desc_lo - SLICE_DESC_UNITS \* s \* 0xFFFFu\);",
            "const u32 v_slice = st + STAGE_V + 2 * 16 * s * EB; "
            "const u64 v_desc = smem_desc(v_slice, ones_addr - v_slice, 1024, 1);",
        )
    ],
    # the products' N from 72 to 8 (the same instructions, a ninth of the tensor work): whether the state kernel's
    # time follows the tensor work or the instruction count
    "state: wgmma n8 (a ninth of the products)": [
        (_STATE_PRODUCT, "wgmma_n8(*reinterpret_cast<float(*)[4]>(acc[m]), frag[f][m], v_desc);")
    ],
    # the shared-memory reads of a one-warpgroup program (4 tiles per warp share one K_J load): warpgroup 1 skips
    # its K_J ldmatrix (fragments from its K_I registers instead)
    "state: K_J loaded by warpgroup 0 only": [K_J_BY_WARPGROUP_0],
    "state: n64 and K_J by warpgroup 0 only": [N64_NO_ONES, K_J_BY_WARPGROUP_0],
    # the segment fold (wgmma_fold): where its time goes; the first two leave the states wrong
    "state fold: no wait for the segment before": [NO_FOLD_WAIT],
    "state fold: no chunk fix-up": [NO_FOLD_FIX_UP],
    "state fold: no wait and no fix-up": [NO_FOLD_WAIT, NO_FOLD_FIX_UP],
    "state fold: the publish fenced by thread 0 after the barrier, not by every thread (same results)": [
        (
            r"__threadfence\(\);\n    __syncthreads\(\);\n    if \(tid == 0\) st_release\(flags \+ seg, 1u\);",
            "__syncthreads();\n    if (tid == 0) {\n      __threadfence();\n      st_release(flags + seg, 1u);\n    }",
        )
    ],
    "state fold: later segments' chunk stores kept in L2 (evict_last; segment 0's evict_first; same results)": [
        _L2_POLICY_HELPERS,
        _CHUNK_STORES_EVICT_LAST,
    ],
    # the fix-up's bulk adds in L2 (2bbec48) as bulk copies: the same traffic less the adds' reads (the states wrong)
    "state fold: the fix-up's bulk adds as copies": [(r"else bulk_add_bf16_to_global\(", "else bulk_copy_to_global(")],
    "state fold: block order instead of tickets (same results where blocks start in order)": [
        (
            r"ticket = static_cast<int>\(atomicAdd\(SYNC, 1u\)\);",
            "ticket = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);",
        )
    ],
    "state: no wgmma (the fragment building goes dead too: copies, barriers, stores remain)": [
        (r"for \(int m = 0; m < 2; \+\+m\) " + _STATE_PRODUCT, "")
    ],
}


# Gated only (``--gated``): what the gate's key weights w_j = exp(G_end - G_j) cost the state kernel: their
# products per step (a table read and a bf16x2 multiply per key pair), the chunk-sized table filled at every chunk's
# start (global loads of G, exps, a barrier), and the chunk's decay of the state. Without the fill the products read
# whatever shared memory holds (often zeros); if the tensor cores' power draw follows their operands under the H200's
# power cap, that alone speeds the kernel up, and the table filled with ones or with zeros tells the two apart.
# Session 56 read 0.480 -> 0.447 ms for "no weight table", yet the same fill with its loads batched, or moved off the
# chunk's start onto a double-buffered table, saved nothing. Session 57 decided it (four runs, forward_notes.md): the
# table filled with zeros read 0.436 ms and with ones 0.464-0.482, the same code: the zero operands' power. Without
# both the fill and the products ("neither") 0.457-0.463 against bases 0.479-0.495 at its place in the run.
NO_KEY_WEIGHT_PRODUCTS: Edit = (
    r"const u32\* wk = [^\n]*\n\s*ki\[0\] = mul_bf16x2\(ki\[0\], lds_b32\(wk\)\);\n"
    r"\s*ki\[1\] = mul_bf16x2\(ki\[1\], lds_b32\(wk \+ 8\)\);",
    "",
)
NO_WEIGHT_TABLE: Edit = (
    r"auto weight = \[&\][^\n]*\n\s*for \(int i = tid; i < CHUNK \+ BS; i \+= THREADS\) sm\.w\[i\] = [^\n]*\n"
    r"\s*__syncthreads\(\);",
    "",
)
# the table written with bf16 ones instead (no loads of G, no exps; the barrier kept): the products' operands keep
# their size, so this separates the fill's work from the power the zero table of "no weight table" saves
ONES_TABLE: Edit = (
    r"sm\.w\[i\] = pack_bf16\(weight\(first \+ i\), weight\(first \+ i \+ 1\)\);",
    "sm.w[i] = 0x3F803F80u;",
)
ZEROS_TABLE: Edit = (ONES_TABLE[0], "sm.w[i] = 0u;")  # the same fill with zeros: the products' operands all 0
NO_CHUNK_DECAY: Edit = (r"for \(int i = 0; i < ACC; \+\+i\) acc\[m\]\[i\] \*= decay;", "")
GATED_STATE_EDITS: dict[str, list[Edit]] = {
    "state gated: no key weights per step (no table reads or products)": [NO_KEY_WEIGHT_PRODUCTS],
    "state gated: no weight table (no fill or barrier at a chunk's start; weights left as shared memory holds)": [
        NO_WEIGHT_TABLE
    ],
    "state gated: the table filled with ones (no loads of G or exps; barrier kept; nonzero operands)": [ONES_TABLE],
    "state gated: the table filled with zeros (as the line above, every key weight 0)": [ZEROS_TABLE],
    "state gated: neither (the ceiling of keys folded by a pre-pass)": [NO_KEY_WEIGHT_PRODUCTS, NO_WEIGHT_TABLE],
    "state gated: neither, nor the chunk's decay": [NO_KEY_WEIGHT_PRODUCTS, NO_WEIGHT_TABLE, NO_CHUNK_DECAY],
}
# Gated only: what the gate costs the query kernel's key loops: the key factor exp(G_ref - G_j) per key and weight
# in the unmasked blocks, exp(G_i - G_j) per weight in the masked ones (the causal select kept), and the rows' factor
# after the unmasked blocks. Without them the weights are the ungated ones (larger: operands as the ungated kernel's)
NO_KEY_FACTOR: Edit = (r"\n\s*w = w \* exp2_ftz\(tl\.fma\(tl\.load\(\(g_ptr \+ start\) \+ key_offsets\)[^\n]*", "")
NO_MASKED_GATE: Edit = (r"w = w \* tl\.where\(keep, exp2_ftz\([^\n]*", "w = tl.where(keep, w, 0.0)")
NO_ROW_DECAY: Edit = (
    r"row_decay = tl\.where\(row_ok, tl\.exp\(g_row - g_ref\), 0\.0\)",
    "row_decay = tl.where(row_ok, 1.0, 0.0)",
)
GATED_QUERY_EDITS: dict[str, list[Edit]] = {
    "query gated: no key factor in the unmasked blocks": [NO_KEY_FACTOR],
    "query gated: no exp in the masked blocks (the causal select kept)": [NO_MASKED_GATE],
    "query gated: no row factor after the unmasked blocks": [NO_ROW_DECAY],
    "query gated: none of the three (the ungated key loops, the state's decay kept)": [
        NO_KEY_FACTOR,
        NO_MASKED_GATE,
        NO_ROW_DECAY,
    ],
}

# The same three pieces in the CUDA wgmma query kernel (cuda_templates/query_wgmma.cu.j2, packed squares: a forward
# no backward follows), plus its two other gate costs: the key-factor table it fills per warpgroup (exp2 of an fma per
# key, bf16 pairs) and the chunk state's decay exp(G_ref - G_b). Without them the weights are the ungated ones.
CUDA_NO_KEY_FACTOR: Edit = (r"\n\s*wt = mul_bf16x2\(wt, f\);", "")
CUDA_NO_DIAGONAL_EXP: Edit = (
    r"\(keep([01]) \? ex2_approx\(fmaf\(gk\.[xy], -LOG2E, rl\)\) : 0\.0f\)",
    r"(keep\1 ? 1.0f : 0.0f)",
)
CUDA_NO_ROW_FACTOR: Edit = (r"row\[h\] < T \? __expf\(g_row\[h\] - g_ref\) : 0\.0f", "row[h] < T ? 1.0f : 0.0f")
CUDA_KEY_FACTORS_ONES: Edit = (r"pack_bf16\(factor_of\(owner, key\), factor_of\(owner, key \+ 1\)\)", "0x3F803F80u")
CUDA_NO_STATE_DECAY: Edit = (r"const float decay = __expf\(g_ref - g_at\(lo - 1\)\);", "const float decay = 1.0f;")
CUDA_QUERY_EDITS: dict[str, list[Edit]] = {
    "query (CUDA) gated: no key factor in the unmasked blocks (the table still filled)": [CUDA_NO_KEY_FACTOR],
    "query (CUDA) gated: the key-factor table filled with ones (its exps not computed)": [CUDA_KEY_FACTORS_ONES],
    "query (CUDA) gated: no exp in the diagonal block (the causal select kept)": [CUDA_NO_DIAGONAL_EXP],
    "query (CUDA) gated: no row factor before the diagonal block": [CUDA_NO_ROW_FACTOR],
    "query (CUDA) gated: no decay of the chunk state's term": [CUDA_NO_STATE_DECAY],
    "query (CUDA) gated: none of the five (the ungated key loops)": [
        CUDA_NO_KEY_FACTOR,
        CUDA_KEY_FACTORS_ONES,
        CUDA_NO_DIAGONAL_EXP,
        CUDA_NO_ROW_FACTOR,
        CUDA_NO_STATE_DECAY,
    ],
}
QUERY_KERNELS = ("cuda", "triton")


# Variants that edit both kernels (the Triton query kernel's): (query edits, state edits)
FORWARD_EDITS: dict[str, tuple[list[Edit], list[Edit]]] = {
    "both: nine tenths of the query steps, the last state program per head and segment exits (9 of 10 or 8 of 9)": (
        [NINE_TENTHS_OF_STATE_STEPS],
        [NINE_OF_TEN_STATE_PROGRAMS],
    ),
    "both: the fold's fix-up moved into the query (a second state tile per step at the segment start)": (
        SEGMENT_START_TILE,
        [NO_FOLD_FIX_UP],
    ),
}


def apply_edits(source: str, edits: list[Edit], matched: dict[str, int]) -> str:
    """``source`` with every edit applied where it matches; ``matched`` counts the matches per pattern."""
    for pattern, replacement in edits:
        source, n = re.subn(pattern, replacement, source)
        matched[pattern] = matched.get(pattern, 0) + n
    return source


@contextmanager
def edited_sources(triton: list[Edit], cuda: list[Edit]) -> Iterator[dict[str, int]]:
    """Within the block, the forward's Triton sources get the edits ``triton`` and its CUDA sources (the state
    kernel's, the CUDA query kernel's) ``cuda`` as they are rendered; every memo of the package is cleared on entry
    and exit, so the kernels are rendered (and compiled) afresh. Yields the match counts per pattern."""
    matched: dict[str, int] = {}
    render, render_cuda = triton_source.render, nvrtc.render

    def triton_render(template: str, spec, interpret: bool = False) -> str:
        return apply_edits(render(template, spec, interpret), triton, matched)

    def cuda_render(name: str, **params: object) -> str:
        return apply_edits(render_cuda(name, **params), cuda, matched)

    clear_package_caches()
    try:
        with mock.patch.object(triton_source, "render", triton_render), mock.patch.object(nvrtc, "render", cuda_render):
            yield matched
    finally:
        clear_package_caches()


def clear_package_caches() -> None:
    """``cache_clear`` on every ``functools`` memo defined in the package's modules but the CUDA primary context's
    (``nvrtc._primary_context`` retains the context once per process)."""
    for name, module in list(sys.modules.items()):
        if name == "retention_compile" or name.startswith("retention_compile."):
            for value in list(vars(module).values()):
                memo = hasattr(value, "cache_clear") and getattr(value, "__module__", None) == name
                if memo and value is not nvrtc._primary_context:
                    value.cache_clear()


def unmatched(edits: list[Edit], matched: dict[str, int]) -> list[str]:
    return [pattern for pattern, _ in edits if not matched.get(pattern)]


def variants(
    only: str | None = None, gated: bool = False, paired: bool = False, query_kernel: str = "cuda"
) -> list[tuple[str, list[Edit], list[Edit]]]:
    """(name, Triton edits, CUDA edits) in the order they run, the base first, between the groups and last; with
    ``only``, the variants whose name matches it (and the three bases); ``gated`` adds the gated variants
    (``GATED_STATE_EDITS``, and the query kernel's); ``query_kernel``: the query kernel whose variants run, "cuda"
    (``CUDA_QUERY_EDITS``, gated only) or "triton" (``QUERY_EDITS`` and ``GATED_QUERY_EDITS``, and
    ``FORWARD_EDITS``); ``paired``: the base first and again after every variant ("base (after: NAME)")."""
    if query_kernel not in QUERY_KERNELS:
        raise ValueError(f"query_kernel must be one of {QUERY_KERNELS}, got {query_kernel!r}")
    base = [("base", [], [])]
    triton = query_kernel == "triton"
    state_edits = {**STATE_EDITS, **(GATED_STATE_EDITS if gated else {})}
    triton_query_edits = {**QUERY_EDITS, **(GATED_QUERY_EDITS if gated else {})} if triton else {}
    cuda_query_edits = CUDA_QUERY_EDITS if gated and not triton else {}
    forward_edits = FORWARD_EDITS if triton else {}
    names = [*triton_query_edits, *cuda_query_edits, *state_edits, *forward_edits]
    kept = {name for name in names if only is None or re.search(only, name)}
    query = [(name, edits, []) for name, edits in triton_query_edits.items() if name in kept]
    query += [(name, [], edits) for name, edits in cuda_query_edits.items() if name in kept]
    state = [(name, [], edits) for name, edits in state_edits.items() if name in kept]
    both = [(name, *edits) for name, edits in forward_edits.items() if name in kept]
    if paired:
        return base + [entry for v in query + state + both for entry in (v, (f"base (after: {v[0]})", [], []))]
    return base + query + [("base (between)", [], [])] + state + both + [("base (last)", [], [])]


def relative_to_bases(rows: list[dict]) -> None:
    """Each variant row between two base rows (``--paired``) gets ``vs_bases``: its forward and kernel times over
    the mean of those two bases' (rows that failed, or without a timed base on both sides, get none)."""
    for before, row, after in zip(rows, rows[1:], rows[2:]):
        if row["variant"].startswith("base") or not all("forward_ms" in r for r in (before, row, after)):
            continue
        if not (before["variant"].startswith("base") and after["variant"].startswith("base")):
            continue
        ratios = {"forward": row["forward_ms"] / ((before["forward_ms"] + after["forward_ms"]) / 2)}
        for kernel, ms in row["kernel_ms"].items():
            sides = [r["kernel_ms"].get(kernel) for r in (before, after)]
            if all(sides):
                ratios[kernel] = ms / (sum(sides) / 2)
        row["vs_bases"] = {name: round(ratio, 4) for name, ratio in ratios.items()}


def dry_run(
    only: str | None = None,
    compile_cuda: bool = False,
    gated: bool = False,
    paired: bool = False,
    query_kernel: str = "cuda",
) -> dict[str, list[str]]:
    """Render the sources of the benchmarked shape (the Triton query kernel's narrow launch and the CUDA query
    kernel included) with each variant's edits, no GPU: {variant: the patterns that matched nowhere} (empty lists
    when the edits still apply; the edited Triton sources must still parse). With ``compile_cuda`` the edited CUDA
    sources are also compiled for sm_90a (NVRTC or nvcc, no GPU; ``CudaCompileError`` names a variant whose edit
    broke the source). ``gated``: the gated kernels and variants (``--gated``); ``query_kernel``: ``variants``'."""
    spec = triton_source.KernelSpec(
        dtype="bfloat16", head_dim=64, value_dim=64, deg=2, gated=gated, has_valid=False, causal=True, chunked=True,
        chunk_size=1024, block_t=128, block_k=64, block_s=64, block_e=64, block_feature=16,
        den_dot=forward.DENOMINATOR_BY_DOT,
    )  # fmt: skip
    launch = forward.NARROW_QUERY_LAUNCH
    query_spec = dataclasses.replace(spec, block_t=launch.rows, query_split=launch.split)
    cuda_sources = [
        cuda_state.render_state_source.__wrapped__(spec, cuda_state.CONFIG, "sm_90a"),
        cuda_query.render_query_source(spec.chunk_size, gated, packed=True, y_fp32=False),
    ]
    report = {}
    for name, triton_edits, cuda_edits in variants(only, gated, paired, query_kernel):
        matched: dict[str, int] = {}
        for template_spec in (spec, query_spec):
            source = triton_source.render(triton_source.FORWARD_TEMPLATE, template_spec)
            ast.parse(apply_edits(source, triton_edits, matched))
        for rendered in cuda_sources:
            source = apply_edits(rendered, cuda_edits, matched)
            if compile_cuda and source != rendered:
                nvrtc.cached_compile(source, "sm_90a")
        report[name] = unmatched(triton_edits + cuda_edits, matched)
    return report


def measure(
    T: int, gated: bool, only: str | None = None, paired: bool = False, query_kernel: str = "cuda"
) -> list[dict]:
    import torch
    import triton
    from bench_forward import bench_ms, inputs, kernel_times, ours

    from retention_compile.ops import resolve_plan

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    # the kernels one after the other: a query kernel beside the state kernel would wait forever on state programs a
    # variant ends early (the last pair's), and its time would hold the overlap, not its own work
    forward.QUERY_BESIDE_STATES = False
    forward.CUDA_QUERY = forward.CUDA_QUERY_GATED = query_kernel == "cuda"
    x = inputs(T, gated)
    rows = []
    for name, triton_edits, cuda_edits in variants(only, gated, paired, query_kernel):
        row: dict = {"variant": name, "edits": [p for p, _ in triton_edits + cuda_edits]}
        with edited_sources(triton_edits, cuda_edits) as matched:
            # the CUDA state kernel named, not measured against Triton's: "auto" would time the edited kernels and
            # store the winner for the shape
            run = ours(x, resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0), codegen="cuda")
            try:
                run()
                missing = unmatched(triton_edits + cuda_edits, matched)
                if missing:
                    raise RuntimeError(f"edits that match nothing (the kernel changed): {missing}")
                row.update(forward_ms=bench_ms(run), kernel_ms=kernel_times(run, 20))
            except Exception as error:  # a variant that does not build or launch is recorded, not fatal
                torch.cuda.synchronize()
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if paired:
        relative_to_bases(rows)
        for row in rows:
            if "vs_bases" in row:
                print(json.dumps({"variant": row["variant"], "vs_bases": row["vs_bases"]}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--only", default=None, help="the variants whose name matches this regular expression")
    parser.add_argument("--paired", action="store_true", help="a base after every variant, variants relative to both")
    parser.add_argument("--query", choices=QUERY_KERNELS, default="cuda", help="the query kernel run and edited")
    parser.add_argument("--dry-run", action="store_true", help="check that every edit applies; no GPU")
    parser.add_argument("--compile", action="store_true", help="with --dry-run: compile the edited CUDA sources too")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        report = dry_run(args.only, args.compile, args.gated, args.paired, args.query)
        print(json.dumps(report, indent=1))
        return report
    import torch

    commit, gpu = git_commit(args.commit), torch.cuda.get_device_name()
    record = {
        "command": command_line(),
        "commit": commit,
        "package": retention_compile.__file__,
        "gpu": gpu,
        "shape": {"B": 1, "H": 8, "d": 64, "deg": 2, "dtype": "bfloat16", "causal": True, "T": args.T},
        "gated": args.gated,
        "only": args.only,
        "paired": args.paired,
        "query_kernel": args.query,
        "rows": measure(args.T, args.gated, args.only, args.paired, args.query),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ablate_forward_{gpu.replace(' ', '-')}_{datetime.date.today().isoformat()}_{commit}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
