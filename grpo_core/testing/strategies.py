"""Hypothesis strategies and padding helpers for GRPO inputs (public conformance kit).

Every strategy draws the *structure* of an example with hypothesis (number of groups, group
size, lengths, the style of the values, a seed) and fills the bulk values from a seeded
``torch.Generator``. A batch of a few thousand tokens thus costs a handful of draws, examples
stay fast, and a failing example is still reproduced exactly from hypothesis's choices.

Data come back as *ragged* Python lists of float64 values (samples -> steps, no padding),
the form the reference oracle takes; :func:`pad` turns them into the padded ``(N, T)`` tensor
plus 0/1 mask that ``grpo_core`` takes, with arbitrary junk under the mask, and
:func:`unpad` goes back.

Bounds (keep examples small and fast): 1..4 groups, group sizes 1..16, sequence lengths
1..64 (or 0..64 where a test allows empty samples), rewards up to 1e6 in magnitude, logits in
[-13.5, 13.5] so that every log-prob gap stays below 30.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

__all__ = [
    "MAX_GROUPS",
    "MAX_GROUP_SIZE",
    "MAX_LEN",
    "MAX_LOGIT",
    "REWARD_STYLES",
    "ADV_STYLES",
    "Ragged",
    "ValueBatch",
    "PolicyBatch",
    "seeds",
    "dtypes",
    "gammas",
    "layouts",
    "junk_values",
    "group_shapes",
    "value_batches",
    "policy_batches",
    "pad",
    "unpad",
    "to_groups",
]

MAX_GROUPS = 4
MAX_GROUP_SIZE = 16
MAX_LEN = 64
MAX_LOGIT = 13.5  # |logit| <= 13.5 and vocab 8 -> log-probs in [-29.1, 0], gaps below 30

REWARD_STYLES = (
    "normal",  # standard normal
    "scaled",  # normal times one batch-wide scale in {1e-3, 1, 1e3, 1e6}
    "zeros",  # all zero
    "binary",  # 0/1 outcomes: many ties
    "final-only",  # zero except the last step (outcome reward)
    "large",  # uniform in [-1e6, 1e6]
    "ties",  # multiples of 0.5 in [-1, 1]: many exact ties
    "constant-groups",  # one value per group: every group all-equal
    "mixed",  # each sequence picks one of the styles above
)
ADV_STYLES = ("normal", "per-sequence", "zeros", "signs", "large")

Ragged = list[list[float]]


@dataclass
class ValueBatch:
    """A ragged batch of per-step values (rewards or returns) split into contiguous groups."""

    values: Ragged
    group_size: int

    @property
    def lengths(self) -> list[int]:
        return [len(v) for v in self.values]

    def groups(self) -> list[Ragged]:
        """The values nested groups -> samples -> steps (the oracle's layout)."""
        return to_groups(self.values, self.group_size)


@dataclass
class PolicyBatch:
    """Ragged per-token inputs of a GRPO loss; every field is samples -> tokens.

    ``logp``, ``old_logp`` and ``ref_logp`` are log-probs of one sampled token under the
    policy, the sampling policy and the reference, each taken from ``log_softmax`` of logits
    over a small vocabulary (so they are valid log-probs); ``entropy`` is the policy's entropy
    at the token's position; ``adv`` the advantage.
    """

    logp: Ragged
    old_logp: Ragged
    ref_logp: Ragged
    adv: Ragged
    entropy: Ragged
    group_size: int

    @property
    def lengths(self) -> list[int]:
        return [len(v) for v in self.logp]


# ---------------------------------------------------------------------------------------------
# Small strategies
# ---------------------------------------------------------------------------------------------


def seeds() -> st.SearchStrategy[int]:
    """Seeds for the ``torch.Generator`` that fills the bulk values."""
    return st.integers(0, 2**32 - 1)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """float64 and float32."""
    return st.sampled_from([torch.float64, torch.float32])


def gammas() -> st.SearchStrategy[float]:
    """Discounts in [0, 1], with 0, 1 and the usual values drawn often."""
    return st.one_of(
        st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.99, 0.999]),
        st.floats(0.0, 1.0, allow_nan=False),
    )


def layouts() -> st.SearchStrategy[str]:
    """Where the padding sits: see :func:`pad`."""
    return st.sampled_from(["right", "left", "scattered"])


def junk_values(*, finite: bool = False) -> st.SearchStrategy[float]:
    """Values to write under the mask; with ``finite=False`` NaN and +-inf are included."""
    values = [0.0, -1.0, 3.25, 1e6, -1e30]
    if not finite:
        values += [math.nan, math.inf, -math.inf]
    return st.sampled_from(values)


@st.composite
def group_shapes(
    draw,
    *,
    max_groups: int = MAX_GROUPS,
    max_group_size: int = MAX_GROUP_SIZE,
    min_len: int = 1,
    max_len: int = MAX_LEN,
    allow_empty: bool = False,
) -> tuple[int, list[int]]:
    """``(group_size, lengths)``: 1..max_groups groups of 1..max_group_size samples.

    Every length lies in [min_len, max_len]; with ``allow_empty`` some samples (none, a few,
    a whole group, or all of them) have length 0.
    """
    n_groups = draw(st.integers(1, max_groups))
    group_size = draw(st.integers(1, max_group_size))
    n = n_groups * group_size
    lengths = draw(st.lists(st.integers(min_len, max_len), min_size=n, max_size=n))
    if allow_empty:
        # weighted: mostly ordinary batches, sometimes an empty group or nothing at all
        empties = draw(st.sampled_from(["none", "none", "some", "some", "first-group", "all"]))
        if empties == "some":
            flags = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            lengths = [0 if f else k for f, k in zip(flags, lengths)]
        elif empties == "first-group":
            lengths = [0] * group_size + lengths[group_size:]
        elif empties == "all":
            lengths = [0] * n
    return group_size, lengths


# ---------------------------------------------------------------------------------------------
# Rewards / returns
# ---------------------------------------------------------------------------------------------


def _fill(style: str, n: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """``n`` float64 values of one reward style (see ``REWARD_STYLES``)."""
    f64 = torch.float64
    if style == "normal":
        return torch.randn(n, generator=gen, dtype=f64)
    if style == "scaled":
        return torch.randn(n, generator=gen, dtype=f64) * scale
    if style == "zeros":
        return torch.zeros(n, dtype=f64)
    if style == "binary":
        return torch.randint(0, 2, (n,), generator=gen).to(f64)
    if style == "final-only":
        out = torch.zeros(n, dtype=f64)
        if n:
            out[-1] = float(torch.randint(0, 2, (1,), generator=gen)) * scale
        return out
    if style == "large":
        return (torch.rand(n, generator=gen, dtype=f64) * 2 - 1) * 1e6
    if style == "ties":
        return torch.randint(-2, 3, (n,), generator=gen).to(f64) * 0.5
    raise ValueError(f"unknown reward style {style!r}")


@st.composite
def value_batches(
    draw,
    *,
    styles: tuple[str, ...] = REWARD_STYLES,
    max_groups: int = MAX_GROUPS,
    max_group_size: int = MAX_GROUP_SIZE,
    min_len: int = 1,
    max_len: int = MAX_LEN,
    allow_empty: bool = False,
) -> ValueBatch:
    """Ragged per-step rewards (or returns) in groups, in one of ``styles``.

    Covers zeros, exact ties, all-equal groups, outcome-only rewards and magnitudes up to
    1e6 (see ``REWARD_STYLES``).
    """
    group_size, lengths = draw(
        group_shapes(
            max_groups=max_groups,
            max_group_size=max_group_size,
            min_len=min_len,
            max_len=max_len,
            allow_empty=allow_empty,
        )
    )
    style = draw(st.sampled_from(styles))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e6]))
    gen = torch.Generator().manual_seed(draw(seeds()))
    simple = [s for s in REWARD_STYLES if s not in ("constant-groups", "mixed")]
    values: Ragged = []
    for i, n in enumerate(lengths):
        if style == "constant-groups":
            if i % group_size == 0:
                level = float(torch.randn(1, generator=gen, dtype=torch.float64)) * scale
            row = torch.full((n,), level, dtype=torch.float64)
        elif style == "mixed":
            pick = simple[int(torch.randint(0, len(simple), (1,), generator=gen))]
            row = _fill(pick, n, gen, scale)
        else:
            row = _fill(style, n, gen, scale)
        values.append(row.tolist())
    return ValueBatch(values=values, group_size=group_size)


# ---------------------------------------------------------------------------------------------
# Log-prob triples
# ---------------------------------------------------------------------------------------------


def _split(flat: torch.Tensor, lengths: list[int]) -> Ragged:
    out, start = [], 0
    for n in lengths:
        out.append(flat[start : start + n].tolist())
        start += n
    return out


@st.composite
def policy_batches(
    draw,
    *,
    first_epoch: bool | None = None,
    max_groups: int = MAX_GROUPS,
    max_group_size: int = MAX_GROUP_SIZE,
    min_len: int = 1,
    max_len: int = MAX_LEN,
    allow_empty: bool = False,
    vocab: int = 8,
) -> PolicyBatch:
    """Ragged GRPO loss inputs (see :class:`PolicyBatch`).

    The policy's logits over ``vocab`` outcomes are uniform in [-s, s] for a drawn spread s
    (from 0, all outcomes equally likely, up to 13.5), or peaked (near-deterministic, one
    outcome at probability ~1 - 1e-11). The sampling policy and the reference are the policy's
    logits plus noise of a drawn size (0 makes them equal exactly) or independent logits; all
    logits are clamped to [-13.5, 13.5], so every log-prob gap is within +-30. The token is
    sampled from the policy or drawn uniformly (rare tokens). ``first_epoch=True`` forces
    ``old_logp == logp`` exactly (ratio 1), ``False`` forbids noise 0, ``None`` allows both.
    """
    group_size, lengths = draw(
        group_shapes(
            max_groups=max_groups,
            max_group_size=max_group_size,
            min_len=min_len,
            max_len=max_len,
            allow_empty=allow_empty,
        )
    )
    total = sum(lengths)
    gen = torch.Generator().manual_seed(draw(seeds()))
    f64 = torch.float64

    def uniform_logits(spread: float) -> torch.Tensor:
        return (torch.rand(total, vocab, generator=gen, dtype=f64) * 2 - 1) * spread

    spread = draw(st.sampled_from([0.0, 0.01, 0.5, 2.0, 6.0, MAX_LOGIT]))
    pi = uniform_logits(spread)
    if draw(st.booleans()):  # near-deterministic policy
        pi[:, 1:] = -torch.rand(total, vocab - 1, generator=gen, dtype=f64) * MAX_LOGIT
        pi[:, 0] = MAX_LOGIT

    def related(noise) -> torch.Tensor:
        if noise == "independent":
            return uniform_logits(MAX_LOGIT)
        if noise == 0.0:
            return pi.clone()
        return (pi + torch.randn(total, vocab, generator=gen, dtype=f64) * noise).clamp(
            -MAX_LOGIT, MAX_LOGIT
        )

    if first_epoch:
        old_noise = 0.0
    else:
        choices = [1e-3, 0.05, 0.3, 2.0, "independent"]
        old_noise = draw(st.sampled_from(choices if first_epoch is False else [0.0, *choices]))
    old = related(old_noise)
    ref = related(draw(st.sampled_from([0.0, 0.05, 0.5, 3.0, "independent"])))

    pi_logp = torch.log_softmax(pi, -1)
    if draw(st.booleans()):
        token = torch.multinomial(pi_logp.exp(), 1, generator=gen) if total else torch.zeros(0, 1)
    else:
        token = torch.randint(0, vocab, (total, 1), generator=gen)
    token = token.long()

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, -1).gather(1, token).squeeze(1)

    logp = pick(pi)
    old_logp = logp.clone() if old_noise == 0.0 else pick(old)
    entropy = -(pi_logp.exp() * pi_logp).sum(-1)

    adv_style = draw(st.sampled_from(ADV_STYLES))
    if adv_style == "per-sequence":
        per_seq = torch.randn(len(lengths), generator=gen, dtype=f64)
        adv = torch.repeat_interleave(per_seq, torch.tensor(lengths, dtype=torch.long))
    elif adv_style == "zeros":
        adv = torch.zeros(total, dtype=f64)
    elif adv_style == "signs":
        adv = torch.randint(0, 2, (total,), generator=gen).to(f64) * 2 - 1
    else:
        adv = torch.randn(total, generator=gen, dtype=f64) * (1e3 if adv_style == "large" else 1.0)

    return PolicyBatch(
        logp=_split(logp, lengths),
        old_logp=_split(old_logp, lengths),
        ref_logp=_split(pick(ref), lengths),
        adv=_split(adv, lengths),
        entropy=_split(entropy, lengths),
        group_size=group_size,
    )


# ---------------------------------------------------------------------------------------------
# Padding helpers
# ---------------------------------------------------------------------------------------------


def _positions(n: int, t_len: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "right":
        return torch.arange(n)
    if layout == "left":
        return torch.arange(t_len - n, t_len)
    if layout == "scattered":
        return torch.randperm(t_len, generator=gen)[:n].sort().values
    raise ValueError(f"layout={layout!r} is not valid; choose one of right, left, scattered")


def pad(
    ragged: Ragged,
    T: int | None = None,
    dtype: torch.dtype = torch.float64,
    junk: float | torch.Tensor = 0.0,
    *,
    layout: str = "right",
    seed: int = 0,
    mask_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ragged lists into a padded ``(N, T)`` tensor and its 0/1 mask.

    - ``T`` defaults to the longest sequence (at least 1); it must not be shorter.
    - ``junk`` (a float, or a tensor broadcastable to (N, T)) fills every masked position.
    - ``layout``: "right" puts the values first and the padding after them (the usual
      layout), "left" the padding first, "scattered" spreads each row's values, in order,
      over random positions of the row. The scattered positions depend only on the lengths,
      ``T`` and ``seed``, so padding several fields with the same arguments gives one mask.
    - the mask has ``mask_dtype`` (default ``dtype``; ``torch.bool`` is allowed).

    Returns ``(values, mask)``; ``unpad(values, mask) == ragged`` (after rounding to dtype).
    """
    lengths = [len(r) for r in ragged]
    t_len = max([1, *lengths]) if T is None else T
    if lengths and max(lengths) > t_len:
        raise ValueError(f"T={t_len} is shorter than the longest sequence ({max(lengths)})")
    n = len(ragged)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, t_len, dtype=torch.bool)
    values = torch.zeros(n, t_len, dtype=torch.float64)
    for i, row in enumerate(ragged):
        pos = _positions(len(row), t_len, layout, gen)
        mask[i, pos] = True
        values[i, pos] = torch.tensor(row, dtype=torch.float64)
    junk_t = torch.as_tensor(junk, dtype=torch.float64).expand(n, t_len)
    values = torch.where(mask, values, junk_t).to(dtype)
    return values, mask.to(dtype if mask_dtype is None else mask_dtype)


def unpad(values: torch.Tensor, mask: torch.Tensor) -> Ragged:
    """The valid entries of each row of ``values`` (where ``mask`` is nonzero), as float lists."""
    return [row[m != 0].tolist() for row, m in zip(values.detach().to(torch.float64), mask)]


def to_groups(ragged: Ragged, group_size: int) -> list[Ragged]:
    """Split samples into contiguous groups of ``group_size`` (groups -> samples -> steps)."""
    return [ragged[i : i + group_size] for i in range(0, len(ragged), group_size)]
