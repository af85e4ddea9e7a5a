"""DAPO's dynamic sampling (``GRPOConfig.dynamic_sampling``) in the loop, on a scripted toy
adapter whose group rewards are chosen per draw, and the VLM adapter's ``collect_more`` /
``join_groups``.

Independent sides: the expected groups, counts and metrics are worked out by hand from the
script; the expected advantages are the closed form ``(R - mean) / (std + eps)`` (Bessel's
correction) of each kept group's rewards, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo_core import loop as loop_module
from grpo_core.adapter import Rollout
from grpo_core.config import GRPOConfig
from grpo_core.loop import GRPOTrainer
from tests.toy_adapter import ToyAdapter

G, B = 3, 4
SIG, ZERO, ONES = [1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


class ScriptedAdapter(ToyAdapter):
    """ToyAdapter whose outcome rewards are ``script[draw][group]`` (G values per group);
    records every draw it was asked for."""

    def __init__(self, script: dict[int, list[list[float]]], **kw):
        super().__init__(t_max=4, **kw)
        self.script, self.draws, self.forwards = script, [], []

    def logp_and_entropy(self, model, rollout, rows):
        if len(rows) == 0:  # as a real model's forward, which cannot run on no rows
            raise ValueError("a forward on no rows")
        self.forwards.append((rollout, rows))
        return super().logp_and_entropy(model, rollout, rows)

    def collect(self, *, num_groups, group_size, iteration):
        return self._scripted(num_groups, group_size, iteration, 0)

    def collect_more(self, *, num_groups, group_size, iteration, draw):
        return self._scripted(num_groups, group_size, iteration, draw)

    def _scripted(self, num_groups, group_size, iteration, draw):
        self.draws.append(draw)
        ro = super().collect(num_groups=num_groups, group_size=group_size, iteration=100 * iteration + draw)
        values = torch.tensor([v for grp in self.script[draw] for v in grp], dtype=ro.rewards.dtype)
        last = ro.mask.sum(1) - 1
        ro.rewards.zero_()
        ro.rewards[torch.arange(len(values)), last] = values
        ro.inputs.update(draw=torch.full((len(values),), draw), row=torch.arange(len(values)))
        ro.info = {"reward_mean": float(values.mean())}
        return ro

    def join_groups(self, parts):
        rows = [torch.tensor([b * G + i for b in groups for i in range(G)]) for _, groups in parts]
        pick = lambda f: torch.cat([f(r)[idx] for (r, _), idx in zip(parts, rows)])  # noqa: E731
        inputs = {k: pick(lambda r, k=k: r.inputs[k]) for k in ("tokens", "draw", "row")}
        return Rollout(rewards=pick(lambda r: r.rewards), mask=pick(lambda r: r.mask),
                       old_logp=None if parts[0][0].old_logp is None else pick(lambda r: r.old_logp),
                       inputs=inputs, info=parts[0][0].info)


def config(**kw):
    base = dict(group_size=G, groups_per_iteration=B, grpo_epochs=1, beta=0.0, stats_over="sequences",
                gamma=1.0, lr=0.1, dynamic_sampling=True, dynamic_sampling_rounds=2, seed=0)
    return GRPOConfig(**dict(base, **kw))


def spy_loss(monkeypatch):
    """Record (adv, mask) of every grpo_loss call of the loop."""
    seen = []
    real = loop_module.grpo_loss

    def spy(logp, old_logp, ref_logp, adv, mask, **kw):
        seen.append((adv.detach().clone(), mask.clone()))
        return real(logp, old_logp, ref_logp, adv, mask, **kw)
    monkeypatch.setattr(loop_module, "grpo_loss", spy)
    return seen


def closed_form(group: list[float], eps: float) -> list[float]:
    m = sum(group) / len(group)
    s = math.sqrt(sum((x - m) ** 2 for x in group) / (len(group) - 1))
    return [(x - m) / (s + eps) for x in group]


def test_drops_refills_and_trains_on_the_first_groups_with_signal(monkeypatch):
    script = {0: [SIG, ZERO, [0.2, 0.9, 0.4], ONES],
              1: [ONES, [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.6]],
              2: [SIG] * B}
    ad = ScriptedAdapter(script)
    seen = spy_loss(monkeypatch)
    st = GRPOTrainer(ad, config()).step()
    assert ad.draws == [0, 1]  # 2 found in draw 0, 3 more in draw 1: no third draw
    assert st["sampling_rounds"] == 2 and st["extra_generations"] == B * G
    assert st["groups_dropped"] == 2 + 1 and st["groups_trained"] == B
    assert st["zero_signal_groups"] == 2 and st["reward_mean"] == pytest.approx(sum(map(sum, script[0])) / 12)
    # trained rows: draw 0 groups 0, 2; draw 1 groups 1, 2 (group 3 of draw 1 is surplus)
    adv, mask = seen[0]
    rollout, rows = ad.forwards[-1]  # the update's forward: the loss sees adv[rows]
    source = [(int(rollout.inputs["draw"][r]), int(rollout.inputs["row"][r])) for r in rows]
    last = mask.sum(1) - 1
    got = dict(zip(source, adv[torch.arange(len(rows)), last].tolist()))
    want = {}
    for draw, group in ((0, 0), (0, 2), (1, 1), (1, 2)):
        for i, a in enumerate(closed_form(script[draw][group], config().adv_eps)):
            want[(draw, group * G + i)] = a
    assert got.keys() == want.keys()
    assert [got[k] for k in want] == pytest.approx(list(want.values()), abs=1e-9)


def test_nothing_dropped_nothing_drawn(monkeypatch):
    ad = ScriptedAdapter({0: [SIG] * B})
    st = GRPOTrainer(ad, config()).step()
    assert ad.draws == [0]
    got = (st["sampling_rounds"], st["extra_generations"], st["groups_dropped"], st["groups_trained"])
    assert got == (1, 0, 0, B)


def test_draws_run_out_trains_on_fewer_groups(monkeypatch):
    """Two extra draws, one group with signal in all: a batch of one group (G rows), also when
    that is fewer rows than minibatches."""
    ad = ScriptedAdapter({0: [ZERO, ONES, ZERO, ONES], 1: [ONES] * B, 2: [ZERO, ZERO, SIG, ZERO]})
    seen = spy_loss(monkeypatch)
    st = GRPOTrainer(ad, config(minibatches=4)).step()
    assert ad.draws == [0, 1, 2]
    assert st["groups_trained"] == 1 and st["groups_dropped"] == 11 and st["extra_generations"] == 2 * B * G
    assert [m.shape[0] for _, m in seen] == [1] * G  # min(minibatches, rows) = 3 minibatches
    assert st["skipped_steps"] == 1  # the sample at the group mean (advantage 0) alone


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_fewer_rows_than_minibatches_without_old_logp(beta):
    """The loop computes old log-probs (and the reference's) of the joined batch by minibatch
    chunks: one group of G = 3 rows and minibatches = 4 runs 3 one-row forwards, none empty."""
    ad = ScriptedAdapter({0: [ZERO, ONES, ZERO, ONES], 1: [ONES] * B, 2: [ZERO, ZERO, SIG, ZERO]})
    real = ad._scripted

    def without_old_logp(*a):
        ro = real(*a)
        ro.old_logp = None  # as the VLM adapter leaves it to the loop
        return ro
    ad._scripted = without_old_logp
    ad.join_groups = lambda parts: ScriptedAdapter.join_groups(ad, parts)
    st = GRPOTrainer(ad, config(minibatches=4, beta=beta)).step()
    assert st["groups_trained"] == 1
    joined = [len(rows) for ro, rows in ad.forwards if ro.rewards.shape[0] == G]  # not the draws' own
    assert joined == [1] * G * (3 if beta else 2)  # old log-probs, (reference,) update: 3 chunks each


@torch.no_grad()
def _batch_logp_with_empty_chunks(self, model, rollout):
    """The old chunking: ``minibatches`` chunks whatever the rows, empty ones included."""
    n = rollout.rewards.shape[0]
    return torch.cat([self.adapter.logp_and_entropy(model, rollout, rows)[0]
                      for rows in torch.arange(n).tensor_split(self.config.minibatches)])


def test_the_fewer_rows_test_rejects_empty_chunks(monkeypatch):
    monkeypatch.setattr(GRPOTrainer, "_batch_logp", _batch_logp_with_empty_chunks)
    with pytest.raises(ValueError, match="a forward on no rows"):
        test_fewer_rows_than_minibatches_without_old_logp(0.0)


def test_no_signal_in_any_draw_is_a_no_signal_iteration():
    ad = ScriptedAdapter({0: [ZERO] * B, 1: [ONES] * B, 2: [ZERO] * B})
    tr = GRPOTrainer(ad, config())
    before = ad.policy.logits.detach().clone()
    st = tr.step()
    assert st["groups_trained"] == 0 and st["skipped_steps"] == 1 and st["sampling_rounds"] == 3
    assert torch.equal(ad.policy.logits, before)


@pytest.mark.parametrize("script, kept", [([SIG, ZERO, SIG, ONES], [0, 2]), ([SIG, SIG, ZERO, SIG], [0, 1, 3])])
def test_rounds_zero_only_drops(monkeypatch, script, kept):
    ad = ScriptedAdapter({0: script})
    seen = spy_loss(monkeypatch)
    st = GRPOTrainer(ad, config(dynamic_sampling_rounds=0)).step()
    assert ad.draws == [0] and st["groups_trained"] == len(kept) and st["extra_generations"] == 0
    assert st["zero_signal_groups"] == B - len(kept)
    rollout, rows = ad.forwards[-1]  # the loss saw the kept groups only, not the whole draw
    assert sorted(int(rollout.inputs["row"][r]) for r in rows) == [b * G + i for b in kept for i in range(G)]
    assert seen[0][1].shape[0] == len(kept) * G


def test_off_by_default_and_refused_without_the_adapter_methods():
    assert GRPOConfig().dynamic_sampling is False
    with pytest.raises(ValueError, match="collect_more and join_groups; ToyAdapter has no collect_more or join_groups$"):
        GRPOTrainer(ToyAdapter(), config())
    ad = ScriptedAdapter({0: [SIG, ZERO, SIG, ONES]})
    st = GRPOTrainer(ad, config(dynamic_sampling=False)).step()
    assert ad.draws == [0] and "groups_dropped" not in st and st["zero_signal_groups"] == 2


@pytest.mark.parametrize("field, value", [("dynamic_sampling_rounds", -1), ("dynamic_sampling", "yes")])
def test_invalid_options_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


# --- dynamic_sampling_redraw="retry" -------------------------------------------------------------

class RetryAdapter(ScriptedAdapter):
    """ScriptedAdapter whose retries are scripted too: ``script[("retry", draw)]`` holds one
    group's rewards per retried group, in the order asked (the first as many as asked); ``asked`` records each retry's
    (draw, groups, the rollout it names)."""

    def __init__(self, script, **kw):
        super().__init__(script, **kw)
        self.asked, self.iteration_script = [], {}

    def collect(self, *, num_groups, group_size, iteration):
        if iteration in self.iteration_script:
            self.script[0] = self.iteration_script[iteration]
        return super().collect(num_groups=num_groups, group_size=group_size, iteration=iteration)

    def collect_more(self, *, num_groups, group_size, iteration, draw, again=None):
        assert again is not None, "a retry run asked for a fresh draw"
        rollout, groups = again
        assert len(groups) == num_groups
        self.asked.append((draw, list(groups), rollout))
        self.script[draw] = self.script[("retry", draw)][:num_groups]
        return self._scripted(num_groups, group_size, iteration, draw)


def retry_config(**kw):
    return config(dynamic_sampling_redraw="retry", **kw)


def test_retry_draws_the_unsolved_prompts_again_until_they_have_signal(monkeypatch):
    """First draw: solved, unsolved, signal, unsolved (best outcome 1.0). Groups 1 and 3 are
    retried; retry 1 gives group 3 signal, retry 2 gives group 1 signal. The update trains
    draw 0's group 2, retry 1's group 3 and retry 2's group 1, each with its own group's
    closed-form advantages; the solved group is dropped without a retry."""
    script = {0: [ONES, ZERO, SIG, [0.5, 0.5, 0.5]],
              ("retry", 1): [ZERO, [0.0, 1.0, 0.0]],
              ("retry", 2): [[1.0, 1.0, 0.0]]}
    ad = RetryAdapter(script)
    seen = spy_loss(monkeypatch)
    tr = GRPOTrainer(ad, retry_config())
    st = tr.step()
    assert [(d, gs) for d, gs, _ in ad.asked] == [(1, [1, 3]), (2, [1])]
    assert all(ro.inputs["draw"][0] == 0 for _, _, ro in ad.asked)  # groups of the first draw
    assert st["sampling_rounds"] == 3 and st["extra_generations"] == 3 * G
    assert st["groups_retried"] == 2 and st["groups_trained"] == 3
    assert st["groups_dropped"] == 3 + 1  # draw 0: solved + 2 unsolved; retry 1: group 1 again
    assert tr.best_outcome == 1.0
    adv, mask = seen[0]
    rollout, rows = ad.forwards[-1]
    source = [(int(rollout.inputs["draw"][r]), int(rollout.inputs["row"][r])) for r in rows]
    last = mask.sum(1) - 1
    got = dict(zip(source, adv[torch.arange(len(rows)), last].tolist()))
    want = {}
    for draw, group, rewards in ((0, 2, SIG), (1, 1, [0.0, 1.0, 0.0]), (2, 0, [1.0, 1.0, 0.0])):
        for i, a in enumerate(closed_form(rewards, config().adv_eps)):
            want[(draw, group * G + i)] = a
    assert got.keys() == want.keys()
    assert [got[k] for k in want] == pytest.approx(list(want.values()), abs=1e-9)


def trained_sources(ad) -> list[tuple[int, int]]:
    """(draw, group) of each group the last update trained (all G rows of each), sorted."""
    rollout, rows = ad.forwards[-1]
    pairs = [(int(rollout.inputs["draw"][r]), int(rollout.inputs["row"][r]) // G) for r in rows]
    assert all(pairs.count(p) == G for p in pairs)
    return sorted(set(pairs))


def test_retry_costs_nothing_when_the_groups_without_signal_are_solved():
    ad = RetryAdapter({0: [ONES, SIG, ONES, SIG]})
    st = GRPOTrainer(ad, retry_config()).step()
    assert ad.asked == [] and ad.draws == [0]
    got = (st["sampling_rounds"], st["extra_generations"], st["groups_retried"], st["groups_dropped"],
           st["groups_trained"])
    assert got == (1, 0, 0, 2, 2)
    assert trained_sources(ad) == [(0, 1), (0, 3)]  # the solved groups are dropped, not trained


def test_a_retry_that_fills_the_batch_is_trained():
    """Three groups with signal and one retried into signal: the update trains the retry's
    group in place of the first draw's empty one (the shortcut for a full batch is only for a
    first draw with signal everywhere)."""
    ad = RetryAdapter({0: [SIG, SIG, [0.2, 0.9, 0.4], ZERO], ("retry", 1): [[0.0, 1.0, 0.0]]})
    st = GRPOTrainer(ad, retry_config()).step()
    assert [gs for _, gs, _ in ad.asked] == [[3]] and st["groups_trained"] == B
    assert trained_sources(ad) == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_retries_raise_the_best_outcome():
    ad = RetryAdapter({0: [ZERO, [0.5, 0.0, 0.5], ZERO, ZERO], ("retry", 1): [[2.0] * G, ZERO, ZERO]})
    tr = GRPOTrainer(ad, retry_config(dynamic_sampling_rounds=1))
    tr.step()
    assert tr.best_outcome == 2.0


def test_retry_judges_solved_against_the_best_outcome_of_the_run():
    """Iteration 0 scores 0 everywhere (best 0: nothing is below it, no retry, a no-signal
    step); iteration 1 has a 1.0, so iteration 2's zeros are unsolved and retried. A trainer
    restored from iteration 2's checkpoint retries the same way; one that forgot the best
    (an older checkpoint) does not."""
    script = {("retry", 1): [ZERO] * B, ("retry", 2): [ZERO] * B}
    ad = RetryAdapter(script)
    ad.iteration_script = {0: [ZERO] * B, 1: [ONES, ZERO, ZERO, ZERO], 2: [ZERO] * B}
    tr = GRPOTrainer(ad, retry_config())
    st0 = tr.step()
    assert ad.asked == [] and st0["skipped_steps"] == 1 and tr.best_outcome == 0.0
    st1 = tr.step()
    assert [gs for _, gs, _ in ad.asked] == [[1, 2, 3], [1, 2, 3]] and st1["groups_trained"] == 0
    state = tr.state_dict()
    assert state["best_outcome"] == 1.0
    ad.asked.clear()
    st2 = tr.step()
    assert [gs for _, gs, _ in ad.asked] == [[0, 1, 2, 3]] * 2 and st2["groups_retried"] == 4

    for saved, retries in ((state, 2), ({k: v for k, v in state.items() if k != "best_outcome"}, 0)):
        ad2 = RetryAdapter(dict(script))
        ad2.iteration_script = dict(ad.iteration_script)
        tr2 = GRPOTrainer(ad2, retry_config())
        tr2.load_state_dict(saved)
        tr2.step()
        assert len(ad2.asked) == retries


def test_retry_rounds_run_out_trains_the_first_draws_signal():
    ad = RetryAdapter({0: [SIG, ZERO, ONES, ONES], ("retry", 1): [ZERO]})
    st = GRPOTrainer(ad, retry_config(dynamic_sampling_rounds=1)).step()
    assert [gs for _, gs, _ in ad.asked] == [[1]]
    assert (st["groups_trained"], st["groups_dropped"], st["extra_generations"]) == (1, 4, G)
    assert trained_sources(ad) == [(0, 0)]
    ad = RetryAdapter({0: [SIG, ZERO, ONES, ONES]})
    st = GRPOTrainer(ad, retry_config(dynamic_sampling_rounds=0)).step()
    assert ad.asked == [] and (st["groups_retried"], st["groups_trained"]) == (0, 1)


def test_retry_needs_an_adapter_that_takes_again():
    with pytest.raises(ValueError, match="dynamic_sampling_redraw='retry' needs .* ScriptedAdapter"):
        GRPOTrainer(ScriptedAdapter({0: [SIG] * B}), retry_config())
    with pytest.raises(ValueError, match="dynamic_sampling_redraw='sometimes'"):
        config(dynamic_sampling_redraw="sometimes")
    assert GRPOConfig().dynamic_sampling_redraw == "fresh"


def test_unsolved_needs_more_than_rounding_below_the_best():
    """The solved test is on the signal, not an exact float: a group 1 ulp below the best is
    solved; one 1e-3 below is not; a group without a valid sample (NaN) never is unsolved."""
    assert not loop_module._below(1.0 - 2.0 ** -52, 1.0)
    assert loop_module._below(1.0 - 1e-3, 1.0)
    assert not loop_module._below(math.nan, 1.0)
    assert not loop_module._below(0.0, -math.inf)


class _NaNIsSolved(GRPOTrainer):
    """The rule before correctness pass 2: a group without a valid sample (NaN outcome) is
    compared with the best like any other, so it counts as solved and is dropped unretried."""

    def _retry_unsolved(self, rollout, adv):
        real = loop_module._unsolved
        loop_module._unsolved = loop_module._below
        try:
            return super()._retry_unsolved(rollout, adv)
        finally:
            loop_module._unsolved = real


class _EmptyGroupAdapter(RetryAdapter):
    """Group 1 of the first draw has no valid step in any sample (every reward None, or every
    completion truncated and masked)."""

    def _scripted(self, num_groups, group_size, iteration, draw):
        ro = super()._scripted(num_groups, group_size, iteration, draw)
        if draw == 0:
            ro.mask[G:2 * G] = 0
        return ro


@pytest.mark.parametrize("cls, retried", [(GRPOTrainer, [[1]]), (_NaNIsSolved, [])])
def test_a_group_without_a_valid_sample_is_unsolved(cls, retried):
    """Nothing says such a group is solved: it is retried (the broken rule drops it)."""
    ad = _EmptyGroupAdapter({0: [SIG, ZERO, SIG, SIG], ("retry", 1): [[0.0, 1.0, 0.0]]})
    tr = cls(ad, retry_config())
    tr.best_outcome = 1.0
    st = tr.step()
    assert [gs for _, gs, _ in ad.asked] == retried
    assert st["groups_trained"] == B - 1 + len(retried)
    assert loop_module._unsolved(math.nan, 1.0) and loop_module._unsolved(math.nan, -math.inf)


# --- what retry does to the objective (correctness pass 2, item 1) -------------------------------

class BernoulliPrompts(RetryAdapter):
    """Slot k of a draw holds prompt k % 2: prompt 0 succeeds with probability P[0], prompt 1
    with P[1]; every sample's outcome reward is 1 on success, else 0, drawn from one seeded
    stream. A retry of slot k samples the same prompt again. ``trained`` counts, per prompt, the
    groups the update saw with signal."""

    P = (0.1, 0.6)

    def __init__(self, seed):
        super().__init__({})
        self.gen = torch.Generator().manual_seed(seed)
        self.trained = [0, 0]

    def _draw(self, prompts):
        p = torch.tensor([self.P[q] for q in prompts for _ in range(G)], dtype=torch.float64)
        ok = (torch.rand(p.shape, generator=self.gen, dtype=torch.float64) < p).double()
        return [ok[i * G:(i + 1) * G].tolist() for i in range(len(prompts))]

    def collect(self, *, num_groups, group_size, iteration):
        self.script[0] = self._draw([k % 2 for k in range(num_groups)])
        return self._scripted(num_groups, group_size, iteration, 0)

    def collect_more(self, *, num_groups, group_size, iteration, draw, again=None):
        rollout, groups = again
        self.script[draw] = self._draw([int(rollout.inputs["prompt"][k * G]) for k in groups])
        ro = self._scripted(num_groups, group_size, iteration, draw)
        ro.inputs["prompt"] = rollout.inputs["prompt"].view(-1, G)[groups].reshape(-1)
        return ro

    def _scripted(self, num_groups, group_size, iteration, draw):
        ro = super()._scripted(num_groups, group_size, iteration, draw)
        if draw == 0:
            ro.inputs["prompt"] = torch.arange(num_groups).repeat_interleave(G) % 2
        return ro

    def join_groups(self, parts):
        joined = super().join_groups(parts)
        joined.inputs["prompt"] = torch.cat([r.inputs["prompt"].view(-1, G)[gs].reshape(-1) for r, gs in parts])
        return joined


class _CountingTrainer(GRPOTrainer):
    """Counts the groups with signal that reach the update, by prompt, and skips the update
    itself (what is measured is which groups are trained, not how)."""

    def _update(self, rollout, adv, ref_logp):
        has = ((adv != 0) & rollout.mask.bool()).view(-1, G * adv.shape[1]).any(1)
        for q, h in zip(rollout.inputs["prompt"].view(-1, G)[:, 0].tolist(), has.tolist()):
            self.adapter.trained[q] += int(h)
        return {}


def _weight(p: float, rounds: int) -> tuple[float, float]:
    """(chance a slot of this prompt is trained under plain GRPO, under retry): a group has
    signal with s = 1 - p^G - (1-p)^G; it failed every sample with z = (1-p)^G, and then each
    of the rounds retries finds signal with chance s."""
    s, z = 1 - p ** G - (1 - p) ** G, (1 - p) ** G
    return s, s + z * (1 - (1 - s) ** rounds)


@pytest.mark.parametrize("redraw", ["none", "retry"])
def test_retry_weights_each_prompt_as_the_formula_says(redraw):
    """Per prompt slot, the share of iterations its group is trained, against the formula of
    ``GRPOConfig.dynamic_sampling_redraw`` (plain GRPO: s_q; retry: s_q + z_q (1 - (1 - s_q)^R)),
    within 4 binomial standard deviations; and the hard/easy ratio, about twice plain GRPO's
    with retry. By hand for G = 3, R = 2: plain 0.27 / 0.72 = 0.375; retry (0.27 + 0.729 x
    (1 - 0.73^2)) / (0.72 + 0.064 x (1 - 0.28^2)) = 0.61052 / 0.77898 = 0.7837."""
    iterations, rounds = 1500, 2
    ad = BernoulliPrompts(seed=11)
    kw = dict(dynamic_sampling_rounds=rounds, group_size=G, groups_per_iteration=4)
    cfg = retry_config(**kw) if redraw == "retry" else config(dynamic_sampling=False, **kw)
    tr = _CountingTrainer(ad, cfg)
    tr.best_outcome = 1.0  # a success was seen: a group that failed everywhere is unsolved
    for _ in range(iterations):
        tr.step()
    slots = iterations * 2  # two slots per prompt per iteration
    want = [(_weight(p, rounds)[0] if redraw == "none" else _weight(p, rounds)[1]) for p in BernoulliPrompts.P]
    for q in (0, 1):
        sd = math.sqrt(slots * want[q] * (1 - want[q]))
        assert abs(ad.trained[q] - slots * want[q]) < 4 * sd, (q, ad.trained[q], slots * want[q])
    ratio = ad.trained[0] / ad.trained[1]
    closed = {"none": 0.375, "retry": 0.7837}[redraw]
    assert want[0] / want[1] == pytest.approx(closed, abs=5e-4)
    assert ratio == pytest.approx(closed, abs=0.05)


# --- the VLM adapter ----------------------------------------------------------------------------

pytest.importorskip("transformers")

from .test_vlm import _one_thread, _quiet_transformers, make_adapter, mixed_dataset, tiny_dirs  # noqa: E402,F401


def test_vlm_collect_more_draws_other_prompts_deterministically(tiny_dirs):
    ad = make_adapter(tiny_dirs, dataset=mixed_dataset() * 4)
    assert ad.prompt_indices(3, 2, draw=1) != ad.prompt_indices(3, 2, draw=2)
    assert ad.prompt_indices(3, 2, draw=1) == ad.prompt_indices(3, 2, draw=1)
    a = ad.collect_more(num_groups=2, group_size=2, iteration=3, draw=1)
    b = ad.collect_more(num_groups=2, group_size=2, iteration=3, draw=1)
    assert torch.equal(a.inputs["completion_ids"], b.inputs["completion_ids"])
    with pytest.raises(ValueError, match="draw must be >= 1"):
        ad.collect_more(num_groups=2, group_size=2, iteration=3, draw=0)


def test_vlm_retry_draws_the_named_groups_prompts_again(tiny_dirs):
    """``collect_more(again=(rollout, [2, 0]))``: the items of groups 2 and 0 of ``rollout``, in
    that order (their prompt tokens and reward columns), sampled from a stream of their own
    (deterministic); ``join_groups`` carries each group's item."""
    ad = make_adapter(tiny_dirs, dataset=mixed_dataset() * 2)
    first = ad.collect(num_groups=4, group_size=2, iteration=5)
    assert first.inputs["items"] == ad.prompt_indices(5, 4)
    again = ad.collect_more(num_groups=2, group_size=2, iteration=5, draw=1, again=(first, [2, 0]))
    assert again.inputs["items"] == [first.inputs["items"][2], first.inputs["items"][0]]
    for k, grp in enumerate((2, 0)):
        src, dst = first.inputs["prompt_ids"][grp * 2], again.inputs["prompt_ids"][k * 2]
        assert torch.equal(src[first.inputs["prompt_attn"][grp * 2].bool()], dst[again.inputs["prompt_attn"][k * 2].bool()])
    same = ad.collect_more(num_groups=2, group_size=2, iteration=5, draw=1, again=(first, [2, 0]))
    assert torch.equal(again.inputs["completion_ids"], same.inputs["completion_ids"])
    fresh = ad.collect_more(num_groups=2, group_size=2, iteration=5, draw=1)
    assert fresh.inputs["items"] == ad.prompt_indices(5, 2, draw=1)
    joined = ad.join_groups([(first, [1]), (again, [1, 0])])
    assert joined.inputs["items"] == [first.inputs["items"][1], first.inputs["items"][0], first.inputs["items"][2]]
    with pytest.raises(ValueError, match="again names 1 groups, num_groups is 2"):
        ad.collect_more(num_groups=2, group_size=2, iteration=5, draw=1, again=(first, [1]))


@pytest.mark.parametrize("encode_once", [True, False])
def test_vlm_join_groups_keeps_every_row_and_its_logp(tiny_dirs, encode_once):
    """Groups of two rollouts with different prompt lengths, image counts and completion
    lengths: each joined row has its source's tokens, reward, mask and log-probs (1e-5)."""
    ad = make_adapter(tiny_dirs, dataset=mixed_dataset(), max_new_tokens=6, encode_once=encode_once)
    g = 2
    a = ad.collect(num_groups=4, group_size=g, iteration=0)
    b = ad.collect_more(num_groups=4, group_size=g, iteration=0, draw=1)
    for seed, ro in enumerate((a, b)):  # per-step scoring (process supervision): random valid steps
        ro.scored = (torch.rand(ro.mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.5) & ro.mask
    joined = ad.join_groups([(a, [3, 1]), (b, [2])])
    joined.validate(g, 3)
    src = [(a, r) for grp in (3, 1) for r in range(grp * g, grp * g + g)] + [(b, r) for r in range(2 * g, 3 * g)]
    lp, _ = ad.forward_logp(ad.policy, joined, torch.arange(3 * g))
    for k, (ro, r) in enumerate(src):
        n = int(ro.mask[r].sum())
        assert torch.equal(joined.inputs["completion_ids"][k, :n], ro.inputs["completion_ids"][r, :n])
        assert torch.equal(joined.rewards[k, :n], ro.rewards[r, :n]) and int(joined.mask[k].sum()) == n
        assert torch.equal(joined.scored[k, :n], ro.scored[r, :n]) and not joined.scored[k, n:].any()
        want, _ = ad.forward_logp(ad.policy, ro, torch.tensor([r]))
        torch.testing.assert_close(lp[k, :n], want[0, :n], rtol=0, atol=1e-5)
        assert joined.inputs["completions"][k] == ro.inputs["completions"][r]
    b.scored = None
    with pytest.raises(ValueError, match="some parts mark their scored steps"):
        ad.join_groups([(a, [3]), (b, [2])])


@pytest.mark.slow
def test_vlm_training_with_dynamic_sampling_reports_what_it_did(tiny_dirs):
    ad = make_adapter(tiny_dirs, old_logp_forward=False, max_new_tokens=2, eos_bias=False)
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, beta=0.0, stats_over="sequences",
                     gamma=1.0, lr=1e-3, dynamic_sampling=True, dynamic_sampling_rounds=1, seed=0)
    tr = GRPOTrainer(ad, cfg)
    rounds = [tr.step() for _ in range(4)]
    for st in rounds:
        assert st["extra_generations"] == (st["sampling_rounds"] - 1) * 8
        assert st["groups_trained"] + st["groups_dropped"] <= 2 * st["sampling_rounds"]
        assert math.isfinite(st["loss"])
    assert any(st["groups_dropped"] > 0 for st in rounds)  # an untrained model scores 0 mostly


def test_a_join_that_drops_the_engine_logprobs_is_refused():
    """Rollouts sampled by another engine carry engine_logp; a join_groups that loses it would
    let the loop skip the correction without a word."""
    class Engine(ScriptedAdapter):
        def _scripted(self, *a, **kw):
            ro = super()._scripted(*a, **kw)
            ro.engine_logp = ro.old_logp.clone() if ro.old_logp is not None else torch.zeros_like(ro.rewards)
            return ro

    ad = Engine({0: [SIG, ZERO, SIG, SIG], 1: [SIG] * B})
    with pytest.raises(ValueError) as err:
        GRPOTrainer(ad, config()).step()
    assert str(err.value) == ("Engine.join_groups dropped Rollout.engine_logp: the joined rollout must carry the "
                              "parts' engine log-probs (engine_correction needs them)")
