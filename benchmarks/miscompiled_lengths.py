"""Offline sm_90 compiles of the op's Triton kernels at lengths of 1 and 2, scanned for a miscompile, no GPU needed.

    python benchmarks/miscompiled_lengths.py [--triton DIR] [--raw] [--chunked] [--only TEXT] [--commit C]

Triton takes an integer argument equal to 1 as a constant, so a kernel's loop over the rows or keys of such a length
folds away. ptxas 12.8 (shipped with Triton 3.6, the GPU box's) compiled several of those folded bf16 kernels into
SASS that reads a uniform register no instruction writes: the address of a wgmma operand, so the kernel reads
shared memory at a garbage address (GPU fuzz seed 69690001, case 599, faulted so). This script renders the forward's
``attention_kernel`` and the backward's ``dq_kernel`` and ``dkv_kernel`` for a grid of shape classes and lengths,
compiles each for ``GPUTarget("cuda", 90, 128)`` with the integer arguments specialized as Triton's launcher would
(``sass_loops.signature``), disassembles it with that Triton's ``cuobjdump``, and lists the uniform registers read
and never written (``unwritten_uniform_reads``).

By default each kernel gets the lengths the op gives it: a single key runs after a key of zeros, and the backward's
single non-causal query row after a row of zeros (``forward.single_key_padded``, ``backward.backward_rows``).
``--raw`` passes the call's lengths as they are, which shows the miscompiles that padding avoids. ``--triton DIR``
puts another Triton first on the path (``pip download triton==3.6.0 --no-deps``, then ``pip install --no-deps
--target DIR`` the wheel).
``--chunked`` scans the chunked path's kernels instead (the query, state and scan kernels and the backward's
chunked kernels, deg 2 in chunks of 256 keys, in one segment or one chunk per segment).
Writes ``benchmarks/results/miscompiled_lengths_<triton>_<commit>[_chunked][_raw].json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

# a SASS instruction (after an optional predicate): its opcode and operands
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(\S+)\s*(.*?)\s*;")
UNIFORM = re.compile(r"\bUR(\d+)\b")
REGISTER = re.compile(r"R\d+")
# shape classes: (dtype, d, e, deg, causal, gated, valid); lengths: (Tq, Tk, heads)
CLASSES = [
    ("bf16", 16, 64, 4, False, False, True),
    ("bf16", 16, 16, 2, False, False, False),
    ("bf16", 32, 64, 4, False, False, True),
    ("bf16", 32, 32, 2, False, False, False),
    ("bf16", 64, 64, 2, False, False, False),
    ("bf16", 128, 128, 2, False, False, False),
    ("bf16", 16, 64, 2, True, True, True),
    ("bf16", 32, 32, 2, True, False, False),
    ("fp32", 32, 64, 4, False, False, True),
]
LENGTHS = [(1, 3126, 1), (1, 3126, 4), (1000, 1, 1), (1000, 1, 4), (1, 1, 1), (2, 2, 1)]
KERNELS = ("attention_kernel", "dq_kernel", "dkv_kernel")
# ``--chunked``: deg-2 classes in chunks of 256 keys, Tq 1 (decode-shaped) and 5000 against 5000 keys (20 chunks), in
# one segment or twenty (one chunk each: chunks_per_seg 1), every kernel of the chunked path
CHUNKED_CLASSES = [
    ("bf16", 16, 16, 2, True, True, False),
    ("bf16", 32, 32, 2, True, False, True),
    ("bf16", 32, 32, 2, False, False, False),
]
CHUNKED_LENGTHS = [(1, 5000, 1), (5000, 5000, 1)]
CHUNK, SEGMENTS = 256, (1, 20)
FORWARD_KERNELS = ("attention_kernel", "state_kernel", "scan_kernel")
CHUNKED_KERNELS = (*FORWARD_KERNELS, "dq_kernel", "dkv_kernel", "dkv_state_kernel", "reverse_state_kernel",
                   "reverse_scan_kernel")  # fmt: skip


def unwritten_uniform_reads(sass: str) -> list[str]:
    """The instructions of ``sass`` (``cuobjdump -sass``) that read a uniform register no instruction writes.

    A uniform instruction (opcode U..., or R2UR/S2UR) writes its first operand, two registers for a ``.64`` or
    ``.WIDE`` result, four for ``.128``; a ``.64`` one reads pairs. ``gdesc[URn]`` reads URn..URn+3 (A's and B's
    descriptors), only URn+2..3 where A comes from registers."""
    written: set[int] = set()
    reads: list[tuple[range, str]] = []
    for opcode, operands in INSTRUCTION.findall(sass):
        parts = [p.strip() for p in operands.split(",")]
        suffixes = set(opcode.split(".")[1:])
        width = 2 if suffixes & {"64", "WIDE"} else 4 if "128" in suffixes else 1  # the result's registers
        first = 0
        if opcode.startswith(("U", "R2UR", "S2UR")) and parts and (dest := UNIFORM.fullmatch(parts[0])):
            written.update(range(int(dest.group(1)), int(dest.group(1)) + width))
            first = 1
        for i, part in enumerate(parts[first:], first):
            for number in map(int, UNIFORM.findall(part)):
                span = range(number, number + (2 if "64" in suffixes else 1))  # .WIDE: 32-bit sources
                if "gdesc[" in part:  # HGMMA D, A (registers), gdesc or HGMMA D, gdesc (A's and B's descriptors)
                    from_registers = i == 2 and REGISTER.fullmatch(parts[1])
                    span = range(number + 2, number + 4) if from_registers else range(number, number + 4)
                reads.append((span, f"{opcode} {operands}"))
    return [text for span, text in reads if any(n not in written and n != 255 for n in span)]


def kernel_lengths(kernel: str, Tq: int, Tk: int, causal: bool, raw: bool) -> tuple[int, int]:
    """The (Tq, Tk) ``kernel`` runs at for a call of these lengths: as given with ``raw``, else after the op's key of
    zeros (``forward.single_key_padded``) and the rows it then drops or adds (``forward.aligned_rows``; the backward's
    ``backward.backward_rows``)."""
    import torch

    from retention_compile.codegen import backward, forward

    if raw:
        return Tq, Tk
    if forward.single_key_padded(torch.empty(1, 1, Tk, 1, device="meta")):
        Tk += 1
    q, k = torch.empty(1, 1, Tq, 1, device="meta"), torch.empty(1, 1, Tk, 1, device="meta")
    rows = forward.aligned_rows if kernel == "attention_kernel" else backward.backward_rows
    if (shift := rows(q, k, causal)) is not None:
        Tq -= shift
    return Tq, Tk


def launch_ints(B: int, H: int, Tq: int, Tk: int, d: int, e: int, chunk: int, segments: int = 1) -> dict[str, int]:
    """The integer arguments the kernels take for contiguous (B, H, T, .) inputs, one state head per head, the chunks
    aligned to the queries (shift (Tq - Tk) mod chunk) and cut into ``segments`` segments."""
    ints = {f"stride_q{a}": s for a, s in zip("bhtd", (H * Tq * d, Tq * d, d, 1))}
    ints |= {f"stride_k{a}": s for a, s in zip("bhtd", (H * Tk * d, Tk * d, d, 1))}
    ints |= {f"stride_v{a}": s for a, s in zip("bhte", (H * Tk * e, Tk * e, e, 1))}
    ints |= {f"stride_y{a}": s for a, s in zip("bhte", (H * Tq * e, Tq * e, e, 1))}
    shift = (Tq - Tk) % chunk if chunk < Tk else 0
    chunks = max(1, -(-(Tk + shift) // chunk))
    per_segment = -(-chunks // segments)
    ints |= {"Hq": H, "group": 1, "state_heads": H, "gate_heads": H, "state_slots": chunks, "shift": shift}
    ints |= {"n_chunks": chunks, "chunks_per_seg": per_segment, "n_seg": -(-chunks // per_segment), "n_rows": H * Tq}
    return ints | {"Tq": Tq, "Tk": Tk, "stride_g": -(-Tk // 16) * 16}


def compile_and_scan(source: Path, kernel: str, ints: dict[str, int], input_type: str) -> dict | None:
    """``kernel`` of the module at ``source`` compiled for sm_90 (4 warps, 2 stages) with these integer arguments:
    its shared memory and the instructions reading unwritten uniform registers (None: the module has no such
    kernel)."""
    import sass_loops
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_spec = importlib.util.spec_from_file_location(source.stem, source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, kernel, None)
    if fn is None:  # a kernel this shape class has no use for (the reverse scan of a non-causal call)
        return None
    sig, constants, attrs = sass_loops.signature(fn, ints, input_type)
    options = {"num_warps": 4, "num_stages": 2}
    compiled = triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", 90, 128), options=options)
    cubin = source.with_suffix(f".{kernel}.cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    sass, _ = sass_loops.disassemble(cubin, None)
    return {"shared_bytes": compiled.metadata.shared, "unwritten_reads": unwritten_uniform_reads(sass)}


def scan_kernel(
    shape_class: tuple,
    lengths: tuple[int, int, int],
    kernel: str,
    raw: bool,
    folder: Path,
    chunk: int = 1 << 20,
    segments: int = 1,
) -> dict | None:
    """One kernel of ``shape_class`` (a ``CLASSES`` entry) for a call of ``lengths`` (Tq, Tk, heads) in chunks of
    ``chunk`` keys (the default: one chunk, the quadratic kernels) cut into ``segments`` segments, rendered into
    ``folder``, compiled and scanned: the lengths it ran at, its shared memory and its unwritten reads (None where the
    class's module has no such kernel)."""  # fmt: skip
    import torch

    from retention_compile.codegen import backward, forward, triton_source
    from retention_compile.planning import Plan

    dtype, d, e, deg, causal, gated, valid = shape_class
    Tq, Tk, H = lengths
    plan = Plan(chunk_size=chunk, block_t=64, block_feature=16, block_e=64)
    tq, tk = kernel_lengths(kernel, Tq, Tk, causal, raw)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    q = torch.empty(1, H, tq, d, dtype=torch_dtype, device="meta")
    v = torch.empty(1, H, tk, e, dtype=torch_dtype, device="meta")
    spec = forward.kernel_spec(q, v, deg, gated, valid, causal, tk, plan)
    if kernel in FORWARD_KERNELS:
        text = triton_source.render_forward(spec)
    else:
        text = triton_source.render(backward.BACKWARD_TEMPLATE, backward.BackwardSpec.of(spec))
    source = folder / f"{kernel}_{len(list(folder.iterdir()))}.py"
    source.write_text(text)
    result = compile_and_scan(source, kernel, launch_ints(1, H, tq, tk, d, e, chunk, segments), dtype)
    return None if result is None else {"kernel": kernel, "Tq": tq, "Tk": tk, **result}


def scan(raw: bool, only: str, chunked: bool = False) -> list[dict]:
    """Every class x lengths (x segments) x kernel of ``CLASSES`` and ``LENGTHS`` (``chunked``: ``CHUNKED_CLASSES``,
    ``CHUNKED_LENGTHS``, ``SEGMENTS`` and ``CHUNKED_KERNELS`` in chunks of ``CHUNK``) whose label contains ``only``."""
    classes, all_lengths = (CHUNKED_CLASSES, CHUNKED_LENGTHS) if chunked else (CLASSES, LENGTHS)
    kernels, chunk, segment_counts = (CHUNKED_KERNELS, CHUNK, SEGMENTS) if chunked else (KERNELS, 1 << 20, (1,))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape_class, lengths, segments in ((c, n, s) for c in classes for n in all_lengths for s in segment_counts):
            dtype, d, e, deg, causal, gated, valid = shape_class
            flags = ("causal" if causal else "noncausal") + "-gated" * gated + "-valid" * valid
            label = f"{dtype}-d{d}-e{e}-deg{deg}-{flags}-Tq{lengths[0]}-Tk{lengths[1]}-H{lengths[2]}"
            label += f"-chunk{chunk}-seg{segments}" * chunked
            if only not in label:
                continue
            for kernel in kernels:
                if (scanned := scan_kernel(shape_class, lengths, kernel, raw, Path(tmp), chunk, segments)) is None:
                    continue
                row = {"case": label, **scanned}
                rows.append(row)
                bad = row["unwritten_reads"]
                verdict = f"MISCOMPILED ({len(bad)} reads)" if bad else "ok"
                print(f"{label} {kernel} at Tq {row['Tq']}, Tk {row['Tk']}: {verdict}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", type=Path, default=None, help="a Triton to put first on the path")
    parser.add_argument("--raw", action="store_true", help="the lengths as called, no rows or keys of zeros")
    parser.add_argument("--only", default="", help="only the cases whose label contains this")
    parser.add_argument("--chunked", action="store_true", help="the chunked path's kernels (deg 2, chunks of 256)")
    parser.add_argument("--commit", default=None, help="the commit to record (default: the checkout's)")
    args = parser.parse_args()
    if args.triton:
        sys.path.insert(0, str(args.triton))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9 (which warns of a change)
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    import triton
    from provenance import command_line, git_commit

    rows = scan(args.raw, args.only, args.chunked)
    bad = [r for r in rows if r["unwritten_reads"]]
    print(f"{len(bad)} of {len(rows)} kernels read uniform registers that nothing writes (Triton {triton.__version__})")
    out = Path(__file__).resolve().parent / "results"
    suffix = "_chunked" * args.chunked + "_raw" * args.raw
    name = f"miscompiled_lengths_triton{triton.__version__}_{git_commit(args.commit)}{suffix}.json"
    record = {"command": command_line(), "commit": git_commit(args.commit), "triton": triton.__version__,
              "raw": args.raw, "chunked": args.chunked, "kernels": rows}  # fmt: skip
    (out / name).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
