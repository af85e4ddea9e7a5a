"""The sampling engines measured on CPU: the engine/trainer log-prob gap behind the preflight's
``engine_consistency`` bound, the mismatch per iteration of a training run with a bf16 copy, and
its time per iteration against the policy sampling itself.

    python -m benchmarks.engine_mismatch [--iterations 50] [--repeats 3] [--rollouts 20] [--block 10]
                                         [--full 400] [--out DIR]

1. ``gaps``: on the two tiny random models, for a float32 and a bf16 ``CopyEngine``, the
   ``engine_consistency`` statistic (|engine log-prob - trainer log-prob| over the valid tokens of
   8 completions, the row's own code) over ``--rollouts`` rollouts, at temperature 1 and 0.7, 2
   and 16 new tokens. Also on the model a copy-bf16 run trained (its ``final/``).
2. ``runs``: ``grpo-harness train vlm --task colours --engine E --max-iterations N`` for E =
   policy and copy-bf16, the two started together (one thread each, the same seed) ``--repeats``
   times; the mismatch metrics of each iteration (they do not depend on the load: the runs are
   deterministic) and the median seconds per iteration (differences of ``wall_time``), with the
   load average before and after; then ``gaps`` on the last copy-bf16 run's ``final/``.
3. ``--full N``: one copy-bf16 run of N iterations alone (to a reward near 1 at the default
   400), its mismatch by blocks of 50 iterations and ``gaps`` on its ``final/``.

Prints the tables of benchmarks/RESULTS.md, "Sampling engine", and writes them to
``OUT/engine_mismatch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def gap_rows(model_dir: Path, rollouts: int, label: str, settings) -> list[dict]:
    """The preflight row's statistic over ``rollouts`` rollouts for each (dtype, temperature,
    new tokens) of ``settings``."""
    import torch

    from adapters.vlm import VLMAdapter
    from adapters.vlm_engine import CopyEngine
    from adapters.vlm_preflight import check_engine_consistency
    from adapters.vlm_tasks import colours_dataset, first_word_reward
    from adapters.vlm_tiny import load_vlm

    out = []
    for dtype, temperature, new in settings:
        model, processor = load_vlm(model_dir)
        adapter = VLMAdapter(model, processor, colours_dataset(64), [first_word_reward], max_new_tokens=new,
                             temperature=temperature, engine=CopyEngine(model, dtype))
        means, maxes, tokens = [], [], 0
        with torch.no_grad():
            for it in range(rollouts):
                row = check_engine_consistency(adapter, adapter.collect(num_groups=2, group_size=4, iteration=it))
                means.append(row.details["mean"])
                maxes.append(row.details["max"])
                tokens += row.details["tokens"]
        out.append({"model": label, "engine": str(dtype).removeprefix("torch."), "temperature": temperature,
                    "new_tokens": new, "mean_of_means": statistics.mean(means), "worst_mean": max(means),
                    "worst_max": max(maxes), "tokens": tokens})
        r = out[-1]
        print(f"{label:<28} {r['engine']:<9} T {temperature:<4} {new:>2} tokens: mean {r['mean_of_means']:.2e} "
              f"(worst rollout {r['worst_mean']:.2e}), max {r['worst_max']:.2e} over {tokens} tokens", flush=True)
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _train(out: Path, engine: str, iterations: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grpo_harness.cli", "train", "vlm", "--task", "colours", "--engine", engine,
           "--max-iterations", str(iterations), "--out", str(out), "--threads", "1", "--eval-every", "0",
           "--completions-every", "0", "--skip-preflight"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def seconds_per_iteration(records: list[dict]) -> list[float]:
    walls = [r["wall_time"] for r in records]
    return [b - a for a, b in zip(walls, walls[1:])]


def run_pairs(root: Path, iterations: int, repeats: int) -> dict:
    """``repeats`` pairs of runs (policy, copy-bf16) started together; their records and timing."""
    loads, times = [], {"policy": [], "copy-bf16": []}
    records = {}
    for k in range(repeats):
        before = _uptime()
        procs = {e: _train(root / f"{e}-{k}", e, iterations) for e in times}
        codes = {e: p.wait() for e, p in procs.items()}
        if any(codes.values()):
            raise SystemExit(f"a training run failed: {codes}")
        loads.append({"before": before, "after": _uptime()})
        for e in times:
            records[e] = _records(root / f"{e}-{k}")
            times[e].append(statistics.median(seconds_per_iteration(records[e])))
        print(f"pair {k}: median s/iteration policy {times['policy'][-1]:.4f}, copy-bf16 "
              f"{times['copy-bf16'][-1]:.4f}; {loads[-1]['after']}", flush=True)
    return {"loads": loads, "median_s_per_iteration": times, "records": records}


def mismatch_table(records: list[dict], block: int = 10) -> list[dict]:
    """The mismatch metrics by blocks of ``block`` iterations."""
    rows = []
    for lo in range(0, len(records), block):
        part = records[lo:lo + block]
        kl = [r["mismatch_kl"] for r in part]
        rows.append({"iterations": f"{part[0]['iteration']}-{part[-1]['iteration']}",
                     "mismatch_kl_median": statistics.median(kl), "mismatch_kl_max": max(kl),
                     "is_ratio_min": min(r["is_ratio_min"] for r in part),
                     "is_ratio_max": max(r["is_ratio_max"] for r in part),
                     "is_truncated_frac_max": max(r["is_truncated_frac"] for r in part),
                     "reward_mean": statistics.mean(r["reward_mean"] for r in part)})
    return rows


def _per_iteration(records: list[dict]) -> list[dict]:
    keys = ("iteration", "mismatch_kl", "is_ratio_min", "is_ratio_mean", "is_ratio_max", "is_truncated_frac",
            "reward_mean")
    return [{k: r[k] for k in keys} for r in records]


def _print_mismatch(rows: list[dict]) -> None:
    print("\niterations | mismatch_kl median / max | is_ratio min / max | truncated (max) | reward")
    for r in rows:
        print(f"{r['iterations']} | {r['mismatch_kl_median']:.2e} / {r['mismatch_kl_max']:.2e} | "
              f"{r['is_ratio_min']:.4f} / {r['is_ratio_max']:.4f} | {r['is_truncated_frac_max']:.3f} | "
              f"{r['reward_mean']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rollouts", type=int, default=20)
    p.add_argument("--block", type=int, default=10, help="iterations per row of the mismatch table")
    p.add_argument("--full", type=int, default=0, metavar="N", help="also one copy-bf16 run of N iterations")
    p.add_argument("--out", type=Path, default=Path("runs/engine-mismatch"))
    args = p.parse_args(argv)
    import torch

    from adapters.vlm_tasks import colours_vocabulary
    from adapters.vlm_tiny import build_tiny_vlm

    _quiet()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"uptime_start": _uptime(), "torch": torch.__version__}
    settings = [(dt, t, n) for dt in (torch.float32, torch.bfloat16) for t, n in ((1.0, 2), (1.0, 16), (0.7, 16))]
    gaps = []
    for family in ("qwen2_vl", "qwen2_5_vl"):
        folder = args.out / f"tiny-{family}"
        if not (folder / "config.json").is_file():
            build_tiny_vlm(folder, words=colours_vocabulary(), family=family, seed=0)
        gaps += gap_rows(folder, args.rollouts, f"tiny {family} (random)", settings)
    trained_settings = [(torch.bfloat16, 1.0, 2), (torch.bfloat16, 0.7, 16), (torch.float32, 1.0, 2)]
    if args.repeats:
        pairs = run_pairs(args.out, args.iterations, args.repeats)
        trained = args.out / f"copy-bf16-{args.repeats - 1}" / "final"
        gaps += gap_rows(trained, args.rollouts, f"tiny qwen2_vl, {args.iterations} its trained", trained_settings)
        doc["timing"] = {k: pairs[k] for k in ("loads", "median_s_per_iteration")}
        doc["mismatch"] = mismatch_table(pairs["records"]["copy-bf16"], args.block)
        doc["mismatch_per_iteration"] = _per_iteration(pairs["records"]["copy-bf16"])
        _print_mismatch(doc["mismatch"])
        t = doc["timing"]["median_s_per_iteration"]
        ratio = [c / q for c, q in zip(t["copy-bf16"], t["policy"])]
        print(f"\nmedian s/iteration: policy {statistics.median(t['policy']):.4f} {t['policy']}, copy-bf16 "
              f"{statistics.median(t['copy-bf16']):.4f} {t['copy-bf16']}; per pair copy/policy "
              f"{', '.join(f'{x:.2f}' for x in ratio)}")
    if args.full:
        folder = args.out / f"copy-bf16-full-{args.full}"
        if _train(folder, "copy-bf16", args.full).wait():
            raise SystemExit("the full copy-bf16 run failed")
        records = _records(folder)
        gaps += gap_rows(folder / "final", args.rollouts, f"tiny qwen2_vl, {args.full} its trained", trained_settings)
        doc["full"] = {"iterations": args.full, "mismatch": mismatch_table(records, 50),
                       "per_iteration": _per_iteration(records), "reward_rolling": records[-1]["reward_rolling"]}
        _print_mismatch(doc["full"]["mismatch"])
    doc["gaps"] = gaps
    doc["uptime_end"] = _uptime()
    (args.out / "engine_mismatch.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written: {args.out / 'engine_mismatch.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
