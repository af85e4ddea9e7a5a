"""Parity: ``grpo_core`` on padded batches equals the float64 oracle on the same ragged data.

Every core function runs on (N, T) tensors built by ``pad`` with random junk under the mask,
in float64 and float32; the oracle (``reference.grpo_math``) runs on the valid entries only,
as float64 Python floats, after rounding the inputs to the tested dtype so both see the same
numbers. Tolerances: relative 1e-10 (float64) or 1e-5 (float32), plus an absolute floor of the
same relative size times the magnitude of the terms that are summed or cancelled (a quantity
that is the small difference of large terms can only be as exact as those terms).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_core as core
from grpo_core.testing import strategies as gs
from reference import grpo_math as ref

from ._supervision import scored_tensor, supervise

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
KL_NAMES = ("k1", "k2", "k3", "k3_is")
CLIP_RANGES = [(0.2, 0.2), (0.2, 0.28), (0.0, 0.0), (0.1, 0.5)]


def examples(share: float) -> int:
    """A share of the active profile's example budget, for heavily parametrized tests."""
    return max(8, int(settings.default.max_examples * share))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def padded(ragged, dtype, layout, seed, T):
    """``pad`` with random finite junk (magnitude ~1e3) under the mask."""
    gen = torch.Generator().manual_seed(seed + 1)
    junk = torch.randn(len(ragged), T, generator=gen, dtype=torch.float64) * 1e3
    return gs.pad(ragged, T, dtype, junk, layout=layout, seed=seed)


def width(lengths, extra):
    """A padded width of at least one column and ``extra`` all-padding columns."""
    return max([1, *lengths]) + extra


def close(got: float, want: float, rtol: float, atol: float) -> bool:
    return abs(got - want) <= rtol * abs(want) + atol


def assert_close(got: float, want: float, rtol: float, atol: float, what: str) -> None:
    assert close(got, want, rtol, atol), (
        f"{what}: core {got!r} vs oracle {want!r} (diff {abs(got - want):.3g}, "
        f"allowed {rtol * abs(want) + atol:.3g})"
    )


def pooled(group, group_scored, stats_over, gamma):
    """The values a group's statistics pool (for the tolerance only)."""
    if stats_over == "steps":
        return [x for sample in group for x in ref.discounted_returns(sample, gamma)]
    if group_scored is None:
        return [sample[-1] for sample in group if sample]
    return [x for sample, flags in zip(group, group_scored) for x, f in zip(sample, flags) if f]


def term_sizes(batch_rows, eps_high, name):
    """Per-token magnitudes (policy, kl, entropy) of the GRPO loss terms and their derivatives.

    Used as absolute floors: rtol * (weighted sum of these) bounds the rounding error of a
    faithful implementation.
    """
    lp, olp, rlp, adv, ent = batch_rows
    x = lp - olp
    d = rlp - lp
    ratio = math.exp(x)
    policy = (1 + abs(x)) * (ratio + 1 + eps_high) * abs(adv)
    kl = (1 + abs(lp) + abs(rlp) + abs(olp)) * (1 + math.exp(d)) * (1 + abs(d))
    if name == "k3_is":
        kl *= 1 + ratio
    return policy, kl, abs(ent)


def token_terms(batch_rows, eps_high, beta, ent_coef, name):
    """Magnitude of one token's contribution to the whole loss (see ``term_sizes``)."""
    policy, kl, ent = term_sizes(batch_rows, eps_high, name)
    return policy + beta * kl + ent_coef * ent


def near_clip_edge(lp, olp, eps_low, eps_high, rtol):
    """Whether a token's ratio lies so close to a clip bound that rounding may flip the branch."""
    x = lp - olp
    ratio = math.exp(x)
    slack = 4 * rtol * (1 + abs(x)) * ratio
    return min(abs(ratio - (1 - eps_low)), abs(ratio - (1 + eps_high))) <= slack


def rows(batch, dtype):
    """The batch's ragged fields rounded to ``dtype`` (what the core sees), as float lists."""

    def rnd(r):
        return [torch.tensor(s, dtype=dtype).to(torch.float64).tolist() for s in r]

    return (
        rnd(batch.logp),
        rnd(batch.old_logp),
        rnd(batch.ref_logp),
        rnd(batch.adv),
        rnd(batch.entropy),
    )


def core_inputs(fields, dtype, layout, seed, T):
    """Pad each ragged field (same mask for all, different junk); logp requires grad."""
    tensors = []
    for k, field in enumerate(fields):
        gen = torch.Generator().manual_seed(seed + 7 * k + 1)
        junk = torch.randn(len(field), T, generator=gen, dtype=torch.float64) * 30
        t, mask = gs.pad(field, T, dtype, junk, layout=layout, seed=seed)
        tensors.append(t)
    tensors[0].requires_grad_(True)
    return tensors, mask


# ---------------------------------------------------------------------------------------------
# returns
# ---------------------------------------------------------------------------------------------


def check_returns(batch, gamma, dtype, layout, seed, T, slack=1.0):
    rewards, mask = padded(batch.values, dtype, layout, seed, T)
    got = core.discounted_returns(rewards, mask, gamma)
    assert got.dtype == dtype and got.shape == rewards.shape
    assert torch.all(got[mask == 0] == 0), "masked returns must be exactly 0"
    seen = gs.unpad(rewards, mask)
    for i, (g_row, r_row) in enumerate(zip(gs.unpad(got, mask), seen)):
        want = ref.discounted_returns(r_row, gamma)
        floor = slack * RTOL[dtype] * math.fsum(abs(r) for r in r_row)
        for t, (g, w) in enumerate(zip(g_row, want)):
            assert_close(g, w, RTOL[dtype], floor, f"G[{i}][{t}] gamma={gamma!r}")


@given(
    batch=gs.value_batches(allow_empty=True),
    gamma=gs.gammas(),
    dtype=gs.dtypes(),
    layout=gs.layouts(),
    extra=st.integers(0, 3),
    seed=gs.seeds(),
)
def test_discounted_returns_parity(batch, gamma, dtype, layout, extra, seed):
    """Returns equal the oracle's backward recursion on every compressed row, any gamma."""
    check_returns(batch, gamma, dtype, layout, seed, width(batch.lengths, extra))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discounted_returns_parity_edge_gammas(gamma, dtype):
    """gamma = 0 and 1 (and two usual values) on a fixed mixed batch, all layouts."""
    batch = gs.ValueBatch(
        values=[[1.0, -2.0, 0.0, 1e6], [], [0.5], [3.0] * 70, [0.0, 0.0, 1.0]], group_size=1
    )
    for layout in ("right", "left", "scattered"):
        check_returns(batch, gamma, dtype, layout, seed=3, T=80)


@settings(max_examples=examples(0.25))
@given(
    batch=gs.value_batches(max_groups=2, max_group_size=4, max_len=300, allow_empty=True),
    gamma=gs.gammas(),
    dtype=gs.dtypes(),
    layout=gs.layouts(),
    extra=st.integers(0, 40),
    seed=gs.seeds(),
)
def test_discounted_returns_parity_long(batch, gamma, dtype, layout, extra, seed):
    """Sequences longer than the core's 64-step scan blocks: the carry across blocks is right."""
    T = width(batch.lengths, extra)
    check_returns(batch, gamma, dtype, layout, seed, T, slack=max(1.0, T / 32))


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", core.BASELINES)
@pytest.mark.parametrize("scale", core.SCALES)
@pytest.mark.parametrize("stats_over", core.STATS_OVER)
@settings(max_examples=examples(0.5))
@given(
    batch=gs.value_batches(allow_empty=True),
    gamma=gs.gammas(),
    dtype=gs.dtypes(),
    layout=gs.layouts(),
    extra=st.integers(0, 3),
    seed=gs.seeds(),
)
def test_group_advantages_parity(baseline, scale, stats_over, batch, gamma, dtype, layout, extra, seed):
    """Advantages equal the oracle's at every valid step, for every baseline x scale x
    stats_over x gamma, including degenerate groups and empty samples (the oracle computes the
    leave-one-out mean by leaving the value out; the core from the n/(n - 1) identity)."""
    T = width(batch.lengths, extra)
    values_in, scored = batch.values, None
    if stats_over == "sequences":  # outcome or process supervision, alternately
        values_in, scored = supervise(batch.values, seed, "outcome" if seed % 2 else "process")
    rewards, mask = padded(values_in, dtype, layout, seed, T)
    scored_t = scored_tensor(scored, mask, layout, seed)
    got = core.group_advantages(rewards, mask, batch.group_size, gamma=gamma, scale=scale,
                                stats_over=stats_over, scored=scored_t, baseline=baseline)
    assert got.dtype == dtype
    assert torch.all(got[mask == 0] == 0), "masked advantages must be exactly 0"
    seen = gs.to_groups(gs.unpad(rewards, mask), batch.group_size)
    seen_scored = None if scored is None else gs.to_groups(scored, batch.group_size)
    want = ref.group_advantages(seen, gamma=gamma, scale=scale, stats_over=stats_over, scored=seen_scored,
                                baseline=baseline)
    got_groups = gs.to_groups(gs.unpad(got, mask), batch.group_size)

    group_flags = seen_scored or [None] * len(seen)
    everything = [x for group, fl in zip(seen, group_flags) for x in pooled(group, fl, stats_over, gamma)]
    # the largest quantity a step's advantage is computed from: a sum of |rewards|
    big = max([math.fsum(abs(x) for x in s) for group in seen for s in group], default=0.0)
    batch_std = statistics.stdev(everything) if len(everything) >= 2 else 0.0
    for b, (g_group, w_group, group) in enumerate(zip(got_groups, want, seen)):
        values = pooled(group, group_flags[b], stats_over, gamma)
        if len(values) < 2 or len(set(values)) == 1:  # degenerate: exactly 0
            assert all(a == 0.0 for s in g_group for a in s), f"group {b} must be exactly 0"
            continue
        denom = {"group": statistics.stdev(values), "batch": batch_std, "none": 1.0}[scale]
        top = max(abs(a) for s in w_group for a in s)
        floor = RTOL[dtype] * (big / denom) * (1 + top) * 4 * (1 + T / 16) * (2 if baseline != "mean" else 1)
        for i, (g_s, w_s) in enumerate(zip(g_group, w_group)):
            for t, (g, w) in enumerate(zip(g_s, w_s)):
                assert_close(g, w, RTOL[dtype], floor, f"A group {b} sample {i} step {t}")


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KL_NAMES)
@settings(max_examples=examples(0.5))
@given(batch=gs.policy_batches(), dtype=gs.dtypes())
def test_kl_parity(name, batch, dtype):
    """Each estimator's value and autograd derivative wrt logp equal the oracle's, per token."""
    lp_r, olp_r, rlp_r, _, _ = rows(batch, dtype)
    flat = [[x for r in field for x in r] for field in (lp_r, olp_r, rlp_r)]
    lp, olp, rlp = (torch.tensor(f, dtype=dtype) for f in flat)
    lp.requires_grad_(True)
    if name == "k3_is":
        value = core.kl_k3_is(lp, rlp, olp)
    else:
        value = getattr(core, f"kl_{name}")(lp, rlp)
    assert torch.equal(value, core.kl_estimate(name, lp, rlp, olp))
    (grad,) = torch.autograd.grad(value.sum(), lp)
    value = value.detach()
    fn, dfn = ref.KL[name]
    rtol = RTOL[dtype]
    for j, (a, o, r) in enumerate(zip(*flat)):
        mag = (1 + abs(a) + abs(r) + abs(o)) * (1 + math.exp(r - a))
        if name == "k3_is":
            mag *= 1 + math.exp(a - o)
        assert_close(float(value[j]), fn(a, r, o), rtol, rtol * mag, f"{name} token {j}")
        assert_close(float(grad[j]), dfn(a, r, o), rtol, rtol * mag, f"d{name}/dlogp token {j}")


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", core.AGGS)
@settings(max_examples=examples(0.5))
@given(
    batch=gs.value_batches(allow_empty=True),
    dtype=gs.dtypes(),
    layout=gs.layouts(),
    extra=st.integers(0, 3),
    longer=st.integers(0, 40),
    seed=gs.seeds(),
)
def test_agg_loss_parity(agg, batch, dtype, layout, extra, longer, seed):
    """agg_loss equals the oracle's weighted sum; Dr. GRPO's max_len is a constant at least T."""
    T = width(batch.lengths, extra)
    values, mask = padded(batch.values, dtype, layout, seed, T)
    max_len = T + longer
    got = float(core.agg_loss(values, mask, agg=agg, max_len=max_len))
    seen = gs.unpad(values, mask)
    want = ref.aggregate(seen, agg, max_len)
    floor = RTOL[dtype] * ref.aggregate([[abs(v) for v in r] for r in seen], agg, max_len)
    assert_close(got, want, RTOL[dtype], floor, f"agg_loss {agg}")


# ---------------------------------------------------------------------------------------------
# clipped policy loss and the full GRPO loss
# ---------------------------------------------------------------------------------------------


def check_loss(batch, dtype, layout, extra, seed, *, agg, name, beta, ent_coef, clip, full):
    """Run the core loss (full GRPO or the clipped policy loss) and compare with the oracle:
    loss, stats and the gradient wrt logp (which must be exactly 0 under the mask)."""
    eps_low, eps_high = clip
    rtol = RTOL[dtype]
    T = width(batch.lengths, extra)
    fields = rows(batch, dtype)
    (lp, olp, rlp, adv, ent), mask = core_inputs(fields, dtype, layout, seed, T)
    max_len = T + seed % 7  # Dr. GRPO's constant, at least the longest sample
    common = dict(eps_low=eps_low, eps_high=eps_high, agg=agg, max_len=max_len)
    if full:
        loss, stats = core.grpo_loss(
            lp, olp, rlp, adv, mask, entropy=ent, beta=beta, ent_coef=ent_coef,
            kl_estimator=name, **common,
        )
    else:
        loss, stats = core.clipped_policy_loss(lp, olp, adv, mask, **common)
        beta, ent_coef = 0.0, 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.all(grad[mask == 0] == 0), "gradient under the mask must be exactly 0"

    want, parts, dlogp = ref.grpo_loss(
        *fields, beta=beta, ent_coef=ent_coef, kl_estimator=name,
        **common,
    )
    lengths = batch.lengths
    weights = ref.aggregate_weights(lengths, agg, max_len)
    tokens = [
        (i, t, tuple(f[i][t] for f in fields))
        for i in range(len(lengths))
        for t in range(lengths[i])
    ]
    floor = rtol * math.fsum(
        weights[i][t] * token_terms(row, eps_high, beta, ent_coef, name)
        for i, t, row in tokens
    )
    assert_close(float(loss.detach()), want, rtol, floor, "loss")
    if full:
        sizes = [(weights[i][t], term_sizes(row, eps_high, name)) for i, t, row in tokens]
        floors = [rtol * math.fsum(w * size[k] for w, size in sizes) for k in range(3)]
        assert_close(stats["loss"], want, rtol, floor, "stats loss")
        assert_close(stats["policy_loss"], parts["policy_loss"], rtol, floors[0], "policy_loss")
        assert_close(stats["kl"], parts["kl"], rtol, floors[1], "kl")
        assert_close(stats["entropy"], parts["entropy"], rtol, floors[2], "entropy")

    # gradient, token by token
    got_grad = gs.unpad(grad, mask)
    for i, t, row in tokens:
        allowed = rtol * weights[i][t] * token_terms(row, eps_high, beta, ent_coef, name)
        if near_clip_edge(row[0], row[1], eps_low, eps_high, rtol):
            allowed += weights[i][t] * math.exp(row[0] - row[1]) * abs(row[3])
        assert_close(got_grad[i][t], dlogp[i][t], rtol, allowed, f"dloss/dlogp[{i}][{t}]")

    # clip statistics (only defined with at least one token)
    n = len(tokens)
    if n == 0:
        return
    edge = sum(near_clip_edge(row[0], row[1], eps_low, eps_high, rtol) for _, _, row in tokens)
    for key in ("clip_frac_low", "clip_frac_high"):
        assert abs(stats[key] - parts[key]) * n <= edge + 1e-9, key
    for key in ("ratio_min", "ratio_max"):
        assert_close(stats[key], parts[key], 4 * rtol * 31, 0.0, key)
    log_ratios = [r[0] - r[1] for *_, r in tokens]
    x_mag = math.fsum((1 + abs(x)) * (abs(x) + math.exp(x)) for x in log_ratios)
    assert_close(stats["approx_kl"], parts["approx_kl"], rtol, rtol * x_mag / n, "approx_kl")


@pytest.mark.parametrize("agg", core.AGGS)
@settings(max_examples=examples(0.5))
@given(
    batch=gs.policy_batches(allow_empty=True),
    dtype=gs.dtypes(),
    layout=gs.layouts(),
    extra=st.integers(0, 3),
    clip=st.sampled_from(CLIP_RANGES),
    seed=gs.seeds(),
)
def test_clipped_policy_loss_parity(agg, batch, dtype, layout, extra, clip, seed):
    """Clipped surrogate: loss, stats and gradient equal the oracle's, for every agg."""
    check_loss(batch, dtype, layout, extra, seed, agg=agg, name="k1", beta=0.0, ent_coef=0.0,
               clip=clip, full=False)


@pytest.mark.parametrize("agg", core.AGGS)
@pytest.mark.parametrize("name", KL_NAMES)
@settings(max_examples=examples(0.25))
@given(
    batch=gs.policy_batches(allow_empty=True),
    dtype=gs.dtypes(),
    layout=gs.layouts(),
    extra=st.integers(0, 3),
    clip=st.sampled_from(CLIP_RANGES),
    beta=st.sampled_from([0.0, 0.04, 1.0]),
    ent_coef=st.sampled_from([0.0, 0.01]),
    seed=gs.seeds(),
)
def test_grpo_loss_parity(name, agg, batch, dtype, layout, extra, clip, beta, ent_coef, seed):
    """Full GRPO loss: value, stats and autograd gradient wrt logp equal the oracle's
    dloss_dlogp, for every KL estimator and every aggregation."""
    check_loss(batch, dtype, layout, extra, seed, agg=agg, name=name, beta=beta,
               ent_coef=ent_coef, clip=clip, full=True)
