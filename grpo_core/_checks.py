"""Input validation shared by the math modules.

Every check raises ``ValueError`` naming the offending argument and value, so that bad input
stops with a readable message instead of turning into a NaN that trains on.
"""

from __future__ import annotations

from collections import Counter

import torch


def check_same_shape(**tensors: torch.Tensor | None) -> torch.Size:
    """All given tensors (``None`` skipped) must share one shape; returns it.

    On a mismatch the message names first every argument whose shape is not the one most of
    them share (on a tie, the shape of the earliest argument), in argument order, then those
    that have it: a wrongly shaped ``logp`` among five good tensors reads "shape mismatch: logp
    has shape (3, 2) but old_logp, ref_logp, adv, mask have shape (2, 3)", not a complaint about
    ``old_logp``.
    """
    items = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    counts = Counter(t.shape for _, t in items)
    common = max(counts, key=counts.__getitem__)  # the first of the most frequent shapes
    if len(counts) > 1:
        odd = ", ".join(f"{name} has shape {tuple(t.shape)}" for name, t in items if t.shape != common)
        same = [name for name, t in items if t.shape == common]
        raise ValueError(f"shape mismatch: {odd} but {', '.join(same)} "
                         f"{'has' if len(same) == 1 else 'have'} shape {tuple(common)}")
    return common


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, T), got shape {tuple(t.shape)}")


def as_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor after checking that it holds only 0 and 1."""
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        value = mask[bad].flatten()[0].item()
        raise ValueError(f"{name} must hold only 0 and 1, found {value!r}")
    return mask != 0


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):  # also rejects NaN
        raise ValueError(f"{name}={value!r} is outside the valid range [{low}, {high}]")


def check_finite(name: str, t: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Valid entries (where ``mask`` is true) of ``t`` must be finite."""
    sel = t if mask is None else t[mask]
    bad = ~torch.isfinite(sel)
    if bool(bad.any()):
        raise ValueError(f"{name} holds a non-finite value ({sel[bad].flatten()[0].item()!r})")
