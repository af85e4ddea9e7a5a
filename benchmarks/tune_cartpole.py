"""Grid sweep behind the CartPole defaults: env steps to solve per config and seed.

    python -m benchmarks.tune_cartpole '{"group_size": [4, 8], "lr": [3e-3, 1e-2]}' --seeds 5 --out sweep.jsonl

Each config runs ``--seeds`` seeds to a 100-episode greedy mean of 475 (evaluated every 1024
training steps) or the 150k-step cap; an unsolved seed counts as 1e9 steps. One JSON line per
config with every seed's steps and the median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from benchmarks.grpo_runs import grpo_until_solved
from grpo_core.config import GRPOConfig
from grpo_harness.train import CARTPOLE_DEFAULTS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", help="JSON object: GRPOConfig field (or 'hidden') -> list of values")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=150_000)
    p.add_argument("--out", default="sweep.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    grid = json.loads(args.grid)
    base = GRPOConfig.from_dict(CARTPOLE_DEFAULTS["grpo"])
    with open(args.out, "a") as out:
        for values in itertools.product(*grid.values()):
            over = dict(zip(grid, values))
            hidden = over.pop("hidden", CARTPOLE_DEFAULTS["train"]["hidden"])
            steps = []
            for seed in range(args.seeds):
                r = grpo_until_solved(base.replace(**over, seed=seed), hidden=hidden,
                                      max_env_steps=args.budget)
                steps.append(r["steps"] if r["solved"] else 10**9)
            rec = {"over": over, "hidden": hidden, "steps": steps, "median": statistics.median(steps)}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(rec, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
