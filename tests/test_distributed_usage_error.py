"""A usage error under torchrun is said once (every rank checks the same arguments; rank 0
speaks), before torchrun's own failure summary."""

from __future__ import annotations

import pytest

from .test_distributed_launch import CLI, TORCHRUN, _exit_codes, _run


@pytest.mark.slow
def test_a_usage_error_under_torchrun_is_said_once(tmp_path):
    r = _run([*TORCHRUN, *CLI, "cartpole", "--out", str(tmp_path / "run"), "--set", "num_iterations=2"], timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "grpo-harness train: error:" in line]
    assert len(lines) == 1, r.stderr
    assert "TRL's num_iterations is grpo_epochs here" in lines[0]
    assert set(_exit_codes(r.stderr).values()) <= {2}, r.stderr
