"""How long a grid of chunk-walking programs keeps the GPU, as its programs are dispatched in order onto SMs that
hold ``per_sm`` of them each: the model behind the CUDA state kernels' segment count (``forward.state_segments``).

The state kernel's program walks one segment of ``L`` chunks. With ``n`` programs resident on an SM, each advances at
one chunk per ``chunk_time(n) = max(1, n * PAIRED_CHUNK_TIME / 2)`` time units (processor sharing; measured for n <= 2,
linear beyond). A free slot takes the next program of the grid (segment-major: every program of segment 0, then of
segment 1, ...), the least loaded SM first. With ``n_chunks`` chunks in segments of ``L = ceil(n_chunks / segments)``,
the last segment is the short one, so it is what fills the final, partial round of the grid.

H200, T=65536 b1 h8 d64 chunk 1024, the wgmma state kernel, 80 programs per segment on 132 SMs x 2
(``benchmarks/state_dispatch.py``, ``state_dispatch_NVIDIA-H200_2026-12-02_c091644.json``): with 7 segments of 10
chunks, the first 264 programs took 0.199-0.201 ms and the next 132, one per SM, 0.128-0.129 more, so a program beside
another takes 1.55 times as long per chunk as one alone (a first probe with 8 segments of 8: 0.163 and 0.10, 1.6):
``PAIRED_CHUNK_TIME = 1.6``. Scaled by the measured time of 7 segments, the model's makespan for 6, 7, 8, 9 and 11
segments, dispatched segment-major and segment-minor, came within 2% of the kernel in 18 of 20 runs, and 6% above it
for segment-minor 7. The segment-major grid with 7 segments took 0.404 ms, against 0.426 for the segment-minor grid
with 8 (the count and order before).
"""

from __future__ import annotations

import functools
import heapq

# Time per chunk of a program that shares its SM with one other (one chunk alone = 1)
PAIRED_CHUNK_TIME = 1.6
# ``modelled_segment_count`` looks up to REACH times the usual count for one the model ends GAIN sooner
REACH, GAIN = 2, 0.05


def chunk_time(resident: int) -> float:
    """Time per chunk of each of ``resident`` programs on one SM."""
    return max(1.0, resident * PAIRED_CHUNK_TIME / 2)


def segment_lengths(n_chunks: int, segments: int) -> list[int]:
    """Chunks per segment as the kernels split them: ``ceil(n_chunks / segments)`` each, the last one the rest."""
    per_segment = -(-n_chunks // segments)
    count = -(-n_chunks // per_segment)
    return [min(per_segment, n_chunks - s * per_segment) for s in range(count)]


def segment_major(lengths: list[int], programs: int) -> list[int]:
    """The chunks of each program in dispatch order of a segment-major grid of ``programs`` programs per segment."""
    return [length for length in lengths for _ in range(programs)]


def makespan(queue: list[int], sms: int, per_sm: int) -> float:
    """Time (chunk units of a program alone) until the last program ends, programs of ``queue[i]`` chunks dispatched
    in that order onto ``sms`` SMs of ``per_sm`` slots under the processor-sharing model above."""
    remaining: list[list[float]] = [[] for _ in range(sms)]  # chunks left per resident program, as of ``updated``
    updated = [0.0] * sms
    version = [0] * sms
    events: list[tuple[float, int, int]] = []  # (time the SM's next program ends, SM, version)
    by_load: list[set[int]] = [set() for _ in range(per_sm + 1)]
    by_load[0] = set(range(sms))
    now, taken = 0.0, 0

    def advance(sm: int) -> None:
        jobs = remaining[sm]
        if jobs:
            done = (now - updated[sm]) / chunk_time(len(jobs))
            remaining[sm] = [left - done for left in jobs]
        updated[sm] = now

    def reschedule(sm: int) -> None:
        version[sm] += 1
        jobs = remaining[sm]
        if jobs:
            heapq.heappush(events, (now + min(jobs) * chunk_time(len(jobs)), sm, version[sm]))

    def fill() -> None:
        nonlocal taken
        while taken < len(queue):
            load = next((n for n in range(per_sm) if by_load[n]), None)
            if load is None:
                return
            sm = min(by_load[load])
            advance(sm)
            by_load[load].discard(sm)
            by_load[load + 1].add(sm)
            remaining[sm].append(float(queue[taken]))
            taken += 1
            reschedule(sm)

    fill()
    while events:
        time, sm, seen = heapq.heappop(events)
        if seen != version[sm]:
            continue
        now = time
        ended = [sm]  # every SM whose program ends at this time (equal programs end together) frees its slot first
        while events and events[0][0] <= now + 1e-9:
            _, other, other_seen = heapq.heappop(events)
            if other_seen == version[other]:
                ended.append(other)
        for sm in ended:
            advance(sm)
            load = len(remaining[sm])
            remaining[sm] = [left for left in remaining[sm] if left > 1e-9]
            by_load[load].discard(sm)
            by_load[len(remaining[sm])].add(sm)
            reschedule(sm)
        fill()
    return now


@functools.lru_cache(maxsize=256)
def fastest_segment_count(n_chunks: int, programs: int, sms: int, per_sm: int, most: int) -> int:
    """The segment count in ``[1, most]`` whose grid (``programs`` per segment) the model ends first; of counts within
    1% of the best, the fewest (fewer segment totals stored and less for the scan to fold). Counts whose grid fills
    every slot at least once are preferred: under one round the first placement decides, and the GPU's is not the
    model's (132 programs of 8 segments' grid on 132 SMs x 2 took 0.159 ms, as if two per SM, where the model has
    one per SM at 0.10)."""
    counts = range(1, max(1, most) + 1)
    full = [s for s in counts if programs * len(segment_lengths(n_chunks, s)) >= sms * per_sm]
    spans = {s: makespan(segment_major(segment_lengths(n_chunks, s), programs), sms, per_sm) for s in full or counts}
    best = min(spans.values())
    return min(s for s, span in spans.items() if span <= best * 1.01 + 1e-12)


@functools.lru_cache(maxsize=256)
def modelled_segment_count(n_chunks: int, programs: int, sms: int, per_sm: int, usual: int) -> int:
    """``fastest_segment_count`` up to ``usual`` segments, or up to ``REACH`` times that many where the model ends at
    least ``GAIN`` sooner there. More segments cost the segment scan more (more chunk states to fold, one more total
    each), which the model leaves out: H200, T=16384 b1 h8 d64, 16 segments against 8 took the scan 0.027 -> 0.036
    ms for a state kernel the model puts 4.8% sooner. The cherry layout's 72 programs at T=65536 take 11 segments
    instead of 7 (10% sooner: state kernel 0.418-0.430 -> 0.389-0.398 ms with the layout's 10% fewer products,
    scan 0.091-0.092 both)."""
    low = fastest_segment_count(n_chunks, programs, sms, per_sm, usual)
    high = fastest_segment_count(n_chunks, programs, sms, per_sm, min(n_chunks, REACH * usual))

    def span(segments: int) -> float:
        return makespan(segment_major(segment_lengths(n_chunks, segments), programs), sms, per_sm)

    return high if span(high) <= (1 - GAIN) * span(low) else low
