"""The checks catch real mistakes: each check is a helper returning bool, applied to the
correct core (must pass) and to a deliberately broken variant defined here (must fail)."""

from __future__ import annotations

import math

import pytest
import torch

import grpo_core as core
from grpo_core.testing import strategies as gs
from reference import grpo_math as ref

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# broken variants
# ---------------------------------------------------------------------------------------------


def k3_detached(logp, ref_logp, old_logp=None):
    """k3 with logp detached: right value, no gradient at all."""
    d = ref_logp - logp.detach()
    return torch.expm1(d) - d


def naive_group_advantages(returns, mask, group_size, *, eps=1e-8):
    """(G_0 - mean) / (std + eps) per group with torch.std and no special rule: a group of one
    sample has std NaN (Bessel divides by n - 1 = 0)."""
    g0 = returns[:, 0].view(-1, group_size)
    adv = (g0 - g0.mean(1, keepdim=True)) / (g0.std(1, keepdim=True) + eps)
    return adv.reshape(-1, 1) * mask


def advantages_of_first_return(rewards, mask, group_size, *, gamma, scale, stats_over, eps=1e-8):
    """The review's bug (core and oracle before the correctness pass): with statistics over
    sequences, mean and std of each sample's return at its FIRST valid step G_0, then
    ``(G_t - mean) / (std + eps)`` applied to every step's G_t, a return from another position.
    Equal outcomes with different lengths then get advantages from their position alone."""
    g = core.discounted_returns(rewards, mask, gamma)
    m = mask.bool()
    first = m.to(torch.int64).argmax(1)
    g0 = g.gather(1, first[:, None]).view(-1, group_size)
    valid = m.any(1).view(-1, group_size)
    out = torch.zeros_like(g)
    for b in range(g0.shape[0]):
        vals = g0[b][valid[b]]
        if vals.numel() < 2 or bool((vals == vals[0]).all()):
            continue
        rows = slice(b * group_size, (b + 1) * group_size)
        out[rows] = (g[rows] - vals.mean()) / (vals.std() + eps) * mask[rows]
    return out


def agg_dr_grpo_by_padded_width(values, mask, *, agg, max_len=None):
    """The old Dr. GRPO normaliser: each non-empty sequence's sum over the padded T of the
    batch (when max_len is None), then the mean over non-empty sequences only."""
    m = mask.bool()
    v = torch.where(m, values, torch.zeros_like(values))
    length = values.shape[1] if max_len is None else max_len
    has = m.any(1)
    return (v.sum(1) / length)[has].sum() / has.sum().clamp(min=1)


def loop_returns(rewards, mask, gamma, *, mistake=None):
    """Plain per-row loop over the valid steps; ``mistake`` injects a classic bug:
    "discount-reward": G_t = gamma * (r_t + G_{t+1}) (the own reward discounted too);
    "shift": every step gets the next step's return (off by one)."""
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = (mask[i] != 0).nonzero().flatten().tolist()
        running, values = 0.0, []
        for t in reversed(idx):
            r = float(rewards[i, t])
            running = gamma * (r + running) if mistake == "discount-reward" else r + gamma * running
            values.append(running)
        values.reverse()
        if mistake == "shift":
            values = values[1:] + [0.0]
        for t, v in zip(idx, values):
            out[i, t] = v
    return out


# ---------------------------------------------------------------------------------------------
# reusable checks (bool)
# ---------------------------------------------------------------------------------------------

_PAIRS = [  # (policy logits, reference logits) over 6 outcomes
    ([0.0, 1.0, -1.0, 2.0, 0.5, -2.0], [1.0, 0.0, 0.0, -1.0, 2.0, 0.0]),
    ([3.0, -3.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    ([-5.0, 4.0, 0.1, 0.2, 0.3, 0.4], [2.0, -2.0, 1.0, -1.0, 0.5, -0.5]),
]


def kl_direction_ok(kl_fn, target: str) -> bool:
    """Whether sum_x pi(x).detach() * grad k(x) equals grad of the ``target`` divergence
    ("KL(ref||pi)", "KL(pi||ref)" or "zero") on a few categorical distributions."""
    for theta_list, ref_list in _PAIRS:
        theta = torch.tensor(theta_list, dtype=F64, requires_grad=True)
        ref_logp = torch.log_softmax(torch.tensor(ref_list, dtype=F64), -1)
        logp = torch.log_softmax(theta, -1)
        pi = logp.exp().detach()
        k = kl_fn(logp, ref_logp, logp.detach())
        if k.requires_grad:
            (got,) = torch.autograd.grad((pi * k).sum(), theta, retain_graph=True)
        else:
            got = torch.zeros_like(theta)
        if target == "zero":
            want = torch.zeros_like(theta)
        else:
            p, q = (logp, ref_logp) if target == "KL(pi||ref)" else (ref_logp, logp)
            (want,) = torch.autograd.grad((p.exp() * (p - q)).sum(), theta)
        if not torch.allclose(got, want, rtol=0, atol=1e-10):
            return False
    return True


def kl_gradient_parity_ok(kl_fn, name: str) -> bool:
    """Whether the autograd derivative of ``kl_fn`` wrt logp equals the oracle's, per token."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(200, 8, generator=gen, dtype=F64) * 3, -1)[:, 0]
    ref_logp = torch.log_softmax(torch.randn(200, 8, generator=gen, dtype=F64) * 3, -1)[:, 0]
    old_logp = logp + torch.randn(200, generator=gen, dtype=F64) * 0.1
    lp = logp.clone().requires_grad_(True)
    k = kl_fn(lp, ref_logp, old_logp)
    got = torch.autograd.grad(k.sum(), lp)[0] if k.requires_grad else torch.zeros_like(lp)
    dfn = ref.KL[name][1]
    want = torch.tensor(
        [dfn(a, r, o) for a, r, o in zip(logp.tolist(), ref_logp.tolist(), old_logp.tolist())],
        dtype=F64,
    )
    return bool(torch.allclose(got, want, rtol=1e-10, atol=1e-12))


def size_one_groups_give_zero(adv_fn) -> bool:
    """Whether groups of a single sample get advantages exactly 0 (not NaN)."""
    returns = torch.tensor([[0.0, 2.0], [0.0, 0.5], [0.0, 7.0]], dtype=F64)  # outcome rewards
    mask = torch.ones_like(returns)
    out = adv_fn(returns, mask, 1)
    return bool(torch.equal(out, torch.zeros_like(out)))


def all_equal_groups_give_zero(adv_fn) -> bool:
    """Whether groups whose samples all have the same return get advantages exactly 0."""
    returns = torch.tensor([[2.0], [2.0], [2.0], [-4.0], [-4.0], [-4.0]], dtype=F64)
    out = adv_fn(returns, torch.ones_like(returns), 3)
    return bool(torch.equal(out, torch.zeros_like(out)))


def outcome_advantages_ok(adv_fn) -> bool:
    """Whether outcome rewards with statistics over sequences give, at every token, the
    discounted normalised outcome ``gamma**(L-1-t) (R - mean) / (std + eps)`` (closed form,
    float64), and exactly 0 at every token of a group whose outcomes are equal."""
    import statistics

    gamma, eps = 0.995, 1e-4
    groups = [[(10, 1.0), (11, 1.0)],  # the review's repro: equal outcomes, +13.4 before
              [(20, 1.0), (24, 0.0), (33, 1.0), (48, 0.5)]]
    for group in groups:
        rewards = [[0.0] * (n - 1) + [r] for n, r in group]
        r_t, m_t = gs.pad(rewards, dtype=F64)
        got = gs.unpad(adv_fn(r_t, m_t, len(group), gamma=gamma, scale="group",
                              stats_over="sequences", eps=eps), m_t)
        outcomes = [r for _, r in group]
        for (n, r), row in zip(group, got):
            if len(set(outcomes)) < 2:
                want = [0.0] * n
            else:
                norm = (r - statistics.fmean(outcomes)) / (statistics.stdev(outcomes) + eps)
                want = [gamma ** (n - 1 - t) * norm for t in range(n)]
            if not all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) for a, b in zip(row, want)):
                return False
    return True


def dr_grpo_normaliser_ok(agg_fn) -> bool:
    """Whether Dr. GRPO divides by a constant: the loss of a batch does not change when the
    batch is padded wider (T is no property of the data), and a fully masked row counts as a
    sequence: sum / (rows * max_len), against the hand-computed 10 / (3 * 8)."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=F64)
    wide_v = torch.cat([values, torch.zeros(3, 5, dtype=F64)], 1)
    wide_m = torch.cat([mask, torch.zeros(3, 5, dtype=F64)], 1)
    try:
        narrow = float(agg_fn(values, mask, agg="seq-mean-token-sum-norm", max_len=8))
        wide = float(agg_fn(wide_v, wide_m, agg="seq-mean-token-sum-norm", max_len=8))
        default = float(agg_fn(values, mask, agg="seq-mean-token-sum-norm"))
        default_wide = float(agg_fn(wide_v, wide_m, agg="seq-mean-token-sum-norm"))
    except ValueError:  # refusing to guess the constant is right
        default = default_wide = None
    if default is not None and default != default_wide:
        return False  # the normaliser followed the batch's padding
    return math.isclose(narrow, 10 / 24, rel_tol=1e-15) and narrow == wide


def returns_parity_ok(returns_fn) -> bool:
    """Whether ``returns_fn(rewards, mask, gamma)`` equals the oracle on fixed random ragged
    batches, right-padded and scattered, for gamma in {0, 0.5, 0.9, 1}."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        lengths = torch.randint(0, 12, (6,), generator=gen).tolist()
        rewards = [torch.randn(n, generator=gen, dtype=F64).tolist() for n in lengths]
        for layout in ("right", "scattered"):
            r, m = gs.pad(rewards, max([1, *lengths]) + 2, F64, junk=5.0, layout=layout, seed=trial)
            for gamma in (0.0, 0.5, 0.9, 1.0):
                got = gs.unpad(returns_fn(r, m, gamma), m)
                for g_row, r_row in zip(got, rewards):
                    want = ref.discounted_returns(r_row, gamma)
                    if not all(math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-12)
                               for a, b in zip(g_row, want)):
                        return False
    return True


# ---------------------------------------------------------------------------------------------
# the correct core passes, the broken variants fail
# ---------------------------------------------------------------------------------------------


def core_kl(name):
    def fn(logp, ref_logp, old_logp):
        return core.kl_estimate(name, logp, ref_logp, old_logp)

    return fn


@pytest.mark.parametrize(
    "name, target",
    [("k1", "zero"), ("k2", "KL(pi||ref)"), ("k3", "KL(ref||pi)"), ("k3_is", "KL(pi||ref)")],
)
def test_core_kl_passes_direction_and_parity(name, target):
    """Each core estimator has the documented gradient direction and the oracle's derivative."""
    assert kl_direction_ok(core_kl(name), target)
    assert kl_gradient_parity_ok(core_kl(name), name)


def test_detached_k3_is_caught():
    """A k3 that detaches logp keeps its value but fails both gradient checks."""
    logp = torch.tensor([-1.0, -2.0], dtype=F64)
    ref_logp = torch.tensor([-1.5, -0.5], dtype=F64)
    assert torch.equal(k3_detached(logp, ref_logp), core.kl_k3(logp, ref_logp))  # same value
    assert not kl_direction_ok(k3_detached, "KL(ref||pi)")
    assert not kl_gradient_parity_ok(k3_detached, "k3")


def test_wrong_direction_is_caught():
    """The direction check tells the two KL directions apart (k3 is not KL(pi||ref))."""
    assert not kl_direction_ok(core_kl("k3"), "KL(pi||ref)")
    assert not kl_direction_ok(core_kl("k2"), "KL(ref||pi)")


def test_core_groups_without_signal_give_zero():
    """The core gives exact zeros to single-sample and all-equal groups, for every setting."""
    for scale in core.SCALES:
        for stats_over in core.STATS_OVER:
            def adv_fn(rewards, mask, group_size, scale=scale, stats_over=stats_over):
                return core.group_advantages(rewards, mask, group_size, gamma=0.9, scale=scale,
                                             stats_over=stats_over)

            if stats_over == "sequences":  # with "steps" a single sample's steps are a group
                assert size_one_groups_give_zero(adv_fn)
            assert all_equal_groups_give_zero(adv_fn)


@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")
def test_naive_std_of_one_sample_is_caught():
    """torch.std of a single value is NaN: the naive advantage fails the size-1 check."""
    assert not size_one_groups_give_zero(naive_group_advantages)
    assert all_equal_groups_give_zero(naive_group_advantages)  # eps rescues this case


def test_core_and_plain_loop_returns_pass_parity():
    """The core and a correct plain loop both match the oracle."""
    assert returns_parity_ok(core.discounted_returns)
    assert returns_parity_ok(loop_returns)


@pytest.mark.parametrize("mistake", ["discount-reward", "shift"])
def test_off_by_one_discount_is_caught(mistake):
    """Discounting the own reward, or shifting returns by one step, fails parity."""
    assert not returns_parity_ok(lambda r, m, g: loop_returns(r, m, g, mistake=mistake))


def test_outcome_advantages_use_the_outcome_not_the_position():
    """Statistics over sequences with gamma < 1: the core (and the oracle) give the discounted
    normalised outcome at every token; the old first-return variant is caught."""
    assert outcome_advantages_ok(core.group_advantages)

    def oracle_fn(rewards, mask, group_size, **kw):
        ragged = gs.to_groups(gs.unpad(rewards, mask), group_size)
        nested = ref.group_advantages(ragged, **kw)
        flat = [s for group in nested for s in group]
        out, _ = gs.pad(flat, rewards.shape[1], F64)
        return out

    assert outcome_advantages_ok(oracle_fn)
    assert not outcome_advantages_ok(advantages_of_first_return)


def test_dr_grpo_normaliser_is_a_constant():
    """Dr. GRPO's loss divides by rows x a constant max_len; the old per-batch padded width
    and the count of non-empty rows only are caught."""
    assert dr_grpo_normaliser_ok(core.agg_loss)
    assert not dr_grpo_normaliser_ok(agg_dr_grpo_by_padded_width)
