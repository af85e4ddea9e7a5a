"""``make rehearse`` reads its commands from the README (benchmarks/rehearse.py): the README's GPU
and scale-out commands are found, each substitution is the one documented and nothing else
changes, and the GPU recipes train in bf16-mixed. The rehearsal itself (minutes) runs in CI
after the test suite."""

from __future__ import annotations

from pathlib import Path

from benchmarks.rehearse import readme_commands, substitute

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SUBS = dict(model="M", data="D", rewards="R.py", python="PY", torchrun="TR")


def test_the_readme_commands_are_found():
    commands = readme_commands(README)
    recipes = [c for c in commands if "--nproc-per-node 8" in c]
    assert len(recipes) == 2 and all("--precision bf16-mixed" in c and "--dtype" not in c for c in recipes)
    assert any("--fsdp" in c and "lr=1e-6" in c for c in recipes)
    assert any(c.startswith("grpo-harness train vlm --model ID_OR_PATH") for c in commands)
    assert any("--resume" in c for c in commands)
    assert len(commands) >= 8


def test_substitutions_are_the_documented_ones():
    got = substitute("torchrun --standalone --nproc-per-node 8 -m grpo_harness.cli train vlm --model Qwen/X "
                     "--data train.jsonl --reward my_rewards.py:accuracy --precision bf16-mixed --device cuda:3 "
                     "--gradient-checkpointing [--lora-rank 64] --max-new-tokens 512 --set groups_per_iteration=64 "
                     "--set group_size=8 --set micro_batch_size=4 --set lr=1e-6 --out runs/x", **SUBS)
    assert got == ["TR", "--standalone", "--nproc-per-node", "2", "-m", "grpo_harness.cli", "train", "vlm",
                   "--model", "M", "--data", "D", "--reward", "R.py:accuracy", "--precision", "bf16-mixed",
                   "--device", "cpu", "--gradient-checkpointing", "--lora-rank", "64", "--max-new-tokens", "4",
                   "--set", "groups_per_iteration=2", "--set", "group_size=4", "--set", "micro_batch_size=4",
                   "--set", "lr=1e-6", "--out", "runs/x", "--max-iterations", "2", "--threads", "1"]
    resume = substitute("grpo-harness train cartpole --out runs/dp --resume", **SUBS)
    assert resume == ["PY", "-m", "grpo_harness.cli", "train", "cartpole", "--out", "runs/dp", "--resume",
                      "--max-iterations", "4"]
