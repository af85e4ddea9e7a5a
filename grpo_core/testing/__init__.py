"""grpo_core.testing: the public conformance kit.

Hypothesis strategies and padding helpers that generate valid GRPO inputs (ragged batches,
rewards, log-prob triples) for property tests of ``grpo_core`` or of any implementation that
claims to compute the same math. The kit lives in :mod:`grpo_core.testing.strategies`.

``hypothesis`` is imported lazily: ``import grpo_core.testing`` alone loads nothing extra;
the first access to ``grpo_core.testing.strategies`` (or to one of its names, for example
``grpo_core.testing.pad``) imports it, and raises ``ImportError`` if hypothesis is missing.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["strategies"]

# Public names of :mod:`.strategies`, forwarded lazily (kept equal to strategies.__all__ by a test).
STRATEGY_NAMES = frozenset({
    "MAX_GROUPS", "MAX_GROUP_SIZE", "MAX_LEN", "MAX_LOGIT", "REWARD_STYLES", "ADV_STYLES",
    "Ragged", "ValueBatch", "PolicyBatch", "seeds", "dtypes", "gammas", "layouts",
    "junk_values", "group_shapes", "value_batches", "policy_batches", "pad", "unpad",
    "to_groups",
})


def __getattr__(name: str):
    """Import a submodule, or :mod:`.strategies` for one of its names, on first use."""
    if name.startswith("__"):  # dunder probes (pickle, inspect, pytest) must not import anything
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in STRATEGY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.strategies"), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Estimator kit (base.py, checks.py, adv_checks.py, loss_checks.py, kit.py): torch and the
# standard library only, no hypothesis.
from .base import CheckResult  # noqa: E402
from .kit import BUILTINS, check_estimator, declares, get_claims  # noqa: E402

__all__ += ["BUILTINS", "CheckResult", "check_estimator", "declares", "get_claims"]
