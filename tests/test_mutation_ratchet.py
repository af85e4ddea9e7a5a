"""The ratchet of ``make mutate`` (tests/mutation/run.py): a recorded score may only rise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("mutation_run", Path(__file__).parent / "mutation" / "run.py")
mutation_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation_run)


def scored(**files):
    """A run's result from ``name=(mutants, detected, equivalent)``, scored by ``score``."""
    rows = []
    for name, (mutants, detected, equivalent) in files.items():
        for i in range(mutants):
            status = "killed" if i < detected else "survived"
            change = "eq" if detected <= i < detected + equivalent else f"real {i}"
            rows.append({"file": name, "function": "f", "status": status, "change": change})
    known = {("f", "eq"): "equivalent"}
    return mutation_run.score(rows, known)


def test_score_leaves_equivalent_survivors_out():
    result = scored(a=(10, 8, 1), b=(4, 4, 0))
    assert result["files"]["a"]["score"] == pytest.approx(100 * 8 / 9, abs=0.01)
    assert result["files"]["a"]["untriaged"] == 1
    assert result["total"]["score"] == pytest.approx(100 * 12 / 13, abs=0.01)


def test_ratchet_fails_below_the_record_and_passes_at_or_above_it():
    _, recorded = mutation_run.compare("math", {}, scored(a=(10, 8, 1), b=(4, 4, 0)))
    for run, fails in [(scored(a=(10, 8, 1), b=(4, 4, 0)), set()),                 # equal
                       (scored(a=(10, 9, 0), b=(4, 4, 0)), set()),                 # higher
                       (scored(a=(10, 7, 1), b=(4, 4, 0)), {"a", "suite math"}),   # a file lower
                       (scored(a=(10, 9, 1), b=(4, 3, 0)), {"b"})]:                # total higher
        failures, _ = mutation_run.compare("math", recorded, run)
        assert {f.split(":")[0] for f in failures} == fails

def test_ratchet_of_some_files_keeps_the_others_recorded():
    _, recorded = mutation_run.compare("math", {}, scored(a=(10, 8, 1), b=(4, 4, 0)))
    failures, entry = mutation_run.compare("math", recorded, scored(b=(4, 3, 0)))
    assert failures and failures[0].startswith("b: 75.00% < recorded 100.00%")
    assert entry["files"]["a"] == recorded["files"]["a"]
    assert entry["total"]["score"] == pytest.approx(100 * 11 / 13, abs=0.01)
