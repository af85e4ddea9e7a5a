"""Grid sweep behind the CartPole defaults, run by ``grpo-harness ablate``: env steps to solve
per config and seed.

    python -m benchmarks.tune_cartpole '{"group_size": [4, 8], "lr": [3e-3, 1e-2]}' --seeds 0-4 \\
        --out runs/sweep --jsonl sweep.jsonl

Every point of the grid (GRPOConfig keys, or ``hidden``: the policy width, a train flag) is one
ablation variant over the CartPole defaults, run on ``--seeds`` to a greedy 100-episode mean of
475 or the ``--budget`` cap (an unsolved seed counts as the env steps it used, the budget). The
ablation folder ``--out`` holds the runs and the report (its verdicts compare each point with
the defaults on the same seeds) and continues where it stopped when run again; ``--jsonl``
gets one line per config with every seed's steps, whether it solved, and the median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from grpo_harness.ablate import BASE, Spec, Variant, check_spec, collect, parse_seeds, run_ablation


def grid_spec(grid: dict[str, list], seeds: list[int], budget: int) -> Spec:
    """One variant per point of ``grid`` (named by its values), each compared with the defaults."""
    variants = {BASE: Variant(BASE, baseline=None)}
    for values in itertools.product(*grid.values()):
        over = dict(zip(grid, values))
        hidden = over.pop("hidden", None)
        name = ", ".join(f"{k}={json.dumps(v)}" for k, v in zip(grid, values))
        variants[name] = Variant(name, over, train=[] if hidden is None else ["--hidden", str(hidden)],
                                 claim="sweep point vs the defaults")
    spec = Spec("cartpole", variants, seeds=seeds, train=["--max-env-steps", str(budget)])
    check_spec(spec)
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", help="JSON object: GRPOConfig field (or 'hidden') -> list of values")
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 (default)")
    p.add_argument("--budget", type=int, default=150_000, help="env-step cap of every run")
    p.add_argument("--out", type=Path, default=Path("runs/tune_cartpole"), help="the ablation folder")
    p.add_argument("--jsonl", type=Path, default=Path("sweep.jsonl"), help="one line per config (appended)")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    spec = grid_spec(json.loads(args.grid), parse_seeds(args.seeds), args.budget)
    status = run_ablation(spec, args.out, jobs=args.jobs)
    doc = collect(spec, args.out)
    with args.jsonl.open("a") as out:
        for name, v in spec.variants.items():
            runs = [doc["variants"][name]["results"][s] for s in spec.seeds if s in doc["variants"][name]["results"]]
            steps = [r["env_steps"] for r in runs]
            rec = {"over": v.set, "train": v.train, "steps": steps, "solved": [r["reached"] for r in runs],
                   "median": statistics.median(steps) if steps else None}
            out.write(json.dumps(rec) + "\n")
            print(rec, flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
