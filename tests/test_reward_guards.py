"""User reward code runs inside the trainer: it may hang, call ``sys.exit``, change its inputs or
return a number too large for float32. Each is one line naming the function (exit 2 in ``train
vlm``), after a checkpoint of what was done; none hangs the run, reads as success or leaks into
another function or ``completions.jsonl``."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

pytest.importorskip("transformers")

from adapters import vlm_rewards  # noqa: E402
from adapters.vlm_rewards import compute_rewards  # noqa: E402
from grpo_harness.train_vlm import main  # noqa: E402

from .test_run_vlm import data, data_args, one_error_line  # noqa: E402,F401  (fixtures)
from .test_vlm import _one_thread, _quiet_transformers, tiny_dirs  # noqa: E402,F401  (fixtures)

GUARDED = '''
import sys
import time
calls = 0

def exits(prompts, completions, **kw):
    sys.exit(0)

def hangs(prompts, completions, **kw):
    while True:
        time.sleep(0.05)

def second_call_hangs(prompts, completions, **kw):
    global calls
    calls += 1
    while calls == 2:
        time.sleep(0.05)
    return [float(c.startswith("red")) for c in completions]

def slow(prompts, completions, **kw):
    time.sleep(0.6)
    return [1.0] * len(completions)

def huge(prompts, completions, **kw):
    return [1e300] + [0.0] * (len(completions) - 1)

def clears(prompts, completions, **kw):
    out = [1.0] * len(completions)
    completions.clear()
    return out

def overwrites(prompts, completions, **kw):
    for i in range(len(completions)):
        completions[i] = "XXX"
    return [0.0] * len(completions)

def reads(prompts, completions, **kw):
    assert "XXX" not in completions and len(completions) == len(prompts), completions
    return [float(c.startswith("red")) for c in completions]
'''


@pytest.fixture
def guarded(data):
    (data / "guarded.py").write_text(GUARDED)
    return data


def guarded_args(tiny_dirs, data, *rewards, extra=()):
    args = data_args(tiny_dirs, data, "reads", *extra)
    i = args.index("--reward")
    del args[i:i + 2]
    for name in rewards:
        args[i:i] = ["--reward", f"{data / 'guarded.py'}:{name}"]
    return args


# --- unit: compute_rewards ------------------------------------------------------------------------

def _call(*funcs, completions=None):
    completions = list(completions or ["red", "blue", "red", "green"])
    prompts = [[{"role": "user", "content": [{"type": "text", "text": "colour?"}]}]] * len(completions)
    return compute_rewards(list(funcs), None, prompts=prompts, completions=completions,
                           columns={"answer": ["red"] * len(completions)}, group_size=2), completions, prompts


def test_a_function_that_changes_its_inputs_does_not_change_the_next_ones_or_the_callers():
    seen = []

    def clears(prompts, completions, answer, **kw):
        out = [1.0] * len(completions)
        completions.clear()
        answer.clear()
        prompts[0][0]["content"][0]["text"] = "changed"
        return out

    def overwrites(prompts, completions, **kw):
        completions[1] = "XXX"
        return [0.0] * len(completions)

    def reads(prompts, completions, answer, **kw):
        seen.append((list(completions), list(answer), prompts[0][0]["content"][0]["text"]))
        return [0.5] * len(completions)

    (total, per_fn), completions, prompts = _call(clears, overwrites, reads)
    assert seen == [(["red", "blue", "red", "green"], ["red"] * 4, "colour?")]
    assert completions == ["red", "blue", "red", "green"]
    assert prompts[0][0]["content"][0]["text"] == "colour?"
    assert total == [1.5] * 4 and list(per_fn) == ["clears", "overwrites", "reads"]


def test_sys_exit_in_a_reward_is_an_error_naming_it():
    import sys

    def leaves(prompts, completions, **kw):
        sys.exit(0)

    with pytest.raises(ValueError, match=r"reward function 'leaves' called sys\.exit\(0\)"):
        _call(leaves)


@pytest.mark.parametrize("value", [1e300, -1e39, 3.5e38])
def test_a_reward_too_large_for_float32_is_named_like_a_nan(value):
    def big(prompts, completions, **kw):
        return [0.0, 0.0, value, 0.0]

    with pytest.raises(ValueError, match=r"reward function 'big' returned .* for sample 2 \(group 1, "
                                         r"completion 0\).*float32"):
        _call(big)


def test_weights_that_overflow_float32_are_named():
    def fine(prompts, completions, **kw):
        return [3e38] * len(completions)

    with pytest.raises(ValueError, match="float32"):
        compute_rewards([fine, fine], [1.0, 1.0], prompts=["q"] * 2, completions=["a", "b"], columns={},
                        group_size=2)


def test_a_reward_that_does_not_return_is_stopped_naming_it(capsys):
    def never(prompts, completions, **kw):
        while True:
            time.sleep(0.01)

    with vlm_rewards.limits(timeout=0.5, slow_after=0.2, say=print):
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"reward function 'never' did not return within 0\.5 s .*4 "
                                             r"completions"):
            _call(never)
        assert time.monotonic() - start < 5
    out = capsys.readouterr().out
    assert "reward function 'never' is still running" in out, out
    _call(lambda prompts, completions, **kw: [0.0] * len(completions))  # no timer left behind


# --- end to end: train vlm ------------------------------------------------------------------------

def test_train_vlm_reward_timeout_checkpoints_and_names_the_function(tiny_dirs, guarded, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*guarded_args(tiny_dirs, guarded, "second_call_hangs", extra=["--skip-preflight"]),
               "--reward-timeout", "1", "--out", str(out)])
    line = one_error_line(capsys, rc, "iteration 1", "'second_call_hangs' did not return within 1 s",
                          "--reward-timeout")
    assert "8 completions" in line or "4 completions" in line, line
    assert [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 1


def test_train_vlm_hanging_reward_in_the_preflight_is_named(tiny_dirs, guarded, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*guarded_args(tiny_dirs, guarded, "hangs"), "--reward-timeout", "1", "--out", str(out)])
    one_error_line(capsys, rc, "preflight", "'hangs' did not return within 1 s")
    assert not out.exists()


def test_train_vlm_says_which_reward_is_slow(tiny_dirs, guarded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vlm_rewards, "SLOW_AFTER_S", 0.2)
    out = tmp_path / "run"
    rc = main([*guarded_args(tiny_dirs, guarded, "slow", extra=["--skip-preflight"]), "--max-iterations", "1",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "reward function 'slow' is still running" in err, err


def test_train_vlm_reward_calling_sys_exit_is_exit_2_naming_it(tiny_dirs, guarded, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*guarded_args(tiny_dirs, guarded, "exits"), "--out", str(out)])
    one_error_line(capsys, rc, "preflight", "'exits' called sys.exit(0)")
    assert not out.exists()


def test_train_vlm_huge_reward_with_skip_preflight_is_one_line(tiny_dirs, guarded, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*guarded_args(tiny_dirs, guarded, "huge", extra=["--skip-preflight"]), "--out", str(out)])
    one_error_line(capsys, rc, "iteration 0", "'huge' returned 1e+300 for sample 0", "float32")


def test_train_vlm_mutating_rewards_leave_the_logged_completions_alone(tiny_dirs, guarded, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*guarded_args(tiny_dirs, guarded, "clears", "overwrites", "reads", extra=["--skip-preflight"]),
               "--max-iterations", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    logged = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    texts = [c["text"] for g in logged for c in g["completions"]]
    assert texts and "XXX" not in texts, texts
    assert not math.isnan(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["reward_mean"])


def test_a_reward_with_its_own_alarm_is_named_and_an_outer_timer_survives():
    """A reward that uses signal.alarm for its own timeout takes the harness's clock away: the
    call is named (the limit could not apply) instead of silently running unbounded; and a timer
    armed around the block (by the caller) is armed again afterwards."""
    import signal

    from adapters.time_limit import time_limit
    from adapters.vlm_rewards import compute_rewards, limits

    def own_alarm(prompts, completions, **kw):
        old = signal.signal(signal.SIGALRM, lambda *a: None)
        signal.alarm(30)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        return [0.0] * len(completions)

    said = []
    with limits(timeout=60, say=said.append):
        compute_rewards([own_alarm], None, prompts=["p"] * 2, completions=["a", "b"], columns={}, group_size=2)
    assert len(said) == 1 and "'own_alarm' set its own SIGALRM timer" in said[0]

    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        with time_limit(5.0):
            pass
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 29.0 < left <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
