"""``check-estimator`` on user code that never returns or is interrupted: one line, no traceback,
no hang (``--timeout``), exit 2 for a function that never returns, 130 for Ctrl-C."""

from __future__ import annotations

import time

from .test_kit_cli import cli

STUCK = '''
import time

def never(logp, ref_logp):
    while True:
        time.sleep(0.01)

def slow_k1(logp, ref_logp):
    time.sleep(0.3)
    return logp - ref_logp

def ctrl_c(logp, ref_logp):
    raise KeyboardInterrupt
'''


def test_an_estimator_that_never_returns_is_stopped_naming_it(tmp_path):
    path = tmp_path / "stuck.py"
    path.write_text(STUCK)
    start = time.monotonic()
    r = cli(f"{path}:never", "--kind", "kl", "--timeout", "1")
    assert time.monotonic() - start < 30
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "never" in lines[0] and "did not return within 1 s" in lines[0] and "--timeout" in lines[0], lines[0]


def test_a_slow_estimator_is_named_while_it_runs(tmp_path, monkeypatch):
    from grpo_harness import check_cmd

    monkeypatch.setattr(check_cmd, "SLOW_AFTER_S", 0.2)
    path = tmp_path / "stuck.py"
    path.write_text(STUCK)
    r = cli(f"{path}:slow_k1", "--kind", "kl", "--samples", "2", "--timeout", "2")
    assert "slow_k1 is still running" in r.stderr, r.stderr


def test_ctrl_c_in_check_estimator_is_one_line_and_exit_130(tmp_path):
    path = tmp_path / "stuck.py"
    path.write_text(STUCK)
    r = cli(f"{path}:ctrl_c", "--kind", "kl")
    assert r.returncode == 130, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "interrupted" in r.stderr, r.stderr
