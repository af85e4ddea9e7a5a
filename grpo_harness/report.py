"""Verification report: turns the test run (JUnit XML) into ``verify.md`` and ``verify.json``.

``make verify`` runs pytest with ``--junitxml`` and then this module, which also merges any
JSON fragments that tests dropped in ``reports/fragments/`` (estimator checks, oracle parity).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "numpy", "gymnasium", "hypothesis", "pytest", "transformers")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="write reports/verify.md and verify.json from a JUnit XML file")
    p.add_argument("junit", type=Path, help="pytest --junitxml output")
    p.add_argument("--out", type=Path, default=Path("reports"), help="report folder")
    p.set_defaults(run=run)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def parse_junit(path: Path) -> list[dict]:
    """One record per test case: module, name, outcome, seconds, message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
        cases.append({"module": case.get("classname", ""), "name": case.get("name", ""),
                      "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return cases


def _fragments(folder: Path) -> dict:
    merged = {}
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            merged[f.stem] = json.loads(f.read_text())
    return merged


ESTIMATOR_SEED = 0


def _estimator_section(out: Path) -> tuple[dict, str | None]:
    """Every check of every built-in estimator (the kit run on the core's own estimators), and
    the bias/std plot of k1/k2/k3. Failures here are reported, not raised."""
    import dataclasses

    try:
        from grpo_core.testing.kit import BUILTIN_KINDS, BUILTINS, all_passed, check_estimator
        from grpo_harness.kl_plot import plot_kl_estimators
    except ImportError as err:  # torch or matplotlib missing: the report still gets written
        return {"error": str(err)}, None
    section = {}
    for name, fn in BUILTINS.items():
        rows = check_estimator(fn, BUILTIN_KINDS[name], seed=ESTIMATOR_SEED)
        section[name] = {"passed": all_passed(rows),
                         "rows": [dataclasses.asdict(r) for r in rows]}
    plot = out / "kl_estimators.png"
    plot_kl_estimators(plot)
    return section, plot.name


def build(junit: Path, out: Path) -> dict:
    cases = parse_junit(junit)
    counts = Counter(c["outcome"] for c in cases)
    by_module = defaultdict(Counter)
    for c in cases:
        by_module[".".join(c["module"].split(".")[:2])][c["outcome"]] += 1
    fragments = _fragments(out / "fragments")
    catalogue = bug_catalogue_section(fragments.pop(CATALOGUE_FRAGMENT, None), cases)
    examples = sum(v.get("examples", 0) for k, v in fragments.items() if k.startswith("hypothesis"))
    estimators, plot = _estimator_section(out)
    profiles = sorted({v["profile"] for k, v in fragments.items() if k.startswith("hypothesis") and "profile" in v})
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions(),
              "seed": ESTIMATOR_SEED, "hypothesis_profile": ", ".join(profiles) or "unknown",
              "builtin_estimators": estimators, "kl_plot": plot, "bug_catalogue": catalogue,
              "counts": dict(counts), "total": len(cases), "hypothesis_examples": examples,
              "modules": {m: dict(c) for m, c in sorted(by_module.items())},
              "failures": [c for c in cases if c["outcome"] in ("failed", "error")],
              "sections": {k: v for k, v in fragments.items() if not k.startswith("hypothesis")}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "verify.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "verify.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    c = report["counts"]
    lines = ["# Verification report", "", f"Created {report['created']}.", "",
             f"**{c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
             f"{c.get('skipped', 0)} skipped** of {report['total']} tests; "
             f"{report['hypothesis_examples']} hypothesis examples.", "",
             f"Seeds: the estimator checks below ran with seed {report['seed']}; hypothesis ran with "
             f"profile {report.get('hypothesis_profile', 'unknown')} (`ci` is derandomized: the same examples "
             "on every run).", "",
             "| test module | passed | failed | skipped |", "|---|---:|---:|---:|"]
    for mod, mc in report["modules"].items():
        lines.append(f"| {mod} | {mc.get('passed', 0)} | {mc.get('failed', 0) + mc.get('error', 0)} "
                     f"| {mc.get('skipped', 0)} |")
    if report["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- `{f['module']}::{f['name']}`: {f['message']}" for f in report["failures"]]
    lines += ["", "## Built-in estimators (the conformance kit on the core's own estimators)", "",
              "| estimator | check | result | value | bound | explanation |", "|---|---|---|---|---|---|"]
    for est, sec in report["builtin_estimators"].items():
        for r in sec.get("rows", []):
            lines.append(f"| {est} | {r['name']} | {verdict(r)} | {_short(r['value'])} | "
                         f"{_short(r['bound'])} | {r['explanation']} |")
    if report["kl_plot"]:
        lines += ["", f"![bias and std of k1/k2/k3]({report['kl_plot']})"]
    if report.get("bug_catalogue"):
        lines += ["", *bug_catalogue_markdown(report["bug_catalogue"])]
    for name, section in report["sections"].items():
        lines += ["", f"## {name}", ""]
        if isinstance(section, dict) and "markdown" in section:
            lines.append(section["markdown"])
        else:
            lines += ["```json", json.dumps(section, indent=2, default=str)[:4000], "```"]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


CATALOGUE_FRAGMENT = "bug-catalogue"
"""The fragment ``tests/_report_plugin.py`` writes from ``tests/bug_catalogue.py`` (issue 28)."""


def _junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) of a pytest node id in the JUnit XML: ``tests/test_x.py::Cls::test_y[p]``
    -> ``("tests.test_x.Cls", "test_y[p]")``."""
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]), parts[-1]


def bug_catalogue_section(fragment: dict | None, cases: list[dict]) -> dict | None:
    """The catalogue's entries, each with the outcome of its test in this run ("passed",
    "failed", "error", "skipped", "not run"; None for an entry not caught, which has no test),
    and the counts. None without the fragment (the catalogue's tests were not collected)."""
    if not fragment:
        return None
    outcomes = {(c["module"], c["name"]): c["outcome"] for c in cases}
    entries = []
    for entry in fragment.get("entries", []):
        test = entry.get("test")
        outcome = outcomes.get(_junit_key(test), "not run") if test else None
        entries.append({**entry, "outcome": outcome})
    caught = [e for e in entries if e.get("caught")]
    return {"entries": entries, "total": len(entries), "caught": len(caught),
            "passed": sum(e["outcome"] == "passed" for e in caught),
            "run": sum(e["outcome"] not in (None, "not run") for e in entries)}


_OUTCOME_WORDS = {"passed": "passed", "failed": "**FAILED**", "error": "**ERROR**", "skipped": "skipped",
                  "not run": "not run"}


def bug_catalogue_markdown(section: dict) -> list[str]:
    """The "Bug catalogue" section of verify.md: one row per entry, with its check, the kind of
    check and the outcome of its test in this run."""
    n, caught = section["total"], section["caught"]
    lines = ["## Bug catalogue: the field's GRPO bugs (issue 28)", "",
             f"Each bug is reproduced as a broken variant (`tests/bug_catalogue.py`, tests in "
             f"`tests/test_bug_catalogue.py`); its test asserts that the named check fails on it and "
             f"passes on the correct code. **The harness catches {caught} of {n}** "
             f"({n - caught} not caught, each with the reason); in this run {section['passed']} of "
             f"{caught} catalogue tests passed.", "",
             "| reference | bug class | level | check that catches it | kind | test: this run | note |",
             "|---|---|---|---|---|---|---|"]
    for e in section["entries"]:
        run = "-"
        if e["outcome"] is not None:
            name = e["test"].split("::")[-1]
            run = f"`{name}`: {_OUTCOME_WORDS.get(e['outcome'], e['outcome'])}"
        note = "; ".join(x for x in (e.get("note", ""), e.get("source", "")) if x)
        cells = [e["reference"], e["bug_class"], e["level"], e["check"], e["kind"], run, note]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


_CLAIM = re.compile(r"claimed (\w+)=(\S+)\s*$")
# claim -> (wording when it holds, wording when it does not), by the claimed value
_CLAIM_WORDS = {("unbiased", "true"): ("unbiased", "biased"), ("unbiased", "false"): ("biased", "unbiased"),
                ("nonnegative", "true"): ("nonnegative", "can be negative"),
                ("nonnegative", "false"): ("can be negative", "nonnegative"),
                ("std_scaled", "true"): ("std-scaled", "not std-scaled"),
                ("std_scaled", "false"): ("not std-scaled", "std-scaled"),
                ("bessel", "true"): ("Bessel-corrected", "not Bessel-corrected"),
                ("bessel", "false"): ("not Bessel-corrected", "Bessel-corrected")}


def verdict(row: dict) -> str:
    """PASS / FAIL / info; for a declared claim also what was claimed and what was measured
    ("PASS (claimed biased; measured biased)"), so that a PASS row whose value lies far past
    its bound (a biased estimator declared biased) does not read as a contradiction."""
    if row["passed"] is None:
        return "info"
    status = "PASS" if row["passed"] else "FAIL"
    m = _CLAIM.search(row.get("explanation", "")) if row.get("kind") == "claim" else None
    if m is None:
        return status
    name, value = m.group(1), m.group(2).lower()
    if name == "grad":
        measured = row["value"] if isinstance(row["value"], str) else ("the same" if row["passed"] else "another")
        return f"{status} (claimed grad {value}; measured grad {measured})"
    holds, fails = _CLAIM_WORDS.get((name, value), (f"{name}={value}", f"not {name}={value}"))
    return f"{status} (claimed {holds}; measured {holds if row['passed'] else fails})"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/")[:40]


def run(args) -> int:
    if not args.junit.exists():
        print(f"report: no test results at {args.junit}", file=sys.stderr)
        return 2
    try:
        report = build(args.junit, args.out)
    except ET.ParseError as e:
        print(f"report: {args.junit} is not valid JUnit XML ({e}); rerun the tests to write it again",
              file=sys.stderr)
        return 2
    except OSError as e:
        print(f"report: cannot read {args.junit} or write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    c = report["counts"]
    print(f"verify: {c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
          f"{c.get('skipped', 0)} skipped; {report['hypothesis_examples']} hypothesis examples; "
          f"report in {args.out / 'verify.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_harness.report")
    sub = parser.add_subparsers(dest="cmd")
    add_parser(sub, "build")
    args = parser.parse_args(["build", *(argv if argv is not None else sys.argv[1:])])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
