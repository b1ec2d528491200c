"""Offline sm_90a SASS of the op's Triton kernels and of its CUDA state kernels, no GPU needed: registers, stack and
the instructions of each loop that holds wgmma (HGMMA), per warp and iteration.

    python benchmarks/sass_loops.py [--kernel attention|dq|dkv|state|reverse] [--T 65536] [--d 64] [--dtype bf16|fp16]
        [--gated] [--valid] [--traced] [--pairs] [--package DIR] [--triton DIR] [--keep DIR]

The kernel is rendered as the op renders it for b=1, h=8, d=e=64 (``--d``), deg 2, bf16 (``--dtype``), causal
self-attention of length T
with the H200's plan (``planning.plan``): ``attention`` is the chunked query kernel with the eager launch
(``forward.query_launch``; ``--traced``: the launch of a compiled graph, for packages before session 53, whose
compiled and eager launches differed) in the layout the op's forward reads: the cherry layout where the wgmma state
kernel writes it (d = 64 bf16), else pairs, with packed bf16 squares (``KernelSpec.packed_squares``, where the
package has them) as in a forward no backward follows (``--pairs``: the pair layout and float32 squares, as in
training, where the states are kept whatever the shape); ``dq`` and ``dkv`` are the
backward's intra-chunk kernels with their launch (``backward.chunked_warps``, the spec's stages), ``dq_kernel``
without its state terms (the CUDA kernel adds them on Hopper); ``state`` is the forward's CUDA wgmma state kernel
(``cuda_state.render_state_source`` with its default config, compiled by the package's own NVRTC or nvcc, in the
cherry layout or with ``--pairs`` the pair layout; its step loop holds the chunk starts' branches, so its count is
the loop's whole body, not one step's path); ``reverse`` is the backward's CUDA wgmma reverse-state kernel
(``cuda_reverse.render_reverse_source``, with the coordinate terms where the backward takes them,
``backward.coordinate_state_terms``: gated d <= 64), counted the same way. ``--package DIR`` renders another version's
``retention_compile`` (in a process of its own, e.g. one extracted by ``git archive``), so two templates compare.

Triton compiles it for ``GPUTarget("cuda", 90, 128)`` and its bundled ``cuobjdump`` disassembles it. The integer
arguments are specialized as Triton's launcher would specialize the op's values at that shape (contiguous
(B, H, T, d) tensors, shift 0: multiples of 16 marked divisible, 1 a constant), through Triton's own
``native_specialize_impl``. ``--triton DIR`` puts another Triton first on the path (the device runs 3.6: ``pip
download triton==3.6.0 --no-deps`` and unzip it; make its ``backends/nvidia/bin`` files executable): instruction
counts differ between Triton versions, so compare within one.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

B, H = 1, 8
# Pointer arguments by name: those in the inputs' dtype (the others are float32 buffers: outputs, sums, states kept in
# float32, G), but those OTHER_POINTER_TYPES names.
INPUT_POINTERS = {"Q", "K", "V", "DY", "Y_OUT", "S_ST", "R_ST"}
INPUT_TYPES = {"bf16": "bfloat16", "fp16": "float16"}  # --dtype: Triton's name -> torch's
OTHER_POINTER_TYPES = {"VALID": "i1", "SYNC": "i32"}  # a bool mask; the state kernel's int32 counts
CONSTEXPRS = {"ROUNDED_OUT": False}  # the forward's second store of y (in the inputs' dtype) off
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BACK_BRANCH = re.compile(r"BRA\s.*?0x([0-9a-f]+)")


def render(
    kernel: str, T: int, d: int, dtype: str, gated: bool, valid: bool, traced: bool, pairs: bool, out: Path
) -> dict:
    """Write the kernel's source to ``out`` (this process imports the package) and return its launch, the integer
    arguments the op passes at this shape (head and value dimension ``d``, inputs of Triton type ``dtype``) and
    that type."""
    import torch

    from retention_compile import hardware, planning
    from retention_compile.codegen import backward, forward, triton_source

    h200 = hardware.KNOWN["H200"]
    torch_dtype = getattr(torch, INPUT_TYPES[dtype])
    plan = planning.plan(h200, T=T, d=d, e=d, deg=2, dtype=torch_dtype, gated=gated, batch_heads=B * H)
    q = torch.empty(B, H, T, d, dtype=torch_dtype, device="meta")
    spec = forward.kernel_spec(q, q, 2, gated, valid, True, T, plan)
    if not spec.chunked:
        raise SystemExit(f"T={T}: the plan takes the single-chunk path (chunk {plan.chunk_size}); pick a longer T")
    training = pairs  # the forward a backward follows: states kept (pairs), float32 squares
    pairs = pairs or not takes_cherries(spec)
    if kernel == "state":
        from retention_compile.codegen import cuda_state

        if not cuda_state.uses_wgmma(spec, cuda_state.CONFIG, "sm_90a"):
            raise SystemExit(f"--kernel state reads the wgmma state kernel, which {spec.summary()} does not take")
        return {**render_state(spec, pairs, out), "input_type": dtype}
    if kernel == "reverse":
        return {**render_reverse(spec, out), "input_type": dtype}
    if kernel == "attention":
        tracing = {"tracing": traced} if "tracing" in inspect.signature(forward.query_launch).parameters else {}
        if traced and not tracing:
            raise SystemExit("--traced: this package's compiled and eager calls take one query launch; leave it out")
        launch = forward.query_launch(spec, plan, **tracing)
        spec = forward._with_query_tiles(spec, launch.rows, launch.split)
        if not pairs:
            spec = forward._with_cherries(spec)
        if not training and hasattr(triton_source, "with_packed_squares"):  # packages since session 55
            spec = triton_source.with_packed_squares(spec)
        if takes_cherries(spec) and getattr(forward, "QUERY_BESIDE_STATES", False):  # beside the state kernel
            spec = forward._waiting_for_states(spec)
        source, name = triton_source.render_forward(spec), "attention_kernel"
        warps, stages, max_registers = launch.warps, launch.stages, launch.max_registers
    else:
        bspec = backward.BackwardSpec.of(spec, dq_state_terms=False)
        source, name = triton_source.render(backward.BACKWARD_TEMPLATE, bspec), f"{kernel}_kernel"
        warps = backward.chunked_warps(spec, False)
        stages, max_registers = (bspec.dq_stages if kernel == "dq" else bspec.dkv_stages), None
    out.write_text(source)
    strides = {"b": H * T * d, "h": T * d, "t": d, "d": 1, "e": 1}
    ints = {f"stride_{t}{axis}": value for t in "qkvy" for axis, value in strides.items()}
    slots = -(-T // plan.chunk_size)
    ints |= {"Hq": H, "group": 1, "gate_heads": H, "state_heads": H, "state_slots": slots, "shift": 0, "Tq": T, "Tk": T}
    ints["stride_g"] = -(-T // 16) * 16
    # beside the state kernel: its segments as the H200's T=65536 call takes them (9 programs per head and segment)
    ints |= {"done_offset": 1 + H * 9 * 11, "done_target": 9, "chunks_per_seg": 6, "n_seg": 11}
    return {"name": name, "warps": warps, "stages": stages, "max_registers": max_registers, "ints": ints,
            "input_type": dtype}  # fmt: skip


def takes_cherries(spec) -> bool:
    """Whether the op's forward (no states kept) takes the cherry layout for ``spec`` on an H200 (packages before
    session 54 lack ``cuda_state.cherry_rows_on``: there, d = 64 bf16, the shapes they were read at)."""
    from retention_compile.codegen import cuda_state

    rows_on = getattr(cuda_state, "cherry_rows_on", None)
    if rows_on is None:
        return spec.head_dim == 64 and spec.dtype == "bfloat16"
    return rows_on(spec, cuda_state.CONFIG, "sm_90a")


def render_state(spec, pairs: bool, out: Path) -> dict:
    """The forward's CUDA state kernel for ``spec`` (the cherry layout unless ``pairs``), by ``compile_cuda``."""
    from retention_compile.codegen import cuda_state, forward

    if not pairs:
        spec = forward._with_cherries(spec)
    source = cuda_state.render_state_source(spec, cuda_state.CONFIG, "sm_90a")
    return compile_cuda(source, out, "retention_chunk_state", cuda_state.wgmma_smem_bytes(spec))


def render_reverse(spec, out: Path) -> dict:
    """The backward's CUDA reverse-state kernel for the forward ``spec``, by ``compile_cuda``."""
    from retention_compile.codegen import backward, cuda_reverse, cuda_state

    if (why := cuda_reverse.reverse_unsupported(spec, "sm_90a")) is not None:
        raise SystemExit(f"--kernel reverse: the wgmma reverse-state kernel does not serve {spec.summary()}: {why}")
    source = cuda_reverse.render_reverse_source(spec, backward.coordinate_state_terms(spec), cuda_state.CONFIG)
    return compile_cuda(source, out, cuda_reverse.KERNEL_NAME, cuda_reverse.smem_bytes(spec.chunk_size))


def compile_cuda(source: str, out: Path, name: str, dynamic_shared_bytes: int) -> dict:
    """Write the wgmma kernel ``name``'s CUDA ``source`` (``out`` with suffix .cu) and its sm_90a cubin (.cubin), by
    the package's NVRTC or nvcc, and return where the cubin is, with the launch's threads and dynamic shared memory."""
    from retention_compile.codegen import cuda_state, nvrtc

    out.with_suffix(".cu").write_text(source)
    cubin = out.with_suffix(".cubin")
    cubin.write_bytes(nvrtc.compile_source(source, "sm_90a"))
    return {"name": name, "cubin": str(cubin), "threads": cuda_state.WGMMA_THREADS,
            "dynamic_shared_bytes": dynamic_shared_bytes}  # fmt: skip


def signature(fn, ints: dict, input_type: str) -> tuple[dict, dict, dict]:
    """Triton's signature, constants and attributes for ``fn``'s arguments as the launcher would specialize them
    (the inputs' pointers of Triton type ``input_type``)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            if name not in CONSTEXPRS:
                raise SystemExit(f"{fn.__name__}: no value for the constexpr argument {name!r}")
            sig[name], constants[(i,)] = "constexpr", CONSTEXPRS[name]
            continue
        if name == "scale":
            sig[name] = "fp32"
            continue
        if name.isupper():
            dtype = input_type if name in INPUT_POINTERS else OTHER_POINTER_TYPES.get(name, "fp32")
            sig[name], attrs[(i,)] = f"*{dtype}", [["tt.divisibility", 16]]  # allocations are 16-byte aligned
            continue
        if name not in ints:
            raise SystemExit(f"{fn.__name__}: no value for the integer argument {name!r} (add it to render's table)")
        kind, key = native_specialize_impl(BaseBackend, ints[name], False, True, True)[:2]
        if kind == "constexpr":
            sig[name], constants[(i,)] = "constexpr", key
        else:
            sig[name] = kind
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return sig, constants, attrs


def wgmma_loops(sass: str) -> list[dict]:
    """The loops of ``cuobjdump -sass`` output that hold HGMMA: each a backward branch's range (an outer loop's range
    holds its inner ones), in the order of their branches, with its instruction count and its counts by opcode."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    loops = []
    for address, text in lines:
        branch = BACK_BRANCH.search(text)
        if not branch or int(branch.group(1), 16) >= address:
            continue
        body = [t for a, t in lines if int(branch.group(1), 16) <= a <= address]
        opcodes = collections.Counter(t.split()[1 if t.startswith("@") else 0].split(".")[0] for t in body)
        if opcodes["HGMMA"]:
            loops.append({"start": hex(int(branch.group(1), 16)), "end": hex(address), "instructions": len(body),
                          "opcodes": dict(opcodes.most_common())})  # fmt: skip
    return loops


def disassemble(cubin: Path, keep: Path | None) -> tuple[str, dict[str, int]]:
    """``cubin``'s SASS and resources (REG, STACK, SHARED, LOCAL) by Triton's bundled ``cuobjdump`` (the SASS kept
    beside it under ``keep``)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    if keep:
        (keep / f"{cubin.stem}.sass").write_text(sass)
    return sass, {name: int(value) for name, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


def cuda_sass(launch: dict, keep: Path | None) -> dict:
    """The resources and wgmma loops of the CUDA kernel ``render_state`` or ``render_reverse`` compiled."""
    sass, resources = disassemble(Path(launch["cubin"]), keep)
    return {
        "kernel": launch["name"], "threads": launch["threads"], "registers": resources["REG"],
        "stack_bytes": resources["STACK"], "shared_bytes": resources["SHARED"] + launch["dynamic_shared_bytes"],
        "loops": wgmma_loops(sass),
    }  # fmt: skip


def compile_sass(source: Path, launch: dict, keep: Path | None) -> dict:
    """Compile ``source``'s kernel for sm_90a and read its resources and wgmma loops."""
    import importlib.util

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_spec = importlib.util.spec_from_file_location(source.stem, source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, launch["name"])
    sig, constants, attrs = signature(fn, launch["ints"], launch["input_type"])
    options = {"num_warps": launch["warps"], "num_stages": launch["stages"]}
    if launch["max_registers"]:
        options["maxnreg"] = launch["max_registers"]
    compiled = triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", 90, 128), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = (keep or Path(tmp)) / f"{source.stem}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        if keep:
            cubin.with_suffix(".ptx").write_text(compiled.asm["ptx"])
        sass, resources = disassemble(cubin, keep)
    return {
        "triton": triton.__version__, "kernel": launch["name"], "options": options, "registers": resources["REG"],
        "stack_bytes": resources["STACK"], "shared_bytes": compiled.metadata.shared, "loops": wgmma_loops(sass),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("attention", "dq", "dkv", "state", "reverse"), default="attention")
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--d", type=int, default=64, help="head and value dimension")
    parser.add_argument("--dtype", choices=tuple(INPUT_TYPES), default="bf16", help="the inputs' dtype")
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--valid", action="store_true")
    parser.add_argument(
        "--traced", action="store_true", help="a compiled graph's query launch (packages before session 53)"
    )
    parser.add_argument("--pairs", action="store_true", help="the query kernel on pair-layout states")
    parser.add_argument("--package", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--triton", type=Path, default=None, help="a Triton to put first on the path")
    parser.add_argument("--keep", type=Path, default=None, help="keep the source, cubin and SASS here")
    parser.add_argument("--render", type=Path, help=argparse.SUPPRESS)  # the rendering process: write here
    args = parser.parse_args()
    if args.render:
        launch = render(
            args.kernel, args.T, args.d, args.dtype, args.gated, args.valid, args.traced, args.pairs, args.render
        )
        print(json.dumps(launch))
        return
    keep = args.keep
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        flags = "".join(f"_{name}" for name in ("gated", "valid", "traced", "pairs") if getattr(args, name))
        shape = f"_T{args.T}" + f"_d{args.d}" * (args.d != 64) + f"_{args.dtype}" * (args.dtype != "bf16")
        source = (keep or Path(tmp)) / f"{args.kernel}{shape}{flags}.py"  # variants kept side by side
        command = [sys.executable, __file__, "--render", str(source), "--kernel", args.kernel, "--T", str(args.T)]
        command += ["--d", str(args.d), "--dtype", args.dtype]
        command += [flag for flag, on in (("--gated", args.gated), ("--valid", args.valid), ("--traced", args.traced),
                                          ("--pairs", args.pairs)) if on]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.package), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"rendering failed:\n{done.stderr[-3000:]}")
        launch = json.loads(done.stdout.strip().splitlines()[-1])
        if args.triton:
            sys.path.insert(0, str(args.triton))
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9 (which warns of a change)
        result = cuda_sass(launch, keep) if "cubin" in launch else compile_sass(source, launch, keep)
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    print(json.dumps({k: v for k, v in result.items() if k != "loops"}))
    for loop in result["loops"]:
        top = ", ".join(f"{op} {n}" for op, n in list(loop["opcodes"].items())[:6])
        print(f"  loop {loop['start']}-{loop['end']}: {loop['instructions']} instructions, HGMMA "
              f"{loop['opcodes']['HGMMA']} ({top})")  # fmt: skip


if __name__ == "__main__":
    main()
