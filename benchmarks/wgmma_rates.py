"""Throughput of Hopper's wgmma by shape: back-to-back ``m64nNk16`` bf16 products with fp32 accumulators, A from
registers (RS) or shared memory (SS), B from shared memory, ``tiles`` products per commit group and at most
``in_flight`` groups outstanding, ``programs`` 256-thread programs per SM. The operands are constant, so the numbers
are the tensor cores' rate for the instruction shape with no data movement at all: a ceiling for kernels built on that
shape (the CUDA state kernel issues two m64n72k16 RS per 16-key slice and warpgroup).

    python3 benchmarks/wgmma_rates.py --out benchmarks/results [--commit SHA]

Writes ``wgmma_rates_<GPU>_<date>[_<commit>].json``: per shape the best of 5 launches (ms) and TFLOP/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_WIDTHS = [  # (N, tiles per group, programs per SM)
    (8, 2, 2), (64, 2, 2), (72, 2, 2), (72, 1, 2), (128, 1, 2), (136, 1, 2), (128, 2, 1), (256, 1, 1), (72, 4, 1),
]  # fmt: skip
SHAPES = [  # (A from registers, N, tiles per group, programs per SM, groups in flight)
    *[(rs, n, t, p, 2) for rs in (True, False) for n, t, p in _WIDTHS],
    (True, 72, 2, 2, 1),
    (True, 72, 2, 2, 4),
]
ITERATIONS = 8000
SHARED_BYTES = 65536


def kernel_name(rs: bool, n: int, tiles: int, programs: int, in_flight: int) -> str:
    return f"wgmma_{'rs' if rs else 'ss'}_n{n}_t{tiles}_p{programs}_f{in_flight}"


def product(rs: bool, n: int) -> str:
    """The device function issuing one ``m64nNk16`` (A registers or descriptor, B descriptor, both MN-major B)."""
    acc = n // 2
    outputs = ", ".join(f'"+f"(d[{i}])' for i in range(acc))
    registers = ", ".join(f"%{i}" for i in range(acc))
    if rs:
        a_param, a_operand = "const unsigned (&a)[4]", f"{{%{acc}, %{acc + 1}, %{acc + 2}, %{acc + 3}}}"
        inputs, b_operand, flags = '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b)', f"%{acc + 4}", "1, 1, 1, 1"
    else:
        a_param, a_operand = "unsigned long long a", f"%{acc}"
        inputs, b_operand, flags = '"l"(a), "l"(b)', f"%{acc + 1}", "1, 1, 1, 0, 1"
    return f"""
__device__ __forceinline__ void {"rs" if rs else "ss"}{n}(float (&d)[{acc}], {a_param}, unsigned long long b) {{
  asm volatile("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 "
               "{{{registers}}}, {a_operand}, {b_operand}, {flags};"
               : {outputs} : {inputs});
}}
"""


def kernel(rs: bool, n: int, tiles: int, programs: int, in_flight: int) -> str:
    """A program of two warpgroups, each issuing ``tiles`` products per commit group, ITERATIONS groups."""
    a = "a[m]" if rs else "a_desc + 2 * m"
    a_desc = (
        ""
        if rs
        else (
            "  const unsigned long long a_desc =\n"
            "      (((base + 32768) & 0x3FFFF) >> 4) | (128ull >> 4 << 16) | (256ull >> 4 << 32);\n"
        )
    )
    return f"""
extern "C" __global__ void __launch_bounds__(256, {programs}) {kernel_name(rs, n, tiles, programs, in_flight)}(
    float* out, int iterations) {{
  extern __shared__ __align__(1024) unsigned char smem[];
  for (int i = threadIdx.x; i < {SHARED_BYTES // 4}; i += 256)
    reinterpret_cast<unsigned*>(smem)[i] = 0x3c003c00u ^ (i * 2654435761u & 0x00ff00ffu);
  __syncthreads();
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // B: 128-byte swizzle, atoms 2048 bytes apart along N, 8-row groups 1024 apart; A (SS): no swizzle, within 32 KB
  const unsigned long long b_desc =
      ((base & 0x3FFFF) >> 4) | (2048ull >> 4 << 16) | (1024ull >> 4 << 32) | (1ull << 62);
{a_desc}  unsigned a[{tiles}][4];
  float acc[{tiles}][{n // 2}];
  for (int m = 0; m < {tiles}; ++m) {{
    for (int r = 0; r < 4; ++r) a[m][r] = 0x3c003c00u + threadIdx.x + r + m;
    for (int i = 0; i < {n // 2}; ++i) acc[m][i] = 0.0f;
  }}
  for (int it = 0; it < iterations; ++it) {{
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"({in_flight - 1}) : "memory");
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int m = 0; m < {tiles}; ++m) {"rs" if rs else "ss"}{n}(acc[m], {a}, b_desc + 64 * (it & 3));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  }}
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  float s = 0.0f;
  for (int m = 0; m < {tiles}; ++m)
    for (int i = 0; i < {n // 2}; ++i) s += acc[m][i];
  if (s == 12345.0f) out[threadIdx.x] = s;  // keeps the products live
}}
"""


def source() -> str:
    widths = sorted({(rs, n) for rs, n, *_ in SHAPES})
    return "".join(product(rs, n) for rs, n in widths) + "".join(kernel(*shape) for shape in SHAPES)


def measure(commit: str | None) -> dict:
    import torch

    from retention_compile.codegen import cuda_state, nvrtc

    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    text = source()
    out = torch.empty(256, device="cuda")
    rows = []
    for shape in SHAPES:
        rs, n, tiles, programs, in_flight = shape
        name = kernel_name(*shape)
        kernel = cuda_state.load_with_shared_memory(text, name, SHARED_BYTES, device)
        grid = (sms * programs, 1, 1)
        kernel.launch(grid, (256, 1, 1), [out, 100], shared_mem=SHARED_BYTES)
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            kernel.launch(grid, (256, 1, 1), [out, ITERATIONS], shared_mem=SHARED_BYTES)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        flop = 2.0 * grid[0] * 2 * ITERATIONS * tiles * 64 * n * 16
        row = {"a": "registers" if rs else "shared", "n": n, "tiles": tiles, "programs_per_sm": programs}
        row |= {"in_flight": in_flight, "registers": kernel.num_regs, "ms": best, "tflops": flop / best / 1e9}
        print(f"{name:28s} regs {row['registers']:3d} {best:8.3f} ms {row['tflops']:7.1f} TFLOP/s", flush=True)
        rows.append(row)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "gpu": torch.cuda.get_device_name(device),
        "compiler": nvrtc.compiler_id(),
        "iterations": ITERATIONS,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None)
    parser.add_argument("--source", action="store_true", help="print the CUDA source and exit (no GPU)")
    args = parser.parse_args()
    if args.source:
        print(source())
        return
    record = measure(args.commit)
    gpu = record["gpu"].replace(" ", "-")
    stem = f"wgmma_rates_{gpu}_{datetime.date.today()}" + (f"_{args.commit}" if args.commit else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out / stem}.json")


if __name__ == "__main__":
    main()
