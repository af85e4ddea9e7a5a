"""The loop's micro-batch hook ``_accumulating(more)``, which a data-parallel trainer reads to
defer its gradient sync to the last micro-batch of a step (part of ``make verify`` and of the
loop's mutation suite; the full data-parallel tests are tests/test_distributed*.py, run by
``make verify-dist``).

``more`` must be true exactly when another micro-batch of the same optimizer step follows
(``GRPOTrainer._accumulating``'s docstring). Under DDP a wrong ``more`` is not a matter of
speed: the ranks of a minibatch may hold different numbers of micro-batches (the global
minibatch is split unevenly), and each rank must sync exactly once per step, on its last
micro-batch. A rank that syncs on every micro-batch, or on the last two, runs more gradient
all-reduces than a rank with one micro-batch, and the collectives no longer pair up (an error
or a hang); a rank that never syncs steps with its own gradient and the replicas drift apart.
The first test checks the flags the loop passes, in one process; the second runs two gloo
ranks through such an uneven split and compares them with one process.
"""

from __future__ import annotations

import pytest
import torch

from adapters.cartpole import CartPoleAdapter
from grpo_core.config import GRPOConfig
from grpo_core.loop import GRPOTrainer

from ._ranks import on_ranks

F64 = torch.float64
# seed 1: of the 8 rows (2 groups of 4, one group per rank), the first minibatch holds 3 rows
# of rank 0 and 1 of rank 1, the second 1 and 3 (grpo_core._seeding.minibatch_order); with
# micro-batches of one row, one rank runs 3 micro-batches where the other runs 1
CFG = dict(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=2, micro_batch_size=1,
           beta=0.0, ent_coef=0.01, lr=1e-2, seed=1)
REL = 1e-6


class RecordsAccumulation(GRPOTrainer):
    """Records, per optimizer step, the number of micro-batches and the ``more`` flags."""

    def _micro_batches(self, rows):
        micros = super()._micro_batches(rows)
        self.__dict__.setdefault("steps", []).append({"micros": len(micros), "more": []})
        return micros

    def _accumulating(self, more):
        self.steps[-1]["more"].append(more)
        return super()._accumulating(more)


@pytest.mark.parametrize("micro", [1, 2, None])
def test_accumulating_is_told_whether_another_micro_batch_follows(micro):
    """One process, minibatches of 3 rows: with micro-batches of 1, 2 or all rows, ``more`` is
    True for every micro-batch but the last of each step, and False (a bool) for the last."""
    cfg = GRPOConfig(**{**CFG, "group_size": 3, "micro_batch_size": micro, "grpo_epochs": 2})
    tr = RecordsAccumulation(CartPoleAdapter(seed=1, hidden=8, dtype=F64), cfg)
    tr.step()
    assert len(tr.steps) == 4 and {s["micros"] for s in tr.steps} == {3 if micro == 1 else 2 if micro == 2 else 1}
    for s in tr.steps:
        assert s["more"] == [True] * (s["micros"] - 1) + [False]
        assert all(type(flag) is bool for flag in s["more"])


def _on_rank(rank, world):
    from grpo_core.distributed import DistributedGRPOTrainer

    class Counting(DistributedGRPOTrainer):
        def _micro_batches(self, rows):
            micros = super()._micro_batches(rows)
            self.__dict__.setdefault("micros", []).append(len(micros))
            return micros

    tr = Counting(CartPoleAdapter(seed=CFG["seed"], hidden=8, dtype=F64), GRPOConfig(**CFG))
    tr.step()
    out = {"params": {k: v.clone() for k, v in tr.policy.state_dict().items()}, "micros": tr.micros}
    if rank == 0:  # one process holding both groups, run here so that the test process runs no loop code
        one = GRPOTrainer(CartPoleAdapter(seed=CFG["seed"], hidden=8, dtype=F64), GRPOConfig(**CFG))
        one.step()
        out["one"] = {k: v.clone() for k, v in one.policy.state_dict().items()}
    return out


@pytest.mark.slow
def test_two_ranks_with_uneven_micro_batches_step_as_one_process():
    """Two gloo ranks (DDP) whose minibatches split 3 + 1 and 1 + 3 rows, one row per
    micro-batch: the replicas stay equal and take the step of one process holding every row."""
    ranks = on_ranks(_on_rank, 2, timeout=120)
    assert [r["micros"] for r in ranks] == [[3, 1], [1, 3]], "the split the test relies on changed"
    for k, want in ranks[0]["one"].items():
        assert torch.equal(ranks[1]["params"][k], ranks[0]["params"][k]), f"the replicas differ at {k}"
        gap = float((ranks[0]["params"][k] - want).abs().max() / want.abs().max())
        assert gap < REL, f"{k}: 2 ranks left one process by {gap:.2e} (relative)"
