"""Reliability of ``train vlm --task colours`` over many seeds: this project's trainer with
``VLM_DEFAULTS`` and remedies for stalls, and TRL's GRPOTrainer on the same seeds.

    python -m benchmarks.vlm_seeds --variants defaults,TRL --seeds 1000-1019 [--jobs 2]
    python -m benchmarks.vlm_seeds --report [--seeds 1000-1019]

One fresh subprocess per (variant, seed), ``--jobs`` at a time, each at one torch thread. Every
finished run is appended as one JSON line to ``--results`` (default
``benchmarks/results/vlm_seeds.jsonl``); a (variant, seed) already there is not run again, so
the same command resumes an interrupted sweep. ``--report`` prints the table from that file.

A run is set up as ``train vlm --task colours --seed S`` sets it up: a tiny Qwen2-VL built with
seed S, 64 training prompts (data seed 2S) and 32 held-out prompts (2S + 1), ``VLM_DEFAULTS`` as they were before this study
(``STUDY_DEFAULTS``) plus the variant's overrides, ``--max-iterations`` (default:
VLM_DEFAULTS' 400) with the lr
decaying linearly to 0 over them. Success: the rolling mean reward (25 iterations) reaches 0.8
within the budget and the greedy held-out reward after the last iteration is >= 0.95. Also
recorded: the iteration, the wall seconds and the generations (every sampled completion,
extra rounds of dynamic sampling included) until the rolling mean first reaches 0.8, and the
zero-signal groups (groups whose every advantage is 0) per run.

TRL: ``GRPOTrainer`` with the settings of ``benchmarks.vlm`` (4 prompts x 8 completions per
step, lr 1e-3 linear to 0, beta 0, one step per generation batch, group-std scaling, the same
suppressed ids) for the same number of steps, the same model, data and seed; its held-out
reward is measured with this project's greedy evaluation (``VLMAdapter.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.seed_sweep import load_results, parse_choice, run_sweep
from benchmarks.vlm import COLOURS, MAX_NEW_TOKENS, NUM_PROMPTS, REPO, trl_trainer
from grpo_harness.ablate import parse_seeds

TARGET = 0.8
WINDOW = 25
EVAL_SIZE = 32
EVAL_PASS = 0.95
TRL = "TRL"

STUDY_DEFAULTS = {"group_size": 8, "groups_per_iteration": 4, "gamma": 1.0, "grpo_epochs": 1, "minibatches": 1,
                  "beta": 0.0, "update_ref_model_freq": 0, "stats_over": "sequences", "scale": "group",
                  "adv_eps": 1e-4, "loss_agg": "token-mean", "lr": 1e-3, "max_grad_norm": 1.0}
"""``VLM_DEFAULTS["grpo"]`` when this study began ("today's defaults"): the variants are
relative to it, so that choosing new defaults from the table does not change a sweep."""

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "skip off": {"skip_zero_grad_steps": False},
    "entropy 0.01": {"ent_coef": 0.01},
    "dynamic sampling": {"dynamic_sampling": True, "dynamic_sampling_rounds": 2},
    "skip off + dynamic sampling": {"skip_zero_grad_steps": False, "dynamic_sampling": True,
                                    "dynamic_sampling_rounds": 2},
    "retry unsolved (2 rounds)": {"dynamic_sampling": True, "dynamic_sampling_redraw": "retry",
                                  "dynamic_sampling_rounds": 2},
    "retry unsolved (4 rounds)": {"dynamic_sampling": True, "dynamic_sampling_redraw": "retry",
                                  "dynamic_sampling_rounds": 4},
    TRL: {},
}
"""name -> GRPOConfig overrides over ``STUDY_DEFAULTS`` (TRL: its own trainer)."""


# --- one run -----------------------------------------------------------------------------------

def _setup(seed: int, folder: Path):
    from adapters.vlm_tasks import colours_dataset, colours_vocabulary
    from adapters.vlm_tiny import build_tiny_vlm, load_vlm

    build_tiny_vlm(folder, words=colours_vocabulary(COLOURS), seed=seed)
    model, processor = load_vlm(folder)
    train = colours_dataset(NUM_PROMPTS, k=COLOURS, seed=2 * seed)
    held = colours_dataset(EVAL_SIZE, k=COLOURS, seed=2 * seed + 1)
    return model, processor, train, held


def _evaluator(model, processor, train_rows, seed: int):
    from adapters.vlm import VLMAdapter
    from adapters.vlm_tasks import first_word_reward

    return VLMAdapter(model, processor, train_rows, [first_word_reward], seed=seed, temperature=1.0,
                      top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, old_logp_forward=False)


def run_ours(variant: str, seed: int, iterations: int) -> dict:
    import torch

    from grpo_core.config import GRPOConfig
    from grpo_core.loop import GRPOTrainer

    cfg = GRPOConfig.from_dict(dict(STUDY_DEFAULTS, **VARIANTS[variant], seed=seed))
    with tempfile.TemporaryDirectory(prefix="vlm-seeds-") as tmp:
        model, processor, train, held = _setup(seed, Path(tmp))
    adapter = _evaluator(model, processor, train, seed)
    trainer = GRPOTrainer(adapter, cfg)
    steps, t0 = [], time.perf_counter()
    for it in range(iterations):
        for group in trainer.optimizer.param_groups:
            group["lr"] = cfg.lr * max(0.0, 1.0 - it / iterations)  # train vlm's linear schedule
        st = trainer.step()
        steps.append({"reward_mean": st["reward_mean"], "seconds": time.perf_counter() - t0,
                      "generations": cfg.group_size * cfg.groups_per_iteration + st.get("extra_generations", 0.0),
                      "zero_signal_groups": st.get("zero_signal_groups", 0.0),
                      "skipped_steps": st.get("skipped_steps", 0.0),
                      "groups_dropped": st.get("groups_dropped", 0.0)})
    final_eval = adapter.evaluate(held)["eval_reward_mean"]
    return summarise(steps, final_eval, variant=variant, seed=seed, config=cfg.to_dict(),
                     per_colour=per_colour(adapter, held))


def run_trl(seed: int, iterations: int) -> dict:
    from transformers import TrainerCallback

    steps: list[dict] = []
    clock = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                steps.append({"reward_mean": float(logs["reward"]), "seconds": time.perf_counter() - clock["t0"],
                              "generations": 32.0,
                              "zero_signal_groups": float("nan"), "skipped_steps": 0.0, "groups_dropped": 0.0})

    with tempfile.TemporaryDirectory(prefix="vlm-seeds-") as tmp:
        model, processor, train, held = _setup(seed, Path(tmp) / "model")
        trainer, _ = trl_trainer(model, processor, train, steps=iterations, seed=seed,
                                 output_dir=str(Path(tmp) / "out"), callbacks=[Record()], logging_steps=1)
        trainer.train()
    model.eval()
    adapter = _evaluator(model, processor, train, seed)
    final_eval = adapter.evaluate(held)["eval_reward_mean"]
    return summarise(steps, final_eval, variant=TRL, seed=seed, per_colour=per_colour(adapter, held))


def per_colour(adapter, held: list[dict]) -> dict[str, float]:
    """Greedy held-out reward of each colour's prompts (a stall: one colour at 0)."""
    answers = sorted({r["answer"] for r in held})
    return {a: adapter.evaluate([r for r in held if r["answer"] == a])["eval_reward_mean"] for a in answers}


def summarise(steps: list[dict], final_eval: float, **extra) -> dict:
    rolling, reached, gens = [], None, 0.0
    for i, s in enumerate(steps):
        tail = [x["reward_mean"] for x in steps[max(0, i + 1 - WINDOW): i + 1] if not math.isnan(x["reward_mean"])]
        rolling.append(sum(tail) / len(tail) if tail else float("nan"))
        gens += s["generations"]
        if reached is None and rolling[-1] >= TARGET:
            reached = {"iteration": i, "seconds": s["seconds"], "generations": gens}
    ok = reached is not None and final_eval >= EVAL_PASS
    zsg = [s["zero_signal_groups"] for s in steps]
    return dict(extra, iterations=len(steps), success=ok, reached_at=reached and reached["iteration"],
                seconds_to_target=reached and reached["seconds"],
                generations_to_target=reached and reached["generations"],
                final_rolling=rolling[-1], final_eval=final_eval, train_seconds=steps[-1]["seconds"],
                generations=gens, zero_signal_groups=sum(zsg),
                skipped_steps=sum(s["skipped_steps"] for s in steps),
                groups_dropped=sum(s["groups_dropped"] for s in steps),
                rolling_every_25=[round(r, 3) for r in rolling[WINDOW - 1::WINDOW]],
                trace={k: [round(x[k], 4) for x in steps] for k in ("reward_mean", "zero_signal_groups",
                                                                    "skipped_steps", "groups_dropped")})


# --- the sweep ---------------------------------------------------------------------------------

def sweep(variants: list[str], seeds: list[int], iterations: int, jobs: int, results: Path) -> None:
    rows = load_results(results)
    done = {(r["variant"], r["seed"], r["iterations"]) for r in rows}
    todo = [(v, s) for s in seeds for v in variants if (v, s, iterations) not in done]

    def command(variant: str, seed: int) -> list[str]:
        return [sys.executable, "-m", "benchmarks.vlm_seeds", "--worker", "--variants", variant, "--seeds",
                str(seed), "--iterations", str(iterations)]

    def describe(r: dict) -> str:
        return (f"{'ok' if r['success'] else 'FAIL'} target at {r['reached_at']}, final rolling "
                f"{r['final_rolling']:.3f}, held-out {r['final_eval']:.3f}, {r['train_seconds']:.0f} s")
    run_sweep(todo, command, results, jobs, describe, done=len(rows))


# --- the table ---------------------------------------------------------------------------------

def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def table(rows: list[dict], seeds: list[int], variants: list[str]) -> str:
    lines = ["| variant | success | reached 0.8 | median iterations to 0.8* | median wall s to 0.8* | "
             "median generations to 0.8* | median final held-out | zero-signal groups per run (median) | "
             "failed seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for v in variants:
        rs = sorted((r for r in rows if r["variant"] == v and r["seed"] in seeds), key=lambda r: r["seed"])
        if not rs:
            continue
        n = len(rs)
        ok = sum(r["success"] for r in rs)
        reached = [r for r in rs if r["reached_at"] is not None]
        fmt = lambda x, f="{:.0f}": "–" if x is None else f.format(x)  # noqa: E731
        zsg = _median([r["zero_signal_groups"] for r in rs if not math.isnan(r["zero_signal_groups"])])
        failed = ", ".join(_failure(r) for r in rs if not r["success"]) or "–"
        lines.append(f"| {v} | {ok}/{n} | {len(reached)}/{n} | {fmt(_median([r['reached_at'] for r in rs]))} | "
                     f"{fmt(_median([r['seconds_to_target'] for r in rs]), '{:.1f}')} | "
                     f"{fmt(_median([r['generations_to_target'] for r in rs]))} | "
                     f"{fmt(_median([r['final_eval'] for r in rs]), '{:.3f}')} | {fmt(zsg)} | {failed} |")
    return "\n".join(lines)


def paired(rows: list[dict], seeds: list[int], variants: list[str], base: str = "defaults") -> str:
    """Per variant against ``base`` on the seeds where both reached 0.8: the median of the
    per-seed ratios of wall seconds, generations and iterations to 0.8 (runs of one seed ran
    close together in time, so the ratio sees similar machine load on both sides)."""
    by = {(r["variant"], r["seed"]): r for r in rows if r["seed"] in seeds}
    lines = [f"| variant vs {base} | seeds (both reached) | wall s to 0.8 | generations to 0.8 | "
             "iterations to 0.8 |", "|---|---:|---:|---:|---:|"]
    for v in variants:
        if v == base:
            continue
        both = [(by[(v, s)], by[(base, s)]) for s in seeds if (v, s) in by and (base, s) in by
                and by[(v, s)]["reached_at"] is not None and by[(base, s)]["reached_at"] is not None]
        if not both:
            continue
        ratio = lambda k: statistics.median(a[k] / b[k] for a, b in both)  # noqa: E731
        lines.append(f"| {v} | {len(both)} | {ratio('seconds_to_target'):.2f}x | "
                     f"{ratio('generations_to_target'):.2f}x | {ratio('reached_at'):.2f}x |")
    return "\n".join(lines)


def _failure(r: dict) -> str:
    """``seed (held-out, the colours it never names right)``."""
    wrong = [c for c, v in (r.get("per_colour") or {}).items() if v < 0.5]
    return f"{r['seed']} ({r['final_eval']:.2f}{': ' + '/'.join(wrong) if wrong else ''})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vlm_seeds", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--seeds", default="1000-1019", help="e.g. 1000-1019 or 100-104,107 (default 1000-1019)")
    p.add_argument("--iterations", type=int, default=None,
                   help="budget per run (default VLM_DEFAULTS' max_iterations)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2; one torch thread each)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "vlm_seeds.jsonl")
    p.add_argument("--report", action="store_true", help="print the table from --results and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants, seeds = parse_choice(p, args.variants, VARIANTS), parse_seeds(args.seeds)
    if args.iterations is None:
        from grpo_harness.train_vlm import VLM_DEFAULTS

        args.iterations = VLM_DEFAULTS["train"]["max_iterations"]
    if args.worker:
        import torch

        torch.set_num_threads(1)
        v, s = variants[0], seeds[0]
        r = run_trl(s, args.iterations) if v == TRL else run_ours(v, s, args.iterations)
        args.result.write_text(json.dumps(r))
        return 0
    if not args.report:
        sweep(variants, seeds, args.iterations, args.jobs, args.results)
    rows = load_results(args.results)
    print(table(rows, seeds, variants))
    print()
    print(paired(rows, seeds, variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
