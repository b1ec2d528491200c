"""Two versions of the package timed in turns, one fresh process per version and round: what a kernel edit changed,
where the two versions cannot share a process (``alternate.py`` alternates settings of one version).

    git archive BASE retention_compile | tar -x -C /tmp/base      (a version: a folder holding retention_compile/)
    python benchmarks/ab_packages.py /tmp/base . [--rounds 2] [--lengths 65536 16384] [--backward] [--compiled]
                                                 [--out DIR] [--commit SHA]

Per round and version, a process with that version first on its path times, ungated and gated at each length (b1 h8
d64 bf16 causal), three ``do_bench`` medians and the profiler's mean device time per kernel (20 calls) of:

- the eager forward (``bench_forward.ours`` with the op's plan and the CUDA state kernel, on ``bench_forward.inputs``'
  seeded inputs); its y is kept;
- with ``--backward``, a training step instead: ``rc.power_retention(..., impl="cuda")`` and its backward
  (``bench_backward.ours`` on ``bench_backward.inputs``); the gradients dq, dk, dv (and the gate's) are kept;
- with ``--compiled``, either one under ``torch.compile`` instead (``bench_forward.compiled``,
  ``bench_backward.ours_compiled``: the kernels launched from Inductor's code, with the op's plan). Every process
  compiles into an empty cache of its own (``TORCHINDUCTOR_CACHE_DIR``): no version runs code the other compiled, and
  a base from before 88b5284, whose cached backward failed in a fresh process (forward_notes, session 68), still runs.

The rounds alternate which version goes first (base first in even rounds, new first in odd ones), so that a drift
within a round does not favour one version. Under the H200's power cap whole runs move by a few percent, so the
rounds' spread is the noise: an A/A run (one package against its copy, session 56) read the same gated query kernel
at 0.526-0.538 ms and the ungated one at 0.471-0.495. What each version's
first round keeps is compared per tensor: "bitwise", or the largest absolute difference. Where they differ, the
accuracy decides: each version's first round also measures the relative errors against the float64 oracle of y (with
``--backward``: of dq, dk, dv and the gate's gradient) on three seeds of a small gated call (``oracle_errors``), printed
side by side. Writes
``ab_packages_<gpu>_<date>_<commit>.json`` (``ab_packages_backward_...`` with ``--backward``) under ``--out``
(``--commit``: the new version's commit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
MEASURE_CALLS = 3  # do_bench medians per case
PROFILED_CALLS = 20
TIMED = {False: "forward_ms", True: "training_step_ms"}  # a row's medians, by ``--backward`` (prefixed ``compiled_``)
# (B, Hq, Hk, T, d = e) of the accuracy check: three chunks of 1024 keys, GQA, as tests/gpu/test_triton_backward.py's
# kept-states case. Session 53 (forward_notes.md): a forward whose gated diagonal weights rounded otherwise than the
# backward's recomputed ones left y's error as it was (2.2e-3) but took the gate's gradient from 8.5e-3 to 2.4e-2.
ACCURACY_SHAPE = (1, 4, 2, 3000, 64)
ACCURACY_SEEDS = (1, 2, 3)


def timed_name(backward: bool, compiled: bool) -> str:
    """The name of a row's medians: what was timed."""
    return ("compiled_" if compiled else "") + TIMED[backward]


def forward_case(
    T: int, gated: bool, compiled: bool = False
) -> tuple[Callable[[], object], Callable[[], dict[str, torch.Tensor]]]:
    """The eager (``compiled``: compiled) forward of one case, and what it keeps: {"y": y}."""
    from bench_forward import compiled as compiled_forward
    from bench_forward import inputs, ours

    from retention_compile.ops import resolve_plan

    x = inputs(T, gated)
    if compiled:
        run = compiled_forward(x)
        return run, lambda: {"y": run()}
    run = ours(x, resolve_plan(x["q"], x["k"], x["v"], 2, gated, 0), codegen="cuda")
    return run, lambda: {"y": run()[0]}


def training_case(
    T: int, gated: bool, compiled: bool = False
) -> tuple[Callable[[], object], Callable[[], dict[str, torch.Tensor]]]:
    """A forward and backward of one case on the CUDA kernels (``compiled``: under ``torch.compile``, the op's own
    choice of kernels), and what it keeps: the inputs' gradients after a step."""
    from bench_backward import inputs, ours, ours_compiled

    x = inputs(T, gated)
    run = ours_compiled(x) if compiled else ours(x, impl="cuda")

    def gradients() -> dict[str, torch.Tensor]:
        run()
        names = ("q", "k", "v", "gate") if gated else ("q", "k", "v")
        return {f"d{name}": x[name].grad for name in names}

    return run, gradients


def accuracy_inputs(shape: tuple[int, int, int, int, int], seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """q, k, v (bf16), log-gates -0.1 U(0, 1) per key head, key validity (the last key valid) and dy (bf16) of the
    accuracy check, drawn from ``seed``."""
    B, Hq, Hk, T, d = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, device=device, generator=gen).to(torch.bfloat16) for h in (Hq, Hk, Hk))
    gate = -0.1 * torch.rand(B, Hk, T, device=device, generator=gen)
    valid = torch.rand(B, T, device=device, generator=gen) > 0.2
    valid[:, -1] = True  # the last rows' denominators away from eps
    dy = torch.randn(B, Hq, T, d, device=device, generator=gen).to(torch.bfloat16)
    return q, k, v, gate, valid, dy


def oracle_errors(
    backward: bool,
    shape: tuple[int, int, int, int, int] = ACCURACY_SHAPE,
    seeds: tuple[int, ...] = ACCURACY_SEEDS,
    device: str = "cuda",
) -> dict[str, list[float]]:
    """Per seed, the relative errors ``|got - want| / |want|`` against the float64 oracle
    (``reference.power_retention_reference`` and its autograd) of ``rc.power_retention`` on bf16 inputs of ``shape``
    with log-gates -0.1 U(0, 1) and key validity (chunks of 1024 keys): of y, or with ``backward`` of dq, dk, dv and
    dg (the gate's gradient, the most sensitive to how the forward's and the backward's weights round)."""
    import retention_compile as rc
    from retention_compile.reference import power_retention_reference

    errors: dict[str, list[float]] = {}
    for seed in seeds:
        q, k, v, gate, valid, dy = accuracy_inputs(shape, seed, device)
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v, gate)]
        wants = [t.detach().double().requires_grad_(backward) for t in (q, k, v, gate)]
        options = {"deg": 2, "causal": True, "valid": valid}
        y = rc.power_retention(*leaves[:3], log_gate=leaves[3], chunk_size=1024, **options)
        want = power_retention_reference(*wants[:3], log_gate=wants[3], **options)
        pairs = [("y", y, want)]
        if backward:
            y.backward(dy)
            want.backward(dy.double())
            pairs = [(f"d{name}", got.grad, ref.grad) for name, got, ref in zip("qkvg", leaves, wants)]
        for name, got, ref in pairs:
            error = (got.detach().double() - ref.detach()).norm() / ref.detach().norm()
            errors.setdefault(name, []).append(float(error))
    return errors


def measure(lengths: list[int], keep: Path | None, backward: bool, compiled: bool = False) -> list[dict]:
    """In a version's process: per length, ungated then gated, the medians and kernel times of the forward (of a
    training step with ``backward``; compiled with ``compiled``); what the case keeps saved under ``keep``
    (``<name>_<T>_<gated>.pt``) where given."""
    from bench_forward import bench_ms, kernel_times

    rows = []
    for T in lengths:
        for gated in (False, True):
            run, kept = (training_case if backward else forward_case)(T, gated, compiled)
            if keep is not None:
                for name, tensor in kept().items():
                    torch.save(tensor.cpu(), keep / f"{name}_{T}_{int(gated)}.pt")
            medians = [bench_ms(run) for _ in range(MEASURE_CALLS)]
            rows.append(
                {
                    "T": T,
                    "gated": gated,
                    timed_name(backward, compiled): medians,
                    "kernel_ms": kernel_times(run, PROFILED_CALLS),
                }
            )
    return rows


def version_environment(version: Path, inductor_cache: Path | None = None) -> dict[str, str]:
    """This process's environment with ``version`` (a folder holding ``retention_compile``) first on PYTHONPATH, and
    Inductor's cache in ``inductor_cache`` where given."""
    path = [str(version.resolve()), os.environ.get("PYTHONPATH", "")]
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)} if inductor_cache is not None else {}
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **cache}


def run_version(
    version: Path,
    lengths: list[int],
    keep: Path | None,
    backward: bool,
    compiled: bool = False,
    inductor_cache: Path | None = None,
) -> dict:
    """One round of ``version`` in a fresh process: its rows and the package file it imported (what it keeps saved
    under ``keep`` where given)."""
    keeping = ["--keep", str(keep)] if keep is not None else []
    timing = (["--backward"] if backward else []) + (["--compiled"] if compiled else [])
    command = [sys.executable, __file__, "--measure", *keeping, *timing, "--lengths", *map(str, lengths)]
    environment = version_environment(version, inductor_cache)
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{version}: the measuring process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def round_order(base: Path, new: Path, round_index: int) -> list[tuple[str, Path]]:
    """The versions of round ``round_index`` in the order they run: base first in even rounds, new first in odd ones,
    so that what favours a round's second process cancels over two rounds."""
    order = [("base", base), ("new", new)]
    return order if round_index % 2 == 0 else order[::-1]


def compare_outputs(base: Path, new: Path) -> dict[str, str]:
    """Per tensor ``base`` saved (file stem), "bitwise" where ``new``'s is the same tensor, else the largest absolute
    difference (or why the two cannot be compared)."""
    verdicts = {}
    for path in sorted(base.glob("*.pt")):
        ours, theirs = torch.load(path), torch.load(new / path.name)
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            verdicts[path.stem] = (
                f"differ in shape or dtype: {tuple(ours.shape)} {ours.dtype} / {tuple(theirs.shape)} {theirs.dtype}"
            )
        elif torch.equal(ours, theirs):
            verdicts[path.stem] = "bitwise"
        else:
            verdicts[path.stem] = f"max |diff| {(ours.double() - theirs.double()).abs().max().item():.3g}"
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, nargs="?", help="a folder holding the base version's retention_compile")
    parser.add_argument("new", type=Path, nargs="?", help="a folder holding the new version's retention_compile")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 16384])
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    parser.add_argument("--backward", action="store_true", help="time a training step (forward and backward)")
    parser.add_argument("--compiled", action="store_true", help="time it under torch.compile")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # a version's process
    parser.add_argument("--keep", type=Path, default=None, help=argparse.SUPPRESS)  # where it saves its outputs
    args = parser.parse_args()
    if args.measure:
        import retention_compile

        rows = measure(args.lengths, args.keep, args.backward, args.compiled)
        result = {"package": retention_compile.__file__, "rows": rows}
        if args.keep is not None:  # the first round
            result["accuracy"] = oracle_errors(args.backward)
        print(json.dumps(result))
        return
    if args.base is None or args.new is None:
        parser.error("give the base and the new version's folders")
    from bench_forward import result_header

    timed = timed_name(args.backward, args.compiled)
    name = "ab_packages" + ("_compiled" if args.compiled else "") + ("_backward" if args.backward else "")
    stem, record = result_header(name, args.out, args.commit)
    stem = stem.with_name(f"{stem.name}_{record['commit']}")
    record.update(base=str(args.base.resolve()), new=str(args.new.resolve()), timed=timed, rounds=[])
    with tempfile.TemporaryDirectory() as scratch:
        kept = {side: Path(scratch, side) for side in ("base", "new")}
        for round_index in range(args.rounds):
            entry = {}
            for side, version in round_order(args.base, args.new, round_index):
                keep = kept[side] if round_index == 0 else None  # the outputs of the first round only
                if keep is not None:
                    keep.mkdir()
                inductor_cache = Path(scratch, f"inductor-{side}-{round_index}") if args.compiled else None
                entry[side] = run_version(version, args.lengths, keep, args.backward, args.compiled, inductor_cache)
                for row in entry[side]["rows"]:
                    medians = [round(ms, 4) for ms in row[timed]]
                    print(side, round_index, row["T"], row["gated"], medians, flush=True)
            record["rounds"].append(entry)
        record["outputs"] = compare_outputs(kept["base"], kept["new"])
    print(json.dumps(record["outputs"], indent=1))
    first = record["rounds"][0]
    record["accuracy"] = {side: first[side]["accuracy"] for side in ("base", "new")}
    print(f"relative error against the float64 oracle, B Hq Hk T d = {ACCURACY_SHAPE}, gated, seeds {ACCURACY_SEEDS}:")
    for name in record["accuracy"]["base"]:
        print(f"  {name}: " + "   ".join(
            f"{side} " + " ".join(f"{e:.2e}" for e in record["accuracy"][side][name]) for side in ("base", "new")
        ))  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
