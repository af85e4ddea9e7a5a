"""The paired test behind ``grpo-harness ablate``'s verdicts: Wilcoxon's signed-rank test, exact.

Two variants run on the same seeds (same model initialisation, same data, same sampling
streams), so each seed gives one paired difference ``d_i = changed_i - baseline_i``. The test
asks whether the differences are symmetric around 0 (no effect) without assuming a
distribution: rank ``|d_i|``, sum the ranks of the positive differences (``T+``), and compare
with the distribution of that sum when every sign is a fair coin (Wilcoxon 1945).

Conventions (each pinned by a hand-computed test in tests/test_paired_stats.py):

- Zero differences are dropped before ranking (Wilcoxon's original treatment); ``n`` counts
  the rest. With ``n = 0`` the p-value is 1.
- Tied ``|d|`` get the mean of the ranks they span (midranks); the null distribution is the
  exact one of those midranks under random signs, computed by counting (no normal
  approximation, no continuity correction), so ties do not make it approximate.
- Two-sided: ``p = P(|T+ - E T+| >= |t+ - E T+|)`` under the null, with ``E T+`` half the sum
  of the ranks. The smallest p-value ``n`` non-zero differences can give is ``2 / 2**n``
  (e.g. 0.0625 for 5 seeds, 0.002 for 10): with fewer than 6 seeds nothing is significant at
  0.05.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SignedRank:
    """Outcome of ``signed_rank_test``."""

    n: int
    """Non-zero differences (the zeros are dropped)."""
    t_plus: float
    """Sum of the ranks of the positive differences."""
    t_minus: float
    """Sum of the ranks of the negative differences."""
    p_value: float
    """Exact two-sided p-value (1.0 when n = 0)."""
    positive: int
    """How many differences are > 0 (and ``n - positive`` are < 0)."""

    @property
    def direction(self) -> int:
        """+1 when the positive differences carry more rank than the negative ones, -1 when
        fewer, 0 when equal."""
        return (self.t_plus > self.t_minus) - (self.t_plus < self.t_minus)


def midranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (ascending); tied values get the mean of the ranks they span.

    Shapes: values (n,) -> ranks (n,)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _null_counts(doubled: Sequence[int]) -> list[int]:
    """``counts[s]``: how many of the ``2**n`` sign patterns give a doubled positive-rank sum of
    ``s``. Shapes: doubled (n,) -> counts (sum(doubled) + 1,)."""
    counts = [1] + [0] * sum(doubled)
    top = 0
    for r in doubled:
        for s in range(top, -1, -1):  # downwards: each rank is used at most once
            if counts[s]:
                counts[s + r] += counts[s]
        top += r
    return counts


def signed_rank_test(differences: Sequence[float]) -> SignedRank:
    """Exact two-sided Wilcoxon signed-rank test of the paired ``differences`` (see the module
    docstring for the conventions). A non-finite difference raises ValueError naming it.

    Shapes: differences (n,) -> SignedRank."""
    for i, d in enumerate(differences):
        if not math.isfinite(d):
            raise ValueError(f"difference {i} is {d!r}; the signed-rank test needs finite numbers")
    d = [float(x) for x in differences if x != 0]
    if not d:
        return SignedRank(n=0, t_plus=0.0, t_minus=0.0, p_value=1.0, positive=0)
    doubled = [round(2 * r) for r in midranks([abs(x) for x in d])]  # midranks are k/2: exact ints
    t2 = sum(r for r, x in zip(doubled, d) if x > 0)
    total = sum(doubled)
    counts = _null_counts(doubled)
    # |2 s - total| >= |2 t2 - total| in doubled units: integer arithmetic, no rounding
    extreme = sum(c for s, c in enumerate(counts) if abs(2 * s - total) >= abs(2 * t2 - total))
    p = min(1.0, extreme / 2 ** len(d))
    return SignedRank(n=len(d), t_plus=t2 / 2, t_minus=(total - t2) / 2, p_value=p,
                      positive=sum(x > 0 for x in d))


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles (numpy's linear interpolation). Shapes: (n >= 1,) -> 3."""
    import numpy as np

    if not len(values):
        raise ValueError("quartiles of an empty list")
    q = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])
