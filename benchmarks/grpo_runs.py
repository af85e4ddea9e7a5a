"""Run the core GRPO loop on CartPole until solved; shared by the benchmark and the tuning sweep."""

from __future__ import annotations

import time

import numpy as np
import torch

from adapters.cartpole import CartPoleAdapter
from adapters.cartpole_env import SOLVED_THRESHOLD
from grpo_core.config import GRPOConfig
from grpo_core.loop import GRPOTrainer


def grpo_until_solved(cfg: GRPOConfig, *, hidden: int = 64, max_env_steps: int = 200_000,
                      eval_episodes: int = 100, eval_every_steps: int = 1024) -> dict:
    """Train until the greedy ``eval_episodes`` mean reaches 475 or the step budget runs out.

    Evaluates after the first iteration that crosses each multiple of ``eval_every_steps``
    training steps (the same cadence the PPO runs use, so that neither side gets more looks at
    its policy). Evaluation episodes do not count as training steps; wall time excludes them.
    Returns steps and seconds to solve (None if unsolved) and the learning curve.
    """
    adapter = CartPoleAdapter(seed=cfg.seed, hidden=hidden)
    trainer = GRPOTrainer(adapter, cfg)
    steps, train_seconds, curve, kls, grad_norms = 0, 0.0, [], [], []
    solved_at, next_eval = None, eval_every_steps
    while steps < max_env_steps:
        t0 = time.perf_counter()
        m = trainer.step()
        train_seconds += time.perf_counter() - t0
        steps += m["env_steps"]
        kls.append(m.get("kl", 0.0))
        grad_norms.append(m["grad_norm_max"])
        point = {"env_steps": steps, "train_return": m["mean_return"], "kl": m.get("kl", 0.0)}
        if steps >= next_eval:
            next_eval = (steps // eval_every_steps + 1) * eval_every_steps
            point["eval"] = float(adapter.evaluate(eval_episodes, round_=trainer.iteration).mean())
            if point["eval"] >= SOLVED_THRESHOLD:
                solved_at = (steps, train_seconds)
        curve.append(point)
        if solved_at:
            break
    final_eval = curve[-1].get("eval")
    if final_eval is None:
        final_eval = float(adapter.evaluate(eval_episodes, round_=trainer.iteration).mean())
    return {"solved": solved_at is not None, "steps": solved_at[0] if solved_at else None,
            "seconds": solved_at[1] if solved_at else None, "final_eval": final_eval,
            "total_steps": steps, "kl_max": float(np.max(kls)), "kl_mean": float(np.mean(kls)),
            "grad_norm_max": float(np.max(grad_norms)),
            "curve": curve}


def set_single_thread() -> None:
    torch.set_num_threads(1)
