"""CartPole-v1 benchmark: GRPO (this project) vs SB3 PPO (RL-Zoo), rollout throughput, and the
plan's ablation. One process, one torch thread, so the ratios compare like with like.

    python -m benchmarks.cartpole [--seeds 5] [--budget 100000] [--out benchmarks/results]
        [--ablation-seeds 0-19] [--jobs 2]

GRPO vs PPO runs in this process, both evaluated after the first update that crosses each
multiple of 1,024 training steps. The ablation is ``grpo-harness ablate cartpole --variants
benchmarks/ablations/cartpole.toml`` (its own cadence: ``train cartpole``'s evaluation every 5
iterations; its verdicts from paired seeds), run into ``--out/ablation`` and continued there if
interrupted. Prints markdown tables; writes ``cartpole.json`` and ``cartpole_curves.png`` in
``--out``. Needs the ``bench`` extra for PPO (``pip install -e .[bench]``); without it the PPO
rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from adapters.cartpole import CartPoleAdapter
from benchmarks.grpo_runs import grpo_until_solved
from grpo_core.config import GRPOConfig
from grpo_harness.stats import quartiles
from grpo_harness.train import CARTPOLE_DEFAULTS

CARTPOLE_HIDDEN = CARTPOLE_DEFAULTS["train"]["hidden"]

ABLATION_FILE = Path(__file__).resolve().parent / "ablations" / "cartpole.toml"


def summarise(runs: list[dict], budget: int) -> dict:
    """Median and IQR of steps and seconds to solve; an unsolved seed counts as the budget
    (steps) or its full training time (seconds), and is reported as unsolved."""
    steps = [r["steps"] if r["solved"] else budget for r in runs]
    secs = [r["seconds"] if r["solved"] else r.get("total_seconds", float("nan")) for r in runs]
    finals = [r["final_eval"] for r in runs]
    return {"solved": sum(r["solved"] for r in runs), "seeds": len(runs),
            "steps_q": quartiles(steps), "seconds_q": quartiles(secs),
            "final_eval_median": statistics.median(finals),
            "final_eval_std": float(np.std(finals)),
            "kl_max": max((r["kl_max"] for r in runs if "kl_max" in r), default=None),
            "kl_mean": (statistics.median(r["kl_mean"] for r in runs) if all("kl_mean" in r for r in runs)
                        else None),
            "grad_norm_max": max((r["grad_norm_max"] for r in runs if "grad_norm_max" in r), default=None)}


def fmt_q(q, digits=0) -> str:
    return f"{q[1]:,.{digits}f} [{q[0]:,.{digits}f}, {q[2]:,.{digits}f}]"


def throughput(group_size: int, num_groups: int, hidden: int, repeats: int = 5) -> dict:
    """env steps/s of the GRPO collector (policy forward included, untrained policy, so short
    episodes) vs gymnasium's native vector env with random actions, at the same batch size."""
    import gymnasium as gym

    adapter = CartPoleAdapter(seed=0, hidden=hidden)
    steps = secs = 0.0
    for it in range(repeats):
        t0 = time.perf_counter()
        r = adapter.collect(num_groups=num_groups, group_size=group_size, iteration=it)
        secs += time.perf_counter() - t0
        steps += r.info["env_steps"]
    n = group_size * num_groups
    env = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(20_000 // n + 1, n))
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    raw = len(actions) * n / (time.perf_counter() - t0)
    env.close()
    return {"n_envs": n, "collector_steps_per_s": steps / secs, "raw_vector_env_steps_per_s": raw,
            "ratio": (steps / secs) / raw}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=100_000, help="env-step cap for every run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--ablation-seeds", default=None, help="verdict seeds of the ablation (default: the file's)")
    p.add_argument("--jobs", type=int, default=2, help="ablation runs at once")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = GRPOConfig.from_dict(CARTPOLE_DEFAULTS["grpo"])
    seeds = list(range(args.seeds))
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"torch thread(s), Python {platform.python_version()}, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "budget": args.budget, "seeds": seeds,
               "config": cfg.to_dict(), "hidden": CARTPOLE_HIDDEN, "rows": {}}

    def run_grpo(over: dict) -> list[dict]:
        out = []
        for s in seeds:
            t0 = time.perf_counter()
            r = grpo_until_solved(cfg.replace(**over, seed=s), hidden=CARTPOLE_HIDDEN,
                                  max_env_steps=args.budget)
            r["total_seconds"] = time.perf_counter() - t0
            out.append(r)
        return out

    runs = {"GRPO (defaults)": run_grpo({})}
    try:
        from benchmarks.ppo_runs import ppo_until_solved
        runs["PPO (SB3, RL-Zoo)"] = [ppo_until_solved(s, max_env_steps=args.budget) for s in seeds]
    except ImportError as err:
        results["ppo_skipped"] = f"stable-baselines3 not installed ({err}); pip install -e .[bench]"
    for name, rs in runs.items():
        results["rows"][name] = summarise(rs, args.budget)
    results["throughput"] = [throughput(cfg.group_size, b, CARTPOLE_HIDDEN)
                             for b in (cfg.groups_per_iteration, 16, 128)]
    results["curves"] = {name: [r["curve"] for r in rs] for name, rs in runs.items()}
    status = 0
    if not args.skip_ablation:
        status, results["ablation"] = ablation(args.out / "ablation", args.ablation_seeds, args.jobs)
    (args.out / "cartpole.json").write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    plot_curves(results, args.out / "cartpole_curves.png")
    return status


def ablation(out: Path, seeds: str | None, jobs: int) -> tuple[int, dict]:
    """The plan's ablation through ``grpo-harness ablate`` (see the module docstring); its
    markdown is printed after the tables. Returns (exit status, the report's data) where the
    data also holds every run's learning curve (greedy evaluations against env steps)."""
    from grpo_harness.ablate import run_file
    from grpo_harness.trainlog import read_metrics

    status, doc = run_file(ABLATION_FILE, out, seeds=seeds, jobs=jobs)
    doc["curves"] = {name: [[{"env_steps": r["env_steps"], "eval": r["eval_mean"]}
                             for r in read_metrics(folder / "metrics.jsonl") if "eval_mean" in r]
                            for folder in sorted((out / "runs" / slug).glob("seed-*")) if folder.is_dir()]
                     for name, slug in ((n, _slug(n)) for n in doc["variants"])}
    return status, doc


def _slug(name: str) -> str:
    from grpo_harness.ablate import slug

    return slug(name)


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; date {res['date']}; budget {res['budget']:,} env steps; "
             f"seeds {res['seeds']}.", "",
             "| run | solved | env steps to solve, median [IQR] | seconds to solve, median [IQR] "
             "| final eval (median) | final eval std across seeds | KL per iteration: median of "
             "seed means / max | max grad norm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in res["rows"].items():
        kl = "n/a" if row["kl_max"] is None else f"{row['kl_mean']:.4f} / {row['kl_max']:.4f}"
        gn = "n/a" if row["grad_norm_max"] is None else f"{row['grad_norm_max']:.2f}"
        lines.append(f"| {name} | {row['solved']}/{row['seeds']} | {fmt_q(row['steps_q'])} | "
                     f"{fmt_q(row['seconds_q'], 1)} | {row['final_eval_median']:.1f} | "
                     f"{row['final_eval_std']:.1f} | {kl} | {gn} |")
    lines += ["", "Rollout throughput (env steps/s): the GRPO collector (one batched policy forward "
              "per step, episodes in lockstep) vs gymnasium's native vector env with random actions "
              "and no policy, same number of episodes.", "",
              "| episodes in lockstep | collector | raw vector env | ratio |", "|---:|---:|---:|---:|"]
    for t in res["throughput"]:
        lines.append(f"| {t['n_envs']} | {t['collector_steps_per_s']:,.0f} | "
                     f"{t['raw_vector_env_steps_per_s']:,.0f} | {t['ratio']:.2f} |")
    if "ppo_skipped" in res:
        lines += ["", f"PPO skipped: {res['ppo_skipped']}"]
    if "ablation" in res:
        lines += ["", "Ablation (`grpo-harness ablate`):", "", res["ablation"]["markdown"]]
    return "\n".join(lines)


def _median_band(ax, curves: list[list[dict]], grid, name: str, **kw) -> None:
    """Median and IQR over seeds of the greedy evaluations, held as steps between evaluations."""
    ys = []
    for curve in curves:
        pts = [(c["env_steps"], c["eval"]) for c in curve if "eval" in c]
        xs = np.array([0] + [x for x, _ in pts])
        vs = np.array([np.nan] + [v for _, v in pts])
        y = vs[np.searchsorted(xs, grid, side="right") - 1]
        if pts and pts[-1][1] >= 475:  # solved runs stop: hold their last value
            y[grid > pts[-1][0]] = pts[-1][1]
        ys.append(y)
    if not ys:
        return
    ys = np.array(ys)
    line, = ax.plot(grid, np.nanmedian(ys, 0), label=name, **kw)
    ax.fill_between(grid, np.nanpercentile(ys, 25, 0), np.nanpercentile(ys, 75, 0), color=line.get_color(),
                    alpha=0.12)


def plot_curves(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [res["curves"], res.get("ablation", {}).get("curves", {})]
    last = max(c["env_steps"] for p in panels for curves in p.values() for cv in curves for c in cv)
    grid = np.linspace(0, min(res["budget"], 1.1 * last), 201)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, curves_by_name in zip(axes, panels):
        for name, curves in curves_by_name.items():
            _median_band(ax, curves, grid, name, lw=2 if name.startswith(("GRPO", "base")) else 1.3)
    for ax, title in zip(axes, ("GRPO vs PPO", "ablation (grpo-harness ablate)")):
        ax.axhline(475, color="k", lw=0.8, ls="--")
        ax.set_xlabel("training env steps")
        ax.set_title(f"CartPole-v1, {title} (median, IQR band)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("greedy eval return (100 episodes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
