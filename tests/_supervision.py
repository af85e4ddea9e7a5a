"""Rewards for ``stats_over="sequences"``: outcome (a reward at the last step only) or process
supervision (rewards at random scored steps, zero elsewhere), from any ragged values."""

from __future__ import annotations

import torch

from grpo_core.testing import strategies as gs


def supervise(values, seed: int, mode: str):
    """``(rewards, scored)`` ragged: ``scored`` is None for "outcome", else booleans per step."""
    if mode == "outcome":
        return [[0.0] * (len(v) - 1) + [v[-1]] if v else [] for v in values], None
    gen = torch.Generator().manual_seed(seed)
    rewards, scored = [], []
    for v in values:
        flags = (torch.rand(len(v), generator=gen) < 0.4).tolist()
        rewards.append([x if f else 0.0 for x, f in zip(v, flags)])
        scored.append(flags)
    return rewards, scored


def scored_tensor(scored, like_mask: torch.Tensor, layout: str, seed: int):
    """The ragged ``scored`` flags padded exactly like the rewards (same layout and seed)."""
    if scored is None:
        return None
    t, _ = gs.pad([[float(f) for f in s] for s in scored], like_mask.shape[1], torch.float64,
                  0.0, layout=layout, seed=seed)
    return t.to(like_mask.dtype)
