"""grpo_core: model-agnostic GRPO math and training loop. Imports torch and the standard library only.

Shape glossary used in every docstring: ``B`` groups of ``G`` samples, ``N = B * G`` sequences,
``T`` steps (CartPole) or completion tokens (VLM); per-step tensors are padded to (N, T) and come
with a 0/1 ``mask`` of the same shape.
"""

from .advantages import BASELINES, SCALES, STATS_OVER, group_advantages
from .kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3, kl_k3_is
from .losses import AGGS, agg_count, agg_loss, clipped_policy_loss, entropy_bonus, grpo_loss
from .returns import discounted_returns

__all__ = [
    "AGGS",
    "BASELINES",
    "KL_ESTIMATORS",
    "SCALES",
    "STATS_OVER",
    "agg_count",
    "agg_loss",
    "clipped_policy_loss",
    "discounted_returns",
    "entropy_bonus",
    "group_advantages",
    "grpo_loss",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_is",
]
