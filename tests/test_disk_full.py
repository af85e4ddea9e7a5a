"""A full file system under ``--out``: one line (no space left, what was kept, the resume
command), exit 1, no traceback; the run then resumes to the same result once there is space.

The disk is made full by making the writes fail as they fail on a full disk: ``torch.save``
with torch's own error (it reports no errno) while the file system reports no free space, and
a metrics write with ``ENOSPC``."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import torch

from grpo_harness import trackers

from .test_train_cli import RESUME_ARGS, assert_same_run, metrics, train
from .test_train_cli import straight_run  # noqa: F401  (fixture: 4 iterations, checkpoint every 1)

Usage = namedtuple("Usage", "total used free")


def fill_disk_at_save(monkeypatch, nth: int) -> None:
    real_save, real_usage = torch.save, shutil.disk_usage
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= nth:
            monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", real_usage)


def assert_one_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_no_space_for_a_checkpoint_is_one_line_and_resumes(straight_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fill_disk_at_save(m, 3)  # checkpoints after iterations 0 and 1 are written, the third is not
        rc = train(out, "--max-iterations", "4", *RESUME_ARGS)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert_one_line(err, "no space left", "checkpoint after iteration 1", f"--out {out} --resume")
    assert (out / "checkpoint.pt").is_file() and not list(out.glob(".*.tmp"))
    assert train(out, "--resume") == 0
    assert_same_run(straight_run, out)


def test_no_space_for_the_metrics_is_one_line_and_resumes(straight_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_write = trackers.TrackedMetricsLog.write

    def write(self, record):
        if record["iteration"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, record)

    with monkeypatch.context() as m:
        m.setattr(trackers.TrackedMetricsLog, "write", write)
        rc = train(out, "--max-iterations", "4", *RESUME_ARGS)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert_one_line(err, "no space left", "metrics", "checkpoint after iteration 1", "--resume")
    assert [r["iteration"] for r in metrics(out)] == [0, 1]
    assert train(out, "--resume") == 0
    assert_same_run(straight_run, out)
