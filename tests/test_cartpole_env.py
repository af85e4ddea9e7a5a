"""Pins adapters.cartpole_env bit-for-bit against gymnasium's CartPole-v1."""

import gymnasium as gym  # the reference being reproduced (a core dependency)
import numpy as np
import pytest

from adapters import cartpole_env as ce
from adapters.cartpole_env import MAX_STEPS, BatchedCartPole, initial_state


def _make():
    return gym.make("CartPole-v1")


def test_module_constants():
    spec = gym.spec("CartPole-v1")
    assert ce.MAX_STEPS == 500 == spec.max_episode_steps
    assert ce.SOLVED_THRESHOLD == 475.0 == spec.reward_threshold


@pytest.mark.parametrize("seed", list(range(15)) + [123, 2024, 99991, 2**31 - 1, 2**40 + 7])
def test_initial_state_matches_gymnasium_reset(seed):
    env = _make()
    obs, _ = env.reset(seed=seed)
    ours = initial_state(seed)
    assert ours.dtype == np.float64 and ours.shape == (4,)
    internal = env.unwrapped.state
    assert internal.dtype == np.float64
    assert np.array_equal(ours, internal)
    assert np.array_equal(ours.astype(np.float32), obs)
    env.close()


def _policy_action(state, rng, kind):
    """Random actions, or a balancing heuristic so some episodes reach MAX_STEPS."""
    if kind == "random":
        return int(rng.integers(0, 2))
    return int(state[2] + 0.5 * state[3] + 0.01 * state[1] > 0)


def test_step_for_step_exact_against_gymnasium():
    n_random, n_heuristic = 40, 4
    kinds = ["random"] * n_random + ["heuristic"] * n_heuristic
    n = len(kinds)
    seeds = [1000 + i for i in range(n)]
    rng = np.random.default_rng(7)

    envs = [_make() for _ in range(n)]
    for env, seed in zip(envs, seeds):
        env.reset(seed=seed)
    batched = BatchedCartPole(n)
    batched.reset(np.stack([initial_state(s) for s in seeds]))
    for i, env in enumerate(envs):
        assert np.array_equal(batched.states[i], env.unwrapped.state)

    alive = np.ones(n, dtype=bool)
    lengths = np.zeros(n, dtype=int)
    t = 0
    while alive.any() and t < MAX_STEPS:
        actions = np.zeros(n, dtype=np.int64)
        for i in np.flatnonzero(alive):
            actions[i] = _policy_action(envs[i].unwrapped.state, rng, kinds[i])
        before = batched.states.copy()
        next_states, terminated = batched.step(actions, active=alive)
        assert next_states.dtype == np.float64 and terminated.dtype == np.bool_
        t += 1
        for i in range(n):
            if not alive[i]:
                # Finished episodes stay frozen and report nothing.
                assert np.array_equal(next_states[i], before[i])
                assert not terminated[i]
                continue
            _, reward, term, trunc, _ = envs[i].step(int(actions[i]))
            assert reward == 1.0
            assert np.array_equal(next_states[i], envs[i].unwrapped.state), (i, t)
            assert bool(terminated[i]) == term, (i, t)
            assert trunc == (t == MAX_STEPS and not term)
            lengths[i] = t
            if term:
                alive[i] = False
    # Coverage: random episodes terminated, heuristic ones reached the time limit.
    assert np.all(lengths[:n_random] < MAX_STEPS)
    assert np.any(lengths[n_random:] == MAX_STEPS)
    for env in envs:
        env.close()


def test_batch_equals_independent_singletons():
    n, steps = 64, 60
    rng = np.random.default_rng(3)
    starts = np.stack([initial_state(s) for s in range(n)])
    actions = rng.integers(0, 2, size=(steps, n))

    batched = BatchedCartPole(n)
    batched.reset(starts)
    singles = [BatchedCartPole(1) for _ in range(n)]
    for i, env in enumerate(singles):
        env.reset(starts[i : i + 1])

    for t in range(steps):
        # Steps past termination are kept: they are still the same arithmetic.
        states, term = batched.step(actions[t])
        for i, env in enumerate(singles):
            s1, t1 = env.step(actions[t, i : i + 1])
            assert np.array_equal(states[i : i + 1], s1), (i, t)
            assert term[i] == t1[0]


def test_actions_and_shapes_are_validated():
    env = BatchedCartPole(2)
    env.reset(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        env.step(np.array([0, 2]))
    with pytest.raises(ValueError):
        env.step(np.array([0]))
    with pytest.raises(TypeError):
        env.step(np.array([0.0, 1.0]))
    with pytest.raises(ValueError):
        env.reset(np.zeros((2, 3)))
