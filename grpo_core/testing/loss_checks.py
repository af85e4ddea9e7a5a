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
  constant. Identified by the loss at ratio 1 (where every token's loss is exactly ``-A``, or
  ``-A logp`` for a weighted loss) on four batches of very different lengths, one with a fully
  masked row, compared with every model of :data:`AGG_MODELS`, known bugs included (verl issue
  3741: the token sum divided by the length with no division by the number of sequences). A
  model divided by an unknown constant gets the constant fitted and reported.
- ``ratio_level``: ``token`` (PPO, GRPO), ``sequence`` (GSPO: the response's ratio
  ``exp(mean log-ratio)``, clipped once) or ``sequence-token`` (GSPO-token: that value, each
  token's gradient through its own log-prob). Measured from the gradient
  (:func:`measure_ratio_level`): at ratio 1 GSPO gives a row's tokens one gradient, the others
  ``-w A`` each; raising one token's ratio moves only that token's gradient under a token ratio,
  every token of the row alike under a response ratio; a change that keeps a row's mean
  log-ratio leaves a response-ratio loss unchanged. For a one-token row the two ratios are one,
  so the clip range above is measured the same way at every level.
- ``policy_loss``: ``ppo`` (the ratio's clipped surrogate: the one-token loss at ratio 1 is
  ``-A`` at every logp) or ``cispo`` (MiniMax-M1: ``-sg(w) A logp`` with ``w = clip(ratio, 1 -
  eps_low, 1 + eps_high)``, proportional to logp at ratio 1). For a CISPO loss ``eps_high`` and
  ``eps_low`` are the weight's cap and floor, read from the value (``w = loss(ratio) /
  loss(1)`` on one token) by bisection; it has no dual clip.

Required rows: a scalar of the input's dtype with a gradient; no in-place writes; the
gradient at ratio 1 is the plain policy gradient ``-w_it A_it`` (``w`` the identified
aggregation's weights; under GSPO each token gets its row's sum over the row's length); the
clip region, value and gradient token by token (zero where clipped; a response-ratio loss on
rows at one ratio each; a CISPO loss ``-w A`` everywhere, no zero region); ``weight`` for a
weighted loss (its gradient is ``-w A`` with the weight detached: an undetached one adds
``-ratio A logp`` below the cap, and the row says "weight not detached"); ``row_equivariance``
(permuting the rows of a square batch permutes each row's part: a (N,) response ratio
broadcast along T, EasyR1 issue 596, runs only there and is named); padding invariance (junk
under the mask and extra padded columns change nothing); finite value and gradient at
log-ratios of +-100 in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .base import (
    F64,
    LOSS_AGGS,
    RATIO_LEVELS,
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
FORM_LOGPS = (-0.5, -2.0)  # one-token log-probs at ratio 1 telling -A from -A logp
WEIGHT_LOGP = -0.5  # the one-token log-prob at which a weighted loss's weight is read
WEIGHT_RTOL = 1e-9  # a weight differs from the ratio (it is capped) beyond this
WEIGHT_LOGPS = (-0.3, -1.7, -4.0)  # log-probs of the weight row's gradient grid
WEIGHT_RATIOS = (0.35, 0.6, 0.9, 1.0, 1.04, 1.5, 3.0, 20.0)
LEVEL_LAYOUT = ([5, 3, 7, 1, 6], 8)  # the ratio-level probe: ragged rows, one of one token
LEVEL_TOL = 1e-6  # measured gradient changes against the predicted ones, relative
SHAPE_TOL = 1e-9  # "uniform in the row" / "proportional to A" to this relative size
SQUARE = 6  # rows = columns of the row_equivariance batch


def _num(x) -> str | float:
    return "none" if x is None else x


def _short(x) -> str:
    return "none" if x is None else f"{x:.6g}"


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

    The token loss at ratio 1 is ``-A`` for a ratio-form loss (PPO, GSPO) and ``-A logp`` for a
    weighted one (CISPO), as :func:`measure_form` finds. Returns ``model`` (the matching
    :class:`AggModel` or None), ``scale`` (its constant, 1 for models without one), ``closest``
    (name and relative error of the nearest model), ``layouts``, ``values`` and ``form``.
    """
    if "agg" in ctx.cache:
        return ctx.cache["agg"]
    form = measure_form(ctx)
    gen = ctx.gen(80)
    layouts = design_layouts(ctx.claims.get("max_len") or DESIGN_LEN)
    values, masks, tok = [], [], []
    for lengths, t_len in layouts:
        logp, mask = _batch(lengths, t_len, gen)
        adv = -(0.3 + 1.7 * torch.rand(mask.shape, generator=gen, dtype=F64))
        values.append(float(_call(ctx, logp, logp.clone(), adv, mask).detach()))
        masks.append(mask)
        tok.append(-adv * logp if form == "logp" else -adv)
    out = {"model": None, "scale": 1.0, "closest": None, "layouts": layouts, "values": values,
           "form": form}
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


def measure_form(ctx: Context) -> str | None:
    """What carries the gradient, read from the loss at ratio 1 on one token (A = 1), cached:
    ``"ratio"`` when the loss is the same at every logp (PPO, GSPO: ``-ratio A``, -A at ratio 1),
    ``"logp"`` when it is proportional to logp (CISPO: ``-sg(w) A logp``), else None."""
    if "form" in ctx.cache:
        return ctx.cache["form"]
    one = torch.ones(1, 1, dtype=F64)
    a, b = (float(_call(ctx, torch.full((1, 1), lp, dtype=F64), torch.full((1, 1), lp, dtype=F64),
                        one, one).detach()) for lp in FORM_LOGPS)
    form = None
    if a != 0 and math.isfinite(a) and abs(b - a) <= 1e-12 * abs(a):
        form = "ratio"
    elif a != 0 and math.isfinite(a) and abs(b / a - FORM_LOGPS[1] / FORM_LOGPS[0]) <= 1e-9:
        form = "logp"
    ctx.cache["form"] = form
    return form


def expected_cispo_token(ratio: float, adv: float, logp: float, eps_low: float | None,
                         eps_high: float | None) -> tuple[float, float]:
    """(loss, d loss / d logp) of one CISPO token (MiniMax-M1 sec. 3.1): ``-w A logp`` with the
    weight ``w = clip(ratio, 1 - eps_low, 1 + eps_high)`` held constant (None: that side open),
    so the gradient is ``-w A`` everywhere, with no zero region."""
    w = ratio if eps_high is None else min(ratio, 1.0 + eps_high)
    w = w if eps_low is None else max(w, 1.0 - eps_low)
    return -w * adv * logp, -w * adv


def expected_loss_grad(log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                       weights: torch.Tensor, eps_low: float, eps_high: float,
                       clip_ratio_c: float | None, level: str):
    """(value, gradient wrt logp (N, T), scale) the kit expects of a clipped loss at ``level``,
    in float64, ``weights`` the aggregation's per-token weights; ``scale`` is the sum of the
    terms' sizes. ``"token"``: every token clips its own ratio. ``"sequence"`` (GSPO, Zheng et
    al. 2025 sec. 4.1): every valid token of row i takes ``s_i = exp(mean of the row's valid
    log-ratios)`` and d log s_i / d logp_i,u = 1/|y_i|, so each of the row's tokens gets the
    row's summed token derivative over |y_i|. ``"sequence-token"`` (sec. 4.3): the same value,
    each token's derivative on its own log-prob."""
    if level not in RATIO_LEVELS:
        raise ValueError(f"level={level!r} is not one of {RATIO_LEVELS}")
    grad = torch.zeros(mask.shape, dtype=F64)
    terms, sizes = [], []
    for i in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[i, t] != 0]
        if not valid:
            continue
        if level != "token":
            s = math.exp(math.fsum(float(log_ratio[i, t]) for t in valid) / len(valid))
        parts = []
        for t in valid:
            r = math.exp(float(log_ratio[i, t])) if level == "token" else s
            tok, d = expected_token(r, float(adv[i, t]), eps_low, eps_high, clip_ratio_c)
            w = float(weights[i, t])
            terms.append(w * tok)
            sizes.append(abs(w * tok))
            parts.append(w * d)
        if level == "sequence":
            grad[i, valid] = math.fsum(parts) / len(valid)
        else:
            grad[i, valid] = torch.tensor(parts, dtype=F64)
    return math.fsum(terms), grad, math.fsum(sizes)


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


def _first_crossing(hit: Callable[[float], bool], ratios: list[float]) -> float | None:
    """The first ratio along ``ratios`` (moving away from 1) where ``hit`` holds, refined by
    bisection; None when it never does."""
    prev = 1.0
    for r in ratios:
        if hit(r):
            live, dead = prev, r
            for _ in range(BISECT_STEPS):
                mid = 0.5 * (live + dead)
                if hit(mid):
                    dead = mid
                else:
                    live = mid
            return 0.5 * (live + dead)
        prev = r
    return None


def _boundary(ctx: Context, adv: float, ratios: list[float]) -> float | None:
    """The first ratio along ``ratios`` (moving away from 1) where the gradient vanishes."""
    return _first_crossing(lambda r: _token_grad_is_zero(ctx, r, adv), ratios)


def _scan_ratios() -> tuple[list[float], list[float]]:
    steps = [10.0 ** (k / 8) for k in range(-32, 24)]  # 1e-4 .. ~1e3 away from 1
    up = [1.0 + s for s in steps if 1.0 + s <= RATIO_SCAN_MAX]
    down = [1.0 - s for s in steps if s <= 1.0 - 1.0 / RATIO_SCAN_MAX]
    return up, down


def _one_token_value(ctx: Context, ratio: float, adv: float, logp: float = WEIGHT_LOGP) -> float:
    lp = torch.full((1, 1), logp, dtype=F64)
    return float(_call(ctx, lp, lp - math.log(ratio), torch.full((1, 1), adv, dtype=F64),
                       torch.ones(1, 1, dtype=F64)).detach())


def measure_weight(ctx: Context) -> dict:
    """The weight ``w(ratio)`` of a weighted loss (``-w A logp``, CISPO), read from its value on
    one token: ``w = loss(ratio) / loss(1)``; its cap ``1 + eps_high`` and floor ``1 - eps_low``
    found by bisection (where ``w`` leaves the ratio), None where there is none in 1e-3..1e3.
    ``wagg`` is the aggregation's weight of a one-token batch (the loss at ratio 1 is
    ``-wagg A logp``). Cached."""
    if "weight" in ctx.cache:
        return ctx.cache["weight"]
    base = _one_token_value(ctx, 1.0, 1.0)
    out = {"live": base != 0 and math.isfinite(base), "eps_high": None, "eps_low": None,
           "wagg": base / -WEIGHT_LOGP}
    if out["live"]:
        up, down = _scan_ratios()
        weight = lambda r: _one_token_value(ctx, r, 1.0) / base  # noqa: E731
        hi = _first_crossing(lambda r: weight(r) < r * (1 - WEIGHT_RTOL), up)
        lo = _first_crossing(lambda r: weight(r) > r * (1 + WEIGHT_RTOL), down)
        # the crossing is found to WEIGHT_RTOL; the cap itself is the weight just beyond it
        out["eps_high"] = None if hi is None else weight(hi * (1 + 1e-6)) - 1.0
        out["eps_low"] = None if lo is None else 1.0 - weight(lo * (1 - 1e-6))
    ctx.cache["weight"] = out
    return out


def clip_bounds(ctx: Context) -> dict:
    """The measured clip range, whichever way the loss uses it: PPO's by the zero-gradient
    bisection (:func:`measure_clip`), a weighted loss's (CISPO) as its weight's cap and floor
    (:func:`measure_weight`; no dual clip). Keys: live_at_one, eps_low, eps_high, clip_ratio_c,
    how ("clip" or "weight")."""
    if measure_form(ctx) == "logp":
        w = measure_weight(ctx)
        return {"live_at_one": w["live"], "eps_low": w["eps_low"], "eps_high": w["eps_high"],
                "clip_ratio_c": None, "how": "weight"}
    return {**measure_clip(ctx), "how": "clip"}


def measure_clip(ctx: Context) -> dict:
    """Measured eps_low, eps_high (None: no clip found) and clip_ratio_c (None), cached."""
    if "clip" in ctx.cache:
        return ctx.cache["clip"]
    up, down = _scan_ratios()
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
    got = clip_bounds(ctx)

    def pick(key, none):
        value = got[key] if got["live_at_one"] else ctx.claims.get(key)
        return none if value is None else value

    return pick("eps_low", 1.0), pick("eps_high", math.inf), pick("clip_ratio_c", None)


def _probe_delta(ctx: Context) -> float:
    """A log-ratio step inside the measured clip range (a quarter of its narrower side, at most
    0.05), so that nothing the probes move is clipped."""
    b = clip_bounds(ctx)
    sides = [e for e in (b["eps_low"], b["eps_high"]) if e is not None and e > 0]
    return min([0.05] + [0.25 * e for e in sides])


def _rel_spread(v: torch.Tensor) -> float:
    return float((v.max() - v.min()).abs() / v.abs().max().clamp(min=1e-300))


def measure_ratio_level(ctx: Context) -> dict:
    """Whose ratio the loss uses, from its gradient (cached). On ragged rows with advantages of
    different sizes (one sign per row) and every ratio 1:

    - at ratio 1 a token ratio and GSPO-token give each token ``-w A_t`` (proportional to its own
      advantage); GSPO gives every token of a row the same ``-(1/|y|) sum_t w A_t``;
    - raising one token's ratio to ``e^d`` (d inside the clip range): under a token ratio only that
      token's gradient moves, by the factor ``e^d``; under a response ratio (GSPO, GSPO-token) the
      row's ratio moves to ``e^(d/|y|)`` and so does every token's gradient of the row;
    - a change of two log-ratios of a row that keeps their mean leaves a response-ratio loss
      unchanged (its value depends on the row's mean log-ratio only).

    Returns ``level`` (one of :data:`~.base.RATIO_LEVELS` or None) and the numbers: ``uniform``
    and ``proportional`` (relative spreads at ratio 1), ``own`` and ``cross`` (the moves of the
    raised token's and the other tokens' gradients, in units of ``e^d - 1``), ``share``
    (``(e^(d/|y|) - 1)/(e^d - 1)``, a response ratio's move), ``mean_only``, ``rows_apart``
    (the other rows' gradients did not move), ``delta``.
    """
    if "level" in ctx.cache:
        return ctx.cache["level"]
    lengths, t_len = LEVEL_LAYOUT
    gen = ctx.gen(90)
    logp, mask = _batch(lengths, t_len, gen)
    sign = torch.tensor([1.0, -1.0] * len(lengths), dtype=F64)[: len(lengths), None]
    adv = sign * (0.5 + 1.5 * torch.rand(mask.shape, generator=gen, dtype=F64))
    delta = _probe_delta(ctx)
    v0, g0 = _value_grad(ctx, logp, logp.clone(), adv, mask)
    multi = [i for i, n in enumerate(lengths) if n > 1]
    uniform = max(_rel_spread(g0[i, : lengths[i]]) for i in multi)
    proportional = max(_rel_spread((g0 / adv)[i, : lengths[i]]) for i in multi)
    n0, u = lengths[0], 1
    raised = logp.clone()
    raised[0, u] -= delta  # token u's ratio e^delta
    v1, g1 = _value_grad(ctx, logp, raised, adv, mask)
    unit = math.expm1(delta)
    moved = ((g1[0, :n0] / g0[0, :n0] - 1) / unit).tolist()
    own, cross = moved[u], [m for k, m in enumerate(moved) if k != u]
    rows_apart = _same_rows(g1[1:], g0[1:])
    kept = raised.clone()
    kept[0, u + 1] += delta  # and token u+1's e^-delta: the row's mean log-ratio is kept
    v2 = float(_call(ctx, logp, kept, adv, mask).detach())
    mean_only = abs(v2 - float(v0)) <= LEVEL_TOL * abs(float(v1) - float(v0))
    share = math.expm1(delta / n0) / unit

    def near(x, want):
        return math.isfinite(x) and abs(x - want) <= LEVEL_TOL * max(abs(want), 1.0)

    level = None
    response = near(own, share) and all(near(c, share) for c in cross) and mean_only
    if not rows_apart:
        level = None
    elif near(own, 1.0) and all(near(c, 0.0) for c in cross):
        level = "token"
    elif response and proportional <= SHAPE_TOL:
        level = "sequence-token"
    elif response and uniform <= SHAPE_TOL:
        level = "sequence"
    out = {"level": level, "uniform": uniform, "proportional": proportional, "own": own,
           "cross": cross, "share": share, "mean_only": mean_only, "rows_apart": rows_apart,
           "delta": delta, "length": n0}
    ctx.cache["level"] = out
    return out


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(b.abs().max()), 1e-300) if b.numel() else 1.0
    return bool(((a - b).abs() <= PAD_RTOL * scale).all())


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
    token = "-A logp" if found["form"] == "logp" else "-A"
    return CheckResult("aggregation", passed, got, claim or "measured",
                       f"{text}; token loss {token} at ratio 1 on {lens}; "
                       f"{'claimed ' + claims if claims else 'not claimed'}", kind,
                       {"values": found["values"], "scale": scale})


def _clip_row(ctx: Context, key: str) -> CheckResult:
    got = clip_bounds(ctx)
    value, claimed = got[key], ctx.claims.get(key, "unclaimed")
    if got["how"] == "weight":
        where = {"eps_high": "the weight w = loss(ratio) / loss(1) of -w A logp stops following "
                             "the ratio above 1 + eps_high",
                 "eps_low": "the weight stops following the ratio below 1 - eps_low",
                 "clip_ratio_c": "a weighted loss (CISPO) has no dual clip"}[key]
    else:
        where = {"eps_high": "A > 0: no gradient above ratio 1 + eps_high",
                 "eps_low": "A < 0: no gradient below ratio 1 - eps_low",
                 "clip_ratio_c": "A < 0: no gradient again above ratio c (dual clip)"}[key]
    if not got["live_at_one"]:
        what = "the loss is 0 at ratio 1" if got["how"] == "weight" else "no gradient at ratio 1"
        return CheckResult(key, False if key in ctx.claims else None, None, claimed,
                           f"{what}: the clip range cannot be measured", ctx.row_kind(key))
    shown = "none found" if value is None else f"{value:.6g}"
    how = f"measured {shown} by bisection ({where}; ratios 1e-3..1e3); "
    if got["how"] == "weight" and key == "clip_ratio_c":
        how = f"none: {where}; "
    passed = None
    if key in ctx.claims:
        if claimed is None or value is None:
            passed = claimed is None and value is None
        else:
            passed = abs(value - claimed) <= 1e-6 * max(1.0, abs(claimed))
    return CheckResult(key, passed, _num(value), _num(claimed) if key in ctx.claims else "measured",
                       how + (f"claimed {key}={_num(claimed)}" if key in ctx.claims else
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
    sequence = measure_ratio_level(ctx)["level"] == "sequence"
    gen = ctx.gen(85)
    worst = 0.0
    for lengths, t_len in found["layouts"]:
        logp, mask = _batch(lengths, t_len, gen)
        adv = torch.randn(mask.shape, generator=gen, dtype=F64)
        value, g = _value_grad(ctx, logp, logp.clone(), adv, mask)
        if bool(g[mask == 0].ne(0).any()):
            return CheckResult("ratio_one_gradient", False, "masked", 0.0,
                               "nonzero gradient at masked positions")
        w = (model_weights(found["model"], mask, found["scale"]) if found["model"] is not None
             else mask)
        descent = w * adv  # -(the expected gradient)
        if sequence:  # GSPO: every token of a row gets the row's sum over |y|
            descent = (descent.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
                       * mask)
        wrong_way = (g * descent)[(mask == 1) & (descent != 0)].gt(0)
        if bool(wrong_way.any()):
            text = ("the gradient raises the log-prob of tokens with A < 0 (and lowers it for "
                    "A > 0): ")
            text += ("the objective, not a loss to minimise" if bool(wrong_way.all()) else
                     f"at {int(wrong_way.sum())} of {wrong_way.numel()} tokens")
            return CheckResult("ratio_one_gradient", False, "ascent", "-w A, w >= 0", text)
        if found["model"] is None:  # unknown aggregation: value = sum of the gradient
            err = abs(float(value) - float(g.sum())) / max(abs(float(value)), 1e-300)
        else:
            want = -descent
            err = float(((g - want).abs() / want.abs().clamp(min=1e-300))[mask == 1].max())
        worst = max(worst, err)
    ok = worst <= LOSS_RTOL
    how = ("-w A with w the weights of " + found["model"].name if found["model"] else
           "(aggregation unknown) summing to the loss")
    if found["model"] and sequence:
        how = ("(GSPO) the row's sum of -w A over its length at each of its tokens, w the "
               "weights of " + found["model"].name)
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


def _region_result(ok: bool, off: float, leak: float, text: str, others: str = "as expected") -> CheckResult:
    if ok:
        text += f" with zero gradient, the others {others}; the loss matches"
    else:
        text += (f"; gradient in the clipped region up to {leak:.3g} of w ratio |A| "
                 f"(bound {ZERO_GRAD:g}), value or free gradient off by {off:.3g} "
                 f"(bound {LOSS_RTOL:g})")
    return CheckResult("clip_region", ok, max(off, leak), LOSS_RTOL, text)


def _row_clip_region(ctx: Context, level: str, eps_low: float, eps_high: float,
                     c: float | None) -> CheckResult:
    """A response-ratio loss (GSPO, GSPO-token): one row per (ratio, sign of A), every token of
    a row at that log-ratio (so the response's ratio is it), advantages of one sign and
    different sizes; value and gradient at every token against :func:`expected_loss_grad`
    with the identified aggregation's weights."""
    found = identify_aggregation(ctx)
    if found["model"] is None:
        return CheckResult("clip_region", False, "no aggregation", LOSS_RTOL,
                           "the aggregation matches no known one: the expected value of a "
                           "sequence-level loss needs its weights")
    edges = [e for e in [1 - eps_low, 1 + eps_high] + ([c] if c else []) if 0 < e < math.inf]
    ratios = [r for r in CLIP_RATIOS if all(abs(r - e) > 1e-3 * e for e in edges)]
    pairs = [(r, s) for r in ratios for s in (1.0, -1.0)]
    lengths = [1 + k % 4 for k in range(len(pairs))]
    logp, mask = _batch(lengths, 5, ctx.gen(91))
    log_ratio, adv = torch.zeros_like(logp), torch.zeros_like(logp)
    mag = 0.5 + 1.5 * torch.rand(logp.shape, generator=ctx.gen(93), dtype=F64)
    for i, ((r, sgn), n) in enumerate(zip(pairs, lengths)):
        log_ratio[i, :n], adv[i, :n] = math.log(r), sgn * mag[i, :n]
    w = model_weights(found["model"], mask, found["scale"])
    value, g = _value_grad(ctx, logp, logp - log_ratio, adv, mask)
    want_v, want_g, scale_v = expected_loss_grad(log_ratio, adv, mask, w, eps_low, eps_high, c,
                                                 level)
    size = (w * log_ratio.exp() * adv.abs()).amax(-1, keepdim=True).clamp(min=1e-300)
    valid = mask == 1
    zero = valid & (want_g == 0)
    live = valid & (want_g != 0)
    leak = float((g.abs() / size)[zero].max()) if bool(zero.any()) else 0.0
    off = float(((g - want_g).abs() / size)[live].max()) if bool(live.any()) else 0.0
    off = max(off, abs(float(value) - want_v) / max(scale_v, 1e-300))
    ok = off <= LOSS_RTOL and leak <= ZERO_GRAD
    params = f"eps_low={eps_low:.4g}, eps_high={eps_high:.4g}, c={_num(c)}"
    text = (f"{level} ratio: {len(pairs)} responses, each at one ratio in 0.3..12, both signs "
            f"of A ({params}): {int(zero.sum())} tokens clipped")
    return _region_result(ok, off, leak, text)


def _weighted_clip_region(ctx: Context, eps_low: float, eps_high: float) -> CheckResult:
    """A weighted loss (CISPO): at every token of the ratio grid the loss is ``-w A logp`` and
    the gradient ``-w A`` (times the aggregation's weight), ``w`` the ratio clipped to the
    measured cap and floor; no token has a zero gradient."""
    found = identify_aggregation(ctx)
    low = None if eps_low >= 1.0 else eps_low
    high = None if not math.isfinite(eps_high) else eps_high
    edges = [e for e in (1 - eps_low, 1 + eps_high) if 0 < e < math.inf]
    logp, mask, ratio, adv = _clip_grid(ctx, edges)
    if found["model"] is not None:
        w = model_weights(found["model"], mask, found["scale"])
    else:
        _, g1 = _value_grad(ctx, logp, logp.clone(), adv, mask)
        w = torch.where(mask == 1, -g1 / adv, torch.zeros_like(g1))
    value, g = _value_grad(ctx, logp, logp - ratio.log(), adv, mask)
    terms, sizes, off = [], [], 0.0
    for i, t in (mask == 1).nonzero().tolist():
        r, a, wi, lp = float(ratio[i, t]), float(adv[i, t]), float(w[i, t]), float(logp[i, t])
        tok, d = expected_cispo_token(r, a, lp, low, high)
        terms.append(wi * tok)
        sizes.append(abs(wi * tok))
        off = max(off, abs(float(g[i, t]) - wi * d) / max(abs(wi * r * a), 1e-300))
    off = max(off, abs(float(value) - math.fsum(terms)) / max(math.fsum(sizes), 1e-300))
    ok = off <= LOSS_RTOL
    text = (f"weighted loss (CISPO): {int(mask.sum())} tokens with ratios 0.3..12, both signs of "
            f"A, weight clip(ratio, {_short(None if low is None else 1 - low)}, "
            f"{_short(None if high is None else 1 + high)}): ")
    text += ("value -w A logp and gradient -w A at every token, no zero region" if ok else
             f"value or gradient off -w A logp / -w A by {off:.3g} (bound {LOSS_RTOL:g})")
    return CheckResult("clip_region", ok, off, LOSS_RTOL, text)


def loss_clip_region(ctx: Context) -> CheckResult:
    """Value and gradient token by token; the weights come from the gradient at ratio 1 (a
    token ratio), the identified aggregation (a response ratio, a weighted loss)."""
    eps_low, eps_high, c = clip_params(ctx)
    if measure_form(ctx) == "logp":
        return _weighted_clip_region(ctx, eps_low, eps_high)
    level = measure_ratio_level(ctx)["level"]
    if level in ("sequence", "sequence-token"):
        return _row_clip_region(ctx, level, eps_low, eps_high, c)
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
    return _region_result(ok, off, leak, text, others="-w ratio A")


def loss_ratio_level(ctx: Context) -> CheckResult:
    got = measure_ratio_level(ctx)
    level, claim = got["level"], ctx.claims.get("ratio_level")
    n, d = got["length"], got["delta"]
    cross = max(got["cross"], key=abs) if got["cross"] else 0.0
    text = {"token": "token ratio",
            "sequence": "response ratio (GSPO)",
            "sequence-token": "response ratio, per-token gradients (GSPO-token)",
            None: "none of token, sequence, sequence-token"}[level]
    claimed = f"claimed ratio_level={claim}" if claim is not None else "not claimed"
    text += (f"; {claimed}; one token of a {n}-token row raised to ratio e^{d:.2g} moved its "
             f"gradient by {got['own']:.4g}, the row's others by up to {cross:.4g} (x (e^d - 1); "
             f"token: 1, 0; response: {got['share']:.4g} each); at ratio 1 the spread in a row "
             f"of the gradient {got['uniform']:.2g} (GSPO: 0), of gradient / A "
             f"{got['proportional']:.2g} (GSPO-token: 0); a mean-keeping change "
             f"{'kept' if got['mean_only'] else 'moved'} the loss")
    if not got["rows_apart"]:
        text += "; another row's gradient moved too (see row_equivariance)"
    passed = None if claim is None else level == claim
    return CheckResult("ratio_level", passed, level or "unknown", claim or "measured", text,
                       ctx.row_kind("ratio_level"), {k: v for k, v in got.items()})


def loss_policy_loss(ctx: Context) -> CheckResult:
    form = measure_form(ctx)
    got = {"ratio": "ppo", "logp": "cispo"}.get(form, "unknown")
    claim = ctx.claims.get("policy_loss")
    text = {"ratio": "the ratio's surrogate (PPO, GSPO): the one-token loss at ratio 1 is the "
                     "same at logp -0.5 and -2 (-A)",
            "logp": "a weight times the log-prob (CISPO): the one-token loss at ratio 1 is "
                    "proportional to logp (-A logp)",
            None: "the one-token loss at ratio 1 is neither -A at every logp nor -A logp"}[form]
    passed = None if claim is None else got == claim
    text += f"; claimed policy_loss={claim}" if claim is not None else "; not claimed"
    return CheckResult("policy_loss", passed, got, claim or "measured", text,
                       ctx.row_kind("policy_loss"))


def loss_weight(ctx: Context) -> CheckResult:
    """A weighted loss (CISPO): one token's gradient is ``-wagg w A`` with ``w`` the measured
    weight ``clip(ratio, 1 - eps_low, 1 + eps_high)`` held constant, at every ratio (above the
    cap too, where PPO's gradient is 0) and every logp; an undetached weight adds its own
    derivative, ``-ratio A logp`` below the cap."""
    form, claim = measure_form(ctx), ctx.claims.get("policy_loss")
    kind = "claim" if claim is not None else ("required" if form == "logp" else "info")
    if form != "logp":
        b = clip_bounds(ctx) if form == "ratio" else {"eps_high": None}
        if b["eps_high"] is not None:
            text = (f"no weight: zero gradient above ratio 1 + {b['eps_high']:.4g} for A > 0 "
                    f"(PPO's clip), where a CISPO weight keeps -(1 + eps_high) A")
        else:
            text = "no weight times log-prob: the one-token loss at ratio 1 is not -A logp"
        passed = None if kind == "info" else claim != "cispo"
        return CheckResult("weight", passed, "none", "detached weight" if claim == "cispo" else
                           "measured", text, kind)
    w = measure_weight(ctx)
    if not w["live"]:
        return CheckResult("weight", None if kind == "info" else False, "no value", None,
                           "the loss is 0 at ratio 1: the weight cannot be read", kind)
    lo = None if w["eps_low"] is None else 1 - w["eps_low"]
    hi = None if w["eps_high"] is None else 1 + w["eps_high"]
    worst, undetached, zero_above, points = 0.0, True, hi is not None, []
    for lp in WEIGHT_LOGPS:
        for r in WEIGHT_RATIOS:
            for a in (1.3, -0.7):
                logp = torch.full((1, 1), lp, dtype=F64)
                _, g = _value_grad(ctx, logp, logp - math.log(r), torch.full((1, 1), a, dtype=F64),
                                   torch.ones(1, 1, dtype=F64))
                got = float(g)
                weight = min(r, hi) if hi is not None else r
                weight = max(weight, lo) if lo is not None else weight
                size = abs(w["wagg"] * r * a)
                want = -w["wagg"] * weight * a
                free = weight == r  # below the cap: an undetached weight moves with logp
                loose = -w["wagg"] * r * a * (1 + lp) if free else want
                worst = max(worst, abs(got - want) / size)
                undetached = undetached and abs(got - loose) <= LOSS_RTOL * size
                if not free and hi is not None and r > hi:
                    zero_above = zero_above and got == 0.0
                points.append({"logp": lp, "ratio": r, "adv": a, "grad": got, "want": want})
    ok = worst <= LOSS_RTOL
    bounds = f"clip(ratio, {_short(lo)}, {_short(hi)})"
    where = (f"one token at logp {', '.join(f'{x:g}' for x in WEIGHT_LOGPS)}, ratios "
             f"{WEIGHT_RATIOS[0]:g}..{WEIGHT_RATIOS[-1]:g}, A of both signs")
    if ok:
        text = (f"detached weight w = {bounds}: the gradient is -w A (times the aggregation's "
                f"weight) at {where}, also beyond the cap (no zero region)")
    elif undetached:
        text = (f"weight not detached: below the cap the gradient is -ratio A (1 + logp), not "
                f"-w A: the weight's own derivative adds -ratio A logp (off by up to "
                f"{worst:.3g} relative at {where}; w = {bounds})")
    elif zero_above:
        text = (f"zero gradient above the cap {_short(hi)}: PPO's clip, not CISPO's constant "
                f"weight (off -w A by up to {worst:.3g})")
    else:
        text = f"the gradient is off -w A, w = {bounds}, by up to {worst:.3g} at {where}"
    return CheckResult("weight", ok, worst, LOSS_RTOL, text, kind, {"points": points})


def loss_row_equivariance(ctx: Context) -> CheckResult:
    """Each row's loss is its own: on a square batch (N = T, every token valid, rows at
    different ratios inside the clip range) permuting the rows leaves the loss unchanged and
    permutes the gradient's rows. A (N,) per-response ratio broadcast against (N, T) without its
    trailing axis runs only on such a batch, and pairs row i's ratio with column i (EasyR1
    issue 596); the row names it when a row with A = 0 still gets a gradient through column
    0's advantages alone."""
    n = SQUARE
    gen = ctx.gen(92)
    logp, mask = _batch([n] * n, n, gen)
    old = logp - _probe_delta(ctx) * (2 * torch.rand(logp.shape, generator=gen, dtype=F64) - 1)
    adv = torch.randn(logp.shape, generator=gen, dtype=F64)
    v, g = _value_grad(ctx, logp, old, adv, mask)
    perm = torch.tensor([2, 0, 4, 5, 3, 1])
    vp, gp = _value_grad(ctx, logp[perm], old[perm], adv[perm], mask[perm])
    top = max(float(g.abs().max()), 1e-300)
    dv = abs(float(vp) - float(v)) / max(abs(float(v)), float(g.abs().sum()), 1e-300)
    dg = float((gp - g[perm]).abs().max()) / top
    err = max(dv, dg)
    if err <= PAD_RTOL:
        return CheckResult("row_equivariance", True, err, PAD_RTOL,
                           f"permuting the rows of a {n} x {n} batch permutes the gradient's rows "
                           "and leaves the loss unchanged: each row's loss uses its own ratio")
    moved = f"permuting the rows of a {n} x {n} batch moved the loss by {dv:.3g} (relative), " \
        f"the gradient by {dg:.3g}"
    text = f"{moved}: a row's loss depends on other rows' values"
    zero_row = adv.clone()
    zero_row[0] = 0
    _, g0 = _value_grad(ctx, logp, old, zero_row, mask)
    if float(g0[0].abs().max()) > PAD_RTOL * top:
        zero_col = zero_row.clone()
        zero_col[:, 0] = 0
        _, g00 = _value_grad(ctx, logp, old, zero_col, mask)
        if float(g00[0].abs().max()) <= PAD_RTOL * top:
            text = ("wrong axis (EasyR1 issue 596): token t of every row uses row t's response "
                    "ratio, a (N,) per-response value broadcast along T, not down the rows; row 0 "
                    "with A = 0 still gets a gradient, gone once column 0's A is 0 too; "
                    f"{moved}")
            if _raises_off_square(ctx):
                text += "; it raises on any batch with N != T"
        else:
            text += ("; row 0 with A = 0 still gets a gradient: other rows' losses read its "
                     "log-probs")
    return CheckResult("row_equivariance", False, err, PAD_RTOL, text)


def _raises_off_square(ctx: Context) -> bool:
    logp, mask = _batch([4, 4, 4], 4, ctx.gen(94))
    try:
        _call(ctx, logp, logp.clone(), torch.ones_like(logp), mask)
    except Exception:
        return True
    return False


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
    ("ratio_level", "ratio_level", loss_ratio_level),
    ("policy_loss", "policy_loss", loss_policy_loss),
    ("eps_low", "eps_low", loss_eps_low),
    ("eps_high", "eps_high", loss_eps_high),
    ("clip_ratio_c", "clip_ratio_c", loss_clip_ratio_c),
    ("weight", "policy_loss", loss_weight),
    ("ratio_one_gradient", "required", loss_ratio_one_gradient),
    ("clip_region", "required", loss_clip_region),
    ("row_equivariance", "required", loss_row_equivariance),
    ("padding_invariance", "required", loss_padding_invariance),
    ("padding_nonfinite", "info", loss_padding_nonfinite),
    ("finite_extreme", "required", loss_finite_extreme),
)
