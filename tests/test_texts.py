"""Texts a user reads: ``--help`` without reST markup or options that do not exist, the README's
Map naming every command and the VLM run folder's model folders, and a run summary that counts
the iterations it has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from grpo_harness import ablate
from grpo_harness.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[c] for c in SUBCOMMANDS if c != "train"] + [["train"], ["train", "cartpole"], ["train", "vlm"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_no_markup_and_names_only_real_tasks(command, capsys):
    pytest.importorskip("transformers") if command == ["train", "vlm"] else None
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text, text
    from adapters.vlm_tasks import TASKS

    for task in re.findall(r"--task (\w[\w-]*)", text):
        assert task in TASKS, f"--task {task} in {' '.join(command)} --help"


def test_ablate_texts_name_only_real_tasks_and_files():
    from adapters.vlm_tasks import TASKS

    text = (ablate.__doc__ or "") + (ablate.load_spec.__doc__ or "")
    for task in re.findall(r"--task\W+(\w[\w-]*)", text):
        assert task in TASKS, task
    for name in re.findall(r"benchmarks/ablations/([\w.-]+\.toml)", text):
        assert (ROOT / "benchmarks" / "ablations" / name).is_file(), name


def test_the_readme_map_names_every_command_and_the_vlm_model_folders():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Map"):].split("\n\n")[1]
    row = next(line for line in table.splitlines() if line.startswith("| `grpo_harness/`"))
    for command in SUBCOMMANDS:
        assert f"`{command}`" in row, command
    assert "`model/`" in table and "`final/`" in table


def test_the_vlm_summary_counts_the_iterations_it_has():
    pytest.importorskip("transformers")
    from grpo_harness.train_vlm import VLM_DEFAULTS, VLMRun

    run = VLMRun.__new__(VLMRun)
    run.train = dict(VLM_DEFAULTS["train"])
    run.progress = {"first": [0.1, 0.2, 0.3], "recent": [0.1, 0.2, 0.3], "reached_target": None}
    line = run.summary_lines()[0]
    assert "over the 3 iterations: 0.200" in line and "25" not in line, line
