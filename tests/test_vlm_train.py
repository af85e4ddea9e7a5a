"""``train vlm`` (grpo_harness.train_vlm) end to end on the tiny model, plus the JSONL loader."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from adapters.vlm_rewards import load_reward  # noqa: E402
from adapters.vlm_tasks import colours_dataset, first_word_reward  # noqa: E402
from grpo_harness.train_vlm import main  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, tiny_dirs  # noqa: E402,F401  (fixtures)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_colours_run_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--task", "colours", "--out", str(out), "--threads", "1", "--num-prompts", "8", "--eval-size", "4",
            "--eval-every", "2", "--checkpoint-every", "2", "--set", "group_size=4", "--lr-schedule", "constant"]
    assert main([*base, "--max-iterations", "3"]) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "curve.png", "final/config.json",
                 "model/processor_config.json"):
        assert (out / name).exists(), name
    first = records(out)
    assert [r["iteration"] for r in first] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in first)
    assert "eval_reward_mean" in first[1] and "eval_reward_mean" in first[2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grpo"]["group_size"] == 4 and cfg["grpo"]["gamma"] == 1.0
    assert "target 0.8" in capsys.readouterr().out
    # a second session continues the same run, exactly as one uninterrupted session would
    assert main(["--out", str(out), "--resume", "--max-iterations", "5", "--threads", "1"]) == 0
    resumed = records(out)
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3, 4]
    straight = tmp_path / "straight"
    assert main([*base[:2], "--out", str(straight), *base[4:], "--max-iterations", "5"]) == 0
    keys = ("loss", "reward_mean", "grad_norm", "entropy", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records(straight)]
    # an existing run is not overwritten without --resume
    assert main([*base, "--max-iterations", "3"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_jsonl_data_with_a_reward_module(tmp_path, tiny_dirs):
    rows = colours_dataset(4)
    with (tmp_path / "data.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            row["image"].save(tmp_path / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "prompt": row["prompt"], "answer": row["answer"],
                                "difficulty": i}) + "\n")
    out = tmp_path / "run"
    rc = main(["--data", str(tmp_path / "data.jsonl"), "--reward", "adapters.vlm_tasks:first_word_reward",
               "--model", str(tiny_dirs["qwen2_5_vl"]), "--out", str(out), "--max-iterations", "2",
               "--max-new-tokens", "3", "--set", "group_size=2", "--threads", "1"])
    assert rc == 0
    assert len(records(out)) == 2


def test_reward_spec():
    assert load_reward("adapters.vlm_tasks:first_word_reward") is first_word_reward
    with pytest.raises(ValueError, match="no reward function 'nope'"):
        load_reward("adapters.vlm_tasks:nope")
    with pytest.raises(ValueError, match="module:function"):
        load_reward("adapters.vlm_tasks")


def test_usage_errors(capsys):
    assert main(["--data", "x.jsonl"]) == 2
    assert "--reward" in capsys.readouterr().err
    assert main(["--task", "colours", "--set", "nonsense_key=1"]) == 2
    assert "nonsense_key" in capsys.readouterr().err
