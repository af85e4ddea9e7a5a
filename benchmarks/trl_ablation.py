"""TRL's variants of the plan's knobs on the sequence task, on the verdict seeds of
``benchmarks/ablations/sequence.toml``, judged as ``grpo-harness ablate`` judges ours.

    python -m benchmarks.trl_ablation --seeds 0-19 [--variants "TRL base,TRL 4 iterations"] [--jobs 2]
    python -m benchmarks.trl_ablation --report [--seeds 0-19]

A run is set up as ``grpo-harness train vlm --task sequence --max-iterations 300 --eval-every 0
--seed S`` sets up ours: the tiny Qwen2-VL built with seed S and the sequence task's vocabulary, 64 training prompts
(data seed 2S) and 32 held-out prompts (2S + 1), 4 prompts x 8 completions of at most 3 tokens
per generation batch, 300 generation batches, lr 1e-3 decaying linearly to 0 over the run. TRL's
settings are ``benchmarks.vlm.trl_trainer``'s matched ones (beta 0, one optimizer step per
generation batch, group-std scaling, clipping the ratio at 0.2 and the gradient norm at 1,
token-mean loss ``dapo``, the suppressed ids our adapter uses) plus the variant's overrides.
``num_iterations`` = mu optimizer steps per generation batch: ``max_steps`` is mu x 300, so that
the run holds 300 generation batches like ours with ``grpo_epochs`` = mu (one minibatch).
TRL's reference sync (``sync_ref_model``) runs after every ``ref_model_sync_steps`` optimizer
steps; with mu steps and alpha 1 it is our hard refresh at every iteration. TRL's base is not
ours: it has no dynamic sampling and steps the optimizer on a batch without signal (Adam's
momentum moves the weights), where ours redraws and skips. So each verdict here is TRL against
TRL, to set beside ours for the direction of a knob's effect, not its size.

Measures, as ``grpo_harness.ablate``'s for a VLM run: cost = generation batches until the
rolling mean reward (25 batches, TRL's logged ``reward`` of each batch) first reaches 0.8, a run
that never does counted at its budget (300); final = the greedy reward on the 32 held-out
prompts after training, measured by this project's ``VLMAdapter.evaluate``. Verdicts: the exact
two-sided Wilcoxon signed-rank test of the paired per-seed differences (``grpo_harness.stats``)
at alpha 0.05. One fresh subprocess per (variant, seed), one torch thread; finished runs are
JSON lines in ``--results`` (default ``benchmarks/results/trl_sequence.jsonl``), kept on a
re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.seed_sweep import load_results, parse_choice, run_sweep
from benchmarks.vlm import REPO, trl_trainer
from grpo_harness.ablate import parse_seeds

ITERATIONS = 300
TARGET = 0.8
WINDOW = 25
NUM_PROMPTS, EVAL_SIZE, COLOURS = 64, 32, 4
ALPHA = 0.05
BASE = "TRL base"

VARIANTS: dict[str, dict] = {
    BASE: {},
    "TRL 4 iterations": {"num_iterations": 4},
    "TRL 4 iterations + beta 0.04": {"num_iterations": 4, "beta": 0.04},
    "TRL 4 iterations + beta 0.04 + sync every batch": {"num_iterations": 4, "beta": 0.04, "sync_ref_model": True,
                                                      "ref_model_sync_steps": 4, "ref_model_mixup_alpha": 1.0},
    # clip-higher needs ratios away from 1: with one step per generation batch the ratio is 1
    "TRL 4 iterations + epsilon_high 0.28": {"num_iterations": 4, "epsilon_high": 0.28},
}
"""name -> TRL GRPOConfig overrides over the matched settings."""

PAIRS: list[tuple[str, str, str, str]] = [
    ("TRL 4 iterations", BASE, "better", "4. several epochs per batch (TRL num_iterations 4)"),
    ("TRL 4 iterations + beta 0.04 + sync every batch", "TRL 4 iterations + beta 0.04", "better",
     "1. refreshing the reference every iteration (TRL sync_ref_model, alpha 1, every batch)"),
    ("TRL 4 iterations + beta 0.04", "TRL 4 iterations", "better", "(not in the plan) a KL term, beta 0.04, no sync"),
    ("TRL 4 iterations + epsilon_high 0.28", "TRL 4 iterations", "better",
     "(not in the plan) DAPO's clip-higher, epsilon_high 0.28, 4 iterations"),
]
"""(variant, baseline, expected direction, claim): the verdicts the report gives."""


def _reward(prompts, completions, answer, cycle, **kwargs):
    """The sequence reward on TRL's conversational completions ([{"role", "content"}])."""
    from adapters.vlm_tasks import sequence_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return sequence_reward(prompts, texts, answer, cycle)


def run(variant: str, seed: int, iterations: int = ITERATIONS) -> dict:
    import torch
    from transformers import TrainerCallback

    from adapters.vlm import VLMAdapter
    from adapters.vlm_tasks import SEQUENCE_QUESTION, SEQUENCE_WORDS, TASKS, sequence_reward
    from adapters.vlm_tiny import build_tiny_vlm, load_vlm

    torch.set_num_threads(1)
    task = TASKS["sequence"]
    overrides = VARIANTS[variant]
    mu = overrides.get("num_iterations", 1)
    rewards: list[float] = []
    at: list[float] = []
    clock: dict[str, float] = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and logs.get("reward") is not None:  # logged once per generation batch
                rewards.append(float(logs["reward"]))
                at.append(time.perf_counter() - clock["t0"])

    with tempfile.TemporaryDirectory(prefix="trl-seq-") as tmp:
        build_tiny_vlm(Path(tmp) / "model", words=task.vocabulary(COLOURS), seed=seed)
        model, processor = load_vlm(Path(tmp) / "model")
        train = task.dataset(NUM_PROMPTS, k=COLOURS, seed=2 * seed)
        held = task.dataset(EVAL_SIZE, k=COLOURS, seed=2 * seed + 1)
        trainer, _ = trl_trainer(model, processor, train, steps=mu * iterations, seed=seed,
                                 output_dir=str(Path(tmp) / "out"), callbacks=[Record()], logging_steps=1,
                                 question=SEQUENCE_QUESTION, reward=_reward,
                                 max_completion_length=SEQUENCE_WORDS, **overrides)
        trainer.train()
    if len(rewards) != iterations:
        raise RuntimeError(f"{variant!r} seed {seed}: {len(rewards)} generation batches logged, expected {iterations}")
    model.eval()
    judge = VLMAdapter(model, processor, train, [sequence_reward], seed=seed, temperature=1.0, top_p=1.0,
                       max_new_tokens=SEQUENCE_WORDS, old_logp_forward=False)
    final = judge.evaluate(held)["eval_reward_mean"]
    reached, rolling = None, []
    for i in range(len(rewards)):
        tail = rewards[max(0, i + 1 - WINDOW): i + 1]
        rolling.append(sum(tail) / len(tail))
        if reached is None and rolling[-1] >= TARGET:
            reached = i
    end = reached if reached is not None else len(rewards) - 1
    return {"variant": variant, "seed": seed, "overrides": overrides, "reached": reached is not None,
            "iterations": end + 1, "seconds": at[end], "final": final, "final_rolling": rolling[-1],
            "train_seconds": at[-1], "rewards": [round(r, 4) for r in rewards]}


# --- the sweep ---------------------------------------------------------------------------------

def sweep(variants: list[str], seeds: list[int], jobs: int, results: Path) -> None:
    rows = load_results(results)
    done = {(r["variant"], r["seed"]) for r in rows}
    todo = [(v, s) for s in seeds for v in variants if (v, s) not in done]

    def command(variant: str, seed: int) -> list[str]:
        return [sys.executable, "-m", "benchmarks.trl_ablation", "--worker", "--variants", variant, "--seeds",
                str(seed)]

    def describe(r: dict) -> str:
        reached = f"reached at {r['iterations']}" if r["reached"] else "not reached"
        return f"{reached}, final {r['final']:.3f}, {r['train_seconds']:.0f} s"
    run_sweep(todo, command, results, jobs, describe, done=len(rows))


# --- the report --------------------------------------------------------------------------------

def report(rows: list[dict], seeds: list[int]) -> str:
    from grpo_harness.stats import quartiles, signed_rank_test

    by = {(r["variant"], r["seed"]): r for r in rows if r["seed"] in seeds}

    def q(vals, digits=0):
        lo, mid, hi = quartiles(vals)
        return f"{mid:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    lines = ["| variant | TRL settings over the matched ones | runs | reached | iterations to target | "
             "seconds to target | final reward |", "|---|---|---:|---:|---:|---:|---:|"]
    for v, over in VARIANTS.items():
        rs = [by[(v, s)] for s in seeds if (v, s) in by]
        if not rs:
            continue
        sets = ", ".join(f"{k}={val}" for k, val in over.items()) or "the matched settings"
        lines.append(f"| {v} | {sets} | {len(rs)} | {sum(r['reached'] for r in rs)}/{len(rs)} | "
                     f"{q([r['iterations'] for r in rs])} | {q([r['seconds'] for r in rs], 1)} | "
                     f"{q([r['final'] for r in rs], 3)} |")
    lines += ["", "| claim | variant vs baseline | seeds | sooner / later / same | median paired difference in "
              "iterations | p (cost) | median paired difference in final reward | p (final) | verdict |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v, base, expect, claim in PAIRS:
        both = [s for s in seeds if (v, s) in by and (base, s) in by]
        if not both:
            continue
        cost = [by[(v, s)]["iterations"] - by[(base, s)]["iterations"] for s in both]
        final = [by[(v, s)]["final"] - by[(base, s)]["final"] for s in both]
        tc, tf = signed_rank_test(cost), signed_rank_test(final)
        if tc.n == 0 or tc.p_value >= ALPHA:
            verdict = "not shown"
        else:
            verdict = "held" if (tc.direction < 0) == (expect == "better") else "opposite"
        lines.append(f"| {claim} | {v} vs {base} | {len(both)} | {sum(d < 0 for d in cost)} / "
                     f"{sum(d > 0 for d in cost)} / {sum(d == 0 for d in cost)} | {quartiles(cost)[1]:+.0f} | "
                     f"{tc.p_value:.3g} | {quartiles(final)[1]:+.3f} | {tf.p_value:.3g} | **{verdict}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0-19")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "trl_sequence.jsonl")
    p.add_argument("--report", action="store_true", help="print the tables from --results; run nothing")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help=argparse.SUPPRESS)  # a quick check only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants, seeds = parse_choice(p, args.variants, VARIANTS), parse_seeds(args.seeds)
    if args.worker:
        args.result.write_text(json.dumps(run(variants[0], seeds[0], args.iterations)))
        return 0
    if not args.report:
        sweep(variants, seeds, args.jobs, args.results)
    print(report(load_results(args.results), seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
