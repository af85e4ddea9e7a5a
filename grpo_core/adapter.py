"""What the training loop needs from a task, and nothing more.

An adapter turns an environment or a model into padded tensors plus masks, and back. The loop
never sees gymnasium or transformers types: only ``Rollout`` tensors and ``torch.nn.Module``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ._checks import as_mask, check_finite


@dataclass
class Rollout:
    """One rollout batch of ``N = B * G`` sequences; group ``b`` is rows ``b*G .. b*G+G-1``.

    Shapes: rewards, mask, old_logp (N, T).
    """

    rewards: torch.Tensor
    """Per-step rewards; only valid steps are read."""
    mask: torch.Tensor
    """1 on valid steps (actions or completion tokens), 0 on padding."""
    old_logp: torch.Tensor | None
    """Log-prob of each taken action under the policy that sampled it, frozen for all epochs
    of the iteration. An adapter may leave it None: the loop then takes it from the policy
    before any update of the iteration (the same weights that sampled), or, with one epoch and
    one minibatch, from the update's own forward, detached (TRL's shortcut: one forward less)."""
    inputs: Any = None
    """Whatever the adapter needs to recompute log-probs (observations, token ids...)."""
    info: dict[str, float] = field(default_factory=dict)
    """Task metrics for logging (mean return, episode length, env steps...)."""
    scored: torch.Tensor | None = None
    """0/1 mask of the steps where a reward is given (process supervision), read with
    ``stats_over="sequences"`` only; None: each sequence's last valid step (outcome reward)."""
    engine_logp: torch.Tensor | None = None
    """Log-prob of each taken action under the engine that sampled it, when that engine is not
    the trained policy itself (an inference engine, a copy in another precision): the
    distribution actually sampled from, temperature and suppressed ids applied. The loop then
    measures the mismatch with its own old log-probs and applies ``GRPOConfig.engine_correction``.
    None: the policy sampled (no mismatch to correct)."""

    def validate(self, group_size: int, num_groups: int) -> None:
        """Raise ValueError naming the culprit if shapes, mask or rewards are unusable."""
        n = group_size * num_groups
        for name in ("rewards", "mask", "old_logp", "engine_logp"):
            t = getattr(self, name)
            if t is None and name in ("old_logp", "engine_logp"):
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != n:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"adapter returned Rollout.{name} of shape {shape}; expected "
                                 f"({n}, T) for {num_groups} groups of {group_size}")
            if t.shape != self.rewards.shape:
                raise ValueError(f"adapter returned Rollout.{name} of shape {tuple(t.shape)} but "
                                 f"rewards has shape {tuple(self.rewards.shape)}")
        if self.scored is not None and (not isinstance(self.scored, torch.Tensor)
                                        or self.scored.shape != self.rewards.shape):
            shape = tuple(self.scored.shape) if isinstance(self.scored, torch.Tensor) else type(self.scored).__name__
            raise ValueError(f"adapter returned Rollout.scored of shape {shape} but rewards has shape "
                             f"{tuple(self.rewards.shape)}")
        m = as_mask(self.mask, self.rewards, "Rollout.mask")
        check_finite("Rollout.rewards", self.rewards, m)
        if self.old_logp is not None:
            check_finite("Rollout.old_logp", self.old_logp, m)
        if self.engine_logp is not None:
            check_finite("Rollout.engine_logp", self.engine_logp, m)


@runtime_checkable
class Adapter(Protocol):
    """The task side of GRPO. ``policy`` is the trained module; the loop owns the optimizer."""

    policy: torch.nn.Module
    # Optional: ``max_len: int``, the longest sequence the adapter can produce (the episode time
    # limit, the maximum completion length). Dr. GRPO's loss divides by it when
    # ``GRPOConfig.max_len`` is None.
    # Optional, needed by ``GRPOConfig.dynamic_sampling``:
    # ``collect_more(*, num_groups, group_size, iteration, draw) -> Rollout``: as ``collect``,
    #   a fresh draw of prompts or start states (earlier ones may recur, with new samples),
    #   different for each ``draw`` = 1, 2, ... of the iteration (deterministic in (seed,
    #   iteration, draw)), from the same policy; needed by ``dynamic_sampling_redraw="retry"``:
    #   a keyword ``again=(rollout, groups)``, and the rollout then holds G new samples of the
    #   prompt or start state of each listed group of ``rollout``, in that order;
    # ``join_groups(parts: list[tuple[Rollout, list[int]]]) -> Rollout``: one rollout made of
    #   the listed groups of each part, in order (group g of a part is its rows g*G .. g*G+G-1),
    #   padded to the longest T (``engine_logp`` too, when the parts carry it); ``info`` may be
    #   the first part's.
    # Optional, needed by a data-parallel run (``grpo_core.distributed``): ``collect`` taking the
    # keywords ``first_group`` and ``total_groups``: the rollout holds groups first_group ..
    # first_group + num_groups - 1 of the iteration's total_groups (start state or prompt, and
    # sampling, chosen by the global group index), so that the ranks' shares together are what
    # one process collects.

    def collect(self, *, num_groups: int, group_size: int, iteration: int) -> Rollout:
        """Sample ``group_size`` sequences for each of ``num_groups`` groups from ``policy``
        (all samples of a group share a start state or prompt); fill ``old_logp`` or leave
        it None for the loop to fill."""
        ...

    def logp_and_entropy(
        self, model: torch.nn.Module, rollout: Rollout, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step log-prob of the taken action and entropy of the action distribution under
        ``model``, for the rollout rows ``rows`` (a 1-D index tensor).

        Shapes: rows (n,) -> logp (n, T), entropy (n, T), gradient flowing to ``model``.
        """
        ...

    def make_reference(self) -> torch.nn.Module:
        """A frozen copy of ``policy`` (eval mode, requires_grad False)."""
        ...
