"""``benchmarks/ab_packages.py``'s comparison of two versions' outputs and the path it gives a version's process (the
timing is a benchmark, not tested here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch


@pytest.fixture
def ab_packages(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ab_packages

    return ab_packages


def test_outputs_compared_bitwise_or_by_their_largest_difference(ab_packages, tmp_path: Path) -> None:
    """Equal tensors read "bitwise"; a tensor one element off reads that element's difference; a shape change says
    so instead of comparing."""
    base, new = tmp_path / "base", tmp_path / "new"
    base.mkdir(), new.mkdir()
    y = torch.randn(2, 3, 5).to(torch.bfloat16)
    off = y.clone()
    off[1, 2, 3] += 0.5
    for name, ours, theirs in (("y_16_0", y, y.clone()), ("y_16_1", y, off), ("y_8_0", y, y[:, :2])):
        torch.save(ours, base / f"{name}.pt")
        torch.save(theirs, new / f"{name}.pt")
    verdicts = ab_packages.compare_outputs(base, new)
    assert verdicts["y_16_0"] == "bitwise"
    expected = (off[1, 2, 3].double() - y[1, 2, 3].double()).abs().item()
    assert verdicts["y_16_1"] == f"max |diff| {expected:.3g}"
    assert verdicts["y_8_0"].startswith("differ in shape or dtype")


def test_a_version_goes_first_on_the_path(ab_packages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The version's folder precedes what PYTHONPATH held, so its ``retention_compile`` is the one imported."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = ab_packages.version_environment(tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path.resolve()), "/elsewhere"]
    monkeypatch.delenv("PYTHONPATH")
    assert ab_packages.version_environment(tmp_path)["PYTHONPATH"] == str(tmp_path.resolve())


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_the_measuring_process_times_what_was_asked(
    ab_packages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backward: bool, compiled: bool
) -> None:
    """A version's process gets ``--backward`` exactly when the comparison times training steps and ``--compiled``
    when it times them compiled (then with Inductor's cache in the folder given), with the lengths and the folder for
    what it keeps; its last line of output is its result."""
    seen = {}

    def fake_run(command, env, **kwargs):
        seen.update(command=command, env=env)
        return subprocess.CompletedProcess(command, 0, stdout='warming up\n{"rows": []}\n', stderr="")

    monkeypatch.setattr(ab_packages.subprocess, "run", fake_run)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = tmp_path / "inductor" if compiled else None
    result = ab_packages.run_version(tmp_path, [4096, 1024], tmp_path / "kept", backward, compiled, cache)
    assert result == {"rows": []}
    command = seen["command"]
    assert ("--backward" in command) == backward and ("--compiled" in command) == compiled
    assert command[command.index("--lengths") + 1 :] == ["4096", "1024"]
    assert command[command.index("--keep") + 1] == str(tmp_path / "kept")
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path.resolve())
    assert seen["env"].get("TORCHINDUCTOR_CACHE_DIR") == (str(cache) if compiled else None)
    assert ab_packages.timed_name(backward, compiled).startswith("compiled_") == compiled


@pytest.mark.parametrize("backward", [False, True])
def test_accuracy_against_the_oracle_per_seed(ab_packages, backward: bool) -> None:
    """The accuracy check measures y (with ``backward``: dq, dk, dv and the gate's gradient) against the float64
    oracle once per seed, here on the CPU's path at a small shape: bf16 inputs give errors of bf16's size, never 0
    (the oracle is not compared with itself) and different inputs per seed."""
    errors = ab_packages.oracle_errors(backward, shape=(1, 2, 1, 96, 32), seeds=(1, 2), device="cpu")
    assert list(errors) == (["dq", "dk", "dv", "dg"] if backward else ["y"])
    for name, per_seed in errors.items():
        assert len(per_seed) == 2 and per_seed[0] != per_seed[1], (name, per_seed)
        assert all(0 < error < 3e-2 for error in per_seed), (name, per_seed)


def test_rounds_alternate_which_version_goes_first(ab_packages, tmp_path: Path) -> None:
    base, new = tmp_path / "base", tmp_path / "new"
    orders = [[side for side, _ in ab_packages.round_order(base, new, r)] for r in range(4)]
    assert orders == [["base", "new"], ["new", "base"]] * 2
    assert dict(ab_packages.round_order(base, new, 1)) == {"base": base, "new": new}
