"""Per-token KL estimators (plan item 2), after Schulman's "Approximating KL Divergence".

With ``d = ref_logp - logp`` (so ``r = exp(d) = ref(x) / pi(x)``) for a token ``x`` sampled
from the policy ``pi``:

=========  ===================  ==================  =====================================
name       value                E_{x~pi}[value]      gradient of E[value] used as a loss*
=========  ===================  ==================  =====================================
k1         ``-d``               KL(pi || ref)        zero
k2         ``d**2 / 2``         biased, >= 0         grad KL(pi || ref)
k3         ``exp(d) - d - 1``   KL(pi || ref), >= 0  grad KL(ref || pi)
k3_is      ``pi/pi_old * k3``   KL(pi || ref)**      grad KL(pi || ref)
=========  ===================  ==================  =====================================

\\* The gradient of ``mean(value)`` with respect to the policy parameters, with the tokens
drawn from ``pi`` and the sampling distribution held fixed (what a loss term does). Derivation
for k3: ``grad k3 = (1 - ref/pi) grad log pi``, so ``sum_x pi (1 - ref/pi) grad log pi
= -sum_x ref grad log pi = grad KL(ref || pi)``. For k1 the expectation is ``sum_x grad pi = 0``.
These are the findings behind recent fixes in TRL, OpenRLHF and open-instruct, and the tests
re-derive each row by enumerating a categorical distribution.

\\** with tokens drawn from ``pi_old``; on-policy (``old_logp == logp`` in value) it equals k3
in value while its gradient flows through the ratio.

All estimators are elementwise, keep shape and dtype, let the gradient flow through ``logp``
and stay finite for log-prob gaps of +-50 in float32.

Shapes: every argument (...) of one shape -> (...).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_choice, check_same_shape


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k1 = logp - ref_logp``: unbiased for KL(pi||ref), can be negative; zero gradient in expectation."""
    check_same_shape(logp=logp, ref_logp=ref_logp)
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k2 = (logp - ref_logp)**2 / 2``: non-negative, biased; its loss gradient is grad KL(pi||ref)."""
    check_same_shape(logp=logp, ref_logp=ref_logp)
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(d) - d - 1``, ``d = ref_logp - logp``: unbiased for KL(pi||ref), never
    negative; its loss gradient is grad KL(ref||pi). ``expm1`` keeps small gaps accurate."""
    check_same_shape(logp=logp, ref_logp=ref_logp)
    d = ref_logp - logp
    return torch.expm1(d) - d


def kl_k3_is(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Importance-corrected k3, ``exp(logp - old_logp) * k3`` (DeepSeek-V3.2; TRL's
    ``use_bias_correction_kl``): unbiased for KL(pi||ref) on tokens drawn from ``pi_old``;
    its loss gradient is grad KL(pi||ref). ``old_logp`` carries no gradient."""
    check_same_shape(logp=logp, ref_logp=ref_logp, old_logp=old_logp)
    return torch.exp(logp - old_logp.detach()) * kl_k3(logp, ref_logp)


KL_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3_is": kl_k3_is,
}
NEEDS_OLD_LOGP = frozenset({"k3_is"})
FLAT_AT_REFERENCE = frozenset({"k2", "k3", "k3_is"})
"""Estimators whose per-token gradient is exactly 0 where ``logp == ref_logp`` (k2: ``-d``; k3:
``1 - exp(d)``; k3_is: ``ratio * (k3 + 1 - exp(d))``, all 0 at ``d = 0``). Not k1: its per-token
gradient is 1, so its term ``agg(logp - ref_logp)`` moves the weights even at the reference (with
token-mean or seq-mean-token-mean weights that depend on the sampled lengths its expected
gradient is not even 0)."""


def kl_estimate(
    name: str, logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token KL by estimator name (``k1``, ``k2``, ``k3``, ``k3_is``).

    Shapes: logp, ref_logp, old_logp (N, T) -> (N, T).
    """
    check_choice("kl_estimator", name, tuple(KL_ESTIMATORS))
    if name in NEEDS_OLD_LOGP:
        if old_logp is None:
            raise ValueError(f"kl_estimator={name!r} needs old_logp (the sampling log-probs)")
        return KL_ESTIMATORS[name](logp, ref_logp, old_logp)
    return KL_ESTIMATORS[name](logp, ref_logp)
