"""Pytest plugin: counts hypothesis examples per test and leaves a fragment for the report.

Each worker (pytest-xdist) writes ``reports/fragments/hypothesis-<worker>.json`` (examples,
tests, the hypothesis profile); the verification report sums them, and ``make verify`` removes
the folder once the report is written.
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
    if not _counts:
        return
    folder = Path(session.config.rootpath) / "reports" / "fragments"
    folder.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    data = {"examples": sum(_counts.values()), "tests": len(_counts),
            "profile": os.environ.get("HYPOTHESIS_PROFILE", "dev")}
    (folder / f"hypothesis-{worker}.json").write_text(json.dumps(data))
