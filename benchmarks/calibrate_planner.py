"""Compare the planner's cost model with a chunk sweep's measurements (``chunk_sweep.py`` JSON), on any machine.

For every measured configuration: the modelled time of each kernel (``planning.gpu_candidates`` for the sweep's
GPU, T and d) against the profiler's time of that kernel. Prints, per model kernel, the geometric mean of
measured / modelled (what ``planning.KERNEL_SCALE`` holds) and its spread, then for every problem the plan the
current model makes and its regret against the sweep's measurements (the plan's configuration must be one of
those measured).

    python benchmarks/calibrate_planner.py benchmarks/results/chunk_sweep_NVIDIA-H200_<date>.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from retention_compile import planning
from retention_compile.hardware import GpuSpec

# profiler kernel names -> model kernels, per path
CHUNKED = {"state_kernel": "update", "scan_kernel": "scan", "attention_kernel": "query"}
SINGLE = {"attention_kernel": "attention"}
TILES = ("chunk_size", "block_t", "block_feature", "block_e", "num_warps", "num_stages")


def _index(cands: planning.Candidates, row: dict) -> int | None:
    match = np.ones_like(cands.chunk, dtype=bool)
    for field, column in zip(TILES, ("chunk", "block_t", "block_feature", "block_e", "num_warps", "num_stages")):
        match &= getattr(cands, column) == row[field]
    found = np.flatnonzero(match)
    return int(found[0]) if found.size else None


def main(path: str) -> None:
    record = json.loads(Path(path).read_text())
    spec = GpuSpec(**{**record["gpu"], "compute_capability": tuple(record["gpu"]["compute_capability"])})
    setup = record["setup"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setup["dtype"]]
    bh = setup["batch"] * setup["heads"]
    ratios: dict[str, list[float]] = defaultdict(list)
    for prob in record["problems"]:
        T, d = prob["T"], prob["d"]
        cands = planning.gpu_candidates(spec, T, d, d, setup["deg"], dtype, False, bh)
        for row in prob["configs"]:
            i = _index(cands, row)
            if i is None or "kernels_ms" not in row:
                continue
            names = SINGLE if cands.single[i] else CHUNKED
            for kernel, model in names.items():
                measured = sum(v for k, v in row["kernels_ms"].items() if k == kernel)
                modelled = cands.values[f"{model}.time"][i] * 1e3
                if measured > 0 and modelled > 0:
                    ratios[model].append(measured / modelled)
    print("measured / modelled per kernel (geometric mean, min, max, n):")
    for model, values in sorted(ratios.items()):
        logs = np.log(values)
        print(f"  {model:>9}: {np.exp(logs.mean()):7.3f}  {min(values):7.3f}  {max(values):7.3f}  {len(values)}")
    print("\nplans of the current model against the measurements:")
    for prob in record["problems"]:
        T, d = prob["T"], prob["d"]
        p = planning.plan(spec, T, d, d, setup["deg"], dtype, False, bh)
        timed = [r for r in prob["configs"] if "measured_ms" in r]
        best = min(r["measured_ms"] for r in timed)
        same = [r for r in timed if all(r[f] == getattr(p, f) for f in TILES)]
        chunk = [r["measured_ms"] for r in timed if r["chunk_size"] == p.chunk_size]
        if same:
            got = f"{same[0]['measured_ms']:.3f} ms, regret {(same[0]['measured_ms'] / best - 1) * 100:5.1f}%"
        elif chunk:
            got = f"not measured (best of its chunk {min(chunk):.3f} ms, {(min(chunk) / best - 1) * 100:5.1f}%)"
        else:
            got = "not measured"
        print(f"  T={T:>6} d={d:>4}: C={p.chunk_size} bt={p.block_t} be={p.block_e} w={p.num_warps} "
              f"s={p.num_stages}: {got}; best {best:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
