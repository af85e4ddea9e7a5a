"""``make rehearse``: the README's GPU and scale-out commands, run here as written, with only the
substitutions a CPU forces, and a check that each one's weights moved as a float32 run's do.

The commands are read from README.md (every ``sh`` block between "## VLM training" and "##
Checking your own estimator" that runs ``grpo-harness train`` or ``torchrun``), so the rehearsal
follows the README as it is. The substitutions, and nothing else:

| README | here | why |
|---|---|---|
| ``--model ID`` | the tiny random Qwen2-VL, saved to a folder | no hub, no GPU memory |
| ``--data FILE`` | ``rows.jsonl``: 8 colour images with a ``solution`` column | no user data |
| ``--reward MODULE:FN`` | ``rewards.py:FN``, a number in [0, 1) hashed from the completion | a random model's colour answers are nearly all wrong: no signal, every step skipped |
| ``--device cuda`` | ``--device cpu`` | no GPU |
| ``--nproc-per-node 8`` | ``--nproc-per-node 2`` | 2 cores |
| ``groups_per_iteration=64``, ``group_size=8`` | 2 and 4 | time |
| ``--max-new-tokens 512`` | ``--max-new-tokens 4`` | time |
| (none) | ``--max-iterations 2`` (a ``--resume``: 4) | time |
| (no ``--out``) | ``--out runs/rehearse-N`` | to find the run's checkpoint |
| ``[...]`` (optional parts) | included | rehearse the most |

Each command runs in one scratch folder (so that ``--out runs/dp`` and the later ``--resume`` of it
meet), and must exit 0. Then the share of the trainable entries that changed between the initial
weights and the checkpoint's (the float32 master weights; LoRA: the adapters' B factors, which
start at 0) is measured. A command that sets ``--precision bf16-mixed`` is also run with
``--precision 32`` (its float32 twin) and must move at least ``MOVED`` (90%) of what the twin
moves; any other command trains in float32 itself and must move at least ``MOVED_ALONE`` (50%)
of its entries (not all: the embedding rows of words no completion used get no gradient; bf16
weights at lr 1e-6 move ~3%).

Multi-node: ``torchrun --nnodes 2`` with two launches on this machine (rendezvous on localhost,
one process each) trains CartPole to the weights of one process (relative gap ``MULTI_NODE_REL``).

    python benchmarks/rehearse.py [--only SUBSTRING] [--keep DIR]

Prints one line per command (exit status, seconds, share moved) and a summary; exit 1 if any
failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOVED = 0.9
MOVED_ALONE = 0.5
MULTI_NODE_REL = 1e-4
"""Relative gap allowed between 2 nodes and one process: float32 (CartPole's default), the ranks' gradients summed
in another order than one process sums them, 30 Adam steps (3 iterations of 10 epochs). Measured here: 1.1e-5."""
SECTION = ("## VLM training", "## Checking your own estimator")
REWARDS = '''
import hashlib


def _spread(completions):
    return [int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) / 2**32 for c in completions]


def accuracy(prompts, completions, **kwargs):
    return _spread(completions)


def my_reward(prompts, completions, **kwargs):
    return _spread(completions)
'''


def readme_commands(text: str) -> list[str]:
    """The train and torchrun commands of the README's VLM and scale-out sections, one string
    each (continuation lines joined, comments dropped)."""
    start, end = text.index(SECTION[0]), text.index(SECTION[1])
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text[start:end], re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("#") or not line:
                continue
            if line.startswith(("grpo-harness train", "torchrun")):
                out.append(re.sub(r"\s+", " ", line))
    return out


def substitute(command: str, *, model: str, data: str, rewards: str, python: str, torchrun: str) -> list[str]:
    """``command`` with the CPU substitutions of the module docstring, as an argv."""
    command = command.replace("[", "").replace("]", "")
    words = shlex.split(command)
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if w == "grpo-harness":
            out += [python, "-m", "grpo_harness.cli"]
        elif w == "torchrun":
            out.append(torchrun)
        elif w == "--model":
            out += [w, model]
            i += 1
        elif w == "--data":
            out += [w, data]
            i += 1
        elif w == "--reward":
            out += [w, f"{rewards}:{nxt.rsplit(':', 1)[1]}"]
            i += 1
        elif w == "--device" and nxt and nxt.startswith("cuda"):
            out += [w, "cpu"]
            i += 1
        elif w == "--nproc-per-node":
            out += [w, str(min(int(nxt), 2))]
            i += 1
        elif w == "--max-new-tokens":
            out += [w, "4"]
            i += 1
        elif w == "--set" and nxt and nxt.split("=")[0] in ("groups_per_iteration", "group_size"):
            key = nxt.split("=")[0]
            out += [w, f"{key}={2 if key == 'groups_per_iteration' else 4}"]
            i += 1
        else:
            out.append(w)
        i += 1
    if "train" in out and "--out" not in out:  # to find the run's folder
        out += ["--out", f"runs/rehearse-{abs(hash(command)) % 10**6}"]
    if "train" in out and "--max-iterations" not in out:
        out += ["--max-iterations", "4" if "--resume" in out else "2"]
    if "vlm" in out and "--threads" not in out:
        out += ["--threads", "1"]
    return out


def _moved(before: dict, after: dict) -> float:
    from grpo_core.precision import moved_share

    assert set(after) <= set(before), sorted(set(after) - set(before))[:3]
    return moved_share({k: before[k] for k in after}, after)


def moved_share_of_run(out: Path, initial: dict | None) -> float:
    """Share of the trainable entries that changed over the run (``initial``: the model's
    weights before training; None: the run built its own model in ``out/model``)."""
    import torch

    state = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")["trainer"]
    policy = state["policy"]
    if state.get("policy_trainable_only"):  # LoRA: the adapters; their B factors start at 0
        b = {k: v for k, v in policy.items() if "lora_B" in k}
        return _moved({k: torch.zeros_like(v) for k, v in b.items()}, b)
    if initial is None:
        if (out / "model").is_dir():
            initial = load_weights(out / "model")
        else:  # CartPole: the first checkpoint is not kept; compare with the reference policy
            return float("nan")
    return _moved(initial, policy)


def load_weights(folder: Path) -> dict:
    """A saved model's weights under the names the trainer's state dict uses (the file's names
    differ for some modules), as the trainer loads them."""
    from adapters.vlm_tiny import load_vlm

    return load_vlm(folder)[0].state_dict()


def prepare(root: Path) -> dict[str, str]:
    """The tiny model, the data file and the rewards module of the substitutions."""
    import json

    from adapters.vlm_tasks import colours_dataset, colours_vocabulary
    from adapters.vlm_tiny import build_tiny_vlm

    model = build_tiny_vlm(root / "tiny-model", words=colours_vocabulary(), family="qwen2_vl", seed=0)
    rows = []
    for i, row in enumerate(colours_dataset(8)):
        row["image"].save(root / f"img{i}.png")
        rows.append(json.dumps({"image": f"img{i}.png", "prompt": row["prompt"], "solution": row["answer"]}))
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n")
    (root / "rewards.py").write_text(REWARDS)
    return {"model": str(model), "data": str(root / "rows.jsonl"), "rewards": str(root / "rewards.py")}


def run(argv: list[str], cwd: Path, log: Path) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800).returncode
    return rc, time.perf_counter() - t


def _out_of(argv: list[str], cwd: Path) -> Path:
    return cwd / argv[argv.index("--out") + 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_node(root: Path, python: str, torchrun: str) -> tuple[bool, str]:
    """Two ``torchrun --nnodes 2`` launches (one process each) against one process, CartPole."""
    import torch

    train = ["-m", "grpo_harness.cli", "train", "cartpole", "--set", "groups_per_iteration=2", "--max-iterations", "3"]
    port, rdzv = _free_port(), f"rehearse-{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", rdzv,
                               *train, "--out", "runs/two-nodes"], cwd=root, env=env,
                              stdout=open(root / f"node{r}.log", "w"), stderr=subprocess.STDOUT) for r in (0, 1)]
    codes = [p.wait(timeout=1800) for p in procs]
    one = run([python, *train, "--out", "runs/one-node"], root, root / "one-node.log")[0]
    if codes != [0, 0] or one != 0:
        return False, f"exit statuses: nodes {codes}, one process {one} (logs in {root})"
    a = torch.load(root / "runs/two-nodes/checkpoint.pt", weights_only=False)["trainer"]["policy"]
    b = torch.load(root / "runs/one-node/checkpoint.pt", weights_only=False)["trainer"]["policy"]
    gap = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)
    return gap < MULTI_NODE_REL, f"2 nodes x 1 process vs one process: relative gap {gap:.1e} (bound {MULTI_NODE_REL:g})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="rehearse only the commands containing this text")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    python = sys.executable
    torchrun = str(Path(python).with_name("torchrun"))
    commands = readme_commands((REPO / "README.md").read_text())
    if args.only:
        commands = [c for c in commands if args.only in c]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        subs = prepare(root)
        initial = load_weights(Path(subs["model"]))
        failed = []
        for k, command in enumerate(commands):
            argv = substitute(command, python=python, torchrun=torchrun, **subs)
            rc, secs = run(argv, root, root / f"cmd{k}.log")
            line = f"[{k}] rc {rc}, {secs:.0f} s: {command}"
            ok = rc == 0
            if ok and "--out" in argv:
                out = _out_of(argv, root)
                share = moved_share_of_run(out, initial if "--model" in argv else None)
                line += f"\n    moved {share:.1%} of the trainable entries" if share == share else ""
                ok = not share < MOVED_ALONE
                if "bf16-mixed" in argv:
                    twin = [("32" if w == "bf16-mixed" else w) for w in argv]
                    twin[twin.index("--out") + 1] += "-fp32"
                    trc, _ = run(twin, root, root / f"cmd{k}-fp32.log")
                    ref = moved_share_of_run(_out_of(twin, root), initial if "--model" in argv else None)
                    ok = trc == 0 and not ref < MOVED_ALONE and share >= MOVED * ref
                    line += f"; its float32 twin moved {ref:.1%}"
            print(("ok   " if ok else "FAIL ") + line, flush=True)
            if not ok:
                failed.append(command)
        ok, text = multi_node(root, python, torchrun)
        print(("ok   " if ok else "FAIL ") + "multi-node: " + text, flush=True)
        if not ok:
            failed.append("multi-node")
        print(f"rehearse: {len(commands) + 1 - len(failed)} of {len(commands) + 1} passed"
              + (f"; failed: {failed}" if failed else ""))
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
