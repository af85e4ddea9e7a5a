"""Settings that train nothing, or whose KL term does nothing, are said once, in one line, at
the start of a run (and kept in config.json's notes), not as a raw Python warning."""

from __future__ import annotations

import json

from grpo_harness.cli import main

from .test_train_cli import TINY


def test_group_size_one_is_warned(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "cartpole", "--out", str(out), "--max-iterations", "1", *TINY, "--set", "group_size=1"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "group_size=1" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "nothing is learned" in lines[0], err
    assert any("group_size=1" in n for n in json.loads((out / "config.json").read_text())["notes"])


def test_an_inert_kl_term_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "cartpole", "--out", str(out), "--max-iterations", "1", *TINY, "--set", "grpo_epochs=1",
                 "--set", "beta=0.04"]) == 0
    err = capsys.readouterr().err
    assert "KLInertWarning" not in err and "return cls(" not in err, err
    lines = [line for line in err.splitlines() if "does nothing" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: beta=0.04 does nothing"), err
