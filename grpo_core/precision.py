"""Numerical precision of a run: which dtype holds the trainable weights and the optimizer's
state, and which dtype the forward and backward compute in.

Precision belongs to the run, not to the math: the math functions take whatever dtype arrives
and return float32 log-probs; the trainer (``GRPOTrainer(precision=...)``) opens the compute
context around every forward it runs (rollouts, old and reference log-probs, the update's
forwards). The names are Lightning's (``Trainer(precision=...)``):

- ``"32"``: float32 weights, float32 compute.
- ``"bf16-mixed"``: float32 trainable weights and optimizer state (the master weights), forward
  and backward in bfloat16 through ``torch.autocast`` (matmuls and convolutions in bf16, the
  reductions autocast keeps in float32), gradients in the parameters' float32. Under FSDP2 the
  trainer adds ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: the shards
  and Adam stay float32, the gathered weights and the compute are bf16, the gradients are
  reduced in float32.
- ``"bf16-true"``: the weights themselves in bfloat16, and so Adam's update is rounded into
  them: a step smaller than half a bf16 ulp of a weight (between |w| * 2**-9 and |w| * 2**-8)
  does not change it. At lr 1e-6 and weights of about 0.02 that is nearly every entry
  (``bf16_stalled_share``); the run says so at its start.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads PRECISIONS without it
    import torch

PRECISIONS = ("32", "bf16-mixed", "bf16-true")
BF16_MANTISSA_BITS = 7
"""Stored mantissa bits of bfloat16 (8 bits of precision with the implicit one)."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    return precision


def weight_dtype(precision: str) -> "torch.dtype":
    """The dtype a model's weights are loaded in: bfloat16 for ``bf16-true``, else float32."""
    import torch

    return torch.bfloat16 if check_precision(precision) == "bf16-true" else torch.float32


def compute_context(precision: str, device: "torch.device | str"):
    """The context every forward of the run executes in: ``torch.autocast`` to bfloat16 for
    ``bf16-mixed`` (on CUDA and on CPU alike), nothing for the others."""
    import torch

    if check_precision(precision) != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def bf16_half_ulp(w: "torch.Tensor") -> "torch.Tensor":
    """Half the spacing of bfloat16 numbers at each entry of ``w``: the smallest change that
    round-to-nearest does not discard (for a normal number, ``2**(floor(log2|w|) - 8)``; at 0 and
    for subnormals the spacing of the smallest normal, 2**-133 / 2). Shapes: any -> same, float64."""
    import torch

    a = w.detach().abs().double()
    tiny = torch.finfo(torch.bfloat16).tiny
    exp = torch.floor(torch.log2(a.clamp(min=tiny)))
    return torch.exp2(exp - BF16_MANTISSA_BITS - 1)


def bf16_stalled_share(params, lr: float) -> float:
    """Share of the entries of ``params`` whose bf16 value an update of size ``lr`` (about what
    one Adam step moves a weight by) cannot change: half a bf16 ulp above ``lr``. A necessary
    condition only: Adam's step is smaller than lr where the gradient is noisy."""
    total, stalled = 0, 0
    for p in params:
        total += p.numel()
        stalled += int((bf16_half_ulp(p) > lr).sum())
    return stalled / total if total else 0.0


def bf16_true_note(params, lr: float, *, threshold: float = 0.1) -> str | None:
    """One line when ``bf16-true`` at ``lr`` leaves more than ``threshold`` of the trainable
    entries unable to move; None otherwise."""
    share = bf16_stalled_share(params, lr)
    if not share > threshold:
        return None
    return (f"warning: precision bf16-true at lr {lr:g}: {100 * share:.1f}% of the trainable entries are too large "
            "for a step of that size to change their bf16 value (half a bf16 ulp > lr), so the weights barely "
            "move; use --precision bf16-mixed (float32 master weights, bf16 compute)")


def moved_share(before: "dict[str, torch.Tensor]", after: "dict[str, torch.Tensor]") -> float:
    """Share of the entries that differ between two state dicts with the same keys (compared in
    the dtype of ``after``)."""
    total, moved = 0, 0
    for k, b in before.items():
        a = after[k]
        total += a.numel()
        moved += int((a != b.to(a.dtype)).sum())
    return moved / total if total else math.nan
