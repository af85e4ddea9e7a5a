"""One writer per run folder: a second ``train`` (new or ``--resume``) on a folder that a live
process writes is refused in one line naming that process (exit 2), and the lock dies with its
holder, so a killed run resumes without any clean-up. The same for ``ablate`` folders.

The races fork this test process (torch is imported already, so a child starts in milliseconds)
and start both children at one barrier."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest

from grpo_harness.cli import main

FORK = multiprocessing.get_context("fork")
SHORT = ["--max-iterations", "2", "--set", "group_size=4", "--set", "groups_per_iteration=1",
         "--set", "grpo_epochs=1", "--set", "beta=0", "--hidden", "8", "--eval-episodes", "1"]


def _child(argv: list[str], log: str, barrier, slow: float, setup) -> None:
    stream = open(log, "w", buffering=1)
    sys.stdout = sys.stderr = stream
    if setup is not None:
        setup()
    if slow:  # a long run: every iteration sleeps, so that the test acts while it is live
        from grpo_harness import run as run_module

        step = run_module.TrainingRun._maybe_checkpoint

        def sleepy(self):
            step(self)
            time.sleep(slow)
        run_module.TrainingRun._maybe_checkpoint = sleepy
    if barrier is not None:
        barrier.wait()
    try:
        code = main(argv)
    except BaseException:  # noqa: BLE001 - a crash is a result the test reads
        traceback.print_exc()
        code = 99
    stream.flush()
    os._exit(code)


def start(argv: list[str], log: Path, barrier=None, slow: float = 0.0, setup=None):
    proc = FORK.Process(target=_child, args=(argv, str(log), barrier, slow, setup))
    proc.start()
    return proc


def iterations(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def race(out: Path, logs: Path, first: list[str], second: list[str]) -> list[tuple[int, str, int]]:
    barrier = FORK.Barrier(2)
    procs = [start(argv, logs / f"{out.name}-{i}.log", barrier) for i, argv in enumerate((first, second))]
    for p in procs:
        p.join(120)
    return [(p.exitcode, (logs / f"{out.name}-{i}.log").read_text(), p.pid) for i, p in enumerate(procs)]


def assert_one_refused(results, out: Path) -> None:
    codes = sorted(code for code, _, _ in results)
    text = "\n---\n".join(log for _, log, _ in results)
    assert codes == [0, 2], text
    (_, won, winner), (_, lost, _) = sorted(results, key=lambda r: r[0])
    errors = [line for line in lost.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in lost, lost
    assert f"pid {winner}" in errors[0] and "is in use" in errors[0], errors[0]
    assert iterations(out) == [0, 1], text
    assert len(list((out / "tb").glob("events.*"))) == 1


@pytest.mark.slow
def test_two_new_runs_racing_on_one_folder_leave_one_run(tmp_path):
    """The soak: 20 races of two new runs on one --out; every time one writes and one is refused."""
    assert main(["train", "cartpole", "--out", str(tmp_path / "warm"), *SHORT]) == 0  # imports done once
    for i in range(20):
        out = tmp_path / f"dup{i}"
        argv = ["train", "cartpole", "--out", str(out), *SHORT]
        assert_one_refused(race(out, tmp_path, argv, argv), out)


def test_a_resume_while_the_run_is_live_is_refused_and_the_lock_dies_with_the_run(tmp_path, capsys):
    out = tmp_path / "live"
    argv = ["train", "cartpole", "--out", str(out), *SHORT[2:], "--max-iterations", "400", "--no-early-stop"]
    live = start(argv, tmp_path / "live.log", slow=0.2)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "metrics.jsonl").is_file() and len(iterations(out)) >= 2):
            assert time.monotonic() < deadline and live.is_alive(), (tmp_path / "live.log").read_text()
            time.sleep(0.05)
        capsys.readouterr()
        for extra in (["--resume"], []):
            before = iterations(out)
            rc = main(["train", "cartpole", "--out", str(out), *extra])
            err = capsys.readouterr().err
            assert rc == 2, err
            assert len(err.strip().splitlines()) == 1 and f"pid {live.pid}" in err and "is in use" in err, err
            assert iterations(out)[:len(before)] == before  # nothing the live run wrote was dropped
        assert live.is_alive()
    finally:
        os.kill(live.pid, signal.SIGKILL)
        live.join(30)
    # killed: its lock went with it, and the run resumes without any clean-up
    assert main(["train", "cartpole", "--out", str(out), "--resume", "--max-iterations",
                 str(len(iterations(out)) + 1)]) == 0
    done = iterations(out)
    assert done == list(range(len(done)))


def test_a_second_ablation_on_a_live_ablation_folder_is_refused(tmp_path, capsys, monkeypatch):
    from grpo_harness import ablate

    out = tmp_path / "abl"
    argv = ["ablate", "cartpole", "--out", str(out), "--vary", "gamma=1.0", "--seeds", "0",
            "--train", "--max-env-steps 200"]

    def trains_for_a_minute() -> None:
        def spawn(self, job, cmd):
            time.sleep(60)
            return 1
        ablate.Runner._spawn = spawn

    live = start(argv, tmp_path / "live.log", setup=trains_for_a_minute)
    try:
        deadline = time.monotonic() + 60
        while not (out / "runs").exists() and not (out / "tune").exists():
            assert time.monotonic() < deadline and live.is_alive(), (tmp_path / "live.log").read_text()
            time.sleep(0.05)
        time.sleep(0.2)

        def no_second_writer(self, job, cmd):
            raise AssertionError(f"a second ablation started {job.folder}")
        monkeypatch.setattr(ablate.Runner, "_spawn", no_second_writer)
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"pid {live.pid}" in err and "is in use" in err and len(err.strip().splitlines()) == 1, err
    finally:
        os.kill(live.pid, signal.SIGKILL)
        live.join(30)


def test_a_file_system_without_locks_is_said_not_a_traceback(tmp_path, monkeypatch):
    """flock answering ENOSYS (Lustre without -o flock, some FUSE mounts): the lock is skipped and
    marked, and a live holder on a normal file system is still named."""
    import errno
    import fcntl

    from grpo_harness.folder_lock import FolderLock

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = FolderLock(tmp_path)
    lock.acquire()
    assert lock.unsupported and not lock.held


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    """A child forked while the lock is held (a reward's multiprocessing pool) closes its copy of
    the descriptor: once the parent releases, the folder is free although the child lives on."""
    import os
    import time

    from grpo_harness.folder_lock import FolderLock

    lock = FolderLock(tmp_path)
    lock.acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its fork hooks have run when fork returns here): outlive the release
        os.write(w, b"x")
        time.sleep(3)
        os._exit(0)
    try:
        os.read(r, 1)
        lock.release()
        other = FolderLock(tmp_path)
        other.acquire()  # would raise FolderBusy while the child held a copy
        assert other.held
        other.release()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
