"""Inputs a user gives that were read otherwise than meant, silently: a config file with only a
``[train]`` section, a chat prompt stored as a JSON string (as CSV files hold it), a
``DatasetDict`` without the split asked for, ``--eval-data`` with a built-in task and
``--family`` with ``--model``. Each is now read as meant or refused in one line."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from adapters.vlm_tasks import colours_dataset  # noqa: E402
from grpo_harness.cli import main  # noqa: E402
from grpo_harness.datasets_io import load_rows, normalise_prompt  # noqa: E402
from grpo_harness.run import UsageError  # noqa: E402

from .test_train_cli import TINY, metrics  # noqa: E402

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="the datasets package (data extra) is not installed")
CHAT = [{"role": "user", "content": "What colour is this image?"}]


def test_a_config_file_with_only_a_train_section_is_read_as_sections(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[train]\nmax_iterations = 2\n")
    out = tmp_path / "r"
    assert main(["train", "cartpole", "--config", str(cfg), "--out", str(out), *TINY]) == 0, capsys.readouterr().err
    assert len(metrics(out)) == 2
    cfg.write_text("[train]\nmax_iterations = 2\nbogus = 1\n")
    rc = main(["train", "cartpole", "--config", str(cfg), "--out", str(tmp_path / "r2"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown training option(s) 'bogus'" in err, err


def test_a_chat_prompt_stored_as_a_json_string_is_parsed():
    parsed = normalise_prompt(json.dumps(CHAT), 1, "rows.csv row 0")
    assert parsed == [{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": "What colour is this image?"}]}]
    assert normalise_prompt("[1] is not a chat", 1, "x") == "[1] is not a chat"  # plain text stays text
    with pytest.raises(UsageError, match=r"rows\.csv row 3: the prompt looks like a JSON chat prompt but does not "
                                         r"parse"):
        normalise_prompt('[{"role": "user", "content": "unclosed}', 1, "rows.csv row 3")


@needs_datasets
def test_a_csv_chat_prompt_reaches_the_model_as_messages(tmp_path):
    (tmp_path / "imgs").mkdir()
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", "answer"])
        for i, r in enumerate(colours_dataset(2, seed=3)):
            r["image"].save(tmp_path / "imgs" / f"{i}.png")
            w.writerow([f"imgs/{i}.png", json.dumps(CHAT), r["answer"]])
    rows = load_rows(tmp_path / "d.csv", cache_dir=str(tmp_path / "cache"))
    assert isinstance(rows[0]["prompt"], list) and rows[0]["prompt"][0]["role"] == "user"


@needs_datasets
def test_a_datasetdict_without_the_split_asked_for_is_refused_naming_its_splits(tmp_path):
    import datasets

    rows = colours_dataset(2, seed=3)
    ds = datasets.Dataset.from_dict({"image": [r["image"] for r in rows], "prompt": ["q"] * 2,
                                     "answer": [r["answer"] for r in rows]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "only-test"))
    with pytest.raises(UsageError, match=r"--data .*only-test: a DatasetDict with the split\(s\) test and no "
                                         r"'train'.*only-test/test"):
        load_rows(tmp_path / "only-test")
    assert len(load_rows(tmp_path / "only-test" / "test")) == 2  # the split's folder, as the line says
    assert len(load_rows(tmp_path / "only-test", option="--eval-data")) == 2  # held-out rows: the test split


@pytest.mark.parametrize("args,needle", [
    (["--task", "colours", "--eval-data", "held.jsonl"], "--eval-data"),
    (["--model", "some/folder", "--family", "qwen2_5_vl", "--task", "colours"], "--family"),
])
def test_options_that_were_ignored_are_refused(tmp_path, capsys, args, needle):
    rc = main(["train", "vlm", *args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()
