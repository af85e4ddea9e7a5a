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
