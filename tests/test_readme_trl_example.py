"""The README's TRL example runs offline exactly as printed: its Python block (the dataset, with
its two images, and ``rewards.py``) and its ``--model tiny`` command, which builds a tiny random
model from the data's words, in a fresh folder."""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from grpo_harness.cli import main  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers  # noqa: E402,F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> tuple[str, str, list[str]]:
    """(the dataset script, rewards.py, the offline command's arguments) as the README prints them."""
    readme = (ROOT / "README.md").read_text()
    part = readme[readme.index("A TRL user's dataset and reward work unchanged"):]
    python = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    script, _, rewards = python.partition("# rewards.py\n")
    commands = re.findall(r"```sh\n(.*?)```", part, re.S)
    offline = next(c for c in commands if "--model tiny" in c)
    argv = shlex.split(offline.replace("\\\n", " "))
    assert argv[:3] == ["grpo-harness", "train", "vlm"], argv
    return script, rewards, argv[1:]


@pytest.mark.slow
def test_the_readme_trl_example_runs_offline_as_printed(tmp_path, monkeypatch, capsys):
    script, rewards, argv = readme_example()
    assert rewards.strip().startswith("def accuracy(")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "make_data.py").write_text(script)
    runpy.run_path(str(tmp_path / "make_data.py"), run_name="__main__")
    (tmp_path / "rewards.py").write_text(rewards)
    assert main(argv) == 0, capsys.readouterr().err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["model"]["model"] == "tiny" and (runs[0] / "model" / "config.json").is_file()
    vocab = json.loads((runs[0] / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"red", "blue", "colour"} <= set(vocab)  # the data's words: the answers can be said
    assert (runs[0] / "final" / "config.json").is_file()
