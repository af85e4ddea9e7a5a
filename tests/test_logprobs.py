"""grpo_core.logprobs: chunked log-probs and entropies equal the naive log_softmax ones."""

import math

import pytest
import torch

from grpo_core.logprobs import entropy_from_logits, selective_logp, selective_logp_and_entropy


def naive(logits, ids, temperature):
    logq = torch.log_softmax(logits.float() / temperature, -1)
    logp = logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_forward_matches_naive(chunk, temperature):
    gen = torch.Generator().manual_seed(chunk)
    logits = torch.randn(3, 5, 50, generator=gen) * 4
    ids = torch.randint(0, 50, (3, 5), generator=gen)
    want_lp, want_h = naive(logits, ids, temperature)
    lp = selective_logp(logits, ids, temperature=temperature, chunk=chunk)
    h = entropy_from_logits(logits, temperature=temperature, chunk=chunk)
    assert lp.dtype == h.dtype == torch.float32
    assert torch.allclose(lp, want_lp, atol=1e-5, rtol=0)
    assert torch.allclose(h, want_h, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [2, 5, 100])
def test_gradients_match_naive(chunk):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 6, 40, generator=gen, dtype=torch.float64) * 3
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    w1, w2 = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)

    a = base.float().clone().requires_grad_()
    lp, h = selective_logp_and_entropy(a, ids, temperature=0.8, chunk=chunk)
    ((lp * w1).sum() + (h * w2).sum()).backward()

    b = base.float().clone().requires_grad_()
    nlp, nh = naive(b, ids, 0.8)
    ((nlp * w1).sum() + (nh * w2).sum()).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=0)

    # each output alone (its backward sees no gradient for the other output)
    for which in (0, 1):
        c = base.float().clone().requires_grad_()
        out = (selective_logp(c, ids, temperature=0.8, chunk=chunk) if which == 0
               else entropy_from_logits(c, temperature=0.8, chunk=chunk))
        (out * w1).sum().backward()
        d = base.float().clone().requires_grad_()
        (naive(d, ids, 0.8)[which] * w1).sum().backward()
        assert torch.allclose(c.grad, d.grad, atol=1e-5, rtol=0)


def test_float64_input():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3), generator=gen)
    # forward runs in float32, so compare the float32 result against float64 finite differences
    # loosely; the exact check is test_gradients_match_naive.
    lp, h = selective_logp_and_entropy(x, ids, temperature=1.3, chunk=2)
    (lp.sum() + h.sum()).backward()
    y = x.detach().clone().requires_grad_()
    nlp, nh = naive(y.double(), ids, 1.3)
    (nlp.sum() + nh.sum()).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_bf16_logits_and_2d_views():
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(2, 9, 30, generator=gen).to(torch.bfloat16)
    view = full[:, 1:-1]  # a non-contiguous view, as logits[:, P-1:-1] is
    ids = torch.randint(0, 30, (2, 7), generator=gen)
    want_lp, want_h = naive(view, ids, 1.0)
    assert torch.allclose(selective_logp(view, ids, chunk=4), want_lp, atol=1e-5)
    flat = view.reshape(-1, 30)
    assert torch.allclose(selective_logp(flat, ids.reshape(-1), chunk=4), want_lp.reshape(-1), atol=1e-5)
    assert torch.allclose(entropy_from_logits(flat, chunk=5), want_h.reshape(-1), atol=1e-5)


def test_bad_input_is_rejected():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="ids has shape"):
        selective_logp(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids must lie"):
        selective_logp(logits, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="temperature"):
        selective_logp(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk"):
        entropy_from_logits(logits, chunk=0)


# --- vocabulary masking (the distribution actually sampled from) --------------------------------


def _masked_reference(logits, ids, masked, temperature):
    """float64 log_softmax with the masked ids at -inf; 0 * log 0 taken as 0 in the entropy."""
    x = logits.double() / temperature
    x[..., masked] = -math.inf
    lq = torch.log_softmax(x, -1)
    logp = lq.gather(-1, ids[..., None])[..., 0]
    ent = -(lq.exp() * torch.where(torch.isinf(lq), torch.zeros_like(lq), lq)).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_masked_ids_match_float64_and_have_finite_gradients(chunk, temperature):
    """Log-probs and entropies with masked ids equal the float64 formula (values and
    gradients); the masked logits get exactly 0 gradient and nothing is NaN."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 5, 11, generator=gen) * 3).requires_grad_()
    masked = [0, 4, 10]
    ids = torch.randint(1, 4, (3, 5), generator=gen)
    lp, h = selective_logp_and_entropy(logits, ids, temperature=temperature, chunk=chunk, masked_ids=masked)
    x = logits.detach().double().requires_grad_()
    want_lp, want_h = _masked_reference(x, ids, masked, temperature)
    assert torch.allclose(lp.double(), want_lp, atol=1e-5) and torch.allclose(h.double(), want_h, atol=1e-5)
    w = torch.randn(2, 3, 5, generator=gen)
    (lp * w[0] + h * w[1]).sum().backward()
    (want_lp * w[0].double() + want_h * w[1].double()).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.allclose(logits.grad.double(), x.grad, atol=1e-5)
    assert (logits.grad[..., masked] == 0).all()
    # unmasked, the same tokens have other log-probs: the mask matters on this data
    assert (selective_logp(logits.detach(), ids, temperature=temperature) - lp.detach()).abs().max() > 1e-3


def test_a_masked_logit_at_minus_inf_gives_a_finite_gradient():
    """A logit already at -inf (a processed score) is a probability-0 entry: the entropy and
    its gradient stay finite (0 * log 0 = 0), with or without it being declared masked."""
    logits = torch.tensor([[0.5, -math.inf, 1.0, 0.0]], requires_grad=True)
    for masked in (None, [1]):
        lp, h = selective_logp_and_entropy(logits, torch.tensor([2]), masked_ids=masked)
        (lp.sum() + h.sum()).backward()
        assert torch.isfinite(lp).all() and torch.isfinite(h).all()
        assert torch.isfinite(logits.grad).all() and logits.grad[0, 1] == 0
        logits.grad = None


def test_masked_ids_are_validated():
    logits = torch.zeros(2, 3, 4)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="masked_ids must lie in"):
        selective_logp(logits, ids, masked_ids=[4])
    with pytest.raises(ValueError, match="id 0 is in masked_ids"):
        selective_logp(logits, ids, masked_ids=[0])
    with pytest.raises(ValueError, match="masks all 4 ids"):
        entropy_from_logits(logits, masked_ids=[0, 1, 2, 3])
