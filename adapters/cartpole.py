"""CartPole-v1 adapter: B groups of G episodes rolled out in lockstep, one policy forward per step.

Conventions shared with the oracle ``reference/cartpole_grpo.py`` (which re-implements them
independently, so that the same seed gives the same trajectories):

- Row ``n = b * G + i`` is episode ``i`` of group ``b``.
- Every episode of group ``b`` at iteration ``it`` starts from the state that
  ``gymnasium.make("CartPole-v1").reset(seed=group_start_seed(seed, it, b))`` gives.
- Episode ``(b, i)`` samples its actions by inverting the CDF with the uniforms
  ``action_uniforms(seed, it, b, i)``: at step ``t`` the action is 0 if ``u[t] < p(0 | s_t)``,
  else 1, with ``p`` the policy's softmax in the policy's dtype.
- Episodes run until termination or the 500-step truncation, reward 1 per step; a truncated
  episode is treated like any other end (no bootstrap), as the plain CartPole GRPO does.
- The old log-probs are recomputed after the episodes end, before any update, by one batched
  forward of the same policy over the padded batch (the layout the updates use).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from grpo_core.adapter import Rollout
from grpo_core.refmodel import frozen_copy

from .cartpole_env import MAX_STEPS, BatchedCartPole, initial_states

OBS_DIM, N_ACTIONS = 4, 2


class CartPolePolicy(nn.Module):
    """MLP ``4 -> hidden -> hidden -> 2`` with tanh; outputs action logits."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, N_ACTIONS))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def group_start_seed(seed: int, iteration: int, group: int) -> int:
    """The ``reset`` seed shared by the episodes of one group."""
    return int(np.random.SeedSequence([seed, 0, iteration, group]).generate_state(1)[0])


def action_uniforms(seed: int, iteration: int, group: int, sample: int) -> np.ndarray:
    """The 500 uniforms in [0, 1) that drive one episode's action sampling."""
    return np.random.default_rng([seed, 1, iteration, group, sample]).random(MAX_STEPS)


def eval_start_seed(seed: int, round_: int, episode: int) -> int:
    """Start seeds of greedy evaluation episodes (a stream apart from the training seeds)."""
    return int(np.random.SeedSequence([seed, 3, round_, episode]).generate_state(1)[0])


class CartPoleAdapter:
    """Implements ``grpo_core.adapter.Adapter`` for CartPole-v1."""

    max_len = MAX_STEPS
    """The longest episode (the time limit): Dr. GRPO's constant normaliser."""

    def __init__(self, *, seed: int = 0, hidden: int = 64, dtype: torch.dtype = torch.float32,
                 policy: nn.Module | None = None, outcome_reward: bool = False):
        self.seed = seed
        self.dtype = dtype
        self.outcome_reward = outcome_reward
        """False: CartPole's reward 1 at every step. True: the episode's return (its length) paid
        once, at its last step, an outcome reward for ``stats_over="sequences"``."""
        if policy is None:
            with torch.random.fork_rng(devices=[]):  # built on the CPU: no CUDA stream to save
                torch.manual_seed(seed)
                policy = CartPolePolicy(hidden)
        self.policy = policy.to(dtype)

    def make_reference(self) -> nn.Module:
        return frozen_copy(self.policy)

    @torch.no_grad()
    def collect(self, *, num_groups: int, group_size: int, iteration: int, first_group: int = 0,
                total_groups: int | None = None) -> Rollout:
        """Groups ``first_group .. first_group + num_groups - 1`` of the iteration (a
        data-parallel rank's share; ``total_groups`` is not needed: every group is seeded by its
        own index)."""
        n = num_groups * group_size
        groups = range(first_group, first_group + num_groups)
        starts = [group_start_seed(self.seed, iteration, b) for b in groups]
        env = BatchedCartPole()
        env.reset(np.repeat(initial_states(starts), group_size, axis=0))
        u = np.stack([action_uniforms(self.seed, iteration, b, i) for b in groups for i in range(group_size)])
        obs = np.zeros((n, MAX_STEPS, OBS_DIM))
        actions = np.zeros((n, MAX_STEPS), dtype=np.int64)
        mask = np.zeros((n, MAX_STEPS), dtype=bool)
        active = np.ones(n, dtype=bool)
        for t in range(MAX_STEPS):
            rows = np.flatnonzero(active)
            obs[rows, t] = env.states[rows]
            logp_all = torch.log_softmax(self.policy(torch.from_numpy(obs[rows, t]).to(self.dtype)), -1)
            a = (u[rows, t] >= logp_all[:, 0].exp().double().numpy()).astype(np.int64)
            actions[rows, t] = a
            mask[rows, t] = True
            _, terminated = env.step(actions[:, t], active)
            active &= ~terminated
            if not active.any():
                break
        length = mask.sum(1)
        t_len = int(length.max())
        m = torch.from_numpy(mask[:, :t_len])
        rewards = m.to(self.dtype)
        if self.outcome_reward:
            rewards = torch.zeros_like(rewards)
            rewards[torch.arange(n), torch.from_numpy(length - 1)] = torch.from_numpy(length).to(self.dtype)
        rollout = Rollout(
            rewards=rewards, mask=m, old_logp=torch.empty(0),
            inputs={"obs": torch.from_numpy(obs[:, :t_len]).to(self.dtype),
                    "actions": torch.from_numpy(actions[:, :t_len])},
            info={"mean_return": float(length.mean()), "mean_length": float(length.mean()),
                  "min_return": float(length.min()), "max_return": float(length.max()),
                  "env_steps": int(length.sum())},
        )
        # Old log-probs: one batched forward of the rollout policy over the whole batch, in the
        # layout the updates use, so that the first update's ratio is exactly 1.
        rollout.old_logp = self.logp_and_entropy(self.policy, rollout, torch.arange(n))[0]
        return rollout

    def logp_and_entropy(self, model: nn.Module, rollout: Rollout, rows: torch.Tensor):
        logits = model(rollout.inputs["obs"][rows])
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, rollout.inputs["actions"][rows].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    @torch.no_grad()
    def evaluate(self, episodes: int = 100, round_: int = 0) -> np.ndarray:
        """Greedy (argmax) returns of ``episodes`` episodes from evaluation start seeds."""
        env = BatchedCartPole()
        env.reset(initial_states([eval_start_seed(self.seed, round_, k) for k in range(episodes)]))
        active = np.ones(episodes, dtype=bool)
        returns = np.zeros(episodes)
        for _ in range(MAX_STEPS):
            logits = self.policy(torch.from_numpy(env.states).to(self.dtype))
            a = logits.argmax(-1).numpy()
            returns += active
            _, terminated = env.step(a, active)
            active &= ~terminated
            if not active.any():
                break
        return returns
