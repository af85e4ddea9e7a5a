"""The training loop: identities the plan implies, reference timing, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adapters.cartpole import CartPoleAdapter
from grpo_core.adapter import Rollout
from grpo_core.config import GRPOConfig
from grpo_core.loop import GRPOTrainer, NonFiniteLossError
from grpo_core.refmodel import hard_refresh, soft_refresh
from tests.toy_adapter import ToyAdapter

SMALL = dict(group_size=4, groups_per_iteration=2, grpo_epochs=3, minibatches=2, lr=1e-2)


def cartpole_trainer(keep_reference=None, **overrides) -> GRPOTrainer:
    cfg = GRPOConfig(**{**SMALL, **overrides})
    return GRPOTrainer(CartPoleAdapter(seed=cfg.seed, hidden=16, dtype=torch.float64), cfg,
                       keep_reference=keep_reference)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_one_epoch_one_minibatch_ratio_is_exactly_one():
    tr = cartpole_trainer(grpo_epochs=1, minibatches=1)
    for _ in range(3):
        m = tr.step()
        assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0
        assert m["clip_frac_low"] == 0.0 and m["clip_frac_high"] == 0.0


def test_later_epochs_move_the_ratio():
    """The counterpart of the identity above: with several epochs the ratio leaves 1."""
    m = cartpole_trainer(grpo_epochs=4, minibatches=1).step()
    assert m["ratio_min"] < 1.0 < m["ratio_max"]


def test_beta_zero_makes_the_reference_irrelevant():
    def run(perturb: bool, beta: float):
        tr = cartpole_trainer(beta=beta, update_ref_model_freq=0, keep_reference=True)
        if perturb:
            with torch.no_grad():
                for p in tr.reference.parameters():
                    p.add_(torch.randn_like(p))
        for _ in range(3):
            tr.step()
        return params(tr.policy)

    assert same(run(False, 0.0), run(True, 0.0))
    assert not same(run(False, 0.1), run(True, 0.1))  # the same check can fail when beta > 0


def test_no_reference_is_kept_when_beta_is_zero():
    assert cartpole_trainer(beta=0.0).reference is None
    assert cartpole_trainer(beta=0.1).reference is not None
    with pytest.raises(ValueError, match="keep_reference=False needs beta=0"):
        cartpole_trainer(beta=0.1, keep_reference=False)


class _SignalThenSilence(ToyAdapter):
    """Rewards with variance at iteration 0, then all zero (no group has signal)."""

    def collect(self, *, iteration, **kw):
        r = super().collect(iteration=iteration, **kw)
        if iteration > 0:
            r.rewards = torch.zeros_like(r.rewards)
        return r


@pytest.mark.parametrize("skip", [True, False])
def test_zero_gradient_steps_are_skipped(skip):
    """With no signal the gradient is exactly 0; Adam would still move the weights on its
    momentum. The guard keeps weights and optimizer state as they were."""
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, beta=0.0, ent_coef=0.0, grpo_epochs=2,
                     lr=0.05, skip_zero_grad_steps=skip)
    tr = GRPOTrainer(_SignalThenSilence(seed=1), cfg)
    first = tr.step()
    assert first["skipped_steps"] == 0 and first["grad_norm"] > 0
    before = params(tr.policy)
    second = tr.step()
    assert second["grad_norm_max"] == 0.0
    assert second["skipped_steps"] == (2 if skip else 0)
    assert same(params(tr.policy), before) == skip


def test_hard_refresh_every_iteration_zeroes_kl_at_start():
    tr = cartpole_trainer(beta=0.1, update_ref_model_freq=1)
    for _ in range(3):
        assert tr.step()["kl_start"] == 0.0
    frozen = cartpole_trainer(beta=0.1, update_ref_model_freq=0)
    kls = [frozen.step()["kl_start"] for _ in range(3)]
    assert kls[0] == 0.0 and kls[1] > 0 and kls[2] > 0


@pytest.mark.parametrize("freq", [1, 2, 3])
def test_reference_refresh_timing(freq):
    """Refreshed after the rollout and before the updates of iterations 0, freq, 2*freq...:
    the reference then equals the policy that existed when the iteration started."""
    tr = cartpole_trainer(beta=0.1, update_ref_model_freq=freq)
    initial = params(tr.policy)
    assert same(params(tr.reference), initial)
    last_refresh = initial
    for it in range(5):
        start = params(tr.policy)
        tr.step()
        if it % freq == 0:
            last_refresh = start
        assert same(params(tr.reference), last_refresh), f"iteration {it}"


def test_the_reference_is_a_frozen_independent_copy():
    """``frozen_copy`` (the adapters' ``make_reference``): eval mode (a dropout layer of the
    policy in train mode is off in the copy), no parameter that autograd would track, and
    storage of its own: a policy step moves the policy, not the reference, and leaves no
    gradient on it."""
    from grpo_core.refmodel import frozen_copy

    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).train()
    ref = frozen_copy(policy)
    assert policy.training and not ref.training and not any(m.training for m in ref.modules())
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    x = torch.randn(5, 3)
    assert torch.equal(ref(x), ref(x))  # no dropout noise
    tr = cartpole_trainer(beta=0.1, update_ref_model_freq=0)
    before = params(tr.reference)
    for _ in range(2):
        tr.step()
    assert same(params(tr.reference), before) and not same(params(tr.policy), before)
    assert all(p.grad is None and not p.requires_grad for p in tr.reference.parameters())


def test_soft_refresh_alpha_one_is_a_copy_and_zero_does_nothing():
    policy, ref = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    before = params(ref)
    soft_refresh(ref, policy, 0.0)
    assert same(params(ref), before)
    soft_refresh(ref, policy, 1.0)
    assert same(params(ref), params(policy))
    ref2 = torch.nn.Linear(3, 2).double()
    mixed = {k: 0.25 * params(policy)[k] + 0.75 * v for k, v in params(ref2).items()}
    soft_refresh(ref2, policy, 0.25)
    assert all(torch.allclose(params(ref2)[k], mixed[k], rtol=1e-15, atol=1e-15) for k in mixed)
    hard_refresh(ref2, policy)
    assert same(params(ref2), params(policy)) and not ref2.training
    assert not any(p.requires_grad for p in ref2.parameters())


def test_outcome_reward_with_gamma_one_is_standard_grpo():
    """gamma = 1, final reward only, statistics over sequences: one update of the loop equals
    the textbook GRPO step written out here with plain formulas."""
    cfg = GRPOConfig(group_size=5, groups_per_iteration=3, gamma=1.0, grpo_epochs=1, minibatches=1,
                     beta=0.0, ent_coef=0.0, max_grad_norm=0.0, stats_over="sequences",
                     scale="group", loss_agg="seq-mean-token-mean", lr=0.05)
    adapter = ToyAdapter(seed=3)
    start = copy.deepcopy(adapter.policy)
    tr = GRPOTrainer(adapter, cfg)
    rollout = adapter.collect(num_groups=3, group_size=5, iteration=0)
    tr.step()

    # textbook GRPO: A_i = (R_i - mean_group) / (std_group + 1e-8), loss = -mean_i mean_t A_i logp_it
    outcome = rollout.inputs["outcome"].view(3, 5)
    adv = ((outcome - outcome.mean(1, keepdim=True)) / (outcome.std(1, keepdim=True) + 1e-8)).flatten()
    logp_all = torch.log_softmax(start.logits, -1)
    loss = 0.0
    for i in range(15):
        steps = torch.nonzero(rollout.mask[i]).flatten()
        logps = torch.stack([logp_all[t, rollout.inputs["tokens"][i, t]] for t in steps])
        loss = loss - adv[i] * logps.mean() / 15
    opt = torch.optim.Adam(start.parameters(), lr=0.05)
    loss.backward()
    opt.step()
    torch.testing.assert_close(adapter.policy.logits, start.logits, rtol=1e-12, atol=1e-14)


class _BadAdapter(ToyAdapter):
    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def collect(self, **kw) -> Rollout:
        r = super().collect(**kw)
        if self.fault == "shape":
            r.old_logp = r.old_logp[:, :-1]
        elif self.fault == "rows":
            r.rewards = r.rewards[:-1]
        elif self.fault == "nan":
            r.rewards[0, 0] = float("nan")
        return r

    def logp_and_entropy(self, model, rollout, rows):
        logp, ent = super().logp_and_entropy(model, rollout, rows)
        if self.fault == "nan_logp" and torch.is_grad_enabled():  # the update forward only
            logp = logp * float("nan")
        if self.fault == "inf_grad" and torch.is_grad_enabled():  # a finite loss, an infinite gradient
            logp.register_hook(lambda g: torch.full_like(g, float("inf")))
        return logp, ent


@pytest.mark.parametrize("fault,needle", [("shape", "Rollout.old_logp"), ("rows", "Rollout.rewards"),
                                          ("nan", "Rollout.rewards")])
def test_bad_rollouts_name_the_culprit(fault, needle):
    tr = GRPOTrainer(_BadAdapter(fault), GRPOConfig(group_size=2, groups_per_iteration=2))
    with pytest.raises(ValueError, match=needle):
        tr.step()


def test_nan_loss_stops_before_the_optimizer_steps():
    adapter = _BadAdapter("nan_logp")
    tr = GRPOTrainer(adapter, GRPOConfig(group_size=2, groups_per_iteration=2, grpo_epochs=2))
    before = params(adapter.policy)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        tr.step()
    assert same(params(adapter.policy), before)


def test_a_non_finite_gradient_of_a_finite_loss_stops_before_the_optimizer_steps():
    adapter = _BadAdapter("inf_grad")
    tr = GRPOTrainer(adapter, GRPOConfig(group_size=2, groups_per_iteration=2, grpo_epochs=2))
    before = params(adapter.policy)
    with pytest.raises(NonFiniteLossError, match=r"^iteration 0: gradient norm is nan$"):
        tr.step()
    assert same(params(adapter.policy), before)


@pytest.mark.parametrize("field,value", [
    ("group_size", 0), ("groups_per_iteration", -1), ("gamma", 1.5), ("gamma", float("nan")),
    ("grpo_epochs", 0), ("minibatches", 0), ("update_ref_model_freq", -1), ("ref_update", "copy"),
    ("ref_mix_alpha", 2.0), ("clip_eps_low", 1.0), ("clip_eps_high", -0.1), ("beta", -1.0),
    ("kl_estimator", "k4"), ("scale", "std"), ("stats_over", "tokens"), ("loss_agg", "mean"),
    ("ent_coef", -0.01), ("max_grad_norm", -1.0), ("lr", 0.0), ("seed", -3), ("group_size", 2.5),
])
def test_invalid_config_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as err:
        GRPOConfig(**{field: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_dr_grpo_without_a_max_len_is_refused_naming_it():
    cfg = GRPOConfig(group_size=2, groups_per_iteration=2, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"loss_agg='seq-mean-token-sum-norm' divides by a constant length: "
                                         r"set max_len \(the maximum completion length\) in the config; "
                                         r"this adapter has none"):
        GRPOTrainer(ToyAdapter(), cfg)
    assert GRPOTrainer(ToyAdapter(), cfg.replace(max_len=5)).max_len == 5
    adapter = ToyAdapter()
    adapter.max_len = 7  # the adapter's own, when the config has none
    assert GRPOTrainer(adapter, cfg).max_len == 7


def test_metrics_name_their_iteration():
    tr = GRPOTrainer(ToyAdapter(), GRPOConfig(group_size=2, groups_per_iteration=2))
    assert [tr.step()["iteration"] for _ in range(3)] == [0, 1, 2]


def test_from_dict_suggests_the_closest_key():
    with pytest.raises(ValueError, match="did you mean 'grpo_epochs'"):
        GRPOConfig.from_dict({"grpo_epoch": 3})
    assert GRPOConfig.from_dict({"beta": 0.0}).beta == 0.0


def test_too_many_minibatches_is_rejected():
    with pytest.raises(ValueError, match="minibatches=9"):
        GRPOConfig(group_size=2, groups_per_iteration=4, minibatches=9)


class _NoOldLogp(ToyAdapter):
    """Leaves Rollout.old_logp to the loop."""

    def collect(self, **kw) -> Rollout:
        r = super().collect(**kw)
        r.old_logp = None
        return r


@pytest.mark.parametrize("epochs,minibatches", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_old_logp_left_to_the_loop_gives_the_same_training(epochs, minibatches):
    """One epoch and one minibatch: the update's forward, detached; otherwise a forward before
    any update. Either way the same weights as when the adapter fills old_logp itself."""
    cfg = GRPOConfig(group_size=4, groups_per_iteration=3, grpo_epochs=epochs, minibatches=minibatches,
                     beta=0.1, ent_coef=0.01, lr=0.05)
    filled, lazy = GRPOTrainer(ToyAdapter(seed=2), cfg), GRPOTrainer(_NoOldLogp(seed=2), cfg)
    for _ in range(3):
        a, b = filled.step(), lazy.step()
        assert a["loss"] == b["loss"] and a["ratio_max"] == b["ratio_max"]
    assert same(params(filled.policy), params(lazy.policy))


# ---------------------------------------------------------------------------------------------
# the zero-signal skip is decided from the signal (correctness pass, item 2)
# ---------------------------------------------------------------------------------------------


class _NoSignalNoisyReference(ToyAdapter):
    """Every reward 0 (no group has signal), and the reference's forward differs from the
    policy's by rounding-sized noise (~1e-7), as a frozen copy on another kernel path does."""

    def collect(self, *, iteration, **kw):
        r = super().collect(iteration=iteration, **kw)
        r.rewards = torch.zeros_like(r.rewards)
        return r

    def logp_and_entropy(self, model, rollout, rows):
        logp, ent = super().logp_and_entropy(model, rollout, rows)
        if model is not self.policy:
            gen = torch.Generator().manual_seed(7)
            logp = logp + 1e-7 * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
        return logp, ent


class _OldSkipRule(GRPOTrainer):
    """The rule before the correctness pass: skip only when the gradient norm is exactly 0."""

    def _no_signal(self, adv, mask):
        return False

    def _clip_gradients(self):
        norm = super()._clip_gradients()
        if norm == 0.0:
            self.optimizer.zero_grad(set_to_none=True)  # Adam skips params without grad
        return norm


NOISY = dict(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.1,
             update_ref_model_freq=1, ent_coef=0.0, lr=1e-2)


def test_no_signal_step_is_skipped_despite_rounding_noise():
    """Zero advantages, beta > 0, a fresh hard refresh: the KL term's gradient is rounding noise
    (norm ~1e-8, not 0). The step is skipped and the weights do not move; the old rule (norm
    exactly 0) steps on the noise and Adam turns it into weight changes of about lr."""
    with pytest.warns(UserWarning, match="does nothing"):
        cfg = GRPOConfig(**NOISY)
    tr = GRPOTrainer(_NoSignalNoisyReference(seed=3), cfg)
    before = params(tr.policy)
    m = tr.step()
    assert m["skipped_steps"] == 1 and same(params(tr.policy), before)

    old = _OldSkipRule(_NoSignalNoisyReference(seed=3), cfg)
    before = params(old.policy)
    m = old.step()
    moved = max(float((a - before[k]).abs().max()) for k, a in params(old.policy).items())
    assert m["skipped_steps"] == 0 and 0 < m["grad_norm"] < 1e-6
    assert moved > 0.1 * cfg.lr, "Adam normalises the noise into a step of the order of lr"


@pytest.mark.parametrize("case", ["reference-differs", "entropy-bonus", "signal", "k1"])
def test_steps_with_a_real_gradient_are_taken(case):
    """The other side: zero advantages with a reference that differs from the policy (a real
    KL gradient), or with an entropy bonus, or with k1 (gradient 1 per token even at the
    reference), or advantages that are not all 0: all step."""
    overrides = {"reference-differs": dict(update_ref_model_freq=0),
                 "entropy-bonus": dict(ent_coef=0.01),
                 "signal": dict(beta=0.0),
                 "k1": dict(kl_estimator="k1")}[case]
    cfg = GRPOConfig(**{**NOISY, **overrides})
    adapter = ToyAdapter(seed=3) if case == "signal" else _NoSignalNoisyReference(seed=3)
    tr = GRPOTrainer(adapter, cfg)
    if case == "reference-differs":  # move the policy away from the frozen initial reference
        with torch.no_grad():
            tr.policy.logits.mul_(2.0)  # a different distribution at every position
        tr.ref_is_policy = False
    before = params(tr.policy)
    m = tr.step()
    assert m["skipped_steps"] == 0 and m["grad_norm"] > 1e-4
    assert not same(params(tr.policy), before)


def test_reference_equality_is_tracked_through_steps_and_refreshes():
    """ref_is_policy: True after the initial copy and after a hard refresh, False after an
    optimizer step, restored from a checkpoint."""
    tr = cartpole_trainer(beta=0.1, update_ref_model_freq=2, grpo_epochs=1, minibatches=1)
    assert tr.ref_is_policy
    tr.step()  # iteration 0 refreshes, then steps
    assert tr.ref_is_policy is False
    tr.step()  # iteration 1: no refresh
    assert tr.ref_is_policy is False
    tr.refresh_reference(2)
    assert tr.ref_is_policy
    state = tr.state_dict()
    other = cartpole_trainer(beta=0.1, update_ref_model_freq=2, grpo_epochs=1, minibatches=1)
    other.ref_is_policy = False
    other.load_state_dict(state)
    assert other.ref_is_policy


def test_a_restored_trainer_continues_as_the_uninterrupted_one():
    """state_dict -> load_state_dict into a fresh trainer (other weights): the policy,
    the reference (refreshed every 3 iterations, so it lags the policy at the save), Adam's
    moments and the iteration carry over; the next steps match the uninterrupted run exactly."""
    cfg = GRPOConfig(group_size=4, groups_per_iteration=3, grpo_epochs=2, minibatches=2, beta=0.1,
                     update_ref_model_freq=3, lr=0.05)
    a = GRPOTrainer(ToyAdapter(seed=4), cfg)
    for _ in range(2):
        a.step()
    b = GRPOTrainer(ToyAdapter(seed=4), cfg)  # the same sampling stream (the adapter's), ...
    with torch.no_grad():
        b.policy.logits.add_(1.0)  # ... other weights
        b.reference.logits.sub_(1.0)
    state = copy.deepcopy(a.state_dict())
    assert GRPOConfig.from_dict(state["config"]) == cfg  # the checkpoint names its config
    b.load_state_dict(state)
    assert b.iteration == 2 and not b.ref_is_policy
    assert same(params(b.reference), params(a.reference)) and not same(params(b.reference), params(b.policy))
    for _ in range(3):  # iteration 3 refreshes
        ma, mb = a.step(), b.step()
        assert ma == mb
    assert same(params(a.policy), params(b.policy)) and same(params(a.reference), params(b.reference))


def test_restoring_ref_is_policy_never_claims_a_reference_that_is_not_there():
    cfg = GRPOConfig(group_size=2, groups_per_iteration=2, beta=0.1)
    state = GRPOTrainer(ToyAdapter(), cfg).state_dict()
    assert state["ref_is_policy"] is True
    old = {k: v for k, v in state.items() if k != "ref_is_policy"}  # a checkpoint from before the flag
    tr = GRPOTrainer(ToyAdapter(), cfg)
    tr.load_state_dict(old)
    assert tr.ref_is_policy is False  # unknown: assume the reference differs
    no_ref = GRPOTrainer(ToyAdapter(), cfg.replace(beta=0.0, update_ref_model_freq=0))
    assert no_ref.reference is None
    no_ref.load_state_dict(state)  # a checkpoint with a reference, into a trainer without one
    assert no_ref.ref_is_policy is False


# ---------------------------------------------------------------------------------------------
# the old-log-prob shortcut refuses a random forward (correctness pass, item 4)
# ---------------------------------------------------------------------------------------------


class _DropoutTable(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, p: float):
        super().__init__()
        self.logits = base.logits
        self.drop = torch.nn.Dropout(p)


class _DropoutAdapter(ToyAdapter):
    """A policy whose training forward applies dropout to its logits; sampling (and its
    log-probs) use the deterministic eval forward; old_logp left to the loop."""

    def __init__(self, p=0.3, **kw):
        super().__init__(**kw)
        self.policy = _DropoutTable(self.policy, p)

    def collect(self, **kw):
        r = super().collect(**kw)
        r.inputs["sampling_logp"] = r.old_logp
        r.old_logp = None
        return r

    def logp_and_entropy(self, model, rollout, rows):
        logits = model.drop(model.logits) if torch.is_grad_enabled() else model.logits
        logp_all = torch.log_softmax(logits, -1)
        tokens = rollout.inputs["tokens"][rows]
        logp = logp_all.gather(1, tokens.T).T
        entropy = -(logp_all.exp() * logp_all).sum(-1).expand(len(rows), -1)
        return logp, entropy


class _NoDropoutCheck(GRPOTrainer):
    """The loop before the correctness pass: takes old log-probs from the update's forward."""

    def _checked_forward(self, check):
        return super()._checked_forward(False)


def test_old_logp_shortcut_refuses_dropout():
    """One epoch, one minibatch, dropout in the grad-mode forward: the loop refuses, naming the
    module. Without the check the ratio reads exactly 1 while the true one (grad forward vs
    the sampling forward) is not."""
    from grpo_core.determinism import StochasticForwardError

    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0,
                     lr=1e-2)
    adapter = _DropoutAdapter(seed=1)
    adapter.policy.train()
    with pytest.raises(StochasticForwardError, match=r"drop \(Dropout, p=0.3\)"):
        GRPOTrainer(adapter, cfg).step()

    adapter = _DropoutAdapter(seed=1)
    adapter.policy.train()
    tr = _NoDropoutCheck(adapter, cfg)
    torch.manual_seed(0)
    m = tr.step()
    assert m["ratio_min"] == m["ratio_max"] == 1.0  # forced
    ro = adapter.collect(num_groups=2, group_size=4, iteration=5)
    torch.manual_seed(1)
    with torch.enable_grad():
        logp, _ = adapter.logp_and_entropy(adapter.policy, ro, torch.arange(8))
    true_ratio = (logp.detach() - ro.inputs["sampling_logp"]).exp()[ro.mask]
    assert float((true_ratio - 1).abs().max()) > 0.05

    # in eval mode the same policy is deterministic: accepted
    adapter = _DropoutAdapter(seed=1)
    adapter.policy.eval()
    assert GRPOTrainer(adapter, cfg).step()["ratio_max"] == 1.0


class _DropoutWithOldLogp(_DropoutAdapter):
    """The same dropout policy, but the adapter fills old_logp with the sampling log-probs."""

    def collect(self, **kw):
        r = super().collect(**kw)
        r.old_logp = r.inputs["sampling_logp"]
        return r


def test_dropout_is_allowed_when_the_adapter_supplies_old_logp():
    """The check guards only the shortcut (old log-probs from the update's own forward): with
    the sampling log-probs supplied, a random training forward is the user's choice."""
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=1e-2)
    adapter = _DropoutWithOldLogp(seed=1)
    adapter.policy.train()
    torch.manual_seed(0)
    m = GRPOTrainer(adapter, cfg).step()
    assert m["ratio_max"] > m["ratio_min"]  # the dropout noise shows in the ratio, as it should


class _DropoutNoSignalFirst(_DropoutAdapter):
    """The dropout policy whose first iteration has no signal (every reward 0)."""

    def collect(self, *, iteration, **kw):
        r = super().collect(iteration=iteration, **kw)
        if iteration == 0:
            r.rewards.zero_()
        return r


def test_the_dropout_check_waits_for_a_forward_that_trains():
    """A skipped step (no signal) trains nothing and its forward's log-probs serve nothing: the
    check runs on the first forward that is trained on."""
    from grpo_core.determinism import StochasticForwardError

    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=1e-2)
    adapter = _DropoutNoSignalFirst(seed=1)
    adapter.policy.train()
    tr = GRPOTrainer(adapter, cfg)
    assert tr.step()["skipped_steps"] == 1
    with pytest.raises(StochasticForwardError):
        tr.step()


# ---------------------------------------------------------------------------------------------
# an inert KL term is announced (correctness pass, item 5)
# ---------------------------------------------------------------------------------------------


def test_inert_kl_warns_and_is_inert():
    """beta > 0 with a hard refresh every iteration, one epoch and one minibatch: a warning
    naming the three settings, and indeed beta 1 and beta 0 train to the same weights (k2, k3,
    k3_is: their gradient is 0 where the reference equals the policy)."""
    inert = dict(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1,
                 update_ref_model_freq=1, lr=1e-2)
    for name in ("k2", "k3", "k3_is"):
        with pytest.warns(UserWarning, match="update_ref_model_freq=1.*grpo_epochs=1.*minibatches=1"):
            a = cartpole_trainer(beta=1.0, kl_estimator=name, **inert)
        b = cartpole_trainer(beta=0.0, **inert)
        for _ in range(2):
            a.step(), b.step()
        assert same(params(a.policy), params(b.policy)), name
    import warnings

    # k1 is not inert there: its per-token gradient is 1, and it moves the weights
    a = cartpole_trainer(beta=1.0, kl_estimator="k1", **inert)
    b = cartpole_trainer(beta=0.0, **inert)
    a.step(), b.step()
    assert not same(params(a.policy), params(b.policy))
    for live in (dict(grpo_epochs=2), dict(minibatches=2), dict(update_ref_model_freq=2),
                 dict(ref_update="soft"), dict(beta=0.0), dict(kl_estimator="k1")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            GRPOConfig(**{**inert, "beta": 0.1, **live})


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Dropout(0.2),
    lambda: torch.nn.MultiheadAttention(8, 2, dropout=0.5),
])
def test_dropout_detection_in_train_mode_only(make):
    """nn.Dropout (p) and modules calling a functional dropout with a float rate (MHA's
    ``dropout``) are reported in train mode, and not in eval mode."""
    from grpo_core.determinism import watch_stochastic_modules

    module = make()
    x = torch.randn(3, 1, 8)

    def run():
        return module(x) if isinstance(module, torch.nn.Dropout) else module(x, x, x)

    module.train()
    with watch_stochastic_modules(module) as active:
        run()
    assert active and type(module).__name__ in active[0]
    module.eval()
    with watch_stochastic_modules(module) as active:
        run()
    assert active == []


def test_dual_clip_is_a_config_option():
    """clip_ratio_c reaches the loss (its statistic is reported) and is validated."""
    m = cartpole_trainer(clip_ratio_c=3.0, beta=0.0).step()
    assert "clip_frac_dual" in m and 0.0 <= m["clip_frac_dual"] <= 1.0
    # 8 epochs at a large lr push ratios past 1.5: the bound acts and changes the update
    runs = {}
    for c in (None, 1.5):
        ad = ToyAdapter(seed=3)
        cfg = GRPOConfig(group_size=8, groups_per_iteration=2, grpo_epochs=8, minibatches=1, beta=0.0, lr=0.5,
                         clip_ratio_c=c)
        runs[c] = GRPOTrainer(ad, cfg).step(), ad.policy.logits.detach().clone()
    assert runs[None][0]["clip_frac_dual"] == 0.0 and runs[1.5][0]["clip_frac_dual"] > 0.0
    assert not torch.equal(runs[None][1], runs[1.5][1])
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="clip_ratio_c"):
            GRPOConfig(clip_ratio_c=bad)


# ---------------------------------------------------------------------------------------------
# gradient clipping: the global L2 norm, scaled to max_grad_norm only when above it
# ---------------------------------------------------------------------------------------------


def _sgd_step_delta(max_grad_norm: float) -> tuple[torch.Tensor, float]:
    """The weight change of one SGD step (lr 1, one epoch, one minibatch) and its grad_norm."""
    ad = ToyAdapter(seed=3)
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, ent_coef=0.01,
                     max_grad_norm=max_grad_norm, lr=1.0)
    tr = GRPOTrainer(ad, cfg, optimizer=torch.optim.SGD(ad.policy.parameters(), lr=1.0))
    before = ad.policy.logits.detach().clone()
    m = tr.step()
    return ad.policy.logits.detach() - before, m["grad_norm"]


@pytest.mark.parametrize("factor", [0.5, 0.999, 1.5, 4.0])
def test_clipping_scales_the_gradient_to_max_grad_norm_only_above_it(factor):
    """SGD at lr 1 moves the weights by minus the (clipped) gradient: with no clipping the change
    is g; with max_grad_norm c the change is g * c / (|g| + 1e-6) when that factor is below 1, g
    otherwise (1e-6: the documented guard); the metric is |g| before clipping either way."""
    g, norm = _sgd_step_delta(0.0)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(g)), rel=1e-12)  # the L2 norm of -delta
    c = factor * norm
    clipped, norm_c = _sgd_step_delta(c)
    assert norm_c == norm
    scale = c / (norm + 1e-6)
    want = g * scale if scale < 1 else g
    torch.testing.assert_close(clipped, want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# the reference refresh: when, how, and what it says
# ---------------------------------------------------------------------------------------------


class _OwnRefresh(ToyAdapter):
    """An adapter with its own refresh (as the LoRA adapter has): the loop calls it instead."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def refresh_reference(self, reference, config):
        self.calls.append((reference, config))
        with torch.no_grad():
            reference.logits.copy_(self.policy.logits)


def test_refresh_runs_on_its_iterations_and_says_so():
    cfg = GRPOConfig(group_size=2, groups_per_iteration=2, beta=0.1, update_ref_model_freq=3)
    tr = GRPOTrainer(ToyAdapter(), cfg)
    assert [tr.refresh_reference(i) for i in range(7)] == [True, False, False, True, False, False, True]
    off = GRPOTrainer(ToyAdapter(), cfg.replace(update_ref_model_freq=0))
    assert [off.refresh_reference(i) for i in range(3)] == [False] * 3
    no_ref = GRPOTrainer(ToyAdapter(), cfg.replace(beta=0.0))
    assert no_ref.reference is None and no_ref.refresh_reference(0) is False


def test_an_adapters_own_refresh_is_called_with_the_reference_and_config():
    ad = _OwnRefresh()
    cfg = GRPOConfig(group_size=2, groups_per_iteration=2, beta=0.1, update_ref_model_freq=2, ref_update="soft",
                     ref_mix_alpha=0.5, lr=0.1)
    tr = GRPOTrainer(ad, cfg)
    for _ in range(3):
        tr.step()
    assert [c is cfg for _, c in ad.calls] == [True, True]  # iterations 0 and 2
    assert all(r is tr.reference for r, _ in ad.calls)
    assert torch.equal(tr.reference.logits, ad.calls[-1][0].logits)


@pytest.mark.parametrize("update, alpha, equal", [("hard", 0.5, True), ("soft", 1.0, True), ("soft", 0.5, False)])
def test_soft_refresh_mixes_and_only_a_full_copy_counts_as_equal(update, alpha, equal):
    """Soft: ref <- alpha * policy + (1 - alpha) * ref (TRL's sync_ref_model mixup); the
    reference equals the policy after a hard copy or alpha = 1 only."""
    cfg = GRPOConfig(group_size=2, groups_per_iteration=2, beta=0.1, update_ref_model_freq=1, ref_update=update,
                     ref_mix_alpha=alpha)
    tr = GRPOTrainer(ToyAdapter(), cfg)
    with torch.no_grad():
        tr.policy.logits.add_(1.0)
    tr.ref_is_policy = False
    ref0, pol = tr.reference.logits.detach().clone(), tr.policy.logits.detach().clone()
    assert tr.refresh_reference(5)
    a = 1.0 if update == "hard" else alpha
    torch.testing.assert_close(tr.reference.logits, a * pol + (1 - a) * ref0, rtol=1e-15, atol=1e-15)
    assert tr.ref_is_policy is equal


# ---------------------------------------------------------------------------------------------
# the loop's advantages: the config's eps and the adapter's scored steps reach them
# ---------------------------------------------------------------------------------------------


class _PerStepRewards(ToyAdapter):
    """Process supervision: a reward at every valid step (1 for token 0), every step scored."""

    def collect(self, **kw):
        r = super().collect(**kw)
        r.rewards = ((r.inputs["tokens"] == 0) & r.mask).to(r.rewards.dtype)
        r.scored = r.mask.clone()
        return r


def test_loop_advantages_follow_the_config_eps_and_scored_steps(monkeypatch):
    """Per group: pool every scored reward, r~ = (r - mean) / (std + adv_eps) (Bessel), and a
    token's advantage is the sum of r~ from it to the end (gamma 1): DeepSeekMath's process
    supervision (sec. 4.1.3), by loops in float64."""
    seen = []
    real = GRPOTrainer._advantages

    def spy(self, rollout):
        seen.append(real(self, rollout).detach().clone())
        return seen[-1]
    monkeypatch.setattr(GRPOTrainer, "_advantages", spy)
    G, eps = 4, 0.5
    cfg = GRPOConfig(group_size=G, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0,
                     stats_over="sequences", gamma=1.0, adv_eps=eps)
    ad = _PerStepRewards(seed=6)
    ro = ad.collect(num_groups=2, group_size=G, iteration=0)
    GRPOTrainer(ad, cfg).step()
    rewards, mask = ro.rewards.tolist(), ro.mask.tolist()
    for b in range(2):
        pool = [rewards[i][t] for i in range(b * G, b * G + G) for t in range(len(mask[i])) if mask[i][t]]
        mean = sum(pool) / len(pool)
        std = (sum((x - mean) ** 2 for x in pool) / (len(pool) - 1)) ** 0.5
        for i in range(b * G, b * G + G):
            for t in range(len(mask[i])):
                want = sum((rewards[i][k] - mean) / (std + eps) for k in range(t, len(mask[i])) if mask[i][k]) \
                    if mask[i][t] else 0.0
                assert float(seen[0][i, t]) == pytest.approx(want, abs=1e-12), (i, t)


class _SometimesUsed(ToyAdapter):
    """A policy with a second parameter that only iteration 0's forward uses (as an expert
    that no token is routed to later)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.policy.extra = torch.nn.Parameter(torch.zeros(self.vocab, dtype=torch.float64))

    def collect(self, *, iteration, **kw):
        self.use_extra = iteration == 0  # for this iteration's forwards
        return super().collect(iteration=iteration, **kw)

    def logp_and_entropy(self, model, rollout, rows):
        logits = model.logits + model.extra if self.use_extra else model.logits
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(1, rollout.inputs["tokens"][rows].T).T
        return logp, -(logp_all.exp() * logp_all).sum(-1).expand(len(rows), -1)


def test_a_parameter_without_gradient_in_a_step_is_not_stepped():
    """Gradients are set to None before each step (torch's default), so Adam leaves a parameter
    that is not in the step's graph where it is, instead of moving it on stale momentum."""
    ad = _SometimesUsed(seed=2)
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=0.1)
    tr = GRPOTrainer(ad, cfg)
    tr.step()
    after_first = ad.policy.extra.detach().clone()
    assert after_first.abs().sum() > 0  # iteration 0 trained it
    tr.step()
    assert torch.equal(ad.policy.extra, after_first)


# ---------------------------------------------------------------------------------------------
# edges the loop suite's mutants found untested


def test_a_checkpoint_from_before_best_outcome_restores_none_seen():
    """Without ``best_outcome`` (an older checkpoint) no outcome has been seen: -inf, so that no
    group counts as below it and none is retried on that account; a saved value comes back."""
    cfg = GRPOConfig(group_size=2, groups_per_iteration=2)
    tr = GRPOTrainer(ToyAdapter(), cfg)
    state = tr.state_dict()
    state["best_outcome"] = 0.75
    tr.load_state_dict(state)
    assert tr.best_outcome == 0.75
    tr.load_state_dict({k: v for k, v in state.items() if k != "best_outcome"})
    assert tr.best_outcome == float("-inf")


@pytest.mark.parametrize(("value", "best", "below"), [
    (0.5 - 1.5e-6, 0.5, True),     # beyond 1e-6 at |best| < 1
    (0.5 - 0.5e-6, 0.5, False),    # within rounding
    (-1e-6, 0.0, False),           # exactly at the tolerance: not below
    (10.0 - 2e-6, 10.0, False),    # relative: 1e-6 * 10 = 1e-5 at best 10
    (10.0 - 2e-5, 10.0, True),
    (-10.0 - 2e-6, -10.0, False),  # |best|, for a negative best too
    (float("nan"), 0.5, False),    # a group without a valid sample is never below
    (0.0, float("-inf"), False),   # nothing is below "none seen"
])
def test_below_the_best_means_by_more_than_a_relative_1e_6(value, best, below):
    from grpo_core.loop import _below

    assert _below(value, best) is below


def test_a_groups_outcome_averages_its_valid_samples_only():
    """Hand values: group 0 has a sample without a valid step (its outcome 0 must not count),
    group 1 has none valid (NaN)."""
    from grpo_core.loop import _group_outcomes

    outcome = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, False, True, True, False, False, False, False])
    got = _group_outcomes(outcome, valid, 4)
    assert got[0] == pytest.approx((1.0 + 0.5 + 1.0) / 3, abs=1e-15)
    assert len(got) == 2 and got[1] != got[1]  # NaN


class _NothingValid(ToyAdapter):
    """Every sample ends before its first step (an empty completion): no valid token at all."""

    def collect(self, **kw) -> Rollout:
        r = super().collect(**kw)
        r.mask = torch.zeros_like(r.mask)
        return r


def test_a_batch_without_a_valid_token_reports_zero_advantage_and_no_gradient():
    tr = GRPOTrainer(_NothingValid(), GRPOConfig(group_size=2, groups_per_iteration=2, grpo_epochs=1,
                                                 minibatches=1, beta=0.0, lr=0.1))
    before = params(tr.policy)
    stats = tr.step()
    assert stats["adv_abs_mean"] == 0.0 and stats["zero_signal_groups"] == 2.0
    assert same(before, params(tr.policy))


def test_the_gradient_norm_of_no_gradient_is_zero():
    """A step where no parameter received a gradient reports a norm of 0 (the empty sum)."""
    tr = GRPOTrainer(ToyAdapter(), GRPOConfig(group_size=2, groups_per_iteration=2))
    tr.optimizer.zero_grad(set_to_none=True)
    assert tr._clip_gradients() == 0.0


# ---------------------------------------------------------------------------------------------
# correctness pass 2, item 5: the gradient norm does not overflow in the parameters' dtype
# ---------------------------------------------------------------------------------------------


class _NormInParamDtype(GRPOTrainer):
    """The norm before the fix: taken in the gradients' dtype (float32 squares overflow at 3.4e38)."""

    def _clip_gradients(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(norm):
            raise NonFiniteLossError(f"gradient norm is {float(norm)}")
        return float(norm)


def _huge_gradient(cls):
    tr = cls(ToyAdapter(dtype=torch.float32), GRPOConfig(group_size=2, groups_per_iteration=2, max_grad_norm=1.0))
    for p in tr.params:
        p.grad = torch.zeros_like(p)
    first = tr.params[0].grad.view(-1)
    first[:4] = 1e20  # finite in float32; its square is not
    return tr


def test_a_finite_gradient_of_huge_entries_has_a_finite_norm_and_is_clipped():
    """Four float32 entries of 1e20: the norm is sqrt(4) * 1e20 = 2e20 exactly in float64 (closed
    form), and clipping to 1 leaves those entries at 0.5 each (float32 rounding, relative 1e-6)."""
    tr = _huge_gradient(GRPOTrainer)
    assert tr.params[0].grad.dtype == torch.float32
    norm = tr._clip_gradients()
    assert norm == pytest.approx(2e20, rel=1e-7)
    first = tr.params[0].grad.view(-1)[:4].double()
    assert torch.allclose(first, torch.full((4,), 0.5, dtype=torch.float64), rtol=1e-6, atol=0)
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf"):
        _huge_gradient(_NormInParamDtype)._clip_gradients()


def test_objective_notes_name_the_settings_that_change_the_objective():
    """Only retry (with rounds) trains another objective than GRPO's; fresh redraws rescale it."""
    retry = GRPOConfig(dynamic_sampling=True, dynamic_sampling_redraw="retry", dynamic_sampling_rounds=3)
    assert len(retry.objective_notes()) == 1 and "(3 rounds)" in retry.objective_notes()[0]
    assert retry.replace(dynamic_sampling_rounds=0).objective_notes() == []
    assert retry.replace(dynamic_sampling_redraw="fresh").objective_notes() == []
    assert retry.replace(dynamic_sampling=False).objective_notes() == []


def test_the_compute_context_autocasts_on_the_policys_device_under_bf16_mixed():
    """precision="bf16-mixed": every forward of the trainer runs under bf16 autocast on the device
    of the policy's parameters; precision "32" runs none."""
    tr = GRPOTrainer(ToyAdapter(dtype=torch.float32), GRPOConfig(group_size=2, groups_per_iteration=2),
                     precision="bf16-mixed")
    lin = torch.nn.Linear(2, 2)
    with tr.compute():
        assert torch.is_autocast_enabled("cpu") and lin(torch.ones(1, 2)).dtype == torch.bfloat16
    plain = GRPOTrainer(ToyAdapter(dtype=torch.float32), GRPOConfig(group_size=2, groups_per_iteration=2))
    with plain.compute():
        assert not torch.is_autocast_enabled("cpu")


def test_the_gradient_norm_is_cast_in_chunks(monkeypatch):
    """A gradient larger than a chunk is normed chunk by chunk (a float64 copy of a whole large
    tensor would double its memory); the norm is the closed form sqrt(n) for n entries of 1."""
    import grpo_core.loop as loop_module

    monkeypatch.setattr(loop_module, "NORM_CHUNK", 4)
    tr = GRPOTrainer(ToyAdapter(dtype=torch.float32), GRPOConfig(group_size=2, groups_per_iteration=2,
                                                                 max_grad_norm=0.0))
    sizes = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **kw: sizes.extend(t.numel() for t in ts) or real(ts, *a, **kw))
    n = 0
    for p in tr.params:
        p.grad = torch.ones_like(p)
        n += p.numel()
    assert tr._clip_gradients() == pytest.approx(math.sqrt(n), rel=1e-12)
    assert max(sizes) <= 4 and sum(sizes) == n


def test_cispo_reaches_the_loss_through_the_loop():
    """policy_loss="cispo" with one epoch and one minibatch (ratio 1, weight 1): the loop's policy
    loss is -sum(A * logp) / tokens, by hand from the rollout, where PPO's is -sum(A) / tokens."""
    cfg = dict(group_size=3, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=1e-3,
               stats_over="sequences", gamma=1.0)
    ad = ToyAdapter()
    ro = ad.collect(num_groups=2, group_size=3, iteration=0)
    tr = GRPOTrainer(ad, GRPOConfig(**cfg, policy_loss="cispo"))
    adv = tr._advantages(ro)
    logp, _ = ad.logp_and_entropy(ad.policy, ro, torch.arange(6))
    m = ro.mask.bool()
    want_cispo = float(-(adv * logp.detach())[m].sum() / m.sum())
    want_ppo = float(-adv[m].sum() / m.sum())
    got = tr.step()["policy_loss"]
    assert got == pytest.approx(want_cispo, rel=1e-10)
    assert abs(want_cispo - want_ppo) > 1e-3


class _AlwaysDropout(_DropoutAdapter):
    """Dropout in every forward in train mode, gradient or not (verl issue 4708: old log-probs
    computed with the actor in train mode)."""

    def logp_and_entropy(self, model, rollout, rows):
        logits = model.drop(model.logits)
        logp_all = torch.log_softmax(logits, -1)
        tokens = rollout.inputs["tokens"][rows]
        return logp_all.gather(1, tokens.T).T, -(logp_all.exp() * logp_all).sum(-1).expand(len(rows), -1)


def test_old_logp_recomputed_with_dropout_is_refused():
    """Two epochs, old_logp left to the loop, dropout active in the policy's forward: the loop's
    recomputation of the old log-probs is refused, naming the module (the bug catalogue listed it
    as not caught before)."""
    from grpo_core.determinism import StochasticForwardError

    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=2, minibatches=1, beta=0.0, lr=1e-2)
    adapter = _AlwaysDropout(seed=1)
    adapter.policy.train()
    with pytest.raises(StochasticForwardError) as err:
        GRPOTrainer(adapter, cfg).step()
    assert str(err.value) == (
        "the policy's forward is random (drop (Dropout, p=0.3)), so the old log-probs the loop recomputes are "
        "not those of the distribution that sampled (verl issue 4708): set that dropout to 0 or put the policy "
        "in eval mode, or collect old_logp in the adapter")
    adapter = _AlwaysDropout(seed=1)
    adapter.policy.eval()  # no dropout: trains
    assert math.isfinite(GRPOTrainer(adapter, cfg).step()["loss"])


# ---------------------------------------------------------------------------------------------
# an engine's samples: the loop's correction (issue 26), against hand formulas
# ---------------------------------------------------------------------------------------------


class _ToyEngine(ToyAdapter):
    """The policy samples; the "engine" reports log-probs shifted by a fixed pattern."""

    def collect(self, **kw):
        ro = super().collect(**kw)
        n, t = ro.mask.shape
        shift = torch.linspace(-1.0, 1.0, n * t, dtype=ro.rewards.dtype).reshape(n, t)
        ro.engine_logp = ro.old_logp - shift
        ro.old_logp = None  # the trainer's own, as with a real engine
        return ro


@pytest.mark.parametrize("mode", ["tis", "mis", "none"])
def test_the_loop_corrects_an_engines_samples(mode):
    """One epoch, one minibatch (ratio 1): the policy loss is -sum(w A)/count over the tokens the
    correction keeps, w = min(rho, 2) for TIS (1 otherwise), rho = exp(old - engine) = exp(shift);
    mismatch_kl is the mean of rho - 1 - log rho over the valid tokens."""
    cfg = GRPOConfig(group_size=3, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=1e-3,
                     stats_over="sequences", gamma=1.0, engine_correction=mode)
    ad = _ToyEngine()
    ro = ad.collect(num_groups=2, group_size=3, iteration=0)
    tr = GRPOTrainer(ad, cfg)
    adv = tr._advantages(ro)
    m = ro.mask.bool()
    logp, _ = ad.logp_and_entropy(ad.policy, ro, torch.arange(6))
    log_rho = (logp.detach() - ro.engine_logp)
    rho = log_rho.exp()
    keep = m & (log_rho.abs() <= math.log(2.0)) if mode == "mis" else m
    w = rho.clamp(max=2.0) if mode == "tis" else torch.ones_like(rho)
    want = float(-(w * adv)[keep].sum() / keep.sum())
    st = tr.step()
    assert st["policy_loss"] == pytest.approx(want, rel=1e-10)
    assert st["mismatch_kl"] == pytest.approx(float((rho - 1 - log_rho)[m].mean()), rel=1e-10)
    # what the ranks weight these by: the valid tokens and rows before the correction, the kept
    # tokens after it (adv_abs_mean)
    assert tr._correction_counts == (int(m.sum()), int(m.any(-1).sum())) and int(m.any(-1).sum()) < int(m.sum())
    assert tr._adv_valid == int(keep.sum())
    assert (st["is_masked_frac"] > 0) is (mode == "mis") and (st["is_truncated_frac"] > 0) is (mode == "tis")


class _TwoDropouts(_AlwaysDropout):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.policy.drop2 = torch.nn.Dropout(0.1)

    def logp_and_entropy(self, model, rollout, rows):
        logp_all = torch.log_softmax(model.drop2(model.drop(model.logits)), -1)
        tokens = rollout.inputs["tokens"][rows]
        return logp_all.gather(1, tokens.T).T, -(logp_all.exp() * logp_all).sum(-1).expand(len(rows), -1)


def test_every_random_module_is_named():
    from grpo_core.determinism import StochasticForwardError

    adapter = _TwoDropouts(seed=1)
    adapter.policy.train()
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, grpo_epochs=2, minibatches=1, beta=0.0, lr=1e-2)
    with pytest.raises(StochasticForwardError, match=r"random \(drop \(Dropout, p=0.3\), drop2 \(Dropout, p=0.1\)\)"):
        GRPOTrainer(adapter, cfg).step()
