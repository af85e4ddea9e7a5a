"""Properties of the GRPO math that hold whatever the data: invariances, exact special cases,
hand-computed examples and the KL-direction facts, re-derived by enumeration."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_core as core
from grpo_core.testing import strategies as gs
from reference import grpo_math as ref

from ._supervision import scored_tensor, supervise

F64 = torch.float64
KL_NAMES = ("k1", "k2", "k3", "k3_is")


def examples(share: float) -> int:
    """A share of the active profile's example budget, for heavily parametrized tests."""
    return max(8, int(settings.default.max_examples * share))


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def core_kl(name, logp, ref_logp, old_logp):
    return core.kl_estimate(name, logp, ref_logp, old_logp)


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------


def normalised_rewards(adv_sample, gamma):
    """Invert the discount of one sample's advantages: ``A_t - gamma * A_{t+1}`` (A past the
    end 0), the per-step values whose discounted returns the advantages are."""
    nxt = adv_sample[1:] + [0.0]
    return [a - gamma * b for a, b in zip(adv_sample, nxt)]


@given(
    batch=gs.value_batches(allow_empty=True),
    gamma=gs.gammas(),
    scale=st.sampled_from(core.SCALES),
    stats_over=st.sampled_from(core.STATS_OVER),
    layout=gs.layouts(),
    seed=gs.seeds(),
)
def test_advantages_sum_to_zero_per_group(batch, gamma, scale, stats_over, layout, seed):
    """Per group, advantages sum to 0: "steps" over every valid step's advantage;
    "sequences" over every step's normalised reward (the advantages with the discount
    inverted), i.e. the group's normalised scored rewards; in the core and the oracle."""
    values, scored = batch.values, None
    if stats_over == "sequences":
        values, scored = supervise(batch.values, seed, "outcome" if seed % 2 else "process")
    rewards, mask = gs.pad(values, dtype=F64, junk=1e9, layout=layout, seed=seed)
    adv = core.group_advantages(rewards, mask, batch.group_size, gamma=gamma, scale=scale,
                                stats_over=stats_over, scored=scored_tensor(scored, mask, layout, seed))
    core_groups = gs.to_groups(gs.unpad(adv, mask), batch.group_size)
    oracle_groups = ref.group_advantages(
        gs.to_groups(values, batch.group_size), gamma=gamma, scale=scale, stats_over=stats_over,
        scored=None if scored is None else gs.to_groups(scored, batch.group_size))
    for groups in (core_groups, oracle_groups):
        for group in groups:
            if stats_over == "steps":
                terms = [a for sample in group for a in sample]
            else:
                terms = [x for sample in group for x in normalised_rewards(sample, gamma)]
            top = max([abs(a) for sample in group for a in sample], default=0.0)
            assert abs(math.fsum(terms)) <= 1e-12 * len(terms) * max(top, 1e-300) * 64


@settings(max_examples=examples(0.5))
@given(
    group=st.lists(st.tuples(st.integers(1, 60), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])),
                   min_size=1, max_size=8),
    groups=st.integers(1, 3),
    gamma=gs.gammas(),
    scale=st.sampled_from(core.SCALES),
    eps=st.sampled_from([0.0, 1e-8, 1e-4]),
    layout=gs.layouts(),
)
def test_outcome_advantages_closed_form_at_every_token(group, groups, gamma, scale, eps, layout):
    """GRPO outcome supervision, discounted: with a reward R_i on the last of L_i tokens and
    statistics over sequences, token t gets gamma**(L_i-1-t) * (R_i - mean) / (std + eps),
    computed here with ``statistics`` in float64 at every token, not only the first; a group
    whose outcomes are all equal gets exactly 0 at every token, whatever the lengths."""
    import statistics

    samples = [group[(k * 3 + b) % len(group)] for b in range(groups) for k in range(len(group))]
    g = len(group)
    rewards = [[0.0] * (n - 1) + [r] for n, r in samples]
    r_t, m_t = gs.pad(rewards, dtype=F64, junk=3.0, layout=layout, seed=len(samples))
    got = gs.unpad(core.group_advantages(r_t, m_t, g, gamma=gamma, scale=scale,
                                         stats_over="sequences", eps=eps), m_t)
    outcomes = [r for _, r in samples]
    batch_std = statistics.stdev(outcomes) if len(outcomes) > 1 else 0.0
    for b in range(groups):
        rs = outcomes[b * g:(b + 1) * g]
        for i in range(g):
            n = samples[b * g + i][0]
            row = got[b * g + i]
            if len(set(rs)) < 2:
                assert row == [0.0] * n
                continue
            denom = {"group": statistics.stdev(rs) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            norm = (rs[i] - statistics.fmean(rs)) / denom
            want = [gamma ** (n - 1 - t) * norm for t in range(n)]
            assert row == pytest.approx(want, rel=1e-12, abs=1e-12 * abs(norm))


@pytest.mark.parametrize("scale", ["group", "batch"])
@settings(max_examples=examples(0.5))
@given(
    batch=gs.value_batches(styles=("ties", "binary", "final-only", "zeros", "normal"), allow_empty=True),
    stats_over=st.sampled_from(core.STATS_OVER),
    gamma=gs.gammas(),
    a=st.sampled_from([0.5, 2.0, 3.0, 10.0]),
    b=st.sampled_from([-100.0, 0.0, 7.5, 1000.0]),
)
def test_advantages_invariant_to_affine_rewards(scale, batch, stats_over, gamma, a, b):
    """Scaled by a std (group or batch, eps=0), advantages are invariant to a > 0 times the
    rewards plus a shift of what is pooled: b added to every outcome ("sequences": at each
    sample's last step) or to every return ("steps": b added to every reward with gamma = 0)."""
    values = batch.values
    if stats_over == "sequences":
        values, _ = supervise(batch.values, 0, "outcome")
    rewards, mask = gs.pad(values, dtype=F64)
    if stats_over == "steps":
        gamma, shift = 0.0, b * mask
    else:
        shift = torch.zeros_like(rewards)
        for i, n in enumerate(batch.lengths):
            if n:
                shift[i, n - 1] = b
    kw = dict(gamma=gamma, scale=scale, stats_over=stats_over, eps=0.0)
    base = core.group_advantages(rewards, mask, batch.group_size, **kw)
    moved = core.group_advantages(a * rewards + shift, mask, batch.group_size, **kw)
    torch.testing.assert_close(moved, base, rtol=1e-8, atol=1e-8)


@given(
    batch=gs.value_batches(styles=("ties", "binary", "final-only", "zeros"), allow_empty=True),
    stats_over=st.sampled_from(core.STATS_OVER),
    a=st.sampled_from([0.5, 2.0, 3.0, 10.0]),
    b=st.sampled_from([-100.0, 0.0, 7.5, 1000.0]),
)
def test_unscaled_advantages_shift_invariant_and_linear(batch, stats_over, a, b):
    """With scale="none" a shift b of every pooled value changes nothing and a factor a
    scales the advantages (gamma = 0: returns are rewards, outcomes one step long)."""
    rewards, mask = gs.pad(batch.values, dtype=F64)
    kw = dict(gamma=0.0, scale="none", stats_over=stats_over)
    if stats_over == "sequences":  # one-step samples: the outcome is the reward
        rewards, mask = rewards[:, :1], (mask[:, :1] * 0 + 1)
    base = core.group_advantages(rewards, mask, batch.group_size, **kw)
    moved = core.group_advantages(a * rewards + b, mask, batch.group_size, **kw)
    torch.testing.assert_close(moved, a * base, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("scale", core.SCALES)
@pytest.mark.parametrize("stats_over", core.STATS_OVER)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("gamma", [1.0, 0.995, 0.5])
def test_no_signal_groups_give_exact_zeros(scale, stats_over, eps, gamma):
    """Groups of size 1 and all-equal groups give advantages exactly 0 at every step, never
    NaN, for every gamma."""
    single = t64([[3.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    mask1 = t64([[1, 1, 1], [1, 0, 0]])
    for dtype in (F64, torch.float32):
        scored = mask1.to(dtype) if stats_over == "sequences" else None  # every step scored
        out = core.group_advantages(single.to(dtype), mask1.to(dtype), 1, gamma=gamma, scale=scale,
                                    stats_over=stats_over, eps=eps, scored=scored)
        # row 0 pools its 3 steps (returns, or scored rewards): that group has signal
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out.isnan().any()

    # group 0: two samples of outcome 2 with lengths 2 and 1 (sequences: no signal);
    # "steps" pools returns, equal only with one-step samples: group 2
    equal = t64([[0.0, 2.0], [2.0, 0.0], [0.0, 9.0], [0.0, 1.0], [4.0, 0.0], [4.0, 0.0]])
    mask2 = t64([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 0]])
    out = core.group_advantages(equal, mask2, 2, gamma=gamma, scale=scale, stats_over=stats_over, eps=eps)
    if stats_over == "sequences":
        assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    assert not out.isnan().any()

    oracle = ref.group_advantages([[[0.0, 7.0], [7.0]], [[1.0], [1.0]]], gamma=gamma, scale=scale,
                                  stats_over="sequences")
    assert oracle == [[[0.0, 0.0], [0.0]], [[0.0], [0.0]]]
    # process supervision: every scored reward of the group equal -> no signal
    r = t64([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = core.group_advantages(r, torch.ones_like(r), 2, gamma=gamma, scale=scale, stats_over="sequences",
                                eps=eps, scored=(r != 0).double())
    assert torch.equal(out, torch.zeros_like(out))


def test_outcome_with_different_lengths_regression():
    """The review's repro: equal outcomes, lengths 10 and 11, gamma 0.995 gave +13.4 at the
    last token; a group of 8 with all rewards 1 and lengths 20..48 gave -1.4..+3.6. Both have
    no signal: exactly 0 everywhere, in the core and the oracle."""
    for lengths in ([10, 11], [20, 24, 28, 32, 36, 40, 44, 48]):
        rewards = [[0.0] * (n - 1) + [1.0] for n in lengths]
        r, m = gs.pad(rewards, dtype=F64)
        out = core.group_advantages(r, m, len(lengths), gamma=0.995, scale="group", stats_over="sequences",
                                    eps=1e-4)
        assert torch.equal(out, torch.zeros_like(out))
        oracle = ref.group_advantages([rewards], gamma=0.995, scale="group", stats_over="sequences", eps=1e-4)
        assert all(a == 0.0 for s in oracle[0] for a in s)


# ---------------------------------------------------------------------------------------------
# returns
# ---------------------------------------------------------------------------------------------


@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=8),
    final=st.floats(-1e6, 1e6, allow_nan=False),
    layout=gs.layouts(),
    dtype=gs.dtypes(),
)
def test_gamma_one_spreads_the_final_reward(lengths, final, layout, dtype):
    """gamma = 1 with only a final reward gives that reward at every valid step."""
    rewards = [[0.0] * (n - 1) + [final] if n else [] for n in lengths]
    r, m = gs.pad(rewards, dtype=dtype, junk=-5.0, layout=layout, seed=len(lengths))
    out = core.discounted_returns(r, m, 1.0)
    want = torch.tensor(final, dtype=dtype)
    assert torch.all(out[m != 0] == want)
    assert torch.all(out[m == 0] == 0)


@given(batch=gs.value_batches(allow_empty=True), layout=gs.layouts(), dtype=gs.dtypes())
def test_gamma_zero_gives_the_rewards(batch, layout, dtype):
    """gamma = 0: every return is its own reward, exactly."""
    r, m = gs.pad(batch.values, dtype=dtype, junk=123.0, layout=layout)
    out = core.discounted_returns(r, m, 0.0)
    assert torch.equal(out, torch.where(m != 0, r, torch.zeros_like(r)))


def test_returns_hand_computed():
    """Small cases worked out by hand, for the core and the oracle."""
    cases = [
        # 1 + .5 * (1 + .5 * 1) = 1.75; 1 + .5 * 1 = 1.5; 1
        ([1.0, 1.0, 1.0], 0.5, [1.75, 1.5, 1.0]),
        # .9**2 * 1, .9 * 1, 1
        ([0.0, 0.0, 1.0], 0.9, [0.81, 0.9, 1.0]),
        # gamma = 1: reverse cumulative sums 1+2+3, 2+3, 3
        ([1.0, 2.0, 3.0], 1.0, [6.0, 5.0, 3.0]),
        # gamma = 0: the rewards
        ([2.0, -1.0], 0.0, [2.0, -1.0]),
    ]
    for rewards, gamma, want in cases:
        assert ref.discounted_returns(rewards, gamma) == pytest.approx(want, rel=1e-15)
        got = core.discounted_returns(t64([rewards]), torch.ones(1, len(rewards)), gamma)
        assert got[0].tolist() == pytest.approx(want, rel=1e-15)
    # a masked middle step is skipped: compressed [1, 1] with gamma .5 -> [1.5, 1]
    got = core.discounted_returns(t64([[1.0, 99.0, 1.0]]), t64([[1, 0, 1]]), 0.5)
    assert got.tolist() == [[1.5, 0.0, 1.0]]


def test_advantages_hand_computed():
    """Group statistics worked out by hand (eps = 0), core and oracle."""
    s = math.sqrt(0.5)
    # steps [1], [0]: mean .5, Bessel std sqrt(.5): A = +-.5 / sqrt(.5) = +-sqrt(.5)
    (got_ref,) = ref.group_advantages([[[1.0], [0.0]]], gamma=1.0, scale="group", stats_over="steps", eps=0.0)
    assert [a for (a,) in got_ref] == pytest.approx([s, -s], rel=1e-15)
    got = core.group_advantages(t64([[1.0], [0.0]]), torch.ones(2, 1), 2, gamma=1.0, scale="group",
                                stats_over="steps", eps=0.0)
    assert got.flatten().tolist() == pytest.approx([s, -s], rel=1e-15)

    # process supervision, gamma 1: scored rewards 1, 2 | 1 | 2 (the last sample's second step
    # unscored) -> pool 1, 2, 1, 2: mean 1.5, std sqrt(1/3); normalised -+sqrt(3)/2; a token
    # gets the sum of the normalised rewards from it on
    h = math.sqrt(3) / 2
    group, flags = [[1.0, 2.0], [1.0], [2.0, 0.0]], [[True, True], [True], [True, False]]
    want = [[[0.0, h], [-h], [h, 0.0]]]
    got_ref = ref.group_advantages([group], gamma=1.0, scale="group", stats_over="sequences", eps=0.0,
                                   scored=[flags])
    assert [a for s_ in got_ref[0] for a in s_] == pytest.approx([a for s_ in want[0] for a in s_], abs=1e-15)
    got = core.group_advantages(t64([[1.0, 2.0], [1.0, 0.0], [2.0, 0.0]]),
                                t64([[1, 1], [1, 0], [1, 1]]), 3, gamma=1.0, scale="group",
                                stats_over="sequences", eps=0.0, scored=t64([[1, 1], [1, 0], [1, 0]]))
    assert got.flatten().tolist() == pytest.approx([0.0, h, -h, 0.0, h, 0.0], abs=1e-15)
    with pytest.raises(ValueError, match="row 0 has reward 1.0 at step 0"):  # no scored mask
        core.group_advantages(t64([[1.0, 2.0]]), t64([[1, 1]]), 1, gamma=1.0, scale="group",
                              stats_over="sequences")
    # gamma .5, outcome rewards 0 (after 2 steps) and 2 (after 1 step): mean 1, std sqrt(2);
    # the first sample's tokens get .5**(2-t) * (0 - 1) / sqrt(2)
    r2 = math.sqrt(2.0)
    got = core.group_advantages(t64([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), t64([[1, 1, 1], [1, 0, 0]]), 2,
                                gamma=0.5, scale="group", stats_over="sequences", eps=0.0)
    assert got[0].tolist() == pytest.approx([-0.25 / r2, -0.5 / r2, -1 / r2], rel=1e-15)
    assert got[1].tolist() == pytest.approx([1 / r2, 0.0, 0.0], rel=1e-15)

    # batch: groups [1, 3] and [0, 0]; batch mean 1, squares 0 + 4 + 1 + 1 = 6, std sqrt(6/3);
    # group 0 mean 2 -> -+1/sqrt(2); group 1 has no signal -> 0
    r = 1 / math.sqrt(2)
    got_ref = ref.group_advantages([[[1.0], [3.0]], [[0.0], [0.0]]], gamma=1.0, scale="batch",
                                   stats_over="steps", eps=0.0)
    flat = [a for group in got_ref for (a,) in group]
    assert flat == pytest.approx([-r, r, 0.0, 0.0], rel=1e-15)
    got = core.group_advantages(t64([[1.0], [3.0], [0.0], [0.0]]), torch.ones(4, 1), 2, gamma=1.0,
                                scale="batch", stats_over="steps", eps=0.0)
    assert got.flatten().tolist() == pytest.approx([-r, r, 0.0, 0.0], rel=1e-15)


def test_aggregation_hand_computed():
    """values [[1, 2, 3], [4]] (and an empty row) under each aggregation."""
    cases = {
        "token-mean": 10 / 4,  # all four tokens
        "seq-mean-token-mean": (2 + 4) / 2,  # row means 2 and 4
        "seq-mean-token-sum": (6 + 4) / 2,  # row sums 6 and 4
        # Dr. GRPO: all sums over (every row, the empty one too) x max_len: 10 / (3 * 5)
        "seq-mean-token-sum-norm": 10 / (3 * 5),
    }
    values = t64([[1.0, 2.0, 3.0, 0.0], [4.0, 7.0, 7.0, 7.0], [9.0, 9.0, 9.0, 9.0]])
    mask = t64([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    for agg, want in cases.items():
        assert ref.aggregate([[1.0, 2.0, 3.0], [4.0], []], agg, max_len=5) == pytest.approx(want, rel=1e-15)
        assert float(core.agg_loss(values, mask, agg=agg, max_len=5)) == pytest.approx(want, rel=1e-15)
        assert float(core.agg_loss(values, torch.zeros_like(mask), agg=agg, max_len=5)) == 0.0


def test_clipped_loss_hand_computed():
    """Clip range [0.8, 1.2]: which branch min() takes, and the derivative it leaves."""
    cases = [
        # ratio, adv, loss, dloss/dlogp
        (1.5, 1.0, -1.2, 0.0),  # min(1.5, 1.2) = 1.2 clipped: no gradient
        (1.5, -1.0, 1.5, 1.5),  # min(-1.5, -1.2) = -1.5 unclipped: -ratio * adv = 1.5
        (0.5, -1.0, 0.8, 0.0),  # min(-0.5, -0.8) = -0.8 clipped
        (0.5, 1.0, -0.5, -0.5),  # min(0.5, 0.8) = 0.5 unclipped: -0.5
        (1.0, 2.0, -2.0, -2.0),  # inside the range: both branches agree
    ]
    for ratio, adv, loss, grad in cases:
        got = ref.clipped_token_loss(math.log(ratio), 0.0, adv, 0.2, 0.2)
        assert got == pytest.approx((loss, grad), rel=1e-14, abs=1e-15)
        lp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
        out, _ = core.clipped_policy_loss(lp, torch.zeros(1, 1, dtype=F64), t64([[adv]]),
                                          torch.ones(1, 1), eps_low=0.2, eps_high=0.2,
                                          agg="token-mean")
        out.backward()
        got = (float(out.detach()), float(lp.grad))
        assert got == pytest.approx((loss, grad), rel=1e-14, abs=1e-15)


def test_kl_hand_computed():
    """d = ref_logp - logp = ln 2: k1 = -ln 2, k2 = (ln 2)^2 / 2, k3 = 2 - ln 2 - 1."""
    ln2 = math.log(2.0)
    want = {"k1": -ln2, "k2": ln2 * ln2 / 2, "k3": 1 - ln2, "k3_is": 1 - ln2}
    for name, value in want.items():
        assert ref.KL[name][0](-ln2, 0.0, -ln2) == pytest.approx(value, rel=1e-15)
        got = core_kl(name, t64([-ln2]), t64([0.0]), t64([-ln2]))
        assert float(got) == pytest.approx(value, rel=1e-15)


# ---------------------------------------------------------------------------------------------
# junk under the mask
# ---------------------------------------------------------------------------------------------


@given(
    batch=gs.value_batches(allow_empty=True),
    junk=gs.junk_values(),
    gamma=gs.gammas(),
    scale=st.sampled_from(core.SCALES),
    stats_over=st.sampled_from(core.STATS_OVER),
    layout=gs.layouts(),
)
def test_junk_under_mask_changes_no_returns_or_advantages(batch, junk, gamma, scale, stats_over,
                                                          layout):
    """Whatever sits under a zero mask (NaN, inf, huge), returns and advantages are identical."""
    T = max([1, *batch.lengths]) + 2
    values, scored = batch.values, None
    if stats_over == "sequences":
        values, scored = supervise(batch.values, T, "outcome" if T % 2 else "process")
    clean, mask = gs.pad(values, T, F64, 0.0, layout=layout)
    dirty, _ = gs.pad(values, T, F64, junk, layout=layout)
    g_clean = core.discounted_returns(clean, mask, gamma)
    g_dirty = core.discounted_returns(dirty, mask, gamma)
    assert torch.equal(g_clean, g_dirty)
    kw = dict(gamma=gamma, scale=scale, stats_over=stats_over, scored=scored_tensor(scored, mask, layout, 0))
    a_clean = core.group_advantages(clean, mask, batch.group_size, **kw)
    a_dirty = core.group_advantages(dirty, mask, batch.group_size, **kw)
    assert torch.equal(a_clean, a_dirty)


@pytest.mark.parametrize("kind", ["policy", "grpo"])
@settings(max_examples=examples(0.5))
@given(
    batch=gs.policy_batches(allow_empty=True),
    junks=st.lists(gs.junk_values(), min_size=5, max_size=5),
    name=st.sampled_from(KL_NAMES),
    agg=st.sampled_from(core.AGGS),
    layout=gs.layouts(),
    dtype=gs.dtypes(),
)
def test_junk_under_mask_changes_no_loss_or_gradient(kind, batch, junks, name, agg, layout, dtype):
    """Junk (NaN, inf, huge) under the mask in any input leaves the loss, its stats and its
    gradient bit-for-bit unchanged; the gradient under the mask is exactly 0."""
    fields = (batch.logp, batch.old_logp, batch.ref_logp, batch.adv, batch.entropy)
    T = max([1, *batch.lengths]) + 2

    def run(junk_list):
        tensors = [gs.pad(f, T, dtype, j, layout=layout, seed=1)[0]
                   for f, j in zip(fields, junk_list)]
        mask = gs.pad(fields[0], T, dtype, layout=layout, seed=1)[1]
        lp, olp, rlp, adv, ent = tensors
        lp.requires_grad_(True)
        clip = dict(eps_low=0.2, eps_high=0.28, agg=agg, max_len=T + 3)
        if kind == "policy":
            loss, stats = core.clipped_policy_loss(lp, olp, adv, mask, **clip)
        else:
            loss, stats = core.grpo_loss(lp, olp, rlp, adv, mask, entropy=ent, beta=0.1,
                                         ent_coef=0.01, kl_estimator=name, **clip)
        (grad,) = torch.autograd.grad(loss, lp)
        return loss.detach(), stats, grad, mask

    loss0, stats0, grad0, mask = run([0.0] * 5)
    loss1, stats1, grad1, _ = run(junks)
    assert torch.equal(loss0, loss1)
    assert stats0 == stats1
    assert torch.equal(grad0, grad1)
    assert torch.all(grad1[mask == 0] == 0)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


@given(batch=gs.policy_batches(), dtype=gs.dtypes())
def test_kl_is_zero_when_policy_equals_reference(batch, dtype):
    """logp == ref_logp: every estimator is exactly 0 (k3_is whatever old_logp), and so is the
    derivative of k2, k3 and k3_is (k1's is 1)."""
    lp = torch.tensor([x for r in batch.logp for x in r], dtype=dtype, requires_grad=True)
    olp = torch.tensor([x for r in batch.old_logp for x in r], dtype=dtype)
    for name in KL_NAMES:
        value = core_kl(name, lp, lp.detach().clone(), olp)
        assert torch.equal(value.detach(), torch.zeros_like(value))
        (grad,) = torch.autograd.grad(value.sum(), lp)
        assert torch.equal(grad, torch.full_like(grad, 1.0 if name == "k1" else 0.0))
        for a, o in zip(lp.tolist(), olp.tolist()):
            assert ref.KL[name][0](a, a, o) == 0.0


def _gap_grid(dtype):
    """logp in [-50, 0] against ref_logp at gaps from -50 to 50 (plus tiny gaps)."""
    gaps = torch.cat([
        torch.linspace(-50, 50, 2001, dtype=F64),
        torch.logspace(-12, 1, 300, dtype=F64),
        -torch.logspace(-12, 1, 300, dtype=F64),
    ])
    logp = -torch.rand(gaps.numel(), generator=torch.Generator().manual_seed(0), dtype=F64) * 50
    return logp.to(dtype), (logp + gaps).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_k3_never_negative(dtype):
    """k3 = exp(d) - d - 1 >= 0 for every gap, in float32 and float64 (grid of gaps)."""
    logp, ref_logp = _gap_grid(dtype)
    assert bool((core.kl_k3(logp, ref_logp) >= 0).all())
    assert all(ref.kl_k3(a, b) >= 0 for a, b in zip(logp.tolist(), ref_logp.tolist()))


@given(
    logp=st.floats(-60, 0, allow_nan=False),
    gap=st.floats(-50, 50, allow_nan=False),
    dtype=gs.dtypes(),
)
def test_k3_never_negative_anywhere(logp, gap, dtype):
    """k3 >= 0 at hypothesis-chosen points, tiny and subnormal gaps included."""
    lp = torch.tensor([logp], dtype=dtype)
    rl = torch.tensor([logp + gap], dtype=dtype)
    assert float(core.kl_k3(lp, rl)) >= 0
    assert ref.kl_k3(float(lp), float(rl)) >= 0


@pytest.mark.parametrize("name", KL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_finite_for_gaps_of_50(name, dtype):
    """Values and derivatives stay finite for log-prob gaps up to +-50 (k3_is with old_logp
    equal to logp, and with both gaps at +-40, whose product still fits float32)."""
    logp, ref_logp = _gap_grid(dtype)
    olds = [logp.clone()]
    if name == "k3_is":
        shift = torch.linspace(-40, 40, logp.numel(), dtype=F64).to(dtype)
        clipped_ref = logp + (ref_logp - logp).clamp(-40, 40)
        olds.append(logp - shift)
        ref_logp_cases = [ref_logp, clipped_ref]
    else:
        ref_logp_cases = [ref_logp]
    for old, rl in zip(olds, ref_logp_cases):
        lp = logp.clone().requires_grad_(True)
        value = core_kl(name, lp, rl, old)
        (grad,) = torch.autograd.grad(value.sum(), lp)
        assert bool(torch.isfinite(value).all()), name
        assert bool(torch.isfinite(grad).all()), name


def _categorical(theta, ref_theta):
    theta = torch.tensor(theta, dtype=F64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor(ref_theta, dtype=F64), -1)
    return theta, ref_logp


def _expected_grads(theta, ref_logp):
    """Autograd gradients of KL(ref||pi) and KL(pi||ref) wrt the policy logits."""
    logp = torch.log_softmax(theta, -1)
    fwd = (logp.exp() * (logp - ref_logp)).sum()  # KL(pi || ref)
    rev = (ref_logp.exp() * (ref_logp - logp)).sum()  # KL(ref || pi)
    (g_fwd,) = torch.autograd.grad(fwd, theta, retain_graph=True)
    (g_rev,) = torch.autograd.grad(rev, theta)
    return {"k1": torch.zeros_like(g_fwd), "k2": g_fwd, "k3": g_rev, "k3_is": g_fwd}


logits6 = st.lists(st.floats(-6, 6, allow_nan=False), min_size=6, max_size=6)


@given(theta=logits6, ref_theta=logits6)
def test_kl_gradient_direction_by_enumeration(theta, ref_theta):
    """On a categorical over 6 outcomes, sum_x pi(x) * grad k(x) (pi detached: what a loss term
    does on on-policy samples) equals grad KL(ref||pi) for k3, grad KL(pi||ref) for k2 and k3_is,
    and 0 for k1; for the core (autograd) and the oracle (its dlogp by the chain rule)."""
    theta, ref_logp = _categorical(theta, ref_theta)
    expected = _expected_grads(theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    for name in KL_NAMES:
        k = core_kl(name, logp, ref_logp, logp.detach())
        (got,) = torch.autograd.grad((pi * k).sum(), theta, retain_graph=True)
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-10, msg=name)

        # oracle: d/dtheta_j sum_x pi_x k(x) = sum_x pi_x k'(x) (delta_xj - pi_j)
        dfn = ref.KL[name][1]
        g = [p * dfn(a, r, a) for p, a, r in zip(pi.tolist(), logp.tolist(), ref_logp.tolist())]
        oracle = torch.tensor(g, dtype=F64) - pi * math.fsum(g)
        torch.testing.assert_close(oracle, expected[name], rtol=0, atol=1e-10, msg=name)


@given(theta=logits6, ref_theta=logits6)
def test_k1_and_k3_unbiased_by_enumeration(theta, ref_theta):
    """sum_x pi(x) k(x) == KL(pi||ref) exactly for k1 and k3 (and k3_is on-policy)."""
    theta, ref_logp = _categorical(theta, ref_theta)
    logp = torch.log_softmax(theta.detach(), -1)
    pi = logp.exp()
    kl = float((pi * (logp - ref_logp)).sum())
    for name in ("k1", "k3", "k3_is"):
        mean_core = float((pi * core_kl(name, logp, ref_logp, logp)).sum())
        mean_ref = math.fsum(
            p * ref.KL[name][0](a, r, a)
            for p, a, r in zip(pi.tolist(), logp.tolist(), ref_logp.tolist())
        )
        scale = float((pi * (logp - ref_logp).abs()).sum()) + float((ref_logp.exp()).sum())
        assert mean_core == pytest.approx(kl, rel=1e-10, abs=1e-12 * scale), name
        assert mean_ref == pytest.approx(kl, rel=1e-10, abs=1e-12 * scale), name


def test_k2_is_biased():
    """k2 is not unbiased: for a far-apart pair its mean differs from KL(pi||ref)."""
    logp = torch.log_softmax(t64([5.0, 0, 0, 0, 0, 0]), -1)
    ref_logp = torch.log_softmax(t64([0, 0, 0, 0, 0, 5.0]), -1)
    pi = logp.exp()
    kl = float((pi * (logp - ref_logp)).sum())
    mean_k2 = float((pi * core.kl_k2(logp, ref_logp)).sum())
    mean_k2_ref = math.fsum(p * ref.kl_k2(a, r) for p, a, r in zip(pi.tolist(), logp.tolist(),
                                                                     ref_logp.tolist()))
    assert abs(mean_k2 - kl) > 0.1
    assert mean_k2 == pytest.approx(mean_k2_ref, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# first epoch: ratio exactly 1
# ---------------------------------------------------------------------------------------------


def _closed_form_weights(mask: torch.Tensor, agg: str, max_len: int) -> torch.Tensor:
    """Per-token weights of each aggregation, written out directly on the padded mask."""
    n_tok = mask.sum(1, keepdim=True)
    n_seq = (n_tok > 0).sum().clamp(min=1)
    if agg == "token-mean":
        return mask / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return mask / n_tok.clamp(min=1) / n_seq
    if agg == "seq-mean-token-sum":
        return mask / n_seq
    return mask / (max(mask.shape[0], 1) * max_len)  # Dr. GRPO: every row, empty ones too


@pytest.mark.parametrize("agg", core.AGGS)
@settings(max_examples=examples(0.5))
@given(
    batch=gs.policy_batches(first_epoch=True, allow_empty=True),
    clip=st.sampled_from([(0.2, 0.2), (0.0, 0.0), (0.2, 0.28)]),
    layout=gs.layouts(),
)
def test_first_epoch_gradient_is_plain_policy_gradient(agg, batch, clip, layout):
    """logp == old_logp: ratio exactly 1, no clipping, and the clipped loss's gradient equals
    -A * w (the plain policy gradient, aggregated), as does the plain surrogate -A * logp."""
    lp, mask = gs.pad(batch.logp, dtype=F64, junk=-3.0, layout=layout)
    olp, _ = gs.pad(batch.old_logp, dtype=F64, junk=-4.0, layout=layout)
    adv, _ = gs.pad(batch.adv, dtype=F64, junk=7.0, layout=layout)
    lp.requires_grad_(True)
    max_len = mask.shape[1] + 2
    loss, stats = core.clipped_policy_loss(lp, olp, adv, mask, eps_low=clip[0], eps_high=clip[1],
                                           agg=agg, max_len=max_len)
    (grad,) = torch.autograd.grad(loss, lp)
    w = _closed_form_weights(mask, agg, max_len)
    torch.testing.assert_close(grad, -adv * w, rtol=1e-12, atol=1e-300)
    floor = 1e-12 * float((adv * w).abs().sum())  # the sum may cancel: floor at its terms' size
    assert float(loss.detach()) == pytest.approx(float(-(adv * w).sum()), rel=1e-12, abs=floor)

    plain = core.agg_loss(-(adv * lp), mask, agg=agg, max_len=max_len)
    (plain_grad,) = torch.autograd.grad(plain, lp)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-300)
    if batch.lengths and sum(batch.lengths):
        assert stats["ratio_min"] == stats["ratio_max"] == 1.0
    assert stats["clip_frac_low"] == stats["clip_frac_high"] == 0.0
    assert stats["approx_kl"] == 0.0
