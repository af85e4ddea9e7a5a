"""The built-in VLM tasks: the sequence task's reward (hand-computed), its answers read back from
the images, its prompts and vocabulary, and ``train vlm --task sequence`` from nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapters.vlm_tasks import (COLOURS, SEQUENCE_QUESTION, TASKS, colour_names, colours_dataset,
                                first_word_reward, sequence_answer, sequence_dataset, sequence_reward,
                                sequence_vocabulary, sequence_word_scores, task_adapter, with_word_credit,
                                WordCredit)


CYCLE = "red green blue yellow"


@pytest.mark.parametrize("completion, score", [
    ("red green blue", 1.0),
    ("Red, green. BLUE!", 1.0),  # case and punctuation do not matter
    ("red green yellow", 2 / 3),  # yellow does not follow green
    ("green blue yellow", 2 / 3),  # wrong colour, then its own two successors
    ("yellow red green", 2 / 3),  # the cycle wraps
    ("red blue green", 1 / 3),
    ("red", 1 / 3),  # missing words earn nothing
    ("", 0.0),
    ("red green blue yellow red", 1.0),  # words past the answer's length earn nothing
    ("the red green", 1 / 3),  # "green" follows "red"
    ("red not green", 1 / 3),
])
def test_sequence_reward_hand_computed(completion, score):
    assert sequence_reward(["q"], [completion], ["red green blue"], [CYCLE]) == [pytest.approx(score, abs=1e-15)]


def test_sequence_word_scores_hand_computed():
    third = 1 / 3
    assert sequence_word_scores(["red", "green", "blue"], "red green blue", CYCLE) == [third, third, third]
    assert sequence_word_scores(["blue", "yellow", "red"], "red green blue", CYCLE) == [0.0, third, third]
    assert sequence_word_scores(["red", "red", "green", "blue"], "red green blue", CYCLE) == [third, 0.0, third, 0.0]
    assert sequence_word_scores([], "red green blue", CYCLE) == []


def positional_reward(prompts, completions, answer, **kwargs):
    """A plausible mistake: each word compared with the answer at its position (a wrong first
    word then sinks the rest, so the later words' rule is never credited on its own)."""
    return [sum(a == b for a, b in zip(c.lower().split(), x.split())) / 3 for c, x in zip(completions, answer)]


def bag_of_words_reward(prompts, completions, answer, **kwargs):
    """A plausible mistake: credit for each answer word said anywhere (order ignored)."""
    return [len(set(c.lower().split()) & set(a.split())) / len(a.split()) for c, a in zip(completions, answer)]


@pytest.mark.parametrize("wrong", [positional_reward, bag_of_words_reward])
def test_hand_cases_reject_rewards_that_ignore_the_chain(wrong):
    cases = [("green blue yellow", 2 / 3), ("red blue green", 1 / 3)]
    assert any(wrong(["q"], [c], ["red green blue"], cycle=[CYCLE]) != [pytest.approx(v)] for c, v in cases)


def test_sequence_answer_hand_computed():
    assert sequence_answer("red") == "red green blue"
    assert sequence_answer("blue") == "blue yellow red"  # the cycle wraps
    assert sequence_answer("yellow", k=4) == "yellow red green"
    assert sequence_answer("green", k=3) == "green blue red"
    assert sequence_answer("red", k=2) == "red green red"


def nearest_colour(image, k: int) -> str:
    """The colour whose RGB is nearest the image's mean pixel (an independent read of the image)."""
    mean = np.asarray(image, dtype=float).reshape(-1, 3).mean(0)
    return min(colour_names(k), key=lambda c: np.sum((np.array(COLOURS[c]) - mean) ** 2))


@pytest.mark.parametrize("k", [2, 4, 6])
def test_sequence_dataset_answers_the_image(k):
    rows = sequence_dataset(12, k=k, seed=3)
    for row in rows:
        words = row["answer"].split()
        assert len(words) == 3 and row["prompt"] == SEQUENCE_QUESTION and row["cycle"] == " ".join(colour_names(k))
        assert words[0] == nearest_colour(row["image"], k)
        names = colour_names(k)
        assert [names.index(w) for w in words] == [(names.index(words[0]) + j) % k for j in range(3)]
    firsts = [r["answer"].split()[0] for r in rows]
    assert max(firsts.count(c) for c in colour_names(k)) - min(firsts.count(c) for c in colour_names(k)) <= 1


def test_sequence_dataset_is_deterministic_in_its_seed():
    a, b, c = sequence_dataset(4, seed=1), sequence_dataset(4, seed=1), sequence_dataset(4, seed=2)
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, c))


def test_sequence_vocabulary_covers_question_and_answers():
    vocab = set(sequence_vocabulary(4))
    assert set(SEQUENCE_QUESTION.lower().replace(".", " ").split()) <= vocab
    assert {w for r in sequence_dataset(8) for w in r["answer"].split()} <= vocab


def test_task_registry_keeps_colours_as_it_was():
    colours = TASKS["colours"]
    assert (colours.dataset, colours.reward, colours.max_new_tokens, colours.adapter) == (
        colours_dataset, first_word_reward, 2, None)
    for name in ("sequence", "sequence-words"):
        assert TASKS[name].max_new_tokens == 3 and TASKS[name].reward is sequence_reward
    assert task_adapter({"name": "sequence", "reward": []}, object) is object
    assert task_adapter({"name": "sequence-words", "reward": ["my:reward"]}, object) is object  # user's reward
    assert issubclass(task_adapter({"name": "sequence-words", "reward": []}, object), object)


class _Tokenizer:
    """Word-level: id i is WORDS[i]; 0 is a special token (decoded to nothing)."""

    WORDS = ["<eos>", "red", "green", "blue", "yellow", "the", ","]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.WORDS[i] for i in ids if i != 0)


class _StubAdapter:
    """What WordCredit needs of a VLM adapter: collect() (a rank's share too), collect_more()
    and join_groups(), with the outcome on the last token. It says ``completions`` in order
    or, with ``completions=None``, each sampled item's answer (its token ids), then ``extra``."""

    def __init__(self, dataset, completions=None, extra=()):
        self.dataset, self.tokenizer, self.completions, self.extra = dataset, _Tokenizer(), completions, list(extra)

    def prompt_indices(self, iteration, num_groups, draw=0):
        return [(3 * iteration + 5 * draw + b) % len(self.dataset) for b in range(num_groups)]

    def collect(self, *, num_groups, group_size, iteration, first_group=0, total_groups=None):
        indices = self.prompt_indices(iteration, total_groups or num_groups)[first_group:first_group + num_groups]
        return self._rollout(indices, group_size)

    def collect_more(self, *, num_groups, group_size, iteration, draw, again=None):
        if again is None:
            return self._rollout(self.prompt_indices(iteration, num_groups, draw), group_size)
        return self._rollout([again[0].inputs["items"][k] for k in again[1]], group_size)

    def _rollout(self, indices, group_size):
        import torch

        from grpo_core.adapter import Rollout

        said = self.completions or [[_Tokenizer.WORDS.index(w) for w in self.dataset[i]["answer"].split()] + self.extra
                                    for i in indices for _ in range(group_size)]
        t_len = max(len(c) for c in said)
        ids = torch.tensor([c + [0] * (t_len - len(c)) for c in said])
        attn = torch.tensor([[1] * len(c) + [0] * (t_len - len(c)) for c in said])
        rewards = torch.zeros(ids.shape)
        rewards[torch.arange(len(ids)), attn.sum(1) - 1] = 0.5  # junk: WordCredit replaces it
        return Rollout(rewards=rewards, mask=attn.bool(), old_logp=None,
                       inputs={"completion_ids": ids, "completion_attn": attn, "group_size": group_size,
                               "items": list(indices)})

    def join_groups(self, parts):
        """The listed groups' rewards and masks, right-padded (no ``scored``: WordCredit's job)."""
        import torch

        from grpo_core.adapter import Rollout

        g = parts[0][0].inputs["group_size"]
        t_len = max(r.rewards.shape[1] for r, groups in parts if groups)

        def rows(r, x, groups):
            x = x[[b * g + i for b in groups for i in range(g)]]
            return torch.cat([x, x.new_zeros(len(x), t_len - x.shape[1])], 1)
        return Rollout(rewards=torch.cat([rows(r, r.rewards, gs) for r, gs in parts]),
                       mask=torch.cat([rows(r, r.mask, gs) for r, gs in parts]), old_logp=None,
                       inputs={"group_size": g})


def test_word_credit_puts_each_words_share_on_its_token():
    import torch

    row = {"answer": "red green blue", "cycle": CYCLE}
    completions = [[1, 2, 3], [3, 4, 1], [5, 1, 0], [1, 6, 2], [2]]  # red green blue / blue yellow red /
    adapter = with_word_credit(_StubAdapter)([row], completions)        # the red EOS / red , green / green
    r = adapter.collect(num_groups=1, group_size=5, iteration=0)
    t = 1 / 3
    assert torch.equal(r.rewards, torch.tensor([[t, t, t], [0, t, t], [0, 0, 0], [t, 0, t], [0, 0, 0]]))
    # words are scored where they are said; the comma and the EOS are not words; a row with
    # fewer words than the answer has its last token scored (0) unless a word sits there
    assert torch.equal(r.scored, torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 0]]).bool())
    outcome = sequence_reward(None, [" ".join(_Tokenizer.WORDS[i] for i in c if i) for c in completions],
                              ["red green blue"] * 5, [CYCLE] * 5)
    assert r.rewards.sum(1).tolist() == pytest.approx(outcome)  # the shares add up to the outcome


def _four_items():
    return [{"answer": sequence_answer(c), "cycle": CYCLE} for c in CYCLE.split()]


def check_draws(mixin):
    """A rank's share (first_group, total_groups), an extra draw and a retry of dynamic sampling: the
    stub says each sampled item's own answer, so every row earns 1 only if the rows are judged
    against the items sampled for them (another item's answer starts with another colour: 2/3)."""
    import torch

    adapter = type("Adapter", (mixin, _StubAdapter), {})(_four_items())
    share = adapter.collect(num_groups=2, group_size=2, iteration=1, first_group=2, total_groups=4)
    more = adapter.collect_more(num_groups=2, group_size=2, iteration=1, draw=1)
    retry = adapter.collect_more(num_groups=1, group_size=2, iteration=1, draw=1, again=(share, [1]))
    assert retry.inputs["items"] != adapter.prompt_indices(1, 1, 1)  # not the fresh draw's item
    for r in (share, more, retry):
        assert r.rewards.sum(1).tolist() == pytest.approx([1.0] * (r.rewards.shape[0]))
        assert r.scored is not None and r.scored.all()
    assert torch.equal(share.rewards[0], torch.full((3,), 1 / 3))


def check_join(mixin):
    """Dynamic sampling joins groups of several draws: their per-word rewards keep their scored
    steps (padding unscored), so the joined rollout's advantages can be computed; without
    ``scored`` the core refuses rewards before the last token."""
    import torch

    from grpo_core.advantages import group_advantages

    items, cls = _four_items(), type("Adapter", (mixin, _StubAdapter), {})
    first = cls(items).collect(num_groups=2, group_size=2, iteration=0)
    more = cls(items, extra=[5]).collect_more(num_groups=2, group_size=2, iteration=0, draw=1)
    joined = cls(items).join_groups([(first, [1]), (more, [0])])
    t = 1 / 3
    assert torch.equal(joined.rewards, torch.tensor([[t, t, t, 0]] * 4))
    # the part of 3 tokens is padded unscored; "the" past the answer (part 2) is a word: scored 0
    assert torch.equal(joined.scored, torch.tensor([[1, 1, 1, 0]] * 2 + [[1, 1, 1, 1]] * 2).bool())
    kw = {"gamma": 1.0, "scale": "group", "stats_over": "sequences"}
    group_advantages(joined.rewards, joined.mask, 2, scored=joined.scored, **kw)
    with pytest.raises(ValueError, match="scored"):
        group_advantages(joined.rewards, joined.mask, 2, scored=None, **kw)


class CollectOnly(WordCredit):
    """The mistake fixed here: a mixin that overrides ``collect`` alone, without a rank's share
    (the extra draws and the joined rollout then come from the plain adapter: outcome rewards,
    ``scored`` dropped)."""

    def collect(self, *, num_groups, group_size, iteration):
        return WordCredit.collect(self, num_groups=num_groups, group_size=group_size, iteration=iteration)

    collect_more = _StubAdapter.collect_more
    join_groups = _StubAdapter.join_groups


def test_word_credit_judges_the_items_each_draw_sampled():
    check_draws(WordCredit)
    with pytest.raises((TypeError, AssertionError)):
        check_draws(CollectOnly)


def test_a_data_parallel_trainer_accepts_word_credit():
    """The distributed trainer checks that ``collect`` takes a rank's share; the mixin's does."""
    from grpo_core.distributed import _check_share_collect

    _check_share_collect(with_word_credit(_StubAdapter)(_four_items()))
    with pytest.raises(ValueError, match="first_group"):
        _check_share_collect(type("Broken", (CollectOnly, _StubAdapter), {})(_four_items()))


def test_word_credit_join_groups_carries_scored():
    check_join(WordCredit)
    with pytest.raises((TypeError, AssertionError)):
        check_join(CollectOnly)


@pytest.mark.slow
def test_train_vlm_sequence_from_nothing(tmp_path):
    """The task trains from a fresh clone, through the preflight: the tiny model is built with
    the task's words, and the per-word rewards pass the core's scored-step checks, with dynamic
    sampling's extra draws."""
    pytest.importorskip("transformers")
    from grpo_harness.train_vlm import main

    out = tmp_path / "run"
    assert main(["--task", "sequence-words", "--out", str(out), "--max-iterations", "2", "--num-prompts", "4",
                 "--eval-size", "2", "--set", "groups_per_iteration=2", "--set", "group_size=2",
                 "--set", "dynamic_sampling=true"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["name"] == "sequence-words" and config["train"]["max_new_tokens"] == 3
    vocab = json.loads((out / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(sequence_vocabulary(4)) <= set(vocab)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "eval_reward_mean" in records[-1]
