"""Micro-batch accumulation: the gradient of a minibatch split into micro-batches, each loss
divided by the minibatch's global count, equals the one-shot gradient for every aggregation;
the classic per-micro-batch mean (transformers' gradient-accumulation bug) does not."""

from __future__ import annotations

import pytest
import torch

import grpo_core as core
from adapters.cartpole import CartPoleAdapter
from grpo_core.config import GRPOConfig
from grpo_core.loop import GRPOTrainer
from grpo_core.testing import strategies as gs

F64 = torch.float64
KW = dict(beta=0.1, ent_coef=0.01, kl_estimator="k3", eps_low=0.2, eps_high=0.28, max_len=40)


def _batch(seed=0):
    """Rows of very different lengths (one empty): micro-batches hold uneven token counts."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 37, 0, 5, 22, 3, 40, 2]
    ragged = [torch.randn(n, generator=gen, dtype=F64).tolist() for n in lengths]
    fields = []
    for k in range(5):
        vals = [[v * 0.3 - (1.0 if k < 3 else -1.0) for v in r] for r in ragged]
        fields.append(gs.pad(vals, 40, F64, 0.0, seed=seed)[0])
    mask = gs.pad(ragged, 40, F64, seed=seed)[1]
    lp, olp, rlp, adv, ent = fields
    olp = lp + 0.2 * torch.randn(lp.shape, generator=gen, dtype=F64)
    return lp, olp, rlp, adv * 3, ent.abs(), mask


def _grad(lp, olp, rlp, adv, ent, mask, agg, splits, *, global_count=True):
    x = lp.clone().requires_grad_(True)
    total = core.agg_count(mask, agg) if global_count else None
    losses = []
    for rows in splits:
        loss, _ = core.grpo_loss(x[rows], olp[rows], rlp[rows], adv[rows], mask[rows], entropy=ent[rows],
                                 agg=agg, total=total, **KW)
        losses.append(loss)
    if not global_count:  # the bug: each micro-batch's own mean, averaged over micro-batches
        losses = [sum(losses) / len(losses)]
    (g,) = torch.autograd.grad(sum(losses), x)
    return g


@pytest.mark.parametrize("agg", core.AGGS)
@pytest.mark.parametrize("size", [1, 3, 5])
def test_accumulated_gradient_equals_one_shot(agg, size):
    batch = _batch()
    rows = torch.arange(8)
    one_shot = _grad(*batch, agg, [rows])
    accumulated = _grad(*batch, agg, list(rows.split(size)))
    torch.testing.assert_close(accumulated, one_shot, rtol=1e-10, atol=1e-14)
    wrong = _grad(*batch, agg, list(rows.split(size)), global_count=False)
    if agg != "seq-mean-token-sum-norm" or size != 1:  # rows x max_len: equal splits agree
        assert (wrong - one_shot).abs().max() > 1e-6, "the per-micro-batch mean went unnoticed"


def _cartpole(micro, agg, iterations=2):
    cfg = GRPOConfig(group_size=3, groups_per_iteration=2, grpo_epochs=2, minibatches=2, beta=0.1,
                     ent_coef=0.01, lr=1e-2, seed=4, loss_agg=agg, micro_batch_size=micro)
    tr = GRPOTrainer(CartPoleAdapter(seed=4, hidden=16, dtype=F64), cfg)
    metrics = [tr.step() for _ in range(iterations)]
    return {k: v.clone() for k, v in tr.policy.state_dict().items()}, metrics


@pytest.mark.parametrize("agg", core.AGGS)
def test_trainer_with_micro_batches_equals_one_pass(agg):
    """CartPole in float64: micro-batches of 1 and 2 rows train to the parameters of one pass
    per minibatch, and log the same metrics."""
    base, m0 = _cartpole(None, agg)
    for micro in (1, 2):
        got, m1 = _cartpole(micro, agg)
        for k in base:
            torch.testing.assert_close(got[k], base[k], rtol=1e-10, atol=1e-12)
        for a, b in zip(m0, m1):
            for key in ("loss", "policy_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high",
                        "approx_kl", "ratio_min", "ratio_max"):
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_micro_batch_size_is_validated():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="micro_batch_size"):
            GRPOConfig(micro_batch_size=bad)


def test_merged_micro_stats_by_hand():
    """merge_micro_stats on made-up values: loss terms add, token shares are token-weighted,
    the ratio range spans only micro-batches with tokens; one without tokens anywhere gives
    shares of 0 and the first micro-batch's range."""
    from grpo_core.loop import merge_micro_stats

    def st(loss, clip, lo, hi):
        return {"loss": loss, "policy_loss": loss / 2, "kl": 0.1, "entropy": 0.2, "clip_frac_low": clip,
                "clip_frac_high": 0.0, "clip_frac_dual": 0.0, "approx_kl": clip / 10, "ratio_min": lo, "ratio_max": hi}

    got = merge_micro_stats([(st(1.0, 0.5, 0.9, 1.1), 2), (st(3.0, 0.0, 0.1, 9.0), 0), (st(2.0, 0.25, 0.8, 1.3), 6)])
    assert got["loss"] == 6.0 and got["policy_loss"] == 3.0 and got["kl"] == pytest.approx(0.3)
    assert got["clip_frac_low"] == pytest.approx((0.5 * 2 + 0.25 * 6) / 8)
    assert got["approx_kl"] == pytest.approx((0.05 * 2 + 0.025 * 6) / 8)
    assert (got["ratio_min"], got["ratio_max"]) == (0.8, 1.3)  # the empty micro-batch's 0.1 and 9 are ignored
    empty = merge_micro_stats([(st(0.0, 0.0, 0.7, 1.2), 0), (st(0.0, 0.0, 0.5, 1.5), 0)])
    assert empty["clip_frac_low"] == 0.0 and empty["approx_kl"] == 0.0
    assert (empty["ratio_min"], empty["ratio_max"]) == (0.7, 1.2)
    one = st(1.0, 0.5, 0.9, 1.1)
    assert merge_micro_stats([(one, 3)]) == one


def test_each_forward_holds_at_most_micro_batch_size_rows():
    """micro_batch_size bounds the rows of each gradient forward (one graph alive at a time);
    without it the minibatch goes in one forward."""
    from tests.toy_adapter import ToyAdapter

    class Counting(ToyAdapter):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def logp_and_entropy(self, model, rollout, rows):
            if torch.is_grad_enabled():
                self.sizes.append(len(rows))
            return super().logp_and_entropy(model, rollout, rows)

    for size, want in ((3, [3, 3, 2, 3, 3, 2]), (None, [8, 8])):
        ad = Counting()
        cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=2, minibatches=1, beta=0.0,
                         micro_batch_size=size)
        GRPOTrainer(ad, cfg).step()
        assert ad.sizes == want
