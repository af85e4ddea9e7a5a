"""Bad input stops with a ValueError that names the offending argument and its value."""

from __future__ import annotations

import math
import re

import pytest
import torch

import grpo_core as core

N, T = 4, 3


def ones(*shape):
    return torch.ones(*shape, dtype=torch.float64)


def logps(*shape):
    return torch.full(shape, -1.0, dtype=torch.float64)


def raises(*fragments):
    """pytest.raises(ValueError) whose message contains every fragment, in order."""
    return pytest.raises(ValueError, match=".*".join(re.escape(f) for f in fragments))


def loss_kwargs(**over):
    kw = dict(eps_low=0.2, eps_high=0.2, agg="token-mean")
    kw.update(over)
    return kw


def grpo_kwargs(**over):
    kw = dict(entropy=ones(N, T), beta=0.1, ent_coef=0.01, kl_estimator="k3", eps_low=0.2,
              eps_high=0.2, agg="token-mean")
    kw.update(over)
    return kw


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


def test_returns_shape_mismatch():
    """rewards and mask must share a shape; both shapes appear in the message."""
    with raises("mask", "(4, 4)", "rewards", "(4, 3)"):
        core.discounted_returns(ones(N, T), ones(N, T + 1), 0.9)


def test_advantages_shape_mismatch():
    """rewards and mask must share a shape."""
    with raises("mask", "(3, 3)", "rewards", "(4, 3)"):
        core.group_advantages(ones(N, T), ones(N - 1, T), 2, gamma=1.0, scale="group", stats_over="steps")


def test_agg_loss_shape_mismatch():
    """values and mask must share a shape."""
    with raises("mask", "(4, 2)", "values", "(4, 3)"):
        core.agg_loss(ones(N, T), ones(N, T - 1), agg="token-mean")


@pytest.mark.parametrize("bad", ["old_logp", "adv", "mask"])
def test_policy_loss_shape_mismatch(bad):
    """Every per-token input of the policy loss must have logp's shape."""
    args = dict(logp=logps(N, T), old_logp=logps(N, T), adv=ones(N, T), mask=ones(N, T))
    args[bad] = torch.ones(N, T + 2, dtype=torch.float64)
    with raises(bad, "(4, 5)"):
        core.clipped_policy_loss(**args, **loss_kwargs())


def test_grpo_loss_ref_logp_shape_mismatch():
    """ref_logp must have logp's shape."""
    with raises("ref_logp", "(5, 3)"):
        core.grpo_loss(logps(N, T), logps(N, T), logps(N + 1, T), ones(N, T), ones(N, T),
                       **grpo_kwargs())


def test_grpo_loss_entropy_shape_mismatch_is_rejected():
    """A wrongly shaped entropy is rejected (today the message calls it "values")."""
    with raises("(5, 3)"):
        core.grpo_loss(logps(N, T), logps(N, T), logps(N, T), ones(N, T), ones(N, T),
                       **grpo_kwargs(entropy=ones(N + 1, T)))


def test_grpo_loss_entropy_shape_mismatch_names_entropy():
    """The message should name entropy, the argument the caller passed."""
    with raises("entropy", "(5, 3)"):
        core.grpo_loss(logps(N, T), logps(N, T), logps(N, T), ones(N, T), ones(N, T),
                       **grpo_kwargs(entropy=ones(N + 1, T)))


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_shape_mismatch(name):
    """logp and ref_logp must share a shape."""
    with raises("ref_logp", "(2,)", "logp", "(3,)"):
        core.kl_estimate(name, logps(3), logps(2))


def test_kl_k3_is_shape_mismatch():
    """old_logp must have logp's shape."""
    with raises("old_logp", "(2,)"):
        core.kl_k3_is(logps(3), logps(3), logps(2))


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_mask_must_be_zero_or_one(value):
    """A mask entry other than 0/1 is named with its value, in every function that takes one."""
    mask = ones(N, T)
    mask[1, 2] = value
    calls = [
        lambda: core.discounted_returns(ones(N, T), mask, 0.9),
        lambda: core.group_advantages(ones(N, T), mask, 2, gamma=1.0, scale="group", stats_over="steps"),
        lambda: core.agg_loss(ones(N, T), mask, agg="token-mean"),
        lambda: core.clipped_policy_loss(logps(N, T), logps(N, T), ones(N, T), mask,
                                         **loss_kwargs()),
        lambda: core.grpo_loss(logps(N, T), logps(N, T), logps(N, T), ones(N, T), mask,
                               **grpo_kwargs()),
    ]
    for call in calls:
        with raises("mask", repr(value)):
            call()


# ---------------------------------------------------------------------------------------------
# scalar arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [-0.1, 1.5, math.nan, -math.inf])
def test_gamma_outside_unit_interval(gamma):
    """gamma must lie in [0, 1]; NaN and -inf are rejected too."""
    with raises("gamma", repr(gamma)):
        core.discounted_returns(ones(N, T), ones(N, T), gamma)


@pytest.mark.parametrize("group_size", [0, -2])
def test_group_size_must_be_positive(group_size):
    """group_size must be a positive int."""
    with raises("group_size", repr(group_size)):
        core.group_advantages(ones(N, T), ones(N, T), group_size, gamma=1.0, scale="group", stats_over="steps")


def test_batch_not_divisible_by_group_size():
    """5 sequences cannot form groups of 2: both numbers appear in the message."""
    with raises("5", "group_size=2"):
        core.group_advantages(ones(5, T), ones(5, T), 2, gamma=1.0, scale="group", stats_over="steps")


@pytest.mark.parametrize("scale", ["std", "Group", ""])
def test_unknown_scale(scale):
    """scale must be one of group, batch, none."""
    with raises(f"scale={scale!r}"):
        core.group_advantages(ones(N, T), ones(N, T), 2, gamma=1.0, scale=scale, stats_over="steps")


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_advantages_gamma_out_of_range(gamma):
    """gamma must lie in [0, 1]; the message names it."""
    with raises("gamma="):
        core.group_advantages(ones(N, T), ones(N, T), 2, gamma=gamma, scale="group", stats_over="sequences")


@pytest.mark.parametrize("stats_over", ["tokens", "seq"])
def test_unknown_stats_over(stats_over):
    """stats_over must be one of steps, sequences."""
    with raises(f"stats_over={stats_over!r}"):
        core.group_advantages(ones(N, T), ones(N, T), 2, gamma=1.0, scale="group", stats_over=stats_over)


@pytest.mark.parametrize("agg", ["mean", "seq-mean", "token-sum"])
def test_unknown_agg(agg):
    """Every function that aggregates rejects an unknown agg by name."""
    calls = [
        lambda: core.agg_loss(ones(N, T), ones(N, T), agg=agg),
        lambda: core.clipped_policy_loss(logps(N, T), logps(N, T), ones(N, T), ones(N, T),
                                         **loss_kwargs(agg=agg)),
        lambda: core.grpo_loss(logps(N, T), logps(N, T), logps(N, T), ones(N, T), ones(N, T),
                               **grpo_kwargs(agg=agg)),
    ]
    for call in calls:
        with raises(f"agg={agg!r}"):
            call()


@pytest.mark.parametrize("name", ["k4", "K3", "kl"])
def test_unknown_kl_estimator(name):
    """kl_estimate and grpo_loss reject an unknown estimator by name."""
    with raises(f"kl_estimator={name!r}"):
        core.kl_estimate(name, logps(3), logps(3), logps(3))
    with raises(f"kl_estimator={name!r}"):
        core.grpo_loss(logps(N, T), logps(N, T), logps(N, T), ones(N, T), ones(N, T),
                       **grpo_kwargs(kl_estimator=name))


def test_unknown_kl_estimator_without_reference():
    """A misspelt estimator is an error even when beta = 0 and no reference is given."""
    with raises("kl_estimator='k4'"):
        core.grpo_loss(logps(N, T), logps(N, T), None, ones(N, T), ones(N, T),
                       **grpo_kwargs(beta=0.0, kl_estimator="k4"))


# ---------------------------------------------------------------------------------------------
# non-finite data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards(value):
    """A non-finite reward at a valid step is rejected (named, with its value)..."""
    rewards = ones(N, T)
    rewards[2, 1] = value
    with raises("rewards", repr(value)):
        core.discounted_returns(rewards, ones(N, T), 0.9)
    with raises("rewards", repr(value)):
        core.group_advantages(rewards, ones(N, T), 2, gamma=1.0, scale="group", stats_over="steps")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_padding_is_fine(value):
    """...but the same value under the mask is padding, and is ignored."""
    rewards = ones(N, T)
    rewards[2, 1] = value
    mask = ones(N, T)
    mask[2, 1] = 0
    out = core.discounted_returns(rewards, mask, 0.9)
    assert bool(torch.isfinite(out).all())


def test_dr_grpo_needs_a_max_len_at_least_the_longest_sequence():
    """Dr. GRPO divides by a constant: missing, or shorter than a valid sequence, is refused."""
    values, mask = ones(2, 4), ones(2, 4)
    with raises("needs max_len"):
        core.agg_loss(values, mask, agg="seq-mean-token-sum-norm")
    with raises("4 valid tokens", "max_len=3"):
        core.agg_loss(values, mask, agg="seq-mean-token-sum-norm", max_len=3)
    assert float(core.agg_loss(values, mask, agg="seq-mean-token-sum-norm", max_len=4)) == 1.0
