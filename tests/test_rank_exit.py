"""How a torchrun rank's command ends (``grpo_harness.launch``): the rank leaves with
``os._exit`` (gloo's threads can abort the interpreter's finalization), so whatever the
interpreter would have printed for an exception leaving the command is printed by ``_said``,
with the exit status Python would have given. In-process, without a process group."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch.distributed as dist

from grpo_harness.launch import _said


@pytest.mark.parametrize(("code", "status", "printed"), [
    (None, 0, ""), (0, 0, ""), (3, 3, ""), ("reward server refused the request", 1, "reward server refused the request\n"),
])
def test_sys_exit_keeps_its_status_and_message(code, status, printed, capsys):
    assert _said(SystemExit(code), "grpo-harness", 1) == status
    assert capsys.readouterr().err == printed


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - the test wants it with its traceback
        return e


@pytest.mark.parametrize(("exc", "status"), [
    (ValueError("bad reward"), 1),
    (asyncio.CancelledError("reward timed out"), 1),  # a BaseException, not an Exception
    (KeyboardInterrupt(), 130),
])
def test_any_other_error_prints_its_traceback_through_the_excepthook(exc, status, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda t, v, tb: seen.append((t, v, tb)))
    err = _raised(exc)
    assert _said(err, "grpo-harness", 1) == status
    assert seen == [(type(err), err, err.__traceback__)]
    assert "lost another rank" not in capsys.readouterr().err


def test_a_lost_peer_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", lambda *a: pytest.fail("a lost peer gets one line, not a traceback"))
    assert _said(_raised(dist.DistError("Connection closed by peer")), "grpo-harness", 1) == 1
    assert capsys.readouterr().err == ("grpo-harness: rank 1: lost another rank (DistError: Connection closed by "
                                       "peer); that rank prints its own error\n")


def test_leave_flushes_and_exits_with_the_code():
    """What was printed without a newline still comes out; the status is the code."""
    script = "import sys; from grpo_harness.launch import leave; sys.stdout.write('kept'); sys.stderr.write('also'); leave(7)"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (7, "kept", "also")
