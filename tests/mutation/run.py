"""Mutation testing of the GRPO math: run mutmut 3, print and record the score of every file.

Run from the repository root (``make mutate`` runs the first form):

    python tests/mutation/run.py                      # the "math" suite; fails below the ratchet
    python tests/mutation/run.py --suite loop         # loop.py and refmodel.py with the loop tests
    python tests/mutation/run.py --files grpo_core/kl.py   # only these files of the suite
    python tests/mutation/run.py --retest             # after adding tests: re-test the survivors
                                                      # not argued equivalent (keeps the cache)
    python tests/mutation/run.py --record             # write the scores as the new ratchet

A suite is the ``[tool.mutmut]`` table of pyproject.toml ("math") with the keys of
``[tool.mutmut.suites.<name>]`` replacing its own. mutmut runs in ``build/mutation/<suite>/``:
symbolic links to the sources and tests plus a pyproject.toml holding the suite's settings, so
suites never share mutmut's cache; ``--resume`` keeps that cache (mutmut then re-tests only the
functions that changed), otherwise every run starts from scratch.

Score of a file = detected / (mutants - equivalent), where detected = killed, timed out or
crashed, and equivalent = a survivor listed in the "Equivalent" table of
tests/mutation/survivors.md (matched by function and changed lines, not by mutmut's number,
which shifts whenever the function changes). Its "Known survivors" table lists real gaps no
test on a CPU-only machine can close: they count against the score but are triaged. Any other
survivor is untriaged: kill it with a test written from the math or the documented contract,
or argue it equivalent in survivors.md. The recorded scores (tests/mutation/score.json) are a
ratchet: the run fails if a file or the suite scores lower; ``--record`` raises them. The
table and the survivors go to reports/mutation-<suite>.md and .json.

Hypothesis runs derandomized (profile "ci") so that a run is repeatable, and each test process
uses one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency reads TOML the same way
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCORE_FILE = HERE / "score.json"
SURVIVORS_FILE = HERE / "survivors.md"
DETECTED = {"killed", "timeout", "segfault", "suspicious", "caught by type check"}
UNDETECTED = {"survived", "no tests"}


def suite_config(suite: str) -> dict:
    """The ``[tool.mutmut]`` settings of ``suite`` (see the module doc)."""
    table = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"])
    suites = table.pop("suites", {})
    if suite != "math":
        if suite not in suites:
            raise SystemExit(f"unknown suite {suite!r}; choose one of math, {', '.join(suites)}")
        table.update(suites[suite])
    return table


def prepare_workdir(suite: str, cfg: dict, resume: bool) -> Path:
    """``build/mutation/<suite>/``: links to the top-level folders mutmut reads, and a
    pyproject.toml whose ``[tool.mutmut]`` table is ``cfg``."""
    work = ROOT / "build" / "mutation" / suite
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    tops = {Path(p).parts[0] for p in cfg["source_paths"] + cfg.get("also_copy", [])} | {"tests"}
    for top in sorted(tops):
        link = work / top
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(ROOT / top, work))
    kept, skipping = [], False
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            skipping = line.startswith("[tool.mutmut")
        if not skipping:
            kept.append(line)
    table = [f"{key} = {json.dumps(value)}" for key, value in cfg.items()]
    (work / "pyproject.toml").write_text("\n".join(kept + ["", "[tool.mutmut]"] + table) + "\n")
    return work


def mutmut(work: Path, *args: str, capture: bool = True) -> str:
    env = dict(os.environ, HYPOTHESIS_PROFILE="ci", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, env=env,
                          text=True, capture_output=capture)
    if proc.returncode != 0:
        raise SystemExit(f"mutmut {' '.join(args)} failed (exit {proc.returncode})"
                         + (f":\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}" if capture else ""))
    return proc.stdout if capture else ""


def file_of(name: str) -> str:
    """``grpo_core.kl.x_kl_k3__mutmut_4`` -> ``grpo_core/kl.py``."""
    return name.rsplit(".", 1)[0].replace(".", "/") + ".py"


def function_of(name: str) -> str:
    """``...x_kl_k3__mutmut_4`` -> ``kl_k3``; ``...xǁCǁforward__mutmut_2`` -> ``C.forward``."""
    func = re.sub(r"__mutmut_\d+$", "", name.rsplit(".", 1)[1])
    return func[2:] if func.startswith("x_") else func[2:].replace("ǁ", ".")


def change_of(diff: str) -> str:
    """The changed lines of a mutant's diff as one line: ``removed -> added`` (each side's
    lines joined by ``; ``, whitespace collapsed): the key survivors.md matches on."""
    def side(mark: str) -> str:
        lines = [ln[1:] for ln in diff.splitlines() if ln.startswith(mark) and not ln.startswith(mark * 3)]
        return "; ".join(" ".join(ln.split()) for ln in lines)
    return f"{side('-')} -> {side('+')}"


def triaged() -> dict[tuple[str, str], str]:
    """(function, change) -> "equivalent" or "known", from the tables of survivors.md: the
    "Equivalent" section (left out of the score) and the "Known survivors" one (real gaps
    that no test here can close, e.g. a buffer's device on a machine without an accelerator;
    they count as survivors but are not reported as untriaged)."""
    out, section = {}, ""
    for line in SURVIVORS_FILE.read_text().splitlines() if SURVIVORS_FILE.exists() else []:
        if line.startswith("## "):
            section = line[3:].strip().lower()
        elif section.startswith(("equivalent", "known")) and line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[(cells[0].strip("`"), cells[1].strip("`"))] = section.split()[0]
    return out


# What `mutmut show NAME` prints, for many names in one process (each `show` costs seconds).
_DIFFS = ("import json, sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
          "print(json.dumps({n: get_diff_for_mutant(n) for n in sys.argv[1:]}))")


def diffs(work: Path, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    proc = subprocess.run([sys.executable, "-c", _DIFFS, *names], cwd=work, text=True, capture_output=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout)
    return {name: mutmut(work, "show", name) for name in names}  # mutmut's internals moved


def collect(work: Path) -> list[dict]:
    """Every mutant of the run: name, file, function, status and, for a survivor, its change."""
    rows = []
    for line in mutmut(work, "results", "--all", "true").splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep:
            continue
        if status == "not checked":
            raise SystemExit(f"{name} was not checked: the mutmut run did not finish")
        rows.append({"name": name, "file": file_of(name), "function": function_of(name), "status": status})
    survivors = [r for r in rows if r["status"] in UNDETECTED]
    by_name = diffs(work, [r["name"] for r in survivors])
    for row in survivors:
        row["change"] = change_of(by_name[row["name"]])
    return rows


def score(rows: list[dict], known: dict[tuple[str, str], str]) -> dict:
    """Per file and in total: mutants, detected, equivalent, untriaged survivors, score (%)."""
    files: dict[str, dict] = {}
    for row in rows:
        f = files.setdefault(row["file"], {"mutants": 0, "detected": 0, "equivalent": 0, "untriaged": 0})
        f["mutants"] += 1
        if row["status"] in DETECTED:
            f["detected"] += 1
        elif known.get((row["function"], row["change"])) == "equivalent":
            f["equivalent"] += 1
        elif (row["function"], row["change"]) not in known:
            f["untriaged"] += 1
    total = {k: sum(f[k] for f in files.values()) for k in ("mutants", "detected", "equivalent", "untriaged")}
    for f in [*files.values(), total]:
        f["score"] = round(100.0 * f["detected"] / max(f["mutants"] - f["equivalent"], 1), 2)
    return {"files": dict(sorted(files.items())), "total": total}


def table(result: dict) -> str:
    head = "| file | mutants | killed | equivalent | untriaged survivors | score |\n|---|---:|---:|---:|---:|---:|"
    line = "| {} | {mutants} | {detected} | {equivalent} | {untriaged} | {score:.1f}% |"
    body = [line.format(f"`{name}`", **f) for name, f in result["files"].items()]
    return "\n".join([head, *body, line.format("**total**", **result["total"])])


def untriaged_rows(rows: list[dict], known) -> list[str]:
    """Survivors missing from survivors.md, as rows ready for its tables."""
    return [f"| `{r['function']}` | `{r['change'].replace('|', chr(92) + '|')}` | {r['name']} ({r['status']}) |"
            for r in rows if r["status"] in UNDETECTED and (r["function"], r["change"]) not in known]


def compare(suite: str, old: dict, result: dict) -> tuple[list[str], dict]:
    """``result`` against the recorded entry ``old`` of ``suite`` (``{}`` if none): the failures
    (a file or the suite below its recorded score; equal or higher passes) and the entry to
    record, the recorded files that ``result`` did not run (``--files``) kept as they were."""
    old_files = old.get("files", {})
    failures = [f"{name}: {f['score']:.2f}% < recorded {old_files[name]['score']:.2f}%"
                for name, f in result["files"].items()
                if name in old_files and f["score"] < old_files[name]["score"]]
    merged = {**old_files, **result["files"]}
    sums = {k: sum(f[k] for f in merged.values()) for k in ("mutants", "detected", "equivalent")}
    total = round(100.0 * sums["detected"] / max(sums["mutants"] - sums["equivalent"], 1), 2)
    if "total" in old and total < old["total"]["score"]:
        failures.append(f"suite {suite}: {total:.2f}% < recorded {old['total']['score']:.2f}%")
    return failures, {"files": merged, "total": {**sums, "score": total}}


def ratchet(suite: str, result: dict, record: bool) -> list[str]:
    """Compare with (and with ``record``, update) the recorded scores; returns the failures."""
    recorded = json.loads(SCORE_FILE.read_text()) if SCORE_FILE.exists() else {}
    failures, entry = compare(suite, recorded.get(suite, {}), result)
    if record and not failures:
        recorded[suite] = entry
        SCORE_FILE.write_text(json.dumps(recorded, indent=2) + "\n")
        print(f"recorded in {SCORE_FILE.relative_to(ROOT)}: {suite} {entry['total']['score']:.2f}%")
    return failures


def write_report(suite: str, result: dict, rows: list[dict], todo: list[str], timing: str) -> None:
    out = ROOT / "reports"
    out.mkdir(exist_ok=True)
    survivors = [r for r in rows if r["status"] in UNDETECTED]
    (out / f"mutation-{suite}.json").write_text(json.dumps(
        {"suite": suite, "timing": timing, **result, "survivors": survivors}, indent=2) + "\n")
    text = [f"# Mutation score, suite {suite} ({timing})", "", table(result), ""]
    if todo:
        text += ["## Untriaged survivors", "", "| function | change | mutant |", "|---|---|---|", *todo, ""]
    (out / f"mutation-{suite}.md").write_text("\n".join(text))


def run_mutmut(work: Path, args: argparse.Namespace) -> str:
    """Run mutmut as ``args`` ask; returns how long the run took, as the report states it (a
    re-test adds its time to that of the full run it completes, kept in ``timing.txt``)."""
    timing_file = work / "timing.txt"
    last = timing_file.read_text().strip() if timing_file.exists() else "an earlier run"
    if args.no_run:
        return last
    names = []
    if args.retest:
        known = triaged()
        names = [r["name"] for r in collect(work) if r["status"] in UNDETECTED
                 and known.get((r["function"], r["change"])) != "equivalent"]
        if not names:
            return last
    start = time.monotonic()
    mutmut(work, "run", "--max-children", str(args.jobs), *names, capture=False)
    took = (f"{(time.monotonic() - start) / 60:.1f} min with {args.jobs} jobs, load average "
            f"{os.getloadavg()[2]:.1f} over the last 15 min")
    if args.retest:
        timing = f"{last}; {len(names)} of its survivors re-tested in {took}"
    else:
        timing = took
    timing_file.write_text(timing + "\n")
    return timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="math", help="math (default) or a [tool.mutmut.suites] name")
    parser.add_argument("--files", nargs="+", help="mutate only these files of the suite")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 2),
                        help="mutants tested at once (default: 2, or 1 on a single core)")
    parser.add_argument("--resume", action="store_true", help="keep mutmut's cache of the last run")
    parser.add_argument("--retest", action="store_true", help="test again only the survivors "
                        "of the last run not argued equivalent (after adding tests; implies --resume)")
    parser.add_argument("--no-run", action="store_true", help="only score the last run again "
                        "(after editing survivors.md)")
    parser.add_argument("--record", action="store_true", help="write the scores as the new ratchet")
    args = parser.parse_args(argv)
    cfg = suite_config(args.suite)
    if args.files:
        cfg["only_mutate"] = args.files
    work = prepare_workdir(args.suite, cfg, args.resume or args.retest or args.no_run)
    timing = run_mutmut(work, args)
    known = triaged()
    rows = collect(work)
    result = score(rows, known)
    todo = untriaged_rows(rows, known)
    write_report(args.suite, result, rows, todo, timing)
    print(f"\nMutation score, suite {args.suite} ({timing}; reports/mutation-{args.suite}.md)")
    print(table(result))
    if todo:
        print(f"\n{len(todo)} untriaged survivors (kill them or argue them in {SURVIVORS_FILE.relative_to(ROOT)}):")
        print("\n".join(todo))
    failures = ratchet(args.suite, result, args.record)
    for failure in failures:
        print(f"mutation score dropped: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
