"""Batched CartPole-v1 in numpy float64, bit-for-bit equal to gymnasium's CartPole-v1.

What is reproduced (pinned against gymnasium 1.x by ``tests/test_cartpole_env.py``):

* Constants: gravity 9.8, cart mass 1.0, pole mass 0.1, half pole length 0.5,
  force magnitude 10.0, tau 0.02 s, explicit ("euler") kinematics integrator.
* Dynamics: the same expressions evaluated in the same operation order as
  ``gymnasium.envs.classic_control.cartpole.CartPoleEnv.step``, in float64, so
  every element of the next state is identical (not merely close) to the
  single env's internal ``env.unwrapped.state``.
* Termination: ``x < -2.4 or x > 2.4 or theta < -12 deg or theta > 12 deg``
  (threshold ``12 * 2 * pi / 360`` radians), tested on the *new* state, strict
  inequalities, exactly as gymnasium.
* Initial state: ``initial_state(seed)`` equals the float64 internal state after
  ``gymnasium.make("CartPole-v1").reset(seed=seed)``: a
  ``np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))`` drawing
  ``uniform(-0.05, 0.05, size=(4,))``.

What is deliberately not reproduced:

* Reward: always 1.0 per step taken, including the terminating step (the
  CartPole-v1 default, ``sutton_barto_reward=False``), so it is not returned;
  an episode's return is its length.
* Truncation: none here. CartPole-v1's ``TimeLimit`` truncates at 500 steps;
  the caller does the same with ``MAX_STEPS``.
* Autoreset: none. Terminated rows keep being integrated if stepped; pass
  ``active`` to ``BatchedCartPole.step`` to freeze them instead.
* Observations: gymnasium returns ``float32`` copies of the state; this module
  hands back the float64 state itself (cast if you need gymnasium's observation).

State layout: ``(n, 4)`` rows of ``(x, x_dot, theta, theta_dot)``.
Actions: 0 pushes the cart left (force -10), 1 pushes it right (force +10).
"""

from __future__ import annotations

import math

import numpy as np

MAX_STEPS = 500
"""CartPole-v1's ``max_episode_steps`` (the caller truncates there)."""

SOLVED_THRESHOLD = 475.0
"""CartPole-v1's ``reward_threshold``: mean return counted as solved."""

GRAVITY = 9.8
MASSCART = 1.0
MASSPOLE = 0.1
TOTAL_MASS = MASSPOLE + MASSCART
LENGTH = 0.5  # half the pole's length
POLEMASS_LENGTH = MASSPOLE * LENGTH
FORCE_MAG = 10.0
TAU = 0.02  # seconds between state updates
THETA_THRESHOLD_RADIANS = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
RESET_LOW = -0.05
RESET_HIGH = 0.05


def initial_state(seed: int) -> np.ndarray:
    """The float64 state ``gymnasium.make("CartPole-v1").reset(seed=seed)`` sets, shape ``(4,)``."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed))))
    return rng.uniform(low=RESET_LOW, high=RESET_HIGH, size=(4,))


def initial_states(seeds) -> np.ndarray:
    """``initial_state`` for each seed, stacked to shape ``(len(seeds), 4)``."""
    return np.stack([initial_state(s) for s in seeds]).reshape(-1, 4)


def cartpole_step(states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Euler step for every row; pure function.

    ``states``: ``(n, 4)`` float64; ``actions``: ``(n,)`` ints in {0, 1}.
    Returns ``(next_states (n, 4) float64, terminated (n,) bool)``.
    """
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or states.shape[1] != 4:
        raise ValueError(f"states must have shape (n, 4), got {states.shape}")
    actions = np.asarray(actions)
    if actions.shape != (states.shape[0],):
        raise ValueError(f"actions must have shape ({states.shape[0]},), got {actions.shape}")
    if not np.issubdtype(actions.dtype, np.integer) and actions.dtype != np.bool_:
        raise TypeError(f"actions must be integers in {{0, 1}}, got dtype {actions.dtype}")
    if actions.size and not np.all((actions == 0) | (actions == 1)):
        raise ValueError("actions must be 0 or 1")

    # Contiguous (4, n) columns, like gymnasium's own vector env.
    x, x_dot, theta, theta_dot = np.ascontiguousarray(states.T)
    force = np.where(actions == 1, FORCE_MAG, -FORCE_MAG)
    costheta = np.cos(theta)
    sintheta = np.sin(theta)

    # Same expressions, same left-to-right order as CartPoleEnv.step.
    temp = (force + POLEMASS_LENGTH * np.square(theta_dot) * sintheta) / TOTAL_MASS
    thetaacc = (GRAVITY * sintheta - costheta * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * np.square(costheta) / TOTAL_MASS)
    )
    xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS

    # Explicit Euler: positions use the old velocities.
    x = x + TAU * x_dot
    x_dot = x_dot + TAU * xacc
    theta = theta + TAU * theta_dot
    theta_dot = theta_dot + TAU * thetaacc

    next_states = np.stack((x, x_dot, theta, theta_dot), axis=1)
    terminated = (
        (x < -X_THRESHOLD)
        | (x > X_THRESHOLD)
        | (theta < -THETA_THRESHOLD_RADIANS)
        | (theta > THETA_THRESHOLD_RADIANS)
    )
    return next_states, terminated


class BatchedCartPole:
    """``n`` CartPole-v1 systems advanced together; reward is a constant 1 per step.

    No truncation and no autoreset: the caller stops at ``MAX_STEPS`` and
    ignores (or freezes, via ``active``) rows that have terminated.
    """

    def __init__(self, num_envs: int = 1):
        if num_envs < 0:
            raise ValueError(f"num_envs must be >= 0, got {num_envs}")
        self.states = np.zeros((num_envs, 4), dtype=np.float64)

    @property
    def num_envs(self) -> int:
        return self.states.shape[0]

    def reset(self, states: np.ndarray) -> np.ndarray:
        """Set the states (copied to float64, shape ``(n, 4)``; ``n`` may change). Returns them."""
        states = np.array(states, dtype=np.float64)
        if states.ndim == 1:
            states = states.reshape(1, -1)
        if states.ndim != 2 or states.shape[1] != 4:
            raise ValueError(f"states must have shape (n, 4), got {states.shape}")
        self.states = states
        return self.states.copy()

    def reset_from_seeds(self, seeds) -> np.ndarray:
        """Reset row ``i`` to ``initial_state(seeds[i])``. Returns the states."""
        return self.reset(initial_states(seeds))

    def step(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance every row (or only rows where ``active`` is True) by one step.

        Returns ``(next_states (n, 4) float64, terminated (n,) bool)``; both are
        copies. Rows outside ``active`` keep their state and report
        ``terminated=False``; their actions are not checked.
        """
        actions = np.asarray(actions)
        if active is None:
            next_states, terminated = cartpole_step(self.states, actions)
            self.states = next_states
            return next_states.copy(), terminated
        active = np.asarray(active, dtype=bool)
        n = self.num_envs
        if active.shape != (n,) or actions.shape != (n,):
            raise ValueError(f"actions and active must have shape ({n},)")
        terminated = np.zeros(n, dtype=bool)
        if active.any():
            sub_states, sub_term = cartpole_step(self.states[active], actions[active])
            self.states[active] = sub_states
            terminated[active] = sub_term
        return self.states.copy(), terminated
