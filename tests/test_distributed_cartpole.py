"""Data parallel on CartPole: 2 gloo ranks train to the parameters of one process holding the
same groups (float64, 3 iterations, several epochs and minibatches, beta > 0 and a reference
refresh), and three mistakes GRPO trainers made at scale are each rejected: a token mean taken
per rank, groups split across ranks, a reference refreshed on one rank only. A checkpoint of the
2-rank run after 2 iterations, loaded by one process, takes the step the 2 ranks took; with a
per-rank minibatch shuffle it would not.

The two ranks' rollouts hold different numbers of valid steps (CartPole episodes end when the
pole falls), which is what makes a per-rank mean differ from the global one."""

from __future__ import annotations

import pytest
import torch

from adapters.cartpole import CartPoleAdapter
from grpo_core.advantages import group_advantages
from grpo_core.config import GRPOConfig
from grpo_core.distributed import DistributedGRPOTrainer, _by_index, _by_name, _check_config, reduce_info
from grpo_core.adapter import Rollout
from grpo_core._seeding import minibatch_order
from grpo_core.loop import GRPOTrainer
from grpo_harness.run import load_trainer_state, trainer_state

from ._ranks import on_ranks

F64 = torch.float64
ITERATIONS = 3
BASE = dict(group_size=4, groups_per_iteration=4, grpo_epochs=2, minibatches=3, beta=0.1,
            update_ref_model_freq=2, ent_coef=0.01, lr=1e-2, seed=3)
CORRECT = {
    "token-mean": BASE,
    "batch-scale, seq-mean, micro-batches": {**BASE, "scale": "batch", "loss_agg": "seq-mean-token-mean",
                                             "micro_batch_size": 2},
    "Dr. GRPO, sequences": {**BASE, "loss_agg": "seq-mean-token-sum-norm", "stats_over": "sequences",
                            "minibatches": 2},
}
REL = 1e-6


# --- deliberately broken data-parallel trainers -----------------------------------------------

class PerRankMean(DistributedGRPOTrainer):
    """Each rank divides by its own token count and the ranks' gradients are averaged (the
    per-rank token mean that verl replaced by a global token count)."""

    def _global_count(self, count):
        return count

    def _micro_loss(self, *args):
        return GRPOTrainer._micro_loss(self, *args)


class SplitGroups(DistributedGRPOTrainer):
    """Rank r holds the r-th part of every group, and the group statistics come from that part."""

    def _rows(self):
        g, part = self.config.group_size, self.config.group_size // self.world
        return torch.tensor([b * g + self.rank * part + i for b in range(self.config.groups_per_iteration)
                             for i in range(part)])

    def _collect(self, draw=0):
        cfg = self.config
        full = self.adapter.collect(num_groups=cfg.groups_per_iteration, group_size=cfg.group_size,
                                    iteration=self.iteration)
        rows = self._rows()
        self._local_valid, self._info_keys = int(full.mask[rows].sum()), tuple(full.info)
        return Rollout(rewards=full.rewards[rows], mask=full.mask[rows], old_logp=full.old_logp[rows],
                       inputs={k: v[rows] for k, v in full.inputs.items()}, info=full.info)

    def _advantages(self, rollout):
        cfg = self.config
        return group_advantages(rollout.rewards, rollout.mask, cfg.group_size // self.world, gamma=cfg.gamma,
                                scale=cfg.scale, stats_over=cfg.stats_over, eps=cfg.adv_eps)

    def _minibatch_rows(self, epoch, n):
        where = {int(r): i for i, r in enumerate(self._rows())}
        return [torch.tensor([where[int(r)] for r in rows if int(r) in where], dtype=torch.long)
                for rows in GRPOTrainer._minibatch_rows(self, epoch, n * self.world)]


class UnsyncedReference(DistributedGRPOTrainer):
    """The reference is refreshed on rank 0 only."""

    def refresh_reference(self, iteration):
        return super().refresh_reference(iteration) if self.rank == 0 else False


class LocalShuffle(DistributedGRPOTrainer):
    """Each rank shuffles its own rows with a seed of its own (a per-rank data sampler): a run
    that a checkpoint cannot continue at another world size."""

    def _minibatch_rows(self, epoch, n):
        return minibatch_order(self.config.seed + 1000 * self.rank, self.iteration, epoch, n,
                               min(self.config.minibatches, n))


BROKEN = {"per-rank token mean": PerRankMean, "groups split across ranks": SplitGroups,
          "reference refreshed on rank 0 only": UnsyncedReference}


def _train(cls, cfg: dict):
    outcome = cfg.get("stats_over") == "sequences"  # the episode's length, paid at its end
    tr = cls(CartPoleAdapter(seed=cfg["seed"], hidden=16, dtype=F64, outcome_reward=outcome), GRPOConfig(**cfg))
    metrics, valid, state = [], [], None
    for _ in range(ITERATIONS):
        metrics.append(tr.step())
        valid.append(getattr(tr, "_local_valid", None))
        if tr.iteration == ITERATIONS - 1:
            state = trainer_state(tr)  # the checkpoint the run module writes
    return {"params": {k: v.clone() for k, v in tr.policy.state_dict().items()}, "metrics": metrics,
            "valid": valid, "state": state}


def _on_rank(rank, world):
    out = {name: _train(DistributedGRPOTrainer, cfg) for name, cfg in CORRECT.items()}
    out.update({name: _train(cls, BASE) for name, cls in BROKEN.items()})
    out["per-rank shuffle"] = _train(LocalShuffle, BASE)
    return out


@pytest.fixture(scope="module")
def runs():
    ranks = on_ranks(_on_rank, 2)
    one = {name: _train(GRPOTrainer, cfg) for name, cfg in CORRECT.items()}
    return ranks, one


def _rel_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORRECT))
def test_two_ranks_train_as_one_process(runs, name):
    ranks, one = runs
    two = ranks[0][name]
    gap = _rel_gap(two["params"], one[name]["params"])
    assert gap < REL, f"{name}: parameters differ from one process by {gap:.2e} (relative)"
    assert _rel_gap(ranks[1][name]["params"], two["params"]) == 0, "the ranks' replicas differ"
    assert any(a != b for a, b in zip(ranks[0][name]["valid"], ranks[1][name]["valid"])), \
        "the ranks held the same numbers of valid steps: a per-rank mean would go unnoticed"
    for m2, m1 in zip(two["metrics"], one[name]["metrics"]):
        for key in ("loss", "policy_loss", "kl", "entropy", "clip_frac_low", "approx_kl", "grad_norm",
                    "ratio_min", "ratio_max", "adv_abs_mean", "env_steps", "mean_return", "min_return",
                    "max_return", "skipped_steps", "zero_signal_groups"):
            assert m2[key] == pytest.approx(m1[key], rel=REL, abs=1e-12), f"{name}: metric {key}"
    assert ranks[1][name]["metrics"] == two["metrics"], "the ranks report different metrics"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_data_parallel_is_rejected(runs, name):
    ranks, one = runs
    gap = _rel_gap(ranks[0][name]["params"], one["token-mean"]["params"])
    assert gap > 1e-3, f"{name}: trained like one process (gap {gap:.2e}); the test cannot catch it"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["token-mean", "per-rank shuffle"])
def test_checkpoint_at_two_ranks_continues_in_one_process(runs, name):
    ranks, _ = runs
    two = ranks[0][name]
    assert two["state"]["iteration"] == ITERATIONS - 1
    one = GRPOTrainer(CartPoleAdapter(seed=BASE["seed"], hidden=16, dtype=F64), GRPOConfig(**BASE))
    load_trainer_state(one, two["state"])
    one.step()
    gap = _rel_gap({k: v for k, v in one.policy.state_dict().items()}, two["params"])
    if name == "token-mean":
        assert gap < REL, f"the resumed process left the 2-rank run by {gap:.2e}"
    else:
        assert gap > 1e-3, f"a per-rank shuffle resumed like the 2-rank run (gap {gap:.2e}); the test cannot catch it"


# --- ranks initialised differently (correctness pass 2, item 2) ---------------------------------

SEEDED = dict(group_size=4, groups_per_iteration=2, grpo_epochs=2, minibatches=2, beta=0.5,
              update_ref_model_freq=0, lr=1e-2, seed=3)


class _NoInitialSync(DistributedGRPOTrainer):
    """Before the fix: only DDP's own broadcast of the policy it wraps; the reference stays each
    rank's copy of its own initial policy."""

    def _sync_initial_weights(self):
        pass


def _init_seeded_adapter(init_seed: int) -> CartPoleAdapter:
    """Rollouts seeded alike (seed 3); the policy's initial weights drawn with ``init_seed``."""
    from adapters.cartpole import CartPolePolicy

    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        policy = CartPolePolicy(16)
    return CartPoleAdapter(seed=SEEDED["seed"], hidden=16, dtype=F64, policy=policy)


def _train_seeded(cls, init_seed: int) -> dict:
    tr = cls(_init_seeded_adapter(init_seed), GRPOConfig(**SEEDED))
    ref0 = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    kl = [tr.step()["kl"] for _ in range(ITERATIONS)]
    return {"ref0": ref0, "params": {k: v.clone() for k, v in tr.policy.state_dict().items()}, "kl": kl}


def _on_rank_seeded(rank, world):
    return {"fixed": _train_seeded(DistributedGRPOTrainer, 100 + rank),
            "broken": _train_seeded(_NoInitialSync, 100 + rank)}


@pytest.mark.slow
def test_ranks_initialised_differently_share_rank_zeros_reference():
    """Rank r's policy starts from seed 100 + r, beta 0.5, never refreshed: every rank's
    reference is rank 0's initial policy, and 2 ranks train to the parameters of one process
    started from rank 0's weights. Before the fix each rank kept its own reference (gap ~0.9)."""
    ranks = on_ranks(_on_rank_seeded, 2)
    one = _train_seeded(GRPOTrainer, 100)
    initial = _init_seeded_adapter(100).policy.state_dict()
    for r in ranks:
        assert _rel_gap(r["fixed"]["ref0"], initial) == 0.0
    assert _rel_gap(ranks[0]["fixed"]["params"], one["params"]) < REL
    assert ranks[0]["fixed"]["kl"] == pytest.approx(one["kl"], rel=REL)
    broken = _rel_gap(ranks[1]["broken"]["ref0"], ranks[0]["broken"]["ref0"])
    assert broken > 0.1, f"the broken trainer's ranks share a reference (gap {broken:.2e}): the test cannot catch it"
    assert _rel_gap(ranks[0]["broken"]["params"], one["params"]) > 1e-3


# --- an engine's samples: the correction's metrics are the whole batch's (review of issue 26) ------

class _EngineCartPole(CartPoleAdapter):
    """The policy samples; an "engine" reports log-probs off by noise drawn per group (the same
    for a group whichever rank holds it)."""

    def collect(self, *, num_groups, group_size, iteration, first_group=0, total_groups=None):
        ro = super().collect(num_groups=num_groups, group_size=group_size, iteration=iteration,
                             first_group=first_group, total_groups=total_groups)
        parts = []
        for b in range(first_group, first_group + num_groups):
            gen = torch.Generator().manual_seed(1000 * iteration + b)
            parts.append(torch.randn(group_size, 500, generator=gen, dtype=F64) * 0.8)  # the time limit: any T
        ro.engine_logp = ro.old_logp + torch.cat(parts)[:, :ro.mask.shape[1]] * ro.mask
        return ro


ENGINE = dict(group_size=4, groups_per_iteration=2, grpo_epochs=2, minibatches=2, beta=0.0, lr=1e-2, seed=3,
              engine_correction="mis", engine_correction_threshold=2.0)
ENGINE_KEYS = ("mismatch_kl", "is_ratio_min", "is_ratio_mean", "is_ratio_max", "is_truncated_frac",
               "is_masked_frac", "is_masked_seq_frac", "adv_abs_mean", "loss")


def _train_engine(cls):
    tr = cls(_EngineCartPole(seed=3, hidden=16, dtype=F64), GRPOConfig(**ENGINE))
    return [tr.step() for _ in range(2)]


def _on_rank_engine(rank, world):
    return _train_engine(DistributedGRPOTrainer)


@pytest.mark.slow
def test_engine_correction_metrics_are_the_whole_batchs():
    """Two ranks report the one-process values of the correction's metrics (token and row shares
    weighted over ranks, the ratio range over ranks) and of adv_abs_mean after MIS's mask."""
    ranks = on_ranks(_on_rank_engine, 2)
    one = _train_engine(GRPOTrainer)
    assert one[0]["is_masked_frac"] > 0  # MIS acted
    for r in ranks:
        for got, want in zip(r, one):
            for key in ENGINE_KEYS:
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_groups_must_divide_among_ranks():
    with pytest.raises(ValueError, match="groups_per_iteration=3 is not divisible by the world size 2"):
        _check_config(GRPOConfig(groups_per_iteration=3), 2, "ddp", object())
    _check_config(GRPOConfig(groups_per_iteration=4), 2, "ddp", object())


@pytest.mark.parametrize("world", [1, 2])
def test_dynamic_sampling_is_refused_by_the_distributed_trainer(world):
    """Also on one process: the distributed trainer's collect knows no extra draws (it would
    train the first draw again as each "extra" one) nor retries."""
    for redraw in ("fresh", "retry"):
        with pytest.raises(ValueError, match="dynamic_sampling=True is not supported by the distributed trainer "
                           r"yet \(torchrun, " + str(world) + " process"):
            _check_config(GRPOConfig(dynamic_sampling=True, dynamic_sampling_redraw=redraw), world, "ddp", object())
    _check_config(GRPOConfig(dynamic_sampling=False), world, "ddp", object())


def test_fsdp_needs_a_micro_batch_size():
    with pytest.raises(ValueError, match="micro_batch_size"):
        _check_config(GRPOConfig(), 1, "fsdp", object())


def test_reduce_info_rules():
    """min_/max_ keys, sums of steps, means of the rest, NaN ignored (hand-computed)."""
    infos = [{"min_return": 3.0, "max_return": 9.0, "env_steps": 20, "mean_return": 5.0, "reward/x": float("nan")},
             {"min_return": 2.0, "max_return": 7.0, "env_steps": 12, "mean_return": 3.0, "reward/x": 0.5}]
    assert reduce_info(infos) == {"min_return": 2.0, "max_return": 9.0, "env_steps": 32.0, "mean_return": 4.0,
                                  "reward/x": 0.5}


def test_optimizer_state_names_round_trip():
    """The index-keyed form of a name-keyed optimizer state, and back (FSDP checkpoints)."""
    names = ["a.weight", "a.bias", "b.weight"]
    named = {"state": {"a.bias": {"step": 1}, "b.weight": {"step": 2}},
             "param_groups": [{"lr": 0.1, "params": names}]}
    indexed = _by_index(named, names)
    assert indexed == {"state": {1: {"step": 1}, 2: {"step": 2}}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}
    assert _by_name(indexed, names) == named
