"""Run outputs of ``grpo-harness train``: metrics.jsonl, TensorBoard scalars, progress, curve.

Everything here is bookkeeping around a training run; none of it touches the GRPO math.
Heavy imports (tqdm, tensorboard, matplotlib) happen inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"
TB_DIR = "tb"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write, *, keep_previous: Path | None = None) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place.

    A reader (or a run killed half-way) sees either the old file or the complete new one. The
    file gets the mode a plain ``open`` would give it (0666 less the umask), not the temporary
    file's 0600. ``keep_previous``: first move the current ``path`` there (a killed run then
    leaves at least one complete file of the two).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (a killed run) is skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def drop_records_from(path: Path, iteration: int) -> int:
    """Remove the records of iterations >= ``iteration`` (and torn lines); return how many.

    Used on resume when a run died after its last checkpoint: the resumed run regenerates
    those iterations, so the file would otherwise hold them twice. Earlier lines are kept
    byte for byte; the file is left untouched when there is nothing to drop.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(record.get("iteration", -1)) >= iteration:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
    return dropped


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLog:
    """Appends one JSON line per iteration to metrics.jsonl and tags the numeric values in
    TensorBoard against ``record[x_key]``. ``purge_step``: on resume, the first x the new
    session writes (TensorBoard drops what an earlier session logged from there on).
    ``writes=False`` (a non-writing rank) makes every method a no-op."""

    def __init__(self, out: Path, *, x_key: str = "env_steps", purge_step: int | None = None,
                 tensorboard: bool = True, writes: bool = True):
        self.path = Path(out) / METRICS_FILE
        self.x_key = x_key
        self._file = open(self.path, "a", encoding="utf-8") if writes else None
        self._tb = None
        if tensorboard and writes:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / TB_DIR), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record[self.x_key])
            for key, value in record.items():
                if _is_number(value) and key != self.x_key:
                    group = "eval" if key.startswith("eval_") else "train"
                    self._tb.add_scalar(f"{group}/{key}", value, global_step=step)

    def flush(self) -> None:
        """Put every metrics line and TensorBoard point written so far on disk (before a
        checkpoint: a crash then cannot leave a checkpoint newer than the metrics it belongs to)."""
        if self._file is not None and not self._file.closed:
            self._file.flush()
            try:
                os.fsync(self._file.fileno())
            except OSError:  # a file system without fsync: the flush is what it gets
                pass
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


class BarWriter:
    """Lines go through the tqdm bar when there is one (``self.bar``), else plainly to
    ``self.stream``; shared by the CartPole and VLM progress displays."""

    bar = None
    stream: IO[str] = sys.stderr

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Progress(BarWriter):
    """A tqdm bar over env steps when ``stream`` is a terminal; otherwise plain log lines, one
    per evaluation and one every ``every`` iterations."""

    def __init__(self, total: int, initial: int = 0, *, every: int = 10, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.last_eval: float | None = None
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", unit_scale=True,
                            dynamic_ncols=True, file=self.stream, desc="env steps")

    def update(self, record: dict[str, Any], steps: int, steps_per_s: float) -> None:
        evaluated = "eval_mean" in record
        if evaluated:
            self.last_eval = record["eval_mean"]
        if self.bar is not None:
            self.bar.set_postfix({"it": record["iteration"], "return": _fmt(record.get("mean_return")),
                                  "eval": _fmt(self.last_eval), "kl": _fmt(record.get("kl"), ".2g"),
                                  "steps/s": _fmt(steps_per_s, ".0f")}, refresh=False)
            self.bar.update(steps)
        elif evaluated or (record["iteration"] + 1) % self.every == 0:
            ev = (f"{record['eval_mean']:.1f} +- {record['eval_std']:.1f}" if evaluated
                  else f"{_fmt(self.last_eval)} (last)")
            self.write(f"it {record['iteration']:>5} | env steps {record['env_steps']:>9,} | "
                       f"return {_fmt(record.get('mean_return'))} | eval {ev} | "
                       f"kl {_fmt(record.get('kl'), '.3g')} | {steps_per_s:,.0f} steps/s | "
                       f"{record['wall_time']:.1f} s")




def plot_curve(records: Iterable[dict[str, Any]], path: Path, *, threshold: float,
               solved_env_steps: int | None = None, title: str = "CartPole-v1 GRPO",
               max_return: float | None = 500.0):
    """Training mean return vs env steps, greedy evaluations marked (mean ± std, the band cut
    at 0 and at ``max_return``, the most an episode can return), the solved threshold.
    Returns the figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    records = list(records)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = [r["env_steps"] for r in records]
    y = [r.get("mean_return", float("nan")) for r in records]
    ax.plot(x, y, lw=1.2, color="C0", label="training mean return")
    evals = [r for r in records if "eval_mean" in r]
    if evals:
        means, stds = [r["eval_mean"] for r in evals], [r.get("eval_std", 0.0) for r in evals]
        top = max_return if max_return is not None else math.inf
        below = [min(sd, max(m, 0.0)) for m, sd in zip(means, stds)]
        above = [min(sd, max(top - m, 0.0)) for m, sd in zip(means, stds)]
        ax.errorbar([r["env_steps"] for r in evals], means, yerr=[below, above], fmt="o", ms=4, capsize=2,
                    color="C1", label="greedy eval mean ± std")
    ax.axhline(threshold, ls="--", color="C2", label=f"solved threshold ({threshold:g})")
    if solved_env_steps is not None:
        ax.axvline(solved_env_steps, ls=":", color="C2", label=f"solved at {solved_env_steps:,} steps")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_ylim(0, max(520.0, threshold * 1.1))
    if x:
        ax.set_xlim(0, max(x) * 1.02 or 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return fig
