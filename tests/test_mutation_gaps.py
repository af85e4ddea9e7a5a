"""Gaps in the math tests found by mutation testing (``make mutate``, tests/mutation/).

Each test is written from the math or the documented contract (closed forms, float64
formulas, hand-computed cases), not from a mutant; tests/mutation/survivors.md lists the
mutants each one kills. Three contracts recur:

- errors name the offending argument first (``_checks``: "a ValueError naming the offending
  argument and value"), so the message is matched from its start, not as a substring;
- internal buffers live on the inputs' device and the documented output dtype does not follow
  torch's defaults: checked with the default device set to ``meta`` (a factory call without
  ``device=`` then makes a data-less tensor that cannot mix with the CPU inputs, as a CUDA run
  would put such a buffer on the CPU) and with the default dtype set to float64;
- documented defaults and special values (``temperature=1``, ``gamma=1``) are exercised as such.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import grpo_core as core
from grpo_core import logprobs as lp_mod
from reference import grpo_math as ref

F64 = torch.float64


def raises_naming(name: str, rest: str = ""):
    """pytest.raises(ValueError) whose message starts with the argument's name."""
    return pytest.raises(ValueError, match="^" + re.escape(name) + rest)


@contextmanager
def default_device_meta():
    """Factory calls that name no device make ``meta`` tensors meanwhile (see the module doc)."""
    with torch.device("meta"):
        yield


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def ragged_returns(rewards, mask, gamma):
    """The float64 oracle's returns of each row with its padding removed, scattered back."""
    out = torch.zeros(rewards.shape, dtype=F64)
    for i in range(rewards.shape[0]):
        idx = mask[i].nonzero().flatten()
        out[i, idx] = torch.tensor(ref.discounted_returns(rewards[i, idx].tolist(), gamma), dtype=F64)
    return out


# --- returns ------------------------------------------------------------------------------------


def test_returns_errors_name_the_argument():
    with raises_naming("rewards", r" must be 2-D"):
        core.discounted_returns(torch.zeros(3), torch.ones(3), 0.9)
    with raises_naming("gamma", r"=1\.5 is outside"):
        core.discounted_returns(torch.zeros(2, 3), torch.ones(2, 3), 1.5)
    with raises_naming("rewards", r" holds a non-finite value \(nan\)"):
        core.discounted_returns(torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), 0.9)


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_returns_buffers_follow_the_inputs_device(gamma):
    """Blocked scan (T > 64, a row of padding inside a block and a fully padded block) with the
    default device elsewhere: still the oracle's returns, on the inputs' device."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 140, generator=gen, dtype=F64)
    mask = torch.ones(3, 140, dtype=F64)
    mask[1, 30:] = 0
    mask[2, 60:130] = 0
    with default_device_meta():
        got = core.discounted_returns(rewards, mask, gamma)
    assert got.device.type == "cpu"
    assert torch.allclose(got, ragged_returns(rewards, mask, gamma), rtol=1e-10, atol=1e-10)


# --- KL estimators --------------------------------------------------------------------------------


def test_kl_k3_is_checks_every_shape_before_computing():
    """A logp of another shape is a ValueError naming it (the odd one out of three), not a torch
    broadcasting error."""
    logp = torch.zeros(2, 3, dtype=F64)
    other = torch.zeros(3, 2, dtype=F64)
    with raises_naming("shape mismatch: logp has shape (2, 3) but ref_logp, old_logp have shape (3, 2)", "$"):
        core.kl_k3_is(logp, other, other)


def test_kl_estimate_without_old_logp_names_the_estimator():
    x = torch.zeros(2, 3, dtype=F64)
    with raises_naming("kl_estimator='k3_is' needs old_logp"):
        core.kl_estimate("k3_is", x, x)


# --- log-probs ------------------------------------------------------------------------------------


def float64_logp_entropy(logits, ids, temperature=1.0, masked=()):
    """log softmax(logits / temperature) at ``ids`` and the entropy, in float64 (masked ids at
    -inf, 0 * log 0 = 0)."""
    x = logits.detach().double() / temperature
    if len(masked):
        x[..., list(masked)] = float("-inf")
    lq = torch.log_softmax(x, -1)
    ent = -(lq.exp() * torch.nan_to_num(lq, neginf=0.0)).sum(-1)
    return lq.gather(-1, ids[..., None])[..., 0], ent


def test_default_temperature_is_one():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 9, generator=gen) * 3
    ids = torch.randint(0, 9, (2, 3), generator=gen)
    want_lp, want_h = float64_logp_entropy(logits, ids)
    lp, h = lp_mod.selective_logp_and_entropy(logits, ids)
    for got, want in ((lp, want_lp), (h, want_h), (lp_mod.selective_logp(logits, ids), want_lp),
                      (lp_mod.entropy_from_logits(logits), want_h)):
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_2d_logits_give_1d_outputs():
    """(R, V) logits give (R,) results: exactly that shape, not a broadcastable (1, R)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 7, generator=gen)
    ids = torch.randint(0, 7, (4,), generator=gen)
    want_lp, want_h = float64_logp_entropy(logits, ids, 1.3)
    lp, h = lp_mod.selective_logp_and_entropy(logits, ids, temperature=1.3)
    assert lp.shape == h.shape == (4,)
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(h.double(), want_h, atol=1e-5)
    assert lp_mod.selective_logp(logits, ids).shape == lp_mod.entropy_from_logits(logits).shape == (4,)


def test_logprob_errors_name_the_value():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with raises_naming("logits", r" must be a floating-point tensor, got torch\.int64$"):
        lp_mod.selective_logp(torch.zeros(2, 3, 5, dtype=torch.long), ids)
    with raises_naming("logits", r" must be a floating-point tensor, got <class 'list'>$"):
        lp_mod.entropy_from_logits([[0.0, 1.0]])
    with raises_naming("logits", r" must be \(N, T, V\) or \(R, V\), got shape \(5,\)$"):
        lp_mod.entropy_from_logits(torch.zeros(5))
    with raises_naming("ids", r" has shape \(2, 4\); expected \(2, 3\) for logits of shape \(2, 3, 5\)$"):
        lp_mod.selective_logp(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    one_bad = torch.tensor([[1, 2, 1], [1, 1, 1]])  # only one sampled id (2) is masked
    with raises_naming("id 2 is in masked_ids", r": it has probability 0 under the masked distribution "
                       r"\(it cannot have been sampled from it\)$"):
        lp_mod.selective_logp(torch.zeros(2, 3, 5), one_bad, masked_ids=[2, 4])


def test_masked_ids_may_be_an_int32_tensor():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 8, generator=gen)
    ids = torch.randint(0, 5, (2, 3), generator=gen)
    masked = torch.tensor([5, 7], dtype=torch.int32)
    lp, h = lp_mod.selective_logp_and_entropy(logits, ids, masked_ids=masked, chunk=2)
    want_lp, want_h = float64_logp_entropy(logits, ids, masked=[5, 7])
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(h.double(), want_h, atol=1e-5)


def test_logprobs_are_float32_whatever_the_default_dtype():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 6, generator=gen)
    ids = torch.randint(0, 6, (2, 3), generator=gen)
    with default_dtype(F64):
        lp, h = lp_mod.selective_logp_and_entropy(logits, ids, chunk=2)
        alone = (lp_mod.selective_logp(logits, ids), lp_mod.entropy_from_logits(logits))
    assert lp.dtype == h.dtype == alone[0].dtype == alone[1].dtype == torch.float32
    want_lp, want_h = float64_logp_entropy(logits, ids)
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(h.double(), want_h, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 64])
def test_logprob_buffers_follow_the_inputs_device(chunk):
    """Forward and backward with the default device elsewhere: values and gradients are the
    float64 ones, on the inputs' device."""
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, 3, 6, generator=gen) * 2).requires_grad_()
    ids = torch.randint(0, 6, (2, 3), generator=gen)
    w = torch.randn(2, 2, 3, generator=gen, dtype=F64)
    with default_device_meta():
        lp, h = lp_mod.selective_logp_and_entropy(logits, ids, temperature=0.9, chunk=chunk)
        (lp.double() * w[0] + h.double() * w[1]).sum().backward()
        ent_only = lp_mod.entropy_from_logits(logits.detach(), temperature=0.9, chunk=chunk)
    x = logits.detach().double().requires_grad_()
    xq = torch.log_softmax(x / 0.9, -1)
    want_lp, want_h = xq.gather(-1, ids[..., None])[..., 0], -(xq.exp() * xq).sum(-1)
    (want_lp * w[0] + want_h * w[1]).sum().backward()
    assert lp.device.type == h.device.type == logits.grad.device.type == ent_only.device.type == "cpu"
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(h.double(), want_h, atol=1e-5)
    assert torch.allclose(ent_only.double(), want_h, atol=1e-5)
    assert torch.allclose(logits.grad.double(), x.grad, atol=1e-5)


def test_masked_ids_follow_the_logits_device():
    """``masked_ids`` given on the CPU (a list) with logits on another device: the masked index
    moves to the logits' device, as every buffer does. ``meta`` stands in for an accelerator
    (like CUDA, it refuses a CPU index into its tensors); without ids the forward needs no data,
    so it runs on meta."""
    assert lp_mod._masked_index([3, 1, 3], 5, torch.device("meta")).device.type == "meta"
    assert lp_mod._masked_index(torch.tensor([3, 1, 3]), 5, torch.device("cpu")).tolist() == [1, 3]
    logits = torch.empty(2, 3, 6, device="meta")
    ent = lp_mod.entropy_from_logits(logits, masked_ids=[1, 4], chunk=2)
    assert ent.device.type == "meta" and ent.shape == (2, 3) and ent.dtype == torch.float32


def test_blocks_tile_the_grid_once_within_chunk():
    """``_blocks`` puts every (row, token) in exactly one block (a token in two blocks would be
    computed twice) and no block has more than ``chunk`` tokens (the memory bound)."""
    for n in range(1, 5):
        for t in range(1, 6):
            for chunk in range(1, 13):
                seen = torch.zeros(n, t, dtype=torch.long)
                for r, c in lp_mod._blocks(n, t, chunk):
                    block = seen[r, c]
                    assert 0 < block.numel() <= chunk, (n, t, chunk, r, c)
                    block += 1
                assert (seen == 1).all(), (n, t, chunk)


class _NewStorage(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (views are not counted)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                       and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("chunk", [1, 3, 5, 7])
def test_no_temporary_larger_than_a_block(chunk):
    """The documented memory bound: no tensor the forward allocates holds more than ``chunk``
    tokens' worth of the vocabulary, and the backward allocates one full-size tensor only (the
    gradient itself). V is larger than N * T, so the per-token buffers are within the bound."""
    gen = torch.Generator().manual_seed(9)
    n, t, v = 2, 5, 64
    logits = torch.randn(n, t, v, generator=gen).requires_grad_()
    ids = torch.randint(0, v, (n, t), generator=gen)
    for fn in (lambda: lp_mod.selective_logp_and_entropy(logits, ids, chunk=chunk),
               lambda: (lp_mod.selective_logp(logits, ids, chunk=chunk),),
               lambda: (lp_mod.entropy_from_logits(logits, chunk=chunk),)):
        with _NewStorage() as fwd:
            outs = fn()
        assert max(fwd.sizes) <= chunk * v
        with _NewStorage() as bwd:
            sum(o.sum() for o in outs).backward()
        assert sum(size > chunk * v for size in bwd.sizes) == 1 and max(bwd.sizes) == n * t * v
        logits.grad = None


# --- group advantages ---------------------------------------------------------------------------


def outcome_batch(rewards_and_lengths, t_len):
    """Rows with one outcome reward on the last of ``L`` valid tokens (the padding after it)."""
    rewards = torch.zeros(len(rewards_and_lengths), t_len, dtype=F64)
    mask = torch.zeros_like(rewards)
    for i, (r, length) in enumerate(rewards_and_lengths):
        mask[i, :length] = 1
        rewards[i, length - 1] = r
    return rewards, mask


def outcome_closed_form(rewards_and_lengths, t_len, gamma, group_size, eps=1e-8):
    """``A_t = gamma**(L - 1 - t) (R - mean_g) / (std_g + eps)``, std with Bessel's correction
    (GRPO outcome supervision with a discount, the group_advantages docstring)."""
    out = torch.zeros(len(rewards_and_lengths), t_len, dtype=F64)
    for g0 in range(0, len(rewards_and_lengths), group_size):
        group = rewards_and_lengths[g0:g0 + group_size]
        outcomes = [r for r, _ in group]
        mean = sum(outcomes) / len(outcomes)
        std = (sum((r - mean) ** 2 for r in outcomes) / (len(outcomes) - 1)) ** 0.5
        for i, (r, length) in enumerate(group, start=g0):
            for t in range(length):
                out[i, t] = gamma ** (length - 1 - t) * (r - mean) / (std + eps)
    return out


def test_advantages_buffers_follow_the_inputs_device():
    samples = [(1.0, 3), (0.0, 5), (2.0, 1), (0.5, 4)]
    rewards, mask = outcome_batch(samples, 5)
    want = outcome_closed_form(samples, 5, 0.9, 2)
    with default_device_meta():
        got = core.group_advantages(rewards, mask, 2, gamma=0.9, scale="group", stats_over="sequences")
    assert got.device.type == "cpu"
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_batch_scale_with_two_pooled_values():
    """Exactly two values in the batch: the std is |R1 - R2| / sqrt(2) (Bessel), so the
    advantages are +-1/sqrt(2) whatever the rewards."""
    rewards, mask = outcome_batch([(3.0, 2), (1.0, 2)], 2)
    for scale in ("batch", "group"):
        got = core.group_advantages(rewards, mask, 2, gamma=1.0, scale=scale, stats_over="sequences", eps=0.0)
        assert torch.allclose(got, torch.tensor([[1, 1], [-1, -1]], dtype=F64) / 2**0.5, rtol=1e-12)


def test_a_std_that_underflows_to_zero_gives_finite_advantages():
    """eps = 0 and two outcomes a subnormal apart: the std rounds to 0 although the group has
    a signal; the advantages stay finite (never a NaN or inf that trains on)."""
    tiny = torch.finfo(F64).smallest_normal * torch.finfo(F64).eps  # 5e-324, the least subnormal
    rewards = torch.tensor([[0.0], [tiny]], dtype=F64)
    got = core.group_advantages(rewards, torch.ones(2, 1), 2, gamma=1.0, scale="group",
                                stats_over="sequences", eps=0.0)
    assert torch.isfinite(got).all()


def test_advantage_errors_name_the_argument():
    kw = dict(gamma=1.0, scale="group", stats_over="sequences")
    ok_r, ok_m = outcome_batch([(1.0, 2), (0.0, 2)], 2)
    with raises_naming("rewards", r" must be 2-D"):
        core.group_advantages(torch.zeros(4), torch.ones(4), 2, **kw)
    with raises_naming("shape mismatch: scored has shape (2, 3) but rewards, mask have shape (2, 2)", "$"):
        core.group_advantages(ok_r, ok_m, 2, scored=torch.ones(2, 3), **kw)
    with raises_naming("scored", r" must hold only 0 and 1, found 2"):
        core.group_advantages(ok_r, ok_m, 2, scored=torch.tensor([[0.0, 2.0], [0.0, 1.0]]), **kw)
    for bad in (2.0, True):
        with raises_naming("group_size", f" must be a positive int, got {bad!r}"):
            core.group_advantages(ok_r, ok_m, bad, **kw)
    with raises_naming("eps", r" must be >= 0, got -1\.0$"):
        core.group_advantages(ok_r, ok_m, 2, eps=-1.0, **kw)
    nan_r = ok_r.clone()
    nan_r[0, 0] = float("nan")  # before the last step: the non-finite value is the error
    with raises_naming("rewards", r" holds a non-finite value \(nan\)$"):
        core.group_advantages(nan_r, ok_m, 2, **kw)


def test_a_reward_at_an_unscored_step_is_refused_with_its_place():
    """The refusal names the row, the reward, the step, why (last step or scored mask) and the
    two ways out."""
    kw = dict(gamma=1.0, scale="group", stats_over="sequences")
    rewards = torch.tensor([[0.0, 0.0], [0.5, 1.0]], dtype=F64)
    remedy = r"; per-step rewards need a scored mask \(process supervision\) or stats_over='steps'$"
    head = r"stats_over='sequences' normalises the rewards of scored steps only, but row 1 has reward 0\.5 at step 0, which "
    with pytest.raises(ValueError, match="^" + head + "is not the row's last valid step" + remedy):
        core.group_advantages(rewards, torch.ones(2, 2), 2, **kw)
    with pytest.raises(ValueError, match="^" + head + "is not marked in scored" + remedy):
        core.group_advantages(rewards, torch.ones(2, 2), 2, scored=torch.tensor([[0, 1], [0, 1]]), **kw)


# --- losses ---------------------------------------------------------------------------------------

LOSS_KW = dict(eps_low=0.2, eps_high=0.28, agg="token-mean")


def one_valid_token(log_ratio, adv, junk=5.0):
    """A (2, 3) batch whose only valid token is (1, 2); junk (big ratios, big advantages)
    everywhere under the mask."""
    old = torch.full((2, 3), -1.0, dtype=F64)
    logp = old + junk
    logp[1, 2] = old[1, 2] + log_ratio
    a = torch.full((2, 3), -junk, dtype=F64)
    a[1, 2] = adv
    mask = torch.zeros(2, 3)
    mask[1, 2] = 1
    return logp, old, a, mask


@pytest.mark.parametrize("rho, adv, clip_ratio_c, which", [
    (0.5, -1.0, None, "clip_frac_low"),   # A < 0, rho < 1 - eps_low
    (2.0, 1.0, None, "clip_frac_high"),   # A > 0, rho > 1 + eps_high
    (4.0, -1.0, 3.0, "clip_frac_dual"),   # A < 0, rho > c
    (1.1, 1.0, 3.0, None),                # inside the clip range
])
def test_clip_stats_of_a_single_valid_token(rho, adv, clip_ratio_c, which):
    """One valid token: each share is 0 or 1 exactly, approx_kl is that token's
    ``rho - 1 - log rho`` and ratio_min = ratio_max = rho (the documented stats)."""
    logp, old, a, mask = one_valid_token(math.log(rho), adv)
    _, stats = core.clipped_policy_loss(logp, old, a, mask, clip_ratio_c=clip_ratio_c, **LOSS_KW)
    for name in ("clip_frac_low", "clip_frac_high", "clip_frac_dual"):
        assert stats[name] == (1.0 if name == which else 0.0), name
    assert stats["approx_kl"] == pytest.approx(rho - 1 - math.log(rho), rel=1e-12)
    assert stats["ratio_min"] == pytest.approx(rho, rel=1e-12)
    assert stats["ratio_max"] == pytest.approx(rho, rel=1e-12)


def test_grpo_loss_documented_calls_and_coefficients():
    """The calls the docstring allows (no reference with beta = 0, no entropy with ent_coef = 0)
    and the coefficients, against the token-mean terms written out in float64:
    ``loss = policy + beta * mean(k3) - ent_coef * mean(H)``."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=F64)
    old = torch.tensor([[-1.1, -2.0], [-0.4, -2.9]], dtype=F64)
    ref_lp = torch.tensor([[-1.3, -1.5], [-0.5, -2.0]], dtype=F64)
    adv = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=F64)
    ent = torch.tensor([[0.7, 1.1], [0.2, 0.4]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=F64)
    tokens = [(0, 0), (0, 1), (1, 0)]
    rho = {k: math.exp(float(logp[k] - old[k])) for k in tokens}
    pol = sum(-min(rho[k] * adv[k].item(), min(max(rho[k], 0.8), 1.28) * adv[k].item()) for k in tokens) / 3
    k3 = sum(math.expm1(float(ref_lp[k] - logp[k])) - float(ref_lp[k] - logp[k]) for k in tokens) / 3
    h = sum(ent[k].item() for k in tokens) / 3
    kw = dict(kl_estimator="k3", **LOSS_KW)
    cases = [(None, None, 0.0, 0.0, pol), (ref_lp, None, 0.5, 0.0, pol + 0.5 * k3),
             (None, ent, 0.0, 1.0, pol - h), (ref_lp, ent, 0.0, 0.0, pol),
             (ref_lp, ent, 0.04, 0.01, pol + 0.04 * k3 - 0.01 * h)]
    for ref_logp, entropy, beta, ent_coef, want in cases:
        loss, stats = core.grpo_loss(logp, old, ref_logp, adv, mask, entropy=entropy, beta=beta,
                                     ent_coef=ent_coef, **kw)
        assert float(loss) == pytest.approx(want, rel=1e-12), (beta, ent_coef)
        assert stats["loss"] == pytest.approx(want, rel=1e-12)
        assert stats["policy_loss"] == pytest.approx(pol, rel=1e-12)
        if ref_logp is not None:
            assert stats["kl"] == pytest.approx(k3, rel=1e-12)
        if entropy is not None:
            assert stats["entropy"] == pytest.approx(h, rel=1e-12)


def test_dual_clip_share_counts_negative_advantages_above_c_only():
    """clip_frac_dual counts ``A < 0 and rho > c`` (the docstring): not A = 0, not rho = c."""
    for rho, adv in ((5.0, 0.0), (2.0, -1.0)):  # exp(log 2) == 2 exactly in float64
        logp, old, a, mask = one_valid_token(math.log(rho), adv)
        _, stats = core.clipped_policy_loss(logp, old, a, mask, clip_ratio_c=2.0, **LOSS_KW)
        assert stats["clip_frac_dual"] == 0.0, (rho, adv)


def test_stats_of_an_all_masked_batch_are_those_of_no_update():
    """No valid token: the loss is 0 and the stats read like an unchanged policy (nothing
    clipped, approx_kl 0, ratio 1), whatever junk sits under the mask."""
    logp, old, a, mask = one_valid_token(3.0, -2.0)
    loss, stats = core.clipped_policy_loss(logp, old, a, torch.zeros_like(mask), clip_ratio_c=2.0, **LOSS_KW)
    assert float(loss) == 0.0
    assert stats == {"clip_frac_low": 0.0, "clip_frac_high": 0.0, "clip_frac_dual": 0.0,
                     "approx_kl": 0.0, "ratio_min": 1.0, "ratio_max": 1.0}


def test_grpo_loss_passes_the_dual_clip_on():
    """With clip_ratio_c, a token with A < 0 whose ratio ran past c costs c * |A| (capped), not
    rho * |A|: loss = c |A| for the one valid token, token-mean."""
    logp, old, a, mask = one_valid_token(math.log(5.0), -1.5)
    loss, stats = core.grpo_loss(logp, old, None, a, mask, entropy=None, beta=0.0, ent_coef=0.0,
                                 kl_estimator="k3", clip_ratio_c=3.0, **LOSS_KW)
    assert float(loss) == pytest.approx(3.0 * 1.5, rel=1e-12)
    assert stats["clip_frac_dual"] == 1.0


def test_dr_grpo_of_a_batch_without_rows_is_zero():
    """Dr. GRPO divides by every row times max_len; a batch with no row (a rank with no
    sample) sums to 0 and gives 0."""
    empty = torch.zeros(0, 3, dtype=F64)
    assert float(core.agg_loss(empty, empty, agg="seq-mean-token-sum-norm", max_len=4)) == 0.0


def test_loss_errors_name_the_argument():
    x = torch.zeros(2, 3, dtype=F64)
    ones = torch.ones(2, 3)
    dr = "seq-mean-token-sum-norm"
    for mask in (ones, torch.zeros(2, 3)):  # with an all-masked batch max_len=0 would divide by 0
        with raises_naming(f"agg={dr!r} needs max_len, a positive int (the maximum completion "
                           f"length), got 0"):
            core.agg_loss(x, mask, agg=dr, max_len=0)
    for total in (-1, float("nan")):
        with raises_naming("total", f" must be a count >= 0, got {total!r}$"):
            core.agg_loss(x, ones, agg="token-mean", total=total)
    with raises_naming("agg='bogus' is not valid; choose one of token-mean"):
        core.agg_count(ones, "bogus")
    for eps_low, eps_high in ((0.2, -0.1), (1.0, 0.2), (1.5, 0.2), (-0.1, 0.2)):
        with raises_naming(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low!r}, {eps_high!r}", "$"):
            core.clipped_policy_loss(x, x, x, ones, eps_low=eps_low, eps_high=eps_high, agg="token-mean")
    other = torch.zeros(3, 2, dtype=F64)
    with raises_naming("shape mismatch: logp has shape (2, 3) but old_logp, adv, mask have shape (3, 2)", "$"):
        core.clipped_policy_loss(x, other, other, torch.ones(3, 2), **LOSS_KW)
    kw = dict(kl_estimator="k3", **LOSS_KW)
    with raises_naming("shape mismatch: ref_logp has shape (3, 2) but logp, old_logp, adv, mask have "
                       "shape (2, 3)", "$"):
        core.grpo_loss(x, x, other, x, ones, entropy=None, beta=0.1, ent_coef=0.0, **kw)
    with raises_naming("beta=0.1 needs ref_logp, got None", "$"):
        core.grpo_loss(x, x, None, x, ones, entropy=None, beta=0.1, ent_coef=0.0, **kw)
    with raises_naming("ent_coef=0.01 needs entropy, got None", "$"):
        core.grpo_loss(x, x, None, x, ones, entropy=None, beta=0.0, ent_coef=0.01, **kw)


# --- survivors once argued equivalent that an input of the contract tells apart ------------------
# (issue 23, item 6: dtypes, magnitudes and shapes the docstrings allow). Each docstring names the
# mutant, or the code before the fix, that the test fails on.

HALF = (torch.bfloat16, torch.float16)
DR = "seq-mean-token-sum-norm"


def test_gamma_one_sums_near_the_float32_limit_without_overflow():
    """gamma = 1 is the reverse cumulative sum (the docstring): rewards [f, f, -f] with f near
    float32's largest value have the returns [f, 0, -f] (G_2 = -f, G_1 = f - f, G_0 = f + 0),
    every running sum finite, and a copy of the row with padding inside the same returns. The
    mutant ``if gamma == 2.0:`` sends gamma = 1 through the blocked scan, a matrix product over
    the block whose partial sum f + f overflows: inf."""
    f = 3e38
    rewards = torch.tensor([[f, f, -f, 0.0], [f, 0.0, f, -f]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    got = core.discounted_returns(rewards, mask, 1.0)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), ragged_returns(rewards.double(), mask, 1.0))


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_rewards_are_refused_for_every_gamma(gamma, dtype):
    """A discounted sum is not an integer: integer (or bool) rewards are a ValueError naming
    them, for every gamma. Before: gamma = 1 returned an int64 reverse cumsum, gamma < 1 (and
    the mutant ``if gamma == 2.0:`` at gamma = 1) stopped in ``bmm`` with a RuntimeError."""
    rewards = torch.tensor([[1, 0, 2]]).to(dtype)
    with raises_naming("rewards", " must be a floating-point tensor, got " + re.escape(str(dtype)) + "$"):
        core.discounted_returns(rewards, torch.ones(1, 3), gamma)


@pytest.mark.parametrize("default", HALF)
@pytest.mark.parametrize("chunk", [2, 64])
def test_logprob_gradients_are_the_float32_ones_whatever_the_default_dtype(default, chunk):
    """With torch's default dtype at bf16 or fp16 (a half-precision model may set it), the
    log-probs, the entropies and their gradients through each entry point are the float64 ones
    to float32 accuracy. The backward recomputes ``p = exp(x - lse)`` from the saved logsumexp,
    so that buffer must be float32 whatever the default: the mutants ``lse = torch.zeros(n, t,
    dtype=None, ...)`` and ``lse = torch.zeros(n, t, device=...)`` keep it in the default dtype,
    and the gradients move by up to 3.75e-2 in bf16."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 3, 6, generator=gen) * 2
    ids = torch.randint(0, 6, (2, 3), generator=gen)
    w = torch.randn(2, 2, 3, generator=gen, dtype=F64)
    x = logits.double().requires_grad_()
    xq = torch.log_softmax(x / 0.9, -1)
    want_lp, want_h = xq.gather(-1, ids[..., None])[..., 0], -(xq.exp() * xq).sum(-1)
    (want_g_lp,) = torch.autograd.grad((want_lp * w[0]).sum(), x, retain_graph=True)
    (want_g_h,) = torch.autograd.grad((want_h * w[1]).sum(), x)
    leaves = [logits.clone().requires_grad_() for _ in range(3)]
    with default_dtype(default):
        lp, h = lp_mod.selective_logp_and_entropy(leaves[0], ids, temperature=0.9, chunk=chunk)
        (lp.double() * w[0] + h.double() * w[1]).sum().backward()
        lp_alone = lp_mod.selective_logp(leaves[1], ids, temperature=0.9, chunk=chunk)
        (lp_alone.double() * w[0]).sum().backward()
        h_alone = lp_mod.entropy_from_logits(leaves[2], temperature=0.9, chunk=chunk)
        (h_alone.double() * w[1]).sum().backward()
    for got, want in ((lp, want_lp), (lp_alone, want_lp), (h, want_h), (h_alone, want_h),
                      (leaves[0].grad, want_g_lp + want_g_h), (leaves[1].grad, want_g_lp),
                      (leaves[2].grad, want_g_h)):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("dtype, n", [(torch.bfloat16, 257), (torch.float16, 2049)])
def test_max_len_counts_valid_tokens_exactly_in_half_precision(dtype, n):
    """Dr. GRPO refuses a row longer than max_len whatever the values' dtype: a count of valid
    tokens is an integer. ``n`` is the least integer the dtype cannot hold (bf16 keeps 8
    significant bits: 257 rounds to 256; fp16 11 bits: 2049 to 2048). Counted in the values'
    dtype (the code before the fix, ``mf = m.to(v.dtype)``; the mutant ``mf = m.to(None)``
    counted in integers and was right), a row of n tokens passed max_len = n - 1 and a row of
    n + 2 was refused at max_len = n + 2 as having n + 3."""
    values = torch.ones(2, n + 3, dtype=dtype)
    mask = torch.zeros(2, n + 3)
    mask[0, :n] = 1
    with raises_naming(f"agg={DR!r}: a sequence has {n} valid tokens, more than max_len={n - 1};"):
        core.agg_loss(values, mask, agg=DR, max_len=n - 1)
    mask[1, :n + 2] = 1
    got = core.agg_loss(values, mask, agg=DR, max_len=n + 2)
    assert float(got) == pytest.approx((2 * n + 2) / (2 * (n + 2)), rel=1e-6)


def half_precision_batches():
    """(dtype, values, mask) with values exactly representable in the dtype: the issue's two
    batches, then long rows of random magnitudes (an empty row included) in each dtype."""
    yield torch.bfloat16, [[256.0, 1.0], [-256.0, 7.0]], [[1, 1], [1, 0]]
    yield torch.float16, [[6e4, 6e4], [-6e4, -6e4]], [[1, 1], [1, 1]]
    for k, (dtype, scale) in enumerate(((torch.bfloat16, 300.0), (torch.float16, 900.0))):
        gen = torch.Generator().manual_seed(11 + k)
        values = (torch.randn(5, 600, generator=gen, dtype=F64) * scale).to(dtype)
        lengths = torch.tensor([600, 0, 431, 257, 3])
        mask = (torch.arange(600)[None, :] < lengths[:, None]).long()
        yield dtype, values.tolist(), mask.tolist()


@pytest.mark.parametrize("agg", core.AGGS)
@pytest.mark.parametrize("case", range(4))
def test_aggregations_in_half_precision_match_float64(agg, case):
    """bf16 and fp16 per-token values (bf16-mixed training) aggregate to the float64 aggregate
    of the same values (``reference.grpo_math.aggregate``, an exactly rounded sum) within the
    bound of a float32 summation, as the docstring promises: ``|error| <= (n + 2) * eps(float32)
    * aggregate(|v|)`` for n tokens; the result is float32. Before the fix the sums ran in the
    values' dtype: bf16 [[256, 1], [-256, pad]] gave 0 for seq-mean-token-sum (want 0.5) as
    256 + 1 rounds to 256; fp16 [[6e4, 6e4], [-6e4, -6e4]] gave NaN for the per-row means (a
    row sum of 1.2e5 overflows fp16) where the answer is 0; token-mean, one sum of everything,
    came out near but rounded to the input dtype (0.334 for 1/3), and the mutants
    ``elif agg == "XXtoken-meanXX":`` / ``"TOKEN-MEAN"``, which sent it through the per-row
    branch, gave it those per-row errors (0.0 and NaN). (The fix sums the rows of every
    aggregation the same way, in float32, so that branch is gone.)"""
    dtype, rows, mask_rows = list(half_precision_batches())[case]
    values, mask = torch.tensor(rows, dtype=dtype), torch.tensor(mask_rows)
    t_len = values.shape[1]
    got = core.agg_loss(values, mask, agg=agg, max_len=t_len)
    ragged = [[float(v) for v, m in zip(r, mr) if m] for r, mr in zip(values.double().tolist(), mask_rows)]
    want = ref.aggregate(ragged, agg, t_len)
    bound = (len(sum(ragged, [])) + 2) * torch.finfo(torch.float32).eps * ref.aggregate(
        [[abs(v) for v in r] for r in ragged], agg, t_len)
    assert got.dtype == torch.float32
    assert abs(float(got) - want) <= bound, (float(got), want, bound)


@pytest.mark.parametrize("rho", [0.5, 1.0, 1.1, 1.5, 4.0])
@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_token_loss_derivative_in_the_advantage_at_zero_is_a_subgradient(rho, clip_ratio_c):
    """As a function of an advantage that requires grad (``policy_token_loss`` takes ``a`` as
    given), the token loss is piecewise linear with a kink at A = 0: with k = clip(rho,
    1 - eps_low, 1 + eps_high), it is ``-min(rho, k) * A`` for A > 0 and ``-min(max(rho, k), c)
    * A`` for A < 0 (the dual clip caps the slope at c; without it c = inf). Autograd's
    derivative at A = 0 must lie between the two slopes (a subgradient) and equal them where
    they agree (rho inside the clip range and below c: -rho). The mutant ``torch.where(a <= 0,
    torch.minimum(tok, -clip_ratio_c * a), tok)`` takes the dual-clip minimum at A = 0 too, a
    tie at 0 whose gradient torch splits: -1.825 at rho = 0.5, c = 3, outside [-0.8, -0.5],
    and -2.05 at rho = 1.1 where the derivative is -1.1."""
    from grpo_core.losses import policy_token_loss

    eps_low, eps_high = 0.2, 0.28
    k = min(max(rho, 1 - eps_low), 1 + eps_high)
    cap = math.inf if clip_ratio_c is None else clip_ratio_c
    right, left = -min(rho, k), -min(max(rho, k), cap)
    a = torch.zeros(1, dtype=F64, requires_grad=True)
    tok = policy_token_loss(torch.tensor([rho], dtype=F64), a, eps_low=eps_low, eps_high=eps_high,
                            clip_ratio_c=clip_ratio_c)
    (d,) = torch.autograd.grad(tok.sum(), a)
    assert float(tok.detach()) == 0.0
    assert min(left, right) - 1e-12 <= float(d) <= max(left, right) + 1e-12, (float(d), left, right)
    if left == right:
        assert float(d) == pytest.approx(left, rel=1e-12)


GRPO_TENSORS = ("logp", "old_logp", "ref_logp", "adv", "mask", "entropy")


@pytest.mark.parametrize("bad", [(name,) for name in GRPO_TENSORS]
                         + [("old_logp", "adv"), ("adv", "mask"), ("old_logp", "mask"), ("logp", "entropy")])
def test_grpo_loss_names_the_tensors_of_the_odd_shape(bad):
    """Six per-token tensors, one or two of another shape: the ValueError names those, in
    argument order, then the ones that agree (``check_same_shape``'s contract). Before the fix
    a wrongly shaped logp read "old_logp has shape (2, 3) but logp has shape (3, 2)". The
    mutants that leave old_logp, adv or mask out of grpo_loss's own check
    (``check_same_shape(logp=logp, old_logp=None, ...``, ``..., adv=None, ...``, ``...,
    mask=None, ...`` and the three that drop the keyword) leave the dropped tensor to
    clipped_policy_loss's later check, so with two bad tensors they name only the other."""
    good, odd = (2, 3), (3, 2)
    args = {name: torch.zeros(odd if name in bad else good, dtype=F64) for name in GRPO_TENSORS}
    args["mask"] = torch.ones_like(args["mask"])
    named = ", ".join(f"{name} has shape {odd}" for name in GRPO_TENSORS if name in bad)
    rest = [name for name in GRPO_TENSORS if name not in bad]
    with raises_naming(f"shape mismatch: {named} but {', '.join(rest)} have shape {good}", "$"):
        core.grpo_loss(args["logp"], args["old_logp"], args["ref_logp"], args["adv"], args["mask"],
                       entropy=args["entropy"], beta=0.1, ent_coef=0.01, kl_estimator="k3", **LOSS_KW)
