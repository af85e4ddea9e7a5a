"""``ablate`` without silent surprises: a ``--vary`` value equal to the base's is said, a
variants file's ``train`` string is read as flags (not characters), a report built from failed
runs says so and gives no verdict, and Ctrl-C exits 130 with the runs that finished reported as
finished."""

from __future__ import annotations

import contextlib
import json

import pytest

from grpo_harness import ablate
from grpo_harness.cli import main
from grpo_harness.run import UsageError

from .test_ablate import args_for, fake_results


def test_a_vary_value_equal_to_the_base_is_said(capsys):
    spec = ablate.spec_from_args(args_for(vary=["gamma=0.99,1.0"]))  # CartPole's gamma is 0.99
    assert list(spec.variants) == ["base", "gamma=1.0"]
    err = capsys.readouterr().err
    assert "--vary gamma=0.99" in err and "base" in err, err
    with pytest.raises(UsageError, match=r"--vary gamma=0\.99: .*no variant"):
        ablate.spec_from_args(args_for(vary=["gamma=0.99"]))


def test_a_train_string_in_a_variants_file_is_read_as_flags(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('env = "cartpole"\ntrain = "--max-env-steps 500"\nseeds = "0"\n'
                 '[variants.e4]\nset = {grpo_epochs = 4}\ntrain = "--hidden 32"\n')
    spec = ablate.spec_from_args(args_for(variants=f, seeds=None))
    assert spec.train == ["--max-env-steps", "500"]
    assert spec.variants["e4"].train == ["--hidden", "32"]
    f.write_text('env = "cartpole"\ntrain = 500\nseeds = "0"\n')
    with pytest.raises(UsageError, match="train"):
        ablate.spec_from_args(args_for(variants=f, seeds=None))


def test_a_report_from_failed_runs_says_so_and_gives_no_verdict(tmp_path):
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                               "v": ablate.Variant("v", {"gamma": 0.9})}, seeds=list(range(6)))
    fake_results(spec, tmp_path, {"base": [100] * 6, "v": [10, 20, 30, 40, 50, 60]})
    for seed in (0, 1):  # two of the variant's runs failed
        job = ablate.Job("v", seed, {}, tmp_path / "runs" / "v" / f"seed-{seed}")
        job.result_path.write_text(json.dumps({"args": ablate.train_args(spec, job), "exit": 2,
                                               "error": "grpo-harness train: error: bad flag"}))
    doc = ablate.collect(spec, tmp_path)
    assert doc["variants"]["v"]["pair"]["verdict"].startswith("none")
    md = ablate.markdown(doc)
    row = next(line for line in md.splitlines() if "| v vs base |" in line)
    assert "**none: 2 failed run(s)**" in row and "held" not in row and "not shown" not in row, row
    assert "2 run(s) failed" in md and "v seed 0 (exit 2" in md, md


def test_ctrl_c_exits_130_and_a_run_that_finished_is_reported_finished(tmp_path, capsys, monkeypatch):
    """The first run finishes, then Ctrl-C arrives while it is still exiting (the runner's SIGTERM
    kills it: exit -15): it counts as finished, the second never starts, and the exit is 130."""
    def spawn(self, job, cmd):
        with open(job.log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = main(cmd[3:])
        assert code == 0
        self.stop()  # what the SIGINT handler does
        return -15

    monkeypatch.setattr(ablate.Runner, "_spawn", spawn)
    out = tmp_path / "abl"
    rc = main(["ablate", "cartpole", "--out", str(out), "--vary", "gamma=1.0", "--seeds", "0", "--jobs", "1",
               "--train", "--max-env-steps 300 --eval-episodes 2 --hidden 8 --set group_size=4 "
               "--set groups_per_iteration=1 --set grpo_epochs=1"])
    printed = capsys.readouterr()
    assert rc == 130, printed
    assert "failed" not in printed.out, printed.out
    result = json.loads((out / "runs" / "base" / "seed-0.json").read_text())
    assert result["exit"] == 0 and "iterations" in result
