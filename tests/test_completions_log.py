"""The completions log of ``train vlm`` (grpo_harness/completions.py): what completions.jsonl,
the progress table and ``frac_reward_zero_std`` say, checked against independent sources: the
reward functions called again on the logged texts and answers, Python's ``statistics`` for the
group mean and std, the loop's own ``zero_signal_groups``; two broken variants (population std,
the groups' prompts shifted by one) are shown to fail the same check; a resume drops the lines
past the checkpoint."""

from __future__ import annotations

import io
import json
import math
import statistics

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm_tasks import colours_dataset  # noqa: E402
from grpo_harness import completions  # noqa: E402
from grpo_harness.completions import (format_plain, format_table, frac_reward_zero_std, group_stats,  # noqa: E402
                                      reward_totals, signal_groups)
from grpo_harness.train_vlm import main  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, tiny_dirs  # noqa: E402,F401  (fixtures)

ANSWERS = ["red", "green", "blue", "yellow"]
REWARDS = f'''
ANSWERS = {ANSWERS!r}

def parity(prompts, completions, answer, **kw):
    return [float(len(c) % 2) for c in completions]

def answer_index(prompts, completions, answer, **kw):
    return [float(ANSWERS.index(a)) for a in answer]
'''
WEIGHTS = (1.0, 0.5)


# --- the numbers ---------------------------------------------------------------------------------

def test_totals_group_stats_and_zero_spread_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.5], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert reward_totals(rewards, mask) == [1.0, 2.0, None]  # junk under the mask is not read
    assert group_stats([1.0, None, 3.0]) == (2.0, math.sqrt(2.0), 2)  # Bessel: ((1)^2 + (1)^2) / 1
    assert group_stats([5.0, None]) == (5.0, 0.0, 1) and group_stats([None, None]) == (None, 0.0, 0)
    # groups of 2: equal, spread, one scored, none scored -> 3 of 4 without spread
    assert frac_reward_zero_std([1.0, 1.0, 0.0, 1.0, None, 2.0, None, None], 2) == 0.75
    adv = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.5], [9.0, 0.0]])
    assert signal_groups(adv, torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1]]), 2) == [False, True]
    assert signal_groups(adv, torch.tensor([[1, 1], [1, 1], [1, 0], [0, 1]]), 2) == [False, False]


RECORD = {"iteration": 9, "group": 0, "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                              {"type": "text", "text": "What?"}]}],
          "answer": "red", "reward_mean": 0.5, "reward_std": 0.7071, "scored": 2, "signal": True,
          "completions": [{"text": "red", "reward": 1.0, "scores": {}}, {"text": "blue\nsky", "reward": 0.0,
                                                                          "scores": {}}]}


def test_the_table_plain_and_rich():
    text = format_plain([RECORD, {**RECORD, "group": 1, "signal": False, "reward_std": 0.0}])
    lines = text.splitlines()
    assert lines[0] == "sample completions of iteration 9:"
    assert lines[1].split() == ["group", "prompt", "answer", "reward", "mean", "±", "std", "signal",
                                "completions", "(reward)"]
    assert lines[2].split() == ["0", "What?", "red", "0.50", "±", "0.71", "yes", "'red'", "1.00", "|",
                                "'blue", "sky'", "0.00"]
    assert lines[3].split()[6] == "NO"
    assert format_table([RECORD], stream=io.StringIO()) == format_plain([RECORD])  # piped: plain
    pytest.importorskip("rich", reason="rich is not installed (optional): the terminal table is not drawn")
    drawn = completions.format_rich([RECORD], width=120)
    assert "'red' 1.00" in drawn and "What?" in drawn and "\x1b[" in drawn


# --- on the tiny model -----------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    lines = []
    for i, row in enumerate(colours_dataset(4)):
        row["image"].save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": row["prompt"], "answer": row["answer"]}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path


def train(tiny_dirs, data, out, *extra):
    rw = data / "rewards.py"
    return main(["--data", str(data / "rows.jsonl"), "--reward", f"{rw}:parity", "--reward", f"{rw}:answer_index",
                 "--reward-weight", str(WEIGHTS[0]), "--reward-weight", str(WEIGHTS[1]),
                 "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(out), "--max-new-tokens", "3",
                 "--set", "group_size=2", "--set", "groups_per_iteration=4", "--threads", "1",
                 "--skip-preflight", "--report-to", "none", *extra])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_log(out, iterations):
    """Every logged line against the reward functions, statistics and the loop's metrics."""
    logged, metrics = read(out / "completions.jsonl"), {r["iteration"]: r for r in read(out / "metrics.jsonl")}
    assert [(r["iteration"], r["group"]) for r in logged] == [(i, b) for i in iterations for b in range(4)]
    for r in logged:
        rewards = [c["reward"] for c in r["completions"]]
        for c in r["completions"]:
            assert c["scores"] == {"parity": float(len(c["text"]) % 2), "answer_index": ANSWERS.index(r["answer"])}
            assert c["reward"] == pytest.approx(WEIGHTS[0] * c["scores"]["parity"]
                                                + WEIGHTS[1] * c["scores"]["answer_index"], abs=1e-12)
        assert r["reward_mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-12)
        assert r["reward_std"] == pytest.approx(statistics.stdev(rewards), abs=1e-12)
        assert (r["scored"], r["signal"]) == (2, len(set(rewards)) > 1)
    for i in iterations:
        groups = [r for r in logged if r["iteration"] == i]
        flat = sum(not r["signal"] for r in groups)
        assert metrics[i]["zero_signal_groups"] == flat  # the loop's count, from its advantages
        assert metrics[i]["frac_reward_zero_std"] == flat / 4
        parities = [c["scores"]["parity"] for r in groups for c in r["completions"]]
        assert metrics[i]["reward/parity"] == pytest.approx(statistics.fmean(parities), abs=1e-12)


@pytest.mark.slow
def test_completions_log_on_the_tiny_model(tiny_dirs, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dirs, data, out, "--max-iterations", "5", "--completions-every", "2") == 0
    check_log(out, [1, 3, 4])  # every 2nd iteration, and the last
    err = capsys.readouterr().err
    assert "sample completions of iteration 1:" in err and "sample completions of iteration 4:" in err
    assert all("frac_reward_zero_std" in r for r in read(out / "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["population_std", "prompts_of_the_next_group"])
def test_the_log_check_rejects_broken_bookkeeping(tiny_dirs, data, tmp_path, monkeypatch, mistake):
    if mistake == "population_std":
        def group_stats_without_bessel(values):
            mean, std, n = group_stats(values)
            return mean, std * math.sqrt((n - 1) / n) if n > 1 else 0.0, n
        monkeypatch.setattr(completions, "group_stats", group_stats_without_bessel)
    else:
        real = completions.CompletionRecorder.summarise

        def shifted(self, *args):
            s = real(self, *args)
            s["indices"] = s["indices"][1:] + s["indices"][:1]
            return s
        monkeypatch.setattr(completions.CompletionRecorder, "summarise", shifted)
    out = tmp_path / "run"
    assert train(tiny_dirs, data, out, "--max-iterations", "3", "--completions-every", "1") == 0
    with pytest.raises(AssertionError):
        check_log(out, [0, 1, 2])


@pytest.mark.slow
def test_a_resume_drops_the_lines_past_the_checkpoint(tiny_dirs, data, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_dirs, data, out, "--max-iterations", "2", "--completions-every", "1") == 0
    stale = {"iteration": 2, "group": 0, "prompt": "left by a killed session", "completions": []}
    with (out / "completions.jsonl").open("a") as f:
        f.write(json.dumps(stale) + "\n")
    assert train(tiny_dirs, data, out, "--resume", "--max-iterations", "3", "--completions-every", "1") == 0
    check_log(out, [0, 1, 2])
    assert "killed session" not in (out / "completions.jsonl").read_text()


# --- a TRL user's dataset, unchanged ------------------------------------------------------------------

TRL_REWARD = '''
def accuracy(prompts, completions, solution, **kwargs):
    return [float(c.strip().split(" ")[0] == s) if c.strip() else 0.0 for c, s in zip(completions, solution)]
'''


@pytest.mark.slow
@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_a_trl_dataset_trains_unchanged(tiny_dirs, tmp_path, monkeypatch, form):
    """Columns as in TRL's VLM examples: image (an Image feature), a conversational prompt,
    solution; saved with datasets, then trained on with no conversion (offline)."""
    datasets = pytest.importorskip("datasets", reason="the datasets package (data extra) is not installed")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = colours_dataset(4, seed=5)
    ds = datasets.Dataset.from_dict({
        "image": [r["image"] for r in rows], "solution": [r["answer"] for r in rows],
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}]
                   for r in rows]}).cast_column("image", datasets.Image())
    path = tmp_path / ("saved" if form == "save_to_disk" else "train.parquet")
    ds.save_to_disk(str(path)) if form == "save_to_disk" else ds.to_parquet(str(path))
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARD)
    out = tmp_path / "run"
    rc = main(["--data", str(path), "--reward", f"{tmp_path / 'trl_rewards.py'}:accuracy", "--model",
               str(tiny_dirs["qwen2_vl"]), "--out", str(out), "--max-iterations", "2", "--max-new-tokens", "2",
               "--set", "group_size=2", "--threads", "1", "--completions-every", "1"])
    assert rc == 0
    logged = read(out / "completions.jsonl")
    assert len(read(out / "metrics.jsonl")) == 2 and len(logged) == 2 * 4
    for r in logged:
        assert r["solution"] in ANSWERS and r["prompt"][0]["content"][1]["text"] == rows[0]["prompt"]
        for c in r["completions"]:  # the reward saw the row's solution
            assert c["scores"]["accuracy"] == float(c["text"].strip().split(" ")[0] == r["solution"]
                                                    if c["text"].strip() else 0.0)
