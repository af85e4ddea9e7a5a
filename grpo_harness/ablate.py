"""``grpo-harness ablate``: a baseline and variants over many seeds, with a paired verdict each.

    grpo-harness ablate cartpole --out runs/abl --vary gamma=1.0 --vary grpo_epochs=1,4 --seeds 0-19
    grpo-harness ablate vlm --out runs/abl --variants benchmarks/ablations/sequence.toml

Every run is one ``grpo-harness train ENV`` subprocess at one torch thread (``--threads 1``),
``--jobs`` at a time, in its own run folder under ``--out``; this command only chooses the
settings, starts the runs, reads their ``metrics.jsonl`` and writes the report.

Variants
    ``base`` (the command's defaults + ``--set``) and one variant per value of each ``--vary
    KEY=V1,V2`` that differs from the base's (one factor at a time; named ``KEY=V``), or the
    named variants of a ``--variants FILE.toml`` (format in ``load_spec``). Flags for the train
    command go in ``--train "ARGS"`` (e.g. ``--train "--task sequence --max-iterations 300"``).
Seeds
    ``--seeds`` are the verdict seeds; ``--tune-seeds`` (disjoint from them) are used only to
    choose the values of a variant's ``tune`` lists (e.g. a learning rate for several epochs):
    every combination runs on every tuning seed and the one that reached the target on the most
    seeds wins, then the lowest median cost, then the highest median final reward. The same
    seed means the same model initialisation, data and sampling streams in every variant, so
    results pair by seed. Seeds are lists of ``N`` and ``A-B`` (inclusive): ``0-19,40``.
Measures
    A run reaches the target when the train command's own criterion first holds (CartPole: a
    greedy evaluation mean >= 475; VLM: the rolling mean reward >= ``--target-reward``). Its
    cost is what it consumed until then: env steps (CartPole) or iterations (VLM), or with
    ``--cost`` iterations (CartPole) or completions (VLM: every sampled completion, dynamic
    sampling's extra draws included); a run that never reaches it is *censored*: it counts as "not
    reached" and as the cost, iterations and seconds it had used when its budget ran out (a
    lower bound on its true cost, so it favours that run). Final reward: the last greedy
    evaluation (CartPole: eval mean over 100 episodes; VLM: greedy held-out reward).
Verdicts
    Each variant is compared with its baseline on the seeds both finished, by the exact
    two-sided Wilcoxon signed-rank test of the paired differences (``grpo_harness.stats``;
    zero differences dropped) of the variant's measure (``cost`` by default, or ``final``):
    "held" when p < ``--alpha`` and the variant is better in the direction its claim expects,
    "opposite" when p < alpha the other way, else "not shown". No correction for the number of
    pairs is applied; the p-values are printed so a reader can apply one.
Resume
    Finished runs leave ``seed-N.json`` next to their folder and are never run again (the
    command they were run with must be the same, else it stops naming the run); a run cut
    short is continued with ``train --resume``. Ctrl-C / SIGTERM stop the running trains (they
    checkpoint) and print the command to continue.
Report
    ``ablation.md`` (the setup, which seeds were used for what, the test, the variants table and
    the verdicts), ``ablation.png`` (cost and final reward per seed and variant) and
    ``ablation.json`` (every run's result) in ``--out``; rewritten after every finished verdict run and
    alone with ``--report-only``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .folder_lock import FolderBusy, FolderLock
from .run import EXIT_USAGE, UsageError, make_config, parse_set
from .stats import SignedRank, quartiles, signed_rank_test

ENVS = ("cartpole", "vlm")
BASE = "base"
EXPECT = ("better", "worse")
MEASURES = ("cost", "final")
COSTS = {"cartpole": {"env-steps": ("env_steps", "env steps"), "iterations": ("iterations", "iterations")},
         "vlm": {"iterations": ("iterations", "iterations"), "completions": ("generations", "completions")}}
"""env -> ``--cost`` name -> (the run result's key, its name in the report): what a variant's
verdict compares, the samples consumed until the target. The first of each env is its default."""


def cost_of(env: str, cost: str = "") -> tuple[str, str]:
    """(result key, report name) of ``cost`` for ``env`` (its default when empty); UsageError
    naming the choices otherwise."""
    choices = COSTS[env]
    if not cost:
        return next(iter(choices.values()))
    if cost not in choices:
        raise UsageError(f"cost {cost!r} is not a cost of {env}: choose one of {', '.join(choices)}")
    return choices[cost]
REPORT_MD, REPORT_PNG, REPORT_JSON = "ablation.md", "ablation.png", "ablation.json"


# --- what to run ------------------------------------------------------------------------------

@dataclass
class Variant:
    """One named setting of an ablation."""

    name: str
    set: dict[str, Any] = field(default_factory=dict)
    """GRPOConfig overrides over the base's (``--set KEY=VALUE`` of each run)."""
    tune: dict[str, list] = field(default_factory=dict)
    """KEY -> candidate values, chosen on the tuning seeds (every combination is tried)."""
    baseline: str | None = BASE
    """The variant this one is compared with; None: not compared (a baseline only)."""
    expect: str = "better"
    """What the claim predicts for this variant against its baseline: "better" or "worse"."""
    measure: str = "cost"
    """What the verdict compares: "cost" (samples to the target, lower is better) or "final"
    (final reward, higher is better)."""
    claim: str = ""
    """The claim the pair tests, in words (shown in the verdicts table)."""
    train: list[str] = field(default_factory=list)
    """Flags for this variant's ``train`` runs, after the ablation's (e.g. ``--hidden 32``)."""
    tune_from: str | None = None
    """Take the tuned values of that variant (e.g. its learning rate) instead of tuning."""


@dataclass
class Spec:
    """A whole ablation: the env, the train flags, the variants and the seeds."""

    env: str
    variants: dict[str, Variant]
    seeds: list[int]
    tune_seeds: list[int] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    alpha: float = 0.05
    cost: str = ""
    """What a verdict on cost compares (a key of ``COSTS[env]``; empty: the env's default)."""


def parse_seeds(text: str | list, what: str = "--seeds") -> list[int]:
    """``"0-3,7"`` (or a list of ints) -> ``[0, 1, 2, 3, 7]``; UsageError naming the bad part."""
    if isinstance(text, list):
        parts = [str(x) for x in text]
    else:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
    seeds: list[int] = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise UsageError(f"{what} {text}: {part!r} is not a seed N or a range A-B (A <= B)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        seeds += range(lo, hi + 1)
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"{what} {text}: a seed is listed twice")
    return seeds


def slug(name: str) -> str:
    """A folder name for a variant or a tuning candidate."""
    return re.sub(r"[^a-z0-9.=_-]+", "-", name.lower()).strip("-") or "x"


def _flags(value: Any, where: str) -> list[str]:
    """A ``train`` entry of a variants file: a list of flags, or one string of them (split as a
    shell would, as ``--train`` is); UsageError for anything else."""
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
        return [str(a) for a in value]
    raise UsageError(f"{where}: train = {value!r}: expected a list of flags, e.g. [\"--max-env-steps\", \"500\"], "
                     "or one string of them")


def _variant(name: str, table: dict, where: str) -> Variant:
    known = {"set", "tune", "baseline", "expect", "measure", "claim", "compare", "train", "tune_from"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    v = Variant(name, dict(table.get("set", {})), {k: list(vs) if isinstance(vs, list) else [vs]
                                                   for k, vs in table.get("tune", {}).items()})
    v.baseline = table.get("baseline", BASE if name != BASE else None)
    if table.get("compare", True) is False or name == BASE:
        v.baseline = None
    v.expect, v.measure, v.claim = table.get("expect", "better"), table.get("measure", "cost"), table.get("claim", "")
    v.train = _flags(table.get("train", []), where)
    v.tune_from = table.get("tune_from")
    if v.expect not in EXPECT or v.measure not in MEASURES:
        raise UsageError(f"{where}: expect={v.expect!r} / measure={v.measure!r}: expected one of "
                         f"{EXPECT} / {MEASURES}")
    return v


def load_spec(path: Path) -> Spec:
    """Read a variants file (TOML, or the same keys in JSON)::

        env = "vlm"                          # cartpole or vlm
        train = ["--task", "sequence"]       # flags for `grpo-harness train ENV` (optional)
        seeds = "0-19"                       # verdict seeds (--seeds overrides)
        tune_seeds = "100-103"               # tuning seeds (--tune-seeds overrides)
        alpha = 0.05                         # significance level of the verdicts
        cost = "completions"                 # the cost verdicts compare (--cost overrides):
                                             # cartpole env-steps (default) or iterations,
                                             # vlm iterations (default) or completions

        [variants.base]                      # the baseline (optional: defaults)
        set = {}
        [variants."grpo_epochs 4"]
        set = {grpo_epochs = 4}              # GRPOConfig keys over the base's
        tune = {lr = [1e-3, 5e-4]}           # chosen on the tuning seeds
        baseline = "base"                    # compared with (default base); compare = false: none
        expect = "better"                    # what the claim predicts: better or worse
        measure = "cost"                     # cost (samples to target) or final (final reward)
        claim = "several epochs: better data efficiency"
        train = ["--hidden", "32"]           # flags for this variant's runs (optional)
        tune_from = "other"                  # or: take that variant's tuned values
    """
    from .run import _parse_file

    doc = _parse_file(Path(path))
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: the top level must be a table")
    unknown = sorted(set(doc) - {"env", "train", "seeds", "tune_seeds", "alpha", "cost", "variants"})
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}")
    tables = doc.get("variants", {})
    variants = {BASE: _variant(BASE, tables.get(BASE, {}), f"{path} [variants.{BASE}]")}
    for name, table in tables.items():
        if name != BASE:
            variants[name] = _variant(name, table, f"{path} [variants.{name!r}]")
    return Spec(env=doc.get("env", ""), variants=variants, seeds=parse_seeds(doc.get("seeds", "")),
                tune_seeds=parse_seeds(doc.get("tune_seeds", ""), "tune_seeds"),
                train=_flags(doc.get("train", []), str(path)), alpha=float(doc.get("alpha", 0.05)),
                cost=str(doc.get("cost", "")))


def _values(item: str, flag: str) -> tuple[str, list]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip() or not text:
        raise UsageError(f"{flag} expects KEY=V1,V2,..., got {item!r}")
    return key.strip(), [parse_set(f"{key}={v}")[1] for v in text.split(",")]


def spec_from_args(args) -> Spec:
    """The ablation asked for by the command line (a ``--variants`` file, then the flags)."""
    spec = load_spec(args.variants) if args.variants else Spec(env=args.env, variants={BASE: _variant(BASE, {}, "")},
                                                              seeds=[])
    if spec.env and spec.env != args.env:
        raise UsageError(f"{args.variants} is an ablation of {spec.env!r}, not {args.env}")
    spec.env = args.env
    base = spec.variants[BASE]
    for item in args.overrides:
        key, value = parse_set(item)
        base.set[key] = value
    for item in args.vary:
        key, values = _values(item, "--vary")
        made = 0
        for value in values:
            if base.set.get(key, _default(spec.env, key)) != value:
                name = f"{key}={json.dumps(value)}"
                spec.variants[name] = Variant(name, {key: value}, claim=f"{key} {json.dumps(value)} vs the base")
                made += 1
            else:
                print(f"grpo-harness ablate: --vary {key}={json.dumps(value)}: the base's value (its runs are the "
                      "base's): no variant for it", file=sys.stderr, flush=True)
        if not made:
            raise UsageError(f"--vary {item}: every value is the base's, so it makes no variant; vary it to "
                             "another value (or change the base with --set)")
    for item in args.tune:
        key, values = _values(item, "--tune")
        for v in spec.variants.values():
            v.tune[key] = values
    spec.train += shlex.split(args.train or "")
    if args.seeds is not None:
        spec.seeds = parse_seeds(args.seeds)
    if args.tune_seeds is not None:
        spec.tune_seeds = parse_seeds(args.tune_seeds, "--tune-seeds")
    if args.alpha is not None:
        spec.alpha = args.alpha
    if getattr(args, "cost", None):
        spec.cost = args.cost
    check_spec(spec)
    return spec


def _command_defaults(env: str) -> dict[str, Any]:
    """The train command's GRPOConfig defaults (over GRPOConfig's own)."""
    if env == "cartpole":
        from .train import CARTPOLE_DEFAULTS as defaults
    else:
        from .train_vlm import VLM_DEFAULTS as defaults
    return defaults["grpo"]


def _default(env: str, key: str) -> Any:
    from grpo_core.config import GRPOConfig

    if key not in GRPOConfig.field_names():
        from .trl_names import hint

        trl = hint(key)
        raise UsageError(f"--vary {key}: not a GRPOConfig key" + (f"; {trl}" if trl else ""))
    return _command_defaults(env).get(key, getattr(GRPOConfig(), key))


def check_spec(spec: Spec) -> None:
    """UsageError for an ablation that cannot run: no seeds, shared seeds, unknown baselines,
    GRPOConfig keys that do not exist or values it refuses."""
    from .run import make_config

    if spec.env not in ENVS:
        raise UsageError(f"env {spec.env!r}: expected one of {', '.join(ENVS)}")
    if not spec.seeds:
        raise UsageError("no verdict seeds: pass --seeds (e.g. --seeds 0-19) or set seeds in the variants file")
    shared = sorted(set(spec.seeds) & set(spec.tune_seeds))
    if shared:
        raise UsageError(f"seed(s) {shared} are both tuning and verdict seeds; keep them apart")
    if any(v.tune for v in spec.variants.values()) and not spec.tune_seeds:
        raise UsageError("a variant has tune values but there are no --tune-seeds")
    if not 0 < spec.alpha < 1:
        raise UsageError(f"--alpha {spec.alpha}: expected in (0, 1)")
    cost_of(spec.env, spec.cost)
    slugs: dict[str, str] = {}
    defaults = _command_defaults(spec.env)
    for v in spec.variants.values():
        if v.baseline is not None and v.baseline not in spec.variants:
            raise UsageError(f"variant {v.name!r}: its baseline {v.baseline!r} is not a variant")
        if v.tune_from is not None and (v.tune or not spec.variants.get(v.tune_from, Variant("")).tune):
            raise UsageError(f"variant {v.name!r}: tune_from {v.tune_from!r} must name a tuned variant, "
                             "and a variant with tune_from has no tune of its own")
        if slugs.setdefault(slug(v.name), v.name) != v.name:
            raise UsageError(f"variants {slugs[slug(v.name)]!r} and {v.name!r} share the folder name {slug(v.name)!r}")
        source = spec.variants[v.tune_from] if v.tune_from else v
        for cand in candidates(source) or [{}]:
            with warnings.catch_warnings():  # the runs print their own (e.g. an inert KL term)
                warnings.simplefilter("ignore")
                make_config({**defaults, **settings(spec, v, cand)})


def candidates(v: Variant) -> list[dict[str, Any]]:
    """Every combination of ``v.tune``'s values ([] without tuning)."""
    if not v.tune:
        return []
    keys = list(v.tune)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v.tune[k] for k in keys))]


def settings(spec: Spec, v: Variant, chosen: dict[str, Any]) -> dict[str, Any]:
    """The GRPOConfig overrides of a run of ``v``: base, then the variant, then tuned values."""
    base = spec.variants[BASE].set if v.name != BASE else {}
    return {**base, **v.set, **chosen}


# --- one run ----------------------------------------------------------------------------------

@dataclass
class Job:
    """One train run: a variant (with its tuned or candidate values) on one seed."""

    variant: str
    seed: int
    values: dict[str, Any]
    """The GRPOConfig overrides of the run (``settings``)."""
    folder: Path
    """The train run's ``--out``; ``seed-N.json`` / ``seed-N.log`` lie next to it."""

    @property
    def result_path(self) -> Path:
        return self.folder.with_suffix(".json")

    @property
    def log_path(self) -> Path:
        return self.folder.with_suffix(".log")


def train_args(spec: Spec, job: Job) -> list[str]:
    """The arguments after ``grpo-harness train``, but ``--out``: what the run is (its result
    records them; the ablation folder may move)."""
    sets = [a for k, v in sorted(job.values.items()) for a in ("--set", f"{k}={json.dumps(v)}")]
    own = spec.variants[job.variant].train
    return [spec.env, *spec.train, *own, *sets, "--seed", str(job.seed), "--threads", "1"]


def stale_defaults(spec: Spec, job: Job) -> str:
    """The train-command defaults (``_command_defaults``) that a finished run of ``job`` did not
    run with, as ``key: then -> now`` ('' when none, or when the run left no config.json): the
    same arguments mean another run once a default changes: those of the train command and of
    GRPOConfig alike (the seed and the keys the run sets are skipped)."""
    try:
        then = json.loads((job.folder / "config.json").read_text())["grpo"]
    except (OSError, json.JSONDecodeError, KeyError):
        return ""
    own = [*spec.train, *spec.variants[job.variant].train]
    sets = {a.split("=", 1)[0] for flag, a in zip(own, own[1:]) if flag == "--set"}
    now = make_config(_command_defaults(spec.env)).to_dict()
    field_default = make_config({}).to_dict()  # a field the run's config lacks is older than it: its default
    keys = [k for k in now if k != "seed" and k not in job.values and k not in sets]
    then = {k: then.get(k, field_default.get(k)) for k in keys}
    return ", ".join(f"{k}: {then[k]!r} -> {now[k]!r}" for k in keys if then[k] != now[k])


def _split_sets(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``args`` without its ``--set KEY=VALUE`` pairs, and those pairs parsed."""
    rest, sets, i = [], {}, 0
    while i < len(args):
        if args[i] == "--set" and i + 1 < len(args):
            key, value = parse_set(args[i + 1])
            sets[key] = value
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return rest, sets


def pinned_alike(recorded: list[str], args: list[str], job: Job) -> bool:
    """True when the finished run recorded as ``recorded`` is the run ``args`` asks for: the
    same arguments but for ``--set`` pins that ``args`` adds and that the run already ran with
    (its config.json; a field it lacks at the GRPOConfig default), as when a variants file
    pins a setting whose default changed after its runs."""
    old_rest, old_sets = _split_sets(recorded)
    new_rest, new_sets = _split_sets(args)
    if old_rest != new_rest or any(k not in new_sets or new_sets[k] != v for k, v in old_sets.items()):
        return False
    try:
        ran = json.loads((job.folder / "config.json").read_text())["grpo"]
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    field_default = make_config({}).to_dict()
    return all(ran.get(k, field_default.get(k)) == v for k, v in new_sets.items() if k not in old_sets)


def read_result(job: Job) -> dict[str, Any] | None:
    """The finished run's result, None when it has none yet (or a failed one)."""
    try:
        doc = json.loads(job.result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if doc.get("exit") == 0 else None


def read_failure(job: Job) -> dict[str, Any] | None:
    """The result of a run that failed (exit status and its last error line), else None."""
    try:
        doc = json.loads(job.result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("exit") in (0, None):
        return None
    return {"exit": doc["exit"], "error": str(doc.get("error", ""))}


def read_measured(spec: Spec, job: Job) -> dict[str, Any] | None:
    """``read_result`` holding the cost ``spec`` compares: a VLM result written before
    completions were recorded gets them from its run folder; without the folder, UsageError."""
    r = read_result(job)
    key = cost_of(spec.env, spec.cost)[0]
    if r is not None and spec.env == "vlm" and "generations" not in r and job.folder.is_dir():
        r = {**r, "generations": summarise_run(spec.env, job.folder)["generations"]}  # an older result
    if r is not None and key not in r:
        raise UsageError(f"{job.result_path} has no {key} (written before they were recorded) and its run "
                         f"folder is gone: compare another cost, or delete the result to run it again")
    return r


def summarise_run(env: str, folder: Path) -> dict[str, Any]:
    """Reached / cost / seconds / final reward of a finished run, from its metrics and config
    (see "Measures" in the module docstring)."""
    from .trainlog import METRICS_FILE, read_metrics

    records = read_metrics(folder / METRICS_FILE)
    config = json.loads((folder / "config.json").read_text())
    if not records:
        raise UsageError(f"{folder} holds no metrics")
    if env == "cartpole":
        hit = lambda r: r.get("eval_mean", -math.inf) >= 475.0  # noqa: E731 - CartPole-v1's threshold
        finals = [r["eval_mean"] for r in records if "eval_mean" in r]
    else:
        target = config["train"]["target_reward"]
        hit = lambda r: r.get("reward_rolling", -math.inf) >= target  # noqa: E731
        finals = [r["eval_reward_mean"] for r in records if "eval_reward_mean" in r]
    first = next((r for r in records if hit(r)), None)
    last = records[-1]
    at = first if first is not None else last  # censored: what it had used at the end
    out = {"reached": first is not None, "iterations": int(at["iteration"]) + 1,
           "seconds": float(at["wall_time"]), "final": finals[-1] if finals else math.nan,
           "iterations_run": int(last["iteration"]) + 1, "wall_time": float(last["wall_time"])}
    if env == "cartpole":
        out["env_steps"] = int(at["env_steps"])
    else:
        out["final_rolling"] = float(last["reward_rolling"])
        out["generations"] = _generations(config, records, int(at["iteration"]))
    for key in ("kl", "skipped_steps"):
        vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"{key}_mean"] = sum(vals) / len(vals)
    return out


def _generations(config: dict, records: list[dict], through: int) -> int:
    """Completions a VLM run sampled in iterations 0..``through``: B x G each, plus what
    dynamic sampling's extra draws added (``extra_generations``)."""
    from grpo_core.config import GRPOConfig

    grpo = {**GRPOConfig().to_dict(), **config.get("grpo", {})}
    per = grpo["group_size"] * grpo["groups_per_iteration"]
    return int(sum(per + r.get("extra_generations", 0) for r in records if r["iteration"] <= through))


class Runner:
    """Runs jobs as ``grpo-harness train`` subprocesses, ``jobs`` at a time; ``stop()`` sends
    SIGTERM to the running ones (they checkpoint) and starts no more."""

    def __init__(self, spec: Spec, jobs: int, say):
        self.spec, self.jobs, self.say = spec, jobs, say
        self.stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # re-entered when Ctrl-C's handler calls stop() inside stop()

    def command(self, job: Job) -> list[str]:
        return [sys.executable, "-m", "grpo_harness.cli", "train", *train_args(self.spec, job),
                "--out", str(job.folder)]

    def prepare(self, job: Job) -> list[str] | None:
        """The command that (re)starts ``job``, None when it is done already. A result written
        by other settings stops the ablation (UsageError) rather than mixing runs."""
        args = train_args(self.spec, job)
        try:
            doc = json.loads(job.result_path.read_text())
        except (OSError, json.JSONDecodeError):
            doc = None
        if doc is not None and doc.get("args") != args and not pinned_alike(doc.get("args", []), args, job):
            raise UsageError(f"{job.result_path} was run as `train {shlex.join(doc.get('args', []))}`, not "
                             f"`train {shlex.join(args)}`; use another --out or delete {job.folder}")
        stale = doc is not None and doc.get("exit") == 0 and stale_defaults(self.spec, job)
        if stale:
            self.say(f"{job.variant} seed {job.seed}: run again, the train defaults changed since ({stale})")
            job.result_path.unlink()
            shutil.rmtree(job.folder, ignore_errors=True)
        elif doc is not None and doc.get("exit") == 0:
            return None
        cmd = self.command(job)
        if (job.folder / "config.json").is_file():
            return cmd + ["--resume"]
        if job.folder.exists():  # killed before its settings were written: nothing to keep
            shutil.rmtree(job.folder)
        return cmd

    def run_one(self, job: Job, cmd: list[str]) -> dict[str, Any]:
        job.folder.parent.mkdir(parents=True, exist_ok=True)
        start = job.log_path.stat().st_size if job.log_path.exists() else 0
        code = self._spawn(job, cmd)
        if code in INTERRUPTED and self.stopping.is_set() and finished_in_log(job.log_path, start):
            code = 0  # it had finished when the stop reached it (it was exiting): a finished run
        if code == EXIT_USAGE and cmd[-1] == "--resume" and "cannot resume" in _last_error(job.log_path):
            # e.g. GRPOConfig gained an option since the checkpoint: the run starts again
            shutil.rmtree(job.folder)
            code = self._spawn(job, cmd[:-1])
        doc: dict[str, Any] = {"args": train_args(self.spec, job), "exit": code}
        if code == 0:
            doc.update(summarise_run(self.spec.env, job.folder))
        else:
            doc["error"] = _last_error(job.log_path)
        from .trainlog import atomic_write

        atomic_write(job.result_path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))
        return doc

    def _spawn(self, job: Job, cmd: list[str]) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(job.log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # our SIGTERM, not the terminal's SIGINT
            with self._lock:
                self._procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def run(self, jobs: list[Job], on_done) -> list[tuple[Job, dict]]:
        """Run every job not done yet; ``on_done(job, result)`` after each. Returns the failed
        ones. A usage error (exit 2) of any run stops the rest: it would repeat."""
        todo = [(j, c) for j in jobs if (c := self.prepare(j)) is not None]
        failed: list[tuple[Job, dict]] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {}
            for job, cmd in todo:
                futures[pool.submit(self._guarded, job, cmd)] = job
            for fut in concurrent.futures.as_completed(futures):
                job, doc = futures[fut], fut.result()
                if doc is None:
                    continue
                if doc["exit"] != 0:
                    failed.append((job, doc))
                    if doc["exit"] == EXIT_USAGE:
                        self.stop()
                on_done(job, doc)
        return failed

    def _guarded(self, job: Job, cmd: list[str]) -> dict[str, Any] | None:
        if self.stopping.is_set():
            return None
        return self.run_one(job, cmd)

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)


INTERRUPTED = (130, 143, -signal.SIGINT, -signal.SIGTERM)
"""Exit statuses of a train stopped by a signal: with its handlers (130, 143) or before or after
them (killed: -2, -15)."""
NOT_FINISHED = ("interrupted", "error", "crashed", "non-finite", "no space")
"""How the summary line (``stopped: REASON; ...``) of a train that did not finish begins."""


def finished_in_log(log: Path, start: int = 0) -> bool:
    """True when the train's output past byte ``start`` of its log holds its summary line with a
    reason that means done (a budget, the target, solved)."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return False
    reasons = [line[len("stopped: "):] for line in text.splitlines() if line.startswith("stopped: ")]
    return bool(reasons) and not reasons[-1].startswith(NOT_FINISHED)


def _last_error(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(empty log)"])[-1][:300]


# --- the ablation -----------------------------------------------------------------------------

def tuning_jobs(spec: Spec, out: Path) -> list[Job]:
    jobs = []
    for seed in spec.tune_seeds:
        for v in spec.variants.values():
            for cand in candidates(v):
                folder = out / "tune" / slug(v.name) / slug(_cand_name(cand)) / f"seed-{seed}"
                jobs.append(Job(v.name, seed, settings(spec, v, cand), folder))
    return jobs


def _cand_name(cand: dict[str, Any]) -> str:
    return ",".join(f"{k}={json.dumps(v)}" for k, v in cand.items())


def choose(spec: Spec, v: Variant, out: Path) -> tuple[dict[str, Any], list[dict]] | None:
    """The tuned values of ``v`` and the tuning table rows; None while a tuning run is missing.
    Order: most seeds reaching the target, then lowest median cost, then highest median final."""
    rows = []
    for cand in candidates(v):
        jobs = [Job(v.name, s, settings(spec, v, cand), out / "tune" / slug(v.name) / slug(_cand_name(cand))
                    / f"seed-{s}") for s in spec.tune_seeds]
        results = [read_measured(spec, j) for j in jobs]
        if any(r is None for r in results):
            return None
        rows.append({"values": cand, **variant_summary(spec.env, results, cost_of(spec.env, spec.cost)[0])})
    best = min(rows, key=lambda r: (-r["reached"], r["cost_q"][1], -r["final_q"][1]))
    return best["values"], rows


def tuned(spec: Spec, v: Variant, out: Path) -> tuple[dict[str, Any], list[dict]] | None:
    """``choose`` for a tuned variant, the source's choice for ``tune_from``, ({}, []) else."""
    if v.tune_from is not None:
        picked = choose(spec, spec.variants[v.tune_from], out)
        return None if picked is None else (picked[0], [])
    return choose(spec, v, out) if v.tune else ({}, [])


def verdict_jobs(spec: Spec, out: Path, chosen: dict[str, dict]) -> list[Job]:
    """Seeds outer, variants inner: a run stopped half-way leaves every variant with about the
    same seeds done. Variants whose tuning is not finished are left out."""
    return [Job(v.name, seed, settings(spec, v, chosen[v.name]), out / "runs" / slug(v.name) / f"seed-{seed}")
            for seed in spec.seeds for v in spec.variants.values() if v.name in chosen]


def run_ablation(spec: Spec, out: Path, *, jobs: int = 2, report_only: bool = False, say=print,
                 again: str | None = None) -> int:
    """Tune, run the verdict seeds, write the report; the exit status (0: every run done, 1: a
    run failed, 130: stopped by a signal). ``again``: the command that continues, for the
    message printed when not everything is done."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    try:
        lock.acquire("ablation folder")
    except FolderBusy as e:
        raise UsageError(str(e)) from None
    try:
        return _run_ablation(spec, out, jobs=jobs, report_only=report_only, say=say, again=again)
    finally:
        lock.release()


def _run_ablation(spec: Spec, out: Path, *, jobs: int, report_only: bool, say, again: str | None) -> int:
    _check_same_cost(spec, out)
    runner = Runner(spec, jobs, say)
    failed: list = []
    with _forward_signals(runner):
        if not report_only:
            failed += runner.run(tuning_jobs(spec, out), _progress(say, "tune"))
        chosen = {}
        for v in spec.variants.values():
            picked = tuned(spec, v, out)
            if picked is not None:
                chosen[v.name] = picked[0]
        if not report_only and not runner.stopping.is_set():
            def done(job: Job, doc: dict) -> None:
                report(job, doc)
                write_report(spec, out)  # a partial report is always on disk

            report = _progress(say, "run")
            failed += runner.run(verdict_jobs(spec, out, chosen), done)
    write_report(spec, out)
    stopped = runner.stopping.is_set()
    failed = [(j, d) for j, d in failed if not (stopped and d["exit"] in INTERRUPTED)]  # interrupted: resumed
    for job, doc in failed:
        say(f"failed: {job.variant} seed {job.seed} (exit {doc['exit']}): {doc.get('error', '')}; log {job.log_path}")
    say(f"report: {out / REPORT_MD}")
    if stopped or failed:
        say(f"continue with: {again}" if again else "run the same command again to continue")
        return 1 if failed else 130
    return 0


def _check_same_cost(spec: Spec, out: Path) -> None:
    """UsageError when ``out`` holds a tuned ablation reported on another cost: the tuning
    choice ranks by the cost, so another cost could pick values its verdict runs were not run
    with. Without tuning another cost is only another reading of the same runs."""
    try:
        before = json.loads((out / REPORT_JSON).read_text()).get("cost") or cost_of(spec.env)[1]
    except (OSError, json.JSONDecodeError):
        return
    now = cost_of(spec.env, spec.cost)[1]
    if before != now and any(v.tune for v in spec.variants.values()):
        raise UsageError(f"{out} was tuned and reported on {before}, not {now}: its tuned values were chosen "
                         f"on {before}; use another --out to tune on {now}")


def _progress(say, kind: str):
    count = itertools.count(1)

    def done(job: Job, doc: dict) -> None:
        state = ("reached" if doc.get("reached") else "not reached") if doc["exit"] == 0 else f"exit {doc['exit']}"
        say(f"[{kind} {next(count)}] {job.variant} seed {job.seed}: {state}")
    return done


@contextlib.contextmanager
def _forward_signals(runner: Runner):
    """SIGINT and SIGTERM stop the runner (its trains checkpoint) instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        runner.say("stopping: the running trains checkpoint and exit")
        runner.stop()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- the report -------------------------------------------------------------------------------

def variant_summary(env: str, results: list[dict], key: str) -> dict[str, Any]:
    """Counts and quartiles over a variant's finished runs (censored runs at their budget);
    ``cost_q``: of the result ``key`` the verdicts compare."""
    q = lambda k: quartiles([r[k] for r in results]) if results else (math.nan,) * 3  # noqa: E731
    finals = [r["final"] for r in results if not math.isnan(r["final"])]
    out = {"runs": len(results), "reached": sum(r["reached"] for r in results), "cost_q": q(key),
           "iterations_q": q("iterations"), "seconds_q": q("seconds"),
           "final_q": quartiles(finals) if finals else (math.nan,) * 3}
    if env == "cartpole":
        out["env_steps_q"] = q("env_steps")
    else:
        out["final_rolling_q"] = q("final_rolling")
        known = [r["generations"] for r in results if "generations" in r]
        out["generations_q"] = quartiles(known) if results and len(known) == len(results) else (math.nan,) * 3
    return out


def compare(spec: Spec, v: Variant, mine: dict[int, dict], theirs: dict[int, dict]) -> dict[str, Any]:
    """The paired comparison of ``v`` with its baseline on the seeds both finished."""
    key = cost_of(spec.env, spec.cost)[0]
    seeds = sorted(set(mine) & set(theirs))
    cost = [mine[s][key] - theirs[s][key] for s in seeds]
    final = [mine[s]["final"] - theirs[s]["final"] for s in seeds]
    # runs without a final evaluation (stopped at the target before one) have no final reward
    known = all(math.isfinite(d) for d in final)
    if not known and v.measure == "final":
        raise UsageError(f"variant {v.name!r} is judged on the final reward, but some of its runs (or its "
                         "baseline's) have none (stopped before an evaluation): judge it on cost")
    tests = {"cost": signed_rank_test(cost),
             "final": signed_rank_test(final) if known else SignedRank(n=0, t_plus=0.0, t_minus=0.0,
                                                                         p_value=math.nan, positive=0)}
    t = tests[v.measure]
    better = -t.direction if v.measure == "cost" else t.direction  # lower cost / higher final
    if t.n == 0 or t.p_value >= spec.alpha:
        verdict = "not shown"
    else:
        verdict = "held" if (better > 0) == (v.expect == "better") else "opposite"
    return {"seeds": seeds, "sooner": sum(d < 0 for d in cost), "later": sum(d > 0 for d in cost),
            "same": sum(d == 0 for d in cost), "cost_median_diff": _median(cost),
            "final_median_diff": _median(final), "p_cost": tests["cost"].p_value,
            "p_final": tests["final"].p_value, "verdict": verdict}


def _median(values: list[float]) -> float:
    return quartiles(values)[1] if values else math.nan


def run_file(path: Path, out: Path, *, seeds: str | None = None, jobs: int = 2) -> tuple[int, dict[str, Any]]:
    """Run the variants file ``path`` into ``out`` (``seeds``: verdict seeds over the file's):
    (exit status, the report's data with its markdown), as the benchmarks use it."""
    spec = load_spec(path)
    if seeds is not None:
        spec.seeds = parse_seeds(seeds)
    status = run_ablation(spec, out, jobs=jobs)
    doc = collect(spec, out)
    doc["markdown"] = markdown(doc)
    return status, doc


def collect(spec: Spec, out: Path) -> dict[str, Any]:
    """Everything the report shows, from the result files on disk."""
    key, name = cost_of(spec.env, spec.cost)
    doc: dict[str, Any] = {"env": spec.env, "train": spec.train, "seeds": spec.seeds,
                           "tune_seeds": spec.tune_seeds, "alpha": spec.alpha, "cost": name, "cost_key": key,
                           "variants": {}}
    per: dict[str, dict[int, dict]] = {}
    for v in spec.variants.values():
        picked = tuned(spec, v, out)
        entry: dict[str, Any] = {"set": v.set, "train": v.train, "tune": v.tune or v.tune_from,
                                 "tuning": picked[1] if picked else None,
                                 "chosen": picked[0] if picked else None}
        runs, failed = {}, {}
        if picked is not None:
            for job in verdict_jobs(spec, out, {v.name: picked[0]}):
                r = read_measured(spec, job)
                if r is not None:
                    runs[job.seed] = r
                elif (bad := read_failure(job)) is not None:
                    failed[job.seed] = bad
        per[v.name] = runs
        entry.update(results=runs, failed=failed, summary=variant_summary(spec.env, list(runs.values()), key))
        doc["variants"][v.name] = entry
    for v in spec.variants.values():
        if v.baseline is not None:
            pair = compare(spec, v, per[v.name], per[v.baseline])
            lost = len(doc["variants"][v.name]["failed"]) + len(doc["variants"][v.baseline]["failed"])
            if lost:  # failed runs are missing from the pairs: no verdict on what is left
                pair["verdict"] = f"none: {lost} failed run(s)"
            doc["variants"][v.name]["pair"] = {"baseline": v.baseline, "claim": v.claim, "expect": v.expect,
                                               "measure": v.measure, **pair}
    return doc


def _q(q, digits: int = 0) -> str:
    if any(math.isnan(x) for x in q):
        return "–"
    return f"{q[1]:,.{digits}f} [{q[0]:,.{digits}f}, {q[2]:,.{digits}f}]"


def _settings_text(entry: dict) -> str:
    parts = [f"{k}={json.dumps(v)}" for k, v in entry["set"].items()]
    if entry["train"]:
        parts.append(shlex.join(entry["train"]))
    if entry["chosen"]:
        how = "tuned" if not isinstance(entry["tune"], str) else f"as tuned for {entry['tune']}"
        parts += [f"{k}={json.dumps(v)} ({how})" for k, v in entry["chosen"].items()]
    elif entry["tune"]:
        parts.append("tuning not finished")
    return ", ".join(parts) or "–"


def variants_table(doc: dict) -> list[str]:
    env = doc["env"]
    head = ["variant", "settings (over the base)", "runs", "reached", f"iterations to target", "seconds to target",
            "final reward"]
    if env == "cartpole":
        head.insert(5, "env steps to target")
    else:
        head.insert(5, "completions to target")
        head.append("final rolling reward")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, e in doc["variants"].items():
        s = e["summary"]
        row = [name, _settings_text(e) if name != BASE else "the command's defaults" + (
            f", {_settings_text(e)}" if e["set"] or e["tune"] else ""), str(s["runs"]),
            f"{s['reached']}/{s['runs']}", _q(s["iterations_q"]), _q(s["seconds_q"], 1), _q(s["final_q"], 3)]
        if env == "cartpole":
            row.insert(5, _q(s["env_steps_q"]))
        else:
            row.insert(5, _q(s["generations_q"]))
            row.append(_q(s["final_rolling_q"], 3))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    used = "env steps, iterations" if env == "cartpole" else "iterations, completions"
    lines.append(f"Median [IQR] over the runs; a run that did not reach the target counts as the {used} "
                 "and seconds it had used when its budget ran out."
                 + (" Completions: every sampled completion, dynamic sampling's extra draws included."
                    if env == "vlm" else ""))
    return lines


def pairs_table(doc: dict) -> list[str]:
    cost = doc["cost"]
    lines = [f"| claim | variant vs baseline | seeds | sooner / later / same | median paired difference in {cost} "
             "| p (cost) | median paired difference in final reward | p (final) | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in doc["variants"].items():
        p = e.get("pair")
        if p is None:
            continue
        on = "" if p["measure"] == "cost" else " (on final reward)"
        lines.append(f"| {p['claim'] or '–'} | {name} vs {p['baseline']} | {len(p['seeds'])} | "
                     f"{p['sooner']} / {p['later']} / {p['same']} | {p['cost_median_diff']:+,.0f} | "
                     f"{p['p_cost']:.3g} | {p['final_median_diff']:+.3f} | {p['p_final']:.3g} | "
                     f"**{p['verdict']}**{on} |")
    return lines


def tuning_lines(doc: dict) -> list[str]:
    lines = []
    for name, e in doc["variants"].items():
        if not e["tuning"]:
            continue
        lines += ["", f"Tuning of {name!r} on seeds {_seeds_text(doc['tune_seeds'])}:", "",
                  f"| values | reached | {doc['cost']} median [IQR] | final reward median |",
                  "|---|---:|---:|---:|"]
        for row in e["tuning"]:
            mark = " (chosen)" if row["values"] == e["chosen"] else ""
            lines.append(f"| {_cand_name(row['values'])}{mark} | {row['reached']}/{row['runs']} | "
                         f"{_q(row['cost_q'])} | {row['final_q'][1]:.3f} |")
    return lines


def _seeds_text(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    parts, start = [], seeds[0]
    for a, b in zip(seeds, seeds[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def markdown(doc: dict) -> str:
    cost = doc["cost"]
    train = " ".join(["grpo-harness train", doc["env"], *doc["train"]])
    done = set(doc["seeds"])
    for v in doc["variants"].values():
        done &= {int(s) for s in v["results"]}
    partial = "" if done == set(doc["seeds"]) else f" (finished by every variant: {_seeds_text(sorted(done))})"
    tuned = any(v["tuning"] for v in doc["variants"].values())
    lines = [f"Runs: `{train} --seed N --threads 1` plus each variant's `--set`; verdict seeds "
             f"{_seeds_text(doc['seeds'])}{partial}; tuning seeds {_seeds_text(doc['tune_seeds'])} "
             + ("(used only to choose tuned values, never for a verdict)." if tuned else "(no variant is tuned here)."),
             "",
             f"Test: exact two-sided Wilcoxon signed-rank test of the per-seed differences (variant minus "
             f"baseline, same seed), zero differences dropped, of the {cost} to the target (censored runs "
             f"at their budget) unless the row says final reward; verdict at alpha = {doc['alpha']}: "
             "**held** (significant, in the claimed direction), **opposite** (significant, the other way), "
             "**not shown** (not significant). No correction for the number of pairs.", ""]
    failed = [f"{name} seed {seed} (exit {f['exit']}: {f['error'][:120]})"
              for name, v in doc["variants"].items() for seed, f in sorted((v.get("failed") or {}).items())]
    if failed:
        lines += [f"**{len(failed)} run(s) failed**, so the pairs they belong to give no verdict (fix the cause and "
                  "run the same command again): " + "; ".join(failed) + ".", ""]
    lines += variants_table(doc)
    lines += ["", *pairs_table(doc), *tuning_lines(doc)]
    return "\n".join(lines) + "\n"


def write_report(spec: Spec, out: Path) -> dict:
    """Write ablation.md, ablation.json and ablation.png into ``out``; returns the data."""
    from .trainlog import atomic_write

    doc = collect(spec, out)
    atomic_write(out / REPORT_JSON, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, default=str) + "\n"))
    atomic_write(out / REPORT_MD, lambda tmp: Path(tmp).write_text(markdown(doc)))
    plot(doc, out / REPORT_PNG)
    return doc


def plot(doc: dict, path: Path):
    """Per variant, every seed's cost to the target (censored runs as x at their budget) and
    final reward, with the median as a bar; a title and a legend. Returns the figure."""
    from matplotlib.figure import Figure

    from .trainlog import atomic_write

    names = list(doc["variants"])
    fig = Figure(figsize=(max(7.0, 1.1 * len(names) + 3), 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, field_, label in ((axes[0], doc["cost_key"], f"{doc['cost']} to target"),
                              (axes[1], "final", "final reward")):
        for i, name in enumerate(names):
            runs = list(doc["variants"][name]["results"].values())
            ys = [r[field_] for r in runs]
            hit = [r["reached"] or field_ == "final" for r in runs]
            jitter = [i + 0.25 * ((k * 0.618) % 1 - 0.5) for k in range(len(ys))]
            ax.scatter([x for x, h in zip(jitter, hit) if h], [y for y, h in zip(ys, hit) if h], s=14, color="C0")
            ax.scatter([x for x, h in zip(jitter, hit) if not h], [y for y, h in zip(ys, hit) if not h], s=24,
                       marker="x", color="C3")
            if ys:
                ax.hlines(quartiles(ys)[1], i - 0.3, i + 0.3, color="k", lw=2)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("to target (x: not reached, at its budget)", fontsize=9)
    axes[1].set_title("final reward", fontsize=9)
    from matplotlib.lines import Line2D

    fig.suptitle(f"ablation of {doc['env']}: {len(names)} variant(s) over seeds {_seeds_text(doc['seeds'])}",
                 fontsize=10)
    fig.legend(handles=[Line2D([], [], ls="", marker="o", ms=4, color="C0", label="one seed (reached the target)"),
                        Line2D([], [], ls="", marker="x", ms=5, color="C3", label="one seed (not reached: its budget)"),
                        Line2D([], [], color="k", lw=2, label="median")], loc="outside lower center", ncols=3,
               fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


# --- the command ------------------------------------------------------------------------------

def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="run a baseline and variants over many seeds, with paired verdicts",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("env", choices=ENVS, help="what to train (the `train` subcommand)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the ablation folder (runs, results, report); an existing one is continued")
    p.add_argument("--variants", type=Path, metavar="FILE.toml", help="named variants (format: ablate.load_spec)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="one variant per value that differs from the base's (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a GRPOConfig override of the base, hence of every variant (repeatable)")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2",
                   help="tune KEY over these values for the base and every variant, on --tune-seeds")
    p.add_argument("--seeds", metavar="LIST", help="verdict seeds, e.g. 0-19 (or the variants file's)")
    p.add_argument("--tune-seeds", metavar="LIST", help="tuning seeds, disjoint from --seeds, e.g. 100-103")
    p.add_argument("--train", metavar='"ARGS"', help='flags for every `train ENV` run, in one string: '
                   '--train "--task sequence --max-iterations 300"')
    p.add_argument("--jobs", type=int, default=2, metavar="N", help="runs at once, one thread each (default 2)")
    p.add_argument("--alpha", type=float, metavar="A", help="significance level of the verdicts (default 0.05)")
    p.add_argument("--cost", metavar="NAME",
                   help="the cost verdicts compare, samples to the target: cartpole env-steps (default) or "
                        "iterations; vlm iterations (default) or completions (dynamic sampling's extra draws "
                        "included: for variants that change how many groups are redrawn)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; run nothing")
    p.set_defaults(run=run)


def run(args) -> int:
    """``grpo-harness ablate``; exit 0 when every run is done, 1 a run failed, 2 usage, 130 stopped."""
    try:
        spec = spec_from_args(args)
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: expected >= 1")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file")
        again = shlex.join(["grpo-harness", "ablate", *sys.argv[sys.argv.index("ablate") + 1:]]) \
            if "ablate" in sys.argv else None
        return run_ablation(spec, args.out, jobs=args.jobs, report_only=args.report_only,
                            say=lambda line: print(line, flush=True), again=again)
    except UsageError as e:
        print(f"grpo-harness ablate: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
