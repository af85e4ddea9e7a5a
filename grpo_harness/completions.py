"""Sample completions of ``train vlm``: ``completions.jsonl`` in the run folder and a short
table in the progress output, to answer "why is the reward spread (and the loss) zero?".

Every ``--completions-every K`` iterations (iterations K-1, 2K-1, ...) and for the last
iteration of a session, one JSON line per group of that iteration's rollout (its first draw, the
one ``zero_signal_groups`` counts)::

    {"iteration": 9, "group": 0, "prompt": ..., "answer": ..., "reward_mean": 0.5,
     "reward_std": 0.53, "scored": 8, "signal": true,
     "completions": [{"text": "red", "reward": 1.0, "scores": {"first_word_reward": 1.0}}, ...]}

``prompt`` and the row's other JSON-able columns (not the image) come from the dataset row;
``completions`` are the first ``--completions-per-group`` of the group's G samples (sampled, so
in no particular order), each with its reward (the sum of its rewards at valid steps; None when
the sample is masked out) and every reward function's raw score. ``reward_mean`` and
``reward_std`` are over all the group's scored samples (std with Bessel's correction, as the
``reward_std`` metric and TRL; 0 with one sample; mean None with none). ``signal``: some valid
advantage of the group is non-zero (``group_advantages`` with the run's settings), i.e. the group
moves the policy; it is false for exactly the groups ``zero_signal_groups`` counts.

``frac_reward_zero_std`` (a metric of every iteration): the share of groups whose scored
rewards are all equal, a group with fewer than two scored samples counting as equal. TRL's metric
of that name is the same share with ``isclose(std, 0)``, and leaves a group of one out.

On resume the lines past the checkpoint are dropped with the metrics lines (``grpo_harness.run``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

COMPLETIONS_FILE = "completions.jsonl"
RESERVED = ("iteration", "group", "reward_mean", "reward_std", "scored", "signal", "completions")
"""Keys of a log line; a dataset column of the same name is left out of it."""
TEXT_WIDTH = 48
"""Characters of a completion shown in the progress table (the file keeps the whole text)."""


# --- per-sample and per-group numbers ------------------------------------------------------------

def reward_totals(rewards, mask) -> list[float | None]:
    """Each sample's reward: the sum of its rewards at valid steps (the outcome reward, or the
    process rewards' sum), None when no step is valid (masked out).

    Shapes: rewards, mask (N, T) -> list of N."""
    valid = mask.bool()
    sums = (rewards.double() * valid).sum(1)
    return [float(s) if bool(v.any()) else None for s, v in zip(sums, valid)]


def group_stats(values: list[float | None]) -> tuple[float | None, float, int]:
    """(mean, std with Bessel's correction, count) of the scored values of one group; std 0
    with fewer than two, mean None with none."""
    scored = [v for v in values if v is not None]
    n = len(scored)
    if not n:
        return None, 0.0, 0
    mean = math.fsum(scored) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in scored) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def frac_reward_zero_std(totals: list[float | None], group_size: int) -> float:
    """Share of groups whose scored rewards are all equal (fewer than two count as equal)."""
    groups = [totals[b:b + group_size] for b in range(0, len(totals), group_size)]
    flat = [len({v for v in g if v is not None}) <= 1 for g in groups]
    return sum(flat) / len(flat)


def signal_groups(adv, mask, group_size: int) -> list[bool]:
    """Per group: some valid advantage is non-zero. Shapes: adv, mask (N, T) -> list of B."""
    moving = (adv != 0) & mask.bool()
    return [bool(x) for x in moving.reshape(-1, group_size * adv.shape[1]).any(1)]


# --- recording the rollouts --------------------------------------------------------------------

class CompletionRecorder:
    """Wraps ``adapter.collect`` (an instance attribute: draws of dynamic sampling and the
    preflight are not seen) and keeps what the log needs of the latest rollout: texts,
    rewards, scores, signal, the dataset rows' indices."""

    def __init__(self, adapter, config):
        self.adapter = adapter
        self.config = config
        self.last: dict[str, Any] | None = None

    def install(self) -> None:
        original = self.adapter.collect

        def collect(*, num_groups: int, group_size: int, iteration: int, **share):
            rollout = original(num_groups=num_groups, group_size=group_size, iteration=iteration, **share)
            if not share:  # a data-parallel rank's share (first_group=, total_groups=): not logged
                self.last = self.summarise(rollout, iteration, num_groups, group_size)
            return rollout

        self.adapter.collect = collect

    def summarise(self, rollout, iteration: int, num_groups: int, group_size: int) -> dict[str, Any]:
        from grpo_core.advantages import group_advantages

        cfg = self.config
        adv = group_advantages(rollout.rewards, rollout.mask, group_size, gamma=cfg.gamma, scale=cfg.scale,
                               stats_over=cfg.stats_over, eps=cfg.adv_eps, scored=rollout.scored)
        inputs = rollout.inputs
        return {"iteration": iteration, "group_size": group_size,
                "indices": list(self.adapter.prompt_indices(iteration, num_groups)),
                "texts": list(inputs["completions"]), "scores": dict(inputs.get("reward_scores") or {}),
                "totals": reward_totals(rollout.rewards, rollout.mask),
                "signal": signal_groups(adv, rollout.mask, group_size)}

    def of(self, iteration: int) -> dict[str, Any] | None:
        """The summary of ``iteration``'s rollout, None when the latest is another's."""
        return self.last if self.last is not None and self.last["iteration"] == iteration else None

    def records(self, iteration: int, per_group: int) -> list[dict[str, Any]]:
        """The log lines of ``iteration`` (module docstring); [] when it was not recorded."""
        s = self.of(iteration)
        if s is None:
            return []
        g = s["group_size"]
        out = []
        for b, index in enumerate(s["indices"]):
            rows = range(b * g, (b + 1) * g)
            mean, std, count = group_stats([s["totals"][n] for n in rows])
            shown = [{"text": s["texts"][n], "reward": s["totals"][n],
                      "scores": {k: v[n] for k, v in s["scores"].items()}} for n in list(rows)[:per_group]]
            out.append({"iteration": iteration, "group": b, **row_columns(self.adapter.dataset[index]),
                        "reward_mean": mean, "reward_std": std, "scored": count, "signal": s["signal"][b],
                        "completions": shown})
        return out


def row_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The prompt and the JSON-able columns of a dataset row (never the image)."""
    out = {"prompt": _jsonable(row.get("prompt"))}
    for key, value in row.items():
        if key not in ("image", "images", "prompt") and key not in RESERVED:
            out[key] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)[:200]


# --- the file --------------------------------------------------------------------------------------

def append_records(out: Path, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to ``out/completions.jsonl`` (NaN-free JSON, one object a line)."""
    if records:
        with open(Path(out) / COMPLETIONS_FILE, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a completions.jsonl file (a torn last line skipped)."""
    from .trainlog import read_metrics

    return read_metrics(path)


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the last logged iteration."""
    if not records:
        return []
    last = max(r["iteration"] for r in records)
    return [r for r in records if r["iteration"] == last]


# --- the table -------------------------------------------------------------------------------------

def prompt_text(prompt: Any) -> str:
    """The text of a prompt: itself, or the text parts of its chat messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(p.get("text", "") for m in prompt if isinstance(m, dict)
                        for p in (m.get("content") if isinstance(m.get("content"), list)
                                  else [{"text": str(m.get("content", ""))}])
                        if isinstance(p, dict) and p.get("text")).strip()
    return str(prompt)


def _clip(text: Any, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _reward(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_rows(records: list[dict[str, Any]], *, text_width: int = TEXT_WIDTH) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the table: one row per group."""
    extra = [k for k in records[0] if k not in RESERVED and k != "prompt"] if records else []
    header = ["group", "prompt", *extra, "reward mean ± std", "signal", "completions (reward)"]
    rows = []
    for r in records:
        shown = " | ".join(f"{_clip(c['text'], text_width)!r} {_reward(c['reward'])}" for c in r["completions"])
        spread = f"{_reward(r['reward_mean'])} ± {r['reward_std']:.2f}"
        rows.append([str(r["group"]), _clip(prompt_text(r["prompt"]), 32), *(_clip(r.get(k), 16) for k in extra),
                     spread, "yes" if r["signal"] else "NO", shown])
    return header, rows


def format_plain(records: list[dict[str, Any]]) -> str:
    """The table as aligned plain text (for logs and pipes)."""
    if not records:
        return "no sample completions logged"
    header, rows = table_rows(records)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [f"sample completions of iteration {records[0]['iteration']}:"]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)


def format_rich(records: list[dict[str, Any]], width: int = 120) -> str:
    """The table drawn by ``rich`` (with terminal colours), as a string."""
    import io

    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(records)
    table = Table(title=f"sample completions of iteration {records[0]['iteration']}", title_justify="left")
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row[:-2], row[-2] if row[-2] == "yes" else f"[bold red]{row[-2]}[/]", row[-1])
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=True).print(table)
    return buf.getvalue().rstrip("\n")


def format_table(records: list[dict[str, Any]], stream=None) -> str:
    """A rich table when ``stream`` (default stderr) is a terminal and rich is installed, else
    plain text."""
    stream = stream if stream is not None else sys.stderr
    if records and getattr(stream, "isatty", lambda: False)():
        try:
            import shutil

            return format_rich(records, width=shutil.get_terminal_size().columns)
        except ImportError:
            pass
    return format_plain(records)
