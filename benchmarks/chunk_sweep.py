"""Chunk-size and tile sweep of the power-retention forward against the planner (issue 4).

For each T in {4096, 16384, 65536} and d in {64, 128} (B=1, H=8, deg 2, bf16, causal, ungated by default) it
times ``retention_compile.power_retention`` for every chunk size 64..2048 below T plus the single-chunk path,
each with the ``--tiles`` best tile configurations the cost model ranks for that chunk (the planned one always
among them), with ``triton.testing.do_bench`` (median). The regret of the plan is

    regret = measured(plan(spec, T, d, ...)) / min over measured configurations - 1      (bar: <= 10%)

Tiles reach the op only when ``power_retention`` accepts a ``plan=`` keyword; until then only the chunk size
varies (one configuration per chunk, the model's best tiles recorded beside it) and the JSON says so.

    python benchmarks/chunk_sweep.py [--T 4096 16384 65536] [--d 64 128] [--tiles 3] [--out DIR] [--commit SHA]
    python benchmarks/chunk_sweep.py --dry-run --gpu H200     # on any machine: the plans and configurations

Writes ``chunk_sweep_<gpu>_<date>.json`` and ``.png`` (measured and modelled time per chunk size) under
``--out`` (default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import retention_compile as rc
from retention_compile import hardware, planning
from retention_compile.hardware import GpuSpec
from retention_compile.planning import Plan

REGRET_BAR = 0.10
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def configurations(cands: planning.Candidates, planned: Plan, per_chunk: int, with_tiles: bool) -> list[Plan]:
    """The planned configuration, then per chunk size the ``per_chunk`` feasible tiles the model ranks best.

    Without ``with_tiles`` (the op takes only the chunk size) configurations that differ only in tiles are
    the same run, so one per chunk size is kept.
    """
    chosen = [planned]
    for chunk in np.unique(cands.chunk):
        rows = np.flatnonzero(cands.feasible & (cands.chunk == chunk))
        for i in rows[np.argsort(cands.time[rows], kind="stable")][:per_chunk]:
            candidate = cands.plan(int(i))
            if all(_key(candidate, with_tiles) != _key(p, with_tiles) for p in chosen):
                chosen.append(candidate)
    return chosen


def _key(p: Plan, with_tiles: bool) -> tuple[int, ...]:
    tiles = (p.block_t, p.block_feature, p.block_e, p.num_warps, p.num_stages) if with_tiles else ()
    return (p.chunk_size, *tiles)


def accepts_plan() -> bool:
    """Whether the eager entry takes the tiles (``plan=``) or only ``chunk_size``."""
    return "plan" in inspect.signature(rc.power_retention).parameters


def time_configuration(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, deg: int, rep: int) -> float:
    """Median milliseconds of one forward with this configuration."""
    from triton.testing import do_bench

    tiles = {"plan": p} if accepts_plan() else {}

    def forward() -> torch.Tensor:
        return rc.power_retention(q, k, v, deg=deg, chunk_size=p.chunk_size, **tiles)

    forward()
    torch.cuda.synchronize()
    return float(do_bench(forward, warmup=25, rep=rep, return_mode="median"))


def sweep_problem(spec: GpuSpec, T: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    """Plan, rank and (unless ``--dry-run``) time every configuration of one (T, d)."""
    dtype, bh = DTYPES[args.dtype], args.batch * args.heads
    planned = planning.plan(spec, T, d, d, args.deg, dtype, False, bh)
    cands = planning.gpu_candidates(spec, T, d, d, args.deg, dtype, False, bh)
    configs = configurations(cands, planned, args.tiles, accepts_plan())
    if args.dry_run:
        rows = [{**_describe(p), "modelled_ms": p.modelled_s * 1e3} for p in configs]
        return {"T": T, "d": d, "planned": _describe(planned), "reason": planned.reason, "configs": rows}
    from triton.runtime.errors import OutOfResources

    q, k, v = (torch.randn(args.batch, args.heads, T, d, device="cuda", dtype=dtype) for _ in range(3))
    rows = []
    for p in configs:
        row = {**_describe(p), "modelled_ms": p.modelled_s * 1e3}
        try:
            row["measured_ms"] = time_configuration(q, k, v, p, args.deg, args.rep)
        except (RuntimeError, ValueError, OutOfResources) as err:  # rejected, or out of memory / shared memory
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        print(f"  T={T} d={d} {_label(p)}: {row.get('measured_ms', float('nan')):.3f} ms", flush=True)
    best = min(rows, key=lambda r: r.get("measured_ms", float("inf")))
    planned_ms = rows[0].get("measured_ms", float("inf"))
    return {
        "T": T,
        "d": d,
        "planned": _describe(planned),
        "reason": planned.reason,
        "planned_ms": planned_ms,
        "best": best,
        "regret": planned_ms / best.get("measured_ms", float("nan")) - 1,
        "configs": rows,
    }


def _describe(p: Plan) -> dict[str, int]:
    return {k: v for k, v in asdict(p).items() if k not in ("reason", "modelled_s")}


def _label(p: Plan | dict[str, int]) -> str:
    t = p if isinstance(p, dict) else _describe(p)
    tiles = f"bt={t['block_t']} b={t['block_feature']} be={t['block_e']} w={t['num_warps']} s={t['num_stages']}"
    return f"C={t['chunk_size']} {tiles}"


def plot(problems: list[dict[str, Any]], title: str, path: Path) -> None:
    """Per (T, d): best measured time per chunk size (solid), modelled (dashed), the plan (star), the best (ring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts, ds = sorted({p["T"] for p in problems}), sorted({p["d"] for p in problems})
    fig, axes = plt.subplots(len(ds), len(Ts), figsize=(4.2 * len(Ts), 3.4 * len(ds)), squeeze=False)
    for prob in problems:
        ax = axes[ds.index(prob["d"])][Ts.index(prob["T"])]
        for key, style in (("measured_ms", "o-"), ("modelled_ms", "x--")):
            per_chunk: dict[int, float] = {}
            for row in prob["configs"]:
                if key in row:
                    per_chunk[row["chunk_size"]] = min(row[key], per_chunk.get(row["chunk_size"], float("inf")))
            chunks = sorted(per_chunk)
            ax.plot(chunks, [per_chunk[c] for c in chunks], style, label=key.removesuffix("_ms"))
        ax.plot(prob["planned"]["chunk_size"], prob["planned_ms"], "*", ms=14, color="C3", label="plan")
        ax.plot(
            prob["best"]["chunk_size"], prob["best"]["measured_ms"], "o", ms=14, mfc="none", color="k", label="best"
        )
        ax.set(xscale="log", yscale="log", xlabel="chunk size (>= T: single chunk)", ylabel="ms")
        ax.set_title(f"T={prob['T']} d={prob['d']}: regret {prob['regret'] * 100:.1f}%", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "missing"
    return versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--deg", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tiles", type=int, default=3, help="tile configurations per chunk size (model's best)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measurement window, ms")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default=None, help="commit of the code (where the tree has no .git)")
    parser.add_argument("--dry-run", action="store_true", help="print plans and configurations, time nothing")
    parser.add_argument("--gpu", choices=sorted(hardware.KNOWN), help="plan for this KNOWN GPU instead of detecting")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    spec = hardware.KNOWN[args.gpu] if args.gpu else hardware.detect()
    if spec is None:
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run --gpu NAME to see the plans")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA device (use --dry-run)")
    problems = []
    for T in args.T:
        for d in args.d:
            problems.append(sweep_problem(spec, T, d, args))
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": _commit(args.commit),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(),
        "gpu": asdict(spec),
        "setup": {"batch": args.batch, "heads": args.heads, "deg": args.deg, "dtype": args.dtype, "causal": True},
        "tiles_passed_to_op": accepts_plan(),
        "regret_bar": REGRET_BAR,
        "problems": problems,
    }
    if args.dry_run:
        for prob in problems:
            print(f"T={prob['T']} d={prob['d']}: plan {_label(prob['planned'])}; {len(prob['configs'])} configurations")
            print(f"  {prob['reason']}")
        return record
    record["passed"] = all(p["regret"] <= REGRET_BAR for p in problems)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"chunk_sweep_{spec.name.replace(' ', '-')}_{datetime.date.today().isoformat()}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(
        problems,
        f"{spec.name}: power retention forward, B={args.batch} H={args.heads} {args.dtype}",
        args.out / f"{stem}.png",
    )
    print(f"\n{'T':>6} {'d':>4}  {'plan':<44} {'ms':>8}  {'best':<44} {'ms':>8}  regret")
    for p in problems:
        print(
            f"{p['T']:>6} {p['d']:>4}  {_label(p['planned']):<44} {p['planned_ms']:>8.3f}  "
            f"{_label(p['best']):<44} {p['best']['measured_ms']:>8.3f}  {p['regret'] * 100:5.1f}%"
        )
    verdict = "met" if record["passed"] else "MISSED"
    print(f"\nwrote {args.out / stem}.json/.png; bar regret <= {REGRET_BAR:.0%}: {verdict}")
    return record


if __name__ == "__main__":
    main()
