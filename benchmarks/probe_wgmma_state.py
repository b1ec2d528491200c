"""Probe: the chunk-local state product built for Hopper's wgmma (``wgmma_state_probe.cu``) against the package's
state kernels, at b=1, h=8, d=e=64, bf16 (issue 5's shape).

    python benchmarks/probe_wgmma_state.py [--T 65536] [--chunk 1024] [--out benchmarks/results] [--commit SHA]
                                           [--probes state query dq intra forward]

The probe computes, per head, chunk and pair of 16-coordinate blocks, ``sum_t phi_p(k_t) v_t^T`` (no gate, no scan:
the product whose speed bounds the state kernels; ``forward_notes.md``, "Where the state products stand"). It is
checked against the same product in PyTorch (features rounded to bf16 as the kernels round them, float32
accumulation) on every chunk of two heads, and timed as a whole (cp.async stages four steps deep, the products of
a step's k16 slices overlapping the construction of the next ones), in three builds: registers capped for two or
one programs per multiprocessor, and a second reading of the V descriptor (tried in case the first is wrong).
``query_probe`` does the query side, ``phi(q_t) . S_c`` with bf16 states as the forward stores them (checked on
two chunks of two heads, timed): S_c copied as stored by cp.async in half pairs, 4 stages deep, phi(q) built per
thread as the A fragment from the block's q rows staged once, 4 slices in flight. ``dq_probe`` does the state term
of dq (``G = S_c dN_t``, both wgmma operands from shared memory, contracted with q in registers). ``intra_probe``
does the query kernel's intra-chunk product (causal, no gate): ``X = Q K^T`` from shared memory, ``w = (s x)^2``
rounded to bf16 and repacked in registers as the A fragments of ``w V`` (checked on two chunks of two heads against
PyTorch with the same rounding, timed; its TFLOP/s count the executed causal blocks). Beside them, the
forward's state and query kernels (the state kernel Triton's and, where "auto" picks it, the CUDA one) are timed by
the profiler in a forward of the same shape. TFLOP/s count the tiled features' products, ``2 T h Dt e`` with Dt = 2560.
Writes ``wgmma_probe_<gpu>_<date>.json`` with the command and commit. Needs an sm_90 GPU and cuda-python.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from bench_forward import kernel_times, result_header
from triton.testing import do_bench

import retention_compile as rc
from retention_compile.codegen import nvrtc

H, D, E, BF = 8, 64, 64, 16
NB = D // BF
PAIRS = NB * (NB + 1) // 2
DT = PAIRS * BF * BF
SOURCE = Path(__file__).with_name("wgmma_state_probe.cu")
STATE_SMEM = 4 * (64 * E + 2 * 64 * 24) * 2 + 1024  # the state probe's STAGES stages of V, K_I, K_J + alignment
QUERY_SMEM = 4 * 128 * E * 2 + 128 * (D + 8) * 2 + 1024  # query probe: 4 stages of half pairs, q rows, alignment
DQ_SMEM = 4 * 64 * E * 2 + 128 * E * 2 + 128 * (D + 8) * 2 + 1024  # dq probe: quarter pairs, dN rows, q rows
INTRA_SMEM = 4 * 2 * 64 * D * 2 + 128 * D * 2 + 1024  # intra probe: 4 stages of k and v steps, q rows, alignment


def allow_shared(kernel: nvrtc.CudaKernel, size: int) -> None:
    """Let ``kernel`` take ``size`` bytes of dynamic shared memory (over 48 KB needs the opt-in)."""
    from cuda.bindings import driver

    attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    (err,) = driver.cuFuncSetAttribute(kernel.function, attribute, size)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuFuncSetAttribute({size} bytes of shared memory): {err}")


def pair_blocks(p: int) -> tuple[int, int]:
    """Blocks (I, J) of pair p, numbered as the Triton state kernel numbers them."""
    delta, blk_i = divmod(p, NB)
    return blk_i, (blk_i + delta) % NB


def reference(k: torch.Tensor, v: torch.Tensor, chunk: int, heads: list[int]) -> torch.Tensor:
    """``(len(heads), n_chunks, DT, E)`` float32: the state probe's product in PyTorch."""
    T = k.shape[1]
    n_chunks = -(-T // chunk)
    out = torch.zeros(len(heads), n_chunks, DT, E, device=k.device)
    for row, h in enumerate(heads):
        for c in range(n_chunks):
            keys, values = k[h, c * chunk : (c + 1) * chunk], v[h, c * chunk : (c + 1) * chunk].float()
            out[row, c] = phi_rows(keys).float().T @ values
    return out


def phi_rows(x: torch.Tensor) -> torch.Tensor:
    """(rows, DT) bf16: the tiled features of each row of ``x`` (rows, D), pair by pair, products rounded once."""
    tiles = []
    for p in range(PAIRS):
        blk_i, blk_j = pair_blocks(p)
        x_i, x_j = x[:, blk_i * BF : (blk_i + 1) * BF], x[:, blk_j * BF : (blk_j + 1) * BF]
        tiles.append((x_i[:, :, None] * x_j[:, None, :]).reshape(-1, BF * BF))
    return torch.cat(tiles, dim=1)


def query_side(q: torch.Tensor, n_chunks: int, chunk: int, flops: float, record: dict) -> None:
    """``query_probe``: Y = phi(q_t) . S_c(t) with bf16 states as the forward stores them, checked on the first two
    chunks of two heads, timed."""
    T = q.shape[1]
    gen = torch.Generator(device="cuda").manual_seed(1)
    states = (torch.randn(H, n_chunks, DT, E, device="cuda", generator=gen) / DT**0.5).to(torch.bfloat16)
    y = torch.full((H, T, E), float("nan"), device="cuda")
    (kernel,) = nvrtc.load_kernels(SOURCE.read_text(), ["query_probe"], q.device)
    allow_shared(kernel, QUERY_SMEM)

    def probe() -> None:
        kernel.launch((-(-T // 128), H, 1), (256, 1, 1), (q, states, y, T, n_chunks, chunk), shared_mem=QUERY_SMEM)

    probe()
    torch.cuda.synchronize()
    rows = min(T, 2 * chunk)
    want = torch.stack([
        torch.cat([phi_rows(q[h, c * chunk : min((c + 1) * chunk, rows)]).float() @ states[h, c].float()
                   for c in range(-(-rows // chunk))])
        for h in (0, H - 1)
    ])  # fmt: skip
    error = float((y[[0, H - 1], :rows] - want).norm() / want.norm())
    ms = do_bench(probe, warmup=25, rep=200)
    record["query_probe"] = {
        "registers": kernel.num_regs,
        "relative_error": error,
        "ms": ms,
        "tflops": flops / ms / 1e9,
    }
    print(f"query probe, {kernel.num_regs} registers: error {error:.2e}, {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")


def dq_reference(q: torch.Tensor, dn: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(rows, D) float32: the dq probe's product for rows of one chunk, ``G = dN S^T`` contracted pair by pair with
    the other block's coordinates (q, dn, states: that chunk's (rows, D), (rows, E), (DT, E))."""
    g = dn.float() @ states.float().T
    qf = q.float()
    dq = torch.zeros_like(qf)
    for p in range(PAIRS):
        blk_i, blk_j = pair_blocks(p)
        tile = g[:, p * BF * BF : (p + 1) * BF * BF].reshape(-1, BF, BF)
        q_i, q_j = qf[:, blk_i * BF : (blk_i + 1) * BF], qf[:, blk_j * BF : (blk_j + 1) * BF]
        dq[:, blk_i * BF : (blk_i + 1) * BF] += torch.einsum("rab,rb->ra", tile, q_j)
        dq[:, blk_j * BF : (blk_j + 1) * BF] += torch.einsum("rab,ra->rb", tile, q_i)
    return dq


def dq_side(q: torch.Tensor, n_chunks: int, chunk: int, flops: float, record: dict) -> None:
    """``dq_probe``: the state term of dq (``G = S_c dN`` per row, contracted with q), checked on the first two
    chunks of two heads, in three builds (one or two accumulator tiles, registers capped for one or two programs
    per SM), timed."""
    T = q.shape[1]
    gen = torch.Generator(device="cuda").manual_seed(2)
    states = (torch.randn(H, n_chunks, DT, E, device="cuda", generator=gen) / DT**0.5).to(torch.bfloat16)
    dn = torch.randn(H, T, E, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty(H, T, D, device="cuda")
    rows = min(T, 2 * chunk)
    spans = [slice(c * chunk, min((c + 1) * chunk, rows)) for c in range(-(-rows // chunk))]
    want = torch.stack([
        torch.cat([dq_reference(q[h, span], dn[h, span], states[h, c]) for c, span in enumerate(spans)])
        for h in (0, H - 1)
    ])  # fmt: skip
    builds = [{"DQ_DOUBLE": double, "DQ_MIN_BLOCKS": blocks} for double, blocks in ((0, 2), (1, 1), (0, 1))]
    launch = ((-(-T // 128), H, 1), (q, dn, states, out, T, n_chunks, chunk), DQ_SMEM)
    record["dq_probe"] = time_builds("dq_probe", builds, launch, out, lambda: out[[0, H - 1], :rows], want, flops)


def time_builds(
    name: str,
    builds: list[dict[str, int]],
    launch: tuple[tuple[int, int, int], tuple, int],
    out: torch.Tensor,
    got: Callable[[], torch.Tensor],
    want: torch.Tensor,
    flops: float,
) -> list[dict]:
    """Kernel ``name`` of the probe source in each build (its ``#define``s), launched as ``launch`` = (grid,
    arguments, dynamic shared memory) with 256 threads: compiled, run once into ``out`` (NaN first), checked
    (``got()`` against ``want``: relative error below 1e-3), then timed. One record per build."""
    grid, args, smem = launch
    records = []
    for defines in builds:
        source = "".join(f"#define {key} {value}\n" for key, value in defines.items()) + SOURCE.read_text()
        (kernel,) = nvrtc.load_kernels(source, [name], out.device)
        allow_shared(kernel, smem)
        variant = {**defines, "registers": kernel.num_regs}
        records.append(variant)

        def probe(kernel=kernel) -> None:
            kernel.launch(grid, (256, 1, 1), args, shared_mem=smem)

        out.fill_(float("nan"))
        probe()
        torch.cuda.synchronize()
        variant["relative_error"] = error = float((got() - want).norm() / want.norm())
        if not bool(torch.isfinite(out).all()):  # the rows outside the comparison: every one written, none NaN
            error = variant["relative_error"] = float("nan")
        label = f"{name} ({', '.join(f'{key} {value}' for key, value in defines.items())}), {kernel.num_regs} registers"
        if not error < 1e-3:
            print(f"{label}: relative error {error:.2e}, wrong")
            continue
        ms = do_bench(probe, warmup=25, rep=200)
        variant["ms"], variant["tflops"] = ms, flops / ms / 1e9
        print(f"{label}: error {error:.2e}, {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    return records


def intra_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(rows, E) float32: the intra probe's y for one chunk's rows (q, k, v: that chunk's (rows, D/E) of one head),
    w = (s q . k)^2 on and below the diagonal, rounded to bf16 as the kernel rounds it."""
    w = torch.tril((scale * (q.float() @ k.float().T)) ** 2).to(torch.bfloat16).float()
    return (w @ v.float()) / (w.sum(-1, keepdim=True) + 1e-6)


def intra_side(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, record: dict) -> None:
    """``intra_probe``: the query kernel's intra-chunk product on wgmma (causal, no gate, no state term), checked on
    the first two chunks of two heads, in three builds (the next step's scores issued before this step's w V or
    after it; registers capped for one or two programs per SM), timed. TFLOP/s count the executed products: per
    chunk and head, blocks b = 0 .. C/128 - 1 of 128 rows each take 2 (b + 1) steps of 64 keys, each step two
    128 x 64 x 64 products."""
    T, scale = q.shape[1], D**-0.5
    if T % chunk or chunk % 128:
        raise SystemExit(f"the intra probe needs whole chunks of whole 128-row blocks (T={T}, chunk={chunk})")
    per_chunk = chunk // 128
    flops = (T // chunk) * H * per_chunk * (per_chunk + 1) * 4 * 128 * 64 * 64
    y = torch.empty(H, T, E, device="cuda")
    spans = [slice(c * chunk, (c + 1) * chunk) for c in range(min(2, T // chunk))]
    want = torch.stack(
        [torch.cat([intra_reference(q[h, s], k[h, s], v[h, s], scale) for s in spans]) for h in (0, H - 1)]
    )
    rows = spans[-1].stop
    builds = [{"INTRA_LOOKAHEAD": ahead, "INTRA_MIN_BLOCKS": blocks} for ahead, blocks in ((1, 1), (0, 1), (1, 2))]
    launch = ((T // 128, H, 1), (q, k, v, y, T, chunk, scale), INTRA_SMEM)
    record["intra_probe"] = time_builds("intra_probe", builds, launch, y, lambda: y[[0, H - 1], :rows], want, flops)


def state_side(k: torch.Tensor, v: torch.Tensor, n_chunks: int, chunk: int, flops: float, record: dict) -> None:
    """``state_probe``: the chunk-local state product, checked on every chunk of two heads, in three builds, timed."""
    T = k.shape[1]
    s = torch.empty(H, n_chunks, DT, E, device="cuda")
    heads = [0, H - 1]
    want = reference(k, v, chunk, heads)
    record["variants"] = []
    # (programs per SM the registers are capped for, V descriptor's LBO, SBO): the second descriptor is the
    # swapped reading of the MN-major layout, tried in case the first is wrong
    for blocks, lbo, sbo in ((2, 16, 1024), (1, 16, 1024), (2, 1024, 16)):
        source = f"#define PROBE_MIN_BLOCKS {blocks}\n#define PROBE_V_LBO {lbo}\n#define PROBE_V_SBO {sbo}\n"
        (kernel,) = nvrtc.load_kernels(source + SOURCE.read_text(), ["state_probe"], k.device)
        allow_shared(kernel, STATE_SMEM)
        variant = {"min_blocks": blocks, "v_lbo": lbo, "v_sbo": sbo, "registers": kernel.num_regs}
        record["variants"].append(variant)

        def probe(kernel=kernel) -> None:
            kernel.launch((n_chunks, PAIRS, H), (256, 1, 1), (k, v, s, T, n_chunks, chunk), shared_mem=STATE_SMEM)

        s.fill_(float("nan"))
        probe()
        torch.cuda.synchronize()
        variant["relative_error"] = error = float((s[heads] - want).norm() / want.norm())
        print(
            f"{blocks} program(s) per SM, V LBO {lbo} SBO {sbo}, {kernel.num_regs} registers: "
            f"relative error {error:.2e} against PyTorch"
        )
        if not error < 1e-3:  # where it is wrong: rows (the A fragment or the row order) or columns (B's layout)
            diff = (~((s[heads] - want).abs() <= 1e-2 * want.abs().amax())).any(0).any(0)  # NaN: never written
            variant["bad_rows"], variant["bad_columns"] = diff.any(1).sum().item(), diff.any(0).sum().item()
            print(f"  wrong: {variant['bad_rows']} of {DT} rows, {variant['bad_columns']} of {E} columns")
            continue
        ms = do_bench(probe, warmup=25, rep=200)
        variant["ms"], variant["tflops"] = ms, flops / ms / 1e9
        print(f"  {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")


def forward_side(k: torch.Tensor, v: torch.Tensor, chunk: int, record: dict) -> None:
    """The package's forward at the same shape (SDPA layout, b=1, q = k), its state and query kernels' times from
    the profiler, with Triton's state kernel and with the one ``codegen="auto"`` picks."""
    q4, k4, v4 = (t.unsqueeze(0) for t in (k, k, v))
    for impl in ("triton", "auto"):
        times = kernel_times(lambda impl=impl: rc.power_retention(q4, k4, v4, chunk_size=chunk, impl=impl), calls=10)
        kernels = {name: ms for name, ms in times.items() if "state" in name or "attention" in name}
        record[f"forward_{impl}_kernels_ms"] = kernels
        print(f"forward impl={impl}: state and query kernels (ms) {kernels}")


PROBES = ("state", "query", "dq", "intra", "forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None)
    parser.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES), help="which probes to run")
    args = parser.parse_args()
    T, chunk = args.T, args.chunk
    n_chunks = -(-T // chunk)
    base, record = result_header("wgmma_probe", args.out, args.commit)
    record["shape"] = {"B": 1, "H": H, "d": D, "e": E, "T": T, "chunk": chunk, "dtype": "bfloat16", "Dt": DT}

    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(H, T, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(H, T, E, device="cuda", generator=gen).to(torch.bfloat16)
    flops = 2 * T * H * DT * E
    sides = {
        "state": lambda: state_side(k, v, n_chunks, chunk, flops, record),
        "query": lambda: query_side(k, n_chunks, chunk, flops, record),
        "dq": lambda: dq_side(k, n_chunks, chunk, flops, record),
        "intra": lambda: intra_side(
            torch.randn(H, T, D, device="cuda", generator=gen).to(torch.bfloat16), k, v, chunk, record
        ),  # fmt: skip
        "forward": lambda: forward_side(k, v, chunk, record),
    }
    for name in args.probes:
        sides[name]()
        base.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {base.with_suffix('.json')}")


if __name__ == "__main__":
    main()
