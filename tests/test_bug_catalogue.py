"""The field's GRPO bugs (issue 28, registry in ``tests/bug_catalogue.py``), each caught.

For every caught entry, ``test_bug_is_caught[key]`` builds the broken variant at the level where
the bug lives (an estimator or a loss for the kit; a piece of the trainer injected into the real
``GRPOTrainer``; an adapter or an engine handing the loop its tensors) and asserts that the named
check fails on it and passes on the correct code. The variants are written from the threads'
descriptions; where the project already had one (EasyR1 596, NeMo-RL 1518, slime 657, the
detached KL) it is reused.

Independent sides: the float64 oracle (``reference/``), closed forms, the naive log-softmax,
the kit's measured rows, the Rollout contract, and settings that must change the update.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import warnings
from unittest import mock

import pytest
import torch

from grpo_core import group_advantages
from grpo_core.adapter import Rollout
from grpo_core.config import GRPOConfig
from grpo_core.logprobs import entropy_from_logits, selective_logp, selective_logp_and_entropy
from grpo_core.loop import GRPOTrainer
from grpo_core.losses import DR_GRPO, agg_count, clipped_policy_loss
from grpo_core.testing import strategies as gs
from grpo_core.testing.kit import BUILTINS, check_estimator
from reference import grpo_math as ref
from tests import wrong_estimators as wrong
from tests.bug_catalogue import CATALOGUE, KINDS, LEVELS, TEST_MODULE, TEST_NAME, by_key
from tests.toy_adapter import ToyAdapter

F64 = torch.float64


def kit_row(fn, kind: str, name: str, **claims):
    """The kit's row ``name`` for ``fn`` (every row runs, as ``check-estimator`` runs them)."""
    rows = {r.name: r for r in check_estimator(fn, kind, claims=claims)}
    return rows[name]


# =============================================================================================
# Kit level: estimators and losses
# =============================================================================================

# --- TRL 3992: the scale knob's branches inverted ---------------------------------------------

def _core_advantage(scale: str):
    """The core's group advantages on (B, G) outcome scores, TRL's eps 1e-4."""
    def adv(scores):
        b, g = scores.shape
        flat = scores.reshape(b * g, 1)
        return group_advantages(flat, torch.ones_like(flat), g, gamma=1.0, scale=scale,
                                stats_over="sequences", eps=1e-4).reshape(b, g)

    return adv


def _inverted_scale(scale: str):
    """TRL 3992's branches: "group" (the default) only centres; "none" and "batch" both divide
    by the group's std."""
    def adv(scores):
        centred = scores - scores.mean(-1, keepdim=True)
        if scale == "group":
            return centred
        return centred / (scores.std(-1, keepdim=True) + 1e-4)

    return adv


def _oracle_advantage(scores: torch.Tensor, scale: str) -> torch.Tensor:
    nested = [[[s] for s in row] for row in scores.tolist()]
    out = ref.group_advantages(nested, gamma=1.0, scale=scale, stats_over="sequences", eps=1e-4)
    return torch.tensor([[sample[0] for sample in group] for group in out], dtype=F64)


def demo_trl_3992():
    for scale, scaled in (("group", True), ("none", False)):
        assert kit_row(_core_advantage(scale), "advantage", "unit_scale", std_scaled=scaled).passed
        assert kit_row(_inverted_scale(scale), "advantage", "unit_scale", std_scaled=scaled).failed
    assert kit_row(_core_advantage("group"), "advantage", "affine_invariance", std_scaled=True).passed
    assert kit_row(_inverted_scale("group"), "advantage", "affine_invariance", std_scaled=True).failed
    spread = torch.tensor([[1.0], [4.0], [0.3]], dtype=F64)  # groups of different spreads
    scores = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64) * spread
    want = _oracle_advantage(scores, "batch")
    assert torch.allclose(_core_advantage("batch")(scores), want, rtol=1e-12, atol=0)
    assert not torch.allclose(_inverted_scale("batch")(scores), want, rtol=1e-3, atol=0)


# --- sequence advantages: TRL 4db63af (wrong axis), AReaL 1346 (padding in the mean) ----------

def _sequence_advantage(adv, mask, *, masked: bool = True):
    """One advantage per response, the mean of its tokens' (an outcome advantage is the same at
    every token); ``masked=False`` averages over all T positions, padding included."""
    if not masked:
        return adv.mean(-1)
    return (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _clipped(ratio, a, eps=0.2):
    return -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)


def _token_ratio_loss(*, unsqueeze: bool):
    """PPO token ratio times a (N,) response advantage, token-mean. TRL commit 4db63af: without
    ``unsqueeze(1)`` the (N,) vector meets (N, T) along T, so token t takes response t's
    advantage (it runs only when N == T)."""
    def loss(logp, old_logp, adv, mask):
        a = _sequence_advantage(adv, mask)
        a = a[:, None] if unsqueeze else a
        tok = _clipped(torch.exp(logp - old_logp), a)
        return (tok * mask).sum() / mask.sum().clamp(min=1)

    return loss


def _gspo_sequence_advantage_loss(*, masked: bool):
    """GSPO (a response's ratio, clipped once) with a response advantage, seq-mean-token-mean.
    AReaL 1346: the advantage averaged over every position, padding included."""
    def loss(logp, old_logp, adv, mask):
        m = mask.bool()
        log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))
        s = torch.exp(log_ratio.sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
        a = _sequence_advantage(adv, mask, masked=masked)[:, None]
        per_row = (_clipped(s, a) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        rows = mask.sum(-1) > 0
        return per_row[rows].sum() / rows.sum().clamp(min=1)

    return loss


def demo_trl_4db63af():
    assert kit_row(_token_ratio_loss(unsqueeze=True), "loss", "row_equivariance").passed
    row = kit_row(_token_ratio_loss(unsqueeze=False), "loss", "row_equivariance")
    assert row.failed and "a row's loss depends on other rows' values" in row.explanation


def demo_areal_1346():
    assert kit_row(_gspo_sequence_advantage_loss(masked=True), "loss", "padding_invariance").passed
    row = kit_row(_gspo_sequence_advantage_loss(masked=False), "loss", "padding_invariance")
    assert row.failed and "junk under mask = 0 changed the loss" in row.explanation


# --- reused kit variants: NeMo-RL 1518, EasyR1 596 ---------------------------------------------

def demo_nemo_rl_1518():
    assert kit_row(BUILTINS["rloo_advantage"], "advantage", "bounded_advantage").passed
    row = kit_row(wrong.adv_loo_std_of_others, "advantage", "bounded_advantage")
    assert row.failed and "NeMo-RL issue 1518" in row.explanation


def demo_easyr1_596():
    assert kit_row(BUILTINS["gspo_loss"], "loss", "row_equivariance").passed
    row = kit_row(wrong.gspo_wrong_axis, "loss", "row_equivariance")
    assert row.failed and "EasyR1 issue 596" in row.explanation


# --- verl 3741: Dr. GRPO without the division by the number of sequences ----------------------

DR_CLAIMS = dict(eps_low=0.2, eps_high=0.2, agg=DR_GRPO, max_len=48, clip_ratio_c=None)


def _dr_grpo(logp, old_logp, adv, mask):
    return clipped_policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, agg=DR_GRPO,
                               max_len=48)[0]


def _dr_grpo_no_sequence_division(logp, old_logp, adv, mask):
    """verl 3741: every token's loss summed and divided by the constant length only."""
    tok = _clipped(torch.exp(logp - old_logp), adv)
    return torch.where(mask.bool(), tok, torch.zeros_like(tok)).sum() / 48


def demo_verl_3741():
    assert kit_row(_dr_grpo, "loss", "aggregation", **DR_CLAIMS).passed
    row = kit_row(_dr_grpo_no_sequence_division, "loss", "aggregation", **DR_CLAIMS)
    assert row.failed and row.value == "token-sum / max_len"


# =============================================================================================
# Loop level: pieces of the trainer injected into the real GRPOTrainer
# =============================================================================================

class _GradRecorder(torch.optim.Optimizer):
    """An optimizer that records the gradient of every step and moves no weight: every update of
    the iteration then runs at ratio 1, where the oracle's gradient is simple to state."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads.append(torch.cat([p.grad.reshape(-1).clone() for g in self.param_groups
                                     for p in g["params"]]))


class _Recording:
    """Trainer mixin: records (rollout, advantages, rows) of every minibatch step."""

    def _minibatch_step(self, rollout, adv, ref_logp, rows):
        self.steps.append((rollout, adv, rows))
        return super()._minibatch_step(rollout, adv, ref_logp, rows)


PROBE = dict(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0,
             ent_coef=0.0, max_grad_norm=0.0, lr=1.0, skip_zero_grad_steps=False, seed=0)


def _probe(trainer_cls, adapter, **overrides):
    """One iteration of ``trainer_cls`` with the recording optimizer; the trainer and the
    recorded gradients (one per optimizer step)."""
    cls = type(f"Recording{trainer_cls.__name__}", (_Recording, trainer_cls), {})
    optimizer = _GradRecorder(list(adapter.policy.parameters()))
    trainer = cls(adapter, GRPOConfig(**{**PROBE, **overrides}), optimizer=optimizer)
    trainer.steps = []
    trainer.step()
    return trainer, optimizer.grads


def _oracle_gradient(adapter, config: GRPOConfig, rollout: Rollout, adv, rows) -> torch.Tensor:
    """The gradient of one minibatch's loss wrt the policy's weights, from the float64 oracle's
    per-token derivatives (``reference.grpo_math.grpo_loss``: its own normaliser, over the
    minibatch's valid tokens) chained through the policy's log-probs."""
    model = copy.deepcopy(adapter.policy)
    logp, _ = adapter.logp_and_entropy(model, rollout, rows)
    mask = rollout.mask[rows].bool()
    lp = gs.unpad(logp, mask)
    _, _, d = ref.grpo_loss(lp, gs.unpad(rollout.old_logp[rows], mask), lp, gs.unpad(adv[rows], mask),
                            [[0.0] * len(x) for x in lp], beta=0.0, ent_coef=0.0, kl_estimator="k3",
                            eps_low=config.clip_eps_low, eps_high=config.clip_eps_high,
                            agg=config.loss_agg)
    dloss = torch.zeros_like(logp)
    dloss[mask] = torch.tensor([x for row in d for x in row], dtype=logp.dtype)
    grads = torch.autograd.grad((dloss * logp).sum(), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def gradients_match_oracle(trainer_cls, adapter, **overrides) -> bool:
    """Every optimizer step's gradient equals the oracle's for its minibatch (float64)."""
    trainer, grads = _probe(trainer_cls, adapter, **overrides)
    assert len(grads) == len(trainer.steps) > 0
    for got, (rollout, adv, rows) in zip(grads, trainer.steps):
        want = _oracle_gradient(adapter, trainer.config, rollout, adv, rows)
        if not torch.allclose(got, want, rtol=1e-10, atol=1e-14 * float(want.abs().max())):
            return False
    return True


# --- normalisers: TRL 6439, TRL 6024, ms-swift 10117, verl 6957, AReaL 1273 -------------------

class _TruncationMaskingToy(ToyAdapter):
    """Completions that ran out of room (all t_max tokens, no end) leave the loss, as TRL's
    ``mask_truncated_completions`` does: their mask is zeroed. ``inputs["generated_mask"]``
    keeps the mask as generated (what a token count taken at generation time sees)."""

    def collect(self, **kw):
        rollout = super().collect(**kw)
        generated = rollout.mask.clone()
        truncated = generated.all(1)
        rollout.mask = generated & ~truncated[:, None]
        rollout.inputs["generated_mask"] = generated
        rollout.info["truncated"] = float(truncated.sum())
        return rollout


class _CountBeforeTruncationMask(GRPOTrainer):
    """TRL 6439: the token-mean divides by the tokens counted at generation, truncated
    completions included, while the numerator leaves them out."""

    def _micro_loss(self, rollout, adv, ref_logp, rows, total, skip):
        stale = agg_count(rollout.inputs["generated_mask"][rows], self.config.loss_agg)
        return super()._micro_loss(rollout, adv, ref_logp, rows, stale, skip)


class _CountOfTheWholeRollout(GRPOTrainer):
    """TRL 6024 (issue 5619): the count of the whole generation batch divides the loss of each
    optimizer step, which covers only part of it (here: one of the minibatches)."""

    def _micro_loss(self, rollout, adv, ref_logp, rows, total, skip):
        everything = agg_count(rollout.mask, self.config.loss_agg)
        return super()._micro_loss(rollout, adv, ref_logp, rows, everything, skip)


class _DividedByMicroBatches(GRPOTrainer):
    """ms-swift 10117 / AReaL 1273: a loss already divided by the minibatch's global count is
    divided again by the number of micro-batches (the accumulation steps; Megatron's schedule)."""

    def _micro_batches(self, rows):
        parts = super()._micro_batches(rows)
        self._parts = len(parts)
        return parts

    def _micro_loss(self, *args):
        loss, stats = super()._micro_loss(*args)
        return loss / self._parts, stats


class _PerMicroBatchMean(GRPOTrainer):
    """verl 6957: each micro-batch's loss divided by its own count, and the micro-batches'
    gradients summed: about K times the minibatch's mean."""

    def _micro_loss(self, rollout, adv, ref_logp, rows, total, skip):
        own = agg_count(rollout.mask[rows], self.config.loss_agg)
        return super()._micro_loss(rollout, adv, ref_logp, rows, own, skip)


def demo_trl_6439():
    rollout = _TruncationMaskingToy(seed=7).collect(num_groups=2, group_size=4, iteration=0)
    assert rollout.info["truncated"] == 2  # rows 0 and 7 ran out of room; both groups keep signal
    assert gradients_match_oracle(GRPOTrainer, _TruncationMaskingToy(seed=7))
    assert not gradients_match_oracle(_CountBeforeTruncationMask, _TruncationMaskingToy(seed=7))


def demo_trl_6024():
    assert gradients_match_oracle(GRPOTrainer, ToyAdapter(seed=0), minibatches=2)
    assert not gradients_match_oracle(_CountOfTheWholeRollout, ToyAdapter(seed=0), minibatches=2)


def _micro_batch_demo(broken):
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert gradients_match_oracle(GRPOTrainer, ToyAdapter(seed=1), micro_batch_size=2, loss_agg=agg)
        assert not gradients_match_oracle(broken, ToyAdapter(seed=1), micro_batch_size=2, loss_agg=agg)


def demo_ms_swift_10117():
    _micro_batch_demo(_DividedByMicroBatches)


def demo_verl_6957():
    _micro_batch_demo(_PerMicroBatchMean)


def demo_areal_1273():
    _micro_batch_demo(_DividedByMicroBatches)


# --- slime 2247: the dual-clip bound never reaches the loss -----------------------------------

class _DualClipNotPassed(GRPOTrainer):
    """slime 2247: the configured dual-clip bound is not passed on to the policy loss."""

    def _micro_loss(self, *args):
        config = self.config
        self.config = config.replace(clip_ratio_c=None)
        try:
            return super()._micro_loss(*args)
        finally:
            self.config = config


def dual_clip_changes_the_update(trainer_cls) -> bool:
    """8 epochs at a large lr push ratios past 1.5 (as ``tests/test_loop.py::
    test_dual_clip_is_a_config_option``): the bound c = 1.5 must change the trained weights."""
    weights = {}
    for c in (None, 1.5):
        adapter = ToyAdapter(seed=3)
        cfg = GRPOConfig(group_size=8, groups_per_iteration=2, grpo_epochs=8, minibatches=1, beta=0.0,
                         lr=0.5, clip_ratio_c=c)
        trainer_cls(adapter, cfg).step()
        weights[c] = adapter.policy.logits.detach().clone()
    return not torch.equal(weights[None], weights[1.5])


def demo_slime_2247():
    assert dual_clip_changes_the_update(GRPOTrainer)
    assert not dual_clip_changes_the_update(_DualClipNotPassed)


# --- slime 657: the masked-IS tokens left in the normaliser (reused variant) ------------------

def demo_slime_657():
    from tests.test_engine_correction import batch, core, oracle

    data = batch(3)
    want, _ = oracle(*data, mode="mis", level="token", agg="token-mean")
    with warnings.catch_warnings():  # the helper takes float() of a loss that has a gradient
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad", UserWarning)
        good = core(*data, mode="mis", level="token", agg="token-mean")[0]
        bad = core(*data, mode="mis", level="token", agg="token-mean", normaliser_keeps_masked=True)[0]
    assert good == pytest.approx(want, rel=1e-12)
    assert bad != pytest.approx(want, rel=1e-3)


# --- verl PR 179 (the KL penalty subtracted), open-instruct 530 (the KL on detached log-probs) ---

class _KLSubtracted(GRPOTrainer):
    """verl PR 179's loss: policy loss minus beta times the KL (a reward for leaving the
    reference). The config is copied with beta negated, past its validation."""

    def _micro_loss(self, *args):
        config = self.config
        flipped = copy.copy(config)
        object.__setattr__(flipped, "beta", -config.beta)
        self.config = flipped
        try:
            return super()._micro_loss(*args)
        finally:
            self.config = config


@functools.lru_cache(maxsize=1)
def _cartpole_oracle():
    """The parity setting hard-freq1 of ``tests/test_cartpole_parity.py`` (beta 0.1, 2 epochs, 2
    minibatches, float64) and the float64 CartPole oracle's run of it."""
    from reference.cartpole_grpo import run_oracle
    from tests.test_cartpole_parity import BASE, ITERATIONS, SETTINGS, oracle_config, run_core

    cfg = GRPOConfig(**{**BASE, **SETTINGS["hard-freq1"]})
    initial, _ = run_core(cfg, iterations=0)
    return cfg, initial, run_oracle(oracle_config(cfg), initial, ITERATIONS)


def parity_gap(trainer_cls=GRPOTrainer, patch: tuple | None = None) -> float:
    """Largest relative gap between the loop (``trainer_cls``, with ``patch`` applied to the
    core while it runs) and the CartPole oracle, over parameters and metrics of 3 iterations."""
    from tests.test_cartpole_parity import parity_gaps, run_core

    cfg, initial, oracle = _cartpole_oracle()
    with mock.patch(*patch) if patch else contextlib.nullcontext():
        start, core = run_core(cfg, trainer_cls)
    assert all(torch.equal(start[k], initial[k]) for k in initial)  # same seed, same weights
    return max(parity_gaps(core, oracle).values())


def demo_verl_179():
    assert _cartpole_oracle()[0].beta > 0
    assert parity_gap() < 1e-9
    assert parity_gap(_KLSubtracted) > 1e-6


def demo_open_instruct_530():
    from tests.test_cartpole_parity import _kl_detached
    from tests.test_catches_mistakes import core_kl, k3_detached, kl_direction_ok

    assert parity_gap() < 1e-9
    assert parity_gap(patch=("grpo_core.losses.kl_estimate", _kl_detached)) > 1e-6  # the loop's KL
    assert kl_direction_ok(core_kl("k3"), "KL(ref||pi)")  # the estimator alone, by enumeration
    assert not kl_direction_ok(k3_detached, "KL(ref||pi)")


# =============================================================================================
# Adapter level: what an adapter or an engine hands the loop
# =============================================================================================

# --- AReaL 1454: groups of varying size --------------------------------------------------------

FAILED_ROW = 1


class _DropsFailedSample(ToyAdapter):
    """AReaL 1454's batch: a sample that failed (row 1) is dropped, so group 0 holds 3 rows and
    a fixed stride of G would read row 4 (group 1's) into it."""

    def collect(self, **kw):
        r = super().collect(**kw)
        keep = [i for i in range(r.mask.shape[0]) if i != FAILED_ROW]
        inputs = {k: v[keep] for k, v in r.inputs.items()}
        return Rollout(rewards=r.rewards[keep], mask=r.mask[keep], old_logp=r.old_logp[keep],
                       inputs=inputs, info=r.info)


class _MasksFailedSample(ToyAdapter):
    """The harness's form: the failed sample keeps its row, fully masked."""

    def collect(self, **kw):
        r = super().collect(**kw)
        r.mask[FAILED_ROW] = False
        return r


def demo_areal_1454():
    cfg = dict(gamma=1.0, stats_over="sequences")
    with pytest.raises(ValueError, match=r"expected \(8, T\) for 2 groups of 4"):
        GRPOTrainer(_DropsFailedSample(seed=1), GRPOConfig(**{**PROBE, **cfg})).step()
    trainer, _ = _probe(GRPOTrainer, _MasksFailedSample(seed=1), **cfg)
    rollout, adv, _ = trainer.steps[0]
    outcome = rollout.inputs["outcome"].tolist()
    survivors = [i for i in range(4) if i != FAILED_ROW]
    values = [outcome[i] for i in survivors]
    assert len(set(values)) > 1, "group 0 needs signal"
    assert torch.equal(adv[FAILED_ROW], torch.zeros_like(adv[FAILED_ROW]))
    for i in survivors:  # the closed form over the survivors: (R - mean) / (std + eps), gamma 1
        want = (outcome[i] - statistics.fmean(values)) / (statistics.stdev(values) + GRPOConfig().adv_eps)
        got = adv[i][rollout.mask[i]]
        assert got.tolist() == pytest.approx([want] * len(got), rel=1e-12)


# --- OpenRLHF 1319: entropy before the temperature ---------------------------------------------

def _entropy_before_temperature(logits, ids, *, temperature, chunk):
    """OpenRLHF 1319's forward: log-probs of softmax(logits / T), entropy of softmax(logits)."""
    return (selective_logp(logits, ids, temperature=temperature, chunk=chunk),
            entropy_from_logits(logits, temperature=1.0, chunk=chunk))


def matches_naive(fn, temperatures=(0.7, 1.5)) -> bool:
    """Log-probs and entropies equal the naive float log_softmax(logits / T) ones (as
    ``tests/test_logprobs.py::test_forward_matches_naive``)."""
    from tests.test_logprobs import naive

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 50, generator=gen) * 4
    ids = torch.randint(0, 50, (3, 5), generator=gen)
    for t in temperatures:
        lp, h = fn(logits, ids, temperature=t, chunk=7)
        want_lp, want_h = naive(logits, ids, t)
        same_lp = torch.allclose(lp, want_lp, atol=1e-5, rtol=0)
        if not (same_lp and torch.allclose(h, want_h, atol=1e-5, rtol=0)):
            return False
    return True


def demo_openrlhf_1319():
    assert matches_naive(selective_logp_and_entropy)
    assert not matches_naive(_entropy_before_temperature)
    assert matches_naive(_entropy_before_temperature, temperatures=(1.0,))  # why the check needs T != 1


# --- TRL 4159, NeMo-RL 3297: an engine's log-probs of another distribution or token -----------

class _EngineToy(ToyAdapter):
    """The toy task sampled at temperature T by an "engine" that reports each sampled token's
    log-prob (``Rollout.engine_logp``); the trainer scores tokens under softmax(logits / T) too.
    ``engine``: "matched" (the distribution sampled from), "no-temperature" (TRL 4159: the raw
    model's log-probs) or "first-entry" (NeMo-RL 3297: the log-prob of the top-ranked token,
    the first entry of the per-position dictionary, whatever token was sampled)."""

    def __init__(self, *, temperature: float = 0.6, engine: str = "matched", **kw):
        super().__init__(**kw)
        self.temperature, self.engine = temperature, engine

    def _log_probs(self, model) -> torch.Tensor:
        return torch.log_softmax(model.logits / self.temperature, -1)  # (T, V)

    def collect(self, *, num_groups: int, group_size: int, iteration: int) -> Rollout:
        n = num_groups * group_size
        gen = torch.Generator().manual_seed(1000 * self.seed + iteration)
        with torch.no_grad():
            logq = self._log_probs(self.policy)
            probs = logq.exp()
            tokens = torch.stack([torch.multinomial(probs, 1, generator=gen).squeeze(-1) for _ in range(n)])
            lengths = torch.randint(1, self.t_max + 1, (n,), generator=gen)
            mask = torch.arange(self.t_max)[None, :] < lengths[:, None]
            outcome = ((tokens == 0) & mask).sum(1).double() / lengths.double()
            rewards = torch.zeros(n, self.t_max, dtype=logq.dtype)
            rewards[torch.arange(n), lengths - 1] = outcome.to(rewards.dtype)
            scores = torch.log_softmax(self.policy.logits, -1) if self.engine == "no-temperature" else logq
            reported = logq.argmax(-1).expand(n, -1) if self.engine == "first-entry" else tokens
            engine_logp = scores.gather(1, reported.T).T
        rollout = Rollout(rewards=rewards, mask=mask, old_logp=None, inputs={"tokens": tokens},
                          info={"mean_return": float(outcome.mean())}, engine_logp=engine_logp)
        with torch.no_grad():
            rollout.old_logp = self.logp_and_entropy(self.policy, rollout, torch.arange(n))[0]
        return rollout

    def logp_and_entropy(self, model, rollout: Rollout, rows: torch.Tensor):
        logq = self._log_probs(model)
        logp = logq.gather(1, rollout.inputs["tokens"][rows].T).T
        entropy = -(logq.exp() * logq).sum(-1).expand(len(rows), -1)
        return logp, entropy


def engine_matches_on_policy(adapter) -> tuple[bool, dict]:
    """The engine sampled with the policy's own weights: its log-probs are the trainer's, so the
    loop's mismatch metrics (``engine_correction``) are exactly 0 and 1 in float64."""
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=1e-2)
    m = GRPOTrainer(adapter, cfg).step()
    ok = (m["mismatch_kl"] <= 1e-12 and abs(m["is_ratio_min"] - 1) <= 1e-12
          and abs(m["is_ratio_max"] - 1) <= 1e-12)
    return ok, m


def demo_trl_4159():
    assert engine_matches_on_policy(_EngineToy(seed=2))[0]
    ok, m = engine_matches_on_policy(_EngineToy(seed=2, engine="no-temperature"))
    assert not ok and m["mismatch_kl"] > 1e-3


def demo_nemo_rl_3297():
    assert engine_matches_on_policy(_EngineToy(seed=2))[0]
    ok, m = engine_matches_on_policy(_EngineToy(seed=2, engine="first-entry"))
    assert not ok and m["mismatch_kl"] > 1e-3


# --- verl 4708: old log-probs in train mode (dropout on) --------------------------------------

from tests.test_loop import _DropoutTable  # noqa: E402  (the loop tests' policy with dropout on its logits)


class _DropoutToy(ToyAdapter):
    """A policy with dropout on its logits in every train-mode forward (verl 4708's LoRA dropout);
    old log-probs left to the loop."""

    def __init__(self, p: float = 0.3, **kw):
        super().__init__(**kw)
        self.policy = _DropoutTable(self.policy, p)

    def collect(self, **kw):
        rollout = super().collect(**kw)
        rollout.old_logp = None
        return rollout

    def logp_and_entropy(self, model, rollout, rows):
        logq = torch.log_softmax(model.drop(model.logits), -1)
        logp = logq.gather(1, rollout.inputs["tokens"][rows].T).T
        return logp, -(logq.exp() * logq).sum(-1).expand(len(rows), -1)


def demo_verl_4708():
    from adapters.vlm_preflight import check_deterministic_forward
    from grpo_core.determinism import StochasticForwardError

    adapter = _DropoutToy(seed=1)
    rollout = adapter.collect(num_groups=2, group_size=4, iteration=0)
    adapter.policy.eval()
    assert check_deterministic_forward(adapter, adapter.policy, rollout).passed
    adapter.policy.train()
    row = check_deterministic_forward(adapter, adapter.policy, rollout)
    assert not row.passed and "drop (Dropout, p=0.3)" in row.explanation
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=1e-2)
    with pytest.raises(StochasticForwardError, match="drop"):  # the loop's own check, on its shortcut
        GRPOTrainer(adapter, cfg).step()


def demo_verl_4708_loop():
    """Two epochs, old log-probs left to the loop, the policy in train mode: refused; in eval
    mode it trains."""
    from grpo_core.determinism import StochasticForwardError

    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=2, minibatches=1, beta=0.0, lr=1e-2)
    adapter = _DropoutToy(seed=1)
    adapter.policy.train()
    with pytest.raises(StochasticForwardError, match="verl issue 4708"):
        GRPOTrainer(adapter, cfg).step()
    adapter.policy.eval()
    GRPOTrainer(adapter, cfg).step()


# =============================================================================================
# The catalogue's tests
# =============================================================================================

DEMOS = {
    "trl-3992": demo_trl_3992,
    "trl-4db63af": demo_trl_4db63af,
    "trl-6439": demo_trl_6439,
    "trl-6024": demo_trl_6024,
    "ms-swift-10117": demo_ms_swift_10117,
    "verl-6957": demo_verl_6957,
    "areal-1273": demo_areal_1273,
    "areal-1454": demo_areal_1454,
    "areal-1346": demo_areal_1346,
    "nemo-rl-1518": demo_nemo_rl_1518,
    "easyr1-596": demo_easyr1_596,
    "slime-2247": demo_slime_2247,
    "slime-657": demo_slime_657,
    "openrlhf-1319": demo_openrlhf_1319,
    "trl-4159": demo_trl_4159,
    "nemo-rl-3297": demo_nemo_rl_3297,
    "verl-4708": demo_verl_4708,
    "verl-4708-loop": demo_verl_4708_loop,
    "verl-3741": demo_verl_3741,
    "verl-179": demo_verl_179,
    "open-instruct-530": demo_open_instruct_530,
}


def test_the_catalogue_is_consistent():
    """Keys unique; every caught entry has a demonstration here and every demonstration an
    entry; kinds and levels valid; an entry not caught says why and has no test."""
    keys = [b.key for b in CATALOGUE]
    assert len(keys) == len(set(keys))
    assert set(DEMOS) == {b.key for b in CATALOGUE if b.caught}
    for bug in CATALOGUE:
        assert bug.kind in KINDS and bug.level in LEVELS, bug.key
        if bug.caught:
            assert bug.test == f"{TEST_MODULE}::{TEST_NAME}[{bug.key}]"
        else:
            assert bug.test is None and len(bug.note) > 40, bug.key
    assert __file__.replace("\\", "/").endswith(TEST_MODULE)
    assert globals()[TEST_NAME] is test_bug_is_caught


@pytest.mark.parametrize("key", [b.key for b in CATALOGUE if b.caught])
def test_bug_is_caught(key):
    """The broken variant fails the entry's check; the correct code passes it."""
    assert by_key()[key].caught
    DEMOS[key]()

