"""The shared machinery of the estimator kit: report rows, the check context, claim specs.

Every check takes a :class:`Context` (the estimator, its kind, its claims, a seed) and returns
one :class:`CheckResult` row. The rows of each kind live in their own module, each importing
from this one and from nothing else in the kit: the KL and returns rows in :mod:`.checks`
(which also holds the registry of every kind's rows), the advantage rows in
:mod:`.adv_checks`, the whole-loss rows in :mod:`.loss_checks`. Imports point one way:
``kit -> checks -> adv_checks, loss_checks -> base``.

Row kinds:

- ``"required"``: every estimator of the kind must pass (shape, finiteness, no in-place
  writes, elementwise / group independence, the returns recursion, ...).
- ``"claim"``: a property the estimator declares (``@declares(unbiased=True)``, or ``--expect``
  on the command line). A claim of ``True`` passes when the property is measured to hold, a
  claim of ``False`` when it is measured not to hold (``k2`` declares ``unbiased=False``).
- ``"info"``: a property nobody claimed; it is measured and shown, ``passed`` is ``None``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

F64 = torch.float64
KINDS = ("kl", "advantage", "returns", "loss")
ROW_KINDS = ("required", "claim", "info")
GRAD_CLASSES = ("kl_policy_ref", "kl_ref_policy", "zero", "neither")
SINGLETONS = ("zero", "raw", "unsupported")
# aggregations a loss may declare (``agg=``); loss_checks.AGG_MODELS defines each one
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm", "grpo")
# whose ratio a loss clips (``ratio_level=``): the token's, the response's (GSPO), or the
# response's value with the token's own gradient (GSPO-token); loss_checks measures it
RATIO_LEVELS = ("token", "sequence", "sequence-token")
# what the ratio does in a loss (``policy_loss=``): PPO's clipped surrogate, or CISPO's detached
# clipped weight on -A logp
POLICY_LOSSES = ("ppo", "cispo")


@dataclass(frozen=True)
class Number:
    """A numeric claim's range: ``low`` (inclusive or not) up to ``high`` (exclusive)."""

    low: float
    inclusive: bool = True
    high: float = math.inf
    integer: bool = False
    none_ok: bool = False  # the claim may be None ("none" on the command line)

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        above = value >= self.low if self.inclusive else value > self.low
        return bool(above and value < self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"{'>=' if self.inclusive else '>'} {self.low:g}"
        high = f" and < {self.high:g}" if math.isfinite(self.high) else ""
        return f"{kind} {low}{high}" + (" or none" if self.none_ok else "")


# Claims each kind accepts: bool, a tuple of choices, or a Number range. Meanings: kl in
# kit.py's docstring; advantage in adv_checks.py's; loss in loss_checks.py's.
CLAIM_KEYS: dict[str, dict[str, Any]] = {
    "kl": {"unbiased": bool, "nonnegative": bool, "grad": GRAD_CLASSES,
           "clamp": Number(0.0, inclusive=False)},
    "advantage": {"std_scaled": bool, "bessel": bool, "eps": Number(0.0),
                  "singleton": SINGLETONS, "leave_one_out": bool},
    "returns": {},
    "loss": {"eps_low": Number(0.0, high=1.0), "eps_high": Number(0.0), "agg": LOSS_AGGS,
             "max_len": Number(1, integer=True), "clip_ratio_c": Number(1.0, False, none_ok=True),
             "ratio_level": RATIO_LEVELS, "policy_loss": POLICY_LOSSES},
}

DEFAULT_SAMPLES = 20_000  # samples per categorical pair (KL unbiasedness)


# ---------------------------------------------------------------------------------------------
# Report rows
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One row of an estimator report.

    ``passed`` is ``None`` exactly for ``kind="info"`` rows (measured, not judged).
    ``value`` is what was measured, ``bound`` what it was compared against (either may be a
    number, a string or ``None``), ``explanation`` one line saying what the row found.
    ``details`` holds optional per-case numbers (JSON-ready), not shown in the table.
    """

    name: str
    passed: bool | None
    value: Any
    bound: Any
    explanation: str
    kind: str = "required"
    details: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"kind={self.kind!r} is not valid; choose one of {ROW_KINDS}")
        if (self.passed is None) != (self.kind == "info"):
            raise ValueError(f"row {self.name!r}: passed is None exactly for info rows")
        self.explanation = _one_line(self.explanation)

    @property
    def failed(self) -> bool:
        return self.passed is False

    @property
    def status(self) -> str:
        return "info" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "passed": self.passed,
            "kind": self.kind,
            "value": _jsonable(self.value),
            "bound": _jsonable(self.bound),
            "explanation": self.explanation,
            "details": _jsonable(self.details),
        }


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def fmt(x: Any) -> str:
    """Compact text for a value or bound."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


@dataclass
class Context:
    """What every check needs: the estimator and how to call it."""

    fn: Callable
    kind: str
    claims: dict = field(default_factory=dict)
    seed: int = 0
    samples: int = DEFAULT_SAMPLES
    arity: int = 2  # kl: 2 -> fn(logp, ref_logp); 3 -> fn(logp, ref_logp, old_logp)
    cache: dict = field(default_factory=dict, repr=False)  # measurements shared by rows

    def gen(self, salt: int) -> torch.Generator:
        """A generator seeded from the run's seed and a per-check salt."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + salt) % (2**63))

    def row_kind(self, claim: str) -> str:
        return "claim" if claim in self.claims else "info"


def _judge(ctx: Context, claim: str, holds: bool) -> bool | None:
    """``passed`` of a claimable row: None when unclaimed, else claim == measurement."""
    if claim not in ctx.claims:
        return None
    return bool(ctx.claims[claim]) == bool(holds)


def _claim_text(ctx: Context, claim: str) -> str:
    if claim not in ctx.claims:
        return "not claimed"
    return f"claimed {claim}={fmt(ctx.claims[claim])}"


def _tensor_out(out: Any, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}, expected a torch.Tensor")
    return out


# ---------------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------------


def positional_arity(fn: Callable) -> tuple[int, float]:
    """(required positional parameters, most positional arguments accepted; inf for *args).

    Raises ``TypeError`` when the signature cannot be read.
    """
    sig = inspect.signature(fn)
    required, accepted = 0, 0.0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            accepted += 1
            if p.default is p.empty:
                required += 1
        elif p.kind == p.VAR_POSITIONAL:
            accepted = math.inf
        elif p.kind == p.KEYWORD_ONLY and p.default is p.empty:
            raise TypeError(f"keyword-only parameter {p.name!r} has no default")
    return required, accepted


def call_arity(fn: Callable, kind: str) -> int:
    """How many positional arguments the kit passes ``fn`` for ``kind``.

    kl: 3 when ``fn`` requires exactly three positional parameters (``logp, ref_logp,
    old_logp``), else 2. advantage: 1 (``scores``). returns: 3 (``rewards, mask, gamma``).
    loss: 4 (``logp, old_logp, adv, mask``).
    Raises ``TypeError`` naming the expected signature when ``fn`` cannot take them.
    """
    expected = {
        "kl": "fn(logp, ref_logp) or fn(logp, ref_logp, old_logp)",
        "advantage": "fn(scores)",
        "returns": "fn(rewards, mask, gamma)",
        "loss": "fn(logp, old_logp, adv, mask)",
    }[kind]
    fixed = {"kl": 2, "advantage": 1, "returns": 3, "loss": 4}[kind]
    try:
        required, accepted = positional_arity(fn)
    except ValueError:  # no signature available (some builtins): trust the caller
        return fixed
    except TypeError as e:
        raise TypeError(f"wrong signature for a {kind} estimator ({e}); expected {expected}")
    if kind == "kl":
        if required == 3:
            return 3
        if required <= 2 <= accepted:
            return 2
    elif required <= fixed <= accepted:
        return fixed
    params = str(inspect.signature(fn))
    raise TypeError(f"wrong signature for a {kind} estimator: {params}; expected {expected}")


# ---------------------------------------------------------------------------------------------
# Helpers shared by the rows of several kinds
# ---------------------------------------------------------------------------------------------


def _inplace_check(name: str, call: Callable[[list], Any], inputs: list) -> CheckResult:
    before = [t.clone() for t in inputs]
    versions = [t._version for t in inputs]
    call(inputs)
    for i, (t, b, v) in enumerate(zip(inputs, before, versions)):
        if t._version != v or not torch.equal(torch.nan_to_num(t), torch.nan_to_num(b)):
            return CheckResult(name, False, f"argument {i}", "untouched",
                               f"argument {i} was modified in place")
    return CheckResult(name, True, "untouched", "untouched", "inputs are not modified in place")


def _same_except(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> bool:
    """a and b agree (to 1e-12 relative, NaN == NaN) wherever ``keep`` is true."""
    a, b = a.detach().to(F64)[keep], b.detach().to(F64)[keep]
    return bool(torch.allclose(a, b, rtol=1e-12, atol=1e-300, equal_nan=True))
