"""The kit's declarable conventions: eps fitting, graded ties, singleton rules, KL clamps.

Every expected number comes from a closed form or an explicit construction here, never from
the kit's own output: the estimators are built with a known eps / convention, the clamp's
gap thresholds solve exp(d) - d - 1 = C, the clamp bias is enumerated in float64.
"""

import math

import pytest
import torch

from grpo_core.testing.adv_checks import TIE_LEFTOVER, TIE_NOISE_MAX, fit_std_eps, tie_noise
from grpo_core.testing.checks import Context, categorical_pairs, exact_kl
from grpo_core.testing.kit import (
    BUILTINS,
    EstimatorUsageError,
    check_estimator,
    format_table,
    parse_expect,
)
from tests import trainer_estimators as te
from tests import wrong_estimators as wrong

F64 = torch.float64


def rows_of(fn, kind, **claims):
    return {r.name: r for r in check_estimator(fn, kind, claims=claims)}


def std_eps_estimator(eps: float, correction: int):
    def adv(scores):
        centred = scores - scores.mean(-1, keepdim=True)
        return centred / (scores.std(-1, keepdim=True, correction=correction) + eps)

    return adv


# ---------------------------------------------------------------------------------------------
# eps: fitted, declared, exact up to it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-6, 1e-4, 0.5])
@pytest.mark.parametrize("correction,conv", [(1, "n-1"), (0, "n")])
def test_fit_recovers_the_constructed_eps_and_convention(eps, correction, conv):
    fit = fit_std_eps(Context(fn=std_eps_estimator(eps, correction), kind="advantage"))
    assert fit["conv"] == conv
    assert abs(fit["eps"] - eps) <= 1e-13 + 1e-9 * eps


def test_eps_under_the_square_root_does_not_fit_and_is_checked_loosely():
    def adv(scores):
        centred = scores - scores.mean(-1, keepdim=True)
        return centred / (scores.var(-1, keepdim=True) + 1e-6).sqrt()

    assert fit_std_eps(Context(fn=adv, kind="advantage"))["conv"] is None
    rows = rows_of(adv, "advantage", std_scaled=True, bessel=True)
    assert rows["unit_scale"].passed and "not of the form" in rows["unit_scale"].explanation
    assert rows["eps"].passed is None and rows["eps"].value == "no fit"


def _old_unit_scale_holds(fn) -> bool:
    """The kit's unit-scale test before eps declarations: |std(A) - 1| <= 1e-4 on random
    groups of std about 3 (groups of two included), whatever the estimator's eps."""
    worst = 0.0
    for g in (2, 3, 8, 16):
        x = torch.randn(4, g, generator=torch.Generator().manual_seed(24), dtype=F64) * 3 + 2
        worst = max(worst, float((fn(x).std(-1) - 1).abs().max()))
    return worst <= 1e-4


def test_trl_eps_is_no_longer_a_false_alarm():
    """TRL divides by std + 1e-4: the fixed 1e-4 room failed it (old check kept above); the
    rows are now exact up to the eps, and the eps row confirms the declared 1e-4."""
    assert not _old_unit_scale_holds(te.trl_group_advantage)
    rows = rows_of(te.trl_group_advantage, "advantage")
    for name in ("unit_scale", "bessel", "affine_invariance", "eps"):
        assert rows[name].passed, format_table(list(rows.values()))
    assert rows["unit_scale"].value <= 1e-12 and rows["affine_invariance"].value <= 1e-12
    small = rows["eps_small_spread"].details  # s / (s + 1e-4) at spreads 1 .. 1e-6
    for s, got in zip(small["spreads"], small["adv_std"]):
        assert got == pytest.approx(s / (s + 1e-4), rel=1e-9)


def test_a_large_fitted_eps_counts_only_when_declared():
    adv = std_eps_estimator(0.5, 1)
    assert not rows_of(adv, "advantage", std_scaled=True)["unit_scale"].passed
    assert rows_of(adv, "advantage", std_scaled=True, eps=0.5)["unit_scale"].passed


def test_a_wrong_eps_claim_fails_the_eps_row_only():
    rows = check_estimator(te.trl_group_advantage, "advantage", claims={"eps": 1e-6})
    assert {r.name for r in rows if r.failed} == {"eps"}


# ---------------------------------------------------------------------------------------------
# Leave-one-out baseline (RLOO) and bounded advantages (issue 27)
# ---------------------------------------------------------------------------------------------


def loo_estimator(eps: float, correction: int, scaled: bool = True):
    """The leave-one-out baseline literally (Kool et al. 2019): x minus the mean of the other
    G - 1 scores of its group, over the group's std + eps (``scaled``) or as it is."""
    def adv(scores):
        g = scores.shape[-1]
        out = scores - (scores.sum(-1, keepdim=True) - scores) / (g - 1)
        if scaled:
            out = out / (scores.std(-1, keepdim=True, correction=correction) + eps)
        return out

    return adv


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-4])
@pytest.mark.parametrize("correction,conv", [(1, "n-1"), (0, "n")])
def test_fit_recovers_a_leave_one_out_baseline(eps, correction, conv):
    """x - mean(others) = G/(G - 1) (x - mean): the fit finds the factor G/(G - 1) as the
    baseline, the std convention and the eps as for the mean baseline."""
    fit = fit_std_eps(Context(fn=loo_estimator(eps, correction), kind="advantage"))
    assert fit["conv"] == conv and fit["baseline"] == "leave-one-out"
    assert abs(fit["eps"] - eps) <= 1e-13 + 1e-9 * eps
    mean = fit_std_eps(Context(fn=std_eps_estimator(eps, correction), kind="advantage"))
    assert mean["conv"] == conv and mean["baseline"] == "mean"


def test_a_leave_one_out_claim_is_measured():
    rows = rows_of(loo_estimator(1e-4, 1), "advantage", std_scaled=True, bessel=True, eps=1e-4,
                   leave_one_out=True, singleton="unsupported")
    for name in ("unit_scale", "bessel", "eps", "affine_invariance", "leave_one_out",
                 "bounded_advantage"):
        assert rows[name].passed, format_table(list(rows.values()))
    assert rows["leave_one_out"].value == "leave-one-out"
    unscaled = rows_of(loo_estimator(0.0, 1, scaled=False), "advantage", std_scaled=False,
                       leave_one_out=True, singleton="unsupported")
    assert unscaled["leave_one_out"].passed and unscaled["unit_scale"].passed
    # the mean baseline is not leave-one-out, scaled or not
    for fn in (te.trl_group_advantage, te.dr_grpo_advantage):
        row = rows_of(fn, "advantage", leave_one_out=True)["leave_one_out"]
        assert row.failed and row.value == "mean"
    assert rows_of(te.dr_grpo_advantage, "advantage")["leave_one_out"].kind == "info"


@pytest.mark.parametrize("fn,eps,loo", [(te.rloo_std_advantage, 1e-6, True),
                                        (te.trl_group_advantage, 1e-4, False)])
def test_bounded_advantage_by_samuelson(fn, eps, loo):
    """One outlier among G - 1 equal scores, at distance 1: the group's Bessel std is 1/sqrt(G),
    so the outlier gets sqrt(G) / (1 + sqrt(G) eps) (leave-one-out) or (G - 1)/G of it (mean),
    below sqrt(G); the worst is at the largest G the row tries (16)."""
    row = rows_of(fn, "advantage")["bounded_advantage"]
    want = 4.0 / (1 + 4.0 * eps) * (1.0 if loo else 15 / 16)
    assert row.passed and row.value == pytest.approx(want, rel=1e-9)


def test_a_leave_one_out_std_blows_up_and_is_named():
    """NeMo-RL issue 1518: the std of the other G - 1 scores is 0 for the outlier, whose
    advantage is then its distance / eps: 1 / 1e-6 at distance 1."""
    rows = rows_of(wrong.adv_loo_std_of_others, "advantage")
    row = rows["bounded_advantage"]
    assert row.failed and "leave-one-out blow-up" in row.explanation
    assert row.value == pytest.approx(1.0 / 1e-6, rel=1e-9)
    assert rows["leave_one_out"].failed  # claimed, but not of the form


# ---------------------------------------------------------------------------------------------
# Ties, graded
# ---------------------------------------------------------------------------------------------


def test_exact_zero_on_ties_passes_as_exact():
    ctx = Context(fn=BUILTINS["group_advantages"], kind="advantage")
    for dtype in (F64, torch.float32):
        r = tie_noise(ctx, dtype)
        assert r["worst"] == 0.0 and r["label"] == "exact 0"


def test_a_rounding_leftover_passes_and_is_named():
    """Mean-only advantages leave the mean's rounding error, a few ulps, unamplified."""
    fn = te.dr_grpo_advantage
    r = tie_noise(Context(fn=fn, kind="advantage"), F64)
    x = torch.full((1, 3), 0.1, dtype=F64)
    assert float(fn(x).abs().max()) > 0  # the grid has a real leftover (0.1 three times)
    assert 0 < r["worst"] <= 16 * 2.0**-52 * 10 and r["label"] == "rounding leftover"
    rows = rows_of(fn, "advantage")
    assert rows["ties_float64"].passed and "not amplified" in rows["ties_float64"].explanation


def test_amplified_noise_fails_in_float32_with_its_number():
    """(s - mean) / (std + 1e-8) on tied float32 groups: the leftover (an ulp of |x| <= 10,
    about 1e-6) divided by std + 1e-8 is of order 1."""
    rows = rows_of(te.textbook_advantage, "advantage")
    r32, r64 = rows["ties_float32"], rows["ties_float64"]
    assert r32.failed and r32.value > 0.1 and "AMPLIFIED NOISE" in r32.explanation
    assert r32.details["factor"] > 1e4 * TIE_LEFTOVER
    assert r32.details["factor"] == pytest.approx(
        r32.value / (torch.finfo(torch.float32).eps * abs(r32.details["value"])))
    assert r64.passed and r64.value <= TIE_NOISE_MAX and r64.details["label"] == "amplified noise"


def test_ties_bound_separates_verl_from_trl_in_float32():
    trl = tie_noise(Context(fn=te.trl_group_advantage, kind="advantage"), torch.float32)
    verl = tie_noise(Context(fn=te.verl_grpo_advantage, kind="advantage"), torch.float32)
    assert trl["label"] == verl["label"] == "amplified noise"
    assert trl["worst"] <= TIE_NOISE_MAX < verl["worst"]
    # both are the leftover over (std + eps): a larger eps amplifies less
    assert verl["worst"] / trl["worst"] == pytest.approx(100, rel=0.5)


# ---------------------------------------------------------------------------------------------
# Singleton conventions
# ---------------------------------------------------------------------------------------------


def test_singleton_conventions_are_claims():
    verl = te.verl_grpo_advantage
    assert rows_of(verl, "advantage")["group_size_one"].passed  # declared raw
    row = rows_of(verl, "advantage", singleton="zero")["group_size_one"]
    assert row.failed and row.value == "raw"
    x = torch.tensor([[2.5], [-7.0]], dtype=F64)
    assert torch.allclose(verl(x), x / (1 + 1e-6), rtol=1e-15)  # what "raw" means

    core = BUILTINS["group_advantages"]
    assert rows_of(core, "advantage", singleton="zero")["group_size_one"].passed
    assert rows_of(core, "advantage", singleton="raw")["group_size_one"].failed


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_nan_on_a_singleton_fails_unless_declared_unsupported():
    row = next(r for r in check_estimator(te.trl_group_advantage, "advantage",
                                          claims={"singleton": "zero"})
               if r.name == "group_size_one")
    assert row.failed and row.value == "non-finite"
    undeclared = rows_of(te.textbook_advantage, "advantage", singleton="zero")
    assert undeclared["group_size_one"].failed
    assert rows_of(te.trl_group_advantage, "advantage")["group_size_one"].passed


# ---------------------------------------------------------------------------------------------
# KL: clamp=C, grad=neither
# ---------------------------------------------------------------------------------------------


def _solve(f, lo, hi):
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def test_clamp_row_names_the_gaps_and_the_exact_bias():
    row = rows_of(te.verl_low_var_kl, "kl")["clamp"]
    assert row.passed and row.value == 10.0
    # k3(d) = exp(d) - d - 1 reaches 10 at d = d_hi > 0 and d_lo < 0
    d_hi = _solve(lambda d: math.expm1(d) - d - 10, 0.0, 5.0)
    d_lo = _solve(lambda d: -(math.expm1(d) - d - 10), -20.0, 0.0)
    text = row.explanation
    got_hi = float(text.split("d >= ")[1].split()[0])
    got_lo = float(text.split("d <= ")[1].split(",")[0])
    assert abs(got_hi - d_hi) <= 0.01 and abs(got_lo - d_lo) <= 0.01
    # the bias reported for the pairs that reach the clamp, enumerated here in float64
    pairs = dict(zip((round(p["kl"], 9) for p in row.details["pairs_reaching"]),
                     row.details["pairs_reaching"]))
    assert pairs
    for pi_logits, ref_logits in categorical_pairs(0):
        lp, rf = torch.log_softmax(pi_logits, -1), torch.log_softmax(ref_logits, -1)
        kl = float(exact_kl(lp, rf))
        if round(kl, 9) in pairs:
            k3 = torch.expm1(rf - lp) - (rf - lp)
            bias = float((lp.exp() * k3.clamp(max=10.0)).sum()) - kl
            assert pairs[round(kl, 9)]["exact_bias"] == pytest.approx(bias, rel=1e-9, abs=1e-12)
            assert bias < 0


def test_unbiased_is_judged_below_the_clamp_and_fails_without_it():
    declared = rows_of(te.verl_low_var_kl, "kl")
    assert declared["unbiased"].passed and "below the clamp" in declared["unbiased"].explanation
    undeclared = check_estimator(lambda lp, rf: te.verl_low_var_kl(lp, rf), "kl",
                                 claims={"unbiased": True})
    row = next(r for r in undeclared if r.name == "unbiased")
    assert row.failed and row.value > 100  # the clamp's bias, in standard errors
    hint = next(r for r in undeclared if r.name == "clamp")
    assert hint.kind == "info" and "declare clamp=10" in hint.explanation


def test_grad_neither_is_a_claim_that_can_pass():
    for fn in (te.verl_low_var_kl, te.verl_abs_kl):
        row = rows_of(fn, "kl")["grad_direction"]
        assert row.passed and row.value == "neither"
    assert rows_of(BUILTINS["k3"], "kl", grad="neither")["grad_direction"].failed


# ---------------------------------------------------------------------------------------------
# Claim parsing
# ---------------------------------------------------------------------------------------------


def test_parse_expect_issue_27_claims():
    got = parse_expect("ratio_level=sequence-token,policy_loss=cispo,leave_one_out")
    assert got == {"ratio_level": "sequence-token", "policy_loss": "cispo", "leave_one_out": True}
    for bad in ("ratio_level=seq", "policy_loss=grpo", "leave_one_out=maybe", "ratio_level"):
        with pytest.raises(EstimatorUsageError):
            parse_expect(bad)


def test_parse_expect_new_claims():
    got = parse_expect("eps=1e-4,singleton=raw,clamp=10,agg=grpo,max_len=48,clip_ratio_c=none,"
                       "grad=neither,eps_low=0.2")
    assert got == {"eps": 1e-4, "singleton": "raw", "clamp": 10.0, "agg": "grpo",
                   "max_len": 48, "clip_ratio_c": None, "grad": "neither", "eps_low": 0.2}
    assert isinstance(got["max_len"], int)
    for bad in ("eps=-1", "eps", "singleton=maybe", "agg=sum", "max_len=2.5", "clip_ratio_c=1",
                "clamp=0", "eps_low=1", "eps=abc", "clamp=none"):
        with pytest.raises(EstimatorUsageError):
            parse_expect(bad)
