"""The kit held against estimators written to match real trainers (tests/trainer_estimators.py).

Every entry of ``REGRESSION`` must get exactly its verdict: the exit status and the set of
failed rows. A true claim never fails (no false alarms on TRL's eps, verl's singleton
pass-through, a declared clamp, grad=neither); each false claim fails the row named for it;
real defects fail with their measured number. The table goes into reports/verify.md.
"""

import json
from pathlib import Path

import pytest

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
