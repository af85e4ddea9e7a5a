"""CartPole-v1 stepping speed: gymnasium single env, gymnasium's native vector env,
and adapters.cartpole_env.BatchedCartPole. Prints a markdown table of env-steps/s.

Random actions (drawn up front, outside the timed loop). Terminated episodes are
restarted in every variant: gymnasium single env via ``reset()``, the gymnasium
vector env by its own autoreset, BatchedCartPole by overwriting the terminated
rows with fresh uniform(-0.05, 0.05) states (vectorised, inside the timed loop).
Each row runs for about ``SECONDS_PER_ROW`` of wall time; total well under 30 s.

Run from the repository root:  python -m benchmarks.cartpole_env_speed
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # allow `python benchmarks/cartpole_env_speed.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adapters.cartpole_env import BatchedCartPole, initial_states  # noqa: E402

SECONDS_PER_ROW = 1.5
SIZES = (8, 64, 512)
ACTION_BLOCK = 1024  # steps of pre-drawn actions, cycled


def _timed(step_fn, env_steps_per_call: int) -> float:
    """Call step_fn(k) repeatedly for ~SECONDS_PER_ROW; return env-steps per second."""
    for k in range(20):  # warm-up
        step_fn(k)
    calls = 0
    start = time.perf_counter()
    deadline = start + SECONDS_PER_ROW
    while True:
        for _ in range(50):
            step_fn(calls)
            calls += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    return calls * env_steps_per_call / (now - start)


def bench_gym_single() -> float:
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, 2, size=ACTION_BLOCK).tolist()

    def step(k):
        _, _, term, trunc, _ = env.step(actions[k % ACTION_BLOCK])
        if term or trunc:
            env.reset()

    rate = _timed(step, 1)
    env.close()
    return rate


def bench_gym_vector(n: int) -> float:
    import gymnasium as gym

    envs = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    envs.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, 2, size=(ACTION_BLOCK, n))

    def step(k):
        envs.step(actions[k % ACTION_BLOCK])

    rate = _timed(step, n)
    envs.close()
    return rate


def bench_batched(n: int) -> float:
    rng = np.random.default_rng(0)
    env = BatchedCartPole(n)
    env.reset(initial_states(range(n)))
    actions = rng.integers(0, 2, size=(ACTION_BLOCK, n))

    def step(k):
        _, term = env.step(actions[k % ACTION_BLOCK])
        n_done = int(term.sum())
        if n_done:
            env.states[term] = rng.uniform(-0.05, 0.05, size=(n_done, 4))

    return _timed(step, n)


def main() -> None:
    import gymnasium as gym

    rows = [("gymnasium `make` single env", 1, bench_gym_single())]
    for n in SIZES:
        rows.append(("gymnasium `make_vec` vector_entry_point", n, bench_gym_vector(n)))
    for n in SIZES:
        rows.append(("`BatchedCartPole`", n, bench_batched(n)))

    print(f"CartPole-v1 env-steps/s, random actions (numpy {np.__version__}, gymnasium {gym.__version__})")
    print()
    print("| implementation | N | env-steps/s |")
    print("|---|---:|---:|")
    for name, n, rate in rows:
        print(f"| {name} | {n} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
