"""``grpo-harness inspect RUN_DIR`` (grpo_harness/inspect_cmd.py): the plateau against a closed
form, the rolling mean against numpy, the config diff, the zero-signal spans and skipped steps on
a hand-made run folder, and the whole printout and ``--plot`` on a tiny VLM run."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from grpo_harness.cli import main
from grpo_harness.inspect_cmd import config_diff, plateau, rolling_mean, summary

if importlib.util.find_spec("transformers") is not None:  # the tiny VLM (the vlm extra)
    from .test_vlm import _one_thread, _quiet_transformers, tiny_dirs  # noqa: F401  (fixtures)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_rolling_mean_is_a_trailing_average():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50).tolist()
    full = np.convolve(values, np.ones(7) / 7, mode="valid")  # windows ending at index 6..49
    got = rolling_mean(values, 7)
    np.testing.assert_allclose(got[6:], full, rtol=1e-12)
    np.testing.assert_allclose(got[:6], np.cumsum(values[:6]) / np.arange(1, 7), rtol=1e-12)


def test_plateau_of_a_ramp_then_flat():
    """v_i = i/100 for i < 100, then 1. Rolling mean over 10: (j - 4.5)/100 on the ramp (0.945 at
    j = 99), 0.955 at j = 100 (nine ramp values 0.91..0.99 and one 1), 1 from j = 109. Range 1,
    tolerance 0.05: the first j from which it stays >= 0.95 is 100."""
    ramp = [i / 100 for i in range(100)] + [1.0] * 100
    assert plateau(ramp, 10) == 100
    assert plateau(ramp[:105], 10) is None  # 5 iterations near the final value: still moving
    assert plateau([0.3] * 40, 10) == 0  # flat from the start
    assert plateau([i / 10 for i in range(40)], 10) is None  # a ramp has no plateau
    # a mistake to reject: the raw values instead of the rolling mean put it at 96 (1 - 0.95 is
    # a hair above 0.05 in floats)
    raw_start = next(i for i in range(len(ramp)) if all(abs(v - 1.0) <= 0.05 for v in ramp[i:]))
    assert raw_start == 96 != plateau(ramp, 10)


def vlm_doc(**train):
    from grpo_harness.train_vlm import MODEL_DEFAULTS, TASK_DEFAULTS, VLM_DEFAULTS

    from grpo_core.config import GRPOConfig

    grpo = {**GRPOConfig().to_dict(), **VLM_DEFAULTS["grpo"], "group_size": 4, "beta": 0.04}
    return {"env": "vlm", "grpo": grpo, "train": {**VLM_DEFAULTS["train"], **train},
            "task": {"name": "colours", **TASK_DEFAULTS}, "model": dict(MODEL_DEFAULTS)}


def test_config_diff_names_only_what_changed():
    assert config_diff(vlm_doc(window=5)) == ["grpo.group_size = 4 (default 8)", "grpo.beta = 0.04 (default 0.0)",
                                              "train.window = 5 (default 25)"]


def test_summary_of_a_hand_made_run(tmp_path):
    """40 iterations, 4 groups: zero_signal_groups 4 for the first 20, 1 after; skipped steps at
    iterations 3 and 7; reward best 0.9 at iteration 30."""
    records = [{"iteration": i, "reward_mean": 0.9 if i == 30 else min(i, 20) / 25, "kl": 0.01,
                "zero_signal_groups": 4.0 if i < 20 else 1.0, "skipped_steps": 1.0 if i in (3, 7) else 0.0,
                "grad_norm": 0.5} for i in range(40)]
    text = summary(vlm_doc(window=5), records, [], tmp_path)
    assert "reward_mean (reward)" in text and "best 0.9 at iteration 30" in text
    # spans of 5 iterations: 1.0 for 0-19, 0.25 for 20-39; mean (20 * 1 + 20 * 0.25) / 40
    assert "(share of the 4 groups per iteration; mean 0.62, last 0.25)" in text
    assert "0-4: 1.00 | 5-9: 1.00 | 10-14: 1.00 | 15-19: 1.00 | 20-24: 0.25" in text
    assert "skipped steps: 2 of 40 minibatch updates (5.0%) in 2 iteration(s), the last at iteration 7" in text
    assert "sample completions: none logged" in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="the vlm extra is not installed")
def test_inspect_a_tiny_vlm_run(tiny_dirs, tmp_path, capsys):
    from grpo_harness.train_vlm import main as train_vlm

    out = tmp_path / "run"
    assert train_vlm(["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(out),
                      "--threads", "1", "--num-prompts", "8",
                      "--eval-size", "4", "--set", "group_size=4", "--max-iterations", "3",
                      "--skip-preflight", "--report-to", "none"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--plot"]) == 0
    text = capsys.readouterr().out
    last = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for needle in ("grpo.group_size = 4 (default 8)", "train.max_iterations = 3 (default 400)",
                   "frac_reward_zero_std", "plateau: none yet", "zero-signal groups (share of the 4 groups",
                   "skipped steps:", "sample completions of iteration 2:", last[0]["completions"][0]["text"][:10],
                   f"plot: {out / 'inspect.png'}"):
        assert needle in text, needle
    assert (out / "inspect.png").read_bytes()[:8] == PNG_SIGNATURE


def test_not_a_run_folder_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"grpo-harness inspect: error: {tmp_path / 'nope'} is not a folder",
                   f"grpo-harness inspect: error: {tmp_path} holds no config.json: not a run folder"]
