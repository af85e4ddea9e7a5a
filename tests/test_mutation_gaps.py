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
    """A logp of another shape is a ValueError naming it, not a torch broadcasting error."""
    logp = torch.zeros(2, 3, dtype=F64)
    other = torch.zeros(3, 2, dtype=F64)
    with raises_naming("shape mismatch: ref_logp has shape (3, 2) but logp has shape (2, 3)"):
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
