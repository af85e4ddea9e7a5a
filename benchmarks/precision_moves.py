"""How much of the model an update moves, by precision: the table of issue "mixed precision that
trains", re-measured with ``--precision``.

    python -m benchmarks.precision_moves [--seed 3] [--iterations 10] [--lr 1e-6]

Runs ``grpo-harness train vlm --task colours --seed S --max-iterations N --set lr=LR --set
dynamic_sampling=false --precision P`` for P in 32, bf16-mixed, bf16-true, and compares the
initial weights (the run's ``model/`` loaded as the trainer loads it, cast to the weights' dtype)
with the trained ones (the checkpoint's policy: the float32 master weights under bf16-mixed). Prints one markdown row each:
the share of entries that changed and their mean absolute change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def measure(out: Path) -> tuple[float, float]:
    from adapters.vlm_tiny import load_vlm

    initial = load_vlm(out / "model")[0].state_dict()  # the trainer's names (not the file's)
    policy = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")["trainer"]["policy"]
    total = moved = 0
    change = 0.0
    for k, after in policy.items():
        if k not in initial or not after.is_floating_point():
            continue
        before = initial[k].to(after.dtype)
        total += after.numel()
        moved += int((after != before).sum())
        change += float((after.double() - before.double()).abs().sum())
    return moved / total, change / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-6)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("32", "bf16-mixed", "bf16-true"):
            out = Path(tmp) / precision
            cmd = [sys.executable, "-m", "grpo_harness.cli", "train", "vlm", "--task", "colours", "--seed",
                   str(args.seed), "--max-iterations", str(args.iterations), "--set", f"lr={args.lr}", "--set",
                   "dynamic_sampling=false", "--precision", precision, "--out", str(out)]
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
            share, mean = measure(out)
            rows.append({"precision": precision, "moved": share, "mean_abs_change": mean})
            print(f"| {precision} | {share:.1%} | {mean:.2g} |", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
