"""The chunk states' rows without repeated features: "cherries" of 8-coordinate groups (deg 2).

The pair layout (``block_feature`` 16) holds, for every unordered pair of 16-coordinate blocks (I, J), the 256
features k_a k_b, a in I, b in J. Its 4 diagonal pairs (I, I) hold each feature k_a k_b with a != b twice, as (a, b)
and (b, a): 2560 rows at d = 64 where 2080 are distinct. The cherry layout cuts the repeats down to those within
8-coordinate groups (2304 rows at d = 64): coordinates fall into n = d / 8 groups, and every unordered pair of groups
{X, Y} (X = Y included) is held once. Pairs of groups are the edges of the complete graph on n vertices with a loop at
each; a *cherry* (A; B1, B2) is two edges at one vertex A, {A, B1} and {A, B2}, and owns the 128 features

    row 16 a + b of the cherry:  k_{8A + a} k_{8B1 + b} (b < 8),  k_{8A + a} k_{8B2 + b - 8} (b >= 8),  a < 8

which is exactly one warpgroup's rows of the wgmma state kernel (its 8 coordinates a from one 8-column block of K,
its 16 coordinates b from two) and one step of the query kernel (q_A (x) q_{B1 | B2}). Each of the n (n + 1) / 2
edges is in exactly one cherry. The query side weighs a cherry's features by 1 where B = A (both orders of a pair
within a group are rows) and 2 elsewhere (one order only), as the pair layout does for its off-diagonal pairs.

The cherries are listed in program order (program P of the state kernel owns cherries 2P and 2P + 1, so its 256 rows
are contiguous as in the pair layout). With 16-coordinate blocks I = {2I, 2I + 1} matched in twos, (0, 1), (2, 3), ...
(sets of 4 groups), every pair of blocks but the matched ones keeps the pair layout's two cherries (2I; 2J, 2J + 1)
and (2I + 1; 2J, 2J + 1). A set {o, o + 1, o + 2, o + 3} takes its 10 within-set edges in five cherries:

    L0 = (o; o, o + 1), L1 = (o + 1; o + 1, o + 2), L2 = (o + 2; o + 2, o + 3), L3 = (o + 3; o + 3, o + 1),
    X = (o; o + 2, o + 3)

and two sets side by side make five programs, [L1, L2], [L3, X] of each and [L0, L0'], each reading at most four
groups of K (the pair layout's programs read four). So the layout needs the sets in pairs: d a multiple of 64. At
d = 64: 18 cherries in 9 programs (the pair layout: 10 programs of 256 rows), at d = 128: 68 in 34 (36).
"""

from __future__ import annotations

import functools

GROUP = 8  # coordinates per group
CHERRY_ROWS = 2 * GROUP * GROUP  # features per cherry


def supports_cherries(d: int) -> bool:
    """Whether the kernels take the cherry layout at head dim ``d``: the layout needs sets of 4 groups in pairs (d a
    multiple of 64), the query kernel's tables 18 cherries at most (one 3-bit entry each in an int64): d = 64."""
    return d == 8 * GROUP


@functools.cache
def cherries(d: int) -> tuple[tuple[int, int, int], ...]:
    """The cherries (A, B1, B2) of head dim ``d`` in program order (see the module docstring)."""
    if d % (8 * GROUP) or d <= 0:
        raise ValueError(f"the cherry layout needs d a multiple of {8 * GROUP}, got {d}")
    blocks = d // (2 * GROUP)
    out: list[tuple[int, int, int]] = []
    for first in range(0, blocks // 2, 2):  # sets first and first + 1 (4 groups each), their groups from 4 first on
        lead = []
        for o in (4 * first, 4 * first + 4):
            out += [(o + 1, o + 1, o + 2), (o + 2, o + 2, o + 3), (o + 3, o + 3, o + 1), (o, o + 2, o + 3)]
            lead.append((o, o, o + 1))
        out += lead
    for i in range(blocks):
        for j in range(i + 1, blocks):
            if not (i % 2 == 0 and j == i + 1):  # matched blocks' pairs live in their sets
                out += [(2 * i, 2 * j, 2 * j + 1), (2 * i + 1, 2 * j, 2 * j + 1)]
    return tuple(out)


def cherry_features(d: int) -> int:
    """Rows of a chunk state in the cherry layout: 128 per cherry, d (d + 8) / 2 in all."""
    return len(cherries(d)) * CHERRY_ROWS


def program_groups(d: int) -> tuple[tuple[int, ...], ...]:
    """Per state-kernel program (cherries 2P, 2P + 1), the groups of K it reads, at most 4 (sorted)."""
    listed = cherries(d)
    return tuple(tuple(sorted(set(listed[2 * p]) | set(listed[2 * p + 1]))) for p in range(len(listed) // 2))


def query_tables(d: int) -> dict[str, int]:
    """The cherries' groups as the query kernel reads them: for A, B1 and B2, one integer whose bits [3 s, 3 s + 3)
    are cherry s's group (d = 64: 8 groups, 18 cherries, 54 bits)."""
    listed = cherries(d)
    assert d // GROUP <= 8 and 3 * len(listed) < 63, "3-bit entries, one int64 per table"
    assert all(b2 != a for a, _, b2 in listed), "the kernel weighs B2's features 2 (only B1 may be A)"
    fields = enumerate(("A", "B1", "B2"))
    return {name: sum(c[field] << (3 * s) for s, c in enumerate(listed)) for field, name in fields}


def state_programs(d: int) -> tuple[dict[str, tuple], ...]:
    """The wgmma state kernel's tables per program: ``groups`` the 4 groups its stages hold (copy piece s fills slot
    s; a program of 3 groups stages its last twice) and ``slots``, per cherry of the program's two, the slots of its
    groups (A, B1, B2): cherry 2p + i is ``groups[slot]`` for the slots ``slots[i]``."""
    listed = cherries(d)
    programs = []
    for p, groups in enumerate(program_groups(d)):
        staged = (*groups, *groups[-1:] * (4 - len(groups)))
        slots = tuple(tuple(staged.index(g) for g in c) for c in listed[2 * p : 2 * p + 2])
        programs.append({"groups": staged, "slots": slots})
    return tuple(programs)


def feature_coordinates(d: int) -> tuple[list[int], list[int]]:
    """Per row of the cherry layout, its two coordinates (x, y): the feature is k_x k_y."""
    xs, ys = [], []
    for a_group, b1, b2 in cherries(d):
        for a in range(GROUP):
            for b in range(2 * GROUP):
                xs.append(GROUP * a_group + a)
                ys.append(GROUP * (b1 if b < GROUP else b2) + b % GROUP)
    return xs, ys


def query_coefficients(d: int) -> list[int]:
    """Per row, the query side's weight: 1 where both coordinates are in one group (both orders are rows), else 2;
    so that sum_f coef_f phi_f(q) phi_f(k) = (q . k)^2."""
    xs, ys = feature_coordinates(d)
    return [1 if x // GROUP == y // GROUP else 2 for x, y in zip(xs, ys)]
