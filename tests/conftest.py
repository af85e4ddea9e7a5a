"""Shared pytest configuration: hypothesis profiles and markers.

Profiles (select with the environment variable ``HYPOTHESIS_PROFILE``, default "dev"):
- "ci":   derandomized (same examples on every run), 60 examples per test, no deadline.
- "dev":  random examples, 60 per test, no deadline.
- "deep": 1000 examples per test, for an occasional long hunt.
"""

import os
import sys
from pathlib import Path

import torch
from hypothesis import settings

# Make the repository root importable however pytest is started.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# One torch thread per test process: the tensors here are tiny, and pytest-xdist already runs
# one worker per core; more threads only spin against each other.
torch.set_num_threads(1)

pytest_plugins = ["tests._report_plugin"]

settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("deep", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (select with -m slow)")
