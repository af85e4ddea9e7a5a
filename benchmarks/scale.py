"""Scale-out figures: CartPole on 1 vs 2 processes, and the memory of a VLM step vs micro-batch size.

    python benchmarks/scale.py                # both parts; JSON to benchmarks/results/scale.json
    python benchmarks/scale.py cartpole --iterations 30 --groups 8
    python benchmarks/scale.py memory --prompts 8 --group-size 16 --max-new-tokens 32

``cartpole``: ``grpo-harness train cartpole`` for ``--iterations`` iterations of ``--groups`` groups
of 4 episodes (the defaults otherwise; evaluation only at the end, on one episode), once as one
process and once under ``torchrun --standalone --nproc-per-node 2`` (each process at one torch
thread, rank r collecting half the groups). The two runs start on the same episodes; in float32 the data-parallel run's
sums (each rank's half, then the all-reduce) round differently from one process's, and after
enough iterations one sampled action flips and the runs part (float64 keeps them together: the
tests), so they are compared by rates read from ``metrics.jsonl``: env steps per second and the
median seconds per iteration, the first iteration (start-up) and the last (the final
evaluation) left out.

``memory``: the tiny Qwen2-VL of ``adapters.vlm_tiny``; one rollout of ``--prompts`` prompts x
``--group-size`` completions of up to ``--max-new-tokens`` tokens is sampled once and saved; then,
in a fresh process per ``micro_batch_size``, the model and the rollout are loaded and one trainer
step is taken on that rollout (reference log-probs, then the update: one epoch, one minibatch of
every row, its micro-batches' gradients accumulated). Reported: the growth of the process's peak
resident set size (``ru_maxrss``) during the step over its value just before, which is the memory
the step's activations, gradients and optimizer state needed on top of the loaded model, and the
step's seconds. (On CPU there is no allocator counter to read; see benchmarks/logprob_memory.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
MB = 1024 * 1024
MICRO_SIZES = (None, 64, 32, 16, 8, 4)


# --- CartPole: 1 vs 2 processes -------------------------------------------------------------------

def _train_cartpole(out: Path, processes: int, iterations: int, groups: int) -> dict:
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = [*launcher, "-m", "grpo_harness.cli", "train", "cartpole", "--out", str(out),
           "--max-iterations", str(iterations), "--set", f"groups_per_iteration={groups}",
           "--eval-every", "0", "--eval-episodes", "1", "--no-early-stop", "--checkpoint-every", "0"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:-1]  # without the start-up iteration and the final evaluation
    steps = timed[-1]["env_steps"] - records[0]["env_steps"]
    seconds = timed[-1]["wall_time"] - records[0]["wall_time"]
    per_iteration = [b["wall_time"] - a["wall_time"] for a, b in zip(records, timed)]
    return {"processes": processes, "iterations": iterations, "groups_per_iteration": groups,
            "env_steps_per_s": steps / seconds, "s_per_iteration_median": statistics.median(per_iteration),
            "env_steps": records[-1]["env_steps"], "command_s": total,
            "final_loss": records[-1]["loss"]}


def cartpole(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_train_cartpole(Path(tmp) / f"p{n}", n, args.iterations, args.groups) for n in (1, 2)]
    return rows


# --- VLM: step memory vs micro_batch_size -------------------------------------------------------

def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _config(args, micro):
    from grpo_core.config import GRPOConfig

    return GRPOConfig(group_size=args.group_size, groups_per_iteration=args.prompts, grpo_epochs=1, minibatches=1,
                      beta=0.04, update_ref_model_freq=0, stats_over="sequences", gamma=1.0, lr=1e-3,
                      micro_batch_size=micro)


def _adapter(model_dir: str, args):
    from adapters.vlm import VLMAdapter
    from adapters.vlm_tasks import colours_dataset, first_word_reward
    from adapters.vlm_tiny import load_vlm

    model, processor = load_vlm(model_dir)
    return VLMAdapter(model, processor, colours_dataset(64), [first_word_reward], max_new_tokens=args.max_new_tokens)


def _memory_child(args) -> dict:
    import torch

    from grpo_core.loop import GRPOTrainer

    torch.set_num_threads(1)
    micro = None if args.micro == 0 else args.micro
    adapter = _adapter(args.model_dir, args)
    rollout = torch.load(args.rollout, weights_only=False)

    class GivenRollout(GRPOTrainer):
        def _collect(self, draw=0):
            return rollout

    trainer = GivenRollout(adapter, _config(args, micro))
    base = _peak_bytes()
    start = time.perf_counter()
    stats = trainer.step()
    return {"micro_batch_size": micro, "extra_peak_mb": (_peak_bytes() - base) / MB,
            "step_s": time.perf_counter() - start, "loss": stats["loss"], "grad_norm": stats["grad_norm"]}


def memory(args) -> dict:
    import torch

    from adapters.vlm_tasks import colours_vocabulary
    from adapters.vlm_tiny import build_tiny_vlm

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_vlm(Path(tmp) / "model", words=colours_vocabulary(), family="qwen2_vl", seed=0)
        adapter = _adapter(str(model_dir), args)
        adapter.old_logp_forward = False  # the loop takes them from the update (one epoch, one minibatch)
        rollout = adapter.collect(num_groups=args.prompts, group_size=args.group_size, iteration=0)
        torch.save(rollout, Path(tmp) / "rollout.pt")
        rows = []
        for micro in MICRO_SIZES:
            cmd = [sys.executable, __file__, "_memory_child", "--model-dir", str(model_dir), "--rollout",
                   str(Path(tmp) / "rollout.pt"), "--micro", str(micro or 0), "--prompts", str(args.prompts),
                   "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens)]
            out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    valid = int(rollout.mask.sum())
    return {"rows": args.prompts * args.group_size, "completion_tokens": valid,
            "longest_completion": int(rollout.mask.sum(1).max()), "steps": rows}


# --- report -----------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = []
    if "cartpole" in result:
        lines += ["| processes | env steps / s | s / iteration (median) |", "|---:|---:|---:|"]
        lines += [f"| {r['processes']} | {r['env_steps_per_s']:,.0f} | {r['s_per_iteration_median']:.3f} |"
                  for r in result["cartpole"]]
    if "memory" in result:
        m = result["memory"]
        lines += ["", f"{m['rows']} rows, {m['completion_tokens']} completion tokens (longest {m['longest_completion']})",
                  "", "| micro_batch_size | extra peak memory of the step | step time |", "|---|---:|---:|"]
        lines += [f"| {s['micro_batch_size'] or 'none (all rows)'} | {s['extra_peak_mb']:.0f} MB | {s['step_s']:.2f} s |"
                  for s in m["steps"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", default="all", choices=["all", "cartpole", "memory", "_memory_child"])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model-dir")
    p.add_argument("--rollout")
    p.add_argument("--micro", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.part == "_memory_child":
        print(json.dumps(_memory_child(args)))
        return 0
    result = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if args.part in ("all", "cartpole"):
        result["cartpole"] = cartpole(args)
    if args.part in ("all", "memory"):
        result["memory"] = memory(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
