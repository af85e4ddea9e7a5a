"""Plain float64 reference ("oracle") for the GRPO math.

Everything here works on Python floats and ragged Python lists: no padding,
no masks, no tensors, explicit loops, one function per concept.  It is meant
to read like the equations and to be obviously right, not to be fast.

Conventions used throughout:

* A *sequence* is a ``list[float]`` of per-step (or per-token) values; it may
  be empty.
* A *batch* is a ``list`` of sequences (samples -> tokens).
* Grouped data is ``list`` of groups, each a ``list`` of sequences
  (groups -> samples -> steps).

Equation references (E1, E2, ...) point at the comments in each function.
Only ``math`` is imported, on purpose.

Sources (each convention of this module is taken from these, never from ``grpo_core``):

[GRPO]  Shao et al. 2024, "DeepSeekMath", sec. 4.1.2 (outcome supervision):
        r~_i = (r_i - mean(r)) / std(r) over the G outputs of one question, and
        A_{i,t} = r~_i for every token t of output i.  Sec. 4.1.3 (process supervision):
        a reward r_i^index(j) at the end of each step j, r~ = (r - mean(R)) / std(R) with R
        every step reward of the group, and A_{i,t} = sum over index(j) >= t of r~_i^index(j).
[PLAN]  The CartPole GRPO plan (item 5): A = (G - mean) / (std + 1e-8) with mean and
        std over the whole group; a group of one sample, or of equal returns, gives 0.
        Item 3: G_t = r_t + gamma * G_{t+1}, G_T = 0.
[DR]    Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO), eq. for
        A_{i,t} = R(q, o_i) - mean(R): the std division is removed.
[TRL]   TRL's GRPOTrainer: std with Bessel's correction (torch.std's default),
        eps added to the std outside the square root; scale_rewards="batch" takes the
        std over the whole batch, the mean staying per group.
[RLOO]  Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", and Ahmadian et
        al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
        Human Feedback", eq. for RLOO: the baseline of sample i is the mean reward of the other
        k - 1 samples, A_i = r_i - 1/(k - 1) sum over j != i of r_j.
[VERL]  verl, verl/trainer/ppo/core_algos.py, agg_loss: the seq-mean modes take the mean
        over the sequences with at least one valid token ("exclude fully masked
        sequences") when the count is the local batch's; token-mean divides by the valid
        tokens only. (verl's newer engine path, pull request 4510, divides by the whole
        batch size instead, TRL's choice: the peers are split, which is why the choice and
        its reason are written below.)
[DAPO]  Yu et al. 2025, "DAPO", sec. 3.3-3.4: the token-level loss divides by the valid
        tokens of the batch, and overlong filtering masks a truncated sample's loss, so a
        masked sample carries no weight in the loss.

Conventions fixed here:

  convention                      value                                        source
  ------------------------------  -------------------------------------------  -----------
  returns                         G_t = r_t + gamma G_{t+1}, G past end = 0     [PLAN] 3
  "steps" pool                    every G_t of every sample of the group        [PLAN] 5
  "sequences" pool                every scored reward of the group: by default  [GRPO] 4.1.2
                                  each sample's last step (outcome), or the     [GRPO] 4.1.3
                                  steps marked scored (process supervision);
                                  an empty sample has none; a reward at an
                                  unscored step is an error
  "sequences" advantage           sum over scored steps k >= t of the           [GRPO] 4.1.3
                                  normalised rewards, discounted by             with [PLAN] 3
                                  gamma^(k - t): outcome only gives
                                  gamma^(L_i-1-t) r~_i (E6)
  std                             Bessel's correction (n - 1)                   [TRL]
  eps                             added to the std, outside the square root     [PLAN] 5
  scale="none"                    no division                                   [DR]
  scale="batch"                   std of every pooled value of the batch,       [TRL]
                                  around the batch mean; mean per group
  leave-one-out baseline          each pooled value minus the mean of the       [RLOO]
                                  pool's other values (computed as written,
                                  not from an identity), divided by the same
                                  denominator as the mean baseline
  no-signal group                 fewer than 2 pooled values or all equal:      [PLAN] 5
                                  exactly 0 at every step, any gamma
  first valid step                not special: nothing is read at the first     [GRPO] 4.1.2
                                  step only; every token gets its own value     (A_{i,t} for
                                                                                every t)
  Dr. GRPO loss normaliser        constant max_len x every sequence of the      [DR], [TRL]
                                  batch, an empty one included (A4)
  seq-mean rows (A2, A3)          the sequences with a valid token: a fully     [VERL], [DAPO]
                                  masked row (reward None, or truncated and
                                  masked) is not in the mean
  empty sample, group stats       left out of its group's pool: the mean and    decided here
                                  std are those of the samples with a valid     (below); TRL
                                  step; fewer than 2 left is no signal          and verl differ

Where the sources disagree (correctness pass 2). A sample with no valid token is, for every
convention above but Dr. GRPO's constant normaliser, not part of the batch:

* seq-mean rows. DeepSeekMath's objective averages over all G outputs (1/G); it has no masked
  output. TRL's "grpo" loss takes the mean of the per-row token means over every row, a fully
  masked one included; verl's seq-mean modes leave such rows out. With k of N rows masked,
  counting every row gives each remaining row the weight 1/N, so a batch in which many samples
  were masked (unscorable, or truncated) takes a step (N - k)/N times smaller, a weight that
  depends on how often masking happens; leaving them out gives 1/(N - k), the step of a batch
  of the N - k samples that have a loss, and agrees with the token-mean that DAPO's overlong
  filtering uses (masked tokens leave its normaliser). Followed here: verl's.
  Dr. GRPO (A4) keeps every row on purpose: its point is a normaliser that does not depend on
  the batch's content [DR], and TRL's dr_grpo does the same.
* group statistics. TRL scores a sample whose every reward function returned None as 0 and
  keeps it in the group's mean and std (and in the loss); verl's GRPO advantage pools every
  response's score, a truncated one included. Here the pool holds the samples with a valid
  step only: an unscorable sample has no reward to pool (a 0 would pull the mean towards 0
  and shift every other sample's advantage), and a sample masked as truncated is meant to
  carry no signal, which its reward in the pool would still give (it moves the mean that the
  others are measured against). The remaining samples' advantages are then those of a group
  of G - k samples; with fewer than 2 left the group has no signal.
"""

import math

# ---------------------------------------------------------------------------
# Returns
# ---------------------------------------------------------------------------


def discounted_returns(rewards, gamma):
    """Discounted return of every step of one sequence.

    (E1)  G_t = r_t + gamma * G_{t+1},   with G_T = 0 past the last step,
    computed backwards from the last step.  ``gamma`` is used as given
    (gamma = 0 gives the rewards, gamma = 1 gives reward-to-go sums).
    """
    returns = [0.0] * len(rewards)
    running = 0.0  # G_T = 0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running  # (E1)
        returns[t] = running
    return returns


# ---------------------------------------------------------------------------
# Group-relative advantages
# ---------------------------------------------------------------------------
# Sources and the table of conventions: see the module docstring.


_SCALES = ("group", "batch", "none")
_STATS_OVER = ("steps", "sequences")


def _mean(values):
    """Arithmetic mean (exactly rounded sum via math.fsum)."""
    return math.fsum(values) / len(values)


def _bessel_std(values):
    """Sample standard deviation with Bessel's correction (divide by n - 1).

    (E2)  s = sqrt( sum_i (x_i - mean)^2 / (n - 1) ).   Requires n >= 2.
    """
    m = _mean(values)
    return math.sqrt(math.fsum((x - m) ** 2 for x in values) / (len(values) - 1))


def _scored_positions(sample, scored_sample):
    """The steps of one sample where a reward is given: ``scored_sample`` (process
    supervision, [GRPO] 4.1.3: the end of each reasoning step) or, when None, the last step
    only (outcome supervision, [GRPO] 4.1.2).  A reward anywhere else is an error."""
    if scored_sample is None:
        positions = [len(sample) - 1] if sample else []
    else:
        positions = [t for t, flag in enumerate(scored_sample) if flag]
    for t, r in enumerate(sample):
        if r != 0.0 and t not in positions:
            raise ValueError(f"a reward at step {t} that is not scored")
    return positions


def _pool(group_rewards, group_scored, stats_over, gamma):
    """The values a group's statistics are computed from (see the table above)."""
    pooled = []
    for sample, scored_sample in zip(group_rewards, group_scored):
        if stats_over == "steps":
            pooled.extend(discounted_returns(sample, gamma))
        else:
            pooled.extend(sample[t] for t in _scored_positions(sample, scored_sample))
    return pooled


def _has_signal(pooled):
    """At least two pooled values, not all exactly equal."""
    return len(pooled) >= 2 and any(x != pooled[0] for x in pooled)


def _denominator(pooled, batch_std, scale, eps):
    if scale == "none":
        return 1.0  # [DR]
    if scale == "group":
        return _bessel_std(pooled) + eps  # (E2) + eps
    return batch_std + eps


def _baseline_of(x, pool, baseline):
    """The value ``x`` of ``pool`` is measured against: the pool's mean, or ([RLOO]) the mean of
    the pool's other values (one occurrence of ``x`` left out), summed term by term."""
    if baseline == "mean":
        return _mean(pool)
    rest = list(pool)
    rest.remove(x)
    return math.fsum(rest) / len(rest)


def _supervised_advantages(sample, positions, pool, denom, gamma, baseline):
    """(E6) for one sample, term by term (no recursion): the normalised reward of every
    scored step k,  r~_k = (r_k - b_k) / denom  with b_k the baseline of (E7) (the group's mean,
    or the mean of the pool's other values), and for every token t

        A_t = sum over scored k >= t of  gamma^(k - t) * r~_k

    ([GRPO] 4.1.3's "sum of the normalised rewards of the following steps", discounted; with
    the last step as the only scored one, [GRPO] 4.1.2's A_t = r~_i, discounted).
    """
    normed = {k: (sample[k] - _baseline_of(sample[k], pool, baseline)) / denom for k in positions}
    return [math.fsum(gamma ** (k - t) * v for k, v in normed.items() if k >= t)
            for t in range(len(sample))]


def group_advantages(rewards, *, gamma, scale, stats_over, eps=1e-8, scored=None, baseline="mean"):
    """GRPO group-relative advantages of every step.

    ``rewards`` is nested groups -> samples -> per-step rewards (a sample may be empty);
    ``scored`` (only for "sequences") the same nesting of booleans marking the steps where a
    reward is given, or None for outcome supervision (the last step of each sample).

    (E3)  "steps":      A_t = (G_t - mean_g) / denom, G_t from (E1), the pool every G_t.
    (E6)  "sequences":  see ``_supervised_advantages``; the pool is every scored reward.
    (E4)  denom = 1 (scale="none"), std_g + eps ("group"), std_batch + eps ("batch").
    (E7)  ``baseline="leave-one-out"``: every ``- mean_g`` above becomes ``- b(x)``, b(x) the
          mean of the other pooled values of the group ([RLOO]).

    A group without signal (``_has_signal``) gets exactly 0.0 at every step.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if stats_over not in _STATS_OVER:
        raise ValueError(f"stats_over must be one of {_STATS_OVER}, got {stats_over!r}")
    if baseline not in ("mean", "leave-one-out"):
        raise ValueError(f"baseline must be 'mean' or 'leave-one-out', got {baseline!r}")
    if scored is None:
        scored = [[None] * len(group) for group in rewards]

    pools = [_pool(group, sc, stats_over, gamma) for group, sc in zip(rewards, scored)]
    everything = [x for pool in pools for x in pool]
    batch_std = _bessel_std(everything) if len(everything) >= 2 else 0.0

    advantages = []
    for group, group_scored, pool in zip(rewards, scored, pools):
        if not _has_signal(pool):
            advantages.append([[0.0] * len(sample) for sample in group])
            continue
        denom = _denominator(pool, batch_std, scale, eps)
        if stats_over == "steps":
            advantages.append([[(g - _baseline_of(g, pool, baseline)) / denom
                                for g in discounted_returns(sample, gamma)] for sample in group])  # (E3), (E7)
        else:
            advantages.append([
                _supervised_advantages(sample, _scored_positions(sample, sc), pool, denom, gamma, baseline)
                for sample, sc in zip(group, group_scored)])
    return advantages


# ---------------------------------------------------------------------------
# Per-token KL estimators, d = ref_logp - logp  (log ref(x) / pi(x))
# ---------------------------------------------------------------------------


def kl_k1(logp, ref_logp, old_logp=None):
    """(K1)  k1 = -d = logp - ref_logp.  Unbiased for KL(pi||ref), high variance."""
    d = ref_logp - logp
    return -d


def kl_k2(logp, ref_logp, old_logp=None):
    """(K2)  k2 = d^2 / 2.  Biased for KL(pi||ref), never negative."""
    d = ref_logp - logp
    return d * d / 2.0


def kl_k3(logp, ref_logp, old_logp=None):
    """(K3)  k3 = exp(d) - d - 1, computed as expm1(d) - d.  Unbiased, >= 0."""
    d = ref_logp - logp
    return math.expm1(d) - d


def kl_k3_is(logp, ref_logp, old_logp=None):
    """(K4)  k3 weighted by the importance ratio exp(logp - old_logp)."""
    ratio = math.exp(logp - old_logp)
    return ratio * kl_k3(logp, ref_logp)


def kl_k1_dlogp(logp, ref_logp, old_logp=None):
    """d k1 / d logp = 1."""
    return 1.0


def kl_k2_dlogp(logp, ref_logp, old_logp=None):
    """d k2 / d logp = d * (d d / d logp) = -d."""
    d = ref_logp - logp
    return -d


def kl_k3_dlogp(logp, ref_logp, old_logp=None):
    """d k3 / d logp = -exp(d) + 1 = -expm1(d)."""
    d = ref_logp - logp
    return -math.expm1(d)


def kl_k3_is_dlogp(logp, ref_logp, old_logp=None):
    """d (ratio * k3) / d logp = ratio * k3 + ratio * (1 - exp(d))  (product rule,
    d ratio / d logp = ratio; old_logp and ref_logp are constants)."""
    ratio = math.exp(logp - old_logp)
    return ratio * kl_k3(logp, ref_logp) + ratio * kl_k3_dlogp(logp, ref_logp)


KL = {
    "k1": (kl_k1, kl_k1_dlogp),
    "k2": (kl_k2, kl_k2_dlogp),
    "k3": (kl_k3, kl_k3_dlogp),
    "k3_is": (kl_k3_is, kl_k3_is_dlogp),
}


# ---------------------------------------------------------------------------
# Clipped surrogate (PPO / GRPO) per token
# ---------------------------------------------------------------------------


def clipped_token_loss(logp, old_logp, adv, eps_low, eps_high):
    """Clipped surrogate loss of one token and its derivative wrt logp.

    (P1)  ratio     = exp(logp - old_logp)
    (P2)  unclipped = ratio * adv
          clipped   = clip(ratio, 1 - eps_low, 1 + eps_high) * adv
    (P3)  loss      = -min(unclipped, clipped)

    Derivative (d ratio / d logp = ratio):
      d unclipped = ratio * adv
      d clipped   = ratio * adv if 1 - eps_low <= ratio <= 1 + eps_high
                    (bounds inclusive, as torch.clamp), else 0
    min() picks the smaller branch; on an exact tie the derivative is the
    average of the two branches' derivatives (as torch.minimum does).
    """
    ratio = math.exp(logp - old_logp)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clipped_ratio = min(max(ratio, lo), hi)
    unclipped = ratio * adv
    clipped = clipped_ratio * adv

    d_unclipped = ratio * adv
    d_clipped = ratio * adv if lo <= ratio <= hi else 0.0

    if unclipped < clipped:
        value, d_value = unclipped, d_unclipped
    elif clipped < unclipped:
        value, d_value = clipped, d_clipped
    else:
        value, d_value = unclipped, 0.5 * (d_unclipped + d_clipped)
    return -value, -d_value


# ---------------------------------------------------------------------------
# Aggregation of per-token values into one scalar
# ---------------------------------------------------------------------------

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_weights(lengths, agg, max_len=None):
    """Per-token weights w_it so that every aggregation is linear:

    (A0)  loss = sum_i sum_t w_it * v_it

    With S = number of sequences with len_i > 0 (empty sequences are left
    out of the means A2, A3: [VERL], see "Where the sources disagree" in the
    module docstring), B = number of sequences, empty ones included,
    and N = total number of tokens:
      (A1) "token-mean"              w = 1 / N
      (A2) "seq-mean-token-mean"     w = 1 / (S * len_i)
      (A3) "seq-mean-token-sum"      w = 1 / S
      (A4) "seq-mean-token-sum-norm" w = 1 / (B * max_len)   (max_len required)
           [DR]: the per-sequence 1/|o_i| of GRPO replaced by one constant, the
           maximum generation length, and the mean over all G outputs of the
           batch; TRL's dr_grpo divides by size(0) * max_completion_length.
    With no token at all there is nothing to weigh and the loss is 0.
    """
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if agg == "seq-mean-token-sum-norm" and max_len is None:
        raise ValueError("max_len is required for agg='seq-mean-token-sum-norm'")
    total = sum(lengths)
    n_seqs = sum(1 for n in lengths if n > 0)
    n_rows = len(lengths)
    weights = []
    for n in lengths:
        if n == 0:
            weights.append([])
            continue
        if agg == "token-mean":
            w = 1.0 / total  # (A1)
        elif agg == "seq-mean-token-mean":
            w = 1.0 / (n_seqs * n)  # (A2)
        elif agg == "seq-mean-token-sum":
            w = 1.0 / n_seqs  # (A3)
        else:
            w = 1.0 / (n_rows * max_len)  # (A4)
        weights.append([w] * n)
    return weights


def aggregate(values, agg, max_len=None):
    """Aggregate ragged per-token ``values`` with the weights of (A0)-(A4)."""
    weights = aggregate_weights([len(v) for v in values], agg, max_len)
    return math.fsum(w * v for ws, vs in zip(weights, values) for w, v in zip(ws, vs))


# ---------------------------------------------------------------------------
# Full GRPO loss
# ---------------------------------------------------------------------------


def grpo_loss(
    logp, old_logp, ref_logp, adv, entropy, *,
    beta, ent_coef, kl_estimator, eps_low, eps_high, agg, max_len=None, token_weights=None,
):
    """Full GRPO loss over ragged samples -> tokens, with its exact gradient.

    (L1)  loss = agg(policy_t) + beta * agg(kl_t) - ent_coef * agg(entropy_t)

    policy_t is (P3), kl_t is the chosen estimator (K1)-(K4), ``entropy`` is
    a constant input.  ``token_weights`` (ragged, optional): a constant factor on each
    token's policy term and its derivative ([TIS]).  Because every aggregation is linear (A0),

    (L2)  d loss / d logp_it = w_it * (d policy_it + beta * d kl_it).

    Returns ``(loss, parts, dloss_dlogp)``; ``parts`` holds "policy_loss",
    "kl", "entropy" (each aggregated, unweighted by beta / ent_coef), "loss",
    "clip_frac_low" (share of tokens with adv < 0 and ratio < 1 - eps_low),
    "clip_frac_high" (adv > 0 and ratio > 1 + eps_high), "ratio_min",
    "ratio_max" and "approx_kl" (token mean of (ratio - 1) - log ratio).
    With no tokens at all, the shares and approx_kl are 0.0 and
    ratio_min / ratio_max are NaN (there is no ratio to report).
    """
    if kl_estimator not in KL:
        raise ValueError(f"kl_estimator must be one of {tuple(KL)}, got {kl_estimator!r}")
    kl_fn, kl_dfn = KL[kl_estimator]
    lengths = [len(seq) for seq in logp]
    weights = aggregate_weights(lengths, agg, max_len)

    policy, kl, d_loss = [], [], []
    ratios, n_low, n_high, approx = [], 0, 0, []
    for i in range(len(logp)):
        pol_i, kl_i, d_i = [], [], []
        for t in range(lengths[i]):
            lp, olp, rlp, a = logp[i][t], old_logp[i][t], ref_logp[i][t], adv[i][t]
            p, dp = clipped_token_loss(lp, olp, a, eps_low, eps_high)
            if token_weights is not None:
                p, dp = p * token_weights[i][t], dp * token_weights[i][t]
            k, dk = kl_fn(lp, rlp, olp), kl_dfn(lp, rlp, olp)
            pol_i.append(p)
            kl_i.append(k)
            d_i.append(weights[i][t] * (dp + beta * dk))  # (L2)

            log_ratio = lp - olp
            ratio = math.exp(log_ratio)
            ratios.append(ratio)
            n_low += a < 0 and ratio < 1.0 - eps_low
            n_high += a > 0 and ratio > 1.0 + eps_high
            approx.append(math.expm1(log_ratio) - log_ratio)
        policy.append(pol_i)
        kl.append(kl_i)
        d_loss.append(d_i)

    policy_loss = aggregate(policy, agg, max_len)
    kl_value = aggregate(kl, agg, max_len)
    entropy_value = aggregate([list(e[:n]) for e, n in zip(entropy, lengths)], agg, max_len)
    loss = policy_loss + beta * kl_value - ent_coef * entropy_value  # (L1)

    n_tokens = len(ratios)
    parts = {
        "policy_loss": policy_loss,
        "kl": kl_value,
        "entropy": entropy_value,
        "loss": loss,
        "clip_frac_low": n_low / n_tokens if n_tokens else 0.0,
        "clip_frac_high": n_high / n_tokens if n_tokens else 0.0,
        "ratio_min": min(ratios) if n_tokens else math.nan,
        "ratio_max": max(ratios) if n_tokens else math.nan,
        "approx_kl": math.fsum(approx) / n_tokens if n_tokens else 0.0,
    }
    return loss, parts, d_loss


# ---------------------------------------------------------------------------
# Bounded ratio and dual-clip PPO, per token (twin of the core's options)
# ---------------------------------------------------------------------------

LOG_RATIO_BOUND = 50.0  # exp(50) = 5.2e21: finite in float32 with room, far from any trust region


def bounded_ratio(log_ratio, bound=LOG_RATIO_BOUND):
    """The ratio used by the safe surrogate, and its derivative wrt logp.

    (P4)  ratio   = exp(min(x, bound)),        x = logp - old_logp
          d ratio = ratio                      (for every x, also above the bound)

    Up to the bound this is the plain ratio (P1) and its derivative. Above it both the value
    and the derivative stay those at the bound: the value of a clipped branch does not depend
    on it, and an unclipped token with a negative advantage keeps a finite push downwards.
    """
    ratio = math.exp(min(log_ratio, bound))
    return ratio, ratio


def _smaller(a, da, b, db):
    """min(a, b) with its derivative; on an exact tie the mean of both derivatives."""
    if a < b:
        return a, da
    if b < a:
        return b, db
    return a, 0.5 * (da + db)


def dual_clip_token_loss(logp, old_logp, adv, eps_low, eps_high, clip_ratio_c=None,
                         bound=LOG_RATIO_BOUND):
    """Clipped surrogate loss of one token with the bounded ratio (P4) and, optionally, the
    dual clip; returns (loss, d loss / d logp).

    (P5)  objective = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)    (P2)
    (P6)  dual clip, Ye et al. 2020 (arXiv:1912.09729), "Dual-clip PPO": for A < 0
          objective = max(objective, c * A),   c > 1
          loss = -objective

    The dual clip is a lower bound on the objective of a token with A < 0: the loss
    ratio * |A| of a token whose ratio ran far above 1 is capped at c * |A| (with no
    derivative once it is). Derivative of the clipped ratio: ratio inside
    [1 - eps_low, 1 + eps_high] (bounds inclusive), else 0.
    """
    ratio, d_ratio = bounded_ratio(logp - old_logp, bound)
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clipped_ratio = min(max(ratio, lo), hi)
    d_clipped_ratio = d_ratio if lo <= ratio <= hi else 0.0
    obj, d_obj = _smaller(ratio * adv, d_ratio * adv, clipped_ratio * adv, d_clipped_ratio * adv)
    loss, d_loss = -obj, -d_obj
    if clip_ratio_c is not None and adv < 0:
        loss, d_loss = _smaller(loss, d_loss, -clip_ratio_c * adv, 0.0)  # (P6)
    return loss, d_loss


# ---------------------------------------------------------------------------
# Sequence-level ratios (GSPO) and clipped importance weights (CISPO)
# ---------------------------------------------------------------------------
#
# [GSPO]  Zheng et al. 2025, "Group Sequence Policy Optimization", sec. 4.1: the importance
#         ratio of a whole response, s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|)
#         = exp( (1/|y_i|) sum_t log(pi(y_i,t) / pi_old(y_i,t)) ), clipped once per response:
#         J = E[ (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps) A_i) ].
#         Sec. 4.3, GSPO-token: s_i,t = sg[s_i] * pi(y_i,t) / sg[pi(y_i,t)], whose value is s_i
#         and whose gradient at token t is s_i * grad log pi(y_i,t), each token with its own
#         A_i,t: J = E[ (1/G) sum_i (1/|y_i|) sum_t min(s_i,t A_i,t, clip(s_i,t) A_i,t) ].
# [CISPO] MiniMax 2025, "MiniMax-M1", sec. 3.1: J = E[ (1 / sum_i |o_i|) sum_i sum_t
#         sg(r^_i,t) A_i,t log pi(o_i,t) ], r^ = clip(r, 1 - eps_low^IS, 1 + eps_high^IS); the
#         paper imposes no lower bound (eps_low^IS large) and tunes only eps_high^IS. Every
#         token keeps its gradient r^ A grad log pi, also where PPO would clip it to 0.


def sequence_ratio(logp_seq, old_logp_seq):
    """[GSPO] s_i of one response (a list of token log-probs), exp of the mean log-ratio."""
    n = len(logp_seq)
    return math.exp(math.fsum(lp - olp for lp, olp in zip(logp_seq, old_logp_seq)) / n)


def _branch(ratio, adv, eps_low, eps_high):
    """min(ratio A, clip(ratio) A) and d/d ratio of it (tie: the mean of both branches)."""
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clipped = min(max(ratio, lo), hi)
    d_clipped = adv if lo <= ratio <= hi else 0.0
    return _smaller(ratio * adv, adv, clipped * adv, d_clipped)


def gspo_losses(logp, old_logp, adv, eps_low, eps_high, level):
    """Per-token values of the GSPO (``level="sequence"``) or GSPO-token (``"sequence-token"``)
    surrogate loss of a ragged batch, and the derivative of each token's value with respect to
    every log-prob of its response: ``(values, d)`` with ``d[i][t][u] = d value_i,t / d logp_i,u``.

    Every token of response i carries the value -min(s_i A_i,t, clip(s_i) A_i,t). Sequence:
    d s_i / d logp_i,u = s_i / |y_i| for every u (the ratio is the response's). Sequence-token:
    the value's gradient flows only through token t's own log-prob, d / d logp_i,t = s_i."""
    values, d = [], []
    for lp, olp, a in zip(logp, old_logp, adv):
        n = len(lp)
        if n == 0:
            values.append([])
            d.append([])
            continue
        s = sequence_ratio(lp, olp)
        vals, ds = [], []
        for t in range(n):
            obj, d_obj = _branch(s, a[t], eps_low, eps_high)
            vals.append(-obj)
            if level == "sequence":
                ds.append([-d_obj * s / n] * n)
            else:
                ds.append([-d_obj * s if u == t else 0.0 for u in range(n)])
        values.append(vals)
        d.append(ds)
    return values, d


def cispo_token_loss(logp, old_logp, adv, eps_high):
    """[CISPO] one token: value -w A logp with w = min(ratio, 1 + eps_high) held constant, and
    d / d logp = -w A (the weight does not take part in the gradient)."""
    w = min(math.exp(logp - old_logp), 1.0 + eps_high)
    return -w * adv * logp, -w * adv


def aggregate_with_gradient(values, d, agg, max_len=None):
    """``aggregate(values)`` and its derivative with respect to every log-prob (A0 is linear):
    d loss / d logp_i,u = sum_t w_i,t d[i][t][u]."""
    weights = aggregate_weights([len(v) for v in values], agg, max_len)
    loss = math.fsum(w * v for ws, vs in zip(weights, values) for w, v in zip(ws, vs))
    grad = []
    for ws, ds in zip(weights, d):
        n = len(ws)
        grad.append([math.fsum(ws[t] * ds[t][u] for t in range(n)) for u in range(n)])
    return loss, grad


# ---------------------------------------------------------------------------
# Importance-sampling corrections for an engine that sampled the tokens
# ---------------------------------------------------------------------------
#
# [TIS]   Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
#         Training": the policy gradient of tokens sampled by the engine, reweighted by the
#         truncated importance ratio min(pi_old(y_t) / pi_engine(y_t), C), a constant.
# [MIS]   The Ling team's IcePop (2025) and the Qwen team's analysis of the mismatch (2025):
#         tokens, or whole sequences, whose ratio leaves [1/C, C] are masked out of the update.
#         At the "geometric" level (verl's name) a sequence's ratio is the geometric mean of its
#         token ratios (length-normalised), bounded after the mean.
# The ratio's log is bounded by 20 before exp (verl's safety bound), as in the core.

IS_LOG_BOUND_REF = 20.0


def _bounded(x):
    return max(-IS_LOG_BOUND_REF, min(IS_LOG_BOUND_REF, x))


def is_log_ratios(old_logp_seq, engine_logp_seq, level):
    """log rho of every token of one response: its own (bounded by +-20), or (``level=
    "geometric"``) the mean over the response of the raw token log-ratios, bounded after."""
    raw = [o - e for o, e in zip(old_logp_seq, engine_logp_seq)]
    if level == "token" or not raw:
        return [_bounded(x) for x in raw]
    return [_bounded(math.fsum(raw) / len(raw))] * len(raw)


def tis_weights(old_logp_seq, engine_logp_seq, level, threshold):
    """[TIS] min(rho, C) of every token of one response."""
    return [min(math.exp(x), threshold) for x in is_log_ratios(old_logp_seq, engine_logp_seq, level)]


def mis_keep(old_logp_seq, engine_logp_seq, level, threshold):
    """[MIS] whether each token of one response stays: its ratio within [1/C, C]."""
    bound = math.log(threshold)
    return [-bound <= x <= bound for x in is_log_ratios(old_logp_seq, engine_logp_seq, level)]


def mismatch_kl(old_logp, engine_logp):
    """Mean over every token of rho - 1 - log rho (k3 of KL(engine || trainer), tokens drawn from
    the engine); ragged batch."""
    terms = []
    for olp, elp in zip(old_logp, engine_logp):
        for x in is_log_ratios(olp, elp, "token"):
            terms.append(math.expm1(x) - x)
    return math.fsum(terms) / len(terms) if terms else 0.0
