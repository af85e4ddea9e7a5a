"""``grpo-harness train cartpole``: outputs, config resolution, bad input, checkpoint/resume.

Every run uses tiny settings (2 groups of 4 episodes, 2 epochs, 16 hidden units, 5 evaluation
episodes), so each takes about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_harness.cli import main
from grpo_harness.train import CARTPOLE_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "group_size=4", "--set", "groups_per_iteration=2", "--set", "grpo_epochs=2",
        "--hidden", "16", "--eval-episodes", "5"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train(out: Path, *extra: str) -> int:
    return main(["train", "cartpole", "--out", str(out), *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_wall_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def load_ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_usage_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("grpo-harness train: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


# --- outputs -------------------------------------------------------------------------------------

def test_outputs_are_written_and_parse(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "3", "--eval-every", "2", *TINY) == 0
    captured = capsys.readouterr()

    records = metrics(out)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(steps) and steps[0] > 0
    assert steps[-1] == sum(r["iteration_env_steps"] for r in records)  # cumulative
    for r in records:
        for key in ("loss", "policy_loss", "kl", "entropy", "grad_norm", "mean_return", "wall_time"):
            assert isinstance(r[key], (int, float)), key
    # eval every 2 iterations (after iteration index 1) and at the end (index 2)
    assert ["eval_mean" in r for r in records] == [False, True, True]
    assert all(r["eval_std"] >= 0 for r in records if "eval_mean" in r)

    config = json.loads((out / "config.json").read_text())
    assert config["grpo"]["group_size"] == 4 and config["grpo"]["grpo_epochs"] == 2
    assert config["grpo"]["lr"] == CARTPOLE_DEFAULTS["grpo"]["lr"]
    assert config["train"] == {**CARTPOLE_DEFAULTS["train"], "max_iterations": 3, "eval_every": 2,
                               "eval_episodes": 5, "hidden": 16}

    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())

    ckpt = load_ckpt(out)
    assert ckpt["trainer"]["iteration"] == 3
    assert ckpt["progress"]["env_steps"] == steps[-1]
    assert ckpt["progress"]["eval_index"] == 1  # the final-only evaluation does not consume a round
    assert set(ckpt["rng"]) == {"torch", "numpy", "python"}

    assert str(out / "curve.png") in captured.out and str(out / "metrics.jsonl") in captured.out
    assert "not solved" in captured.out
    # stderr is not a terminal here: plain log lines, one per evaluation
    assert sum(line.startswith("it ") for line in captured.err.splitlines()) == 2


def test_config_precedence_defaults_file_set_seed(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('group_size = 4\ngroups_per_iteration = 2\ngrpo_epochs = 3\nlr = 0.01\n'
                   'kl_estimator = "k2"\n')
    out = tmp_path / "run"
    rc = train(out, "--config", str(cfg), "--set", "lr=0.02", "--set", "kl_estimator=k1",
               "--set", "beta=0", "--seed", "7", "--max-iterations", "1", "--hidden", "16",
               "--eval-episodes", "5")
    assert rc == 0, capsys.readouterr().err
    grpo = json.loads((out / "config.json").read_text())["grpo"]
    assert grpo["grpo_epochs"] == 3  # file
    assert grpo["lr"] == 0.02 and grpo["kl_estimator"] == "k1"  # --set over the file
    assert grpo["beta"] == 0.0 and isinstance(grpo["beta"], float)
    assert grpo["seed"] == 7
    assert grpo["gamma"] == CARTPOLE_DEFAULTS["grpo"]["gamma"]  # CartPole default
    assert "kl" not in metrics(out)[0]  # beta = 0: no KL term


def test_sectioned_json_config_round_trips(tmp_path, capsys):
    """config.json of one run is a valid --config for the next."""
    first = tmp_path / "a"
    assert train(first, "--max-iterations", "1", "--seed", "3", *TINY) == 0
    second = tmp_path / "b"
    assert train(second, "--config", str(first / "config.json")) == 0
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    assert without_wall_time(metrics(first)) == without_wall_time(metrics(second))


def test_subprocess_entry_point(tmp_path):
    out = tmp_path / "sub"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_harness.cli", "train", "cartpole", "--out", str(out),
         "--max-iterations", "2", "--eval-every", "1", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(metrics(out)) == 2
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert f"metrics:     {out / 'metrics.jsonl'}" in proc.stdout


# --- bad input -------------------------------------------------------------------------------------

def test_unknown_key_names_the_closest(tmp_path, capsys):
    rc = train(tmp_path / "r", "--set", "group_sise=4")
    assert_usage_error(capsys, rc, "group_sise", "did you mean 'group_size'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["missing-file", "bad-toml", "bad-json", "invalid-value",
                                  "bad-choice", "no-equals", "train-option-via-set",
                                  "bad-flag-value", "unknown-key-in-file"])
def test_bad_input_exits_2_without_traceback(tmp_path, capsys, case):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("group_size = = 3\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{group_size: 3")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("lr = 0.01\nlearning_rat = 0.1\n")
    args, needles = {
        "missing-file": (["--config", str(tmp_path / "nope.toml")], ["does not exist"]),
        "bad-toml": (["--config", str(bad_toml)], ["not valid TOML"]),
        "bad-json": (["--config", str(bad_json)], ["not valid JSON"]),
        "invalid-value": (["--set", "beta=-1"], ["beta"]),
        "bad-choice": (["--set", "kl_estimator=k9"], ["kl_estimator", "k3"]),
        "no-equals": (["--set", "beta"], ["KEY=VALUE"]),
        "train-option-via-set": (["--set", "hidden=32"], ["--hidden"]),
        "bad-flag-value": (["--eval-episodes", "0"], ["eval-episodes"]),
        "unknown-key-in-file": (["--config", str(unknown)], ["learning_rat"]),
    }[case]
    rc = train(tmp_path / "r", *args)
    assert_usage_error(capsys, rc, *needles)


def test_refuses_to_overwrite_an_existing_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert train(out, "--max-iterations", "1", *TINY) == 0
    capsys.readouterr()
    assert_usage_error(capsys, train(out, "--max-iterations", "1", *TINY), "--resume")


# --- checkpoint and resume -------------------------------------------------------------------------

RESUME_ARGS = [*TINY, "--eval-every", "1", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train(out, "--max-iterations", "4", *RESUME_ARGS) == 0
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert without_wall_time(metrics(a)) == without_wall_time(metrics(b))
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["trainer"]["iteration"] == cb["trainer"]["iteration"]
    assert_same_tensors(ca["trainer"]["policy"], cb["trainer"]["policy"])
    assert_same_tensors(ca["trainer"]["reference"], cb["trainer"]["reference"])
    for sa, sb in zip(ca["trainer"]["optimizer"]["state"].values(), cb["trainer"]["optimizer"]["state"].values()):
        assert_same_tensors(sa, sb)
    for key in ("env_steps", "eval_index", "best_eval", "solved"):
        assert ca["progress"][key] == cb["progress"][key], key


def test_resume_matches_an_uninterrupted_run(straight_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert train(out, "--max-iterations", "2", *RESUME_ARGS) == 0
    first_lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(first_lines) == 2
    # no --set needed on resume: the saved config is used; the budget may grow
    assert train(out, "--resume", "--max-iterations", "4") == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first_lines  # appended, earlier lines kept
    assert_same_run(straight_run, out)
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "resuming at iteration 2" in capsys.readouterr().err


def test_resume_after_a_crash_past_the_checkpoint(straight_run, tmp_path, capsys):
    """A run killed after its last checkpoint left metrics lines the resumed run regenerates."""
    out = tmp_path / "crashed"
    assert train(out, "--max-iterations", "2", *RESUME_ARGS) == 0
    ckpt_at_2 = (out / "checkpoint.pt").read_bytes()
    assert train(out, "--resume", "--max-iterations", "4") == 0
    (out / "checkpoint.pt").write_bytes(ckpt_at_2)  # as if it died before checkpointing 3 and 4
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "torn')  # and in the middle of a line
    assert train(out, "--resume", "--max-iterations", "4") == 0
    assert "dropped 3 metrics line(s)" in capsys.readouterr().err
    assert_same_run(straight_run, out)


def test_ctrl_c_saves_a_consistent_checkpoint(straight_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of iteration 2's updates: exit 130, curve and checkpoint written,
    and the checkpoint holds the state after iteration 1 (not the half-updated policy)."""
    from grpo_core.loop import GRPOTrainer

    original = GRPOTrainer._minibatch_step

    def interrupted(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)  # the optimizer has stepped once
        if self.iteration == 2:
            raise KeyboardInterrupt
        return stats

    out = tmp_path / "ctrl-c"
    with monkeypatch.context() as m:
        m.setattr(GRPOTrainer, "_minibatch_step", interrupted)
        assert train(out, "--max-iterations", "4", *RESUME_ARGS) == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.out and "--resume" in captured.out
    assert len(metrics(out)) == 2
    assert load_ckpt(out)["trainer"]["iteration"] == 2
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE

    assert train(out, "--resume") == 0  # the saved budget (4 iterations) applies
    assert_same_run(straight_run, out)


def test_resume_refusals(straight_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(straight_run, out)
    rc = train(out, "--resume", "--set", "lr=0.5")
    assert_usage_error(capsys, rc, "disagree", "lr")
    rc = train(out, "--resume", "--seed", "9")
    assert_usage_error(capsys, rc, "seed")
    rc = train(out, "--resume", "--hidden", "32")
    assert_usage_error(capsys, rc, "hidden")
    rc = train(out, "--resume", "--set", "group_sise=4")
    assert_usage_error(capsys, rc, "group_size")
    # restating the saved values is fine (nothing runs: the saved budget is spent)
    assert train(out, "--resume", "--set", "group_size=4", "--seed", "0") == 0
    assert len(metrics(out)) == 4
    capsys.readouterr()
    rc = train(tmp_path / "empty", "--resume")
    assert_usage_error(capsys, rc, "no checkpoint")
    rc = main(["train", "cartpole", "--resume"])
    assert_usage_error(capsys, rc, "--out")
