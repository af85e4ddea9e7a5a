"""The exact Wilcoxon signed-rank test of ``grpo_harness.stats`` against hand-computed p-values
and against a brute-force enumeration of every sign pattern (an independent float64 source)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from grpo_harness.stats import midranks, quartiles, signed_rank_test


# Hand-computed. Two-sided p = P(|T+ - E| >= |t+ - E|) over the 2**n equally likely sign patterns.
# [1..5] all positive: T+ = 15 is the single most extreme pattern on each side: 2/32.
# [1,-2,3,4,5]: t+ = 13, E = 7.5; T+ >= 13 <=> T- <= 2: T- in {0, 1, 2} -> 3 patterns, x2 sides: 6/32.
# [2,2,2,-1]: ranks 3,3,3 (midrank of 2..4) and 1; t+ = 9, E = 5; sums with |s - 5| >= 4 are
#   0, 1, 9, 10, one pattern each: 4/16.
# [1,1,-2]: ranks 1.5,1.5,3; t+ = 3 = E: every pattern is at least as extreme: 1.
# [0, 0, 3]: zeros dropped, n = 1: t+ = 1 of {0, 1}: 2/2 = 1.
# [-4,-3,-2,-1,5,-6]: ranks 4,3,2,1,5,6; t+ = 5, E = 10.5; T+ <= 5 by subsets of {1..6} summing to
#   at most 5: {}, 1, 2, 3, 4, 5, 1+2, 1+3, 1+4, 2+3 = 10 patterns, x2 sides: 20/64.
# [-1,1,3]: ranks 1.5,1.5,3; t+ = 4.5, E = 3; sums of {1.5,1.5,3}: 0,1.5,1.5,3,3,4.5,4.5,6, of
#   which 6 lie >= 1.5 from E: 6/8 (ranking the tie 1, 2 in order of appearance would give 4/8).
HAND = [
    ([1, 2, 3, 4, 5], 2 / 32, 15.0),
    ([1, -2, 3, 4, 5], 6 / 32, 13.0),
    ([2, 2, 2, -1], 4 / 16, 9.0),
    ([1, 1, -2], 1.0, 3.0),
    ([0, 0, 3], 1.0, 1.0),
    ([-4, -3, -2, -1, 5, -6], 20 / 64, 5.0),
    ([-1, 1, 3], 6 / 8, 4.5),
]


@pytest.mark.parametrize("diffs, p, t_plus", HAND)
def test_signed_rank_hand_computed(diffs, p, t_plus):
    r = signed_rank_test(diffs)
    assert r.p_value == pytest.approx(p, abs=1e-15)
    assert r.t_plus == t_plus
    assert r.n == sum(d != 0 for d in diffs)


def brute_force_p(diffs: list[float]) -> float:
    """Every sign pattern of the midranks of the non-zero |d|, in float64."""
    d = [x for x in diffs if x != 0]
    if not d:
        return 1.0
    ranks = midranks([abs(x) for x in d])
    mean = sum(ranks) / 2
    obs = abs(sum(r for r, x in zip(ranks, d) if x > 0) - mean)
    hits = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - mean) >= obs - 1e-9
               for signs in itertools.product([0, 1], repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("seed", range(25))
def test_signed_rank_matches_enumeration(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 11)
    pool = [rng.randint(-4, 4) for _ in range(3)] if seed % 2 else None  # few values: many ties, zeros
    diffs = [rng.choice(pool) if pool else rng.gauss(0, 1) for _ in range(n)]
    assert signed_rank_test(diffs).p_value == pytest.approx(brute_force_p(diffs), rel=1e-12, abs=1e-15)


def test_signed_rank_symmetry_and_direction():
    d = [3.0, -1.0, 4.0, 1.5, 5.0, 9.0, -2.0]
    a, b = signed_rank_test(d), signed_rank_test([-x for x in d])
    assert a.p_value == b.p_value and a.t_plus == b.t_minus
    assert a.direction == 1 and b.direction == -1
    assert signed_rank_test([1.0, -1.0]).direction == 0


def test_smallest_p_value_is_two_over_two_to_the_n():
    for n in (5, 6, 10, 20):
        assert signed_rank_test(list(range(1, n + 1))).p_value == 2 / 2 ** n


def test_signed_rank_refuses_non_finite():
    with pytest.raises(ValueError, match=r"difference 1 is nan"):
        signed_rank_test([1.0, math.nan])


def test_midranks_and_quartiles_hand_computed():
    assert midranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert quartiles([1, 2, 3, 4]) == (1.75, 2.5, 3.25)  # linear between order statistics
    with pytest.raises(ValueError):
        quartiles([])


def wrong_normal_approximation(diffs):
    """A plausible mistake: the large-sample normal approximation (no continuity correction)."""
    d = [x for x in diffs if x != 0]
    n = len(d)
    ranks = midranks([abs(x) for x in d])
    t = sum(r for r, x in zip(ranks, d) if x > 0)
    mean, var = n * (n + 1) / 4, n * (n + 1) * (2 * n + 1) / 24
    z = abs(t - mean) / math.sqrt(var)
    return math.erfc(z / math.sqrt(2))


def test_hand_values_reject_the_normal_approximation():
    """The hand-computed cases above tell the exact test from the usual approximation."""
    assert any(abs(wrong_normal_approximation(d) - p) > 0.01 for d, p, _ in HAND if any(d))


def _p_with_ranks(diffs, rank):
    """Exact p by enumeration, with a given ranking rule (for the mistakes below)."""
    d = [x for x in diffs if x != 0]
    ranks = rank([abs(x) for x in d])
    mean = sum(ranks) / 2
    obs = abs(sum(r for r, x in zip(ranks, d) if x > 0) - mean)
    hits = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - mean) >= obs - 1e-9
               for signs in itertools.product([0, 1], repeat=len(d)))
    return hits / 2 ** len(d)


def test_hand_values_reject_ordinal_ranks_for_ties():
    """A mistake: ties ranked by order of appearance instead of midranks."""
    def ordinal(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        ranks = [0.0] * len(values)
        for k, i in enumerate(order):
            ranks[i] = k + 1.0
        return ranks
    assert any(abs(_p_with_ranks(d, ordinal) - p) > 1e-9 for d, p, _ in HAND if any(d))


def test_hand_values_reject_keeping_zeros():
    """A mistake: zero differences kept in the ranking (they then carry rank but no sign)."""
    d = [0, 0, 3, 4, -1]
    kept = _p_with_ranks([x if x else 1e-300 for x in d], midranks)  # zeros ranked, counted positive
    assert abs(signed_rank_test(d).p_value - kept) > 0.01
    assert signed_rank_test(d).p_value == signed_rank_test([3, 4, -1]).p_value
