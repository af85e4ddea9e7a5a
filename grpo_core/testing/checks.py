"""Property checks of the estimator kit: the KL rows, the returns rows, the registry of rows.

Every check takes a :class:`~.base.Context` (the estimator, its kind, its claims, a seed) and
returns one :class:`~.base.CheckResult` row; both live in :mod:`.base`, with the claim specs
and the helpers that rows of several kinds share (re-exported here).
:func:`grpo_core.testing.kit.check_estimator` runs all rows of a kind (:func:`run_rows`); the
functions here are public so that a test can call one row, or the measurements behind it
(:func:`measure_bias`, :func:`classify_gradient`), directly. The advantage rows live in
:mod:`.adv_checks`, the whole-loss rows in :mod:`.loss_checks`; both import :mod:`.base` only,
and this module imports them for the registry, so no import runs back.

KL claim ``clamp=C``: the estimator's values are clamped to ``[-C, C]`` (verl's
``low_var_kl`` clamps k3 at 10). The ``clamp`` row verifies that the values saturate exactly at
``C``, says at which log-prob gaps, and reports the exact bias (by enumeration) on the pairs
that reach it; ``unbiased`` is then judged on the pairs that stay below the clamp.

Row kinds (``required``, ``claim``, ``info``) are described in :mod:`.base`.

The statistical rows run in float64 on CPU in well under a second each. Nothing here reads
a table of known answers: unbiasedness is measured by sampling, the gradient direction by
enumerating small categorical distributions exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .adv_checks import ADV_ROWS
from .base import (  # noqa: F401  (re-exported: the kit's public names stay importable here)
    CLAIM_KEYS,
    DEFAULT_SAMPLES,
    F64,
    GRAD_CLASSES,
    KINDS,
    LOSS_AGGS,
    ROW_KINDS,
    SINGLETONS,
    CheckResult,
    Context,
    Number,
    _claim_text,
    _inplace_check,
    _judge,
    _same_except,
    _tensor_out,
    call_arity,
    fmt,
    positional_arity,
)
from .loss_checks import LOSS_ROWS

Z_BOUND = 5.0  # unbiasedness: |mean - KL| <= Z_BOUND standard errors (+ ABS_SLACK)
ABS_SLACK = 1e-9
GRAD_REL_TOL = 1e-6  # gradient direction: relative error to a target gradient
GRAD_ZERO_TOL = 1e-9  # "zero": |g| below this fraction of the KL gradient norms


# ---------------------------------------------------------------------------------------------
# KL: calling, categorical pairs, measurements
# ---------------------------------------------------------------------------------------------


def kl_call(ctx: Context, logp, ref_logp, old_logp=None) -> torch.Tensor:
    """Call a KL estimator; 3-argument ones get ``old_logp`` (default ``logp.detach()``)."""
    if ctx.arity == 3:
        old = logp.detach() if old_logp is None else old_logp
        return _tensor_out(ctx.fn(logp, ref_logp, old), "the estimator")
    return _tensor_out(ctx.fn(logp, ref_logp), "the estimator")


# (support size, policy logit scale, reference: "near" = policy + noise of this size,
#  "far" = independent logits of this scale). The reference's logits are scaled up in the far
# pairs (KL(pi||ref) up to ~10 nats) while the policy keeps every outcome above ~1e-3, so
# 20k samples see every outcome that carries the expectation.
PAIR_SPECS: tuple[tuple[int, float, str, float], ...] = (
    (4, 1.0, "near", 0.1),
    (3, 1.0, "far", 1.0),
    (8, 1.0, "far", 1.0),
    (16, 1.0, "far", 2.0),
    (16, 1.0, "far", 4.0),
    (6, 0.5, "far", 6.0),
    (2, 1.0, "far", 3.0),
    (12, 1.5, "near", 2.0),
)


def categorical_pairs(seed: int = 0, specs=PAIR_SPECS) -> list[tuple[torch.Tensor, ...]]:
    """Random (policy logits, reference logits) pairs, float64, one per spec."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for k, s_pi, how, s_ref in specs:
        pi = torch.randn(k, generator=gen, dtype=F64) * s_pi
        if how == "near":
            ref = pi + torch.randn(k, generator=gen, dtype=F64) * s_ref
        else:
            ref = torch.randn(k, generator=gen, dtype=F64) * s_ref
        pairs.append((pi, ref))
    return pairs


def exact_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p||q) = sum p log(p/q) over the support (log-prob vectors)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def measure_bias(
    fn: Callable,
    pi_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    old_logits: torch.Tensor | None = None,
    arity: int | None = None,
) -> dict:
    """Sample-mean bias of a KL estimator on one categorical pair, next to k1's.

    Tokens are drawn from the policy (or from ``old_logits`` when given: off-policy, for
    3-argument estimators, whose value should then be the importance-weighted estimate) and
    the sample mean is compared with the exact ``KL(pi||ref)``. The standard error uses the
    larger of the sample variance and the exact variance over the support (the estimator
    evaluated on every outcome), so a rare outcome that the sample missed cannot make it
    look tight. k1 on the same samples is ``logp - ref_logp`` (importance-weighted
    off-policy).

    Returns a dict: kl, mean, bias, var, se, z (= |bias| / se), finite, k1_bias, k1_var,
    exact_bias (the estimator's expectation over the support minus the KL, no sampling: exact
    when tokens come from the policy) and support_max (largest |value| over the support).
    """
    ctx = Context(fn=fn, kind="kl", samples=samples)
    ctx.arity = call_arity(fn, "kl") if arity is None else arity
    pi_logp = torch.log_softmax(pi_logits.to(F64), -1)
    ref_logp = torch.log_softmax(ref_logits.to(F64), -1)
    kl = float(exact_kl(pi_logp, ref_logp))
    if old_logits is None:
        sample_logp = pi_logp
        old_logp = pi_logp
    else:
        old_logp = torch.log_softmax(old_logits.to(F64), -1)
        sample_logp = old_logp
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(sample_logp.exp(), samples, replacement=True, generator=gen)
    with torch.no_grad():
        vals = kl_call(ctx, pi_logp[idx], ref_logp[idx], old_logp[idx]).to(F64).reshape(-1)
        support = kl_call(ctx, pi_logp, ref_logp, old_logp).to(F64).reshape(-1)
    if vals.numel() != samples or support.numel() != pi_logp.numel():
        raise ValueError("the estimator did not return one value per token")
    weight = (pi_logp[idx] - old_logp[idx]).exp()
    k1 = weight * (pi_logp[idx] - ref_logp[idx])
    finite = bool(torch.isfinite(vals).all()) and bool(torch.isfinite(support).all())
    mean = float(vals.mean())
    var = float(vals.var()) if samples > 1 else 0.0
    q = sample_logp.exp()
    exact_mean = float((q * support).sum())
    exact_var = float((q * (support - exact_mean) ** 2).sum())
    se = math.sqrt(max(var, exact_var) / samples) if finite else math.nan
    bias = mean - kl
    slack = ABS_SLACK * (1.0 + abs(kl))
    z = abs(bias) / (se + slack) if finite else math.inf
    return {
        "kl": kl,
        "mean": mean,
        "bias": bias,
        "var": var,
        "se": se,
        "z": z,
        "ok": finite and abs(bias) <= Z_BOUND * se + slack,
        "finite": finite,
        "k1_bias": float(k1.mean()) - kl,
        "k1_var": float(k1.var()) if samples > 1 else 0.0,
        "exact_bias": exact_mean - kl,  # by enumeration of the support (tokens from pi)
        "support_max": float(support.abs().max()),
    }


@dataclass
class GradientReport:
    """Expected loss gradient of a KL estimator compared with the two KL gradients.

    ``label``: kl_policy_ref (grad KL(pi||ref)), kl_ref_policy (grad KL(ref||pi)), zero, or
    neither. ``pairs`` holds per-pair cosines and relative errors to each target and the
    norm of the gradient relative to the KL gradients.
    """

    label: str
    pairs: list[dict]

    def worst(self, key: str, fn=max) -> float:
        return fn(p[key] for p in self.pairs)

    def summary(self) -> str:
        return (
            f"vs grad KL(pi||ref): cos>={self.worst('cos_policy_ref', min):.3g} "
            f"rel<={self.worst('rel_policy_ref'):.2g}; "
            f"vs grad KL(ref||pi): cos>={self.worst('cos_ref_policy', min):.3g} "
            f"rel<={self.worst('rel_ref_policy'):.2g}; "
            f"|g|/|grad KL|<={self.worst('norm_ratio'):.2g}"
        )


def _grad_of(loss: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    if not loss.requires_grad:
        return torch.zeros_like(theta)
    (g,) = torch.autograd.grad(loss, theta, allow_unused=True)
    return torch.zeros_like(theta) if g is None else g


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def classify_gradient(fn: Callable, *, seed: int = 0, arity: int | None = None) -> GradientReport:
    """Classify the gradient a KL estimator gives as a loss term, by exact enumeration.

    For each categorical pair, with policy logits ``theta`` requiring grad and
    ``logp = log_softmax(theta)``, the expected loss gradient is
    ``g = sum_x pi(x).detach() * grad_theta fn(logp[x], ref_logp[x])`` (3-argument
    estimators get ``old_logp = logp.detach()``: tokens drawn from the current policy). It is
    compared with ``grad_theta KL(pi||ref)`` and ``grad_theta KL(ref||pi)``, both by autograd
    over the support: a match is a relative error below 1e-6 on every pair; ``zero`` is
    ``|g|`` below 1e-9 of the KL gradient norms on every pair.
    """
    ctx = Context(fn=fn, kind="kl")
    ctx.arity = call_arity(fn, "kl") if arity is None else arity
    rows = []
    for pi_logits, ref_logits in categorical_pairs(seed + 7919):
        ref_logp = torch.log_softmax(ref_logits, -1)
        theta = pi_logits.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, -1)
        vals = kl_call(ctx, logp, ref_logp).reshape(-1)
        if vals.numel() != logp.numel():
            raise ValueError("the estimator did not return one value per token")
        g = _grad_of((logp.detach().exp() * vals.to(F64)).sum(), theta).to(F64)
        t = pi_logits.clone().requires_grad_(True)
        lp = torch.log_softmax(t, -1)
        g_pr = _grad_of(exact_kl(lp, ref_logp), t)
        t = pi_logits.clone().requires_grad_(True)
        lp = torch.log_softmax(t, -1)
        g_rp = _grad_of(exact_kl(ref_logp, lp), t)
        scale = max(float(g_pr.norm()), float(g_rp.norm()))
        rows.append(
            {
                "cos_policy_ref": _cos(g, g_pr),
                "rel_policy_ref": float((g - g_pr).norm()) / float(g_pr.norm()),
                "cos_ref_policy": _cos(g, g_rp),
                "rel_ref_policy": float((g - g_rp).norm()) / float(g_rp.norm()),
                "norm_ratio": float(g.norm()) / scale,
                "finite": bool(torch.isfinite(g).all()),
            }
        )
    label = "neither"
    if all(r["finite"] for r in rows):
        if all(r["norm_ratio"] < GRAD_ZERO_TOL for r in rows):
            label = "zero"
        elif all(r["rel_policy_ref"] < GRAD_REL_TOL for r in rows):
            label = "kl_policy_ref"
        elif all(r["rel_ref_policy"] < GRAD_REL_TOL for r in rows):
            label = "kl_ref_policy"
    return GradientReport(label=label, pairs=rows)


def _rand_logp(gen: torch.Generator, shape, low: float, dtype=F64) -> torch.Tensor:
    """Log-prob-like values uniform in [low, 0]."""
    return (torch.rand(shape, generator=gen, dtype=F64) * low).to(dtype)


# ---------------------------------------------------------------------------------------------
# KL rows
# ---------------------------------------------------------------------------------------------


def kl_zero_when_equal(ctx: Context) -> CheckResult:
    """fn(x, x) == 0 when policy and reference agree (and old == policy)."""
    worst = 0.0
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-6)):
        x = _rand_logp(ctx.gen(1), (4, 16), -30.0, dtype)
        x[0, :3] = torch.tensor([0.0, -1e-8, -50.0], dtype=dtype)
        out = kl_call(ctx, x, x.clone())
        err = float(out.detach().abs().max().to(F64))
        if not err <= tol:
            return CheckResult("zero_when_equal", False, err, tol,
                               f"fn(x, x) is not 0 in {str(dtype)[6:]}: max |value| {err:.3g}")
        worst = max(worst, err)
    return CheckResult("zero_when_equal", True, worst, "1e-12 (f64), 1e-6 (f32)",
                       "fn(x, x) = 0 when policy and reference agree (float64 and float32)")


def _gap_grid(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of log-probs from a grid on [-50, 0]: gaps up to +-50."""
    grid = torch.cat([torch.linspace(-50.0, 0.0, 41, dtype=F64),
                      torch.tensor([-1e-6, -1e-12, -49.999], dtype=F64)])
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    return a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)


def kl_finite_gaps(ctx: Context) -> CheckResult:
    """Finite values and gradients for log-prob gaps up to +-50 in float32 and float64."""
    for dtype in (torch.float32, F64):
        a, b = _gap_grid(dtype)
        logp = a.clone().requires_grad_(True)
        out = kl_call(ctx, logp, b)
        bad = int((~torch.isfinite(out.detach())).sum())
        if bad:
            i = int((~torch.isfinite(out.detach())).nonzero()[0])
            return CheckResult("finite_gaps", False, bad, 0,
                               f"{bad} non-finite values in {str(dtype)[6:]}, e.g. logp="
                               f"{float(a[i]):.3g} ref_logp={float(b[i]):.3g} -> {float(out[i])}")
        g = _grad_of(out.sum(), logp)
        bad = int((~torch.isfinite(g)).sum())
        if bad:
            return CheckResult("finite_gaps", False, bad, 0,
                               f"{bad} non-finite gradients in {str(dtype)[6:]} "
                               "for gaps up to +-50")
    return CheckResult("finite_gaps", True, 0, 0,
                       "values and gradients finite for log-prob gaps up to +-50 "
                       "(float32 and float64)")


def kl_shape_dtype(ctx: Context) -> CheckResult:
    for shape in ((7,), (3, 5), (2, 3, 4)):
        for dtype in (torch.float32, F64):
            g = ctx.gen(3)
            out = kl_call(ctx, _rand_logp(g, shape, -5.0, dtype), _rand_logp(g, shape, -5.0, dtype))
            if out.shape != torch.Size(shape) or out.dtype != dtype:
                return CheckResult("shape_dtype", False, f"{tuple(out.shape)} {out.dtype}",
                                   f"{shape} {dtype}",
                                   "output shape or dtype differs from the input's")
    return CheckResult("shape_dtype", True, "kept", "same as input",
                       "output keeps the input's shape and dtype (1-3 dims, float32/float64)")


def kl_no_inplace(ctx: Context) -> CheckResult:
    g = ctx.gen(4)
    args = [_rand_logp(g, (3, 6), -8.0), _rand_logp(g, (3, 6), -8.0)]
    if ctx.arity == 3:
        args.append(_rand_logp(g, (3, 6), -8.0))
    return _inplace_check("no_inplace", lambda a: ctx.fn(*a), args)


def kl_elementwise(ctx: Context) -> CheckResult:
    """Changing one position's inputs changes no other position's output."""
    g = ctx.gen(5)
    args = [_rand_logp(g, (3, 7), -10.0) for _ in range(ctx.arity)]
    base = ctx.fn(*args)
    for pos in ((0, 0), (1, 3), (2, 6)):
        for arg in range(ctx.arity):
            for value in (-0.5, -25.0, 0.0):
                changed = [a.clone() for a in args]
                changed[arg][pos] = value
                keep = torch.ones(3, 7, dtype=torch.bool)
                keep[pos] = False
                if not _same_except(ctx.fn(*changed), base, keep):
                    return CheckResult("elementwise", False, f"input {arg} at {pos}", "no effect",
                                       f"changing argument {arg} at {pos} changed other positions")
    return CheckResult("elementwise", True, "independent", "no effect",
                       "each output position depends only on the inputs at that position")


def kl_padding_no_leak(ctx: Context) -> CheckResult:
    """Junk in padded positions (0, +-inf, NaN, 1e30) does not reach valid positions."""
    g = ctx.gen(6)
    args = [_rand_logp(g, (3, 8), -10.0) for _ in range(ctx.arity)]
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[0, 5:] = False
    valid[2, 2:] = False
    base = ctx.fn(*args)
    for junk in (0.0, math.nan, -math.inf, math.inf, 1e30, -1e30):
        padded = [torch.where(valid, a, torch.full_like(a, junk)) for a in args]
        if not _same_except(ctx.fn(*padded), base, valid):
            return CheckResult("padding_no_leak", False, junk, "no effect",
                               f"padding value {junk} changed outputs at valid positions")
    return CheckResult("padding_no_leak", True, "no effect", "no effect",
                       "junk under padding (0, +-inf, NaN, +-1e30) leaves valid outputs unchanged")


def kl_grad_reaches_logp(ctx: Context) -> CheckResult:
    g = ctx.gen(7)
    logp = _rand_logp(g, (4, 6), -6.0).requires_grad_(True)
    ref = _rand_logp(g, (4, 6), -6.0)
    out = kl_call(ctx, logp, ref)
    if not out.requires_grad:
        return CheckResult("grad_reaches_logp", False, "no graph", "nonzero grad",
                           "output carries no gradient: logp is detached inside the estimator")
    (grad,) = torch.autograd.grad(out.sum(), logp, allow_unused=True)
    if grad is None or not bool((grad != 0).any()):
        return CheckResult("grad_reaches_logp", False, 0.0, "nonzero grad",
                           "gradient w.r.t. logp is " + ("None" if grad is None else "all zero"))
    extra = " (old_logp = logp.detach())" if ctx.arity == 3 else ""
    return CheckResult("grad_reaches_logp", True, float(grad.norm()), "nonzero grad",
                       f"gradient flows back to logp{extra}")


def kl_nonnegative(ctx: Context) -> CheckResult:
    a, b = _gap_grid(F64)
    vals = [kl_call(ctx, a, b).detach()]
    g = ctx.gen(8)
    for pi_logits, ref_logits in categorical_pairs(ctx.seed):
        pl, rl = torch.log_softmax(pi_logits, -1), torch.log_softmax(ref_logits, -1)
        vals.append(kl_call(ctx, pl, rl).detach())
        if ctx.arity == 3:
            old = torch.log_softmax(pi_logits + torch.randn(pl.shape, generator=g, dtype=F64), -1)
            vals.append(kl_call(ctx, pl, rl, old).detach())
    vals = torch.cat([v.reshape(-1).to(F64) for v in vals])
    vals = vals[~torch.isnan(vals)]
    low = float(vals.min()) if vals.numel() else math.nan
    holds = low >= -1e-12
    passed = _judge(ctx, "nonnegative", holds)
    how = "never negative" if holds else f"negative values (min {low:.3g})"
    return CheckResult("nonnegative", passed, low, ">= 0", f"{how} over gaps in [-50, 50] and "
                       f"sampled pairs; {_claim_text(ctx, 'nonnegative')}",
                       ctx.row_kind("nonnegative"))


def _bias_rows(ctx: Context, off_policy: bool) -> list[dict]:
    key = ("bias", off_policy)
    if key not in ctx.cache:
        ctx.cache[key] = _measure_bias_rows(ctx, off_policy)
    return ctx.cache[key]


def _measure_bias_rows(ctx: Context, off_policy: bool) -> list[dict]:
    out = []
    g = ctx.gen(9 if off_policy else 10)
    for i, (pi_logits, ref_logits) in enumerate(categorical_pairs(ctx.seed)):
        old = None
        if off_policy:
            old = pi_logits + 0.5 * torch.randn(pi_logits.shape, generator=g, dtype=F64)
        r = measure_bias(ctx.fn, pi_logits, ref_logits, samples=ctx.samples,
                         seed=ctx.seed * 7907 + i, old_logits=old, arity=ctx.arity)
        r["support"] = int(pi_logits.numel())
        out.append(r)
    return out


def _below_clamp(ctx: Context, r: dict) -> bool:
    """No value on the pair's support reaches the clamp (always true when none is declared).

    The level is the declared clamp, or the measured saturation level when that is lower,
    so that a wrong clamp value fails the ``clamp`` row only.
    """
    clamp = ctx.claims.get("clamp")
    if clamp is None:
        return True
    top, saturates = _saturation(ctx)
    level = min(clamp, top) if saturates else clamp
    return r["support_max"] < level * (1 - 1e-12)


def _unbiased_row(ctx: Context, off_policy: bool) -> CheckResult:
    name = "unbiased_off_policy" if off_policy else "unbiased"
    all_rows = _bias_rows(ctx, off_policy)
    rows = [r for r in all_rows if _below_clamp(ctx, r)]
    if not rows:
        return CheckResult(name, False if "unbiased" in ctx.claims else None, None, Z_BOUND,
                           f"every pair reaches the clamp {ctx.claims['clamp']:g}: nothing "
                           "left to judge unbiasedness on", ctx.row_kind("unbiased"))
    holds = all(r["ok"] for r in rows)
    worst = max(rows, key=lambda r: r["z"])
    passed = _judge(ctx, "unbiased", holds)
    where = "tokens from a third policy old, estimate of KL(pi||ref)" if off_policy else \
        "tokens from pi"
    below = "" if len(rows) == len(all_rows) else \
        f" below the clamp ({len(all_rows) - len(rows)} pairs reaching it: see row clamp)"
    text = (f"{len(rows)} pairs{below} x {ctx.samples} samples ({where}); "
            f"worst pair KL={worst['kl']:.3g}: "
            f"bias={worst['bias']:.3g} (k1 {worst['k1_bias']:.3g}), var={worst['var']:.3g} "
            f"(k1 {worst['k1_var']:.3g}), |bias|/SE={worst['z']:.3g}; "
            f"{'unbiased' if holds else 'BIASED'}; {_claim_text(ctx, 'unbiased')}")
    details = {"pairs": [{k: r[k] for k in ("support", "kl", "mean", "bias", "se", "z", "var",
                                            "k1_bias", "k1_var", "exact_bias", "support_max")}
                         for r in all_rows]}
    return CheckResult(name, passed, worst["z"], Z_BOUND, text, ctx.row_kind("unbiased"), details)


def kl_unbiased(ctx: Context) -> CheckResult:
    return _unbiased_row(ctx, off_policy=False)


def kl_unbiased_off_policy(ctx: Context) -> CheckResult:
    return _unbiased_row(ctx, off_policy=True)


def kl_variance_vs_k1(ctx: Context) -> CheckResult:
    rows = _bias_rows(ctx, off_policy=False)
    ratios = [r["var"] / r["k1_var"] if r["k1_var"] > 0 else math.nan for r in rows]
    text = ", ".join(f"KL={r['kl']:.2g}: {q:.3g}" for r, q in zip(rows, ratios))
    finite = [q for q in ratios if math.isfinite(q)]
    value = max(finite) if finite else math.nan
    return CheckResult("variance_vs_k1", None, value, None,
                       f"sample variance / k1's on the same samples, per pair: {text}", "info",
                       {"ratios": ratios, "kl": [r["kl"] for r in rows]})


def kl_grad_direction(ctx: Context) -> CheckResult:
    rep = classify_gradient(ctx.fn, seed=ctx.seed, arity=ctx.arity)
    passed = None
    claim = ctx.claims.get("grad")
    if claim is not None:
        passed = rep.label == claim
    flag = "; NEITHER KL gradient nor zero" if rep.label == "neither" else ""
    text = f"expected loss gradient is {rep.label}{flag} ({rep.summary()}); " + (
        f"claimed grad={claim}" if claim else "not claimed")
    return CheckResult("grad_direction", passed, rep.label, claim or "measured", text,
                       ctx.row_kind("grad"), {"pairs": rep.pairs})


def _gap_scan(n: int = 20001) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, logp, ref_logp) with d = ref_logp - logp on a grid over [-50, 50], both <= 0."""
    d = torch.linspace(-50.0, 50.0, n, dtype=F64)
    logp = -0.5 - d.clamp(min=0.0)
    return d, logp, logp + d


def _saturation(ctx: Context) -> tuple[float, bool]:
    """(largest |value| over the gap scan, whether the values sit on a plateau there)."""
    if "saturation" not in ctx.cache:
        _, logp, ref = _gap_scan()
        vals = kl_call(ctx, logp, ref).detach().to(F64).abs()
        top = float(vals.max())
        ctx.cache["saturation"] = (top, int((vals >= top * (1 - 1e-12)).sum()) >= 20)
    return ctx.cache["saturation"]


def kl_clamp(ctx: Context) -> CheckResult:
    """Where the values saturate, and the bias that saturation causes (exact, by enumeration).

    Claimed ``clamp=C``: the values must reach ``|value| = C`` on the gap grid and never
    exceed it. The pairs whose support reaches the clamp are left out of ``unbiased`` and
    their exact bias is reported here.
    """
    d, logp, ref = _gap_scan()
    vals = kl_call(ctx, logp, ref).detach().to(F64).abs()
    top, saturates = _saturation(ctx)
    claim = ctx.claims.get("clamp")
    level = claim if claim is not None else top
    hit = vals >= level * (1 - 1e-12)
    pos, neg = d[hit & (d > 0)], d[hit & (d < 0)]
    reach = ", ".join(([f"d <= {float(neg.max()):.3g}"] if neg.numel() else []) +
                      ([f"d >= {float(pos.min()):.3g}"] if pos.numel() else [])) or "nowhere"
    hits = [r for r in _bias_rows(ctx, False) if not _below_clamp(ctx, r)] if claim else []
    bias = ""
    if hits:
        w = max(hits, key=lambda r: abs(r["exact_bias"]))
        bias = (f"; {len(hits)} of {len(_bias_rows(ctx, False))} pairs reach it, exact bias "
                f"(enumerated) up to {w['exact_bias']:.3g} at KL={w['kl']:.3g}")
    if claim is None:
        text = (f"values saturate at |value| = {top:.4g} (reached for gaps {reach} of +-50): "
                f"a clamp, declare clamp={top:.4g}" if saturates else
                f"no saturation over gaps d = ref_logp - logp in [-50, 50] (max |value| "
                f"{top:.3g})")
        return CheckResult("clamp", None, top, None, text, "info")
    holds = abs(top - claim) <= 1e-9 * claim
    text = (f"|value| <= {claim:g} reached for gaps {reach} of +-50{bias}" if holds else
            f"declared clamp={claim:g} but the values reach at most {top:.4g} over gaps +-50")
    details = {"pairs_reaching": [{k: r[k] for k in ("kl", "exact_bias", "support_max")}
                                  for r in hits]}
    return CheckResult("clamp", holds, top, claim, f"{text}; claimed clamp={claim:g}", "claim",
                       details)


def kl_uses_old_logp(ctx: Context) -> CheckResult:
    g = ctx.gen(11)
    logp, ref = _rand_logp(g, (16,), -5.0), _rand_logp(g, (16,), -5.0)
    a = kl_call(ctx, logp, ref, logp.clone())
    b = kl_call(ctx, logp, ref, logp - 0.3)
    used = not torch.allclose(a.detach(), b.detach(), equal_nan=True)
    return CheckResult("uses_old_logp", None, used, None,
                       "the value depends on old_logp" if used else
                       "the value ignores old_logp", "info")


# ---------------------------------------------------------------------------------------------
# Returns rows (rewards (N, T), mask (N, T), gamma)
# ---------------------------------------------------------------------------------------------

RET_TOL = 1e-10
GAMMAS = (0.5, 0.9, 0.99)


def _ret_batch(ctx: Context, salt: int, t_len: int = 9, junk: float = 5.0, dtype=F64):
    """Right-padded rewards (padding holds ``junk``), their mask and the lengths."""
    gen = ctx.gen(salt)
    lengths = [t_len, t_len, 1, 4, 7, 3, max(1, t_len - 1)]
    r = torch.randn(len(lengths), t_len, generator=gen, dtype=F64)
    mask = torch.zeros(len(lengths), t_len, dtype=F64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    r = torch.where(mask.bool(), r, torch.full_like(r, junk))
    return r.to(dtype), mask.to(dtype), lengths


def _returns(ctx: Context, r, m, gamma) -> torch.Tensor:
    return _tensor_out(ctx.fn(r, m, gamma), "the estimator")


def ret_shape_dtype(ctx: Context) -> CheckResult:
    for dtype in (torch.float32, F64):
        for t_len in (1, 9):
            r, m, _ = _ret_batch(ctx, 40, t_len, dtype=dtype)
            out = _returns(ctx, r, m, 0.9)
            if out.shape != r.shape or out.dtype != dtype:
                return CheckResult("shape_dtype", False, f"{tuple(out.shape)} {out.dtype}",
                                   f"{tuple(r.shape)} {dtype}",
                                   "output shape or dtype differs from the rewards'")
    return CheckResult("shape_dtype", True, "kept", "same as rewards",
                       "output keeps the (N, T) shape and the dtype (float32/float64)")


def ret_no_inplace(ctx: Context) -> CheckResult:
    r, m, _ = _ret_batch(ctx, 41)
    return _inplace_check("no_inplace", lambda a: ctx.fn(a[0], a[1], 0.9), [r, m])


def ret_recursion(ctx: Context) -> CheckResult:
    worst, where = 0.0, ""
    for t_len in (9, 70):
        r, m, lengths = _ret_batch(ctx, 42, t_len)
        for gamma in GAMMAS:
            out = _returns(ctx, r, m, gamma).detach().to(F64)
            for i, n in enumerate(lengths):
                g, rr = out[i, :n], r[i, :n]
                nxt = torch.cat([g[1:], g.new_zeros(1)])  # G after the last valid step is 0
                err = float(((g - (rr + gamma * nxt)).abs() / g.abs().clamp(min=1.0)).max())
                if not err <= worst:
                    worst, where = err, f"row {i} (length {n}, T={t_len}), gamma={gamma}"
    ok = worst <= RET_TOL
    return CheckResult("recursion", ok, worst, RET_TOL,
                       "G_t = r_t + gamma G_(t+1) at every valid step, G = 0 after the last" if ok
                       else f"G_t != r_t + gamma G_(t+1) (G = 0 after the last valid step): "
                       f"relative error {worst:.3g} at {where}")


def _valid_err(out: torch.Tensor, want: torch.Tensor, m: torch.Tensor) -> float:
    v = m.bool()
    err = (out.detach().to(F64)[v] - want.to(F64)[v]).abs() / want.to(F64)[v].abs().clamp(min=1.0)
    return float(err.max()) if err.numel() else 0.0


def ret_gamma_zero(ctx: Context) -> CheckResult:
    r, m, _ = _ret_batch(ctx, 43)
    err = _valid_err(_returns(ctx, r, m, 0.0), r, m)
    return CheckResult("gamma_zero", err <= RET_TOL, err, RET_TOL,
                       "gamma = 0 gives the rewards" if err <= RET_TOL else
                       f"gamma = 0 should give the rewards; off by {err:.3g}")


def ret_gamma_one(ctx: Context) -> CheckResult:
    r, m, _ = _ret_batch(ctx, 44)
    rz = r * m
    want = torch.flip(torch.cumsum(torch.flip(rz, [1]), 1), [1])
    err = _valid_err(_returns(ctx, r, m, 1.0), want, m)
    return CheckResult("gamma_one", err <= RET_TOL, err, RET_TOL,
                       "gamma = 1 gives the reverse cumulative sum" if err <= RET_TOL else
                       f"gamma = 1 should give the reverse cumulative sum; off by {err:.3g}")


def ret_linearity(ctx: Context) -> CheckResult:
    r1, m, _ = _ret_batch(ctx, 45, junk=0.0)
    r2, _, _ = _ret_batch(ctx, 46, junk=0.0)
    a, b = 2.5, -0.7
    worst = 0.0
    for gamma in GAMMAS:
        lhs = _returns(ctx, a * r1 + b * r2, m, gamma)
        rhs = a * _returns(ctx, r1, m, gamma).detach() + b * _returns(ctx, r2, m, gamma).detach()
        worst = max(worst, _valid_err(lhs, rhs, m))
    return CheckResult("linearity", worst <= RET_TOL, worst, RET_TOL,
                       "returns are linear in the rewards" if worst <= RET_TOL else
                       f"f(a r1 + b r2) != a f(r1) + b f(r2), off by {worst:.3g}")


def ret_padding_invariance(ctx: Context) -> CheckResult:
    r0, m, _ = _ret_batch(ctx, 47, junk=0.0)
    worst, bad_junk = 0.0, None
    for gamma in GAMMAS + (1.0,):
        base = _returns(ctx, r0, m, gamma).detach()
        for junk in (1e6, -3.25, 1.0):
            rj = torch.where(m.bool(), r0, torch.full_like(r0, junk))
            err = _valid_err(_returns(ctx, rj, m, gamma), base, m)
            if err > worst:
                worst, bad_junk = err, junk
    ok = worst <= RET_TOL
    return CheckResult("padding_invariance", ok, worst, RET_TOL,
                       "junk rewards under mask = 0 change no valid return" if ok else
                       f"junk reward {bad_junk} under mask = 0 changed valid returns "
                       f"by {worst:.3g}")


def ret_padding_nonfinite(ctx: Context) -> CheckResult:
    r0, m, _ = _ret_batch(ctx, 48, junk=0.0)
    base = _returns(ctx, r0, m, 0.9).detach()
    ok = True
    for junk in (math.nan, math.inf):
        out = _returns(ctx, torch.where(m.bool(), r0, torch.full_like(r0, junk)), m, 0.9)
        ok = ok and _same_except(out, base, m.bool())
    return CheckResult("padding_nonfinite", None, ok, None,
                       "NaN/inf under mask = 0 " + ("leave valid returns unchanged" if ok
                                                    else "reach valid returns"), "info")


def ret_masked_zero(ctx: Context) -> CheckResult:
    r, m, _ = _ret_batch(ctx, 49)
    out = _returns(ctx, r, m, 0.9).detach()
    zero = bool((out[~m.bool()] == 0).all())
    return CheckResult("masked_outputs_zero", None, zero, None,
                       "masked positions of the output are " + ("exactly 0" if zero else "not 0"),
                       "info")


def ret_oracle(ctx: Context) -> CheckResult:
    try:
        from reference.grpo_math import discounted_returns as oracle  # lazy: optional
    except Exception as e:  # the reference package is not part of an installed grpo_core
        return CheckResult("oracle", None, None, RET_TOL,
                           f"reference.grpo_math not importable ({type(e).__name__}: {e}); "
                           "oracle comparison skipped", "info")
    worst, where = 0.0, ""
    for t_len in (9, 70, 130):
        r, m, lengths = _ret_batch(ctx, 50 + t_len, t_len, junk=-2.0)
        for gamma in (0.0, 0.5, 0.9, 0.99, 1.0):
            out = _returns(ctx, r, m, gamma).detach().to(F64)
            for i, n in enumerate(lengths):
                want = torch.tensor(oracle(r[i, :n].tolist(), gamma), dtype=F64)
                err = float(((out[i, :n] - want).abs() / want.abs().clamp(min=1.0)).max())
                if err > worst:
                    worst, where = err, f"row {i} (length {n}, T={t_len}), gamma={gamma}"
    ok = worst <= RET_TOL
    return CheckResult("oracle", ok, worst, RET_TOL,
                       "matches reference.grpo_math.discounted_returns row by row (float64)" if ok
                       else f"differs from reference.grpo_math.discounted_returns by {worst:.3g} "
                       f"at {where}")


# ---------------------------------------------------------------------------------------------
# Registry of rows per kind: (row name, row kind or claim key, check)
# ---------------------------------------------------------------------------------------------

KL_ROWS = (
    ("zero_when_equal", "required", kl_zero_when_equal),
    ("finite_gaps", "required", kl_finite_gaps),
    ("shape_dtype", "required", kl_shape_dtype),
    ("no_inplace", "required", kl_no_inplace),
    ("elementwise", "required", kl_elementwise),
    ("padding_no_leak", "required", kl_padding_no_leak),
    ("grad_reaches_logp", "required", kl_grad_reaches_logp),
    ("nonnegative", "nonnegative", kl_nonnegative),
    ("unbiased", "unbiased", kl_unbiased),
    ("clamp", "clamp", kl_clamp),
    ("variance_vs_k1", "info", kl_variance_vs_k1),
    ("grad_direction", "grad", kl_grad_direction),
)
KL3_ROWS = (
    ("unbiased_off_policy", "unbiased", kl_unbiased_off_policy),
    ("uses_old_logp", "info", kl_uses_old_logp),
)
RET_ROWS = (
    ("shape_dtype", "required", ret_shape_dtype),
    ("no_inplace", "required", ret_no_inplace),
    ("recursion", "required", ret_recursion),
    ("gamma_zero", "required", ret_gamma_zero),
    ("gamma_one", "required", ret_gamma_one),
    ("linearity", "required", ret_linearity),
    ("padding_invariance", "required", ret_padding_invariance),
    ("padding_nonfinite", "info", ret_padding_nonfinite),
    ("masked_outputs_zero", "info", ret_masked_zero),
    ("oracle", "required", ret_oracle),
)


# rows keyed by a claim that are required (not info) when nothing is claimed
REQUIRED_UNCLAIMED = {"group_size_one"}


def rows_for(kind: str, arity: int = 2):
    """(row name, "required" | "info" | claim key, check) for every row of ``kind``."""
    if kind == "kl":
        return KL_ROWS + (KL3_ROWS if arity == 3 else ())
    if kind == "advantage":
        return ADV_ROWS
    if kind == "loss":
        return LOSS_ROWS
    return RET_ROWS


def _row_kind(ctx: Context, name: str, role: str) -> str:
    if role in ("required", "info"):
        return role
    if name == "affine_invariance":  # judged only when std_scaled=True is claimed
        return "claim" if ctx.claims.get("std_scaled") else "info"
    if role not in ctx.claims and name in REQUIRED_UNCLAIMED:
        return "required"
    return ctx.row_kind(role)


def run_rows(ctx: Context) -> list[CheckResult]:
    """Run every row of ``ctx.kind``; a check that raises becomes a failed (or info) row."""
    out = []
    for name, role, check in rows_for(ctx.kind, ctx.arity):
        try:
            out.append(check(ctx))
        except Exception as e:  # the estimator raised: report it on this row
            kind = _row_kind(ctx, name, role)
            msg = str(e).splitlines()[0] if str(e) else ""
            out.append(CheckResult(name, None if kind == "info" else False, "raised", None,
                                   f"the estimator raised {type(e).__name__}: {msg}", kind))
    return out
