"""Gradient checkpointing on the VLM policy: fewer saved activations, same log-probs and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm import enable_checkpointing  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, make_adapter, tiny_dirs  # noqa: E402,F401


def _logp_grads_saved(adapter, rollout):
    """Log-probs, gradients, and the bytes autograd saved for the backward pass."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    adapter.policy.zero_grad(set_to_none=True)
    rows = torch.arange(rollout.mask.shape[0])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = adapter.logp_and_entropy(adapter.policy, rollout, rows)
    (logp * rollout.mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in adapter.policy.named_parameters() if p.grad is not None}
    return logp.detach(), grads, saved[0]


def test_checkpointing_saves_less_and_changes_nothing(tiny_dirs):
    adapter = make_adapter(tiny_dirs)
    rollout = adapter.collect(num_groups=2, group_size=3, iteration=0)
    plain_logp, plain_grads, plain_saved = _logp_grads_saved(adapter, rollout)
    enable_checkpointing(adapter.policy)
    ckpt_logp, ckpt_grads, ckpt_saved = _logp_grads_saved(adapter, rollout)

    assert ckpt_saved < 0.8 * plain_saved, (ckpt_saved, plain_saved)
    assert not adapter.policy.training, "the policy goes back to eval mode after the forward"
    torch.testing.assert_close(ckpt_logp, plain_logp, rtol=0, atol=1e-6)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
