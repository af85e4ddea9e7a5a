"""Loss aggregation, the clipped policy loss, the entropy bonus and the combined GRPO loss.

Every loss returns ``(loss, stats)``: ``loss`` a scalar tensor with gradient, ``stats`` a dict
of detached Python floats for logging, so metrics never leak into the arithmetic.

Shapes: every per-token argument is (N, T) with ``mask`` (N, T) of 0/1.
"""

from __future__ import annotations

import torch

from ._checks import as_mask, check_choice, check_same_shape
from .kl import KL_ESTIMATORS, kl_estimate

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def agg_loss(values: torch.Tensor, mask: torch.Tensor, *, agg: str, max_len: int | None = None):
    """Reduce per-token values to a scalar; the one place where GRPO variants differ.

    Shapes: values (N, T), mask (N, T) -> scalar.

    - ``token-mean``: sum of valid values / number of valid tokens in the batch (DAPO).
    - ``seq-mean-token-mean``: per sequence the mean over its valid tokens, then the mean
      over sequences (original GRPO).
    - ``seq-mean-token-sum``: per sequence the sum over its valid tokens, then the mean.
    - ``seq-mean-token-sum-norm``: per sequence the sum divided by the constant ``max_len``
      (default T), then the mean (Dr. GRPO).
    "Sequences" are those with at least one valid token; an all-masked batch gives 0.
    Masked values never reach the result, not even as NaN (they are replaced by 0 first).
    """
    check_same_shape(values=values, mask=mask)
    check_choice("agg", agg, AGGS)
    m = as_mask(mask, values)
    v = torch.where(m, values, torch.zeros_like(values))
    mf = m.to(v.dtype)
    if agg == "token-mean":
        return v.sum() / mf.sum().clamp(min=1)
    per_seq = v.sum(-1)
    n_tok = mf.sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / n_tok.clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        length = values.shape[-1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"max_len must be positive, got {max_len!r}")
        per_seq = per_seq / length
    has_tok = (n_tok > 0).to(v.dtype)
    return (per_seq * has_tok).sum() / has_tok.sum().clamp(min=1)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    agg: str,
    max_len: int | None = None,
):
    """PPO clipped surrogate with an asymmetric clip range ("clip-higher", DAPO).

    Per token ``rho = exp(logp - old_logp)`` and
    ``loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``, aggregated by
    ``agg``. ``old_logp`` is treated as a constant (detached).

    Shapes: logp, old_logp, adv, mask (N, T) -> scalar, stats.

    stats: ``clip_frac_low`` (share of valid tokens with A < 0 and rho < 1 - eps_low, where
    the clipped branch is taken), ``clip_frac_high`` (A > 0 and rho > 1 + eps_high),
    ``approx_kl`` (token mean of k3 between old and new, ``rho - 1 - log rho``),
    ``ratio_min``, ``ratio_max``.
    """
    check_same_shape(logp=logp, old_logp=old_logp, adv=adv, mask=mask)
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low!r}, {eps_high!r}")
    m = as_mask(mask, logp)
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(m, logp - old_logp.detach(), zero)
    a = torch.where(m, adv.detach(), zero)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    loss = agg_loss(-torch.minimum(unclipped, clipped), m, agg=agg, max_len=max_len)
    with torch.no_grad():
        n_valid = max(int(m.sum()), 1)
        low = m & (a < 0) & (ratio < 1 - eps_low)
        high = m & (a > 0) & (ratio > 1 + eps_high)
        valid_ratio = ratio[m]
        stats = {
            "clip_frac_low": float(low.sum()) / n_valid,
            "clip_frac_high": float(high.sum()) / n_valid,
            "approx_kl": float(torch.where(m, torch.expm1(log_ratio) - log_ratio, zero).sum()) / n_valid,
            "ratio_min": float(valid_ratio.min()) if valid_ratio.numel() else 1.0,
            "ratio_max": float(valid_ratio.max()) if valid_ratio.numel() else 1.0,
        }
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, *, agg: str, max_len: int | None = None):
    """Aggregated per-token entropy (plan item 6); the loss subtracts ``ent_coef`` times it.

    Shapes: entropy (N, T), mask (N, T) -> scalar, stats {"entropy"}.
    """
    value = agg_loss(entropy, mask, agg=agg, max_len=max_len)
    return value, {"entropy": float(value.detach())}


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None,
    beta: float,
    ent_coef: float,
    kl_estimator: str,
    eps_low: float,
    eps_high: float,
    agg: str,
    max_len: int | None = None,
):
    """``loss = policy_loss + beta * agg(kl) - ent_coef * agg(entropy)``.

    The KL term sits in the loss (not in the reward), with the same aggregation as the
    policy loss; ``ref_logp`` is treated as a constant. With ``beta = 0`` the reference is
    not needed (``ref_logp`` may be None); with ``ent_coef = 0`` neither is ``entropy``.

    Shapes: logp, old_logp, ref_logp, adv, mask, entropy (N, T) -> scalar, stats.
    stats: the policy-loss stats plus ``policy_loss``, ``kl``, ``entropy``, ``loss``.
    """
    check_same_shape(logp=logp, old_logp=old_logp, ref_logp=ref_logp, adv=adv, mask=mask,
                     entropy=entropy)
    check_choice("kl_estimator", kl_estimator, tuple(KL_ESTIMATORS))
    pg, stats = clipped_policy_loss(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, agg=agg, max_len=max_len
    )
    loss = pg
    stats["policy_loss"] = float(pg.detach())
    m = as_mask(mask, logp)
    if ref_logp is not None:
        zero = torch.zeros_like(logp)
        kl_tok = kl_estimate(
            kl_estimator,
            torch.where(m, logp, zero),
            torch.where(m, ref_logp.detach(), zero),
            torch.where(m, old_logp.detach(), zero),
        )
        kl = agg_loss(kl_tok, m, agg=agg, max_len=max_len)
        stats["kl"] = float(kl.detach())
        if beta != 0:
            loss = loss + beta * kl
    elif beta != 0:
        raise ValueError(f"beta={beta!r} needs ref_logp, got None")
    if entropy is not None:
        ent, ent_stats = entropy_bonus(entropy, m, agg=agg, max_len=max_len)
        stats.update(ent_stats)
        if ent_coef != 0:
            loss = loss - ent_coef * ent
    elif ent_coef != 0:
        raise ValueError(f"ent_coef={ent_coef!r} needs entropy, got None")
    stats["loss"] = float(loss.detach())
    return loss, stats
