"""Which modules make a forward random: dropout layers and attention dropout in train mode.

The old-log-prob shortcut (one epoch, one minibatch: the update's own forward, detached, serves
as the sampling policy's log-probs) is exact only for a deterministic forward. A dropout active
in that forward forces the PPO ratio to 1 while the true ratio is not (0.8-1.8 measured with
dropout 0.3), so the loop and the VLM preflight refuse it, naming the module.
"""

from __future__ import annotations

import contextlib

import torch

_ATTENTION_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout_p", "dropout")
"""Float attributes that modules pass to a functional dropout: transformers' attention classes
(``attention_dropout``; CLIP-style ``dropout``), ``torch.nn.MultiheadAttention`` (``dropout``)."""


class StochasticForwardError(RuntimeError):
    """The policy's forward draws random numbers where the loop needs a deterministic one."""


def dropout_rate(module: torch.nn.Module) -> float:
    """The dropout probability ``module`` applies when in train mode (0 if none).

    ``torch.nn`` dropout layers (``p``) and modules that call a functional dropout with a float
    attribute (``_ATTENTION_DROPOUT_ATTRS``)."""
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return float(module.p)
    for name in _ATTENTION_DROPOUT_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, float) and not isinstance(value, bool):
            return value
    return 0.0


@contextlib.contextmanager
def watch_stochastic_modules(model: torch.nn.Module):
    """Within: record every module that runs in train mode with a dropout rate > 0.

    Yields a list that is filled, after the block, with ``"name (Class, p=...)"`` entries.
    Forward pre-hooks only: nothing is computed twice."""
    seen: dict[str, str] = {}
    handles = []

    def hook(name):
        def record(module, _args):
            rate = dropout_rate(module)
            if module.training and rate > 0:
                seen[name] = f"{name or '<root>'} ({type(module).__name__}, p={rate:g})"
        return record

    for name, module in model.named_modules():
        if dropout_rate(module) > 0:
            handles.append(module.register_forward_pre_hook(hook(name)))
    found: list[str] = []
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        found.extend(seen.values())
