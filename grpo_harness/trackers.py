"""Where a run's metrics go besides ``metrics.jsonl``: ``--report-to tensorboard,wandb,none``.

``metrics.jsonl`` is always written (it is the run's own record: resume, ``inspect``, plots and
ablations read it) under the harness's metric names. The trackers get every numeric value of
each record under TRL's names where the meaning is the same (``TRL_NAMES``; the README's metrics
table lists them; verl's for the engine-mismatch metrics that TRL has none for, ``VERL_NAMES``),
prefixed ``train/`` (``eval/`` for greedy evaluations), as TRL's TensorBoard and wandb callbacks
name them, against the run's x axis (the iteration for ``train vlm``, env steps for ``train
cartpole``).

- ``tensorboard`` (default): event files in ``OUT/tb``, purged from the resumed step on resume.
- ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "grpo-harness", name=<run folder name>,
  dir=OUT, config=<config.json>)``; the run id is kept in ``OUT/wandb-run-id`` so a resumed run
  continues the same wandb run. ``WANDB_MODE=offline`` logs to ``OUT/wandb`` without network
  (``wandb sync`` uploads it later). Not installed, or failing to start (e.g. no API key and
  no network): one line says so and training goes on without it.
- ``none``: no tracker (``all``: every tracker above).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .trainlog import MetricsLog

TRACKERS = ("tensorboard", "wandb")
DEFAULT_REPORT_TO = ("tensorboard",)
WANDB_ID_FILE = "wandb-run-id"
TRL_NAMES = {
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "kl": "kl",
    "entropy": "entropy",
    "clip_frac_low": "clip_ratio/low_mean",
    "clip_frac_high": "clip_ratio/high_mean",
    "completion_len_mean": "completions/mean_length",
    "truncated_frac": "completions/clipped_ratio",
    "lr": "learning_rate",
    "eval_reward_mean": "eval/reward",
}
"""Harness metric -> TRL's name for it (GRPOTrainer's logged metrics). ``reward/<fn>`` maps to
``rewards/<fn>/mean``; ``loss``, ``policy_loss`` and ``grad_norm`` already share TRL's names."""
VERL_NAMES = {
    "mismatch_kl": "rollout_corr/k3_kl",
    "is_ratio_min": "rollout_corr/rollout_is_min",
    "is_ratio_mean": "rollout_corr/rollout_is_mean",
    "is_ratio_max": "rollout_corr/rollout_is_max",
    "is_masked_frac": "rollout_corr/rollout_rs_masked_fraction",
}
"""The engine-mismatch metrics (``grpo_core.losses.engine_correction``) that TRL logs under no
name of the same meaning, under verl's (``verl/trainer/ppo/rollout_corr_helper.py``): the k3
estimate of KL(engine || trainer) over the sampled tokens; the token ratio trainer / engine
before any truncation (verl's ``rollout_is_*`` at ``rollout_is="token"``); the share of valid
tokens a masking correction removed. TRL's ``sampling/importance_sampling_ratio/*`` is the ratio
after its truncation or masking, and ``sampling/sampling_logp_difference/*`` the |log-prob gap|,
neither computed here; ``is_truncated_frac`` and ``is_masked_seq_frac`` (rows whose every token
was masked; verl's sequence share counts a row with any masked token) keep their names."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_report_to(text: str) -> tuple[str, ...]:
    """argparse type of ``--report-to``: ``"tensorboard,wandb"`` -> ("tensorboard", "wandb");
    ``none`` -> (); ``all`` -> every tracker."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    valid = (*TRACKERS, "none", "all")
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(valid)}")
    if ("none" in names or "all" in names) and len(names) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: 'none' and 'all' stand alone")
    if names == ["all"]:
        return TRACKERS
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def tracker_tag(key: str) -> str:
    """The tracker name of a metrics.jsonl key: ``reward_mean`` -> ``train/reward``,
    ``reward/fmt`` -> ``train/rewards/fmt/mean``, ``eval_reward_mean`` -> ``eval/reward``,
    anything else ``train/<key>`` (``eval/<key>`` for ``eval_...``)."""
    name = TRL_NAMES.get(key) or VERL_NAMES.get(key)
    if name is None and key.startswith("reward/"):
        name = f"rewards/{key[len('reward/'):]}/mean"
    if name is not None and name.startswith("eval/"):
        return name
    return f"{'eval' if key.startswith('eval_') else 'train'}/{name or key}"


def tracker_scalars(record: dict[str, Any], x_key: str) -> dict[str, float]:
    """Every numeric value of ``record`` but the x axis, under its tracker name."""
    return {tracker_tag(k): v for k, v in record.items() if _is_number(v) and k != x_key}


class TrackedMetricsLog(MetricsLog):
    """``MetricsLog`` (metrics.jsonl, TensorBoard when asked) with TRL's names for the trackers
    and a wandb run when asked."""

    def __init__(self, out: Path, *, x_key: str, purge_step: int | None, writes: bool,
                 report_to: tuple[str, ...], wandb_run=None):
        super().__init__(out, x_key=x_key, purge_step=purge_step, tensorboard="tensorboard" in report_to,
                         writes=writes)
        self.report_to = report_to
        self.wandb = wandb_run

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record[self.x_key])
        scalars = tracker_scalars(record, self.x_key)
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        super().close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def open_metrics_log(out: Path, *, x_key: str, purge_step: int | None, writes: bool,
                     report_to: tuple[str, ...] | None, config: dict[str, Any], resumed: bool,
                     say) -> TrackedMetricsLog:
    """The run's metrics log with the ``--report-to`` trackers (None: the default)."""
    report_to = DEFAULT_REPORT_TO if report_to is None else tuple(report_to)
    run = open_wandb(Path(out), config=config, resumed=resumed, say=say) \
        if "wandb" in report_to and writes else None
    return TrackedMetricsLog(out, x_key=x_key, purge_step=purge_step, writes=writes, report_to=report_to,
                             wandb_run=run)


def open_wandb(out: Path, *, config: dict[str, Any], resumed: bool, say):
    """A wandb run for the run folder ``out`` (module docstring), or None after one line
    saying why not."""
    try:
        import wandb
    except ImportError:
        say("--report-to wandb: wandb is not installed (pip install wandb); going on without it "
            "(metrics.jsonl has every metric)")
        return None
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(4)
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo-harness"), name=out.name, dir=str(out),
                         id=run_id, resume="allow", config=config)
    except Exception as e:  # noqa: BLE001 - no API key, no network, a bad setting
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        say(f"--report-to wandb: wandb did not start ({type(e).__name__}: {first[:160]}); going on without "
            "it (WANDB_MODE=offline logs without network)")
        return None
    id_file.write_text(run_id + "\n")
    return run
