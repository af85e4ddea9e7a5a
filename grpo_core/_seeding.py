"""Deterministic seeds derived from a tuple, with the standard library and torch only."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts: the first 8 bytes of sha256 of their '/'-joined text."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def minibatch_order(seed: int, iteration: int, epoch: int, n: int, minibatches: int) -> list[torch.Tensor]:
    """The sequence indices of each minibatch of one epoch.

    ``torch.randperm(n)`` under a generator seeded with ``derive_seed(seed, "minibatch",
    iteration, epoch)``, split by ``torch.tensor_split`` (the first ``n % minibatches``
    minibatches hold one more sequence).
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "minibatch", iteration, epoch))
    return list(torch.randperm(n, generator=gen).tensor_split(minibatches))
