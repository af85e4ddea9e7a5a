"""``--report-to`` (grpo_harness/trackers.py): TRL's metric names in the trackers, TensorBoard by
default, none, wandb optional (one line when it is missing or does not start; the run id kept
across a resume; offline mode when wandb is installed). Runs are tiny CartPole ones (a second
each); the names are the shared code path of both train commands."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from grpo_harness.cli import main
from grpo_harness.trackers import WANDB_ID_FILE, parse_report_to, tracker_scalars, tracker_tag

TINY = ["--set", "group_size=4", "--set", "groups_per_iteration=2", "--set", "grpo_epochs=2", "--hidden", "16",
        "--eval-episodes", "5", "--threads", "1"]
TRL_TAGS = {  # what TRL's GRPOTrainer logs for the same quantities, written out by hand
    "reward_mean": "train/reward", "reward_std": "train/reward_std",
    "frac_reward_zero_std": "train/frac_reward_zero_std", "kl": "train/kl", "entropy": "train/entropy",
    "clip_frac_low": "train/clip_ratio/low_mean", "clip_frac_high": "train/clip_ratio/high_mean",
    "completion_len_mean": "train/completions/mean_length", "truncated_frac": "train/completions/clipped_ratio",
    "lr": "train/learning_rate", "loss": "train/loss", "grad_norm": "train/grad_norm",
    "reward/first_word_reward": "train/rewards/first_word_reward/mean", "eval_reward_mean": "eval/reward",
    # no TRL counterpart: the harness's own name, grouped as before
    "zero_signal_groups": "train/zero_signal_groups", "eval_mean": "eval/eval_mean",
    "clip_frac_dual": "train/clip_frac_dual",
}


def train(out: Path, *extra: str) -> int:
    return main(["train", "cartpole", "--out", str(out), *TINY, *extra])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tb_tags(folder: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Tags()["scalars"]


def test_report_to_values():
    assert parse_report_to("tensorboard") == ("tensorboard",)
    assert parse_report_to("wandb, tensorboard,wandb") == ("wandb", "tensorboard")
    assert parse_report_to("none") == ()
    assert parse_report_to("all") == ("tensorboard", "wandb")
    for bad in ("mlflow", "", "none,wandb", "tensorboard,all"):
        with pytest.raises(argparse.ArgumentTypeError, match="tensorboard, wandb, none, all|stand alone"):
            parse_report_to(bad)


def test_tracker_names_are_trls():
    assert {k: tracker_tag(k) for k in TRL_TAGS} == TRL_TAGS
    assert tracker_scalars({"iteration": 3, "reward_mean": 0.5, "note": "x", "done": True}, "iteration") == \
        {"train/reward": 0.5}


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl (bench extra) is not installed")
def test_the_trl_names_are_in_trls_source():
    """Independent of the table above: every TRL name used is one TRL's GRPOTrainer logs."""
    source = Path(importlib.util.find_spec("trl.trainer.grpo_trainer").origin).read_text()
    for key, tag in TRL_TAGS.items():
        name = tag.split("/", 1)[1]
        if name == key or key in ("zero_signal_groups", "eval_mean", "clip_frac_dual"):
            continue  # the harness's own names
        if name.startswith("rewards/"):
            assert 'f"rewards/{reward_func_name}/mean"' in source
        elif name == "learning_rate" or key == "eval_reward_mean":
            continue  # written by transformers' Trainer (learning_rate) / its eval_ prefix
        else:
            assert f'["{name}"]' in source, name


def test_tensorboard_by_default_and_none(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "2") == 0
    tags = tb_tags(out / "tb")
    assert {"train/clip_ratio/low_mean", "train/kl", "train/loss", "eval/eval_mean"} <= set(tags)
    assert "train/clip_frac_low" not in tags
    assert "tensorboard --logdir" in capsys.readouterr().out
    quiet = tmp_path / "quiet"
    assert train(quiet, "--max-iterations", "2", "--report-to", "none") == 0
    assert not (quiet / "tb").exists() and len(records(quiet)) == 2
    assert "tensorboard --logdir" not in capsys.readouterr().out


def test_an_unknown_tracker_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", "--report-to", "mlflow")
    assert e.value.code == 2
    assert "--report-to: 'mlflow': expected a comma-separated list" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def wandb_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "wandb" in line and "CartPole" not in line]  # not the path


def test_wandb_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "2", "--report-to", "wandb") == 0
    lines = wandb_lines(capsys.readouterr().err)
    assert lines == ["--report-to wandb: wandb is not installed (pip install wandb); going on without it "
                     "(metrics.jsonl has every metric)"]
    assert len(records(out)) == 2 and not (out / "tb").exists()


class FakeWandb(types.ModuleType):
    """Records what the harness asks of wandb."""

    def __init__(self, fail: Exception | None = None):
        super().__init__("wandb")
        self.fail, self.inits, self.logged, self.finished = fail, [], [], 0

    def init(self, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished += 1


def test_wandb_gets_trls_names_and_keeps_its_run_id_on_resume(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "2", "--report-to", "wandb,tensorboard") == 0
    first = records(out)
    assert fake.logged == [(r["env_steps"], tracker_scalars(r, "env_steps")) for r in first]
    assert "train/clip_ratio/low_mean" in fake.logged[0][1] and fake.finished == 1
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    init = fake.inits[0]
    assert (init["id"], init["name"], init["dir"], init["resume"]) == (run_id, "run", str(out), "allow")
    assert init["config"] == json.loads((out / "config.json").read_text())
    assert train(out, "--resume", "--max-iterations", "3", "--report-to", "wandb") == 0
    assert fake.inits[1]["id"] == run_id  # the same wandb run continues
    assert [s for s, _ in fake.logged] == [r["env_steps"] for r in records(out)]


def test_wandb_not_starting_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail=RuntimeError("api_key not configured (no-tty)")))
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "1", "--report-to", "wandb") == 0
    lines = wandb_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "wandb did not start (RuntimeError: api_key not configured" in lines[0]
    assert "WANDB_MODE=offline" in lines[0]


@pytest.mark.slow
def test_wandb_offline_writes_the_run_locally(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (optional): offline logging not exercised")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert train(out, "--max-iterations", "2", "--report-to", "wandb") == 0
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}")), list((out / "wandb").iterdir())
