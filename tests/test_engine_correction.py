"""Importance-sampling corrections for an engine's samples (``grpo_core.losses.engine_correction``)
against the float64 oracle written from the papers (reference.grpo_math: [TIS] Yao et al. 2025;
[MIS] IcePop and the Qwen team's sequence masking): the full GRPO loss and its gradient at every
token, token and sequence level, with junk under the mask. Two of the field's mistakes are kept
next to them: a correction weight that is not detached, and masked tokens still counted in the
normaliser (slime issue 657)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_core.losses import AGGS, agg_loss, engine_correction, grpo_loss
from reference import grpo_math as ref

F64 = torch.float64
KW = dict(beta=0.05, ent_coef=0.0, kl_estimator="k3", eps_low=0.2, eps_high=0.28)


def batch(seed, rows=6, longest=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (rows,), generator=gen).tolist()
    lengths[1] = 0
    def draw(scale, shift=0.0):
        return [((torch.rand(n, generator=gen, dtype=F64) - 0.5) * scale + shift).tolist() for n in lengths]
    logp = draw(2.0, -1.5)
    old = [[x + d for x, d in zip(r, dr)] for r, dr in zip(logp, draw(0.6))]
    engine = [[x + d for x, d in zip(r, dr)] for r, dr in zip(old, draw(2.4))]  # ratios up to e^1.2 apart
    refl = [[x + d for x, d in zip(r, dr)] for r, dr in zip(logp, draw(0.4))]
    adv = [(torch.randn(n, generator=gen, dtype=F64)).tolist() for n in lengths]
    return logp, old, engine, refl, adv


def pad(ragged, width, fill):
    t = torch.full((len(ragged), width), fill, dtype=F64)
    m = torch.zeros(len(ragged), width, dtype=torch.bool)
    for i, row in enumerate(ragged):
        t[i, :len(row)] = torch.tensor(row, dtype=F64)
        m[i, :len(row)] = True
    return t, m


def core(logp, old, engine, refl, adv, *, mode, level, agg, threshold=2.0, detach=True, normaliser_keeps_masked=False):
    width = max(map(len, logp)) + 1
    lp, m = pad(logp, width, 3.0)
    o, _ = pad(old, width, -9.0)
    e, _ = pad(engine, width, 5.0)
    r, _ = pad(refl, width, 1.0)
    a, _ = pad(adv, width, 8.0)
    lp.requires_grad_(True)
    weight, keep, stats = engine_correction(o, e, m, mode=mode, level=level, threshold=threshold)
    total = None
    if normaliser_keeps_masked:  # slime issue 657: the rejected tokens still in the denominator
        from grpo_core.losses import agg_count
        total = agg_count(m, agg)
    if not detach and weight is not None:  # the broken variant: the weight left in the graph
        weight = torch.clamp(torch.exp(lp - e), max=threshold) * weight.detach() / weight.detach().clamp(min=1e-300)
    max_len = width if agg == "seq-mean-token-sum-norm" else None
    loss, _ = grpo_loss(lp, o, r, a, keep.to(F64), entropy=None, agg=agg, max_len=max_len, token_weight=weight,
                        total=total, **KW)
    loss.backward()
    return float(loss), lp.grad, stats, m


def oracle(logp, old, engine, refl, adv, *, mode, level, agg, threshold=2.0):
    weights = None
    if mode == "tis":
        weights = [ref.tis_weights(o, e, level, threshold) for o, e in zip(old, engine)]
    keep = [ref.mis_keep(o, e, level, threshold) if mode == "mis" else [True] * len(o) for o, e in zip(old, engine)]
    pick = lambda rows: [[x for x, k in zip(r, ks) if k] for r, ks in zip(rows, keep)]  # noqa: E731
    if weights is not None:
        weights = pick(weights)
    lp, o, r, a = pick(logp), pick(old), pick(refl), pick(adv)
    width = max(map(len, logp)) + 1
    loss, _, d = ref.grpo_loss(lp, o, r, a, [[0.0] * len(x) for x in lp], agg=agg,
                               max_len=width if agg == "seq-mean-token-sum-norm" else None, token_weights=weights, **KW)
    grads = []
    for ks, ds in zip(keep, d):  # put the kept tokens' derivatives back in place
        it = iter(ds)
        grads.append([next(it) if k else 0.0 for k in ks])
    return loss, grads


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "geometric"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(4))
def test_corrections_match_the_oracle_at_every_token(mode, level, agg, seed):
    data = batch(seed)
    c = 1.25 if level == "geometric" else 2.0  # a sequence's geometric mean strays less: a tighter C
    got, grad, stats, m = core(*data, mode=mode, level=level, agg=agg, threshold=c)
    want, want_grad = oracle(*data, mode=mode, level=level, agg=agg, threshold=c)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    for i, row in enumerate(want_grad):
        assert grad[i, :len(row)].tolist() == pytest.approx(row, rel=1e-10, abs=1e-15)
        assert torch.all(grad[i, len(row):] == 0)
    assert stats["mismatch_kl"] == pytest.approx(ref.mismatch_kl(data[1], data[2]), rel=1e-12)


def test_the_batches_actually_exercise_both_corrections():
    """Over the parity test's seeds and thresholds, the corrections truncate and mask some tokens
    and some rows, not all of them (a check that all or nothing happens would test nothing)."""
    def part(mode, level, key, c):
        fracs = [core(*batch(s), mode=mode, level=level, agg="token-mean", threshold=c)[2][key] for s in range(4)]
        return any(0 < f < 1 for f in fracs)

    assert part("tis", "token", "is_truncated_frac", 2.0) and part("mis", "token", "is_masked_frac", 2.0)
    assert part("mis", "geometric", "is_masked_seq_frac", 1.25) and part("tis", "geometric", "is_truncated_frac", 1.25)


def test_none_changes_nothing():
    data = batch(1)
    got, grad, _, _ = core(*data, mode="none", level="token", agg="token-mean")
    want, want_grad = oracle(*data, mode="none", level="token", agg="token-mean")
    assert got == pytest.approx(want, rel=1e-12)


def test_an_undetached_weight_has_another_gradient():
    data = batch(2)
    _, good, _, _ = core(*data, mode="tis", level="token", agg="token-mean")
    _, bad, _, _ = core(*data, mode="tis", level="token", agg="token-mean", detach=False)
    _, want = oracle(*data, mode="tis", level="token", agg="token-mean")
    assert good[0, :len(want[0])].tolist() == pytest.approx(want[0], rel=1e-10)
    assert not torch.allclose(good, bad)


def test_masked_tokens_in_the_normaliser_are_caught():
    """slime issue 657: the masked tokens left in the denominator shrink the loss by the kept
    share; the oracle divides by the kept tokens only."""
    data = batch(3)
    want, _ = oracle(*data, mode="mis", level="token", agg="token-mean")
    good, _, stats, _ = core(*data, mode="mis", level="token", agg="token-mean")
    bad, _, _, _ = core(*data, mode="mis", level="token", agg="token-mean", normaliser_keeps_masked=True)
    assert good == pytest.approx(want, rel=1e-12)
    assert bad == pytest.approx(want * (1 - stats["is_masked_frac"]), rel=1e-9) and bad != pytest.approx(want, rel=1e-3)


def test_bad_arguments_are_named():
    z = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="mode='clip'"):
        engine_correction(z, z, z, mode="clip", level="token", threshold=2.0)
    with pytest.raises(ValueError, match="threshold must be a number > 1"):
        engine_correction(z, z, z, mode="tis", level="token", threshold=1.0)



def test_the_geometric_mean_is_bounded_after_it_is_taken():
    """One token 30 nats apart among 99 equal ones: its own log-ratio is bounded to 20, but the
    row's mean of the raw log-ratios is -0.3 (bounding first would give -0.2)."""
    old = torch.zeros(1, 100, dtype=F64)
    engine = torch.zeros(1, 100, dtype=F64)
    engine[0, 0] = 30.0
    w, _, _ = engine_correction(old, engine, torch.ones(1, 100), mode="tis", level="geometric", threshold=2.0)
    assert float(w[0, 5]) == pytest.approx(math.exp(-0.3), rel=1e-12)
    assert ref.tis_weights([0.0] * 100, [30.0] + [0.0] * 99, "geometric", 2.0)[5] == pytest.approx(math.exp(-0.3))
