"""The run module (grpo_harness.run), driven through ``train cartpole`` (the cheapest command):
signals, crashes, checkpoint cadence and corruption, run fingerprints, TensorBoard on resume,
file modes, and the one-line errors every command shares. VLM-only behaviour is in
tests/test_run_vlm.py.

Signals are sent by the process to itself from inside a patched optimizer step (the run's
handlers are installed in the main thread, where pytest runs the test), so each case is exact
and takes about a second; two subprocess cases send them from outside, as a scheduler would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_harness import run as run_module
from grpo_harness.cli import main

from .test_train_cli import (RESUME_ARGS, ROOT, TINY, assert_same_run, assert_usage_error, load_ckpt,
                             metrics, train)
from .test_train_cli import straight_run  # noqa: F401  (fixture: 4 iterations, checkpoint every 1)

PNG = b"\x89PNG\r\n\x1a\n"


def send_at(monkeypatch, iteration: int, *signums: int, raise_instead: BaseException | None = None):
    """Patch the loop so that, in the middle of ``iteration``'s updates (after one optimizer
    step), the process sends itself ``signums`` (or raises ``raise_instead``)."""
    from grpo_core.loop import GRPOTrainer

    original = GRPOTrainer._minibatch_step

    def step(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if self.iteration == iteration and not getattr(self, "_sent", False):
            self._sent = True
            if raise_instead is not None:
                raise raise_instead
            for signum in signums:
                os.kill(os.getpid(), signum)
        return stats

    monkeypatch.setattr(GRPOTrainer, "_minibatch_step", step)


# --- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_last_completed_iteration_and_resumes(straight_run, tmp_path, capsys,
                                                                   monkeypatch, signum, code):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 2, signum)
        assert train(out, "--max-iterations", "4", *RESUME_ARGS) == code
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert f"stopped: interrupted ({name})" in cap.out
    assert f"resume with: grpo-harness train cartpole --out {out} --resume" in cap.out
    assert len(metrics(out)) == 2 and load_ckpt(out)["trainer"]["iteration"] == 2
    assert (out / "curve.png").read_bytes()[:8] == PNG
    assert train(out, "--resume") == 0
    assert_same_run(straight_run, out)


def test_three_quick_signals_print_no_traceback_and_keep_the_summary(straight_run, tmp_path, capsys, monkeypatch):
    """The first Ctrl-C stops the run; the next two arrive while it saves and change nothing."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 2, signal.SIGINT, signal.SIGINT, signal.SIGINT)
        assert train(out, "--max-iterations", "4", *RESUME_ARGS) == 130
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "KeyboardInterrupt" not in cap.err
    assert "stopped: interrupted (Ctrl-C)" in cap.out and "resume with" in cap.out
    assert load_ckpt(out)["trainer"]["iteration"] == 2


def test_signals_during_the_final_save_are_noted_not_raised(tmp_path, capsys, monkeypatch):
    """SIGTERM stops the run; a Ctrl-C and another SIGTERM arrive while the checkpoint is
    being written: noted once, the save completes, the exit status is the first signal's."""
    real_save = run_module.CheckpointStore.save

    def save(self, state):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, state)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 1, signal.SIGTERM)
        m.setattr(run_module.CheckpointStore, "save", save)
        rc = train(out, "--max-iterations", "3", "--checkpoint-every", "0", *TINY)
    cap = capsys.readouterr()
    assert rc == 143, cap.err
    assert cap.err.count("received while saving") == 1 and "Traceback" not in cap.err
    assert load_ckpt(out)["trainer"]["iteration"] == 1 and "stopped: interrupted (SIGTERM)" in cap.out


def test_big_state_finishes_the_iteration_then_saves(straight_run, tmp_path, capsys, monkeypatch):
    """A state too large to copy every iteration: the first signal lets the iteration finish
    (its metrics line included) and saves it."""
    monkeypatch.setattr(run_module, "SNAPSHOT_LIMIT_BYTES", 0)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 2, signal.SIGTERM)
        assert train(out, "--max-iterations", "4", *RESUME_ARGS) == 143
    cap = capsys.readouterr()
    assert "finishing this iteration" in cap.err
    assert len(metrics(out)) == 3 and load_ckpt(out)["trainer"]["iteration"] == 3
    assert train(out, "--resume") == 0
    assert_same_run(straight_run, out)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait_for_lines(proc, path: Path, n: int) -> None:
    while proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    pytest.fail(f"the run ended before writing {n} metrics lines: {proc.communicate()}")


@pytest.mark.slow
def test_sigterm_from_outside(tmp_path):
    """What a scheduler does: SIGTERM at some moment of a real process; exit 143, the
    checkpoint matches the metrics lines, the resumed run completes the budget."""
    out = tmp_path / "run"
    slow = [*TINY, "--eval-every", "1", "--eval-episodes", "20", "--checkpoint-every", "100"]
    cmd = [sys.executable, "-m", "grpo_harness.cli", "train", "cartpole", "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--max-iterations", "40", *slow], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_lines(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "resume with:" in stdout
    done = len(metrics(out))
    assert load_ckpt(out)["trainer"]["iteration"] == done
    assert (out / "curve.png").read_bytes()[:8] == PNG
    assert train(out, "--resume", "--max-iterations", str(done + 1)) == 0
    assert [r["iteration"] for r in metrics(out)] == list(range(done + 1))


# --- an exception mid-training -------------------------------------------------------------------

def test_an_exception_leaves_a_checkpoint_of_the_last_completed_iteration(straight_run, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 2, raise_instead=RuntimeError("disk on fire"))
        with pytest.raises(RuntimeError, match="disk on fire"):  # a bug: its traceback is shown
            train(out, "--max-iterations", "4", *TINY, "--eval-every", "1", "--checkpoint-every", "100")
    cap = capsys.readouterr()
    assert "stopped: crashed: RuntimeError" in cap.out and "resume with" in cap.out
    assert len(metrics(out)) == 2 and load_ckpt(out)["trainer"]["iteration"] == 2
    assert train(out, "--resume") == 0
    assert_same_run(straight_run, out)


def test_an_exception_in_the_first_iteration_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 0, raise_instead=RuntimeError("boom"))
        with pytest.raises(RuntimeError):
            train(out, "--max-iterations", "4", *TINY)
    assert not out.exists()


# --- checkpoint cadence --------------------------------------------------------------------------

@pytest.mark.parametrize("minutes,saves", [("1e-9", 3), ("0", 1), ("60", 1)])
def test_checkpoint_by_time(tmp_path, monkeypatch, minutes, saves):
    """--checkpoint-every 0: only the clock (and the end) triggers a save. 1e-9 minutes has
    always passed after an iteration, so iterations 1, 2, 3 are saved (the final save of
    iteration 3 is then skipped as already written); 0 (off) and 60 leave only the final one."""
    calls = []
    real_save = run_module.CheckpointStore.save
    monkeypatch.setattr(run_module.CheckpointStore, "save",
                        lambda self, state: calls.append(state["trainer"]["iteration"]) or real_save(self, state))
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "3", *TINY, "--checkpoint-every", "0",
                 "--checkpoint-minutes", minutes) == 0
    assert len(calls) == saves and calls[-1] == 3


# --- corruption ----------------------------------------------------------------------------------

def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "random": os.urandom(len(data))}[how])


@pytest.mark.parametrize("how,reason", [("truncated", "truncated"), ("empty", "empty file"),
                                        ("random", "no zip directory")])
def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(straight_run, tmp_path, capsys, how, reason):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)  # checkpoint.pt after iteration 3, checkpoint.prev.pt after 2
    assert load_ckpt(out)["trainer"]["iteration"] == 4
    _corrupt(out / "checkpoint.pt", how)
    assert train(out, "--resume") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "checkpoint.pt" in line]
    assert len(lines) == 1 and reason in lines[0] and "checkpoint.prev.pt" in lines[0], err
    assert "Traceback" not in err and "weights_only" not in err
    assert (out / "checkpoint.pt.corrupt").exists()
    assert_same_run(straight_run, out)  # iteration 3 was re-run from the previous checkpoint


def test_both_checkpoints_corrupt_is_one_line(straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    _corrupt(out / "checkpoint.pt", "truncated")
    _corrupt(out / "checkpoint.prev.pt", "empty")
    assert_usage_error(capsys, train(out, "--resume"), "checkpoint.prev.pt", "empty file")


def test_a_save_interrupted_between_its_two_renames(straight_run, tmp_path, capsys):
    """A kill after checkpoint.pt became checkpoint.prev.pt and before the new file took its
    place leaves only the previous one: it is used."""
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    os.replace(out / "checkpoint.pt", out / "checkpoint.prev.pt")
    assert train(out, "--resume") == 0
    assert "checkpoint.pt is missing" in capsys.readouterr().err
    assert_same_run(straight_run, out)


# --- a checkpoint from another run ----------------------------------------------------------------

def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, "--max-iterations", "2", *TINY) == 0
    assert train(b, "--max-iterations", "3", *TINY, "--seed", "5", "--hidden", "8") == 0
    config_before = (a / "config.json").read_text()
    shutil.copy(b / "checkpoint.pt", a / "checkpoint.pt")
    capsys.readouterr()
    err = assert_usage_error(capsys, train(a, "--resume", "--max-iterations", "6"), "belongs to another run",
                             "config.seed (checkpoint 5, this run 0)", "train.hidden (checkpoint 8, this run 16)")
    assert len(err.strip().splitlines()) == 1
    assert (a / "config.json").read_text() == config_before  # not overwritten
    assert len(metrics(a)) == 2


def test_a_config_field_added_since_the_checkpoint_is_no_difference_at_its_default():
    """A checkpoint written before a GRPOConfig field existed resumes when this run has the
    field at its default (what the older code did); at another value, or for a key that is not
    a GRPOConfig field, the difference is named."""
    from grpo_harness.run import fingerprint_diff

    run = {"config": {"seed": 0, "dynamic_sampling_redraw": "fresh"}, "train": {"hidden": 16}}
    old = {"config": {"seed": 0}, "train": {"hidden": 16}}
    assert fingerprint_diff(old, run) == []
    run["config"]["dynamic_sampling_redraw"] = "retry"
    assert fingerprint_diff(old, run) == ["config.dynamic_sampling_redraw (checkpoint '(absent)', this run 'retry')"]
    assert fingerprint_diff({"config": {"seed": 0}, "train": {}}, {"config": {"seed": 0}, "train": {"hidden": 16}}) \
        == ["train.hidden (checkpoint '(absent)', this run 16)"]


# --- TensorBoard after kill and resume ------------------------------------------------------------

def tb_steps(folder: Path, tag: str = "train/loss") -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _killed_and_resumed(tmp_path, monkeypatch, purge_shift: int = 0) -> Path:
    """SIGTERM in iteration 3 of 6 (checkpoints every 2), resume; ``purge_shift`` -1
    reproduces the old purge step (the checkpoint's own step instead of the one after it)."""
    from grpo_harness import trainlog

    if purge_shift:
        real = trainlog.MetricsLog.__init__

        def init(self, out, *, purge_step=None, **kw):
            real(self, out, purge_step=None if purge_step is None else purge_step + purge_shift, **kw)
        monkeypatch.setattr(trainlog.MetricsLog, "__init__", init)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_at(m, 3, signal.SIGTERM)
        assert train(out, "--max-iterations", "6", *TINY, "--checkpoint-every", "2") == 143
    assert train(out, "--resume") == 0
    return out


def test_every_iteration_is_in_tensorboard_exactly_once_after_kill_and_resume(tmp_path, monkeypatch):
    out = _killed_and_resumed(tmp_path, monkeypatch)
    steps = tb_steps(out / "tb")
    assert steps == [r["env_steps"] for r in metrics(out)]
    assert len(steps) == 6 and len(set(steps)) == 6


def test_the_tensorboard_check_rejects_the_old_purge_step(tmp_path, monkeypatch):
    """The old code purged from the checkpoint's own step: the last point before the resume
    was dropped and not written again."""
    out = _killed_and_resumed(tmp_path, monkeypatch, purge_shift=-1)
    assert len(tb_steps(out / "tb")) == 5


# --- files and numbering ---------------------------------------------------------------------------

def test_files_respect_the_umask(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert train(out, "--max-iterations", "1", *TINY) == 0
    finally:
        os.umask(old)
    for name in ("config.json", "checkpoint.pt", "curve.png", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


def test_iterations_are_numbered_alike_in_every_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "3", *TINY, "--eval-every", "1") == 0
    cap = capsys.readouterr()
    assert [line.split("|")[0].split()[1] for line in cap.err.splitlines() if line.startswith("it ")] == \
        ["0", "1", "2"]
    assert "3 iteration(s) done (iterations 0-2)" in cap.out
    assert "(after iteration 2; resumes at iteration 3)" in cap.out
    assert train(out, "--resume", "--max-iterations", "4") == 0
    cap = capsys.readouterr()
    assert "resuming at iteration 3" in cap.err and "iterations 0-3" in cap.out
    assert [r["iteration"] for r in metrics(out)] == [0, 1, 2, 3]


# --- one line and exit 2 for a user's mistake ----------------------------------------------------

def test_bad_run_inputs_are_one_line_and_leave_no_folder(tmp_path, capsys):
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b"lr = 0.01 # caf\xe9\n")
    inf_toml = tmp_path / "inf.toml"
    inf_toml.write_text("lr = inf\n")
    nan_json = tmp_path / "nan.json"
    nan_json.write_text('{"beta": NaN}')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--config", str(not_utf8)], ["latin1.toml", "not UTF-8", "0xe9"]),
        (["--set", "lr=Infinity"], ["lr", "finite"]),
        (["--set", "beta=NaN"], ["beta", "finite"]),
        (["--set", "clip_eps_high=-Infinity"], ["clip_eps_high", "finite"]),
        (["--config", str(inf_toml)], ["lr=inf", "finite"]),
        (["--config", str(nan_json)], ["beta=nan", "finite"]),
        (["--checkpoint-minutes", "-1"], ["checkpoint-minutes"]),
        (["--threads", "0"], ["--threads"]),
    ]
    for args, needles in cases:
        out = tmp_path / "new" / "run"
        err = assert_usage_error(capsys, train(out, "--max-iterations", "1", *args), *needles)
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "new").exists(), args
    for out, needle in ((a_file, "is a file"), (a_file / "sub" / "run", "lies under")):
        err = assert_usage_error(capsys, train(out, "--max-iterations", "1"), str(a_file), needle)
        assert len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "x"


def test_non_finite_checkpoint_minutes_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "cartpole", "--out", str(tmp_path / "r"), "--checkpoint-minutes", "nan"])
    assert e.value.code == 2 and "not a finite number" in capsys.readouterr().err


def test_resume_without_config_json_is_one_line(straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    (out / "config.json").unlink()
    err = assert_usage_error(capsys, train(out, "--resume"), "config.json is missing")
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight_run.iterdir()
                                                           if p.name != "config.json")


def test_an_existing_empty_out_folder_is_kept_but_emptied_on_failure(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with monkeypatch.context() as m:
        send_at(m, 0, raise_instead=RuntimeError("boom"))
        with pytest.raises(RuntimeError):
            train(out, "--max-iterations", "2", *TINY)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_cpu_copy_of_a_trainer_state_on_an_accelerator(tmp_path):
    """The snapshot held through a run lives in CPU memory, whatever device the trainer is on
    (a tensor that reports a CUDA device stands in for one on this CPU-only machine); the old
    ``copy.deepcopy(trainer.state_dict())`` kept it on the device."""
    import copy

    from .fake_device import OnDevice

    class Trainer:
        policy = torch.nn.Linear(2, 2)

        def state_dict(self):
            return {"policy": {"w": OnDevice(torch.ones(2))}, "reference": None,
                    "optimizer": {"state": {0: {"exp_avg": OnDevice(torch.zeros(3))}}, "param_groups": [{"lr": 1.0}]},
                    "iteration": 3}

    def devices(tree):
        if isinstance(tree, torch.Tensor):
            return {tree.device.type}
        if isinstance(tree, dict):
            return set().union(*map(devices, tree.values())) if tree else set()
        return set()

    state = Trainer().state_dict()
    assert devices(state) == {"cuda"}
    assert devices(run_module.trainer_state(Trainer())) == {"cpu"}
    assert devices(copy.deepcopy(state)) == {"cuda"}  # the old snapshot: rejected by the line above
    got = run_module.trainer_state(Trainer())["optimizer"]["param_groups"]
    assert got == [{"lr": 1.0}]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, capsys):
    """SIGKILL before the first save leaves config.json, metrics lines, TensorBoard events and
    a half-written temporary file: --resume starts over with the saved settings, and the run
    ends as an uninterrupted one (each TensorBoard point once)."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert train(straight, "--max-iterations", "3", *TINY) == 0
    assert train(out, "--max-iterations", "3", *TINY) == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "curve.png"):
        (out / name).unlink(missing_ok=True)
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert train(out, "--resume") == 0
    assert "starting it again from iteration 0" in capsys.readouterr().err
    assert not (out / ".checkpoint.pt.x1y2.tmp").exists()
    assert_same_run(straight, out)
    assert tb_steps(out / "tb") == [r["env_steps"] for r in metrics(out)]


def test_global_random_streams_are_seeded_per_run(tmp_path):
    """A user's reward code drawing from random / numpy / torch repeats across processes: the
    streams are seeded from the run's seed (and carried on by the checkpoints)."""
    import random

    import numpy as np

    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, "--max-iterations", "1", *TINY) == 0
    random.random(), np.random.rand(), torch.rand(1)  # noqa: B018 - what other code would consume
    assert train(b, "--max-iterations", "1", *TINY) == 0
    ra, rb = load_ckpt(a)["rng"], load_ckpt(b)["rng"]
    assert torch.equal(ra["torch"], rb["torch"]) and torch.equal(ra["numpy"]["key"], rb["numpy"]["key"])
    assert ra["python"] == rb["python"]


def test_an_error_before_the_first_iteration_still_closes_the_metrics_log(tmp_path, monkeypatch):
    """The step that sizes the snapshots runs a collective under torchrun (a lost peer raises
    there); the metrics log and its trackers are closed before the error goes on."""
    from grpo_harness import trackers

    logs, real_open = [], trackers.open_metrics_log

    def open_and_watch(*args, **kwargs):
        log = real_open(*args, **kwargs)
        real_close = log.close
        log.close = lambda: logs.append("closed") or real_close()
        logs.append("opened")
        return log

    def lost_peer(self):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(trackers, "open_metrics_log", open_and_watch)
    monkeypatch.setattr(run_module.TrainingRun, "_size_snapshots", lost_peer)
    with pytest.raises(RuntimeError, match="closed by peer"):
        train(tmp_path / "run", "--max-iterations", "2", *TINY)
    assert logs == ["opened", "closed"]
