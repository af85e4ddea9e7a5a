"""The kit held against estimators written to match real trainers (tests/trainer_estimators.py).

Every entry of ``REGRESSION`` must get exactly its verdict: the exit status and the set of
failed rows. A true claim never fails (no false alarms on TRL's eps, verl's singleton
pass-through, a declared clamp, grad=neither); each false claim fails the row named for it;
real defects fail with their measured number. The table goes into reports/verify.md.
"""

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from grpo_core.testing.adv_checks import fit_std_eps
from grpo_core.testing.checks import Context
from grpo_core.testing.kit import (
    check_estimator,
    format_table,
    get_claims,
    verdict,
    verdicts_markdown,
)
from tests import trainer_estimators as te

UNDECLARED = "undeclared"  # a claims override of this value removes the declared claim


def _undecorated(fn):
    def call(*args):
        return fn(*args)

    return call


def run_entry(entry) -> tuple[dict, list]:
    label, name, kind, override, want_exit, want_failed = entry
    fn = getattr(te, name)
    claims = {**get_claims(fn), **override}
    claims = {k: v for k, v in claims.items() if v != UNDECLARED}
    rows = check_estimator(_undecorated(fn), kind, claims=claims)
    return verdict(label, kind, claims, rows, expected_exit=want_exit,
                   expected_failed=want_failed), rows


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")  # torch.std of one sample warns
@pytest.mark.parametrize("entry", te.REGRESSION, ids=[e[0] for e in te.REGRESSION])
def test_regression_verdict(entry):
    line, rows = run_entry(entry)
    assert line["as_expected"], format_table(rows)


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_regression_table_for_the_report():
    lines = [run_entry(e)[0] for e in te.REGRESSION]
    table = verdicts_markdown(lines)
    assert table.count("\n") == len(te.REGRESSION) + 1 and "| NO:" not in table
    folder = Path(__file__).resolve().parents[1] / "reports" / "fragments"
    folder.mkdir(parents=True, exist_ok=True)
    intro = ("Estimators written to match real trainers' conventions "
             "(tests/trainer_estimators.py), each with the verdict the kit must give.\n\n")
    (folder / "kit-regression.json").write_text(json.dumps({"markdown": intro + table,
                                                            "entries": lines}))


# ---------------------------------------------------------------------------------------------
# Constants and factors rounded to float32 in the peers' code are their convention, not another
# formula; a real difference (another eps, another std, another singleton rule) still fails
# ---------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, by the standard library (independent of torch)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _rows(fn, **claims) -> dict:
    return {r.name: r for r in check_estimator(fn, "advantage", claims=claims)}


def _scaled_std_estimator(factor: float, eps: float = 1e-4, correction: int = 1):
    """(s - mean) / (factor * std + eps): a std off by ``factor``, nothing else."""
    def adv(scores):
        std = scores.std(-1, keepdim=True, correction=correction) * factor
        return (scores - scores.mean(-1, keepdim=True)) / (std + eps)

    return adv


def _batch_count_bessel(scores):
    """A TRL-style nanstd whose factor uses the batch's count (64 values) instead of the
    group's: the population std times sqrt(64 / 63), 1.008, a real mistake."""
    centred = scores - scores.mean(-1, keepdim=True)
    variance = (centred ** 2).mean(-1, keepdim=True)
    count = torch.tensor(64)
    return centred / ((variance * (count / (count - 1))).sqrt() + 1e-4)


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_a_float32_bessel_factor_is_the_bessel_convention():
    """TRL's nanstd: count / (count - 1) from integer tensors is a float32 division; its std
    is off by sqrt(f32(n/(n-1)) / (n/(n-1))) - 1 relative. Before the fix: unit_scale,
    bessel and eps failed ("d - std is not constant over spreads 1e-3..1e2")."""
    rows = _rows(te.trl_nanstd_advantage)
    for name in ("unit_scale", "bessel", "affine_invariance", "eps"):
        assert rows[name].passed, format_table(list(rows.values()))
    assert rows["bessel"].value == "n-1" and rows["eps"].value == pytest.approx(1e-4, rel=1e-6)
    sizes = fit_std_eps(Context(fn=te.trl_nanstd_advantage, kind="advantage"))["factor"]
    want = {g: math.sqrt(_f32(g / (g - 1)) / (g / (g - 1))) - 1 for g in sizes}
    assert max(abs(w) for w in want.values()) > 1e-8  # the detail is really there
    info = rows["float32_rounding"]
    assert info.kind == "info" and info.passed is None
    for g, w in want.items():
        assert info.details["std_factor"][g] == pytest.approx(w, rel=1e-4, abs=1e-13)
    assert info.value == pytest.approx(max(abs(w) for w in want.values()), rel=1e-4)
    assert "float32" in info.explanation


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_a_float32_singleton_constant_is_the_raw_convention():
    """verl divides a singleton by float32 (1.0) + 1e-6: 1 + 9.5367e-7, not 1 + 1e-6. Before
    the fix: group_size_one said "other"."""
    rows = _rows(te.verl_float32_singleton_advantage)
    row = rows["group_size_one"]
    assert row.passed and row.value == "raw", format_table(list(rows.values()))
    want = _f32(1.0 + 1e-6) / (1.0 + 1e-6) - 1  # about -4.6e-8
    assert 1e-8 < abs(want) < 2.0**-23
    info = rows["float32_rounding"]
    assert info.details["singleton"] == pytest.approx(want, rel=1e-6)
    assert "singleton" in info.explanation


def test_an_exact_estimator_reports_no_rounding():
    info = _rows(te.trl_group_advantage)["float32_rounding"]
    assert info.value <= 1e-12 and info.kind == "info"


def test_an_eps_rounded_to_float32_is_the_declared_eps():
    """std + torch.tensor(1e-4): the eps is the float32 number nearest 1e-4."""
    def adv(scores):
        centred = scores - scores.mean(-1, keepdim=True)
        return centred / (scores.std(-1, keepdim=True) + torch.tensor(1e-4))

    rows = _rows(adv, std_scaled=True, bessel=True, eps=1e-4, singleton="unsupported")
    assert not [n for n, r in rows.items() if r.failed], format_table(list(rows.values()))
    want = _f32(1e-4) / 1e-4 - 1  # about -2.5e-8
    assert rows["float32_rounding"].details["eps"] == pytest.approx(want, rel=1e-6)
    assert rows["float32_rounding"].value == pytest.approx(abs(want), rel=1e-6)


@pytest.mark.parametrize("declared,actual", [(1e-4, 1e-5), (1e-5, 1e-4), (1e-6, 1e-4)])
def test_a_different_eps_still_fails_next_to_a_rounded_factor(declared, actual):
    def adv(scores):
        centred = scores - scores.mean(-1, keepdim=True)
        return centred / (te._count_bessel_std(scores) + actual)

    rows = _rows(adv, std_scaled=True, bessel=True, eps=declared, singleton="unsupported")
    # eps 1e-5 also amplifies float32 ties past the bound: a real defect, its own row
    assert {n for n, r in rows.items() if r.failed} - {"ties_float32"} == {"eps"}
    assert rows["eps"].value == pytest.approx(actual, rel=1e-6)


def test_a_std_factor_beyond_float32_rounding_is_not_the_convention():
    """The bound sits at 2^-23 relative: half of it passes as rounding, 1e-6 (8x it) fails,
    and so do the real mistakes, sqrt(64/63) = 1.008 and the population std."""
    half = _rows(_scaled_std_estimator(1 + 2.0**-24), std_scaled=True, bessel=True, eps=1e-4)
    assert half["bessel"].passed and half["float32_rounding"].value == pytest.approx(
        2.0**-24, rel=1e-4)
    for factor in (1 + 1e-6, math.sqrt(64 / 63)):
        rows = _rows(_scaled_std_estimator(factor), std_scaled=True, bessel=True, eps=1e-4)
        assert rows["bessel"].failed and rows["unit_scale"].failed, factor
    rows = _rows(_batch_count_bessel, std_scaled=True, bessel=True, eps=1e-4)
    assert rows["bessel"].failed and rows["unit_scale"].failed
    population = _rows(_scaled_std_estimator(1.0, correction=0), std_scaled=True, bessel=True,
                       eps=1e-4)
    assert population["bessel"].failed and population["bessel"].value == "n"


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_a_different_singleton_rule_still_fails():
    """Dividing a singleton by 1 + 1e-5 while the groups use eps 1e-6 is 9e-6 relative off
    raw: "other", not a rounding."""
    def adv(scores):
        if scores.shape[-1] == 1:
            return scores / (1 + 1e-5)
        centred = scores - scores.mean(-1, keepdim=True)
        return centred / (scores.std(-1, keepdim=True) + 1e-6)

    row = _rows(adv, std_scaled=True, bessel=True, eps=1e-6, singleton="raw")["group_size_one"]
    assert row.failed and row.value == "other"
