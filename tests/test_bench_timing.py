"""``benchmarks/bench_forward.py``'s timing of a row's columns in turns (``timed_in_turns``), with ``bench_ms``
replaced by a stand-in: the order of the rounds, the medians' inputs and failures (the GPU part is a benchmark, not
tested here)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def bench_forward(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_forward

    return bench_forward


def _column(name: str, calls: list[str]):
    """A maker of a run that logs ``name`` when called (the call made with the run)."""

    def run() -> None:
        calls.append(name)

    run.column = name
    return lambda: run


def test_each_round_starts_one_column_later(bench_forward, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run is called once as it is made, then timed once per round, round r starting at column r: no column is
    always timed first or last; each column keeps its rounds' times in the order of the rounds."""
    made: list[str] = []
    timed: list[str] = []
    times = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])

    def bench_ms(run) -> float:
        timed.append(run.column)
        return next(times)

    monkeypatch.setattr(bench_forward, "bench_ms", bench_ms)
    makers = {name: _column(name, made) for name in ("a", "b", "c")}
    samples, errors, seconds = bench_forward.timed_in_turns(makers, rounds=3)
    assert made == ["a", "b", "c"]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    assert errors == {}
    assert set(seconds) == {"a", "b", "c"} and all(t >= 0 for t in seconds.values())


def test_a_failed_column_is_recorded_and_the_others_still_timed(bench_forward, monkeypatch: pytest.MonkeyPatch) -> None:
    """A column whose making fails and one whose timing fails in a later round keep no times and their errors; the
    other columns are timed in every round, the failed ones no more after they failed."""
    timed: list[str] = []

    def bench_ms(run) -> float:
        timed.append(run.column)
        if run.column == "flaky" and timed.count("flaky") == 2:
            raise RuntimeError("out of memory\nsecond line")
        return 1.0

    def broken():
        raise ImportError("no module named retention")

    monkeypatch.setattr(bench_forward, "bench_ms", bench_ms)
    makers = {"ours": _column("ours", []), "manifest": broken, "flaky": _column("flaky", [])}
    samples, errors, _ = bench_forward.timed_in_turns(makers, rounds=3)
    assert samples == {"ours": [1.0, 1.0, 1.0], "manifest": [], "flaky": []}
    assert errors == {"manifest": "ImportError: no module named retention", "flaky": "RuntimeError: out of memory"}
    assert timed == ["ours", "flaky", "flaky", "ours", "ours"]
    assert "manifest" not in timed


def test_no_column_made(bench_forward) -> None:
    """Every making failed: no rounds, every column's failure kept."""

    def broken():
        raise ValueError("bad shape")

    samples, errors, _ = bench_forward.timed_in_turns({"x": broken}, rounds=3)
    assert samples == {"x": []} and errors == {"x": "ValueError: bad shape"}


def test_the_odd_length_pair_timed_in_turns(bench_forward, monkeypatch: pytest.MonkeyPatch) -> None:
    """The odd-length check times the eager forward at both lengths of the pair, alternating (5 rounds), each with
    its own plan, and reports each length's median and the odd length's ratio to the even one."""
    timed: list[int] = []
    planned: list[int] = []
    times = {65536: iter([1.00, 0.98, 1.02, 0.99, 1.01]), 65529: iter([1.03, 1.01, 1.05, 1.02, 1.04])}

    def plan(spec, T, **_):
        planned.append(T)
        return f"plan {T}"

    def ours(x, plan):
        def run() -> None:
            pass

        run.T = x["T"]
        assert plan == f"plan {x['T']}"
        return run

    def bench_ms(run) -> float:
        timed.append(run.T)
        return next(times[run.T])

    monkeypatch.setattr(bench_forward.planning, "plan", plan)
    monkeypatch.setattr(bench_forward, "inputs", lambda T, gated: {"T": T})
    monkeypatch.setattr(bench_forward, "ours", ours)
    monkeypatch.setattr(bench_forward, "bench_ms", bench_ms)
    check = bench_forward.odd_length_check(None, gated=True)
    assert planned == [65536, 65529]
    assert timed == [65536, 65529, 65529, 65536, 65536, 65529, 65529, 65536, 65536, 65529]
    assert check["ms"] == {65536: 1.00, 65529: 1.03}
    assert check["ratio"] == pytest.approx(1.03)
    assert check["gated"] and check["rounds_ms"][65529] == [1.03, 1.01, 1.05, 1.02, 1.04]


def test_a_rows_columns_take_their_medians(bench_forward, monkeypatch: pytest.MonkeyPatch) -> None:
    """``timed_columns`` writes each column's median of its rounds under its name (None for a failed one), its rounds,
    its seconds, and adds the failures to the row's errors."""
    times = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(bench_forward, "bench_ms", lambda run: next(times))

    def broken():
        raise RuntimeError("no fla")

    row = {"errors": {"earlier": "kept"}}
    bench_forward.timed_columns(row, {"ours": _column("ours", []), "fla": broken}, "T=1 ")
    assert row["ours"] == 2.0 and row["fla"] is None
    assert row["rounds_ms"] == {"ours": [3.0, 1.0, 2.0], "fla": []}
    assert row["errors"] == {"earlier": "kept", "fla": "RuntimeError: no fla"}
    assert set(row["seconds"]) == {"ours", "fla"}


def test_importable_competitors_timed_at_no_length_are_named(bench_forward) -> None:
    """``--competitors`` given bare is an empty list: with a competitor importable the run says that it times none."""
    found = {"retention": "1.0.7", "fla": "unavailable (ModuleNotFoundError)"}
    note = bench_forward.untimed_competitors(found, [], [65536, 2048])
    assert note is not None and note.startswith("retention importable") and "fla" not in note
    assert bench_forward.untimed_competitors(found, [2048], [65536, 2048]) is None
    assert bench_forward.untimed_competitors(found, [8192], [65536, 2048]) is not None
    gone = {"retention": "unavailable (ImportError)", "fla": "unavailable (ImportError)"}
    assert bench_forward.untimed_competitors(gone, [], [65536]) is None
