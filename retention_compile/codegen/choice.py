"""Measured choice between implementations of one kernel (``RetentionConfig(codegen="auto")``).

    choose(kernel, key, candidates, device) -> name

The first call for a (GPU, kernel, key) times every candidate on the device (a warm-up call, which also compiles,
then the median of ``REPS`` CUDA-event timings of the device's work alone, ``device_times_ms``) and stores the
winner with the times in ``cache.cache_dir("choices")/<kernel>_<hash>.json``; later calls, in this process or
another, reuse it. The hash covers the GPU name, the kernel, the key, the package's code fingerprint and the torch,
triton and driver versions (``cache.code_keyed_entry``), so an upgrade, this package's included, measures again: a
choice made between other kernels says nothing about these. Measuring is skipped while a CUDA graph is being
captured (the first candidate is used, nothing is stored); a candidate that fails is reported once and never chosen.

Candidates run real work: they build their own inputs. ``choose`` may be called while ``torch.compile`` traces
(fake tensors, proxy modes): every active dispatch mode is suspended while measuring.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import cache

REPS = 10
HOST_MARGIN = 2  # the GPU spins this many times the host time of one call (per call timed) ...
SPIN_MIN_MS = 0.2  # ... plus this
_CHOSEN: dict[tuple[str, str, tuple], str] = {}  # (GPU, kernel, the key's items) -> winner


def _gpu_name(device: torch.device) -> str:
    return _gpu_name_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _gpu_name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _entry(kernel: str, key_text: str, gpu: str) -> Path:
    return cache.code_keyed_entry("choices", f"{kernel}_", gpu, kernel, key_text)


def event_times_ms(fn: Callable[[], object], rounds: int, launches: int = 1, spin: int = 0) -> list[float]:
    """Device time per call of ``fn`` in ms, sorted: ``rounds`` rounds of ``launches`` calls between two CUDA
    events each (no warm-up), the GPU spinning ``spin`` clock cycles before each round's first event."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin:
            torch.cuda._sleep(spin)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return sorted(times)


def device_times_ms(fn: Callable[[], object], rounds: int, launches: int = 1) -> list[float]:
    """Device time per call of ``fn`` in ms, sorted, without the host's share: each round the GPU first spins
    (``torch.cuda._sleep``) for longer than the host takes to enqueue the round's ``launches`` calls, so that their
    kernels then run back to back between the two CUDA events. Timed as ``event_times_ms`` times, a call bound by its
    host (a short eager call, whose launches reach the GPU slower than they run) measures its host, and the order of
    two such candidates is chance (2026-12-01, H200: ``codegen="auto"`` took the Triton state kernel at T=8192, gated,
    whose forward runs 0.47 ms against 0.27 with the CUDA one). A ``fn`` that waits for the GPU itself is timed with
    its waits."""
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    host_ms = (time.perf_counter() - begin) * 1e3
    torch.cuda.synchronize()
    spin = math.ceil(_cycles_per_ms(torch.cuda.current_device()) * (HOST_MARGIN * host_ms * launches + SPIN_MIN_MS))
    return event_times_ms(fn, rounds, launches, spin)


@functools.cache
def _cycles_per_ms(device_index: int) -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per ms on this device (measured once)."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # the first launch loads the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def median_ms(fn: Callable[[], object], reps: int = REPS, launches: int = 1) -> float:
    """Median device time of ``fn`` (``device_times_ms``, which leaves out the host's share) after one warm-up
    call."""
    fn()
    torch.cuda.synchronize()
    times = device_times_ms(fn, reps, launches)
    return times[len(times) // 2]


def _measure(candidates: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    from torch.utils._python_dispatch import _disable_current_modes

    times: dict[str, float] = {}
    with _disable_current_modes():
        for name, fn in candidates.items():
            try:
                times[name] = median_ms(fn)
            except Exception as error:  # a candidate that cannot run is not chosen
                warnings.warn(f"retention_compile: candidate {name!r} failed ({error}); not chosen", stacklevel=3)
    return times


def choose(
    kernel: str, key: Mapping[str, object], candidates: Mapping[str, Callable[[], object]], device: torch.device
) -> str:
    """The fastest of ``candidates`` (name -> zero-argument callable running that implementation once) for
    ``kernel`` at ``key`` on ``device``: measured on first use, then read from memory or the cache file."""
    gpu = _gpu_name(device)
    memo = (gpu, kernel, tuple(sorted(key.items())))  # per call: no JSON until a choice is read or stored
    if memo in _CHOSEN:
        return _CHOSEN[memo]
    key_text = json.dumps(dict(key), sort_keys=True, default=str)
    entry = _entry(kernel, key_text, gpu)
    try:
        stored = json.loads(entry.read_text())
        if stored.get("winner") in candidates:
            _CHOSEN[memo] = stored["winner"]
            return stored["winner"]
    except (OSError, ValueError):
        pass  # missing or unreadable: measure
    if torch.cuda.is_current_stream_capturing():
        return next(iter(candidates))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # the events', the spin's
        times = _measure(candidates)
    if not times:
        return next(iter(candidates))
    winner = min(times, key=times.__getitem__)
    record = {"kernel": kernel, "gpu": gpu, "key": dict(key), "times_ms": times, "winner": winner}
    cache.store(entry, json.dumps(record, indent=1, sort_keys=True, default=str).encode())
    _CHOSEN[memo] = winner
    return winner
