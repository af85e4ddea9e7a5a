"""``grpo-harness inspect RUN_DIR``: what a person wants first from a run folder.

Read from ``config.json``, ``metrics.jsonl`` and ``completions.jsonl`` (nothing is loaded into
torch), it prints:

- the settings that differ from the command's defaults (``train vlm`` / ``train cartpole`` with
  no flags), section by section, and the notes the run printed at its start (an objective other
  than GRPO's, a precision whose updates round away);
- the last value and the best value (with its iteration) of the main metrics;
- where the reward curve plateaued (``plateau``);
- the share of groups without signal over time (``zero_signal_groups`` over the iteration's
  groups, in up to ``BINS`` spans of iterations);
- the minibatch updates skipped for lack of signal (``skip_zero_grad_steps``);
- the latest sample completions (``train vlm``'s completions log).

``--plot [FILE]`` also draws reward, zero-signal share, KL / entropy and gradient norm against
the iteration into FILE (default ``RUN_DIR/inspect.png``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from .run import CONFIG_FILE, TRAIN_COMMANDS, UsageError

BINS = 8
PLATEAU_TOL = 0.05
"""A plateau: the rolling mean stays within this share of the curve's range of its final value."""
REWARD_KEYS = ("reward_mean", "mean_return")
"""The reward curve: the first of these a run's records have."""
BEST_KEYS = ("reward_mean", "reward_rolling", "eval_reward_mean", "mean_return", "eval_mean")
LAST_KEYS = (*BEST_KEYS, "frac_reward_zero_std", "zero_signal_groups", "kl", "entropy", "loss", "grad_norm",
             "completion_len_mean", "truncated_frac", "lr", "env_steps", "wall_time")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="summarise a run folder: config diff, metrics, plateau, zero-signal "
                       "groups, skipped steps, sample completions",
                       description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (train's --out)")
    p.add_argument("--plot", nargs="?", const="", metavar="FILE.png",
                   help="also write the curves, as PNG or the format the suffix names (.pdf, .svg, .jpg...; "
                   "default RUN_DIR/inspect.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Print the summary of ``args.run_dir``; 0, or 2 (one line) when it is not a run folder."""
    try:
        doc, records, samples = load_run(Path(args.run_dir))
    except UsageError as e:
        print(f"grpo-harness inspect: error: {e}", file=sys.stderr)
        return 2
    print(summary(doc, records, samples, Path(args.run_dir)))
    if args.plot is not None:
        path = Path(args.plot) if args.plot else Path(args.run_dir) / "inspect.png"
        try:
            plot_run(records, doc, path)
        except UsageError as e:
            print(f"grpo-harness inspect: error: {e}", file=sys.stderr)
            return 2
        print(f"plot: {path}")
    return 0


def load_run(path: Path) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """(config.json, metrics records, completions records) of a run folder."""
    from .completions import COMPLETIONS_FILE, read_records
    from .trainlog import METRICS_FILE, read_metrics

    if not path.is_dir():
        raise UsageError(f"{path} is not a folder")
    config = path / CONFIG_FILE
    if not config.is_file():
        raise UsageError(f"{path} holds no {CONFIG_FILE}: not a run folder")
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{config} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("grpo"), dict):
        raise UsageError(f"{config} is not a run config (no 'grpo' section)")
    return doc, read_metrics(path / METRICS_FILE), read_records(path / COMPLETIONS_FILE)


def summary(doc: dict[str, Any], records: list[dict], samples: list[dict], path: Path) -> str:
    """The whole printout (module docstring), as text."""
    from .completions import format_table, latest

    task = doc.get("task") or {}
    what = task.get("name") or task.get("env_id") or ""
    lines = [f"run {path}: {doc.get('env', '?')} {what}".rstrip() + f", {len(records)} iteration(s) logged"]
    lines += ["", "settings that differ from the defaults:", *(f"  {d}" for d in config_diff(doc) or ["(none)"])]
    notes = [n for n in doc.get("notes") or [] if isinstance(n, str)]
    if notes:  # what the run said at its start: an objective other than GRPO's, a precision that stalls
        lines += ["", "said at the start of the run:", *(f"  {n}" for n in notes)]
    if records:
        lines += ["", *metric_lines(records), "", plateau_line(records, doc), *zero_signal_lines(records, doc),
                  skipped_line(records, doc)]
    last = latest(samples)
    lines += ["", format_table(last, stream=sys.stdout) if last else
              "sample completions: none logged (train vlm logs them every --completions-every iterations)"]
    return "\n".join(lines)


# --- settings -----------------------------------------------------------------------------------

def command_defaults(env: str) -> dict[str, dict[str, Any]]:
    """The settings a ``train ENV`` with no flags starts from, by config.json section."""
    from grpo_core.config import GRPOConfig

    from .run import TrainingRun

    if env not in TRAIN_COMMANDS:
        return {}
    module = importlib.import_module(TRAIN_COMMANDS[env])
    runs = [c for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, TrainingRun) and c.env == env]
    grpo = {f.name: f.default for f in dataclasses.fields(GRPOConfig)
            if f.default is not dataclasses.MISSING}
    out = {"grpo": {**grpo, **(runs[0].DEFAULTS["grpo"] if runs else {})},
           "train": dict(runs[0].DEFAULTS["train"]) if runs else {}}
    for section, name in (("task", "TASK_DEFAULTS"), ("model", "MODEL_DEFAULTS")):
        out[section] = dict(getattr(module, name, {}))
    return out


def config_diff(doc: dict[str, Any]) -> list[str]:
    """``section.key = value (default X)`` for every setting with a known default that differs."""
    defaults = command_defaults(doc.get("env", ""))
    out = []
    for section, values in doc.items():
        known = defaults.get(section)
        if not isinstance(values, dict) or not known:
            continue
        for key, value in values.items():
            if key in known and value != known[key]:
                out.append(f"{section}.{key} = {json.dumps(value)} (default {json.dumps(known[key])})")
    return out


# --- metrics -----------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _values(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(iteration, value) of every record with a finite number under ``key``."""
    return [(r.get("iteration", i), float(r[key])) for i, r in enumerate(records)
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])]


def metric_lines(records: list[dict]) -> list[str]:
    """Last value of each main metric (the last record holding it) and the best of the rewards."""
    from .trackers import tracker_tag

    final = records[-1].get("iteration", len(records) - 1)
    lines = [f"metrics (last iteration {final}; the TRL name in brackets where it differs):"]
    for key in LAST_KEYS:
        seen = _values(records, key)
        if not seen:
            continue
        it, last = seen[-1]
        tag = tracker_tag(key)
        short = tag.split("/", 1)[1]
        name = key if short == key else f"{key} ({tag.removeprefix('train/')})"
        text = f"  {name:<46} last {_fmt(last)}" + (f" (iteration {it})" if it != final else "")
        if key in BEST_KEYS:
            best_it, best = max(seen, key=lambda p: p[1])
            text += f", best {_fmt(best)} at iteration {best_it}"
        lines.append(text)
    return lines


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), each an exact sum
    (no running total whose rounding would make a flat curve look noisy)."""
    return [math.fsum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def plateau(values: list[float], window: int, tol: float = PLATEAU_TOL) -> int | None:
    """Index from which the rolling mean (``window``) stays within ``tol`` times its range of its
    final value; None when that span is shorter than ``window`` (the curve is still moving).
    A curve whose rolling mean never changes is flat from index 0.

    Shapes: values (n,) -> index in [0, n) or None."""
    if not values:
        return None
    roll = rolling_mean(values, window)
    final, span = roll[-1], max(roll) - min(roll)
    start = len(roll)
    while start > 0 and abs(roll[start - 1] - final) <= tol * span:
        start -= 1
    return start if len(roll) - start >= window else None


def plateau_line(records: list[dict], doc: dict[str, Any]) -> str:
    key = next((k for k in REWARD_KEYS if _values(records, k)), None)
    if key is None:
        return "plateau: no reward metric in the records"
    its, ys = zip(*_values(records, key))
    window = int((doc.get("train") or {}).get("window") or 10)
    start = plateau(list(ys), window)
    roll = rolling_mean(list(ys), window)
    if start is None:
        return (f"plateau: none yet: the rolling mean of {key} ({window} iterations) still moves by more than "
                f"{PLATEAU_TOL:g} of its range in the last {window} iterations (now {roll[-1]:.4g})")
    return (f"plateau: the rolling mean of {key} ({window} iterations) stays within {PLATEAU_TOL:g} of its range "
            f"({max(roll) - min(roll):.3g}) of its final {roll[-1]:.4g} from iteration {its[start]} on "
            f"({len(ys) - start} of {len(ys)} iterations)")


def zero_signal_lines(records: list[dict], doc: dict[str, Any]) -> list[str]:
    """The share of groups with no signal, per span of iterations."""
    groups = int(doc["grpo"].get("groups_per_iteration") or 1)
    seen = _values(records, "zero_signal_groups")
    if not seen:
        return ["zero-signal groups: not in the records"]
    size = max(1, math.ceil(len(seen) / BINS))
    spans = [seen[i:i + size] for i in range(0, len(seen), size)]
    parts = [f"{s[0][0]}{'' if len(s) == 1 else f'-{s[-1][0]}'}: {sum(v for _, v in s) / (len(s) * groups):.2f}"
             for s in spans]
    mean = sum(v for _, v in seen) / (len(seen) * groups)
    return [f"zero-signal groups (share of the {groups} groups per iteration; mean {mean:.2f}, last "
            f"{seen[-1][1] / groups:.2f}):", "  " + " | ".join(parts)]


def skipped_line(records: list[dict], doc: dict[str, Any]) -> str:
    g = doc["grpo"]
    per_iteration = int(g.get("grpo_epochs") or 1) * int(g.get("minibatches") or 1)
    seen = _values(records, "skipped_steps")
    skipped = [(it, v) for it, v in seen if v > 0]
    if not skipped:
        return f"skipped steps: none of {len(seen) * per_iteration} minibatch updates"
    total = sum(v for _, v in skipped)
    return (f"skipped steps: {total:g} of {len(seen) * per_iteration} minibatch updates "
            f"({total / (len(seen) * per_iteration):.1%}) in {len(skipped)} iteration(s), the last at "
            f"iteration {skipped[-1][0]} (no signal in the minibatch: skip_zero_grad_steps)")


# --- the plot -----------------------------------------------------------------------------------

def plot_run(records: list[dict], doc: dict[str, Any], path: Path):
    """Four panels against the iteration: reward (rolling mean, evaluations), zero-signal share
    (two measures, told apart when they coincide), KL and entropy (a note when there is no KL
    term), gradient norm with the skipped updates on their own axis. Returns the figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    window = int((doc.get("train") or {}).get("window") or 10)
    groups = int(doc["grpo"].get("groups_per_iteration") or 1)
    key = next((k for k in REWARD_KEYS if _values(records, k)), None)
    if key is not None:
        its, ys = zip(*_values(records, key))
        axes[0].plot(its, ys, lw=0.6, alpha=0.4, color="C0", label=key)
        axes[0].plot(its, rolling_mean(list(ys), window), lw=1.6, color="C0", label=f"rolling mean ({window})")
        start = plateau(list(ys), window)
        if start is not None:
            axes[0].axvline(its[start], ls=":", color="C2", label=f"plateau from {its[start]}")
    for ev in ("eval_reward_mean", "eval_mean"):
        if _values(records, ev):
            axes[0].plot(*zip(*_values(records, ev)), "o", ms=3, color="C1", label=ev)
    zero = [(i, y / groups) for i, y in _values(records, "zero_signal_groups")]
    same = zero == _values(records, "frac_reward_zero_std")
    _series(axes[1], [(k, s) for k, s in (("zero_signal_groups", 1 / groups), ("frac_reward_zero_std", 1.0))],
            records, "share of groups", ("zero-signal groups", "reward std 0" + (" (the same values)" if same else "")),
            styles=({"lw": 2.4, "alpha": 0.5}, {"lw": 1.0, "ls": "--", "marker": ".", "ms": 3}))
    _series(axes[2], [("kl", 1.0), ("entropy", 1.0)], records, "nats", ("kl", "entropy"))
    beta = doc["grpo"].get("beta")
    if beta == 0 or not _values(records, "kl"):
        axes[2].text(0.5, 0.9, "no KL term (beta = 0)" if beta == 0 else "KL not logged",
                     transform=axes[2].transAxes, ha="center", fontsize="small", color="0.4")
    _series(axes[3], [("grad_norm", 1.0)], records, "grad norm", ("grad norm",))
    skipped = axes[3].twinx()
    _series(skipped, [("skipped_steps", 1.0)], records, "skipped updates", ("skipped updates",),
            styles=({"color": "C3", "lw": 1.0, "ls": ":"},))
    handles = [h for ax in (axes[3], skipped) for h in ax.get_legend_handles_labels()[0]]
    for ax, title in zip(axes, ("reward", "groups without signal", "KL and entropy", "gradient")):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax is axes[3] and handles:
            ax.legend(handles, [h.get_label() for h in handles], fontsize="small")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes[2:]:
        ax.set_xlabel("iteration")
    save_figure(fig, Path(path), "--plot")
    return fig


def save_figure(fig, path: Path, option: str) -> None:
    """Write ``fig`` to ``path`` in the format its suffix names (png without one), atomically;
    UsageError in one line for a folder, an unknown format or a path that cannot be written."""
    from .trainlog import atomic_write

    fmt = path.suffix.lower().lstrip(".") or "png"
    formats = fig.canvas.get_supported_filetypes()
    if fmt not in formats:
        raise UsageError(f"{option} {path}: matplotlib writes {', '.join(sorted(formats))}, not {fmt!r}")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name such as {path / 'inspect.png'}")
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100))
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write it: {e.strerror or e}") from None


def _series(ax, keys, records, ylabel: str, labels, styles=None) -> None:
    for k, ((key, scale), label) in enumerate(zip(keys, labels)):
        seen = _values(records, key)
        if seen:
            its, ys = zip(*seen)
            style = {"lw": 1.0, **((styles or [{}] * len(keys))[k])}
            ax.plot(its, [y * scale for y in ys], label=label, **style)
    ax.set_ylabel(ylabel)
