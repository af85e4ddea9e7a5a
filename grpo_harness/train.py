"""``grpo-harness train cartpole``: train a CartPole-v1 policy with the verified GRPO loop.

This module says what to train; the run folder, configuration layering (CartPole defaults <
``--config`` < ``--set`` < ``--seed``), checkpoints, signals and resume are ``grpo_harness.run``'s
(see its docstring). Training options (budget, evaluation cadence, network width) are flags;
their defaults are ``CARTPOLE_DEFAULTS["train"]``.

The CartPole rollouts, minibatch orders and evaluation start states are all seeded from (seed,
iteration) or the evaluation round, and the global RNG streams are checkpointed, so a resumed
run writes the same metrics and weights as an uninterrupted one. TensorBoard plots against the
cumulative env steps.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from .run import TrainingRun, UsageError, add_run_arguments, check_int, run_command

# ---------------------------------------------------------------------------------------------
# CartPole defaults: the one place to tune them.
# "grpo" overrides GRPOConfig's generic defaults; "train" holds the training-only options.
CARTPOLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {
        "group_size": 4,
        "groups_per_iteration": 1,
        "gamma": 0.99,
        "grpo_epochs": 10,
        "minibatches": 1,
        "lr": 1e-2,
        "beta": 0.04,
        "ent_coef": 0.0,
        "max_grad_norm": 1.0,
    },
    "train": {
        "max_env_steps": 200_000,  # stop once the cumulative env steps reach this
        "max_iterations": None,  # stop after this many iterations in total (None: no limit)
        "eval_every": 5,  # greedy evaluation every K iterations (0: only at the end)
        "eval_episodes": 100,
        "checkpoint_every": 5,  # checkpoint.pt every K iterations (0: by time and at the end)
        "checkpoint_minutes": 10.0,  # and every M minutes (0: off)
        "early_stop": True,  # stop at the first evaluation whose mean reaches the threshold
        "hidden": 64,  # width of the policy MLP's two hidden layers
    },
}
# ---------------------------------------------------------------------------------------------

SOLVED_THRESHOLD = 475.0  # CartPole-v1's reward threshold (gymnasium's spec)
ENV_ID = "CartPole-v1"
LOG_EVERY = 10  # plain-log cadence (iterations) when stderr is not a terminal
HELP = "CartPole-v1 with a small MLP policy"
DESCRIPTION = ("Train CartPole-v1 with the verified GRPO loop. Precedence: CartPole defaults < "
               "--config < --set < --seed.")


def add_arguments(p) -> None:
    d = CARTPOLE_DEFAULTS["train"]
    add_run_arguments(p, d, threads="1: a small MLP gains nothing from more, and extra threads spin against "
                      "other processes on a busy machine")
    p.add_argument("--max-env-steps", type=int, metavar="N",
                   help=f"total env-step budget (default {d['max_env_steps']:,})")
    p.add_argument("--eval-episodes", type=int, metavar="N",
                   help=f"episodes per evaluation (default {d['eval_episodes']})")
    p.add_argument("--no-early-stop", dest="early_stop", action="store_false", default=None,
                   help=f"keep training after an evaluation mean reaches {SOLVED_THRESHOLD:g}")
    p.add_argument("--hidden", type=int, metavar="H", help=f"policy hidden width (default {d['hidden']})")
    p.set_defaults(run=run)


POLICY_COPIES = 7
"""Float32 copies of the policy's parameters a run holds at once: the policy, the reference, the
gradients, Adam's two moments, the CPU snapshot of the last iteration and the checkpoint being
written."""


def policy_parameters(hidden: int) -> int:
    """Parameters of ``adapters.cartpole.CartPolePolicy`` (4 -> hidden -> hidden -> 2)."""
    return (4 * hidden + hidden) + (hidden * hidden + hidden) + (2 * hidden + 2)


def check_fits_memory(hidden: int) -> None:
    """UsageError, naming the estimate, for a ``--hidden`` whose run cannot fit in this machine's
    memory (it would fail in an allocation, or swap, long after the start)."""
    need = policy_parameters(hidden) * 4 * POLICY_COPIES
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return
    if need > have:
        raise UsageError(f"--hidden {hidden}: the policy would have {policy_parameters(hidden):,} parameters, about "
                         f"{need / 1e9:,.1f} GB for the run ({POLICY_COPIES} float32 copies: policy, reference, "
                         f"gradients, Adam's moments, snapshot, checkpoint); this machine has {have / 1e9:,.1f} GB")


def run(args) -> int:
    return run_command(CartPoleRun, args)


class CartPoleRun(TrainingRun):
    env = "cartpole"
    prog = "grpo-harness train"
    DEFAULTS = CARTPOLE_DEFAULTS
    FIXED_TRAIN = ("hidden",)
    x_key = "env_steps"
    _newly_solved = False  # set by make_record for on_record

    # settings and build ----------------------------------------------------------------------
    def resolve_task(self, saved) -> None:
        self.task = {"env_id": ENV_ID}
        self.model = {"policy": "mlp"}

    def check_train(self) -> None:
        t = self.train
        check_int(t, "max_env_steps", 1)
        check_int(t, "eval_episodes", 1)
        check_int(t, "hidden", 1)
        check_fits_memory(t["hidden"])
        if not isinstance(t["early_stop"], bool):
            raise UsageError(f"early_stop={t['early_stop']!r} is invalid: expected true or false")

    def default_threads(self) -> int:
        return 1

    def build(self):
        from adapters.cartpole import CartPoleAdapter

        self.adapter = CartPoleAdapter(seed=self.cfg.seed, hidden=self.train["hidden"])
        try:
            return self.make_trainer(self.adapter)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def initial_progress(self) -> dict[str, Any]:
        # eval_index: evaluation rounds consumed by periodic evaluations;
        # solved: {iteration, env_steps, wall_time, eval_mean} of the first solving evaluation
        return {"env_steps": 0, "eval_index": 0, "best_eval": None, "solved": None}

    # the loop ---------------------------------------------------------------------------------
    def _budget_reached(self, iterations: int, env_steps: int) -> str | None:
        t = self.train
        if t["max_iterations"] is not None and iterations >= t["max_iterations"]:
            return f"iteration budget ({t['max_iterations']:,} iterations)"
        if env_steps >= t["max_env_steps"]:
            return f"env-step budget ({t['max_env_steps']:,} steps)"
        return None

    def stop_reason(self) -> str | None:
        if self.progress["solved"] is not None and self.train["early_stop"]:
            if self.trainer.iteration == self.start_iteration:
                return "already solved (pass --no-early-stop to keep training)"
            return f"solved (eval mean >= {SOLVED_THRESHOLD:g})"
        return self._budget_reached(self.trainer.iteration, self.progress["env_steps"])

    def make_record(self, stats):
        t, p = self.train, dict(self.progress)
        env_steps = p["env_steps"] + int(stats["env_steps"])
        record = {k: v for k, v in stats.items() if k != "env_steps"}
        record["iteration_env_steps"] = int(stats["env_steps"])
        record["env_steps"] = env_steps
        done = self.trainer.iteration
        periodic = t["eval_every"] > 0 and done % t["eval_every"] == 0
        last = self._budget_reached(done, env_steps) is not None
        if periodic or last:
            # A final-only evaluation reuses the next round without consuming it, so a longer
            # (resumed) run evaluates on the same start states as a straight one.
            returns = self.adapter.evaluate(t["eval_episodes"], round_=p["eval_index"])
            record["eval_mean"], record["eval_std"] = float(returns.mean()), float(returns.std())
            p["eval_index"] += int(periodic)
            p["best_eval"] = record["eval_mean"] if p["best_eval"] is None else max(p["best_eval"], record["eval_mean"])
        record["wall_time"] = self.wall()
        if p["solved"] is None and record.get("eval_mean", -math.inf) >= SOLVED_THRESHOLD:
            p["solved"] = {"iteration": stats["iteration"], "env_steps": env_steps,
                           "wall_time": record["wall_time"], "eval_mean": record["eval_mean"]}
            self._newly_solved = True
        p["env_steps"] = env_steps
        return record, p

    # display and outputs ----------------------------------------------------------------------
    def make_display(self):
        from .trainlog import Progress

        self._newly_solved = False
        return Progress(self.train["max_env_steps"], self.progress["env_steps"], every=LOG_EVERY)

    def on_record(self, record) -> None:
        steps = record["env_steps"] - self._session_steps
        elapsed = time.perf_counter() - self.session_start
        self.bar.update(record, record["iteration_env_steps"], steps / max(elapsed, 1e-9))
        if self._newly_solved:
            self._newly_solved = False
            s = self.progress["solved"]
            self.say(f"solved: eval mean {s['eval_mean']:.1f} >= {SOLVED_THRESHOLD:g} at iteration "
                     f"{s['iteration']}, {s['env_steps']:,} env steps, {s['wall_time']:.1f} s")

    def describe(self) -> str:
        self._session_steps = self.progress["env_steps"]
        return (f"{ENV_ID} -> {self.out} (seed {self.cfg.seed}, {self.cfg.groups_per_iteration}x"
                f"{self.cfg.group_size} episodes/iteration, budget {self.train['max_env_steps']:,} env steps)")

    def write_curve(self, path) -> None:
        from .trainlog import METRICS_FILE, plot_curve, read_metrics

        solved = self.progress["solved"]
        plot_curve(read_metrics(self.out / METRICS_FILE), path, threshold=SOLVED_THRESHOLD,
                   solved_env_steps=solved["env_steps"] if solved else None,
                   title=f"{ENV_ID} GRPO (seed {self.cfg.seed})")

    def summary_lines(self) -> list[str]:
        p = self.progress
        steps = f"{p['env_steps']:,} env steps and {p['wall_time']:.1f} s"
        if p["solved"]:
            s = p["solved"]
            return [f"{ENV_ID}: SOLVED (eval mean {s['eval_mean']:.1f} >= {SOLVED_THRESHOLD:g}) at iteration "
                    f"{s['iteration']}, after {s['env_steps']:,} env steps and {s['wall_time']:.1f} s"]
        best = "none yet" if p["best_eval"] is None else f"{p['best_eval']:.1f}"
        return [f"{ENV_ID}: not solved (best eval mean {best}, threshold {SOLVED_THRESHOLD:g}) after {steps}"]
