"""End-to-end parity: the core loop with the CartPole adapter equals the plain CartPole oracle.

Same config, same seed, same initial weights, float64: after every iteration every parameter of
the policy and of the reference agrees to 1e-9 relative, and so do the per-iteration metrics.
Then four deliberate mistakes in the loop must each break that parity.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import grpo_core.loop as loop_mod
from adapters.cartpole import CartPoleAdapter
from grpo_core import group_advantages, kl_estimate
from grpo_core.config import GRPOConfig
from grpo_core.loop import GRPOTrainer
from reference.cartpole_grpo import run_oracle

ITERATIONS = 3
BASE = dict(group_size=3, groups_per_iteration=2, grpo_epochs=2, minibatches=2, beta=0.1,
            ent_coef=0.01, max_grad_norm=0.05, lr=1e-2, gamma=0.99, seed=5)
SETTINGS = {
    "hard-freq1": dict(update_ref_model_freq=1, ref_update="hard"),
    # Dr. GRPO divides by the 500-step limit: gradients are ~100x smaller, so is the clip
    "soft-freq2": dict(update_ref_model_freq=2, ref_update="soft", ref_mix_alpha=0.5,
                       kl_estimator="k2", scale="batch", stats_over="sequences",
                       loss_agg="seq-mean-token-sum-norm", clip_eps_high=0.28, max_grad_norm=0.01),
    # discounted outcome advantages, one episode per minibatch, no entropy bonus: groups of 2
    # episodes of equal length have no signal and their minibatches are skipped (seed 12:
    # once at iteration 1, where the reference still equals the policy)
    "sequences-skip": dict(update_ref_model_freq=1, ent_coef=0.0, group_size=2, groups_per_iteration=4,
                           minibatches=8, stats_over="sequences", gamma=0.9, seed=12),
    "hard-freq2-k3is": dict(update_ref_model_freq=2, kl_estimator="k3_is", scale="none",
                            loss_agg="seq-mean-token-mean", grpo_epochs=3, minibatches=3),
    # leave-one-out baselines (RLOO), over every step's return and over outcomes
    "rloo-steps": dict(update_ref_model_freq=1, baseline="leave-one-out"),
    "rloo-sequences": dict(update_ref_model_freq=2, baseline="leave-one-out", stats_over="sequences",
                           scale="batch", gamma=1.0),
    # GSPO (an episode's ratio, clipped once per episode) and its token form
    "gspo": dict(update_ref_model_freq=1, ratio_level="sequence", loss_agg="seq-mean-token-mean",
                 clip_eps_low=0.05, clip_eps_high=0.05, kl_estimator="k3_is"),
    "gspo-token": dict(update_ref_model_freq=2, ratio_level="sequence-token", loss_agg="seq-mean-token-mean",
                       clip_eps_low=0.05, clip_eps_high=0.05, gamma=0.95),
}
METRICS = ("loss", "policy_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "approx_kl",
           "grad_norm", "grad_norm_max", "ratio_min", "ratio_max", "mean_return", "mean_length",
           "env_steps", "adv_abs_mean", "skipped_steps")


def run_core(cfg: GRPOConfig, trainer_cls=GRPOTrainer, iterations: int = ITERATIONS):
    # statistics over sequences take an outcome reward: the episode's return at its last step
    adapter = CartPoleAdapter(seed=cfg.seed, hidden=16, dtype=torch.float64,
                              outcome_reward=cfg.stats_over == "sequences")
    initial = {k: v.clone() for k, v in adapter.policy.state_dict().items()}
    trainer = trainer_cls(adapter, cfg)
    records = []
    for _ in range(iterations):
        metrics = trainer.step()
        records.append({"policy": {k: v.clone() for k, v in trainer.policy.state_dict().items()},
                        "reference": {k: v.clone() for k, v in trainer.reference.state_dict().items()},
                        "metrics": metrics})
    return initial, records


def oracle_config(cfg: GRPOConfig) -> dict:
    return {**dataclasses.asdict(cfg), "outcome_reward": cfg.stats_over == "sequences"}


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (b.abs() + 1e-12)).max())


def parity_gaps(core_records, oracle_records) -> dict[str, float]:
    """Largest relative difference of parameters and metrics, per iteration and kind."""
    gaps = {}
    for it, (c, o) in enumerate(zip(core_records, oracle_records)):
        for part in ("policy", "reference"):
            gaps[f"{part}@{it}"] = max(rel_gap(c[part][k], o[part][k].to(torch.float64)) for k in c[part])
        gaps[f"metrics@{it}"] = max(
            abs(c["metrics"][k] - o["metrics"][k]) / max(abs(o["metrics"][k]), 1e-12) if
            abs(c["metrics"][k] - o["metrics"][k]) > 1e-13 else 0.0 for k in METRICS)
    return gaps


def _record(name: str, gaps: dict) -> None:
    folder = Path(__file__).resolve().parents[1] / "reports" / "fragments"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"parity-cartpole-{name}.json").write_text(json.dumps({"max_rel_gap": max(gaps.values()),
                                                                     "gaps": gaps}))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_core_loop_matches_oracle(name):
    cfg = GRPOConfig(**{**BASE, **SETTINGS[name]})
    initial, core = run_core(cfg)
    oracle = run_oracle(oracle_config(cfg), initial, ITERATIONS)
    gaps = parity_gaps(core, oracle)
    _record(name, gaps)
    assert max(gaps.values()) < 1e-9, {k: v for k, v in gaps.items() if v >= 1e-9}
    # the setting really exercises what it claims to
    assert any(r["metrics"]["grad_norm_max"] > cfg.max_grad_norm for r in core), "clipping inactive"
    assert any(r["metrics"]["ratio_max"] > 1.0 for r in core), "ratio never left 1"
    assert not torch.equal(core[-1]["reference"]["net.0.weight"], initial["net.0.weight"])
    if name == "sequences-skip":
        assert sum(r["metrics"]["skipped_steps"] for r in core) > 0, "no minibatch was skipped"


# --- mistakes that parity must catch --------------------------------------------------------

class OldLogpRecomputed(GRPOTrainer):
    """Bug: old log-probs recomputed under the current policy at each update instead of frozen."""

    def _minibatch_step(self, rollout, adv, ref_logp, rows):
        with torch.no_grad():
            rollout.old_logp[rows] = self.adapter.logp_and_entropy(self.policy, rollout, rows)[0]
        return super()._minibatch_step(rollout, adv, ref_logp, rows)


class ReferenceNeverRefreshed(GRPOTrainer):
    """Bug: the reference is created once and never refreshed (the VLM seed's behaviour)."""

    def refresh_reference(self, iteration):
        return False


def _kl_detached(name, logp, ref_logp, old_logp=None):
    """Bug: the user's sketch, logp detached inside the KL, so the penalty has no gradient."""
    return kl_estimate(name, logp.detach(), ref_logp, old_logp)


def _adv_not_per_group(returns, mask, group_size, **kw):
    """Bug: advantages normalised over the whole batch instead of per group."""
    return group_advantages(returns, mask, returns.shape[0], **kw)


MUTATIONS = {
    "old_logp_recomputed": dict(trainer=OldLogpRecomputed),
    "reference_never_refreshed": dict(trainer=ReferenceNeverRefreshed),
    "kl_gradient_detached": dict(patch=("grpo_core.losses.kl_estimate", _kl_detached)),
    "advantages_not_per_group": dict(patch=("grpo_core.loop.group_advantages", _adv_not_per_group)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_parity_catches_mistake(mutation, monkeypatch):
    cfg = GRPOConfig(**{**BASE, **SETTINGS["hard-freq1"]})
    spec = MUTATIONS[mutation]
    if "patch" in spec:
        monkeypatch.setattr(*spec["patch"])
    initial, core = run_core(cfg, spec.get("trainer", GRPOTrainer))
    monkeypatch.undo()
    oracle = run_oracle(oracle_config(cfg), initial, ITERATIONS)
    assert max(parity_gaps(core, oracle).values()) > 1e-6, f"{mutation} went unnoticed"


def test_loop_module_uses_patched_names():
    """The mutation patches above target the names the loop really calls."""
    assert loop_mod.group_advantages is group_advantages
    import grpo_core.losses as losses_mod
    assert losses_mod.kl_estimate is kl_estimate
