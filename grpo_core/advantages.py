"""Group-relative advantages (plan item 5) of discounted rewards (plan item 3).

Groups are contiguous rows: group ``b`` holds rows ``b*G .. b*G + G - 1`` of the (N, T)
batch, ``N = B * G``. The advantages take the *rewards* (not the returns): with
``stats_over="sequences"`` the group statistics are those of each sample's outcome, which the
discounted returns no longer hold once ``gamma < 1``.
"""

from __future__ import annotations

import torch

from ._checks import as_mask, check_2d, check_choice, check_finite, check_range, check_same_shape
from .returns import discounted_returns

SCALES = ("group", "batch", "none")
STATS_OVER = ("steps", "sequences")


def group_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    gamma: float,
    scale: str,
    stats_over: str,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Group-relative advantage of every valid step.

    Shapes: rewards (N, T), mask (N, T) of 0/1, N = B * group_size -> advantages (N, T).

    With ``G_t`` the discounted return (``discounted_returns``), ``m``/``s`` a group's mean and
    std of its pooled values and ``s' = s + eps``:

    - ``stats_over="steps"`` (the CartPole GRPO of the plan, item 5): the pool is every valid
      ``G_t`` of every sample of the group, and ``A_t = (G_t - m) / s'``.
    - ``stats_over="sequences"`` (GRPO outcome supervision, Shao et al. 2024, sec. 4.1.2): the
      pool is one outcome per sample, the sum of its rewards ``S_i = sum_t r_it`` (samples with
      no valid step are left out). The outcome is normalised where it is scored, at the
      sample's last valid step: the normalised rewards are ``r~_it = (r_it - m [t = last]) / s'``
      and the advantages are their discounted returns,
      ``A_it = (G_it - gamma**k_it * m) / s'`` with ``k_it`` the valid steps after ``t``. With a
      single outcome reward ``R_i`` on the last step this is ``gamma**k_it (R_i - m) / s'``:
      every token gets the sample's normalised outcome, discounted by its distance to the end
      (gamma = 1: the paper's ``A_it = r~_i``). With per-step rewards and gamma = 1 it is the
      reward-to-go minus the group's mean outcome, a baseline constant over the steps
      (REINFORCE with a baseline, Williams 1992).
    - ``scale="group"``: ``s`` is the std of the group's pool; ``"batch"``: of all pools of the
      batch together, around the batch mean, the mean ``m`` staying per group (TRL
      ``scale_rewards="batch"``); ``"none"``: ``s' = 1`` (Dr. GRPO, Liu et al. 2025).
    - std uses Bessel's correction (divides by n - 1), as ``torch.std`` and TRL do; ``eps``
      is added to the std, outside the square root.
    - A group whose pool has fewer than two values, or all values equal, has no signal: every
      one of its steps gets exactly 0, for every gamma (never NaN, never eps-amplified noise).
    - Masked positions of the output are exactly 0; junk under the mask is never read.
    """
    check_same_shape(rewards=rewards, mask=mask)
    check_2d("rewards", rewards)
    check_choice("scale", scale, SCALES)
    check_choice("stats_over", stats_over, STATS_OVER)
    check_range("gamma", float(gamma), 0.0, 1.0)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"batch of {rewards.shape[0]} sequences is not divisible by "
                         f"group_size={group_size}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    m = as_mask(mask, rewards)
    check_finite("rewards", rewards, m)
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    if stats_over == "steps":
        g = discounted_returns(r, m, gamma)
        mean, denom, no_signal = _group_stats(g.reshape(-1, group_size * r.shape[1]),
                                              m.reshape(-1, group_size * r.shape[1]), scale, eps)
        adv = (g.view(-1, group_size, r.shape[1]) - mean[:, None, None]) / denom[:, None, None]
    else:
        outcome = r.sum(1).view(-1, group_size)
        mean, denom, no_signal = _group_stats(outcome, m.any(1).view(-1, group_size), scale, eps)
        last = _last_valid(m)
        shift = torch.zeros_like(r).scatter(1, last[:, None], mean.repeat_interleave(group_size)[:, None])
        normed = (r - shift * m.to(r.dtype)).view(-1, group_size, r.shape[1]) / denom[:, None, None]
        adv = discounted_returns(normed.reshape_as(r), m, gamma).view_as(normed)
    adv = torch.where(no_signal[:, None, None], torch.zeros_like(adv), adv)
    return adv.reshape_as(r) * m.to(r.dtype)


def _group_stats(vals: torch.Tensor, valid: torch.Tensor, scale: str, eps: float):
    """Per group: the mean, the denominator ``std + eps`` (1 for "none") and "no signal".

    Shapes: vals, valid (B, K) -> mean (B,), denom (B,), no_signal (B,) bool.
    """
    count = valid.sum(1)
    v = torch.where(valid, vals, torch.zeros_like(vals))
    mean = v.sum(1) / count.clamp(min=1)
    big = torch.finfo(vals.dtype).max
    spread = torch.where(valid, vals, -big).amax(1) - torch.where(valid, vals, big).amin(1)
    no_signal = (count < 2) | (spread == 0)
    if scale == "group":
        centered = (vals - mean[:, None]) * valid
        denom = torch.sqrt((centered**2).sum(1) / (count - 1).clamp(min=1)) + eps
    elif scale == "batch":
        total = count.sum()
        batch_centered = (vals - v.sum() / total.clamp(min=1)) * valid
        std = torch.sqrt((batch_centered**2).sum() / (total - 1).clamp(min=1))
        denom = (std + eps).expand_as(mean)
    else:
        denom = torch.ones_like(mean)
    # a no-signal group's output is replaced by 0; keep its arithmetic finite meanwhile
    denom = torch.where(no_signal | (denom == 0), torch.ones_like(denom), denom)
    return mean, denom, no_signal


def _last_valid(m: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid step (0 for a row with none). Shapes: (N, T) -> (N,)."""
    t_len = m.shape[1]
    idx = torch.arange(t_len, device=m.device).expand_as(m)
    return torch.where(m, idx, torch.zeros_like(idx)).amax(1)
