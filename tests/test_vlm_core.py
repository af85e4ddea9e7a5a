"""The GRPO core on real tiny-VLM rollouts: returns, advantages, KL and loss equal the float64
oracle (reference/grpo_math.py) on the ragged completions, and GRPOTrainer runs end to end."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from grpo_core.advantages import group_advantages  # noqa: E402
from grpo_core.config import GRPOConfig  # noqa: E402
from grpo_core.loop import GRPOTrainer  # noqa: E402
from grpo_core.losses import grpo_loss  # noqa: E402
from grpo_core.returns import discounted_returns  # noqa: E402
from reference import grpo_math as oracle  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, make_adapter, tiny_dirs  # noqa: E402,F401  (fixtures)

G = 4


def varied_reward(prompts, completions, answer, **kw):
    """Distinct values within groups (so the advantages are not all 0), one None."""
    out = []
    for i, (c, a) in enumerate(zip(completions, answer)):
        if i == 5:
            out.append(None)
        else:
            out.append(float(c.split()[:1] == [a]) + 0.25 * len(c.split()) - 0.1 * (i % 3))
    return out


@pytest.fixture(scope="module")
def batch(tiny_dirs):
    """A real rollout, a policy nudged off the sampling policy, and a perturbed reference."""
    ad = make_adapter(tiny_dirs, rewards=(varied_reward,), max_new_tokens=6)
    ro = ad.collect(num_groups=2, group_size=G, iteration=0)
    ref = ad.make_reference()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    rows = torch.arange(ro.mask.shape[0])
    logp, ent = ad.logp_and_entropy(ad.policy, ro, rows)
    ref_logp, _ = ad.logp_and_entropy(ref, ro, rows)
    return {"rollout": ro, "logp": logp.detach().double(), "entropy": ent.detach().double(),
            "ref_logp": ref_logp.double()}


def ragged(t: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row[m]] for row, m in zip(t, mask.bool())]


def grouped(seqs, g):
    return [seqs[i:i + g] for i in range(0, len(seqs), g)]


def test_batch_is_ragged_and_has_a_masked_row(batch):
    lengths = batch["rollout"].mask.sum(1).tolist()
    assert lengths[5] == 0 and len(set(lengths)) > 2, lengths


def test_gamma_1_gives_every_completion_token_the_outcome_reward(batch):
    ro = batch["rollout"]
    ret = discounted_returns(ro.rewards.double(), ro.mask, 1.0)
    for row in range(ro.mask.shape[0]):
        m = ro.mask[row].bool()
        if m.any():
            outcome = ro.rewards[row].sum().double()
            assert torch.equal(ret[row][m], outcome.expand(int(m.sum())))
        assert (ret[row][~m] == 0).all()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("scale,stats_over", [("group", "sequences"), ("batch", "steps"), ("none", "sequences")])
def test_returns_and_advantages_match_oracle(batch, gamma, scale, stats_over):
    ro = batch["rollout"]
    rewards, mask = ro.rewards.double(), ro.mask
    ret = discounted_returns(rewards, mask, gamma)
    adv = group_advantages(rewards, mask, G, gamma=gamma, scale=scale, stats_over=stats_over, eps=1e-4)
    want_ret = [oracle.discounted_returns(r, gamma) for r in ragged(rewards, mask)]
    want_adv = oracle.group_advantages(grouped(ragged(rewards, mask), G), gamma=gamma, scale=scale,
                                       stats_over=stats_over, eps=1e-4)
    got_ret, got_adv = ragged(ret, mask), ragged(adv, mask)
    flat_want = [x for grp in want_adv for s in grp for x in s]
    assert len(got_ret) == len(want_ret)
    for got_row, want_row in zip(got_ret, want_ret):
        assert got_row == pytest.approx(want_row, abs=1e-12)
    assert [x for s in got_adv for x in s] == pytest.approx(flat_want, abs=1e-12)
    assert any(abs(x) > 0.1 for x in flat_want)  # not a trivial all-zero case


@pytest.mark.parametrize("kl_estimator", ["k1", "k3", "k3_is"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_kl_and_gradient_match_oracle(batch, kl_estimator, agg):
    ro = batch["rollout"]
    mask = ro.mask
    adv = group_advantages(ro.rewards.double(), mask, G, gamma=1.0, scale="group",
                           stats_over="sequences", eps=1e-4)
    old = ro.old_logp.double()
    logp = batch["logp"].clone().requires_grad_()
    kw = dict(beta=0.04, ent_coef=0.01, kl_estimator=kl_estimator, eps_low=0.2, eps_high=0.28, agg=agg)
    max_len = mask.shape[1]
    loss, stats = grpo_loss(logp, old, batch["ref_logp"], adv, mask, entropy=batch["entropy"],
                            max_len=max_len, **kw)
    loss.backward()
    w_loss, parts, d_loss = oracle.grpo_loss(
        ragged(logp.detach(), mask), ragged(old, mask), ragged(batch["ref_logp"], mask), ragged(adv, mask),
        ragged(batch["entropy"], mask), max_len=max_len, **kw)
    assert float(loss.detach()) == pytest.approx(w_loss, abs=1e-12, rel=1e-10)
    for key in ("policy_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "approx_kl",
                "ratio_min", "ratio_max"):
        assert stats[key] == pytest.approx(parts[key], abs=1e-12, rel=1e-10), key
    assert parts["kl"] != 0 and parts["ratio_min"] != parts["ratio_max"]  # a non-trivial batch
    got = ragged(logp.grad, mask)
    assert [x for s in got for x in s] == pytest.approx([x for s in d_loss for x in s], abs=1e-12)
    assert (logp.grad[~mask.bool()] == 0).all()


def test_two_iterations_of_grpo_trainer_are_finite(tiny_dirs):
    ad = make_adapter(tiny_dirs, "qwen2_5_vl", max_new_tokens=4)
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, gamma=1.0, grpo_epochs=2, minibatches=2,
                     beta=0.04, stats_over="sequences", lr=1e-3, seed=0)
    trainer = GRPOTrainer(ad, cfg)
    before = [p.detach().clone() for p in ad.policy.parameters()]
    for _ in range(2):
        stats = trainer.step()
        for k, v in stats.items():
            assert math.isfinite(v), (k, v)
        assert "reward_mean" in stats and "sample_entropy" in stats
    assert trainer.iteration == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, ad.policy.parameters()))
