"""Host time of one CUDA C++ kernel launch through each of the package's launch paths, on an empty kernel.

A kept launch (``eager_launch.CudaLaunch``, the decode step's two launches) is host-bound at batch 1, so the cost
of one ``cuLaunchKernel`` call through cuda-python is what its step costs. Timed, per launch, for an empty kernel
of 10 arguments (8 pointers, a float, an int) and of 20 (12 pointers, 6 ints, 2 floats):

    packed per launch   ``CudaKernel.launch``: ``packed_arguments`` and cuda-python's packing at every launch
    tuple packed once   ``CudaKernel.launch_params`` with ``(values, types)`` kept: cuda-python still packs them
    address             ``launch_params`` with a ``KernelParams.address``: nothing packed
    kept launch         ``CudaLaunch.__call__``: the address, its pointers rewritten under the lock, the raw stream

and the two ways to ask for the current stream's handle (``torch.cuda.current_stream().cuda_stream`` against
``nvrtc.current_stream``). Medians of ``--repeats`` interleaved batches of ``--calls`` calls
(``bench_host.interleaved``), host microseconds per call.

    python benchmarks/bench_launch.py [--out DIR] [--commit SHA] [--calls 20000] [--repeats 5]

Writes ``launch_<gpu>_<date>_<commit>.json`` under ``--out`` (default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse

import torch
from bench_host import interleaved
from provenance import git_commit, origin, write_record

from retention_compile.codegen import nvrtc
from retention_compile.codegen.eager_launch import CudaLaunch

SOURCE = r"""
extern "C" __global__ void ten(float* a, float* b, float* c, float* d, float* e, float* f, float* g, float* h,
                               float s, int n) {}
extern "C" __global__ void twenty(float* a, float* b, float* c, float* d, float* e, float* f, float* g, float* h,
                                  float* i, float* j, float* k, float* l, int m1, int m2, int m3, int m4, int m5,
                                  int m6, float s, float t) {}
"""
GRID, BLOCK = (1, 1, 1), (32, 1, 1)


def _arguments(name: str, pointer: torch.Tensor) -> tuple:
    """The kernel's arguments: ``pointer`` at each pointer parameter."""
    if name == "ten":
        return (pointer,) * 8 + (0.5, 7)
    return (pointer,) * 12 + (1, 2, 3, 4, 5, 6) + (0.5, 0.25)


def _no_setup() -> None:
    """``interleaved``'s setup of a variant that needs none."""


def _launch_variants(kernel: nvrtc.CudaKernel, pointer: torch.Tensor) -> dict:
    """``interleaved``'s variants for one kernel: the four launch paths, each launching it with ``arguments``."""
    arguments = _arguments(kernel.name, pointer)
    values, types = nvrtc.packed_arguments(kernel.name, arguments)
    packed = (tuple(values), tuple(types))
    params = nvrtc.KernelParams(values, types)
    pointer_positions = tuple(i for i, argument in enumerate(arguments) if isinstance(argument, torch.Tensor))
    kept = CudaLaunch.of(
        kernel, GRID, BLOCK, 0, pointer.device.index or 0,
        tuple(None if i in pointer_positions else a for i, a in enumerate(arguments)),
        tuple((i, "pointer") for i in pointer_positions),
    )  # fmt: skip
    tensors = {"pointer": pointer}
    stream = nvrtc.current_stream()
    return {
        "packed per launch": (_no_setup, lambda: kernel.launch(GRID, BLOCK, arguments, stream=stream)),
        "tuple packed once": (_no_setup, lambda: kernel.launch_params(GRID, BLOCK, packed, stream=stream)),
        "address": (_no_setup, lambda: kernel.launch_params(GRID, BLOCK, params.address, stream=stream)),
        "kept launch": (_no_setup, lambda: kept(tensors)),
    }


def rows(calls: int, repeats: int) -> list[dict]:
    """One row per (kernel, launch path) and per stream query: host microseconds per call."""
    pointer = torch.zeros(16, device="cuda")
    result = []
    for kernel in nvrtc.load_kernels(SOURCE, ("ten", "twenty"), pointer.device):
        arguments = len(_arguments(kernel.name, pointer))
        for path, times in interleaved(_launch_variants(kernel, pointer), calls, repeats).items():
            result.append({"what": path, "arguments": arguments, **times})
            print(f"{arguments:2d} arguments, {path:18}: {times['host_us_per_call']:6.2f} us per launch")
    queries = {
        "torch.cuda.current_stream().cuda_stream": (_no_setup, lambda: torch.cuda.current_stream().cuda_stream),
        "nvrtc.current_stream()": (_no_setup, nvrtc.current_stream),
    }
    for query, times in interleaved(queries, calls, repeats).items():
        result.append({"what": query, **times})
        print(f"{query:40}: {times['host_us_per_call']:6.2f} us per query")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_launch.py times CUDA launches: it needs a CUDA GPU")
    commit = git_commit(args.commit)
    record = {**origin(commit), "gpu": torch.cuda.get_device_name(), "rows": rows(args.calls, args.repeats)}
    print(f"wrote {write_record(record, args.out, f'launch_{{gpu}}_{{date}}_{commit}.json')}")


if __name__ == "__main__":
    main()
