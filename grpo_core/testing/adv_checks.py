"""Rows of the ``advantage`` kind: ``fn(scores) -> advantages``, scores ``(B, G)``.

Groups run along the last dim. The form ``A = (x - mean) / (std + eps)`` is *fitted*, not
assumed: on groups whose spreads run from 1e-3 to 1e2, every group's advantages must be its
centred scores divided by one number ``d``, and ``d`` must be ``c_G std + eps`` with one
constant ``eps`` for every group, ``std`` the Bessel (n - 1) or the population (n) std, and
``c_G`` one factor per group size ``G`` within :data:`F32_REL` (2^-23, about 1.2e-7) of 1. The
fit tells the std convention and the eps; the rows ``unit_scale``, ``bessel`` and
``affine_invariance`` are then exact up to that eps (to 1e-10), whatever its size, instead of
leaving a fixed room for it. When no constant eps fits (an eps under the square root, say),
those rows fall back to a loose check (``|std(A) - 1| <= 1e-4`` on groups of std about 3) and
say so.

How close "of the form" must be: to float64 rounding (64 ulps), except for a constant or a
factor that was rounded to float32, which is the same convention written with a float32
number. TRL's ``nanstd`` multiplies the variance by ``count / (count - 1)`` with integer
counts, a float32 division, so its std is off by a few 1e-8 relative (``c_8 - 1 = 2.2e-8``);
verl divides a singleton by ``torch.tensor(1.0) + 1e-6``, the float32 number nearest
``1 + 1e-6``, off by -4.6e-8 relative. Such a number is off by at most half a float32 ulp,
2^-24 relative (its square root by half that), so :data:`F32_REL` = 2^-23 holds them all with a
factor of two to spare; the ``float32_rounding`` info row names each one and its size. Real
differences are far outside it: Bessel against population std is a factor sqrt(G / (G - 1)),
1.008 at G = 64; an eps of 1e-4 against 1e-5 is no factor at all (it changes ``d`` by 9e-5,
9% at the spread 1e-3); a singleton divided by 1 + 1e-5 where the groups use 1e-6 is 9e-6
relative off.

Claims: ``std_scaled`` and ``bessel`` (bools), ``eps`` (the number added to the std; checked
against the fit), ``singleton`` (what a group of one sample gets: ``zero``; ``raw``, the score
divided by ``1 + eps`` as with mean 0 and std 1 (verl); or ``unsupported``, the estimator is
never called with groups of one (TRL requires at least two generations)), ``leave_one_out``
(bool: the baseline is the mean of the other G - 1 scores, RLOO, so the centred score is
multiplied by ``b_G = G/(G - 1)``; fitted like the std, ``b_G (x - mean)/(c_G std + eps)``, or
``b_G (x - mean)`` with no std; the std of a leave-one-out form is the whole group's).

Bounded advantages (``bounded_advantage``, required): one score apart from G - 1 equal ones,
by 1, 1e-3 and 1e-9, must get ``|A| <= sqrt(G)`` (Samuelson's inequality: ``|x - mean| <= (G -
1)/sqrt(G) s``; ``G/sqrt(G - 1)`` for a fitted population std with a leave-one-out baseline).
A std of the other G - 1 scores (NeMo-RL issue 1518) is 0 there and gives distance / eps; the
row names it "leave-one-out blow-up".

Ties are graded: the ``ties_float64`` and ``ties_float32`` rows feed all-equal groups of
reward-scale values (|x| <= 10, group sizes 2 to 64) and report the worst advantage and its
amplification factor, ``|A| / (dtype eps * |x|)``: how many times the rounding leftover of the
mean was blown up. An exact 0 passes; a leftover of a few ulps (factor <= 16) passes; amplified
noise passes while its worst advantage stays within :data:`TIE_NOISE_MAX` and fails beyond it,
with the number.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .base import (
    F64,
    CheckResult,
    Context,
    _claim_text,
    _inplace_check,
    _judge,
    _same_except,
    _tensor_out,
    fmt,
)

F32_REL = 2.0**-23  # a constant or factor rounded to float32: within this relative size of exact
EXACT_FACTOR = 1e-12  # |c_G - 1| up to this is float64 noise, not a rounded factor
EPS_EXACT = 1e-9  # a declared eps matches the fitted one to this relative size (else rounded)
SCALE_TOL = 1e-4  # fallback unit scale: |std(A) - 1| within this when no constant eps fits
EXACT_TOL = 1e-10  # unit_scale / affine rows once the form fits: exact up to the eps
FIT_SPREADS = tuple(10.0 ** (k / 2) for k in range(-6, 5))  # group stds 1e-3 .. 1e2
FIT_SIZES = (2, 3, 8, 16)
FIT_ULPS = 64  # eps of two groups agree to FIT_ULPS float64 ulps of (d + |x|)
EPS_UNDECLARED_MAX = 1e-3  # a larger fitted eps counts as std scaling only when declared
TIE_VALUES = (0.7, 3.7, 1 / 3, 0.1, -2.9, 7.3, 0.9, 0.0)  # reward scale, |x| <= 10
TIE_SIZES = (2, 3, 5, 6, 7, 12, 16, 64)
TIE_LEFTOVER = 16.0  # amplification factor up to which a tie's advantage is a rounding leftover
TIE_NOISE_MAX = 1e-2  # worst |A| on all-equal groups: 1% of a unit-scale advantage
SMALL_SPREADS = (1.0, 1e-2, 1e-4, 1e-6)
MEAN, LOO = "mean", "leave-one-out"
BASELINES = (MEAN, LOO)
OUTLIER_SPREADS = (1.0, 1e-3, 1e-9)  # one score this far from G - 1 equal ones
OUTLIER_SIZES = (2, 4, 8, 16)
BOUND_RTOL = 1e-9  # |A| <= the Samuelson bound up to this relative room


def _scores(ctx: Context, salt: int, b: int = 5, g: int = 8, dtype=F64) -> torch.Tensor:
    return (torch.randn(b, g, generator=ctx.gen(salt), dtype=F64) * 3.0 + 2.0).to(dtype)


def _adv(ctx: Context, scores: torch.Tensor) -> torch.Tensor:
    return _tensor_out(ctx.fn(scores), "the estimator")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.detach().to(F64) - b.detach().to(F64)).abs()
    return float(d.max()) if d.numel() else 0.0


def _std(x: torch.Tensor, conv: str) -> torch.Tensor:
    return x.std(-1, keepdim=True, correction=1 if conv == "n-1" else 0)


def _spread_groups(ctx: Context, salt: int, spreads, g: int) -> torch.Tensor:
    """Groups of size ``g`` around 3.0 whose Bessel stds are ``spreads`` (float64)."""
    z = torch.randn(len(spreads), g, generator=ctx.gen(salt), dtype=F64)
    z = z - z.mean(-1, keepdim=True)
    z = z / z.std(-1, keepdim=True)
    return 3.0 + torch.tensor(spreads, dtype=F64)[:, None] * z


# ---------------------------------------------------------------------------------------------
# The fit: A = (x - mean) / (std + eps)
# ---------------------------------------------------------------------------------------------


def baseline_factor(baseline: str | None, g: int) -> float:
    """The factor ``b_G`` of a baseline on the centred scores: 1 for the group mean, ``G/(G - 1)``
    for the leave-one-out mean (``x - (S - x)/(G - 1) = G/(G - 1) (x - mean)``)."""
    return g / (g - 1) if baseline == LOO and g > 1 else 1.0


def _fit_one(groups, conv: str, baseline: str) -> tuple[float, float, float, dict, float]:
    """(eps, worst disagreement in tolerances, worst |c_G - 1|, factors, largest tolerance) of
    the form ``b_G (x - mean) / (c_G std_conv + eps)``, b_G the baseline's factor."""
    eps, tol, factor = [], [], {}
    for g, x, d, t in groups:
        b = baseline_factor(baseline, g)
        d, t = d * b, t * b  # d b_G = c_G std + eps
        sd = _std(x, conv)[:, 0]
        lo, hi = int(sd.argmin()), int(sd.argmax())
        c = float((d[hi] - d[lo]) / (sd[hi] - sd[lo]))
        factor[g] = c
        eps += (d - c * sd).tolist()
        tol += t.tolist()
    ref = eps[min(range(len(eps)), key=lambda i: tol[i])]
    worst = max(abs(e - ref) / t for e, t in zip(eps, tol))
    off = max(abs(c - 1.0) for c in factor.values())
    worst, off = (math.inf if math.isnan(v) else v for v in (worst, off))
    return ref, worst, off, factor, max(tol)


def fit_std_eps(ctx: Context) -> dict:
    """Fit the form ``b_G (x - mean) / (c_G std + eps)`` (cached on ``ctx``).

    ``b_G`` is the baseline's factor (:func:`baseline_factor`): 1 for the group mean, ``G/(G -
    1)`` for the leave-one-out mean; the mean is tried first. Per group size ``G`` the factor
    ``c_G`` and the eps come from the groups of the largest and the smallest spread; every other
    group must then agree to :data:`FIT_ULPS` float64 ulps, and the eps must be the same for
    every size. A convention fits when every ``|c_G - 1|`` is within :data:`F32_REL` (a factor
    rounded to float32).

    Returns a dict: ``conv`` ("n-1", "n" or None when no constant eps fits), ``eps`` (the
    fitted eps, from the group with the smallest spread, where it is most precise),
    ``baseline`` ("mean" or "leave-one-out" with the fit; None without), ``factor`` (``{G:
    c_G}`` of the fitted convention, empty without a fit), ``spread`` (per convention, the
    largest disagreement of two groups' eps in units of the tolerance), ``factor_off`` (per
    convention, the largest ``|c_G - 1|``), ``proportional`` (each group's advantages are its
    centred scores times one number), ``unscaled`` (the baseline of an advantage with no std,
    ``b_G (x - mean)`` to float64 rounding, else None).
    """
    if "fit" in ctx.cache:
        return ctx.cache["fit"]
    groups, plain, proportional = [], [], True
    for k, g in enumerate(FIT_SIZES):
        x = _spread_groups(ctx, 60 + k, FIT_SPREADS, g)
        a = _adv(ctx, x).detach().to(F64)
        r = x - x.mean(-1, keepdim=True)
        d = (r * r).sum(-1) / (r * a).sum(-1)
        resid = (a - r / d[:, None]).abs().amax(-1) / a.abs().amax(-1).clamp(min=1e-300)
        ok = bool((resid <= 1e-9).all()) and bool(torch.isfinite(d).all())
        proportional = proportional and ok
        groups.append((g, x, d, FIT_ULPS * 2.0**-52 * (d.abs() + x.abs().amax(-1))))
        # the same rounding, relative to d, when there is no std (d = 1 / b_G)
        plain.append(FIT_ULPS * 2.0**-52 * (1 + x.abs().amax(-1) / r.abs().amax(-1)))
    out = {"conv": None, "eps": None, "baseline": None, "factor": {}, "spread": {},
           "factor_off": {}, "proportional": proportional, "unscaled": None}
    fits = {(b, conv): _fit_one(groups, conv, b) for b in BASELINES for conv in ("n-1", "n")}
    for (b, conv), (ref, worst, off, factor, tol) in fits.items():
        if (proportional and worst <= 1.0 and off <= F32_REL and ref >= -tol
                and out["conv"] is None):
            out.update(conv=conv, eps=max(ref, 0.0), factor=factor, baseline=b)
    shown = out["baseline"] or MEAN
    for conv in ("n-1", "n"):
        out["spread"][conv], out["factor_off"][conv] = fits[(shown, conv)][1:3]
    if proportional:  # no std: d = 1 / b_G for every group, to float64 rounding
        for b in BASELINES:
            if all(bool(((d * baseline_factor(b, g) - 1).abs() <= tol).all())
                   for (g, _, d, _), tol in zip(groups, plain)):
                out["unscaled"] = b
                break
    ctx.cache["fit"] = out
    return out


def std_factor(fit: dict, g: int) -> float:
    """The fitted factor ``c_G`` on the std for groups of size ``g`` (1 when not fitted)."""
    return fit["factor"].get(g, 1.0)


def measured_baseline(fit: dict) -> str | None:
    """The baseline of the fitted form, std-scaled or not (None: neither form fits)."""
    return fit["baseline"] if fit["conv"] is not None else fit["unscaled"]


def _eps_used(ctx: Context, fit: dict) -> tuple[float, str]:
    """The eps the exact rows use: the fitted one, else the declared one, else 0. (A declared
    eps is judged by the ``eps`` row alone, so a wrong one fails that row only.)"""
    if fit["conv"] is not None:
        return fit["eps"], f"fitted eps={fit['eps']:.3g}"
    if "eps" in ctx.claims:
        return float(ctx.claims["eps"]), f"declared eps={fmt(float(ctx.claims['eps']))}"
    return 0.0, "no constant eps fits"


def _fit_text(fit: dict) -> str:
    if fit["conv"] is None:
        why = "not proportional to the centred scores" if not fit["proportional"] else \
            "d - std is not constant over spreads 1e-3..1e2"
        return f"not of the form (x - mean)/(std + eps): {why}"
    form = "G/(G - 1) (x - mean)" if fit["baseline"] == LOO else "(x - mean)"
    text = f"of the form {form}/(std_({fit['conv']}) + eps), fitted eps={fit['eps']:.3g}"
    off = fit["factor_off"][fit["conv"]]
    if off > EXACT_FACTOR:
        text += f", std factor rounded to float32 (off 1 by up to {off:.2g})"
    return text


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def adv_shape_dtype(ctx: Context) -> CheckResult:
    for shape in ((5, 8), (1, 3), (3, 2)):
        for dtype in (torch.float32, F64):
            out = _adv(ctx, _scores(ctx, 20, *shape, dtype=dtype))
            if out.shape != torch.Size(shape) or out.dtype != dtype:
                return CheckResult("shape_dtype", False, f"{tuple(out.shape)} {out.dtype}",
                                   f"{shape} {dtype}",
                                   "output shape or dtype differs from the input's")
    return CheckResult("shape_dtype", True, "kept", "same as input",
                       "output keeps the (B, G) shape and the dtype (float32/float64)")


def adv_no_inplace(ctx: Context) -> CheckResult:
    return _inplace_check("no_inplace", lambda a: ctx.fn(*a), [_scores(ctx, 21)])


def adv_finite(ctx: Context) -> CheckResult:
    bad = 0
    for g in (2, 3, 8, 16):
        bad += int((~torch.isfinite(_adv(ctx, _scores(ctx, 22, 4, g)))).sum())
    return CheckResult("finite", bad == 0, bad, 0,
                       "finite on random scores" if bad == 0 else f"{bad} non-finite advantages")


def adv_zero_mean(ctx: Context) -> CheckResult:
    worst = 0.0
    for g in (2, 3, 8, 16):
        a = _adv(ctx, _scores(ctx, 23, 4, g)).detach().to(F64)
        scale = a.abs().amax(-1).clamp(min=1.0)
        worst = max(worst, float((a.mean(-1).abs() / scale).max()))
    ok = worst <= 1e-9
    return CheckResult("zero_mean", ok, worst, 1e-9,
                       "every group's advantages average to 0" if ok else
                       f"a group's mean advantage is {worst:.3g} (relative to its largest)")


def _scale_devs(ctx: Context, eps: float, fit: dict | None = None) -> dict[str, float]:
    """Per convention: max |std_c(A) - b_G s_c / (c_G s_c + eps)| on groups of std about 3, with
    ``c_G`` and ``b_G`` the fitted factor and baseline of that convention (1 without a fit)."""
    devs = {"n-1": 0.0, "n": 0.0}
    for g in (2, 3, 8, 16):
        x = _scores(ctx, 24, 4, g)
        a = _adv(ctx, x).detach().to(F64)
        for conv in devs:
            s = _std(x, conv)
            fitted = fit is not None and fit["conv"] == conv
            c = std_factor(fit, g) if fitted else 1.0
            b = baseline_factor(fit["baseline"], g) if fitted else 1.0
            devs[conv] = max(devs[conv],
                             float((_std(a, conv) - b * s / (c * s + eps)).abs().max()))
    return devs


def _scale_verdict(ctx: Context) -> tuple[bool, str, float, str]:
    """(holds, convention, deviation, text) behind unit_scale and bessel."""
    fit = fit_std_eps(ctx)
    eps, _ = _eps_used(ctx, fit)
    if fit["conv"] is None:  # loose fallback
        loose = _scale_devs(ctx, 0.0)
        conv = min(loose, key=loose.get)
        holds = loose[conv] <= SCALE_TOL
        return holds, conv if holds else "neither", loose[conv], (
            f"{_fit_text(fit)}; loose check |std_({conv})(A) - 1| = {loose[conv]:.3g} "
            f"(bound {SCALE_TOL:g})")
    conv = fit["conv"]
    devs = _scale_devs(ctx, eps, fit)
    large = "eps" not in ctx.claims and eps > EPS_UNDECLARED_MAX
    holds = devs[conv] <= EXACT_TOL and not large
    cs = "c s" if fit["factor_off"][conv] > EXACT_FACTOR else "s"
    b = "G/(G - 1) " if fit["baseline"] == LOO else ""
    text = (f"{_fit_text(fit)}; |std_({conv})(A) - {b}s/({cs} + eps)| = {devs[conv]:.3g} "
            f"(bound {EXACT_TOL:g})")
    if large:
        text += f"; a fitted eps above {EPS_UNDECLARED_MAX:g} counts only when declared (eps=...)"
    return holds, conv, devs[conv], text


def adv_unit_scale(ctx: Context) -> CheckResult:
    holds, _, dev, text = _scale_verdict(ctx)
    return CheckResult("unit_scale", _judge(ctx, "std_scaled", holds), dev, EXACT_TOL,
                       f"{'unit scale up to eps' if holds else 'NOT unit scale'}: {text}; "
                       f"{_claim_text(ctx, 'std_scaled')}", ctx.row_kind("std_scaled"))


def adv_bessel(ctx: Context) -> CheckResult:
    _, conv, _, text = _scale_verdict(ctx)
    passed = None
    if "bessel" in ctx.claims:
        passed = conv == ("n-1" if ctx.claims["bessel"] else "n")
    return CheckResult("bessel", passed, conv, "n-1" if ctx.claims.get("bessel", True) else "n",
                       f"the group std divides by {conv}: {text}; {_claim_text(ctx, 'bessel')}",
                       ctx.row_kind("bessel"))


def adv_eps(ctx: Context) -> CheckResult:
    fit = fit_std_eps(ctx)
    declared = ctx.claims.get("eps")
    passed = None
    rel = _eps_rounding(ctx, fit)
    note = ""
    if declared is not None:
        passed = rel is not None and abs(rel) <= F32_REL
        if passed and abs(rel) > EPS_EXACT:
            note = f" (the declared eps rounded to float32: relative {rel:.2g})"
    value = fit["eps"] if fit["conv"] is not None else "no fit"
    return CheckResult("eps", passed, value, declared if declared is not None else "measured",
                       f"{_fit_text(fit)}; {_claim_text(ctx, 'eps')}{note}",
                       ctx.row_kind("eps"),
                       {"spread_in_tolerances": fit["spread"], "factor_off": fit["factor_off"]})


def _eps_rounding(ctx: Context, fit: dict) -> float | None:
    """(fitted eps - declared eps) relative to the declared one (absolute when it is 0, with
    1e-13 of room); None without a fit or a declaration."""
    declared = ctx.claims.get("eps")
    if declared is None or fit["conv"] is None:
        return None
    diff = fit["eps"] - float(declared)
    if abs(diff) <= 1e-13:
        return 0.0
    return diff / float(declared) if declared else math.inf


def adv_eps_small_spread(ctx: Context) -> CheckResult:
    """Info: how the eps shrinks groups of small spread (std of A at spreads 1 .. 1e-6)."""
    x = _spread_groups(ctx, 70, SMALL_SPREADS, 8)
    a = _adv(ctx, x).detach().to(F64)
    stds = a.std(-1, correction=1).tolist()
    text = ", ".join(f"{s:g}: {v:.4g}" for s, v in zip(SMALL_SPREADS, stds))
    return CheckResult("eps_small_spread", None, stds[-1], None,
                       f"Bessel std of the advantages of a group of 8 by the group's score std: "
                       f"{text} (1 = unshrunk; an eps of e shrinks std s to s/(s + e))", "info",
                       {"spreads": list(SMALL_SPREADS), "adv_std": stds})


def adv_shift_invariance(ctx: Context) -> CheckResult:
    s = _scores(ctx, 25)
    base = _adv(ctx, s).detach()
    scale = max(1.0, float(base.abs().max()))
    worst = max(_max_abs_diff(_adv(ctx, s + b), base) for b in (-7.0, 0.5, 1e3)) / scale
    ok = worst <= 1e-8
    return CheckResult("shift_invariance", ok, worst, 1e-8,
                       "A(s + b) = A(s)" if ok else f"adding a constant changes the advantages "
                       f"by {worst:.3g}")


def adv_affine_invariance(ctx: Context) -> CheckResult:
    """A(a s + b) (c s_c + eps / a) = A(s) (c s_c + eps): invariance up to the eps, exactly
    (``c`` the fitted std factor, 1 unless rounded to float32)."""
    fit = fit_std_eps(ctx)
    eps, source = _eps_used(ctx, fit)
    conv = fit["conv"] or "n-1"
    tol = EXACT_TOL if fit["conv"] is not None else 1e-6
    s = _scores(ctx, 26)
    base = _adv(ctx, s).detach().to(F64)
    sd = _std(s, conv) * std_factor(fit, s.shape[-1])
    scale = max(1.0, float(base.abs().max()))
    inv, equi = 0.0, 0.0
    for a, b in ((0.5, -7.0), (4.0, 1e3), (1e3, 3.0)):
        out = _adv(ctx, a * s + b).detach().to(F64)
        inv = max(inv, _max_abs_diff(out * (sd + eps / a), base * (sd + eps)) / scale)
        equi = max(equi, _max_abs_diff(_adv(ctx, a * s) / a, base) / scale)
    invariant = inv <= tol
    how = "invariant up to the eps" if invariant else (
        "equivariant: A(a s) = a A(s)" if equi <= 1e-8 else "neither")
    claimed = ctx.claims.get("std_scaled")
    passed, kind = (invariant, "claim") if claimed else (None, "info")
    return CheckResult("affine_invariance", passed, inv, tol,
                       f"under s -> a s + b (a > 0) the advantages are {how} (max change "
                       f"{inv:.3g} after the exact eps correction, {source}); "
                       + ("required by std_scaled" if claimed else "measured"), kind)


def adv_permutation(ctx: Context) -> CheckResult:
    s = _scores(ctx, 27)
    base = _adv(ctx, s).detach()
    gen = ctx.gen(28)
    perm = torch.stack([torch.randperm(s.shape[1], generator=gen) for _ in range(s.shape[0])])
    out = _adv(ctx, s.gather(1, perm)).detach()
    err = _max_abs_diff(out, base.gather(1, perm)) / max(1.0, float(base.abs().max()))
    ok = err <= 1e-10
    return CheckResult("permutation_equivariance", ok, err, 1e-10,
                       "permuting a group's scores permutes its advantages" if ok else
                       f"permuting within groups changed the advantages by {err:.3g}")


def adv_groups_independent(ctx: Context) -> CheckResult:
    s = _scores(ctx, 29)
    base = _adv(ctx, s).detach()
    gen = ctx.gen(30)
    for j, new in ((1, torch.randn(s.shape[1], generator=gen, dtype=F64) * 100 + 50),
                   (0, torch.full((s.shape[1],), 4.0, dtype=F64)),
                   (4, torch.randn(s.shape[1], generator=gen, dtype=F64) * 1e6)):
        s2 = s.clone()
        s2[j] = new
        out = _adv(ctx, s2).detach()
        keep = torch.ones_like(s, dtype=torch.bool)
        keep[j] = False
        if not _same_except(out, base, keep):
            err = _max_abs_diff(out[keep], base[keep])
            return CheckResult("groups_independent", False, err, 0.0,
                               f"changing group {j}'s scores changed other groups' advantages "
                               f"(by up to {err:.3g})")
    return CheckResult("groups_independent", True, 0.0, 0.0,
                       "changing one group's scores changes no other group's advantages")


def _singleton_kind(ctx: Context, eps: float) -> tuple[str, Any]:
    """What groups of one get: zero, raw (s / (1 + eps)), non-finite, raised, or other.

    Raw allows the divisor ``1 + eps`` rounded to float32 (verl's ``torch.tensor(1.0) +
    1e-6``): within :data:`F32_REL` relative (:func:`_singleton_rel` gives its size).
    """
    return _singleton(ctx, eps)[:2]


def _singleton_rel(ctx: Context, eps: float) -> float | None:
    """For a raw singleton, ``(s / A) / (1 + eps) - 1`` in float64: the relative size by which
    the estimator's divisor differs from ``1 + eps`` (largest over the sample); else None."""
    return _singleton(ctx, eps)[2]


def _singleton(ctx: Context, eps: float) -> tuple[str, Any, float | None]:
    key = ("singleton", eps)
    if key not in ctx.cache:
        ctx.cache[key] = _measure_singleton(ctx, eps)
    return ctx.cache[key]


def _measure_singleton(ctx: Context, eps: float) -> tuple[str, Any, float | None]:
    rel = None
    for dtype in (F64, torch.float32):
        s = _scores(ctx, 31, 6, 1, dtype)
        try:
            with warnings.catch_warnings():  # torch.std of one sample warns; the row says it
                warnings.simplefilter("ignore")
                out = _adv(ctx, s).detach()
        except Exception as e:  # the estimator refuses groups of one
            return ("raised", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    None)
        if out.shape != s.shape:
            return "wrong shape", tuple(out.shape), None
        if not bool(torch.isfinite(out).all()):
            return "non-finite", out.reshape(-1)[0].item(), None
        if bool((out == 0).all()):
            kind = "zero"
        else:
            want = s.to(F64) / (1.0 + eps)
            ulp = 4 * torch.finfo(dtype).eps
            room = ulp + (F32_REL if dtype == F64 else 0.0)
            ok = bool(((out.to(F64) - want).abs() <= room * want.abs()).all())
            kind = "raw" if ok else "other"
            if ok and dtype == F64:
                sizes = (s / out) / (1.0 + eps) - 1.0
                rel = float(sizes.reshape(-1)[sizes.abs().argmax()])
        if dtype == F64:
            first = kind
        elif kind != first:
            return "other", f"{first} in float64, {kind} in float32", None
    return first, out.reshape(-1)[0].item(), rel if first == "raw" else None


def adv_group_size_one(ctx: Context) -> CheckResult:
    """The singleton convention: declared (``singleton=``) and verified, or measured."""
    eps, _ = _eps_used(ctx, fit_std_eps(ctx))
    got, example = _singleton_kind(ctx, eps)
    known = {"zero": "exactly 0", "raw": f"the score / (1 + {eps:.3g}) (mean 0, std 1)"}
    claim = ctx.claims.get("singleton")
    what = known.get(got, f"the estimator raised {example}" if got == "raised" else
                     f"{got} ({example})")
    if claim == "unsupported":
        return CheckResult("group_size_one", True, got, "unsupported",
                           f"declared unsupported (never called with groups of one); a group "
                           f"of one gives {what}", "claim")
    if claim is not None:
        return CheckResult("group_size_one", got == claim, got, claim,
                           f"a group of one gives {what}; claimed singleton={claim}", "claim")
    ok = got in known
    return CheckResult("group_size_one", ok, got, "zero or raw",
                       f"a group of one gives {what}" + ("" if ok else
                       "; declare singleton=unsupported if groups of one never occur"))


def adv_float32_rounding(ctx: Context) -> CheckResult:
    """Info: the constants and factors that fit the declared convention only as float32
    numbers (a std factor ``c_G``, the eps, the singleton divisor), each with its size."""
    fit = fit_std_eps(ctx)
    eps, _ = _eps_used(ctx, fit)
    std = {g: c - 1.0 for g, c in fit["factor"].items()}
    eps_rel = _eps_rounding(ctx, fit)
    single = _singleton_rel(ctx, eps)
    parts, sizes = [], [0.0]
    big = {g: v for g, v in std.items() if abs(v) > EXACT_FACTOR}
    if big:
        sizes += [abs(v) for v in big.values()]
        per = ", ".join(f"{v:.2g} at G={g}" for g, v in big.items())
        parts.append(f"the std's factor (c_G - 1: {per}; a Bessel factor G/(G - 1) computed "
                     "in float32)")
    if eps_rel is not None and EPS_EXACT < abs(eps_rel) <= F32_REL:
        sizes.append(abs(eps_rel))
        parts.append(f"the eps (relative {eps_rel:.2g} to the declared one)")
    if single is not None and abs(single) > 4 * torch.finfo(F64).eps:
        sizes.append(abs(single))
        parts.append(f"the singleton divisor 1 + eps (relative {single:.2g}; a float32 "
                     "1 + eps)")
    value = max(sizes)
    text = ("rounded to float32, counted as the declared convention (each within 2^-23 = "
            f"{F32_REL:.3g} relative): " + "; ".join(parts)) if parts else \
        "no constant or factor rounded to float32: the form holds to float64 rounding"
    return CheckResult("float32_rounding", None, value, F32_REL, text, "info",
                       {"std_factor": std, "eps": eps_rel, "singleton": single})


def tie_noise(ctx: Context, dtype) -> dict:
    """Worst |A| on all-equal groups of reward-scale values in ``dtype``, and its factor."""
    worst, at, finite = 0.0, None, True
    for g in TIE_SIZES:
        s = torch.tensor(TIE_VALUES, dtype=F64)[:, None].expand(-1, g).clone()
        s = torch.cat([s, torch.arange(g, dtype=F64)[None]]).to(dtype)  # plus one live group
        out = _adv(ctx, s).detach()[:-1].to(F64)
        finite = finite and bool(torch.isfinite(out).all())
        row_worst = out.abs().nan_to_num(math.inf).amax(-1)
        i = int(row_worst.argmax())
        if float(row_worst[i]) > worst or at is None:
            worst, at = max(worst, float(row_worst[i])), (TIE_VALUES[i], g)
    unit = torch.finfo(dtype).eps * max(abs(at[0]), 1e-30)
    factor = worst / unit
    label = "exact 0" if worst == 0 else ("rounding leftover" if factor <= TIE_LEFTOVER
                                          else "amplified noise")
    return {"worst": worst, "value": at[0], "size": at[1], "factor": factor, "label": label,
            "finite": finite}


def _ties_row(ctx: Context, dtype) -> CheckResult:
    name = f"ties_{str(dtype)[6:]}"
    r = tie_noise(ctx, dtype)
    where = f"x={r['value']:.4g}, G={r['size']}"
    if not r["finite"]:
        return CheckResult(name, False, "non-finite", TIE_NOISE_MAX,
                           f"all-equal groups give non-finite advantages ({str(dtype)[6:]})")
    ok = r["worst"] <= TIE_NOISE_MAX
    text = {"exact 0": "all-equal groups give exactly 0",
            "rounding leftover": f"rounding leftover, not amplified: worst |A| {r['worst']:.3g} "
                                 f"(factor {r['factor']:.3g}) at {where}",
            "amplified noise": f"AMPLIFIED NOISE: worst |A| {r['worst']:.3g} at {where}, the "
                               f"mean's rounding leftover blown up {r['factor']:.3g}x"}[r["label"]]
    if r["label"] == "amplified noise":
        text += (f" (within {TIE_NOISE_MAX:g}: harmless)" if ok else
                 f" > {TIE_NOISE_MAX:g}: groups without signal get a gradient")
    return CheckResult(name, ok, r["worst"], TIE_NOISE_MAX,
                       f"{text}; tied values |x| <= 10, G in 2..64 ({str(dtype)[6:]})",
                       details=r)


def adv_ties_float64(ctx: Context) -> CheckResult:
    return _ties_row(ctx, F64)


def adv_ties_float32(ctx: Context) -> CheckResult:
    return _ties_row(ctx, torch.float32)


def adv_extreme(ctx: Context) -> CheckResult:
    for dtype in (F64, torch.float32):
        for mag in (1e30, 1e-30):
            out = _adv(ctx, (_scores(ctx, 33, 4, 8, F64) * mag).to(dtype)).detach()
            bad = int((~torch.isfinite(out)).sum())
            if bad:
                return CheckResult("extreme_magnitudes", False, bad, 0,
                                   f"{bad} NaN/inf advantages for scores of magnitude {mag:g} "
                                   f"({str(dtype)[6:]})")
    return CheckResult("extreme_magnitudes", True, 0, 0,
                       "finite for scores of magnitude 1e30 and 1e-30 (float32 and float64)")


def adv_leave_one_out(ctx: Context) -> CheckResult:
    """The baseline: the group mean, or the mean of the other G - 1 scores (RLOO: Kool et al.
    2019, Ahmadian et al. 2024), which is ``G/(G - 1)`` times the centred score. Read off the fit
    (the std-scaled form ``b_G (x - mean)/(std + eps)``, or ``b_G (x - mean)`` with no std)."""
    fit = fit_std_eps(ctx)
    got = measured_baseline(fit)
    scaled = "over the std" if fit["conv"] is not None else "with no std"
    if got == LOO:
        text = (f"leave-one-out: x minus the mean of the other G - 1 scores, G/(G - 1) (x - mean) "
                f"{scaled}")
    elif got == MEAN:
        text = f"the group mean: (x - mean) {scaled}, not G/(G - 1) times it"
    else:
        text = (f"{_fit_text(fit)}, nor b_G (x - mean) with no std, for b_G = 1 (mean) or "
                "G/(G - 1) (leave-one-out)")
    text += "; fitted on groups of spread 1e-3..1e2, G = 2, 3, 8, 16"
    return CheckResult("leave_one_out", _judge(ctx, "leave_one_out", got == LOO),
                       got or "neither", "leave-one-out" if ctx.claims.get("leave_one_out", True)
                       else "mean", f"{text}; {_claim_text(ctx, 'leave_one_out')}",
                       ctx.row_kind("leave_one_out"))


def _outlier_bound(fit: dict, g: int) -> float:
    """Samuelson's inequality, |x - mean| <= (G - 1)/sqrt(G) s (Bessel std), times the
    baseline's factor, at most sqrt(G) (leave-one-out, Bessel); a population std allows G/sqrt(G
    - 1) (leave-one-out) or sqrt(G - 1)."""
    if fit["conv"] == "n":
        return g / math.sqrt(g - 1) if fit["baseline"] == LOO else math.sqrt(g - 1)
    return math.sqrt(g)


def adv_bounded(ctx: Context) -> CheckResult:
    """One score ``spread`` above G - 1 equal ones (spreads 1, 1e-3, 1e-9; G = 2..16): a
    std-scaled advantage stays within Samuelson's bound, |A| <= sqrt(G). A std of the other
    G - 1 scores (NeMo-RL issue 1518) is 0 there, and the outlier gets spread / eps."""
    fit = fit_std_eps(ctx)
    worst, at, cases, over = 0.0, None, [], []
    for g in OUTLIER_SIZES:
        x = torch.zeros(len(OUTLIER_SPREADS), g, dtype=F64)
        x[:, -1] = torch.tensor(OUTLIER_SPREADS, dtype=F64)
        a = _adv(ctx, x).detach().to(F64)
        bound = _outlier_bound(fit, g)
        for k, spread in enumerate(OUTLIER_SPREADS):
            top = float(a[k].abs().nan_to_num(math.inf).max())
            outlier = float(a[k, -1].abs().nan_to_num(math.inf))
            cases.append({"G": g, "spread": spread, "max_abs": top, "outlier": outlier,
                          "bound": bound})
            if not top <= bound * (1 + BOUND_RTOL):
                over.append(cases[-1])
            if top > worst or at is None:
                worst, at = max(worst, top), cases[-1]
    if not over:
        return CheckResult("bounded_advantage", True, worst, "sqrt(G)",
                           f"one score apart from G - 1 equal ones (spreads 1, 1e-3, 1e-9; G = "
                           f"2..16): |A| <= {at['max_abs']:.4g} within Samuelson's bound "
                           f"({at['bound']:.4g} at G={at['G']})", details={"cases": cases})
    first = over[0]
    per_spread = [c["outlier"] / c["spread"] for c in cases
                  if c["G"] == first["G"] and c["spread"] >= 1e-3]
    blow_up = (len(per_spread) == 2 and all(math.isfinite(v) for v in per_spread)
               and abs(per_spread[0] - per_spread[1]) <= 1e-3 * per_spread[0])
    text = (f"|A| = {first['max_abs']:.4g} at G={first['G']}, spread {first['spread']:g}, beyond "
            f"Samuelson's bound {first['bound']:.4g} (sqrt(G) for a std-scaled advantage)")
    if blow_up:
        text = (f"leave-one-out blow-up: the outlier's advantage is its distance times "
                f"{per_spread[0]:.4g} at spreads 1 and 1e-3 (distance / eps): its denominator "
                f"is the std of the other G - 1 scores, 0 here (NeMo-RL issue 1518); {text}")
    return CheckResult("bounded_advantage", False, worst, "sqrt(G)", text,
                       details={"cases": cases})


ADV_ROWS = (
    ("shape_dtype", "required", adv_shape_dtype),
    ("no_inplace", "required", adv_no_inplace),
    ("finite", "required", adv_finite),
    ("zero_mean", "required", adv_zero_mean),
    ("unit_scale", "std_scaled", adv_unit_scale),
    ("bessel", "bessel", adv_bessel),
    ("eps", "eps", adv_eps),
    ("eps_small_spread", "info", adv_eps_small_spread),
    ("shift_invariance", "required", adv_shift_invariance),
    ("affine_invariance", "std_scaled", adv_affine_invariance),
    ("permutation_equivariance", "required", adv_permutation),
    ("groups_independent", "required", adv_groups_independent),
    ("leave_one_out", "leave_one_out", adv_leave_one_out),
    ("bounded_advantage", "required", adv_bounded),
    ("group_size_one", "singleton", adv_group_size_one),
    ("float32_rounding", "info", adv_float32_rounding),
    ("ties_float64", "required", adv_ties_float64),
    ("ties_float32", "required", adv_ties_float32),
    ("extreme_magnitudes", "required", adv_extreme),
)
