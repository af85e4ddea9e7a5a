"""GSPO, GSPO-token and CISPO against the float64 oracle (reference.grpo_math, written from the
papers: Zheng et al. 2025 sec. 4.1 and 4.3; MiniMax-M1 sec. 3.1), at every token, value and
gradient, with junk under the mask; their properties; and two of the field's mistakes kept as
broken variants: the sequence ratio broadcast along the wrong axis (EasyR1 issue 596) and a
CISPO weight that is not detached."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_core.losses import AGGS, clipped_policy_loss, cispo_loss, grpo_loss, sequence_log_ratio
from reference import grpo_math as ref

F64 = torch.float64


def ragged_batch(seed: int, rows: int = 5, longest: int = 6, empty: bool = True):
    """Ragged log-probs, old log-probs (within +-0.6 of them) and advantages; one empty row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (rows,), generator=gen).tolist()
    if empty:
        lengths[rows // 2] = 0
    logp = [(-torch.rand(n, generator=gen, dtype=F64) * 3).tolist() for n in lengths]
    old = [[x + float(d) for x, d in zip(lp, (torch.rand(len(lp), generator=gen, dtype=F64) - 0.5) * 1.2)]
           for lp in logp]
    adv = [(torch.randn(n, generator=gen, dtype=F64)).tolist() for n in lengths]
    return logp, old, adv


def padded(ragged, width, fill=7.0):
    t = torch.full((len(ragged), width), fill, dtype=F64)
    m = torch.zeros(len(ragged), width, dtype=F64)
    for i, row in enumerate(ragged):
        t[i, :len(row)] = torch.tensor(row, dtype=F64)
        m[i, :len(row)] = 1
    return t, m


def core_value_and_grad(fn, logp, old, adv, width, **kw):
    lp, m = padded(logp, width)
    o, _ = padded(old, width, fill=-3.0)
    a, _ = padded(adv, width, fill=11.0)
    lp.requires_grad_(True)
    loss, stats = fn(lp, o, a, m, **kw)
    loss.backward()
    return float(loss), lp.grad, m, stats


@pytest.mark.parametrize("agg", [a for a in AGGS if a != "seq-mean-token-sum-norm"] + ["seq-mean-token-sum-norm"])
@pytest.mark.parametrize("level", ["sequence", "sequence-token"])
@pytest.mark.parametrize("seed", range(6))
def test_gspo_matches_the_oracle_at_every_token(agg, level, seed):
    logp, old, adv = ragged_batch(seed)
    width = max(map(len, logp)) + 2
    max_len = width if agg == "seq-mean-token-sum-norm" else None
    got, grad, m, _ = core_value_and_grad(clipped_policy_loss, logp, old, adv, width, eps_low=0.1, eps_high=0.15,
                                          agg=agg, max_len=max_len, ratio_level=level)
    values, d = ref.gspo_losses(logp, old, adv, 0.1, 0.15, level)
    want, want_grad = ref.aggregate_with_gradient(values, d, agg, max_len)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    for i, row in enumerate(want_grad):
        assert grad[i, :len(row)].tolist() == pytest.approx(row, rel=1e-10, abs=1e-14)
        assert torch.all(grad[i, len(row):] == 0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("seed", range(6))
def test_cispo_matches_the_oracle_at_every_token(agg, seed):
    logp, old, adv = ragged_batch(seed)
    width = max(map(len, logp)) + 1
    got, grad, m, _ = core_value_and_grad(cispo_loss, logp, old, adv, width, eps_high=0.2, agg=agg)
    pairs = [[ref.cispo_token_loss(lp, o, a, 0.2) for lp, o, a in zip(*row)] for row in zip(logp, old, adv)]
    values = [[v for v, _ in row] for row in pairs]
    d = [[[dv if u == t else 0.0 for u in range(len(row))] for t, (_, dv) in enumerate(row)] for row in pairs]
    want, want_grad = ref.aggregate_with_gradient(values, d, agg)
    assert got == pytest.approx(want, rel=1e-12)
    for i, row in enumerate(want_grad):
        assert grad[i, :len(row)].tolist() == pytest.approx(row, rel=1e-10, abs=1e-15)


def test_gspo_ratio_is_the_geometric_mean_and_length_normalised():
    """s = exp(mean log-ratio): log-ratios 0.3 and -0.1 give exp(0.1); repeating each token twice
    (a response twice as long with the same per-token ratios) gives the same s."""
    x = torch.tensor([[0.3, -0.1, 0.0, 0.0], [0.3, 0.3, -0.1, -0.1]], dtype=F64)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    got = sequence_log_ratio(x, m, level="sequence")
    assert got[0, :2].tolist() == pytest.approx([0.1, 0.1], rel=1e-15) and got[0, 2:].tolist() == [0.0, 0.0]
    assert got[1].tolist() == pytest.approx([0.1] * 4, rel=1e-15)


def test_gspo_clips_whole_responses_and_gspo_token_has_gspos_value():
    """Every token of a response shares its clip decision (with one advantage per response, a
    response is clipped at all of its tokens or none), and GSPO-token's loss equals GSPO's."""
    logp, old, adv = ragged_batch(3, rows=8, empty=False)
    adv = [[a[0]] * len(a) for a in adv]  # an outcome advantage per response
    width = max(map(len, logp))
    lp, m = padded(logp, width)
    o, _ = padded(old, width)
    a, _ = padded(adv, width)
    seq = sequence_log_ratio(torch.where(m.bool(), lp - o, torch.zeros_like(lp)), m, level="sequence")
    ratio = seq.exp()
    clipped = ((ratio > 1.1) & (a > 0)) | ((ratio < 0.9) & (a < 0))
    for i in range(len(logp)):
        row = clipped[i, :len(logp[i])]
        assert bool(row.all()) or not bool(row.any())
    assert clipped.any() and not clipped.all()
    kw = dict(eps_low=0.1, eps_high=0.1, agg="seq-mean-token-mean")
    v1, g1, _, _ = core_value_and_grad(clipped_policy_loss, logp, old, adv, width, ratio_level="sequence", **kw)
    v2, g2, _, _ = core_value_and_grad(clipped_policy_loss, logp, old, adv, width, ratio_level="sequence-token", **kw)
    assert v1 == pytest.approx(v2, rel=1e-14)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-15)  # one advantage per response: the same gradient


def test_cispo_keeps_the_gradient_where_ppo_clips():
    """One token, ratio e^0.5 = 1.65 > 1.2, A = 1: PPO's gradient is 0 (clipped); CISPO's is
    -min(1.65, 1.2) * A = -1.2 (token-mean of one token)."""
    lp = torch.tensor([[0.0]], dtype=F64, requires_grad=True)
    old, a, m = torch.tensor([[-0.5]], dtype=F64), torch.tensor([[1.0]], dtype=F64), torch.ones(1, 1)
    ppo, _ = clipped_policy_loss(lp, old, a, m, eps_low=0.2, eps_high=0.2, agg="token-mean")
    ppo.backward()
    assert lp.grad.item() == 0.0
    lp.grad = None
    loss, stats = cispo_loss(lp, old, a, m, eps_high=0.2, agg="token-mean")
    loss.backward()
    assert lp.grad.item() == pytest.approx(-1.2, rel=1e-15) and stats["clip_frac_high"] == 1.0


def _undetached_cispo(logp, old, adv, mask, eps_high=0.2):
    """A CISPO whose weight is not detached: min(rho, 1 + eps) A logp differentiated through rho."""
    w = torch.clamp(torch.exp(logp - old), max=1 + eps_high)
    return -(w * adv * logp * mask).sum() / mask.sum()


def test_an_undetached_cispo_weight_has_another_gradient():
    """Below the bound the weight's own gradient adds -rho A logp per token: the oracle's
    gradient (-w A) is the detached one."""
    lp = torch.tensor([[-1.0, -0.5]], dtype=F64, requires_grad=True)
    old, a, m = torch.tensor([[-1.1, -0.4]], dtype=F64), torch.tensor([[1.0, -2.0]], dtype=F64), torch.ones(1, 2, dtype=F64)
    _undetached_cispo(lp, old, a, m).backward()
    broken = lp.grad.clone()
    lp.grad = None
    cispo_loss(lp, old, a, m, eps_high=0.2, agg="token-mean")[0].backward()
    want = [ref.cispo_token_loss(x, o, adv, 0.2)[1] / 2 for x, o, adv in zip([-1.0, -0.5], [-1.1, -0.4], [1.0, -2.0])]
    assert lp.grad[0].tolist() == pytest.approx(want, rel=1e-14)
    assert not torch.allclose(broken, lp.grad)


def _wrong_axis_gspo(logp, old, adv, mask, eps=0.1):
    """EasyR1 issue 596: the (N,) sequence log-ratio broadcast against (N, T) as a row, so token
    t of every response takes response t's ratio (runs without error only when N == T)."""
    x = (logp - old) * mask
    seq = x.sum(-1) / mask.sum(-1)
    ratio = torch.exp(seq).expand_as(x)  # (N,) -> (1, N) -> (N, T): the wrong axis
    return -(torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv) * mask).sum(-1).div(mask.sum(-1)).mean()


def test_the_wrong_broadcast_axis_is_caught_by_the_oracle():
    logp, old, adv = ragged_batch(5, rows=4, longest=4, empty=False)
    logp = [row + [-1.0] * (4 - len(row)) for row in logp]  # 4 x 4, every token valid: the shapes agree
    old = [row + [-1.2] * (4 - len(row)) for row in old]
    adv = [row + [0.5] * (4 - len(row)) for row in adv]
    lp, m = padded(logp, 4)
    o, _ = padded(old, 4)
    a, _ = padded(adv, 4)
    values, d = ref.gspo_losses(logp, old, adv, 0.1, 0.1, "sequence")
    want, _ = ref.aggregate_with_gradient(values, d, "seq-mean-token-mean")
    core, _ = clipped_policy_loss(lp, o, a, m, eps_low=0.1, eps_high=0.1, agg="seq-mean-token-mean",
                                  ratio_level="sequence")
    assert float(core) == pytest.approx(want, rel=1e-12)
    assert float(_wrong_axis_gspo(lp, o, a, m)) != pytest.approx(want, rel=1e-3)


def test_grpo_loss_selects_them_and_refuses_combinations_cispo_does_not_take():
    lp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    kw = dict(entropy=None, beta=0.0, ent_coef=0.0, kl_estimator="k3", eps_low=0.2, eps_high=0.2,
              agg="token-mean")
    z = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="policy_loss='cispo' weights each token by its own clipped ratio"):
        grpo_loss(lp, z, None, z, torch.ones(2, 3), policy_loss="cispo", ratio_level="sequence", **kw)
    with pytest.raises(ValueError, match="policy_loss='nope' is not valid|policy_loss"):
        grpo_loss(lp, z, None, z, torch.ones(2, 3), policy_loss="nope", **kw)
    assert math.isfinite(float(grpo_loss(lp, z, None, z, torch.ones(2, 3), policy_loss="cispo", **kw)[0]))
