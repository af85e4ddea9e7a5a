"""Every convention of the oracle names its source, and the two where the sources disagree
(correctness pass 2, item 3) are pinned by hand-computed numbers, next to the other choice.

A fully masked row (a reward of None, or a truncated completion masked out) is not part of
the batch: it leaves the seq-mean normalisers (verl's choice) and its group's statistics, while
Dr. GRPO's constant normaliser keeps it. The other choice, TRL's, is written out below as
``every_row_*`` so that the difference is visible in numbers."""

from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_core.advantages import group_advantages
from grpo_core.losses import agg_loss
from reference import grpo_math

# one batch: three rows with tokens and one fully masked row
VALUES = [[1.0, 2.0, 3.0], [4.0], [2.0, 2.0], []]


def _convention_rows() -> dict[str, str]:
    """The oracle's convention table: first column -> source column (continuation lines of a
    row are joined to it)."""
    doc = grpo_math.__doc__
    table = doc.split("Conventions fixed here:")[1].split("\n\n")[1]
    rows: dict[str, str] = {}
    key = None
    for line in table.splitlines()[2:]:  # the header and its rule
        name, source = line[2:34].strip(), line[79:].strip()
        if name:
            key = name
            rows[key] = source
        elif key is not None and source:
            rows[key] += " " + source
    return rows


def test_every_convention_names_its_source():
    rows = _convention_rows()
    assert len(rows) >= 10
    assert all(src for src in rows.values()), {k: v for k, v in rows.items() if not v}
    assert "[VERL]" in rows["seq-mean rows (A2, A3)"]
    assert "decided here" in rows["empty sample, group stats"]
    cited = set(re.findall(r"\[[A-Z]+\]", " ".join(rows.values())))
    for tag in cited:  # each tag is defined in the sources list
        assert re.search(r"^" + re.escape(tag) + r" ", grpo_math.__doc__, re.M), tag


def every_row_seq_mean(values, token_mean: bool) -> float:
    """TRL's choice (its "grpo" loss): the mean over every row, a fully masked one giving 0."""
    per_row = [(sum(v) / len(v) if token_mean else sum(v)) if v else 0.0 for v in values]
    return sum(per_row) / len(per_row)


@pytest.mark.parametrize("agg, ours, every_row", [
    ("seq-mean-token-mean", (2.0 + 4.0 + 2.0) / 3, (2.0 + 4.0 + 2.0) / 4),  # 2.6667 vs 2.0
    ("seq-mean-token-sum", (6.0 + 4.0 + 4.0) / 3, (6.0 + 4.0 + 4.0) / 4),  # 4.6667 vs 3.5
])
def test_a_fully_masked_row_leaves_the_seq_mean(agg, ours, every_row):
    """By hand: the row means are 2, 4, 2 and the row sums 6, 4, 4. The oracle and the core
    divide by the 3 rows with a token; counting the masked row (TRL) divides by 4, a step 3/4
    as large."""
    assert grpo_math.aggregate(VALUES, agg) == pytest.approx(ours, rel=1e-15)
    assert every_row_seq_mean(VALUES, agg == "seq-mean-token-mean") == pytest.approx(every_row, rel=1e-15)
    width = max(map(len, VALUES))
    v = torch.tensor([row + [99.0] * (width - len(row)) for row in VALUES], dtype=torch.float64)
    m = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in VALUES], dtype=torch.float64)
    core = float(agg_loss(v, m, agg=agg))
    assert core == pytest.approx(ours, rel=1e-12) and core != pytest.approx(every_row, rel=1e-3)


def test_dr_grpo_keeps_the_masked_row():
    """Dr. GRPO's normaliser is a constant: (6 + 4 + 4) / (4 rows x max_len 5) = 0.7."""
    assert grpo_math.aggregate(VALUES, "seq-mean-token-sum-norm", max_len=5) == pytest.approx(0.7, rel=1e-15)


def every_sample_in_the_pool(group: list[float | None], eps: float) -> list[float]:
    """TRL's choice for a sample no reward function scored: reward 0, kept in the pool."""
    r = [0.0 if x is None else x for x in group]
    m = sum(r) / len(r)
    s = math.sqrt(sum((x - m) ** 2 for x in r) / (len(r) - 1))
    return [(x - m) / (s + eps) for x in r]


def test_an_empty_sample_leaves_its_groups_statistics():
    """Outcomes 1, 0, (none), 1: the pool is {1, 0, 1}, mean 2/3, Bessel std sqrt(1/3), so the
    first sample gets (1/3) / sqrt(1/3) = sqrt(1/3) = 0.57735 and the second -2 sqrt(1/3).
    Scoring the empty sample 0 and keeping it (TRL) gives mean 1/2, std sqrt(1/3): 0.86603."""
    eps = 0.0
    grouped = [[[1.0], [0.0], [], [1.0]]]
    oracle = grpo_math.group_advantages(grouped, gamma=1.0, scale="group", stats_over="sequences", eps=eps)
    third = math.sqrt(1 / 3)
    assert oracle[0][2] == []
    assert [oracle[0][i][0] for i in (0, 1, 3)] == pytest.approx([third, -2 * third, third], rel=1e-12)
    rewards = torch.tensor([[1.0], [0.0], [0.0], [1.0]], dtype=torch.float64)
    mask = torch.tensor([[1], [1], [0], [1]], dtype=torch.float64)
    core = group_advantages(rewards, mask, 4, gamma=1.0, scale="group", stats_over="sequences", eps=eps)
    assert core[:, 0].tolist() == pytest.approx([third, -2 * third, 0.0, third], rel=1e-12)
    other = every_sample_in_the_pool([1.0, 0.0, None, 1.0], eps)
    assert other[0] == pytest.approx(0.5 / third, rel=1e-12) and other[0] != pytest.approx(third, rel=1e-3)
