"""Stable-Baselines3 PPO on CartPole-v1 with the RL-Zoo hyperparameters, evaluated like GRPO.

Needs the optional ``bench`` extra (``pip install -e .[bench]``). The evaluation uses the same
100 greedy episodes from the same start states as the GRPO runs (``adapters.cartpole``'s
evaluation seeds on the batched CartPole), so "solved" means the same thing for both.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from adapters.cartpole import eval_start_seed
from adapters.cartpole_env import MAX_STEPS, SOLVED_THRESHOLD, BatchedCartPole, initial_states

# rl-baselines3-zoo, hyperparams/ppo.yml, CartPole-v1 ("lin_" = linear decay to 0)
ZOO = dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
           ent_coef=0.0, learning_rate=1e-3, clip_range=0.2, n_timesteps=100_000)


def greedy_eval(policy_fn, seed: int, round_: int, episodes: int = 100) -> float:
    """Mean return of ``episodes`` greedy episodes; ``policy_fn(states) -> actions``."""
    env = BatchedCartPole()
    env.reset(initial_states([eval_start_seed(seed, round_, k) for k in range(episodes)]))
    active = np.ones(episodes, dtype=bool)
    returns = np.zeros(episodes)
    for _ in range(MAX_STEPS):
        actions = policy_fn(env.states.astype(np.float32))
        returns += active
        _, terminated = env.step(actions, active)
        active &= ~terminated
        if not active.any():
            break
    return float(returns.mean())


def ppo_until_solved(seed: int, *, max_env_steps: int = 200_000, eval_every_steps: int = 1024) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    def linear(start):
        return lambda progress_remaining: progress_remaining * start

    env = make_vec_env("CartPole-v1", n_envs=ZOO["n_envs"], seed=seed)
    model = PPO("MlpPolicy", env, n_steps=ZOO["n_steps"], batch_size=ZOO["batch_size"],
                gae_lambda=ZOO["gae_lambda"], gamma=ZOO["gamma"], n_epochs=ZOO["n_epochs"],
                ent_coef=ZOO["ent_coef"], learning_rate=linear(ZOO["learning_rate"]),
                clip_range=linear(ZOO["clip_range"]), seed=seed, device="cpu", verbose=0)

    def act(states):
        with torch.no_grad():
            return model.policy.predict(states, deterministic=True)[0]

    class EvalStop(BaseCallback):
        def __init__(self):
            super().__init__()
            self.curve, self.solved_at, self.next_eval = [], None, eval_every_steps
            self.train_seconds, self.t0, self.round = 0.0, time.perf_counter(), 0

        def _on_step(self) -> bool:
            return self.solved_at is None  # False ends learn()

        def _on_rollout_start(self) -> None:
            steps = self.num_timesteps
            if steps < self.next_eval:
                return
            self.train_seconds += time.perf_counter() - self.t0
            self.next_eval = (steps // eval_every_steps + 1) * eval_every_steps
            self.round += 1
            score = greedy_eval(act, seed, self.round)
            self.curve.append({"env_steps": steps, "eval": score})
            if score >= SOLVED_THRESHOLD:
                self.solved_at = (steps, self.train_seconds)
            self.t0 = time.perf_counter()

    cb = EvalStop()
    # The linear schedules span the zoo's 1e5 steps when the budget is 1e5.
    model.learn(total_timesteps=max_env_steps, callback=cb)
    solved = cb.solved_at is not None
    return {"solved": solved, "steps": cb.solved_at[0] if solved else None,
            "seconds": cb.solved_at[1] if solved else None,
            "final_eval": cb.curve[-1]["eval"] if cb.curve else greedy_eval(act, seed, 0),
            "curve": cb.curve}
