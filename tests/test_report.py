"""The verification report (grpo_harness.report): claim rows say what was claimed and what was
measured, the seed and the hypothesis profile are listed, and the fragments are merged."""

from __future__ import annotations

import json

from grpo_harness.report import build, verdict

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2">
<testcase classname="tests.test_a" name="test_one" time="0.1"/>
<testcase classname="tests.test_a" name="test_two" time="0.1"><skipped message="no gpu"/></testcase>
</testsuite></testsuites>
"""


def row(name, passed, value, bound, explanation, kind="claim"):
    return {"name": name, "passed": passed, "value": value, "bound": bound, "explanation": explanation,
            "kind": kind, "details": None}


def test_a_claim_row_shows_the_claim_and_the_measurement():
    # k2 declared biased: |bias|/SE = 997 against a bound of 5 passes, because biased was claimed
    k2 = row("unbiased", True, 996.8, 5.0, "8 pairs ...; |bias|/SE=997; BIASED; claimed unbiased=false")
    assert verdict(k2) == "PASS (claimed biased; measured biased)"
    wrong = row("unbiased", False, 996.8, 5.0, "...; BIASED; claimed unbiased=true")
    assert verdict(wrong) == "FAIL (claimed unbiased; measured biased)"
    k1 = row("nonnegative", True, -50.0, ">= 0", "negative values ...; claimed nonnegative=false")
    assert verdict(k1) == "PASS (claimed can be negative; measured can be negative)"
    grad = row("grad_direction", False, "kl_policy_ref", "kl_ref_policy", "...; claimed grad=kl_ref_policy")
    assert verdict(grad) == "FAIL (claimed grad kl_ref_policy; measured grad kl_policy_ref)"
    assert verdict(row("shape_dtype", True, "kept", "same", "keeps the shape", kind="required")) == "PASS"
    assert verdict(row("variance_vs_k1", None, 1.0, None, "ratio", kind="info")) == "info"


def test_the_report_lists_the_seed_and_the_profile(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    out = tmp_path / "reports"
    (out / "fragments").mkdir(parents=True)
    (out / "fragments" / "hypothesis-gw0.json").write_text(json.dumps({"examples": 7, "tests": 1, "profile": "ci"}))
    report = build(tmp_path / "junit.xml", out)
    md = (out / "verify.md").read_text()
    assert report["hypothesis_examples"] == 7
    assert f"seed {report['seed']}" in md and "profile ci" in md
    assert "1 passed, 0 failed, 1 skipped" in md


CATALOGUE_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2">
<testcase classname="tests.test_bug_catalogue" name="test_bug_is_caught[a-1]" time="0.1"/>
<testcase classname="tests.test_bug_catalogue" name="test_bug_is_caught[b-2]" time="0.1">
<failure message="assert False"/></testcase>
</testsuite></testsuites>
"""


def _bug(key, kind, check):
    test = None if kind == "not caught" else f"tests/test_bug_catalogue.py::test_bug_is_caught[{key}]"
    return {"key": key, "reference": f"Proj #{key}", "thread": f"o/r#{key}", "source": "read the thread",
            "bug_class": f"class of {key}", "level": "loop", "check": check, "kind": kind,
            "note": f"note {key}", "caught": kind != "not caught", "test": test}


def test_the_report_lists_the_bug_catalogue_with_this_runs_outcomes(tmp_path, monkeypatch):
    """Each catalogue entry is a row with its check, its kind and its test's outcome in this run
    (passed, failed, not run; '-' for a bug not caught); the count says caught of total. Without
    the fragment (the catalogue was not collected) there is no section."""
    import grpo_harness.report as report_mod

    monkeypatch.setattr(report_mod, "_estimator_section", lambda out: ({}, None))  # not under test here
    (tmp_path / "junit.xml").write_text(CATALOGUE_JUNIT)
    out = tmp_path / "reports"
    (out / "fragments").mkdir(parents=True)
    entries = [_bug("a-1", "oracle", "kit row `x`"), _bug("b-2", "property", "guard"),
               _bug("c-3", "knob changes the loss", "knob"), _bug("d-4", "not caught", "-")]
    (out / "fragments" / "bug-catalogue.json").write_text(json.dumps({"entries": entries}))
    report = build(tmp_path / "junit.xml", out)
    section = report["bug_catalogue"]
    assert [e["outcome"] for e in section["entries"]] == ["passed", "failed", "not run", None]
    assert (section["caught"], section["total"], section["passed"]) == (3, 4, 1)
    assert "bug-catalogue" not in report["sections"]  # its own section, not the generic JSON dump
    md = (out / "verify.md").read_text()
    assert "**The harness catches 3 of 4** (1 not caught, each with the reason)" in md
    assert "in this run 1 of 3 catalogue tests passed" in md
    rows = [line for line in md.splitlines() if line.startswith("| Proj #")]
    assert rows == [
        "| Proj #a-1 | class of a-1 | loop | kit row `x` | oracle | `test_bug_is_caught[a-1]`: passed | "
        "note a-1; read the thread |",
        "| Proj #b-2 | class of b-2 | loop | guard | property | `test_bug_is_caught[b-2]`: **FAILED** | "
        "note b-2; read the thread |",
        "| Proj #c-3 | class of c-3 | loop | knob | knob changes the loss | `test_bug_is_caught[c-3]`: "
        "not run | note c-3; read the thread |",
        "| Proj #d-4 | class of d-4 | loop | - | not caught | - | note d-4; read the thread |"]
    assert md.index("## Bug catalogue") < md.index("## Versions")

    (out / "fragments" / "bug-catalogue.json").unlink()
    again = build(tmp_path / "junit.xml", out)
    assert again["bug_catalogue"] is None and "Bug catalogue" not in (out / "verify.md").read_text()


def test_the_catalogue_fragment_is_the_registry():
    """The fragment the report plugin writes holds every registry entry, with its test's node id
    in the form the report looks up in the JUnit XML."""
    from grpo_harness.report import _junit_key
    from tests.bug_catalogue import CATALOGUE

    for bug in CATALOGUE:
        d = bug.as_dict()
        assert set(d) >= {"reference", "bug_class", "level", "check", "kind", "caught", "test", "note"}
        if bug.caught:
            assert _junit_key(d["test"]) == ("tests.test_bug_catalogue", f"test_bug_is_caught[{bug.key}]")
    assert _junit_key("tests/test_x.py::Cls::test_y[p]") == ("tests.test_x.Cls", "test_y[p]")
