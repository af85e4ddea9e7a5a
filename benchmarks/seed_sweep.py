"""The seed studies' runner (``benchmarks.vlm_seeds``, ``benchmarks.trl_ablation``): one fresh
subprocess per (variant, seed), ``jobs`` at a time, each finished run appended as one JSON line
to a results file; a (variant, seed) already there is not run again, so the same command
resumes an interrupted sweep."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.vlm import REPO, _worker_env


def parse_choice(parser, text: str, known) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known`` (else a parser error)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(known)}")
    return names


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spawn(command: list[str], result: Path, what: str) -> dict:
    proc = subprocess.run([*command, "--result", str(result)], cwd=REPO, env=_worker_env(), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def run_sweep(todo: list[tuple[str, int]], command: Callable[[str, int], list[str]], results: Path, jobs: int,
              describe: Callable[[dict], str], done: int = 0) -> None:
    """Run ``command(variant, seed)`` (a worker's argv, to which ``--result FILE`` is added)
    for each pair of ``todo``, appending each result to ``results`` and printing
    ``describe(result)``; a failed run is reported and left out."""
    print(f"{len(todo)} runs to do ({done} already in {results.name})", file=sys.stderr, flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="seed-sweep-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_spawn, command(v, s), Path(tmp) / f"{k}.json", f"{v!r} seed {s}"): (v, s)
                   for k, (v, s) in enumerate(todo)}
        for fut in concurrent.futures.as_completed(futures):
            v, s = futures[fut]
            try:
                r = fut.result()
            except RuntimeError as e:
                print(f"  {v} seed {s}: FAILED {e}", file=sys.stderr, flush=True)
                continue
            with results.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"  {v} seed {s}: {describe(r)}", file=sys.stderr, flush=True)
