"""Estimators written to match real trainers' conventions: the kit's regression set.

Each function follows the convention of a trainer as its documentation and source describe it
(TRL's GRPOTrainer, verl's core_algos), written here from those descriptions, and declares
the claims that are true of it. :data:`REGRESSION` lists every (estimator, claims) pair the
kit is held against with the verdict it must give: the exit status of
``grpo-harness check-estimator`` and the exact set of failed rows. A true claim never fails;
a false one fails the row that names it; a real defect (float32 noise on tied groups, an
overflow at a large log-ratio, verl issue 3741) fails its row with the measured number.

Not a test module (no ``test_`` prefix): ``tests/test_kit_regression.py`` runs the table.
"""

from __future__ import annotations

import torch

from grpo_core.testing.kit import declares

# ---------------------------------------------------------------------------------------------
# Advantages: fn(scores (B, G)) -> (B, G)
# ---------------------------------------------------------------------------------------------


@declares(std_scaled=True, bessel=True, eps=1e-4, singleton="unsupported")
def trl_group_advantage(scores):
    """TRL GRPOTrainer, ``scale_rewards="group"``: (r - group mean) / (group std + 1e-4), the
    std with Bessel's correction (torch.std); TRL refuses ``num_generations < 2``."""
    mean = scores.mean(-1, keepdim=True)
    std = scores.std(-1, keepdim=True)
    return (scores - mean) / (std + 1e-4)


@declares(std_scaled=True, bessel=True, eps=1e-6, singleton="raw")
def verl_grpo_advantage(scores):
    """verl ``compute_grpo_outcome_advantage`` (``norm_adv_by_std_in_grpo=True``): per group
    torch.mean and torch.std, a group of one gets mean 0 and std 1 (its score passes through);
    (s - mean) / (std + 1e-6), in the scores' dtype (float32 in verl)."""
    if scores.shape[-1] == 1:
        mean, std = torch.zeros_like(scores), torch.ones_like(scores)
    else:
        mean, std = scores.mean(-1, keepdim=True), scores.std(-1, keepdim=True)
    return (scores - mean) / (std + 1e-6)


def _count_bessel_std(scores):
    """The group std the way TRL's ``nanstd`` builds it: the population variance (a NaN-aware
    mean of squared deviations) times ``count / (count - 1)``, where ``count`` is an integer
    tensor. Dividing two integer tensors gives torch's default float dtype, so the Bessel
    factor is rounded to float32 even when the scores are float64 (8/7 and 16/15 are off by a
    few 1e-8 relative; 2 and 3/2 are exact)."""
    count = (~torch.isnan(scores)).sum(-1, keepdim=True)  # int64
    centre = torch.nanmean(scores, -1, keepdim=True)
    variance = torch.nanmean((scores - centre) ** 2, -1, keepdim=True)
    factor = count / (count - 1)  # float32, whatever the scores' dtype
    return (variance * factor).sqrt()


@declares(std_scaled=True, bessel=True, eps=1e-4, singleton="unsupported")
def trl_nanstd_advantage(scores):
    """TRL's group advantage with the std from its ``nanstd``: (r - mean) / (std + 1e-4), the
    Bessel factor computed in float32 from integer counts (see :func:`_count_bessel_std`)."""
    return (scores - scores.mean(-1, keepdim=True)) / (_count_bessel_std(scores) + 1e-4)


@declares(std_scaled=True, bessel=True, eps=1e-6, singleton="raw")
def verl_float32_singleton_advantage(scores):
    """verl's GRPO outcome advantage with its singleton constants as verl writes them: a group
    of one gets ``mean = torch.tensor(0.0)`` and ``std = torch.tensor(1.0)``, float32 scalars,
    so a float64 score is divided by the float32 number nearest 1 + 1e-6 (1 + 9.5367e-7)."""
    if scores.shape[-1] == 1:
        mean, std = torch.tensor(0.0), torch.tensor(1.0)  # default dtype: float32
    else:
        mean, std = scores.mean(-1, keepdim=True), scores.std(-1, keepdim=True)
    return (scores - mean) / (std + 1e-6)


@declares(std_scaled=True, bessel=True, eps=1e-8, singleton="unsupported")
def textbook_advantage(scores):
    """The textbook one-liner (s - mean) / (std + 1e-8); run in float32 it turns the rounding
    leftover of a tied group's mean into advantages of order 1."""
    return (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-8)


@declares(std_scaled=False, singleton="zero")
def dr_grpo_advantage(scores):
    """Dr. GRPO (Liu et al. 2025; TRL ``scale_rewards="none"``): r - group mean, no std. A tied
    group keeps the mean's rounding leftover (an ulp), not amplified."""
    return scores - scores.mean(-1, keepdim=True)


@declares(std_scaled=False, leave_one_out=True, singleton="raw")
def verl_rloo_advantage(scores):
    """verl ``compute_rloo_outcome_advantage``: each outcome score minus the mean of the other
    G - 1 scores of its group, written as G/(G - 1) (s - group mean); no std. A group of one
    has no other sample and keeps its score (its mean is taken as 0 and nothing is rescaled)."""
    g = scores.shape[-1]
    if g == 1:
        return scores.clone()
    return (scores - scores.mean(-1, keepdim=True)) * (g / (g - 1))


@declares(std_scaled=True, bessel=True, eps=1e-6, leave_one_out=True, singleton="zero")
def rloo_std_advantage(scores):
    """RLOO scaled by the group's std (the core's ``baseline="leave-one-out"``, ``scale="group"``):
    the literal leave-one-out baseline, s - (sum of the others) / (G - 1), over the Bessel std
    of the whole group + 1e-6; a group of one, or of equal scores, gets 0."""
    g = scores.shape[-1]
    if g == 1:
        return torch.zeros_like(scores)
    others = (scores.sum(-1, keepdim=True) - scores) / (g - 1)
    std = scores.std(-1, keepdim=True)
    tied = scores.amax(-1, keepdim=True) == scores.amin(-1, keepdim=True)
    out = (scores - others) / (std + 1e-6)
    return torch.where(tied, torch.zeros_like(out), out)


# ---------------------------------------------------------------------------------------------
# KL: fn(logp, ref_logp) -> per token
# ---------------------------------------------------------------------------------------------


@declares(unbiased=True, nonnegative=True, grad="neither", clamp=10.0)
def verl_low_var_kl(logp, ref_logp):
    """verl ``kl_penalty="low_var_kl"``: k3 = exp(d) - d - 1 with d = ref - logp clamped to
    [-20, 20], the result clamped to [-10, 10]. Unbiased below the clamp; the clamp biases it
    and zeroes its gradient where reached, so it follows neither KL's gradient."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


@declares(unbiased=False, nonnegative=True, grad="neither")
def verl_abs_kl(logp, ref_logp):
    """verl ``kl_penalty="abs"``: |logp - ref_logp|."""
    return (logp - ref_logp).abs()


# ---------------------------------------------------------------------------------------------
# Policy losses: fn(logp, old_logp, adv, mask) -> scalar
# ---------------------------------------------------------------------------------------------


def _verl_token_loss(logp, old_logp, adv, low, high, c):
    """verl ``compute_policy_loss_vanilla``: log-ratio clamped to [-20, 20], PPO clip, dual
    clip c for A < 0."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    ppo = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    return torch.where(adv < 0, torch.minimum(-adv * c, ppo), ppo)


@declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=3.0)
def verl_policy_loss(logp, old_logp, adv, mask):
    """verl vanilla policy loss, ``loss_agg_mode="token-mean"`` (masked sum / (mask sum + 1e-8)),
    clip_ratio_low 0.2, clip_ratio_high 0.28, clip_ratio_c 3."""
    tok = _verl_token_loss(logp, old_logp, adv, 0.2, 0.28, 3.0)
    return (tok * mask).sum() / (mask.sum() + 1e-8)


@declares(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-sum-norm", max_len=48, clip_ratio_c=3.0)
def verl_sum_norm_loss(logp, old_logp, adv, mask):
    """verl ``loss_agg_mode="seq-mean-token-sum-norm"`` as in verl issue 3741: the masked token
    sum of the batch divided by ``loss_mask.shape[-1]``, with no division by the number of
    sequences. Declared as Dr. GRPO, which it is not."""
    tok = _verl_token_loss(logp, old_logp, adv, 0.2, 0.2, 3.0)
    return (tok * mask).sum(-1).sum() / mask.shape[-1]


def _trl_token_loss(logp, old_logp, adv, low=0.2, high=0.2):
    """TRL GRPOTrainer: coef_1 = exp(log-ratio) (no bound), -min(coef_1 A, clip(coef_1) A)."""
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = coef_1.clamp(1 - low, 1 + high)
    return -torch.minimum(coef_1 * adv, coef_2 * adv)


@declares(eps_low=0.2, eps_high=0.2, agg="grpo")
def trl_grpo_loss(logp, old_logp, adv, mask):
    """TRL ``loss_type="grpo"``: each completion's token mean (mask sum clamped at 1), then the
    mean over every completion."""
    tok = _trl_token_loss(logp, old_logp, adv)
    return ((tok * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@declares(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-sum-norm", max_len=48)
def trl_dr_grpo_loss(logp, old_logp, adv, mask):
    """TRL ``loss_type="dr_grpo"``: masked sum / (batch size x max_completion_length = 48)."""
    tok = _trl_token_loss(logp, old_logp, adv)
    return (tok * mask).sum() / (tok.size(0) * 48)


def _masked_row_mean(x, mask):
    """Per row, the mean of ``x`` over the valid tokens (a row with none: 0)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@declares(eps_low=3e-4, eps_high=4e-4, agg="grpo", clip_ratio_c=None, ratio_level="sequence",
          policy_loss="ppo")
def trl_gspo_loss(logp, old_logp, adv, mask):
    """TRL GRPOTrainer with ``importance_sampling_level="sequence"`` (GSPO), ``loss_type="grpo"``,
    epsilon 3e-4 / epsilon_high 4e-4 (the GSPO paper's range): the response's log-ratio is the
    masked mean of its tokens' log-ratios, kept as an (N, 1) column; its exp is clipped once
    and broadcast over the row's tokens."""
    log_s = _masked_row_mean(logp - old_logp, mask).unsqueeze(-1)
    s = torch.exp(log_s)
    tok = -torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    return _masked_row_mean(tok, mask).mean()


@declares(eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean", clip_ratio_c=None,
          ratio_level="sequence-token", policy_loss="ppo")
def verl_gspo_loss(logp, old_logp, adv, mask):
    """verl ``policy_loss.loss_mode="gspo"``: GSPO-token, the ratio's value the response's
    (masked mean log-ratio, detached) and its gradient the token's own
    (``logp - sg(logp) + sg(log s)``), the log-ratio capped at 10 before exp, clip range 3e-4 /
    4e-4; the loss averaged per response, then over the responses that have a valid token."""
    log_s = _masked_row_mean(logp - old_logp, mask).detach().unsqueeze(-1)
    log_st = (logp - logp.detach() + log_s).clamp(max=10.0)
    st = torch.exp(log_st)
    tok = torch.maximum(-adv * st, -adv * st.clamp(1 - 3e-4, 1 + 4e-4))
    rows = mask.sum(-1) > 0
    return _masked_row_mean(tok, mask)[rows].sum() / rows.sum().clamp(min=1)


@declares(eps_high=0.2, agg="token-mean", clip_ratio_c=None, ratio_level="token",
          policy_loss="cispo")
def verl_cispo_loss(logp, old_logp, adv, mask):
    """verl ``policy_loss.loss_mode="cispo"`` (MiniMax-M1's CISPO): the token's ratio (log-ratio
    clamped to [-20, 20]) clamped to [1 - clip_ratio_low, 1 + clip_ratio_high] with
    clip_ratio_low 10 (no lower bound for a positive ratio) and clip_ratio_high 0.2, detached, as
    the weight of -A logp; token-mean (masked sum / (mask sum + 1e-8))."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    weight = ratio.clamp(1 - 10.0, 1 + 0.2).detach()
    tok = -adv * weight * logp
    return (tok * mask).sum() / (mask.sum() + 1e-8)


# ---------------------------------------------------------------------------------------------
# The regression table: (label, function name, kind, claims overriding the declared ones,
# expected exit status, expected failed rows exactly)
# ---------------------------------------------------------------------------------------------

REGRESSION = [
    ("TRL advantage, true claims", "trl_group_advantage", "advantage", {}, 0, set()),
    ("TRL advantage, false eps=1e-8", "trl_group_advantage", "advantage", {"eps": 1e-8}, 1,
     {"eps"}),
    ("TRL advantage, false singleton=zero", "trl_group_advantage", "advantage",
     {"singleton": "zero"}, 1, {"group_size_one"}),
    ("verl advantage, true claims", "verl_grpo_advantage", "advantage", {}, 1, {"ties_float32"}),
    ("verl advantage, false singleton=zero", "verl_grpo_advantage", "advantage",
     {"singleton": "zero"}, 1, {"group_size_one", "ties_float32"}),
    ("verl advantage, false bessel=false", "verl_grpo_advantage", "advantage",
     {"bessel": False}, 1, {"bessel", "ties_float32"}),
    ("TRL advantage, Bessel factor in float32 (nanstd), true claims", "trl_nanstd_advantage",
     "advantage", {}, 0, set()),
    ("TRL advantage, float32 Bessel factor, false bessel=false", "trl_nanstd_advantage",
     "advantage", {"bessel": False}, 1, {"bessel"}),
    ("TRL advantage, float32 Bessel factor, false eps=1e-5", "trl_nanstd_advantage",
     "advantage", {"eps": 1e-5}, 1, {"eps"}),
    ("verl advantage, float32 singleton constants, true claims",
     "verl_float32_singleton_advantage", "advantage", {}, 1, {"ties_float32"}),
    ("verl advantage, float32 singleton constants, false singleton=zero",
     "verl_float32_singleton_advantage", "advantage", {"singleton": "zero"}, 1,
     {"group_size_one", "ties_float32"}),
    ("textbook advantage (float32 ties), true claims", "textbook_advantage", "advantage", {}, 1,
     {"ties_float32"}),
    ("Dr. GRPO advantage, true claims", "dr_grpo_advantage", "advantage", {}, 0, set()),
    ("Dr. GRPO advantage, false std_scaled", "dr_grpo_advantage", "advantage",
     {"std_scaled": True}, 1, {"unit_scale", "affine_invariance"}),
    ("verl low_var_kl, true claims (clamp=10)", "verl_low_var_kl", "kl", {}, 0, set()),
    ("verl low_var_kl, clamp not declared", "verl_low_var_kl", "kl",
     {"clamp": "undeclared", "grad": "kl_ref_policy"}, 1, {"unbiased", "grad_direction"}),
    ("verl low_var_kl, false clamp=20", "verl_low_var_kl", "kl", {"clamp": 20.0}, 1, {"clamp"}),
    ("verl abs KL, true claims", "verl_abs_kl", "kl", {}, 0, set()),
    ("verl policy loss, true claims", "verl_policy_loss", "loss", {}, 0, set()),
    ("verl policy loss, false agg=seq-mean-token-mean", "verl_policy_loss", "loss",
     {"agg": "seq-mean-token-mean"}, 1, {"aggregation"}),
    ("verl policy loss, false eps_high=0.2", "verl_policy_loss", "loss", {"eps_high": 0.2}, 1,
     {"eps_high"}),
    ("verl policy loss, false clip_ratio_c=none", "verl_policy_loss", "loss",
     {"clip_ratio_c": None}, 1, {"clip_ratio_c"}),
    ("verl seq-mean-token-sum-norm (issue 3741) declared Dr. GRPO", "verl_sum_norm_loss", "loss",
     {}, 1, {"aggregation", "padding_invariance"}),
    ("TRL grpo loss, true claims", "trl_grpo_loss", "loss", {}, 1, {"finite_extreme"}),
    ("TRL grpo loss, false agg=seq-mean-token-mean", "trl_grpo_loss", "loss",
     {"agg": "seq-mean-token-mean"}, 1, {"aggregation", "finite_extreme"}),
    ("TRL dr_grpo loss, true claims", "trl_dr_grpo_loss", "loss", {}, 1, {"finite_extreme"}),
    ("TRL dr_grpo loss, false max_len=64", "trl_dr_grpo_loss", "loss", {"max_len": 64}, 1,
     {"aggregation", "finite_extreme"}),
    ("verl RLOO advantage, true claims", "verl_rloo_advantage", "advantage", {}, 0, set()),
    ("verl RLOO advantage, false leave_one_out=false", "verl_rloo_advantage", "advantage",
     {"leave_one_out": False}, 1, {"leave_one_out"}),
    ("verl RLOO advantage, false std_scaled", "verl_rloo_advantage", "advantage",
     {"std_scaled": True}, 1, {"unit_scale", "affine_invariance"}),
    ("RLOO over the group std, true claims", "rloo_std_advantage", "advantage", {}, 0, set()),
    ("RLOO over the group std, leave_one_out not declared", "rloo_std_advantage", "advantage",
     {"leave_one_out": "undeclared"}, 0, set()),
    ("RLOO over the group std, false leave_one_out=false", "rloo_std_advantage", "advantage",
     {"leave_one_out": False}, 1, {"leave_one_out"}),
    ("TRL grpo advantage, false leave_one_out", "trl_group_advantage", "advantage",
     {"leave_one_out": True}, 1, {"leave_one_out"}),
    ("TRL GSPO loss, true claims", "trl_gspo_loss", "loss", {}, 0, set()),
    ("TRL GSPO loss, false ratio_level=token", "trl_gspo_loss", "loss",
     {"ratio_level": "token"}, 1, {"ratio_level"}),
    ("TRL GSPO loss, false ratio_level=sequence-token", "trl_gspo_loss", "loss",
     {"ratio_level": "sequence-token"}, 1, {"ratio_level"}),
    ("TRL GSPO loss, false eps_high=0.28", "trl_gspo_loss", "loss", {"eps_high": 0.28}, 1,
     {"eps_high"}),
    ("verl GSPO-token loss, true claims", "verl_gspo_loss", "loss", {}, 0, set()),
    ("verl GSPO-token loss, false ratio_level=sequence", "verl_gspo_loss", "loss",
     {"ratio_level": "sequence"}, 1, {"ratio_level"}),
    ("verl CISPO loss, true claims", "verl_cispo_loss", "loss", {}, 0, set()),
    ("verl CISPO loss, false policy_loss=ppo", "verl_cispo_loss", "loss",
     {"policy_loss": "ppo"}, 1, {"policy_loss"}),
    ("verl CISPO loss, false eps_high=0.28", "verl_cispo_loss", "loss", {"eps_high": 0.28}, 1,
     {"eps_high"}),
    ("verl policy loss, false policy_loss=cispo", "verl_policy_loss", "loss",
     {"policy_loss": "cispo"}, 1, {"policy_loss", "weight"}),
    ("verl policy loss, false ratio_level=sequence", "verl_policy_loss", "loss",
     {"ratio_level": "sequence"}, 1, {"ratio_level"}),
]
