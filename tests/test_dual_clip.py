"""The core's clipped_policy_loss made safe: the bounded ratio and the dual clip.

Compared token by token with the float64 oracle twin (``reference.grpo_math.bounded_ratio``,
``dual_clip_token_loss``) and the oracle's aggregation weights; the pre-fix loss (kept in
``tests/wrong_estimators.py`` as ``loss_unbounded_ratio``) is shown to overflow where the
new one stays finite.
"""

import math

import pytest
import torch

import grpo_core as core
import reference.grpo_math as ref
from grpo_core.losses import LOG_RATIO_MAX, bounded_ratio
from grpo_core.testing.kit import check_estimator
from tests import wrong_estimators as wrong

F64 = torch.float64
RTOL = {F64: 1e-12, torch.float32: 2e-6}
LOG_RATIOS = [-100.0, -25.0, -3.0, -0.5, -0.3, -0.1, 0.0, 0.05, 0.2, 0.4, 1.0, 1.3, 2.5, 29.0,
              49.9, 50.5, 60.0, 100.0]
ADVS = [-2.0, -0.7, 0.6, 1.5]


def _batch(dtype):
    """One token per (log-ratio, advantage), spread over ragged rows plus one empty row."""
    pairs = [(x, a) for x in LOG_RATIOS for a in ADVS]
    lengths = [30, 0, 17, len(pairs) - 47]
    t_len = max(lengths)
    logp = torch.full((len(lengths), t_len), -1.0, dtype=F64)
    old, adv = logp.clone(), torch.zeros_like(logp)
    mask = torch.zeros_like(logp)
    rows, k = [], 0
    for i, n in enumerate(lengths):
        rows.append(pairs[k:k + n])
        for t, (x, a) in enumerate(pairs[k:k + n]):
            logp[i, t], old[i, t], adv[i, t], mask[i, t] = -1.0 - max(-x, 0), 0, a, 1
            old[i, t] = logp[i, t] - x
        k += n
    return [t.to(dtype) for t in (logp, old, adv, mask)], lengths, rows


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip_ratio_c", [None, 1.5, 3.0])
def test_loss_and_gradient_equal_the_oracle_twin(dtype, agg, clip_ratio_c):
    (logp, old, adv, mask), lengths, rows = _batch(dtype)
    lp = logp.clone().requires_grad_(True)
    loss, stats = core.clipped_policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28,
                                           agg=agg, clip_ratio_c=clip_ratio_c)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    weights = ref.aggregate_weights(lengths, agg)
    want, scale, n_dual = [], [], 0
    for i, row in enumerate(rows):
        for t, (x, a) in enumerate(row):
            x = float(logp[i, t].double() - old[i, t].double())  # the log-ratio as stored
            tok, d = ref.dual_clip_token_loss(x, 0.0, a, 0.2, 0.28, clip_ratio_c)
            want.append(weights[i][t] * tok)
            scale.append(abs(weights[i][t] * tok))
            size = weights[i][t] * ref.bounded_ratio(x)[0] * abs(a)
            tiny = torch.finfo(dtype).tiny  # exp(-100) underflows in float32
            assert abs(float(grad[i, t]) - weights[i][t] * d) <= RTOL[dtype] * size + tiny, (x, a)
            capped = clip_ratio_c is not None and a < 0
            n_dual += capped and math.exp(min(x, LOG_RATIO_MAX)) > clip_ratio_c
    assert abs(float(loss.detach()) - math.fsum(want)) <= RTOL[dtype] * math.fsum(scale)
    assert stats["clip_frac_dual"] == n_dual / int(mask.sum())
    assert grad[mask == 0].abs().sum() == 0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_bounded_ratio_is_exp_in_the_normal_range(dtype):
    x = torch.linspace(-30.0, LOG_RATIO_MAX, 2001, dtype=dtype).requires_grad_(True)
    r = bounded_ratio(x)
    assert torch.equal(r, torch.exp(x.detach()))
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.equal(g, torch.exp(x.detach()))


def test_bounded_ratio_is_finite_for_any_finite_log_ratio_in_float32():
    big = torch.finfo(torch.float32).max
    x = torch.tensor([50.0001, 88.8, 100.0, 1e4, 1e30, big, -big, -1e4], requires_grad=True)
    r = bounded_ratio(x)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert bool(torch.isfinite(r).all()) and bool(torch.isfinite(g).all())
    cap = math.exp(LOG_RATIO_MAX)
    above = x.detach() > LOG_RATIO_MAX
    assert torch.allclose(r[above].double(), torch.tensor(cap, dtype=F64), rtol=1e-6)
    assert torch.allclose(g[above].double(), torch.tensor(cap, dtype=F64), rtol=1e-6)


def test_beyond_the_bound_a_negative_advantage_keeps_pushing_down():
    """The chosen gradient above the bound: that at the bound (A < 0, no dual clip), not 0
    as a plain clamp of the log-ratio would give, not inf as exp would in float32."""
    for x in (55.0, 100.0):
        lp = torch.tensor([[x - 1.0]], requires_grad=True)
        loss, _ = core.clipped_policy_loss(lp, torch.tensor([[-1.0]]), torch.tensor([[-0.5]]),
                                           torch.ones(1, 1), eps_low=0.2, eps_high=0.2,
                                           agg="token-mean")
        (g,) = torch.autograd.grad(loss, lp)
        assert float(g) == pytest.approx(0.5 * math.exp(LOG_RATIO_MAX), rel=1e-6)
        assert float(loss.detach()) == pytest.approx(0.5 * math.exp(LOG_RATIO_MAX), rel=1e-6)


def test_the_pre_fix_loss_overflows_and_the_kit_row_catches_it():
    x = torch.tensor([[99.0]], requires_grad=True)
    old, adv, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1)
    assert math.isinf(float(wrong.loss_unbounded_ratio(x, old, adv, mask).detach()))
    rows = {r.name: r for r in check_estimator(wrong.loss_unbounded_ratio, "loss")}
    assert rows["finite_extreme"].failed
    loss, _ = core.clipped_policy_loss(x, old, adv, mask, eps_low=0.2, eps_high=0.28,
                                       agg="token-mean")
    assert math.isfinite(float(loss.detach()))


def test_dual_clip_caps_the_loss_at_c_times_abs_a():
    lp = torch.tensor([[math.log(5.0), math.log(2.0), math.log(5.0)]], dtype=F64,
                      requires_grad=True)
    adv = torch.tensor([[-2.0, -2.0, 2.0]], dtype=F64)
    loss, stats = core.clipped_policy_loss(lp, torch.zeros(1, 3, dtype=F64), adv,
                                           torch.ones(1, 3, dtype=F64), eps_low=0.2,
                                           eps_high=0.2, agg="seq-mean-token-sum",
                                           clip_ratio_c=3.0)
    (g,) = torch.autograd.grad(loss, lp)
    # ratio 5 > c: 3 * 2; ratio 2 < c: 2 * 2 (unclipped, A < 0); A > 0 at 5: clipped, -1.2 * 2
    assert float(loss.detach()) == pytest.approx(6.0 + 4.0 - 2.4, rel=1e-15)
    assert g[0].tolist() == pytest.approx([0.0, 4.0, 0.0], rel=1e-15)
    assert stats["clip_frac_dual"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0, float("nan"), True, "3"])
def test_clip_ratio_c_must_be_above_one(bad):
    with pytest.raises(ValueError, match="clip_ratio_c must be None or a number > 1"):
        core.clipped_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                 torch.ones(1, 2), eps_low=0.2, eps_high=0.2, agg="token-mean",
                                 clip_ratio_c=bad)
