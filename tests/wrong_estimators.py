"""Deliberately wrong estimators and losses (and four correct ones) for the kit's own tests.

Each wrong estimator declares the claims a correct estimator of its kind would make, so the
kit must catch the bug by measurement. ``tests/test_kit_cli.py`` runs every one through
``grpo-harness check-estimator tests/wrong_estimators.py:NAME`` and asserts which row fails.

Not a test module (no ``test_`` prefix): pytest does not collect it.
"""

from __future__ import annotations

import torch

from grpo_core.testing.kit import declares

# ---------------------------------------------------------------------------------------------
# KL estimators: fn(logp, ref_logp) -> per-token tensor
# ---------------------------------------------------------------------------------------------


@declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")
def correct_k3(logp, ref_logp):
    d = ref_logp - logp
    return torch.expm1(d) - d


@declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")
def kl_detached(logp, ref_logp):
    """k3 computed on ``logp.detach()``: right values, no gradient reaches the policy."""
    d = ref_logp - logp.detach()
    return torch.expm1(d) - d


@declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")
def kl_wrong_sign(logp, ref_logp):
    """Negated k3: estimates -KL and pushes the policy away from the reference."""
    d = ref_logp - logp
    return -(torch.expm1(d) - d)


@declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")
def kl_k3_inverted(logp, ref_logp):
    """k3 with the ratio inverted, ``r = pi/ref`` instead of ``ref/pi``: biased."""
    log_r = logp - ref_logp
    return torch.expm1(log_r) - log_r


# ---------------------------------------------------------------------------------------------
# Advantage estimators: fn(scores (B, G)) -> (B, G)
# ---------------------------------------------------------------------------------------------


@declares(std_scaled=True, bessel=True)
def correct_adv(scores):
    """(s - mean) / (Bessel std + eps) per group; 0 for a group of one or of ties."""
    n = scores.shape[-1]
    centered = scores - scores.mean(-1, keepdim=True)
    if n < 2:
        return torch.zeros_like(scores)
    std = centered.pow(2).sum(-1, keepdim=True).div(n - 1).sqrt()
    tied = (scores == scores[..., :1]).all(-1, keepdim=True)
    out = centered / (std + 1e-8)
    return torch.where(tied, torch.zeros_like(out), out)


@declares(std_scaled=True, bessel=True)
def adv_biased_std_one_sample(scores):
    """The textbook one-liner: torch.std of a one-sample group is NaN (n - 1 = 0), and so is
    its advantage. (It also leaves rounding noise / eps on all-equal groups, not exact 0.)"""
    centered = scores - scores.mean(-1, keepdim=True)
    return centered / (scores.std(-1, keepdim=True) + 1e-8)


@declares(std_scaled=True, bessel=True)
def adv_mean_only_claims_std(scores):
    """Claims std scaling but only subtracts the group mean (ties handled correctly)."""
    centered = scores - scores.mean(-1, keepdim=True)
    tied = scores.amax(-1, keepdim=True) == scores.amin(-1, keepdim=True)
    return torch.where(tied, torch.zeros_like(centered), centered)


@declares(std_scaled=True, bessel=True)
def adv_leak_across_groups(scores):
    """correct_adv with the batch mean in place of the group mean: groups leak into each other."""
    n = scores.shape[-1]
    if n < 2:
        return torch.zeros_like(scores)
    centered = scores - scores.mean()
    std = (scores - scores.mean(-1, keepdim=True)).pow(2).sum(-1, keepdim=True).div(n - 1).sqrt()
    tied = (scores == scores[..., :1]).all(-1, keepdim=True)
    out = centered / (std + 1e-8)
    return torch.where(tied, torch.zeros_like(out), out)


@declares(std_scaled=True, bessel=True, eps=1e-6, leave_one_out=True, singleton="unsupported")
def adv_loo_std_of_others(scores):
    """RLOO whose denominator is the std of the *other* G - 1 scores (NeMo-RL issue 1518): where
    those are equal it is 0, and the one differing sample gets (its distance) / 1e-6."""
    g = scores.shape[-1]
    out = torch.empty_like(scores)
    for i in range(g):
        rest = torch.cat([scores[..., :i], scores[..., i + 1:]], -1)
        mean = rest.mean(-1)
        std = ((rest - mean[..., None]) ** 2).sum(-1).div(max(g - 2, 1)).sqrt()
        out[..., i] = (scores[..., i] - mean) / (std + 1e-6)
    return out


# ---------------------------------------------------------------------------------------------
# Returns: fn(rewards (N, T), mask (N, T), gamma) -> (N, T)
# ---------------------------------------------------------------------------------------------


def correct_returns(rewards, mask, gamma):
    """Backward recursion over valid steps (right padding), G = 0 after the last one."""
    valid = mask != 0
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        out[:, t] = running
    return out * valid.to(r.dtype)


def returns_off_by_one(rewards, mask, gamma):
    """Discount applied one step late: ``G_t = r_t + r_(t+1) + gamma r_(t+2) + ...``."""
    valid = mask != 0
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # discounted return from t+1 on
    for t in range(r.shape[1] - 1, -1, -1):
        out[:, t] = r[:, t] + running
        running = torch.where(valid[:, t], gamma * running + r[:, t], running)
    return out * valid.to(r.dtype)


def returns_padding_leak(rewards, mask, gamma):
    """Runs the recursion over padded steps too, so padded rewards flow into valid returns."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


# ---------------------------------------------------------------------------------------------
# Policy losses: fn(logp, old_logp, adv, mask) -> scalar, all declaring a correct loss's claims
# ---------------------------------------------------------------------------------------------


def _ppo_tokens(ratio, adv, low=0.2, high=0.28):
    return -torch.minimum(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)


def _token_mean(tok, mask):
    return (tok * mask).sum() / mask.sum().clamp(min=1)


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None)
def correct_loss(logp, old_logp, adv, mask):
    """PPO clip-higher, token-mean, the log-ratio bounded at 20 before exp."""
    return _token_mean(_ppo_tokens(torch.exp((logp - old_logp).clamp(max=20.0)), adv), mask)


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None)
def loss_unbounded_ratio(logp, old_logp, adv, mask):
    """The core's clipped_policy_loss before the bound: exp of the raw log-ratio overflows in
    float32 at a log-ratio near 100 (inf loss with A < 0, NaN gradient behind the clip)."""
    return _token_mean(_ppo_tokens(torch.exp(logp - old_logp), adv), mask)


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None)
def loss_clip_leaks_gradient(logp, old_logp, adv, mask):
    """Clipping written as a straight-through estimator: the clipped value, but the unclipped
    gradient, so nothing is ever clipped for the optimizer."""
    ratio = torch.exp((logp - old_logp).clamp(max=20.0))
    clipped = ratio + (ratio.clamp(0.8, 1.28) - ratio).detach()
    return _token_mean(-torch.minimum(ratio * adv, clipped * adv), mask)


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None)
def loss_mean_over_padding(logp, old_logp, adv, mask):
    """Masks the tokens but averages over every position, padding included."""
    ratio = torch.exp((logp - old_logp).clamp(max=20.0))
    return (_ppo_tokens(ratio, adv) * mask).mean()


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None)
def loss_sign_flipped(logp, old_logp, adv, mask):
    """Returns the surrogate objective instead of the loss: gradient ascent on -J."""
    return -_token_mean(_ppo_tokens(torch.exp((logp - old_logp).clamp(max=20.0)), adv), mask)


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None)
def loss_clip_sides_swapped(logp, old_logp, adv, mask):
    """eps_low and eps_high swapped: the ratio is clipped to [1 - 0.28, 1 + 0.2]."""
    ratio = torch.exp((logp - old_logp).clamp(max=20.0))
    return _token_mean(_ppo_tokens(ratio, adv, low=0.28, high=0.2), mask)


@declares(eps_low=0.1, eps_high=0.1, agg="seq-mean-token-mean", clip_ratio_c=None,
          ratio_level="sequence", policy_loss="ppo")
def gspo_wrong_axis(logp, old_logp, adv, mask):
    """GSPO with the (N,) sequence log-ratio broadcast against (N, T) without a trailing axis
    (EasyR1 issue 596): token t of every response takes response t's ratio. It runs only when
    N == T; there it gives a loss without complaint."""
    n = mask.sum(-1).clamp(min=1)
    log_s = ((logp - old_logp) * mask).sum(-1) / n  # (N,)
    s = torch.exp(log_s).expand_as(logp)  # (N,) -> (1, N) -> (N, T): the wrong axis
    tok = -torch.minimum(s * adv, s.clamp(0.9, 1.1) * adv)
    rows = mask.sum(-1) > 0
    return ((tok * mask).sum(-1) / n)[rows].sum() / rows.sum().clamp(min=1)


@declares(eps_high=0.2, agg="token-mean", clip_ratio_c=None, ratio_level="token",
          policy_loss="cispo")
def cispo_undetached(logp, old_logp, adv, mask):
    """CISPO whose weight min(ratio, 1.2) is not detached: below the bound the weight's own
    gradient adds -ratio A logp, so a token's gradient is -ratio A (1 + logp), not -ratio A."""
    weight = torch.exp((logp - old_logp).clamp(max=20.0)).clamp(max=1.2)
    return _token_mean(-weight * adv * logp, mask)


# ---------------------------------------------------------------------------------------------
# Usage-error targets for the CLI tests
# ---------------------------------------------------------------------------------------------

def kl_wrong_signature(logp):
    """Takes one argument: not a KL estimator."""
    return logp


def returns_raises(rewards, mask, gamma):
    """Raises on every call."""
    raise RuntimeError("not implemented")
