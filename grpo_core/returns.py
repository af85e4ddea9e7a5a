"""Discounted returns over padded batches (plan item 3).

Shape glossary (shared by every ``grpo_core`` module): ``B`` groups of ``G`` samples,
``N = B * G`` sequences, ``T`` steps (CartPole) or completion tokens (VLM).
"""

from __future__ import annotations

import torch

from ._checks import as_mask, check_2d, check_finite, check_range, check_same_shape

_BLOCK = 64  # steps per block of the blocked scan; exponents inside a block stay <= _BLOCK


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over the valid steps of each sequence.

    Shapes: rewards (N, T), mask (N, T) of 0/1 -> returns (N, T).

    Conventions (pinned by tests against ``reference.grpo_math``):
    - ``G_T = 0`` after the last valid step (CartPole style: no bootstrap value).
    - Only valid steps exist: a masked step adds no reward and no discount, so the result
      equals the recursion run on the sequence with its padding removed, wherever the
      padding sits. Masked positions of the output are exactly 0.
    - ``gamma = 1`` is the reverse cumulative sum; with a single reward on the last valid
      step every valid step gets that reward, which is standard outcome-reward GRPO.
    - ``gamma = 0`` returns the rewards themselves.
    - ``rewards`` is a floating-point tensor and the returns have its dtype; integer (or bool)
      rewards are refused, for every gamma (a discounted sum is not an integer).

    The scan runs over blocks of 64 steps: inside a block the returns are one batched
    matrix product with weights ``gamma ** (valid steps between t and k)``; a Python loop
    only crosses blocks, so T of several thousand costs T/64 iterations.
    """
    check_same_shape(rewards=rewards, mask=mask)
    check_2d("rewards", rewards)
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    check_range("gamma", float(gamma), 0.0, 1.0)
    m = as_mask(mask, rewards)
    check_finite("rewards", rewards, m)
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    mf = m.to(r.dtype)
    n, t_len = r.shape
    if gamma == 1.0:
        return torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * mf
    out = torch.zeros_like(r)
    carry = r.new_zeros(n)  # return at the first valid step after the current block
    for end in range(t_len, 0, -_BLOCK):
        start = max(0, end - _BLOCK)
        out[:, start:end], carry = _block_returns(r[:, start:end], mf[:, start:end], gamma, carry)
    return out * mf


def _block_returns(r: torch.Tensor, m: torch.Tensor, gamma: float, carry: torch.Tensor):
    """Returns inside one block of C steps plus the carry for the block before it.

    Shapes: r (N, C), m (N, C), carry (N,) -> (N, C), (N,).
    """
    c = torch.cumsum(m, 1) - m  # valid steps strictly before t inside the block
    total = m.sum(1, keepdim=True)
    gaps = c[:, None, :] - c[:, :, None]  # (N, t, k): valid steps in [t, k)
    upper = torch.ones(r.shape[1], r.shape[1], dtype=torch.bool, device=r.device).triu()
    weights = torch.where(upper, torch.pow(gamma, gaps.clamp(min=0)), torch.zeros_like(gaps))
    inside = torch.bmm(weights, (r * m).unsqueeze(-1)).squeeze(-1)
    g = inside + torch.pow(gamma, total - c) * carry[:, None]
    first = m.argmax(1)  # first valid step of the block (any index if none is valid)
    has_valid = total.squeeze(1) > 0
    new_carry = torch.where(has_valid, g.gather(1, first[:, None]).squeeze(1), carry)
    return g, new_carry
