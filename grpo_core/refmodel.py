"""Reference-model creation and refresh (plan item 1)."""

from __future__ import annotations

import copy

import torch


def frozen_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``policy`` in eval mode with every parameter's requires_grad False."""
    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def hard_refresh(ref: torch.nn.Module, policy: torch.nn.Module) -> None:
    """``ref <- policy``: ``load_state_dict`` then eval mode, no grad."""
    ref.load_state_dict(policy.state_dict())
    ref.eval()
    ref.requires_grad_(False)


@torch.no_grad()
def soft_refresh(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``ref <- alpha * policy + (1 - alpha) * ref`` for every parameter and float buffer
    (TRL's sync_ref_model). ``alpha = 1`` is a copy, ``alpha = 0`` changes nothing."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is outside [0, 1]")
    src = policy.state_dict()
    for name, t in ref.state_dict().items():
        if name not in src:
            raise ValueError(f"reference has {name!r} but the policy does not")
        if t.is_floating_point():
            t.mul_(1.0 - alpha).add_(src[name].to(t.dtype), alpha=alpha)
        else:
            t.copy_(src[name])
