"""Estimator kit: property-test a KL, advantage, returns estimator or a whole policy loss.

Usage::

    from grpo_core.testing.kit import check_estimator, declares

    @declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")
    def my_kl(logp, ref_logp):
        d = ref_logp - logp
        return torch.expm1(d) - d

    rows = check_estimator(my_kl, "kl")          # list[CheckResult]
    assert not any(r.failed for r in rows)

Signatures by kind:

- ``"kl"``: ``fn(logp, ref_logp) -> per-token tensor`` of the same shape, tokens drawn from
  the policy; or ``fn(logp, ref_logp, old_logp)`` (three required parameters) for estimators
  that use the sampling policy (importance-corrected k3), checked on-policy
  (``old_logp = logp.detach()``) and off-policy (tokens drawn from a third distribution).
- ``"advantage"``: ``fn(scores) -> tensor``, scores ``(B, G)``, groups along the last dim.
- ``"returns"``: ``fn(rewards, mask, gamma) -> tensor`` ``(N, T)``.
- ``"loss"``: ``fn(logp, old_logp, adv, mask) -> scalar`` (or a tuple whose first element is
  the scalar), all ``(N, T)``, ``mask`` 0/1 in the dtype of ``logp``; see
  :mod:`.loss_checks`.

Claims (:func:`declares`, or the ``claims`` argument, which overrides them):

- kl: ``unbiased``, ``nonnegative`` (bools); ``grad`` (``kl_policy_ref`` | ``kl_ref_policy`` |
  ``zero`` | ``neither``: which gradient the estimator follows as a loss term; clamped k3 and
  ``|logp - ref_logp|`` follow neither); ``clamp`` (a number C: values clamped to [-C, C]).
- advantage: ``std_scaled``, ``bessel``, ``leave_one_out`` (bools); ``eps`` (added to the
  std); ``singleton`` (``zero`` | ``raw`` | ``unsupported``). Meanings in :mod:`.adv_checks`.
- loss: ``eps_low``, ``eps_high``, ``agg``, ``max_len``, ``clip_ratio_c``, ``ratio_level``
  (``token`` | ``sequence`` | ``sequence-token``), ``policy_loss`` (``ppo`` | ``cispo``);
  meanings in :mod:`.loss_checks`.

A claimed property that the measurement contradicts fails; an unclaimed one is measured and
shown as an info row.

:data:`BUILTINS` wraps the estimators and the policy loss of ``grpo_core`` with their claims;
the kit reaches every claim by computation (sampling, exact enumeration, bisection), and they
all pass.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .. import (
    clipped_policy_loss,
    discounted_returns,
    group_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_is,
)
from ..losses import cispo_loss
from .base import (
    CLAIM_KEYS,
    DEFAULT_SAMPLES,
    KINDS,
    CheckResult,
    Context,
    Number,
    call_arity,
    fmt,
)
from .checks import run_rows

__all__ = [
    "BUILTINS",
    "BUILTIN_KINDS",
    "CheckResult",
    "EstimatorUsageError",
    "all_passed",
    "check_estimator",
    "declares",
    "format_table",
    "get_claims",
    "parse_expect",
    "validate_estimator",
]

CLAIMS_ATTR = "__grpo_claims__"
_ALL_KEYS = {k: t for keys in CLAIM_KEYS.values() for k, t in keys.items()}


class EstimatorUsageError(ValueError):
    """The estimator cannot be checked at all (bad signature, raises on a basic call, ...)."""


def _check_value(key: str, value, spec):
    """``value`` for claim ``key`` checked against its spec (bool, choices or Number)."""
    if spec is bool:
        if not isinstance(value, bool):
            raise EstimatorUsageError(f"claim {key} must be true or false, got {value!r}")
    elif isinstance(spec, tuple):
        if value not in spec:
            raise EstimatorUsageError(
                f"claim {key}={value!r} is not valid; choose one of {', '.join(spec)}")
    elif not spec.accepts(value):
        raise EstimatorUsageError(f"claim {key} must be {spec.describe()}, got {value!r}")
    if isinstance(spec, Number) and value is not None:
        return int(value) if spec.integer else float(value)
    return value


def _validate_claims(claims: dict, kind: str | None = None) -> dict:
    keys = _ALL_KEYS if kind is None else CLAIM_KEYS[kind]
    out = {}
    for key, value in claims.items():
        if key not in keys:
            where = "any kind" if kind is None else f"{'an' if kind[0] in 'aeiou' else 'a'} " \
                f"{kind} estimator"
            valid = ", ".join(sorted(keys)) or "none"
            raise EstimatorUsageError(f"unknown claim {key!r} for {where} (valid: {valid})")
        out[key] = _check_value(key, value, keys[key])
    return out


def declares(**claims) -> Callable[[Callable], Callable]:
    """Decorator recording what an estimator claims; the kit checks each claim.

    ``@declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")`` for a KL estimator,
    ``@declares(std_scaled=True, bessel=True)`` for an advantage estimator. ``False`` claims
    the opposite (``unbiased=False``: measured to be biased). Sets one attribute per claim on
    the function and the dict ``__grpo_claims__``; returns the function itself.
    """
    checked = _validate_claims(claims)

    def wrap(fn: Callable) -> Callable:
        merged = {**getattr(fn, CLAIMS_ATTR, {}), **checked}
        setattr(fn, CLAIMS_ATTR, merged)
        for key, value in checked.items():
            setattr(fn, key, value)
        return fn

    return wrap


def get_claims(fn: Callable) -> dict:
    """The claims recorded by :func:`declares` (empty dict if none)."""
    return dict(getattr(fn, CLAIMS_ATTR, {}) or {})


def _parse_value(key: str, sep: str, value: str):
    spec = _ALL_KEYS[key]
    if spec is bool:
        if not sep:
            return True
        if value.lower() in ("true", "yes", "1"):
            return True
        if value.lower() in ("false", "no", "0"):
            return False
        raise EstimatorUsageError(f"claim {key} must be true or false, got {value!r}")
    if not sep:
        hint = "|".join(spec) if isinstance(spec, tuple) else spec.describe()
        raise EstimatorUsageError(f"claim {key} needs a value: {key}={hint}")
    if isinstance(spec, tuple):
        return value
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise EstimatorUsageError(f"claim {key} must be {spec.describe()}, got {value!r}") from None


def parse_expect(text: str | None) -> dict:
    """``"unbiased,grad=kl_policy_ref,bessel=false,eps=1e-4"`` -> claims dict.

    A bare key means ``True`` (boolean claims only); booleans accept true/false, yes/no, 1/0;
    numbers parse as floats (``none`` for a claim that may be None).
    """
    out: dict = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in _ALL_KEYS:
            raise EstimatorUsageError(
                f"unknown claim {key!r} in --expect (valid: {', '.join(sorted(_ALL_KEYS))})")
        out[key] = _parse_value(key, sep, value)
    return _validate_claims(out)


def _basic_inputs(kind: str, arity: int):
    gen = torch.Generator().manual_seed(12345)
    if kind == "kl":
        logp = torch.log_softmax(torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), -1)
        ref = torch.log_softmax(torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), -1)
        return (logp, ref, logp.clone())[:arity], (2, 3, 5)
    if kind == "advantage":
        return (torch.randn(3, 4, generator=gen, dtype=torch.float64),), (3, 4)
    if kind == "loss":
        logp = -torch.rand(2, 5, generator=gen, dtype=torch.float64)
        old = logp + 0.1 * torch.randn(2, 5, generator=gen, dtype=torch.float64)
        adv = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        mask = torch.ones(2, 5, dtype=torch.float64)
        mask[1, 3:] = 0
        return (logp, old, adv, mask), ()
    rewards = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    return (rewards, mask, 0.9), (3, 6)


def _basic_call(fn: Callable, kind: str, args):
    out = fn(*args)
    if kind == "loss" and isinstance(out, (tuple, list)) and out:
        out = out[0]  # (loss, stats, ...): the loss comes first
    return out


def _square_loss_inputs():
    """The basic loss inputs on a 5 x 5 batch (N = T): a loss that broadcasts a per-row vector
    along T runs only there, and is then checked row by row (``row_equivariance`` names it)."""
    (logp, old, adv, mask), _ = _basic_inputs("loss", 4)

    def pad(x, fill):
        return torch.cat([x, torch.full((3, 5), fill, dtype=x.dtype)])

    return pad(logp, -0.5), pad(old, -0.5), pad(adv, 0.3), pad(mask, 1.0)


def validate_estimator(fn: Callable, kind: str) -> int:
    """Check that ``fn`` can be checked as a ``kind`` estimator; returns its arity.

    Raises :class:`EstimatorUsageError` (one line) when ``kind`` is unknown, ``fn`` is not
    callable, its signature does not fit, or a basic call raises or returns no tensor. A loss
    whose basic call raises but which runs on a square batch (N = T) is accepted: its rows fail
    where it raises, and ``row_equivariance`` says why.
    """
    if kind not in KINDS:
        raise EstimatorUsageError(f"kind={kind!r} is not valid; choose one of {', '.join(KINDS)}")
    if not callable(fn):
        raise EstimatorUsageError(f"{type(fn).__name__} object is not callable")
    try:
        arity = call_arity(fn, kind)
    except TypeError as e:
        raise EstimatorUsageError(str(e)) from None
    args, _ = _basic_inputs(kind, arity)
    try:
        out = _basic_call(fn, kind, args)
    except Exception as e:
        try:  # a loss that runs on square batches only: a broadcast bug the rows name
            out = _basic_call(fn, kind, _square_loss_inputs()) if kind == "loss" else None
        except Exception:
            out = None
        if out is None:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise EstimatorUsageError(
                f"a basic call raised {type(e).__name__}: {msg}"[:300]) from None
    if not isinstance(out, torch.Tensor):
        raise EstimatorUsageError(f"a basic call returned {type(out).__name__}, "
                                  "expected a torch.Tensor")
    return arity


def check_estimator(
    fn: Callable,
    kind: str,
    *,
    claims: dict | None = None,
    seed: int = 0,
    samples: int = DEFAULT_SAMPLES,
) -> list[CheckResult]:
    """Run every check of ``kind`` on ``fn``; one :class:`CheckResult` per row.

    ``claims`` extends and overrides the claims from :func:`declares`. Raises
    :class:`EstimatorUsageError` when the estimator cannot be checked at all (see
    :func:`validate_estimator`); an estimator that raises inside a check gets a failed row.
    """
    arity = validate_estimator(fn, kind)
    merged = {**get_claims(fn), **_validate_claims(dict(claims or {}))}
    merged = _validate_claims(merged, kind)
    if samples < 2:
        raise EstimatorUsageError(f"samples must be at least 2, got {samples}")
    ctx = Context(fn=fn, kind=kind, claims=merged, seed=int(seed), samples=int(samples),
                  arity=arity)
    return run_rows(ctx)


def all_passed(rows: list[CheckResult]) -> bool:
    """True when no required or claimed row failed (info rows never fail)."""
    return not any(r.failed for r in rows)


def format_table(rows: list[CheckResult]) -> str:
    """A plain-text table: check, status, value, bound, explanation; then a summary line."""
    head = ("check", "status", "value", "bound", "explanation")
    body = [(r.name, r.status, fmt(r.value)[:24], fmt(r.bound)[:24], r.explanation) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    lines = []
    for cells in [head, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells[:4], widths)) + "  " + cells[4])
    failed = [r.name for r in rows if r.failed]
    n_pass = sum(r.passed is True for r in rows)
    n_info = sum(r.passed is None for r in rows)
    verdict = f"FAIL ({len(failed)} failed: {', '.join(failed)})" if failed else "PASS"
    lines.append(f"result: {verdict}; {n_pass} passed, {len(failed)} failed, {n_info} info")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Built-in estimators of grpo_core, wrapped with their claims (grpo_core itself is untouched)
# ---------------------------------------------------------------------------------------------


def _wrapped(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def call(*args):
        return fn(*args)

    call.__name__ = call.__qualname__ = f"builtin_{name}"
    return call


def builtin_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """``grpo_core.group_advantages`` on (B, G) scores: scale="group", stats_over="sequences".

    Each score is a one-step sequence ``(B*G, 1)`` with a full mask and ``group_size=G``.
    """
    b, g = scores.shape
    flat = scores.reshape(b * g, 1)
    out = group_advantages(flat, torch.ones_like(flat), g, gamma=1.0, scale="group",
                           stats_over="sequences")
    return out.reshape(b, g)


def builtin_policy_loss(logp, old_logp, adv, mask):
    """``grpo_core.clipped_policy_loss``: token-mean, eps 0.2 / 0.28 (clip-higher), no dual clip."""
    return clipped_policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28,
                               agg="token-mean")[0]


def builtin_policy_loss_dual_clip(logp, old_logp, adv, mask):
    """``grpo_core.clipped_policy_loss``: Dr. GRPO with max_len 48, eps 0.2, dual clip c = 3."""
    return clipped_policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2,
                               agg="seq-mean-token-sum-norm", max_len=48, clip_ratio_c=3.0)[0]


def builtin_gspo_loss(logp, old_logp, adv, mask):
    """``grpo_core.clipped_policy_loss`` with ``ratio_level="sequence"`` (GSPO): the paper's
    clip range 3e-4 / 4e-4 and its average over responses (seq-mean-token-mean)."""
    return clipped_policy_loss(logp, old_logp, adv, mask, eps_low=3e-4, eps_high=4e-4,
                               agg="seq-mean-token-mean", ratio_level="sequence")[0]


def builtin_gspo_token_loss(logp, old_logp, adv, mask):
    """``grpo_core.clipped_policy_loss`` with ``ratio_level="sequence-token"`` (GSPO-token),
    clip range 3e-4 / 4e-4, seq-mean-token-mean."""
    return clipped_policy_loss(logp, old_logp, adv, mask, eps_low=3e-4, eps_high=4e-4,
                               agg="seq-mean-token-mean", ratio_level="sequence-token")[0]


def builtin_cispo_loss(logp, old_logp, adv, mask):
    """``grpo_core.losses.cispo_loss``: the weight min(ratio, 1.28) detached, token-mean."""
    return cispo_loss(logp, old_logp, adv, mask, eps_high=0.28, agg="token-mean")[0]


def builtin_rloo_advantage(scores: torch.Tensor) -> torch.Tensor:
    """``grpo_core.group_advantages`` with ``baseline="leave-one-out"`` on (B, G) scores
    (scale="group", stats_over="sequences"): G/(G - 1) (x - mean) / (std + 1e-8)."""
    b, g = scores.shape
    flat = scores.reshape(b * g, 1)
    out = group_advantages(flat, torch.ones_like(flat), g, gamma=1.0, scale="group",
                           stats_over="sequences", baseline="leave-one-out")
    return out.reshape(b, g)


BUILTINS: dict[str, Callable] = {
    "k1": declares(unbiased=True, nonnegative=False, grad="zero")(_wrapped(kl_k1, "k1")),
    "k2": declares(unbiased=False, nonnegative=True, grad="kl_policy_ref")(_wrapped(kl_k2, "k2")),
    "k3": declares(unbiased=True, nonnegative=True, grad="kl_ref_policy")(_wrapped(kl_k3, "k3")),
    "k3_is": declares(unbiased=True, nonnegative=True, grad="kl_policy_ref")(
        _wrapped(kl_k3_is, "k3_is")),
    "group_advantages": declares(std_scaled=True, bessel=True, eps=1e-8, singleton="zero")(
        builtin_group_advantages),
    "discounted_returns": _wrapped(discounted_returns, "discounted_returns"),
    "policy_loss": declares(eps_low=0.2, eps_high=0.28, agg="token-mean", clip_ratio_c=None,
                            ratio_level="token", policy_loss="ppo")(builtin_policy_loss),
    "policy_loss_dual_clip": declares(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-sum-norm",
                                      max_len=48, clip_ratio_c=3.0, ratio_level="token",
                                      policy_loss="ppo")(builtin_policy_loss_dual_clip),
    "gspo_loss": declares(eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean",
                          clip_ratio_c=None, ratio_level="sequence", policy_loss="ppo")(
        builtin_gspo_loss),
    "gspo_token_loss": declares(eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean",
                                clip_ratio_c=None, ratio_level="sequence-token",
                                policy_loss="ppo")(builtin_gspo_token_loss),
    "cispo_loss": declares(eps_high=0.28, agg="token-mean", clip_ratio_c=None,
                           ratio_level="token", policy_loss="cispo")(builtin_cispo_loss),
    "rloo_advantage": declares(std_scaled=True, bessel=True, eps=1e-8, singleton="zero",
                               leave_one_out=True)(builtin_rloo_advantage),
}
BUILTIN_KINDS: dict[str, str] = {
    "k1": "kl",
    "k2": "kl",
    "k3": "kl",
    "k3_is": "kl",
    "group_advantages": "advantage",
    "discounted_returns": "returns",
    "policy_loss": "loss",
    "policy_loss_dual_clip": "loss",
    "gspo_loss": "loss",
    "gspo_token_loss": "loss",
    "cispo_loss": "loss",
    "rloo_advantage": "advantage",
}


# ---------------------------------------------------------------------------------------------
# Verdict tables (the regression set in reports/verify.md)
# ---------------------------------------------------------------------------------------------


def verdict(label: str, kind: str, claims: dict, rows: list[CheckResult], *,
            expected_exit: int | None = None, expected_failed=None) -> dict:
    """One line of a verdict table: the exit status the CLI would give, the failed rows with
    their measured values, and (when given) whether they are the expected ones."""
    failed = [r for r in rows if r.failed]
    out = {"label": label, "kind": kind, "claims": dict(claims), "exit": 1 if failed else 0,
           "failed": [r.name for r in failed],
           "evidence": {r.name: fmt(r.value) for r in failed}}
    if expected_exit is not None:
        out["expected_exit"] = expected_exit
        out["expected_failed"] = sorted(expected_failed or ())
        out["as_expected"] = (out["exit"] == expected_exit
                              and set(out["failed"]) == set(out["expected_failed"]))
    return out


def verdicts_markdown(entries: list[dict]) -> str:
    """A markdown table of :func:`verdict` lines."""
    lines = ["| estimator | kind | claims | exit | failed rows (measured) | expected |",
             "|---|---|---|---:|---|---|"]
    for e in entries:
        claims = ", ".join(f"{k}={fmt(v) if v is not None else 'none'}"
                           for k, v in e["claims"].items()) or "none"
        failed = ", ".join(f"{n} ({e['evidence'][n]})" for n in e["failed"]) or "-"
        want = "-"
        if "expected_exit" in e:
            want = ("yes" if e["as_expected"] else
                    f"NO: exit {e['expected_exit']}, {', '.join(e['expected_failed']) or '-'}")
        lines.append(f"| {e['label']} | {e['kind']} | {claims} | {e['exit']} | {failed} | "
                     f"{want} |".replace("\n", " "))
    return "\n".join(lines)
