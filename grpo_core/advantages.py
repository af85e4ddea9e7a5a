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
BASELINES = ("mean", "leave-one-out")


def group_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    gamma: float,
    scale: str,
    stats_over: str,
    eps: float = 1e-8,
    scored: torch.Tensor | None = None,
    baseline: str = "mean",
) -> torch.Tensor:
    """Group-relative advantage of every valid step.

    Shapes: rewards (N, T), mask (N, T) of 0/1, scored (N, T) of 0/1 or None, N = B * group_size
    -> advantages (N, T).

    With ``m``/``s`` a group's mean and std of its pooled values and ``s' = s + eps``:

    - ``stats_over="steps"`` (the CartPole GRPO of the plan, item 5): the pool is every valid
      discounted return ``G_t`` (``discounted_returns``) of every sample of the group, and
      ``A_t = (G_t - m) / s'``.
    - ``stats_over="sequences"``: GRPO's supervision (Shao et al. 2024, DeepSeekMath), with a
      discount. The pool is the rewards at the *scored* steps of the group's samples: by
      default each sample's last valid step (outcome supervision, sec. 4.1.2), or the steps
      marked in ``scored`` (process supervision, sec. 4.1.3: the ends of reasoning steps). Each
      scored reward is normalised, ``r~ = (r - m) / s'``, and a token's advantage is the
      discounted sum of the normalised rewards from it onwards, ``A_t = sum_{k >= t} gamma**j
      r~_k`` (``j`` valid steps from t to k; gamma = 1 is the paper's sum). With one outcome
      reward ``R_i`` on the last of ``L_i`` tokens: ``A_t = gamma**(L_i - 1 - t) (R_i - m) / s'``.
      A reward at a valid step that is not scored is refused (ValueError naming it): per-step
      rewards need ``scored``, or ``"steps"``.
    - ``scale="group"``: ``s`` is the std of the group's pool; ``"batch"``: of all pools of the
      batch together, around the batch mean, the mean ``m`` staying per group (TRL
      ``scale_rewards="batch"``); ``"none"``: ``s' = 1`` (Dr. GRPO, Liu et al. 2025).
    - std uses Bessel's correction (divides by n - 1), as ``torch.std`` and TRL do; ``eps``
      is added to the std, outside the square root.
    - ``baseline="leave-one-out"`` (RLOO: Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
      Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics"): each pooled value ``x`` is
      measured against the mean of the *other* ``n - 1`` values of its pool, ``x - (S - x)/(n - 1)
      = n/(n - 1) (x - m)``, and divided by the same ``s'`` as above (the group's std of the whole
      pool, not a leave-one-out std). So it is the mean baseline's advantage times ``n/(n - 1)``;
      with ``scale="group"`` each normalised pooled value is bounded: ``|x - m| <= (n - 1)/sqrt(n)
      s`` (Samuelson's inequality) gives ``|x - b| / s' <= sqrt(n)``, whatever the spread (an
      outcome advantage is one such value; under process supervision a token sums several).
      A std of the other n - 1 values alone can be 0 while x differs: advantages of 1/eps
      (NeMo-RL issue 1518).
    - A group whose pool has fewer than two values, or all values equal, has no signal: every
      one of its steps gets exactly 0, for every gamma (never NaN, never eps-amplified noise).
      A sample with no valid step is left out of its group's pool.
    - Masked positions of the output are exactly 0; junk under the mask is never read.
    """
    check_same_shape(rewards=rewards, mask=mask, scored=scored)
    check_2d("rewards", rewards)
    check_choice("scale", scale, SCALES)
    check_choice("stats_over", stats_over, STATS_OVER)
    check_choice("baseline", baseline, BASELINES)
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
    n, t_len = r.shape
    if stats_over == "steps":
        g = discounted_returns(r, m, gamma)
        mean, denom, no_signal = _group_stats(g.reshape(-1, group_size * t_len),
                                              m.reshape(-1, group_size * t_len), scale, eps, baseline)
        adv = (g.view(-1, group_size, t_len) - mean[:, None, None]) / denom[:, None, None]
    else:
        p = _scored_steps(r, m, scored)
        mean, denom, no_signal = _group_stats(r.reshape(-1, group_size * t_len),
                                              p.reshape(-1, group_size * t_len), scale, eps, baseline)
        normed = (r.view(-1, group_size, t_len) - mean[:, None, None]) / denom[:, None, None]
        normed = normed.reshape(n, t_len) * p.to(r.dtype)
        adv = discounted_returns(normed, m, gamma).view(-1, group_size, t_len)
    adv = torch.where(no_signal[:, None, None], torch.zeros_like(adv), adv)
    return adv.reshape(n, t_len) * m.to(r.dtype)


def _scored_steps(r: torch.Tensor, m: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
    """The scored valid steps (default: each row's last valid step); refuses a reward at a valid
    step that is not scored. Shapes: (N, T) -> (N, T) bool."""
    if scored is None:
        p = torch.zeros_like(m)
        rows = m.any(1)
        p[rows, _last_valid(m)[rows]] = True
    else:
        p = as_mask(scored, r, "scored") & m
    stray = (r != 0) & m & ~p
    if bool(stray.any()):
        i, t = (int(x) for x in stray.nonzero()[0])
        where = "is not the row's last valid step" if scored is None else "is not marked in scored"
        raise ValueError(
            f"stats_over='sequences' normalises the rewards of scored steps only, but row {i} has "
            f"reward {float(r[i, t])!r} at step {t}, which {where}; per-step rewards need a scored "
            "mask (process supervision) or stats_over='steps'")
    return p


def _group_stats(vals: torch.Tensor, valid: torch.Tensor, scale: str, eps: float, baseline: str = "mean"):
    """Per group: the mean, the denominator ``std + eps`` (1 for "none") and "no signal"; with a
    leave-one-out baseline the denominator is divided by ``n/(n - 1)`` (the advantage
    ``n/(n - 1) (x - m) / s'``), n the group's pooled values.

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
    if baseline == "leave-one-out":  # n/(n - 1) (x - m): the mean of the other n - 1 values as baseline
        denom = denom * (count - 1).clamp(min=1) / count.clamp(min=1)
    # a no-signal group's output is replaced by 0; keep its arithmetic finite meanwhile
    denom = torch.where(no_signal | (denom == 0), torch.ones_like(denom), denom)
    return mean, denom, no_signal


def _last_valid(m: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid step (0 for a row with none). Shapes: (N, T) -> (N,)."""
    t_len = m.shape[1]
    idx = torch.arange(t_len, device=m.device).expand_as(m)
    return torch.where(m, idx, torch.zeros_like(idx)).amax(1)
