"""Loss aggregation, the clipped policy loss, the entropy bonus and the combined GRPO loss.

Every loss returns ``(loss, stats)``: ``loss`` a scalar tensor with gradient, ``stats`` a dict
of detached Python floats for logging, so metrics never leak into the arithmetic.

Shapes: every per-token argument is (N, T) with ``mask`` (N, T) of 0/1.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_mask, check_choice, check_same_shape
from .kl import KL_ESTIMATORS, kl_estimate

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DR_GRPO = "seq-mean-token-sum-norm"
RATIO_LEVELS = ("token", "sequence", "sequence-token")
POLICY_LOSSES = ("ppo", "cispo")
CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "geometric")
IS_LOG_BOUND = 20.0
"""|log rho| above this is taken as this before exp (verl's safety bound): a weight of e^20."""


def agg_loss(values: torch.Tensor, mask: torch.Tensor, *, agg: str, max_len: int | None = None,
             total: float | None = None):
    """Reduce per-token values to a scalar; the one place where GRPO variants differ.

    Shapes: values (N, T), mask (N, T) -> scalar.

    - ``token-mean``: sum of valid values / number of valid tokens in the batch (DAPO).
    - ``seq-mean-token-mean``: per sequence the mean over its valid tokens, then the mean
      over sequences (original GRPO).
    - ``seq-mean-token-sum``: per sequence the sum over its valid tokens, then the mean.
      For these three, "sequences" are those with at least one valid token, and a batch with
      no valid token gives 0.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO, Liu et al. 2025): sum of every valid value /
      ``(N * max_len)``, with ``N`` every row of the batch, a fully masked one included, and
      ``max_len`` a constant, the maximum completion length (TRL's ``dr_grpo``:
      ``max_completion_length`` and ``size(0)``); required here, never the batch's padded T,
      which would make the normaliser depend on the longest sample of the batch.
    Masked values never reach the result, not even as NaN (they are replaced by 0 first).

    ``total``: the count the mean divides by (``agg_count``) taken over a larger batch than
    ``values``: a micro-batch's share of a minibatch, or one rank's share of the world. The
    shares' results then add up to the whole batch's (every normaliser is a global count).

    Precision: the sums run in float32 at least (bf16 and fp16 values are upcast, float64 stays
    float64) and the result is in that dtype, so a bf16 or fp16 batch (bf16-mixed training) is
    reduced as accurately as the same values in float32 would be: no row sum rounded to bf16's
    8 bits nor overflowing fp16's 65504 on the way. The gradient reaches ``values`` in their own
    dtype. Token counts are integers.
    """
    check_same_shape(values=values, mask=mask)
    check_choice("agg", agg, AGGS)
    m = as_mask(mask, values)
    if agg == DR_GRPO:
        _check_max_len(max_len, m)
    # every aggregation is a sum of row sums (of row means for seq-mean-token-mean) over a count
    acc = torch.promote_types(values.dtype, torch.float32)
    per_seq = torch.where(m, values, torch.zeros_like(values)).to(acc).sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / m.sum(-1).clamp(min=1)  # an integer count per row
    numerator = per_seq.sum()  # an empty row's sum is 0
    if agg == DR_GRPO:
        numerator = numerator / max_len
    count = agg_count(m, agg) if total is None else total
    if not count >= 0:
        raise ValueError(f"total must be a count >= 0, got {total!r}")
    return numerator / max(count, 1)


def agg_count(mask: torch.Tensor, agg: str) -> int:
    """What ``agg_loss`` divides by: valid tokens (token-mean), sequences with a valid token
    (seq-mean-*), every row (Dr. GRPO, which also divides by max_len).

    Shapes: mask (N, T) -> int."""
    check_choice("agg", agg, AGGS)
    m = mask.bool()
    if agg == "token-mean":
        return int(m.sum())
    if agg == DR_GRPO:
        return m.shape[0]
    return int(m.any(-1).sum())


def _check_max_len(max_len, m: torch.Tensor) -> None:
    """``max_len`` is a positive int no shorter than any row of the bool mask ``m`` (N, T);
    the rows' valid tokens are counted as integers (a count in the values' dtype would round:
    bf16 holds 257 as 256)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"agg={DR_GRPO!r} needs max_len, a positive int (the maximum "
                         f"completion length), got {max_len!r}")
    longest = int(m.sum(-1).max()) if m.numel() else 0
    if longest > max_len:
        raise ValueError(f"agg={DR_GRPO!r}: a sequence has {longest} valid tokens, more than "
                         f"max_len={max_len}; max_len must be the maximum completion length")


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
    clip_ratio_c: float | None = None,
    total: float | None = None,
    ratio_level: str = "token",
    token_weight: torch.Tensor | None = None,
):
    """PPO clipped surrogate with an asymmetric clip range ("clip-higher", DAPO).

    Per token ``rho = exp(logp - old_logp)`` (bounded, see :func:`bounded_ratio`) and
    ``loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``, aggregated by
    ``agg``. ``old_logp`` is treated as a constant (detached).

    ``clip_ratio_c``: dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games
    with Deep Reinforcement Learning", sec. "Dual-clip PPO"; verl's ``clip_ratio_c``): for
    ``A < 0`` the token loss is capped at ``c * |A|``, ``loss_t = min(loss_t, -c * A)``, so a
    token whose ratio ran far above 1 with a negative advantage gives a bounded loss and no
    gradient once ``rho > c``. None (default) turns it off; otherwise a number > 1.
    ``total``: the global count of ``agg_loss`` (micro-batches, ranks).
    ``token_weight``: a constant weight on each token's loss (``engine_correction``'s TIS).
    ``ratio_level``: ``"token"`` (PPO, GRPO), or a response's ratio (``sequence_log_ratio``):
    ``"sequence"`` (GSPO) or ``"sequence-token"`` (GSPO-token); its clip decision is then the
    response's, the same at every token whose advantage has the same sign (with per-token
    advantages of both signs in a row, some tokens clip and others do not, and under "sequence"
    the unclipped ones still move every token through the shared ratio). GSPO's paper averages
    over responses (``agg="seq-mean-token-mean"``) with clip ranges of about 3e-4 / 4e-4.
    ``approx_kl`` stays the token ratios' k3.

    Shapes: logp, old_logp, adv, mask (N, T) -> scalar, stats.

    stats: ``clip_frac_low`` (share of valid tokens with A < 0 and rho < 1 - eps_low, where
    the clipped branch is taken), ``clip_frac_high`` (A > 0 and rho > 1 + eps_high),
    ``clip_frac_dual`` (A < 0 and rho > c: the dual-clip cap taken; 0 without it),
    ``approx_kl`` (token mean of k3 between old and new, ``rho - 1 - log rho``),
    ``ratio_min``, ``ratio_max`` (of the bounded ratio).
    """
    check_same_shape(logp=logp, old_logp=old_logp, adv=adv, mask=mask)
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low!r}, {eps_high!r}")
    _check_clip_ratio_c(clip_ratio_c)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    m = as_mask(mask, logp)
    zero = torch.zeros_like(logp)
    log_ratio = token_log_ratio = torch.where(m, logp - old_logp.detach(), zero)
    if ratio_level != "token":
        log_ratio = sequence_log_ratio(log_ratio, m, level=ratio_level)
    a = torch.where(m, adv.detach(), zero)
    ratio = bounded_ratio(log_ratio)
    tok = policy_token_loss(ratio, a, eps_low=eps_low, eps_high=eps_high,
                            clip_ratio_c=clip_ratio_c)
    if token_weight is not None:  # an importance-sampling correction (engine_correction): a constant
        tok = tok * token_weight.detach()
    loss = agg_loss(tok, m, agg=agg, max_len=max_len, total=total)
    with torch.no_grad():
        stats = _clip_stats(log_ratio, ratio, a, m, eps_low, eps_high, clip_ratio_c)
        if ratio_level != "token":  # approx_kl stays the tokens' k3 (as verl reports it for GSPO)
            lr = token_log_ratio.clamp(max=LOG_RATIO_MAX)
            stats["approx_kl"] = float(torch.where(m, torch.expm1(lr) - lr, zero).sum()) / max(int(m.sum()), 1)
    return loss, stats


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, *, level: str) -> torch.Tensor:
    """Each valid token's log-ratio replaced by its response's (GSPO, Zheng et al. 2025):
    ``log s_i = (1/|y_i|) sum_t log_ratio_i,t`` over the valid tokens of row i.

    Shapes: log_ratio (N, T), mask (N, T) -> (N, T); masked positions 0.

    - ``"sequence"`` (GSPO, sec. 4.1): every token carries ``log s_i``, and its gradient reaches
      every token of the response, ``1/|y_i|`` each.
    - ``"sequence-token"`` (GSPO-token, sec. 4.3): the value is ``log s_i`` at every token, the
      gradient of token t flows to token t's own log-prob only (``sg[log s_i] + x_t -
      sg[x_t]``), so each token's gradient carries its own advantage.
    The row's mean is kept as an (N, 1) column so that it broadcasts along T (its own row);
    a (N,) vector broadcast against (N, T) would pair row i's ratio with token i (EasyR1
    issue 596).
    """
    check_choice("level", level, RATIO_LEVELS[1:])
    m = mask.bool()
    x = torch.where(m, log_ratio, torch.zeros_like(log_ratio))
    seq = x.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (N, 1)
    out = seq.expand_as(x) if level == "sequence" else seq.detach() + x - x.detach()
    return torch.where(m, out, torch.zeros_like(out))


def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
               eps_high: float, agg: str, max_len: int | None = None, total: float | None = None,
               token_weight: torch.Tensor | None = None):
    """CISPO (MiniMax 2025, "MiniMax-M1", sec. 3.1): ``loss_t = -sg(w_t) A_t logp_t`` with the
    importance weight ``w_t = min(rho_t, 1 + eps_high)`` held constant (detached), aggregated by
    ``agg`` (the paper: token-mean). No lower bound on w (the paper sets none); every token keeps
    its gradient ``-w_t A_t grad logp_t``, also where PPO's clip would give 0. ``old_logp`` is
    a constant.

    Shapes: logp, old_logp, adv, mask (N, T) -> scalar, stats (as ``clipped_policy_loss``'s;
    ``clip_frac_high`` is the share of valid tokens whose weight was truncated, whatever the
    advantage's sign; ``clip_frac_low`` and ``clip_frac_dual`` are 0).
    """
    check_same_shape(logp=logp, old_logp=old_logp, adv=adv, mask=mask)
    if not (isinstance(eps_high, (int, float)) and not isinstance(eps_high, bool) and eps_high >= 0):
        raise ValueError(f"cispo needs eps_high >= 0 (the weight's bound is 1 + eps_high), got {eps_high!r}")
    m = as_mask(mask, logp)
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(m, logp - old_logp.detach(), zero)
    ratio = bounded_ratio(log_ratio)
    w = torch.clamp(ratio, max=1.0 + eps_high).detach()
    a = torch.where(m, adv.detach(), zero)
    tok = -(w * a * torch.where(m, logp, zero))
    if token_weight is not None:  # an importance-sampling correction (engine_correction): a constant
        tok = tok * token_weight.detach()
    loss = agg_loss(tok, m, agg=agg, max_len=max_len, total=total)
    with torch.no_grad():
        stats = _clip_stats(log_ratio, ratio, a, m, 1.0, eps_high, None)
        n_valid = max(int(m.sum()), 1)
        stats["clip_frac_high"] = float((m & (ratio > 1.0 + eps_high)).sum()) / n_valid
        stats["clip_frac_low"] = 0.0
    return loss, stats


def engine_correction(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, mode: str,
                      level: str, threshold: float):
    """Importance-sampling correction for samples drawn by an engine whose log-probs differ from
    the trainer's (an inference engine in another precision, with other kernels).

    Shapes: old_logp, engine_logp, mask (N, T) -> weight (N, T) or None, mask (N, T) bool, stats.

    ``rho_t = exp(old_logp_t - engine_logp_t)``, the trainer's sampling-time probability of the
    token over the engine's (``|log rho|`` bounded by ``IS_LOG_BOUND``). ``level="geometric"``
    (verl's name): every token of a row takes the row's geometric mean, ``exp(mean over its
    valid tokens of log rho_t)``, bounded after the mean (so one catastrophic token is not
    clipped before it counts). It is length-normalised like GSPO's ratio, and much closer to 1
    than the product of the token ratios (the sequence ratio of TRL's and verl's "sequence"
    modes, not offered here): verl suggests thresholds of about 1.0002-1.001 for it, where 2 is
    nearly inert.
    ``mode``:

    - ``"tis"``, truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
      secretly brings you off-policy RL training"): a weight ``min(rho, C)`` on each token's
      policy loss, held constant (detached: it corrects the sampling distribution, it is not
      optimised); the mask is unchanged.
    - ``"mis"``, masked importance sampling (the Ling team's IcePop; the Qwen team's sequence
      masking): tokens (``level="token"``) or whole rows (``"geometric"``) whose ratio leaves
      ``[1/C, C]`` leave the mask, so they leave the loss and its normaliser too (counting them
      in the denominator was slime issue 657); no weight.
    - ``"none"``: the mask as it is, no weight; only the stats.

    stats: ``mismatch_kl`` (mean over valid tokens of ``rho - 1 - log rho``, k3 of KL(engine ||
    trainer) for tokens the engine sampled), ``is_ratio_min`` / ``is_ratio_mean`` /
    ``is_ratio_max`` (token ratios), ``is_truncated_frac`` (tokens whose weight was cut to C),
    ``is_masked_frac`` and ``is_masked_seq_frac`` (tokens and rows masked out).
    """
    check_same_shape(old_logp=old_logp, engine_logp=engine_logp, mask=mask)
    check_choice("mode", mode, CORRECTIONS)
    check_choice("level", level, CORRECTION_LEVELS)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 1:
        raise ValueError(f"threshold must be a number > 1 (the ratio's bound C), got {threshold!r}")
    m = mask.bool()
    zero = torch.zeros_like(old_logp)
    raw = torch.where(m, (old_logp - engine_logp).detach(), zero)
    log_rho = raw.clamp(-IS_LOG_BOUND, IS_LOG_BOUND)
    if level == "geometric":  # the row's mean, bounded after it is taken; an (N, 1) column: its own row
        seq = (raw.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).clamp(-IS_LOG_BOUND, IS_LOG_BOUND)
        used = torch.where(m, seq.expand_as(log_rho), zero)
    else:
        used = log_rho
    rho = torch.exp(used)
    weight, keep = None, m
    if mode == "tis":
        weight = torch.where(m, torch.clamp(rho, max=float(threshold)), zero)
    elif mode == "mis":
        inside = (used >= -math.log(threshold)) & (used <= math.log(threshold))
        keep = m & inside
    with torch.no_grad():
        n = max(int(m.sum()), 1)
        tok = torch.exp(log_rho)
        valid = tok[m]
        rows = m.any(-1)
        stats = {
            "mismatch_kl": float(torch.where(m, tok - 1 - log_rho, zero).sum()) / n,
            "is_ratio_min": float(valid.min()) if valid.numel() else 1.0,
            "is_ratio_mean": float(valid.mean()) if valid.numel() else 1.0,
            "is_ratio_max": float(valid.max()) if valid.numel() else 1.0,
            "is_truncated_frac": float((m & (rho > threshold)).sum()) / n if mode == "tis" else 0.0,
            "is_masked_frac": float((m & ~keep).sum()) / n,
            "is_masked_seq_frac": (float((rows & ~keep.any(-1)).sum()) / max(int(rows.sum()), 1)),
        }
    return weight, keep, stats


LOG_RATIO_MAX = 50.0
"""Bound on the log-ratio inside :func:`bounded_ratio`. exp(50) = 5.2e21 leaves float32 (and
bfloat16, same range), which overflows at 88.7, a factor 1e17 of room for |A| and the token
sum; a ratio that far from 1 is outside any working trust region, and every log-prob gap the
property tests draw (up to 30) stays below it, so no value in use changes. (verl clamps at 20,
with a zero gradient beyond.)"""


def bounded_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """``exp(min(x, LOG_RATIO_MAX))`` whose gradient is the returned value everywhere.

    Shapes: log_ratio (any) -> same.

    Up to the bound this is ``exp(x)`` exactly, value and gradient. Above it the value stays
    ``exp(LOG_RATIO_MAX)`` and the gradient stays the one at the bound (``d rho / d x = rho``)
    instead of overflowing (float32: inf at x > 88.7, and NaN gradients behind a clipped
    branch) or vanishing (a plain clamp): a token whose ratio ran away with ``A < 0`` keeps a
    finite gradient pushing it down. Where a clipped branch applies the value is irrelevant
    anyway. ``x`` must be finite.
    """
    over = log_ratio > LOG_RATIO_MAX
    capped = log_ratio - log_ratio.detach() + LOG_RATIO_MAX  # value the bound, gradient 1
    return torch.exp(torch.where(over, capped, log_ratio))


def policy_token_loss(ratio, a, *, eps_low: float, eps_high: float,
                      clip_ratio_c: float | None = None) -> torch.Tensor:
    """Per-token clipped surrogate loss (dual-clipped for ``A < 0`` when ``clip_ratio_c``).

    Shapes: ratio, a (N, T) -> (N, T).
    """
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    tok = -torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:
        tok = torch.where(a < 0, torch.minimum(tok, -clip_ratio_c * a), tok)
    return tok


def _check_clip_ratio_c(clip_ratio_c) -> None:
    ok = clip_ratio_c is None or (isinstance(clip_ratio_c, (int, float))
                                  and not isinstance(clip_ratio_c, bool) and clip_ratio_c > 1)
    if not ok:  # also rejects NaN
        raise ValueError(f"clip_ratio_c must be None or a number > 1 (the dual-clip cap c*|A| "
                         f"for A < 0), got {clip_ratio_c!r}")


def _clip_stats(log_ratio, ratio, a, m, eps_low, eps_high, clip_ratio_c) -> dict:
    n_valid = max(int(m.sum()), 1)
    low = m & (a < 0) & (ratio < 1 - eps_low)
    high = m & (a > 0) & (ratio > 1 + eps_high)
    dual = m & (a < 0) & (ratio > clip_ratio_c) if clip_ratio_c is not None else low & ~low
    lr = log_ratio.clamp(max=LOG_RATIO_MAX)
    valid_ratio = ratio[m]
    return {
        "clip_frac_low": float(low.sum()) / n_valid,
        "clip_frac_high": float(high.sum()) / n_valid,
        "clip_frac_dual": float(dual.sum()) / n_valid,
        "approx_kl": float(torch.where(m, torch.expm1(lr) - lr, torch.zeros_like(lr)).sum())
        / n_valid,
        "ratio_min": float(valid_ratio.min()) if valid_ratio.numel() else 1.0,
        "ratio_max": float(valid_ratio.max()) if valid_ratio.numel() else 1.0,
    }


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, *, agg: str, max_len: int | None = None,
                  total: float | None = None):
    """Aggregated per-token entropy (plan item 6); the loss subtracts ``ent_coef`` times it.

    Shapes: entropy (N, T), mask (N, T) -> scalar, stats {"entropy"}.
    """
    value = agg_loss(entropy, mask, agg=agg, max_len=max_len, total=total)
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
    clip_ratio_c: float | None = None,
    total: float | None = None,
    ratio_level: str = "token",
    policy_loss: str = "ppo",
    token_weight: torch.Tensor | None = None,
):
    """``loss = policy_loss + beta * agg(kl) - ent_coef * agg(entropy)``.

    The KL term sits in the loss (not in the reward), with the same aggregation as the
    policy loss; ``ref_logp`` is treated as a constant. With ``beta = 0`` the reference is
    not needed (``ref_logp`` may be None); with ``ent_coef = 0`` neither is ``entropy``.
    ``clip_ratio_c``: the dual clip of ``clipped_policy_loss`` (None: off). ``total``: the
    global count every term divides by (``agg_count`` over the whole minibatch, all ranks), so
    that the losses of micro-batches or ranks add up to the minibatch's.

    Shapes: logp, old_logp, ref_logp, adv, mask, entropy (N, T) -> scalar, stats.
    stats: the policy-loss stats plus ``policy_loss``, ``kl``, ``entropy``, ``loss``.

    ``policy_loss``: ``"ppo"`` (``clipped_policy_loss``, with ``ratio_level`` and the dual clip)
    or ``"cispo"`` (``cispo_loss``: ``eps_high`` bounds the weight, ``eps_low`` and
    ``clip_ratio_c`` are not used; token-level ratios only). ``token_weight``: a constant
    weight on the policy term's tokens (``engine_correction``'s TIS; the KL and entropy terms
    are not weighted).
    """
    check_choice("policy_loss", policy_loss, POLICY_LOSSES)
    if policy_loss == "cispo" and (ratio_level != "token" or clip_ratio_c is not None):
        raise ValueError(f"policy_loss='cispo' weights each token by its own clipped ratio: it takes "
                         f"ratio_level='token' and no clip_ratio_c, got {ratio_level!r}, {clip_ratio_c!r}")
    check_same_shape(logp=logp, old_logp=old_logp, ref_logp=ref_logp, adv=adv, mask=mask,
                     entropy=entropy)
    check_choice("kl_estimator", kl_estimator, tuple(KL_ESTIMATORS))
    if policy_loss == "cispo":
        pg, stats = cispo_loss(logp, old_logp, adv, mask, eps_high=eps_high, agg=agg, max_len=max_len,
                               total=total, token_weight=token_weight)
    else:
        pg, stats = clipped_policy_loss(
            logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, agg=agg, max_len=max_len,
            clip_ratio_c=clip_ratio_c, total=total, ratio_level=ratio_level, token_weight=token_weight,
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
        kl = agg_loss(kl_tok, m, agg=agg, max_len=max_len, total=total)
        stats["kl"] = float(kl.detach())
        if beta != 0:
            loss = loss + beta * kl
    elif beta != 0:
        raise ValueError(f"beta={beta!r} needs ref_logp, got None")
    if entropy is not None:
        ent, ent_stats = entropy_bonus(entropy, m, agg=agg, max_len=max_len, total=total)
        stats.update(ent_stats)
        if ent_coef != 0:
            loss = loss - ent_coef * ent
    elif ent_coef != 0:
        raise ValueError(f"ent_coef={ent_coef!r} needs entropy, got None")
    stats["loss"] = float(loss.detach())
    return loss, stats
