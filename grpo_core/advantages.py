"""Group-relative advantages (plan item 5).

Groups are contiguous rows: group ``b`` holds rows ``b*G .. b*G + G - 1`` of the (N, T)
batch, ``N = B * G``.
"""

from __future__ import annotations

import torch

from ._checks import as_mask, check_2d, check_choice, check_finite, check_same_shape

SCALES = ("group", "batch", "none")
STATS_OVER = ("steps", "sequences")


def group_advantages(
    returns: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    scale: str,
    stats_over: str,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Advantage ``A = (G - mean_g) / (std + eps)`` of every valid step.

    Shapes: returns (N, T), mask (N, T) of 0/1, N = B * group_size -> advantages (N, T).

    - ``stats_over="steps"``: a group's statistics pool every valid step of every sample
      in the group (the CartPole GRPO). ``"sequences"``: one value per sample, its return at
      its first valid step ``G_0`` (standard GRPO); samples with no valid step are left out.
      Either way every valid step ``t`` gets ``(G_t - mean_g) / (std + eps)``.
    - ``scale="group"``: std of the group's pooled values; ``"batch"``: std of all pooled
      values of the batch (Dr. GRPO, TRL ``scale_rewards="batch"``), the mean staying per
      group; ``"none"``: ``G - mean_g`` only.
    - std uses Bessel's correction (divides by n - 1), as ``torch.std`` and TRL do; ``eps``
      is added to the std, outside the square root.
    - A group with fewer than two pooled values, or whose pooled values are all equal, has
      no signal: its advantages are exactly 0 (never NaN, never eps-amplified noise).
    - Masked positions of the output are exactly 0.
    """
    check_same_shape(returns=returns, mask=mask)
    check_2d("returns", returns)
    check_choice("scale", scale, SCALES)
    check_choice("stats_over", stats_over, STATS_OVER)
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n, t_len = returns.shape
    if n % group_size != 0:
        raise ValueError(f"batch of {n} sequences is not divisible by group_size={group_size}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    m = as_mask(mask, returns)
    check_finite("returns", returns, m)
    g = torch.where(m, returns, torch.zeros_like(returns))
    vals, valid = _pooled_values(g, m, group_size, stats_over)  # (B, K) each
    count = valid.sum(1)
    mean = (vals * valid).sum(1) / count.clamp(min=1)
    centered = (vals - mean[:, None]) * valid
    big = torch.finfo(vals.dtype).max
    spread = torch.where(valid, vals, -big).amax(1) - torch.where(valid, vals, big).amin(1)
    no_signal = (count < 2) | (spread == 0)
    if scale == "group":
        std = torch.sqrt((centered**2).sum(1) / (count - 1).clamp(min=1))
    elif scale == "batch":
        total = count.sum()
        batch_centered = (vals - (vals * valid).sum() / total.clamp(min=1)) * valid
        std = torch.sqrt((batch_centered**2).sum() / (total - 1).clamp(min=1)).expand_as(mean)
    else:
        std = None
    per_group = (g.view(-1, group_size, t_len) - mean[:, None, None])
    if std is not None:
        per_group = per_group / (std[:, None, None] + eps)
    per_group = torch.where(no_signal[:, None, None], torch.zeros_like(per_group), per_group)
    return per_group.reshape(n, t_len) * m.to(g.dtype)


def _pooled_values(g: torch.Tensor, m: torch.Tensor, group_size: int, stats_over: str):
    """The values a group's statistics pool, and which of them are valid.

    Shapes: g, m (N, T) -> vals, valid (B, K) with K = G*T ("steps") or G ("sequences").
    """
    n, t_len = g.shape
    if stats_over == "steps":
        return g.reshape(n // group_size, -1), m.reshape(n // group_size, -1)
    first = m.to(torch.int64).argmax(1)  # first valid step (0 when the row is empty)
    g0 = g.gather(1, first[:, None]).squeeze(1)
    return g0.view(-1, group_size), m.any(1).view(-1, group_size)
