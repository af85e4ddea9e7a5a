"""Pytest plugin: counts hypothesis examples per test and leaves a fragment for the report.

Each worker (pytest-xdist) writes ``reports/fragments/hypothesis-<worker>.json`` (examples,
tests, the hypothesis profile); the verification report sums them, and ``make verify`` removes
the folder once the report is written.

When the run collected the bug catalogue's tests (``tests/test_bug_catalogue.py``), it also
writes ``reports/fragments/bug-catalogue.json``: every entry of ``tests/bug_catalogue.py``, which
the report joins with the outcomes of those tests in the JUnit XML.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_PASSING = re.compile(r"(\d+) passing")
_counts: dict[str, int] = {}


def pytest_runtest_teardown(item):
    stats = getattr(item, "hypothesis_statistics", None)
    if stats:
        _counts[item.nodeid] = sum(int(n) for n in _PASSING.findall(stats))


def pytest_sessionfinish(session):
    _write_bug_catalogue(session)
    if not _counts:
        return
    folder = Path(session.config.rootpath) / "reports" / "fragments"
    folder.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    data = {"examples": sum(_counts.values()), "tests": len(_counts),
            "profile": os.environ.get("HYPOTHESIS_PROFILE", "dev")}
    (folder / f"hypothesis-{worker}.json").write_text(json.dumps(data))


def _write_bug_catalogue(session) -> None:
    """The catalogue's entries as a fragment, when this process collected its tests (under
    xdist every worker collects them and writes the same file; the controller collects none)."""
    from tests.bug_catalogue import CATALOGUE, TEST_MODULE

    if not any(item.nodeid.startswith(TEST_MODULE + "::") for item in getattr(session, "items", ())):
        return
    folder = Path(session.config.rootpath) / "reports" / "fragments"
    folder.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    tmp = folder / f".bug-catalogue-{worker}.tmp"
    tmp.write_text(json.dumps({"entries": [bug.as_dict() for bug in CATALOGUE]}))
    os.replace(tmp, folder / "bug-catalogue.json")  # whole files only: workers may race
