"""Soak test of preemption safety (``make soak``; not in CI).

CartPole trains for ``--minutes`` while this script kills it at random moments, every 5-40 s
of each process's life, with SIGKILL or SIGTERM (half each; every fourth kill waits for a
checkpoint write to start, so some land in the middle of one), and resumes it after each kill.
Then the same run is trained uninterrupted for as many iterations, and the two are compared:

- metrics.jsonl identical, line for line, except the time field (``wall_time``);
- the final checkpoints identical: policy, reference, optimizer state, progress counters, RNG;
- TensorBoard: every iteration's point present exactly once (``train/loss`` and ``eval/eval_mean``
  against the env steps), as TensorBoard itself reads the event files;
- resident memory: sampled every second in every process; flat if the uninterrupted run's
  last minute sits where its first minute does.

    .venv/bin/python benchmarks/soak.py --minutes 10 [--out runs/soak] [--seed 0]

Prints a summary and writes ``soak.json`` into ``--out``. Exit 1 if a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# --no-early-stop and no env-step budget: the run only stops when told to. An evaluation every
# iteration (a small one) makes the final-only evaluation of a budget stop a periodic one, so the
# killed run (open-ended budget) and the uninterrupted one (a fixed budget) evaluate alike.
TRAIN = ["--no-early-stop", "--max-env-steps", "1000000000", "--eval-every", "1", "--eval-episodes", "10",
         "--checkpoint-every", "3", "--checkpoint-minutes", "0.1"]
OPEN_BUDGET = 10**9


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def writing_checkpoint(out: Path, since: float) -> bool:
    """A checkpoint's temporary file made after ``since`` (time.time()) exists: a write is under
    way (an older one is the leftover of a write an earlier SIGKILL cut short)."""
    try:
        return any(p.name.startswith(".checkpoint.pt.") and p.name.endswith(".tmp") and p.stat().st_mtime >= since
                   for p in out.iterdir())
    except OSError:
        return False


def command(out: Path, seed: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grpo_harness.cli", "train", "cartpole", "--out", str(out), "--seed", str(seed),
            *TRAIN, *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "a")
    f.write(f"\n$ {' '.join(cmd[2:])}\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def session(cmd: list[str], log: Path, out: Path, *, kill_after: float | None, signum: int, at_write: bool) -> dict:
    """One process: sample its RSS each second; kill it ``kill_after`` s after its start (or
    let it finish). ``at_write``: once the time is up, wait for a checkpoint write to begin."""
    wall0 = time.time()
    proc, t0, rss, in_write = start(cmd, log), time.monotonic(), [], False
    next_sample = t0
    while proc.poll() is None:
        now = time.monotonic()
        if now >= next_sample:
            value = rss_mb(proc.pid)
            if value is not None:
                rss.append((now - t0, value))
            next_sample += 1.0
        if kill_after is not None and now - t0 >= kill_after:
            deadline = now + 10.0
            while at_write and time.monotonic() < deadline and proc.poll() is None:
                if writing_checkpoint(out, wall0):  # spin: a checkpoint write lasts milliseconds
                    break
            in_write = writing_checkpoint(out, wall0)
            proc.send_signal(signum)
            break
        time.sleep(0.02)
    rc = proc.wait()
    return {"seconds": round(time.monotonic() - t0, 2), "signal": signal.Signals(signum).name if kill_after else None,
            "rc": rc, "in_write": in_write, "rss_mb": rss}


def soak(out: Path, seed: int, minutes: float, rng: random.Random) -> list[dict]:
    log, sessions, t_end = out.parent / f"{out.name}.log", [], time.monotonic() + 60 * minutes
    while time.monotonic() < t_end:
        resume = ["--resume"] if (out / "config.json").exists() else []
        last = time.monotonic() + 40 >= t_end
        signum = signal.SIGTERM if last or rng.random() < 0.5 else signal.SIGKILL
        kill_after = max(5.0, t_end - time.monotonic()) if last else rng.uniform(5, 40)
        s = session(command(out, seed, "--max-iterations", str(OPEN_BUDGET), *resume), log, out,
                    kill_after=kill_after, signum=signum, at_write=len(sessions) % 4 == 3 and not last)
        lines = out / "metrics.jsonl"
        s["metrics_lines"] = len(lines.read_text().splitlines()) if lines.exists() else 0
        sessions.append(s)
        print(f"session {len(sessions):>3}: {s['signal']} after {s['seconds']:5.1f} s (rc {s['rc']}"
              f"{', during a checkpoint write' if s['in_write'] else ''}), {s['metrics_lines']} metrics lines",
              flush=True)
    return sessions


# --- comparison ----------------------------------------------------------------------------------

def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_tree(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def compare_checkpoints(a: Path, b: Path) -> dict[str, bool]:
    import torch

    ca = torch.load(a / "checkpoint.pt", map_location="cpu", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {"policy": same_tree(ca["trainer"]["policy"], cb["trainer"]["policy"]),
            "reference": same_tree(ca["trainer"]["reference"], cb["trainer"]["reference"]),
            "optimizer": same_tree(ca["trainer"]["optimizer"], cb["trainer"]["optimizer"]),
            "iteration": ca["trainer"]["iteration"] == cb["trainer"]["iteration"],
            "progress": without_time(ca["progress"]) == without_time(cb["progress"]),
            "rng": same_tree(ca["rng"], cb["rng"])}


def without_time(tree):
    if isinstance(tree, dict):
        return {k: without_time(v) for k, v in tree.items() if k != "wall_time"}
    return tree


def tensorboard_points(out: Path, records: list[dict]) -> dict[str, dict]:
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its notes on the purged events
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    want = [r["env_steps"] for r in records]
    result = {}
    for tag in ("train/loss", "eval/eval_mean"):
        steps = [e.step for e in acc.Scalars(tag)]
        result[tag] = {"points": len(steps), "distinct": len(set(steps)), "iterations": len(want),
                       "exactly_once": steps == want}
    return result


def no_progress(sessions: list[dict]) -> int:
    """Sessions killed before they added an iteration (most during start-up)."""
    best, count = 0, 0
    for s in sessions:
        count += s["metrics_lines"] <= best
        best = max(best, s["metrics_lines"])
    return count


def rss_summary(sessions: list[dict]) -> dict:
    ref = sessions[-1]["rss_mb"]
    first = [v for t, v in ref if t <= 60]
    last = [v for t, v in ref if t >= ref[-1][0] - 60] if ref else []
    soaked = [max(v for _, v in s["rss_mb"]) for s in sessions[:-1] if s["rss_mb"]]
    return {"uninterrupted_first_minute_median_mb": round(statistics.median(first), 1) if first else None,
            "uninterrupted_last_minute_median_mb": round(statistics.median(last), 1) if last else None,
            "uninterrupted_max_mb": round(max(v for _, v in ref), 1) if ref else None,
            "killed_sessions_peak_mb_range": [round(min(soaked), 1), round(max(soaked), 1)] if soaked else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the killed run (default 10)")
    p.add_argument("--out", type=Path, default=Path("runs") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--seed", type=int, default=0, help="training seed and kill schedule seed")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    killed, straight = args.out / "killed", args.out / "straight"
    sessions = soak(killed, args.seed, args.minutes, random.Random(args.seed))
    done = len(metrics(killed))
    print(f"uninterrupted run of {done} iterations ...", flush=True)
    sessions.append(session(command(straight, args.seed, "--max-iterations", str(done)), args.out / "straight.log",
                            straight, kill_after=None, signum=signal.SIGTERM, at_write=False))
    a, b = metrics(killed), metrics(straight)
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    report = {"minutes": args.minutes, "iterations": done, "sessions": len(sessions) - 1,
              "kills": {name: sum(s["signal"] == name for s in sessions[:-1]) for name in ("SIGKILL", "SIGTERM")},
              "kills_during_a_checkpoint_write": sum(s["in_write"] for s in sessions[:-1]),
              "sessions_without_a_new_iteration": no_progress(sessions[:-1]),
              "metrics_identical": a == b, "metrics_first_difference": first_diff,
              "checkpoint_identical": compare_checkpoints(killed, straight),
              "tensorboard": tensorboard_points(killed, b), "rss": rss_summary(sessions),
              "uninterrupted_seconds": sessions[-1]["seconds"],
              "sessions_detail": [{k: v for k, v in s.items() if k != "rss_mb"} for s in sessions]}
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    ok = (report["metrics_identical"] and all(report["checkpoint_identical"].values())
          and all(t["exactly_once"] for t in report["tensorboard"].values()))
    print(json.dumps({k: v for k, v in report.items() if k != "sessions_detail"}, indent=2))
    print(f"soak: {'PASS' if ok else 'FAIL'}; details in {args.out / 'soak.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
