"""Rows of the ``loss`` kind: a whole policy loss ``fn(logp, old_logp, adv, mask) -> scalar``.

All four arguments are ``(N, T)``; ``mask`` is 0/1 in the dtype of ``logp``; a tuple result
counts by its first element. ``old_logp`` and ``adv`` come without gradient; the kit
differentiates with respect to ``logp``.

Claims (each one is measured, none is taken on trust):

- ``eps_low``, ``eps_high``: the PPO clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio.
  Measured by bisection on the gradient of a one-token batch: with ``A > 0`` the gradient
  vanishes above ``1 + eps_high``, with ``A < 0`` below ``1 - eps_low``.
- ``clip_ratio_c``: the dual-clip cap (verl; Ye et al. 2020): with ``A < 0`` the gradient
  vanishes again above the ratio ``c``. ``None`` claims no dual clip (searched up to 1000).
- ``agg``: the aggregation, one of :data:`~.base.LOSS_AGGS`; ``max_len``: Dr. GRPO's
  constant. Identified by the loss at ratio 1 (where every token's loss is exactly ``-A``) on
  four batches of very different lengths, one with a fully masked row, compared with every
  model of :data:`AGG_MODELS`, known bugs included (verl issue 3741: the token sum divided by
  the length with no division by the number of sequences). A model divided by an unknown
  constant gets the constant fitted and reported.

Required rows: a scalar of the input's dtype with a gradient; no in-place writes; the
gradient at ratio 1 is the plain policy gradient ``-w_it A_it`` (``w`` the identified
aggregation's weights); the clip region, value and gradient token by token (zero where
clipped); padding invariance (junk under the mask and extra padded columns change nothing);
finite value and gradient at log-ratios of +-100 in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .base import (
    F64,
    LOSS_AGGS,
    CheckResult,
    Context,
    _inplace_check,
    _tensor_out,
)

LOSS_RTOL = 1e-6  # value and gradient against the kit's float64 expectation
ZERO_GRAD = 1e-12  # a "zero" gradient: below this fraction of w * ratio * |A|
PAD_RTOL = 1e-12  # padding must change nothing (up to summation order)
DESIGN_LEN = 48  # longest completion of the identification batches without a declared max_len
RATIO_SCAN_MAX = 1e3  # clip boundaries are searched for ratios in [1e-3, 1e3]
BISECT_STEPS = 60


def _num(x) -> str | float:
    return "none" if x is None else x


def _call(ctx: Context, logp, old_logp, adv, mask) -> torch.Tensor:
    out = ctx.fn(logp, old_logp, adv, mask)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return _tensor_out(out, "the loss")


def _value_grad(ctx: Context, logp, old_logp, adv, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (detached) and its gradient wrt ``logp`` (zeros when there is none)."""
    lp = logp.detach().clone().requires_grad_(True)
    out = _call(ctx, lp, old_logp, adv, mask)
    g = None
    if out.requires_grad:
        (g,) = torch.autograd.grad(out, lp, allow_unused=True)
    return out.detach(), torch.zeros_like(lp) if g is None else g


def _batch(lengths, t_len: int, gen: torch.Generator, dtype=F64):
    """A right-padded mask and random log-probs in [-3, -0.1] (``logp``) for ``lengths``."""
    mask = torch.zeros(len(lengths), t_len, dtype=dtype)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = -(0.1 + 2.9 * torch.rand(len(lengths), t_len, generator=gen, dtype=F64)).to(dtype)
    return logp, mask


# ---------------------------------------------------------------------------------------------
# Aggregation models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggModel:
    """One way to reduce per-token values ``v`` (masked) to a scalar, differentiable in ``v``.

    ``constant``: the result is further divided by an unknown constant ``L`` (``max_len``).
    """

    name: str
    text: str
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    constant: bool = False


def _rows(v, m):
    vz = torch.where(m, v, torch.zeros_like(v))
    return vz.sum(-1), m.sum(-1).to(v.dtype)


def _nonempty_mean(x, n):
    keep = n > 0
    return (x * keep).sum() / keep.sum().clamp(min=1)


AGG_MODELS = (
    AggModel("token-mean", "sum / number of valid tokens",
             lambda v, m: _rows(v, m)[0].sum() / m.sum().clamp(min=1)),
    AggModel("seq-mean-token-mean", "mean over the non-empty rows of each row's token mean",
             lambda v, m: _nonempty_mean(_rows(v, m)[0] / _rows(v, m)[1].clamp(min=1),
                                         _rows(v, m)[1])),
    AggModel("seq-mean-token-sum", "mean over the non-empty rows of each row's token sum",
             lambda v, m: _nonempty_mean(*_rows(v, m))),
    AggModel("grpo", "TRL's grpo: each row's token mean, averaged over every row (a fully "
             "masked row counts as 0)",
             lambda v, m: (_rows(v, m)[0] / _rows(v, m)[1].clamp(min=1)).mean()),
    AggModel("seq-mean-token-sum-norm", "Dr. GRPO: sum / (N x max_len), N every row",
             lambda v, m: _rows(v, m)[0].sum() / v.shape[0], constant=True),
    AggModel("sum-norm over non-empty rows", "sum / (S x max_len) with S only the non-empty "
             "rows (a fully masked row left out of Dr. GRPO's N)",
             lambda v, m: _nonempty_mean(*_rows(v, m)), constant=True),
    AggModel("sum-norm by padded T", "sum / (N x T) with T the batch's padded length, not a "
             "constant", lambda v, m: _rows(v, m)[0].sum() / (v.shape[0] * v.shape[1])),
    AggModel("token-sum / max_len", "sum / max_len with no division by the number of "
             "sequences (verl issue 3741)", lambda v, m: _rows(v, m)[0].sum(), constant=True),
    AggModel("token-sum / padded T", "sum / T (the batch's padded length) with no division by "
             "the number of sequences (verl issue 3741)",
             lambda v, m: _rows(v, m)[0].sum() / v.shape[1]),
)
assert {a.name for a in AGG_MODELS} >= set(LOSS_AGGS)


def model_weights(model: AggModel, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-token weights ``w`` with ``model(v) = sum w v`` (by autograd), divided by ``scale``."""
    v = torch.ones(mask.shape, dtype=F64, requires_grad=True)
    (w,) = torch.autograd.grad(model.reduce(v, mask.bool()), v)
    return w / scale


def design_layouts(max_len: int) -> list[tuple[list[int], int]]:
    """(lengths, padded T) of the identification batches: very different lengths, one fully
    masked row, T different from ``max_len`` and from batch to batch."""
    n = max(int(max_len), 8)
    h, q, t3 = n // 2, n // 4, (3 * n) // 4
    return [([1, 5, n // 3, n], n),
            ([h, 0, 2, q, 3], t3),
            ([7, 7, h], h),
            ([1, 1, 1, 1, 1, n - 1], n - 1)]


def identify_aggregation(ctx: Context) -> dict:
    """Compare the loss at ratio 1 (token loss ``-A``) with every model (cached on ``ctx``).

    Returns ``model`` (the matching :class:`AggModel` or None), ``scale`` (its constant, 1
    for models without one), ``closest`` (name and relative error of the nearest model),
    ``layouts`` and ``values``.
    """
    if "agg" in ctx.cache:
        return ctx.cache["agg"]
    gen = ctx.gen(80)
    layouts = design_layouts(ctx.claims.get("max_len") or DESIGN_LEN)
    values, masks, tok = [], [], []
    for lengths, t_len in layouts:
        logp, mask = _batch(lengths, t_len, gen)
        adv = -(0.3 + 1.7 * torch.rand(mask.shape, generator=gen, dtype=F64))
        values.append(float(_call(ctx, logp, logp.clone(), adv, mask).detach()))
        masks.append(mask)
        tok.append(-adv)
    out = {"model": None, "scale": 1.0, "closest": None, "layouts": layouts, "values": values}
    for model in AGG_MODELS:
        raw = [float(model.reduce(v, m.bool())) for v, m in zip(tok, masks)]
        scale = _fit_scale(ctx, model, raw, values)
        err = max(abs(y - r / scale) / abs(r / scale) for y, r in zip(values, raw))
        if out["closest"] is None or err < out["closest"][1]:
            out["closest"] = (model.name, err)
        if err <= LOSS_RTOL and out["model"] is None:
            out["model"], out["scale"] = model, scale
    ctx.cache["agg"] = out
    return out


def _fit_scale(ctx: Context, model: AggModel, raw: list[float], values: list[float]) -> float:
    """1 for models without a constant; else the declared max_len if it fits, or the fitted one."""
    if not model.constant:
        return 1.0
    declared = ctx.claims.get("max_len")
    if declared and all(abs(y * declared - r) <= LOSS_RTOL * abs(r) for y, r in zip(values, raw)):
        return float(declared)
    scale = raw[0] / values[0] if values[0] else math.inf
    if math.isfinite(scale) and scale > 0 and abs(scale - round(scale)) <= 1e-6 * scale:
        scale = float(round(scale))
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def _model_text(model: AggModel, scale: float) -> str:
    if model.constant:
        return f"{model.name} ({model.text}, fitted max_len = {scale:g})"
    return f"{model.name} ({model.text})"


# ---------------------------------------------------------------------------------------------
# The token loss the kit expects (float64), and the clip boundaries
# ---------------------------------------------------------------------------------------------


def expected_token(ratio: float, adv: float, eps_low: float, eps_high: float,
                   clip_ratio_c: float | None) -> tuple[float, float]:
    """(loss, d loss / d logp) of one token away from the clip boundaries (PPO, dual clip)."""
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clipped = min(max(ratio, lo), hi)
    if ratio * adv <= clipped * adv:
        loss, d = -ratio * adv, -ratio * adv
    else:
        loss, d = -clipped * adv, 0.0
    if clip_ratio_c is not None and adv < 0 and loss > -clip_ratio_c * adv:
        loss, d = -clip_ratio_c * adv, 0.0
    return loss, d


def _token_grad_is_zero(ctx: Context, ratio: float, adv: float) -> bool:
    logp = torch.full((1, 1), -1.0, dtype=F64)
    old = logp - math.log(ratio)
    _, g = _value_grad(ctx, logp, old, torch.full((1, 1), adv, dtype=F64),
                       torch.ones(1, 1, dtype=F64))
    return float(g.abs().sum()) == 0.0


def _boundary(ctx: Context, adv: float, ratios: list[float]) -> float | None:
    """The first ratio along ``ratios`` (moving away from 1) where the gradient vanishes,
    refined by bisection; None when it never does."""
    prev = 1.0
    for r in ratios:
        if _token_grad_is_zero(ctx, r, adv):
            live, dead = prev, r
            for _ in range(BISECT_STEPS):
                mid = 0.5 * (live + dead)
                if _token_grad_is_zero(ctx, mid, adv):
                    dead = mid
                else:
                    live = mid
            return 0.5 * (live + dead)
        prev = r
    return None


def measure_clip(ctx: Context) -> dict:
    """Measured eps_low, eps_high (None: no clip found) and clip_ratio_c (None), cached."""
    if "clip" in ctx.cache:
        return ctx.cache["clip"]
    steps = [10.0 ** (k / 8) for k in range(-32, 24)]  # 1e-4 .. ~1e3 away from 1
    up = [1.0 + s for s in steps if 1.0 + s <= RATIO_SCAN_MAX]
    down = [1.0 - s for s in steps if s <= 1.0 - 1.0 / RATIO_SCAN_MAX]
    live_at_one = not _token_grad_is_zero(ctx, 1.0, 1.0)
    high = _boundary(ctx, 1.0, up) if live_at_one else None
    low = _boundary(ctx, -1.0, down) if live_at_one else None
    dual = _boundary(ctx, -1.0, up) if live_at_one else None
    out = {"live_at_one": live_at_one,
           "eps_high": None if high is None else high - 1.0,
           "eps_low": None if low is None else 1.0 - low,
           "clip_ratio_c": dual}
    ctx.cache["clip"] = out
    return out


def clip_params(ctx: Context) -> tuple[float, float, float | None]:
    """(eps_low, eps_high, c) for the clip_region row: the measured ones (no clip found: 1,
    inf, None), so that a wrong declaration fails its own row only; the declared ones when
    nothing can be measured (no gradient at ratio 1)."""
    got = measure_clip(ctx)

    def pick(key, none):
        value = got[key] if got["live_at_one"] else ctx.claims.get(key)
        return none if value is None else value

    return pick("eps_low", 1.0), pick("eps_high", math.inf), pick("clip_ratio_c", None)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def loss_shape_scalar(ctx: Context) -> CheckResult:
    for dtype in (F64, torch.float32):
        logp, mask = _batch([4, 2, 0], 4, ctx.gen(81), dtype)
        adv = torch.randn(mask.shape, generator=ctx.gen(82), dtype=F64).to(dtype)
        lp = logp.clone().requires_grad_(True)
        out = _call(ctx, lp, logp - 0.1, adv, mask)
        if out.dim() != 0 or out.dtype != dtype:
            return CheckResult("shape_scalar", False, f"{tuple(out.shape)} {out.dtype}",
                               f"() {dtype}", "the loss must be a 0-dim tensor of the input's "
                               "dtype")
        if not out.requires_grad or not bool(torch.autograd.grad(out, lp)[0].ne(0).any()):
            return CheckResult("shape_scalar", False, "no gradient", "nonzero gradient",
                               f"no gradient reaches logp ({str(dtype)[6:]})")
    return CheckResult("shape_scalar", True, "scalar", "() with gradient",
                       "a 0-dim loss in the input's dtype (float32/float64), gradient to logp")


def loss_no_inplace(ctx: Context) -> CheckResult:
    logp, mask = _batch([5, 3], 5, ctx.gen(83))
    adv = torch.randn(mask.shape, generator=ctx.gen(84), dtype=F64)
    return _inplace_check("no_inplace", lambda a: ctx.fn(*a), [logp, logp - 0.2, adv, mask])


def loss_aggregation(ctx: Context) -> CheckResult:
    found = identify_aggregation(ctx)
    model, scale = found["model"], found["scale"]
    claim, max_len = ctx.claims.get("agg"), ctx.claims.get("max_len")
    lens = "; ".join(f"lengths {ls} in T={t}" for ls, t in found["layouts"])
    if model is None:
        name, err = found["closest"]
        got, text = "unknown", f"matches no known aggregation (closest: {name}, off by {err:.3g})"
    else:
        got, text = model.name, f"the loss is {_model_text(model, scale)}"
    passed = None
    if claim is not None:
        passed = got == claim
        if passed and model.constant and max_len is not None:
            passed = scale == max_len
            text += "" if passed else f", not the declared max_len={max_len}"
    kind = "claim" if claim is not None else "info"
    claims = ", ".join(f"{k}={ctx.claims[k]}" for k in ("agg", "max_len") if k in ctx.claims)
    return CheckResult("aggregation", passed, got, claim or "measured",
                       f"{text}; token loss -A at ratio 1 on {lens}; "
                       f"{'claimed ' + claims if claims else 'not claimed'}", kind,
                       {"values": found["values"], "scale": scale})


def _clip_row(ctx: Context, key: str) -> CheckResult:
    got = measure_clip(ctx)
    value, claimed = got[key], ctx.claims.get(key, "unclaimed")
    where = {"eps_high": "A > 0: no gradient above ratio 1 + eps_high",
             "eps_low": "A < 0: no gradient below ratio 1 - eps_low",
             "clip_ratio_c": "A < 0: no gradient again above ratio c (dual clip)"}[key]
    if not got["live_at_one"]:
        return CheckResult(key, False if key in ctx.claims else None, None, claimed,
                           "no gradient at ratio 1: the clip range cannot be measured",
                           ctx.row_kind(key))
    shown = "none found" if value is None else f"{value:.6g}"
    passed = None
    if key in ctx.claims:
        if claimed is None or value is None:
            passed = claimed is None and value is None
        else:
            passed = abs(value - claimed) <= 1e-6 * max(1.0, abs(claimed))
    return CheckResult(key, passed, _num(value), _num(claimed) if key in ctx.claims else "measured",
                       f"measured {shown} by bisection ({where}; ratios 1e-3..1e3); "
                       + (f"claimed {key}={_num(claimed)}" if key in ctx.claims else
                          "not claimed"), ctx.row_kind(key))


def loss_eps_low(ctx: Context) -> CheckResult:
    return _clip_row(ctx, "eps_low")


def loss_eps_high(ctx: Context) -> CheckResult:
    return _clip_row(ctx, "eps_high")


def loss_clip_ratio_c(ctx: Context) -> CheckResult:
    return _clip_row(ctx, "clip_ratio_c")


def loss_ratio_one_gradient(ctx: Context) -> CheckResult:
    """At ratio 1 the gradient is the plain policy gradient ``-w_it A_it``."""
    found = identify_aggregation(ctx)
    gen = ctx.gen(85)
    worst = 0.0
    for lengths, t_len in found["layouts"]:
        logp, mask = _batch(lengths, t_len, gen)
        adv = torch.randn(mask.shape, generator=gen, dtype=F64)
        value, g = _value_grad(ctx, logp, logp.clone(), adv, mask)
        if bool(g[mask == 0].ne(0).any()):
            return CheckResult("ratio_one_gradient", False, "masked", 0.0,
                               "nonzero gradient at masked positions")
        if bool((g * adv)[mask == 1].gt(0).any()):
            return CheckResult("ratio_one_gradient", False, "ascent", "-w A, w >= 0",
                               "the gradient raises the log-prob of tokens with A < 0 (and "
                               "lowers it for A > 0): the objective, not a loss to minimise")
        if found["model"] is None:  # unknown aggregation: value = sum of the gradient
            err = abs(float(value) - float(g.sum())) / max(abs(float(value)), 1e-300)
        else:
            want = -model_weights(found["model"], mask, found["scale"]) * adv
            err = float(((g - want).abs() / want.abs().clamp(min=1e-300))[mask == 1].max())
        worst = max(worst, err)
    ok = worst <= LOSS_RTOL
    how = ("-w A with w the weights of " + found["model"].name if found["model"] else
           "(aggregation unknown) summing to the loss")
    return CheckResult("ratio_one_gradient", ok, worst, LOSS_RTOL,
                       f"at ratio 1 the gradient wrt logp is {how}: relative error {worst:.3g}"
                       + ("" if ok else " (not the plain policy gradient)"))


CLIP_RATIOS = (0.3, 0.55, 0.7, 0.77, 0.83, 0.9, 0.97, 1.03, 1.1, 1.17, 1.23, 1.31, 1.45, 1.8,
               2.5, 4.0, 7.0, 12.0)


def _clip_grid(ctx: Context, edges: list[float]):
    """One token per (ratio, sign of A) away from every clip edge, in a 4-row batch."""
    edges = [e for e in edges if 0 < e < math.inf]
    ratios = [r for r in CLIP_RATIOS if all(abs(r - e) > 1e-3 * e for e in edges)]
    pairs = [(r, s) for r in ratios for s in (1.0, -1.0)]
    t_len = (len(pairs) + 3) // 4 + 1
    lengths = [t_len, t_len - 1, 0, t_len]
    logp, mask = _batch(lengths, t_len, ctx.gen(86))
    ratio = torch.ones_like(logp)
    adv = torch.zeros_like(logp)
    slots = [(i, t) for i, n in enumerate(lengths) for t in range(n)]
    mag = 0.5 + 1.5 * torch.rand(len(slots), generator=ctx.gen(87), dtype=F64)
    for k, (i, t) in enumerate(slots):
        r, s = pairs[k % len(pairs)]
        ratio[i, t], adv[i, t] = r, s * float(mag[k])
    return logp, mask, ratio, adv


def loss_clip_region(ctx: Context) -> CheckResult:
    """Value and gradient token by token; the weights come from the gradient at ratio 1."""
    eps_low, eps_high, c = clip_params(ctx)
    logp, mask, ratio, adv = _clip_grid(ctx, [1 - eps_low, 1 + eps_high] + ([c] if c else []))
    _, g1 = _value_grad(ctx, logp, logp.clone(), adv, mask)
    w = torch.where(mask == 1, -g1 / adv, torch.zeros_like(g1))
    value, g = _value_grad(ctx, logp, logp - ratio.log(), adv, mask)
    want_v, scale_v, off, leak, n_zero = 0.0, 0.0, 0.0, 0.0, 0
    for i, t in (mask == 1).nonzero().tolist():
        r, a, wi, gi = float(ratio[i, t]), float(adv[i, t]), float(w[i, t]), float(g[i, t])
        tok, d = expected_token(r, a, eps_low, eps_high, c)
        want_v, scale_v = want_v + wi * tok, scale_v + abs(wi * tok)
        size = max(abs(wi * r * a), 1e-300)
        if d == 0.0:
            n_zero, leak = n_zero + 1, max(leak, abs(gi) / size)
        else:
            off = max(off, abs(gi - wi * d) / size)
    off = max(off, abs(float(value) - want_v) / max(scale_v, 1e-300))
    ok = off <= LOSS_RTOL and leak <= ZERO_GRAD
    params = f"eps_low={eps_low:.4g}, eps_high={eps_high:.4g}, c={_num(c)}"
    text = (f"{int(mask.sum())} tokens with ratios 0.3..12, both signs of A ({params}): "
            f"{n_zero} clipped")
    if ok:
        text += " with zero gradient, the others -w ratio A; the loss matches"
    else:
        text += (f"; gradient in the clipped region up to {leak:.3g} of w ratio |A| "
                 f"(bound {ZERO_GRAD:g}), value or free gradient off by {off:.3g} "
                 f"(bound {LOSS_RTOL:g})")
    return CheckResult("clip_region", ok, max(off, leak), LOSS_RTOL, text)


def _junk_like(x: torch.Tensor, gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    return (low + (high - low) * torch.rand(x.shape, generator=gen, dtype=F64)).to(x.dtype)


def _padded_inputs(ctx: Context):
    gen = ctx.gen(88)
    logp, mask = _batch([9, 0, 3, 6], 9, gen)
    old = logp - 0.4 * (2 * torch.rand(logp.shape, generator=gen, dtype=F64) - 1)
    adv = torch.randn(mask.shape, generator=gen, dtype=F64)
    return logp, old, adv, mask


def _pad_diff(ctx: Context, base, args) -> float:
    """Relative change of the loss and of the gradient at the base's places; inf when a
    masked place gets a gradient."""
    v0, g0 = base
    v, g = _value_grad(ctx, *args)
    if bool(g[args[3] == 0].ne(0).any()):
        return math.inf
    dv = abs(float(v) - float(v0)) / max(abs(float(v0)), 1e-300)
    dg = float((g[:, : g0.shape[1]] - g0).abs().max()) / max(float(g0.abs().max()), 1e-300)
    return max(dv, dg)


def loss_padding_invariance(ctx: Context) -> CheckResult:
    logp, old, adv, mask = _padded_inputs(ctx)
    base = _value_grad(ctx, logp, old, adv, mask)
    gen, pad = ctx.gen(89), mask == 0
    for k in range(3):  # finite junk under the mask, as real padding holds
        args = [torch.where(pad, _junk_like(x, gen, lo, hi), x)
                for x, (lo, hi) in zip((logp, old, adv), ((-20, 0), (-20, 0), (-5, 5)))]
        err = _pad_diff(ctx, base, (*args, mask))
        if err > PAD_RTOL:
            return CheckResult("padding_invariance", False, err, PAD_RTOL,
                               f"finite junk under mask = 0 changed the loss or its gradient "
                               f"(relative {err:.3g}, or a nonzero gradient at a masked place)")
    wide = [torch.cat([x, _junk_like(x[:, :5], gen, -3, 0)], 1) for x in (logp, old, adv)]
    err = _pad_diff(ctx, base, (*wide, torch.cat([mask, torch.zeros_like(mask[:, :5])], 1)))
    ok = err <= PAD_RTOL
    return CheckResult("padding_invariance", ok, err, PAD_RTOL,
                       "junk under mask = 0 and 5 extra padded columns change nothing" if ok else
                       f"5 extra padded columns changed the loss by {err:.3g} (relative): the "
                       "normaliser depends on the batch's padded length T")


def loss_padding_nonfinite(ctx: Context) -> CheckResult:
    logp, old, adv, mask = _padded_inputs(ctx)
    v0 = float(_call(ctx, logp, old, adv, mask).detach())
    leaks = []
    for junk in (math.nan, math.inf, -math.inf, 1e30):
        args = [torch.where(mask == 0, torch.full_like(x, junk), x) for x in (logp, old, adv)]
        v = float(_call(ctx, *args, mask).detach())
        if not (v == v0 or abs(v - v0) <= PAD_RTOL * abs(v0)):
            leaks.append(str(junk))
    return CheckResult("padding_nonfinite", None, not leaks, None,
                       "NaN, +-inf and 1e30 under mask = 0 leave the loss unchanged" if not leaks
                       else f"junk {', '.join(leaks)} under mask = 0 reaches the loss (real "
                       "padding holds finite log-probs)", "info")


def loss_finite_extreme(ctx: Context) -> CheckResult:
    """Finite value and gradient in float32 for log-ratios of +-100 with both signs of A."""
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.05], [-0.1, 100.0, -100.0, 0.0, 0.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0, 1.0, 0.5], [1.0, -2.0, 2.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 1.0, 0.0]])
    logp = -1.0 - (-x).clamp(min=0.0)
    value, g = _value_grad(ctx, logp, logp - x, adv, mask)
    bad = [f"log-ratio {float(x[i, t]):g}, A={float(adv[i, t]):g}"
           for i, t in (~torch.isfinite(g)).nonzero().tolist()]
    ok = bool(torch.isfinite(value)) and not bad
    text = ("finite loss and gradient at log-ratios +-100 with A of both signs (float32)" if ok
            else f"loss {float(value):.3g}" + (f"; non-finite gradient at {'; '.join(bad)}"
                                                 if bad else "") + " (float32)")
    return CheckResult("finite_extreme", ok, float(value), "finite", text)


LOSS_ROWS = (
    ("shape_scalar", "required", loss_shape_scalar),
    ("no_inplace", "required", loss_no_inplace),
    ("aggregation", "agg", loss_aggregation),
    ("eps_low", "eps_low", loss_eps_low),
    ("eps_high", "eps_high", loss_eps_high),
    ("clip_ratio_c", "clip_ratio_c", loss_clip_ratio_c),
    ("ratio_one_gradient", "required", loss_ratio_one_gradient),
    ("clip_region", "required", loss_clip_region),
    ("padding_invariance", "required", loss_padding_invariance),
    ("padding_nonfinite", "info", loss_padding_nonfinite),
    ("finite_extreme", "required", loss_finite_extreme),
)
