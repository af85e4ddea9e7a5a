"""One training run of ``grpo-harness train``: what every train command shares, written once.

A command (``train cartpole``, ``train vlm``, later the distributed launch) says *what* to train
by subclassing ``TrainingRun`` and filling in its hooks (build the trainer, turn a step's stats
into a metrics record, say when to stop, draw the curve). This module owns the rest:

Run folder (``--out``)
    Checked before anything is written (a file, or a path under a file, is refused; an existing
    run is refused without ``--resume``), created on the first write, and removed again when
    the command fails or is interrupted before its first iteration completed, so a mistake
    never leaves a half-made run folder. One process writes it: the writer holds an OS lock on
    ``.lock`` (``grpo_harness.folder_lock``; the kernel releases it when the process ends, so a
    killed run leaves none behind), and a second ``train`` on the folder, new or ``--resume``, is
    refused naming the holder. A full disk stops the run in one line (``NoSpace``): what was
    kept, and the resume command. It receives ``config.json`` (the resolved settings),
    ``metrics.jsonl``, the ``--report-to`` trackers' files (TensorBoard scalars in ``tb/`` by
    default; ``grpo_harness.trackers``), ``checkpoint.pt`` (and the one before it,
    ``checkpoint.prev.pt``), ``curve.png``, and for ``train vlm`` ``completions.jsonl``
    (``grpo_harness.completions``), whose lines past the checkpoint a resume drops as it does
    the metrics lines.
Configuration, lowest to highest precedence
    the command's defaults (``DEFAULTS["grpo"]`` over GRPOConfig's); ``--config FILE`` (TOML or
    JSON: a flat table of GRPOConfig keys, or the sectioned form ``config.json`` is written in,
    whose ``grpo`` and ``train`` sections are read); ``--set KEY=VALUE`` (a GRPOConfig key; VALUE
    is a JSON literal when it parses, else a string); ``--seed N``. Training options (budget,
    cadences) are flags. A non-finite float (``--set lr=Infinity``, ``nan`` in a file) is refused.
Checkpoints
    The state after the last completed iteration: trainer (policy, reference, optimizer; with
    frozen parameters, e.g. LoRA, only the trainable tensors: the frozen ones come from the
    model on resume), the command's progress counters, every global RNG stream, and the run's
    fingerprint. Written every ``--checkpoint-every`` iterations, every ``--checkpoint-minutes``
    minutes and at the end (also on Ctrl-C, SIGTERM and an exception), atomically; the previous
    file is kept as ``checkpoint.prev.pt``. While training, a CPU copy of that state is held
    (``TrainingRun.capture``) when it is at most ``SNAPSHOT_LIMIT_BYTES``, so that a signal or
    an exception in the middle of an iteration can still save the last completed one.
Signals
    SIGINT (Ctrl-C) and SIGTERM (what schedulers send before a kill) do the same: the current
    iteration is abandoned (when a snapshot is held; otherwise finished first, and a second
    signal abandons it), the checkpoint and the curve are written, the resume command is
    printed, and the exit status is 130 or 143. Further signals while saving print a note and
    change nothing.
Resume (``--resume --out DIR``)
    Settings come from ``DIR/config.json``; ``--config``/``--set``/``--seed`` must agree with
    them, and training options may change except the command's ``FIXED_TRAIN`` ones. Every
    checkpoint carries the fingerprint of its run (config, fixed options, task, model): one that
    differs from the folder's is refused, naming the differences. A checkpoint that does not
    restore (it does not load; a NaN or an infinity in a tensor; a tensor missing, unknown or of
    another shape; a part missing; an iteration counter that disagrees with metrics.jsonl) is
    named with its reason in one line and the previous one is used. Only then are the metrics
    lines past the checkpoint dropped and regenerated; TensorBoard purges from the next step.
Writer rank
    Every file write goes through ``RunFolder.writes``. Under ``torchrun`` (``grpo_harness.launch``)
    it is False on every rank but 0, which alone writes files and progress lines; decisions that
    must agree across ranks (checkpoint now, keep CPU snapshots) are rank 0's (``agree``). A
    checkpoint records the world size that wrote it and loads at any other.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .exits import EXIT_FAILED, EXIT_USAGE, one_line
from .folder_lock import LOCK_FILE, FolderBusy, FolderLock
from .trackers import parse_report_to
from .trainlog import atomic_write

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
CHECKPOINT_FORMAT = 2
SNAPSHOT_LIMIT_BYTES = 1 << 30
"""Largest trainer state that is copied to CPU memory after every iteration. Above it (a full
fine-tune of a multi-billion-parameter model) the copy is taken only when a checkpoint is
written, and a signal finishes the current iteration before saving."""
DEFAULT_CHECKPOINT_MINUTES = 10.0
RUN_MARKERS = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, "metrics.jsonl")
"""Files whose presence means ``--out`` already holds a run."""
TRAIN_COMMANDS = {"cartpole": "grpo_harness.train", "vlm": "grpo_harness.train_vlm"}
"""``train ENV`` -> the module that defines ``add_arguments(parser)`` and ``HELP``."""


class UsageError(Exception):
    """A user's mistake: reported on stderr in one line with exit status 2, no traceback."""


# --- the ``train`` subcommand -----------------------------------------------------------------

def add_parser(sub, name: str) -> None:
    """Register ``train`` and one sub-subcommand per entry of ``TRAIN_COMMANDS``."""
    import importlib

    train = sub.add_parser(name, help="train with GRPO: cartpole, or vlm (Qwen2-VL family)",
                           description="Train a policy with the verified GRPO loop.")
    envs = train.add_subparsers(dest="env", required=True, metavar="ENV")
    for env, module in TRAIN_COMMANDS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(envs.add_parser(env, help=mod.HELP, description=mod.DESCRIPTION))


def finite_float(text: str) -> float:
    """argparse type: a finite float (``nan`` and ``inf`` are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def out_folder(text: str) -> Path:
    """argparse type of ``--out``: a path; the empty string is refused (``Path("")`` is the
    working directory: a run would be written among the user's files)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder, e.g. --out runs/NAME (--out . for the "
                                         "working directory)")
    return Path(text)


def add_run_arguments(p, train_defaults: dict[str, Any], *, threads: str) -> None:
    """The options every train command has; ``train_defaults`` and ``threads`` (the default
    of ``--threads``, in words) feed the help texts."""
    d = train_defaults
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML or JSON file of GRPOConfig keys (flat, or [grpo]/[train] sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one GRPOConfig key; VALUE is a JSON literal or a string (repeatable)")
    p.add_argument("--seed", type=int, help="GRPOConfig.seed")
    p.add_argument("--out", type=out_folder, metavar="DIR", help="run folder (default runs/<env>-<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint with its saved settings")
    p.add_argument("--max-iterations", type=int, metavar="N",
                   help=f"total iteration budget (default {d['max_iterations'] or 'none'})")
    p.add_argument("--eval-every", type=int, metavar="K",
                   help=f"greedy evaluation every K iterations, 0 = only at the end (default {d['eval_every']})")
    p.add_argument("--checkpoint-every", type=int, metavar="K",
                   help=f"checkpoint every K iterations, 0 = only by time and at the end "
                   f"(default {d['checkpoint_every']})")
    p.add_argument("--checkpoint-minutes", type=finite_float, metavar="M",
                   help="also checkpoint when M minutes passed since the last one, 0 = off "
                   f"(default {d['checkpoint_minutes']:g}: one step of a large model can take a minute)")
    p.add_argument("--threads", type=int, metavar="N", help=f"torch CPU threads (default {threads})")
    p.add_argument("--dist-timeout", type=finite_float, metavar="S",
                   help="under torchrun: seconds a rank waits in one collective before failing (default 1800)")
    p.add_argument("--report-to", type=parse_report_to, metavar="LIST",
                   help="trackers besides metrics.jsonl: tensorboard (default), wandb, all or none, "
                   "comma-separated; names as TRL's (grpo_harness/trackers.py)")


# --- settings ---------------------------------------------------------------------------------

def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_finite(values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if _nonfinite(value):
            raise UsageError(f"{where}: {key}={value} is not a finite number")


def parse_set(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value); the value is a JSON literal if it parses, else a string.
    A non-finite float (``Infinity``, ``NaN``) is refused here, before any training."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if _nonfinite(value):
        raise UsageError(f"--set {item}: {key} must be a finite number")
    return key, value


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_file(path: Path) -> Any:
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON: {e}") from None
    if suffix != ".toml":
        raise UsageError(f"config file {path}: unknown format {suffix or '(no suffix)'!r}; use .toml or .json")
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError(f"cannot read {path}: TOML needs Python 3.11+ or the 'tomli' package "
                             "(pip install tomli); or pass a .json config") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None


def load_config_file(path: Path, *, env: str, train_keys) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a TOML or JSON config file -> (GRPOConfig values, training options)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    data = _parse_file(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a table of keys")
    if not isinstance(data.get("grpo"), dict) and not isinstance(data.get("train"), dict):
        return data, {}  # flat: GRPOConfig keys (a [train] or [grpo] table alone makes it sectioned)
    extra = sorted(set(data) - {"env", "grpo", "train", "task", "model", "notes"})
    if extra:
        raise UsageError(f"{path}: unknown section(s) {', '.join(map(repr, extra))}; expected 'grpo' and 'train'")
    if data.get("env", env) != env:
        raise UsageError(f"{path} is a config for env {data['env']!r}, not {env}")
    grpo, train = data.get("grpo", {}), data.get("train", {})
    for name, table in (("grpo", grpo), ("train", train)):
        if not isinstance(table, dict):
            raise UsageError(f"{path}: '{name}' must be a table")
    unknown = sorted(set(train) - set(train_keys))
    if unknown:
        raise UsageError(f"{path}: unknown training option(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(train_keys)}")
    return dict(grpo), dict(train)


def explicit_settings(args, *, env: str, train_keys) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the user set on this invocation: (GRPOConfig values, training options)."""
    grpo: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        g, t = load_config_file(args.config, env=env, train_keys=train_keys)
        check_finite({**g, **t}, str(args.config))
        for key, value in g.items():
            _refuse_trl_name(key, value, str(args.config))
        grpo.update(g)
        train.update(t)
    for item in getattr(args, "overrides", []):
        key, value = parse_set(item)
        _refuse_trl_name(key, value, f"--set {item}")
        grpo[key] = value
    if getattr(args, "seed", None) is not None:
        grpo["seed"] = args.seed
    for key in train_keys:
        value = getattr(args, key, None)
        if value is not None:
            train[key] = value
    return grpo, train


def _refuse_trl_name(key: str, value: Any, where: str) -> None:
    """UsageError answering a TRL name (``grpo_harness.trl_names``) that is no GRPOConfig key here."""
    from grpo_core.config import GRPOConfig

    from .trl_names import hint

    if key not in GRPOConfig.field_names():
        text = hint(key, value)
        if text is not None:
            raise UsageError(f"{where}: {text}")


def make_config(values: dict[str, Any], *, train_keys=()):
    """GRPOConfig from ``values``; ints given for float fields become floats (``beta=0`` ->
    0.0) so config.json and resume comparisons see one spelling. Errors -> UsageError."""
    from grpo_core.config import GRPOConfig

    for key in values:
        if key in train_keys:
            raise UsageError(f"{key!r} is a training option, not a GRPOConfig key: use --{key.replace('_', '-')}")
    floats = {f.name for f in dataclasses.fields(GRPOConfig) if isinstance(f.default, float)}
    values = {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
              for k, v in values.items()}
    from grpo_core.config import KLInertWarning

    try:
        with warnings.catch_warnings():  # said once, in one line, by TrainingRun.start_notes
            warnings.simplefilter("ignore", KLInertWarning)
            return GRPOConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def check_int(train: dict[str, Any], key: str, low: int, *, nullable: bool = False) -> None:
    value = train[key]
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"--{key.replace('_', '-')}={value!r} is invalid: expected an int >= {low}")


def check_run_options(train: dict[str, Any]) -> None:
    """The options every command has (``add_run_arguments``)."""
    check_int(train, "max_iterations", 1, nullable=True)
    check_int(train, "eval_every", 0)
    check_int(train, "checkpoint_every", 0)
    minutes = train["checkpoint_minutes"]
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 <= minutes < math.inf:
        raise UsageError(f"--checkpoint-minutes={minutes!r} is invalid: expected a number >= 0")


# --- the run folder ---------------------------------------------------------------------------

class RunFolder:
    """``--out``: checks, creation, and removal of what this invocation made."""

    writes = True
    """False on every rank but 0 of a distributed launch: only one process writes files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._made: Path | None = None  # topmost folder this invocation created
        self._before: set[str] | None = None  # entries of a folder that existed already
        self._lock = FolderLock(self.path)

    def hold(self) -> None:
        """Take the folder's lock (``grpo_harness.folder_lock``): one writer per run folder. A
        live holder -> UsageError naming it, and nothing of the folder is removed on the way out
        (it is the holder's)."""
        if not self.writes:
            return
        try:
            self._lock.acquire("run folder")
        except FolderBusy as e:
            self._made = self._before = None
            raise UsageError(str(e)) from None
        if self._lock.unsupported and not getattr(self, "_said_unlocked", False):
            self._said_unlocked = True
            print(f"note: the file system of {self.path} has no file locks: a second process writing this run "
                  "folder would not be refused", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._lock.release()

    def check_path(self) -> None:
        """Refuse an ``--out`` that is a file or lies under a file."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file, not a folder")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UsageError(f"--out {self.path} lies under {parent}, which is a file")
                break

    def check_new(self) -> None:
        self.check_path()
        if (self.path / LOCK_FILE).exists():  # a live run here is named, not only its files
            self.hold()
        self._check_markers()

    def _check_markers(self) -> None:
        for name in RUN_MARKERS:
            if (self.path / name).exists():
                raise UsageError(f"{self.path} already holds a run ({name}); pass --resume to continue it, "
                                 "or choose another --out")

    def read_config(self, env: str) -> dict[str, Any]:
        """``config.json`` of the run to resume (UsageError when missing or not this env's)."""
        self.check_path()
        if not self.path.is_dir():
            raise UsageError(f"cannot resume: no checkpoint at {self.path / CHECKPOINT_FILE} (the folder "
                             "does not exist)")
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise UsageError(f"cannot resume: {path} is missing (the run's settings are kept there); "
                             "start a new run in another --out")
        try:
            doc = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise UsageError(f"cannot resume: {path} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("grpo"), dict):
            raise UsageError(f"cannot resume: {path} is not a run config (no 'grpo' section)")
        if doc.get("env") != env:
            raise UsageError(f"cannot resume: {self.path} holds a {doc.get('env')!r} run, not {env}")
        return doc

    def create(self) -> None:
        if not self.writes:
            return
        top = self.path
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        if self.path.exists():
            self._before = {p.name for p in self.path.iterdir()}
        else:
            self._made = top
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --out {self.path}: {e.strerror or e}") from None
        self.hold()
        others = {p.name for p in self.path.iterdir()} - {LOCK_FILE}
        if self._made is not None and others:  # another process made the folder first: it is not ours
            self._made, self._before = None, others
        self._check_markers()  # under the lock: a run that raced us here and finished first

    def discard(self) -> None:
        """Remove what this invocation created (nothing when it resumed a run)."""
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
        elif self._before is not None and self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name not in self._before:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        self._made = self._before = None

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files of writes a SIGKILL cut short (``atomic_write``'s
        ``.<name>.<random>.tmp``); the files they were meant to replace are intact."""
        if self.writes:
            for tmp in self.path.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def write_json(self, name: str, doc: dict) -> None:
        if self.writes:
            atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))


# --- checkpoints ------------------------------------------------------------------------------

class CheckpointError(Exception):
    """A checkpoint file that does not load; the message is the reason."""


class NoSpace(Exception):
    """A write under ``--out`` failed because its file system is full; the message is the file."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "file write failed", "unexpected pos")
"""What ``torch.save`` says when a write fails (it reports no errno)."""


def no_space(exc: BaseException | None, folder: Path, need: int = 0) -> bool:
    """True when ``exc`` (or one it was raised from) is a write that failed for lack of space:
    ``ENOSPC``/``EDQUOT``, or torch's write error while ``folder``'s file system has less than
    ``need`` bytes (what was being written) and 1 MiB more free."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NoSpace) or (isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in TORCH_WRITE_ERRORS):
            try:
                if shutil.disk_usage(folder).free < need + (1 << 20):
                    return True
            except OSError:
                pass
        exc = exc.__cause__ or exc.__context__
    return False


def cpu_copy(tree: Any) -> Any:
    """Copy of a nest of dicts, lists and tuples with every tensor copied to CPU memory (a
    snapshot held through a run must not sit in accelerator memory)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(v) for v in tree)
    return copy.deepcopy(tree)


def tensor_bytes(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def state_bytes(trainer) -> int:
    """What ``trainer_state(trainer)`` would hold, in bytes, counted from the models and the
    optimizer as they are, without building it: under FSDP building it gathers the whole model
    and optimizer to rank 0 and, before the first step, makes torch initialise the optimizer's
    state by stepping it once at lr 0 (Adam's step counter then starts at 1). Full tensors are
    counted (a DTensor's ``numel`` is its global one). An optimizer without state yet is counted
    as Adam's: two moments per trainable entry."""
    import torch

    def module_bytes(m, only_trainable=False) -> int:
        if not isinstance(m, torch.nn.Module):
            return 0
        ps = [p for p in m.parameters() if p.requires_grad or not only_trainable]
        bs = [] if only_trainable else list(m.buffers())
        return sum(t.numel() * t.element_size() for t in [*ps, *bs])

    frozen = any(not p.requires_grad for p in trainer.policy.parameters())
    total = module_bytes(trainer.policy, only_trainable=frozen) + module_bytes(trainer.reference)
    state = trainer.optimizer.state
    if state:
        total += sum(tensor_bytes(dict(v)) for v in state.values())
    else:
        total += 2 * sum(p.numel() * p.element_size() for p in trainer.params)
    return total


def trainer_state(trainer, *, copy_to_cpu: bool = True) -> dict[str, Any]:
    """``trainer.state_dict()``; when some policy parameters are frozen (LoRA: the base model),
    the policy entry holds only the trainable ones (``policy_trainable_only``): the frozen
    ones are the model's own and come from it again on resume."""
    state = dict(trainer.state_dict())
    params = dict(trainer.policy.named_parameters())
    if any(not p.requires_grad for p in params.values()):
        state["policy"] = {n: p.detach() for n, p in params.items() if p.requires_grad}
        state["policy_trainable_only"] = True
    return cpu_copy(state) if copy_to_cpu else state


def load_trainer_state(trainer, state: dict[str, Any]) -> None:
    """Inverse of ``trainer_state``: trainable tensors go onto the model's own frozen ones.
    CheckpointError, in one line, when the state does not fit the trainer: a part missing, a
    tensor missing, unknown or of another shape, a NaN or an infinity in any tensor (policy,
    reference, optimizer), checked before anything is loaded."""
    import torch

    if not isinstance(state, dict):
        raise CheckpointError("its trainer state is not a table")
    state = dict(state)
    missing = [k for k in ("policy", "optimizer", "iteration") if k not in state]
    if missing:
        raise CheckpointError(f"its trainer state has no {' and no '.join(missing)}")
    it = state["iteration"]
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        raise CheckpointError(f"its iteration counter is {it!r}, not a count")
    if state.pop("policy_trainable_only", False):
        trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
        if set(state["policy"]) != trainable:
            odd = sorted(set(state["policy"]) ^ trainable)
            raise CheckpointError(f"its {len(state['policy'])} trainable tensors do not fit the model's "
                                  f"{len(trainable)} (e.g. {odd[0]}); was it written with other LoRA settings?")
        full = trainer.policy.state_dict()
        full.update(state["policy"])
        state["policy"] = full
    _check_fits("policy", state["policy"], trainer.policy)
    reference = getattr(trainer, "reference", None)
    if isinstance(reference, torch.nn.Module) and state.get("reference") is not None:
        _check_fits("reference", state["reference"], reference)
    for part in ("policy", "reference", "optimizer"):
        for name, value in _flatten(state.get(part) or {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                what = "NaN" if bool(torch.isnan(value).any()) else "an infinite value"
                raise CheckpointError(f"its {part} tensor {name!r} holds {what}")
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"does not fit the trainer: {type(e).__name__}: {one_line(e)[:200]}") from None


def _check_fits(part: str, saved: Any, module) -> None:
    """CheckpointError unless ``saved`` has exactly ``module``'s tensors, shape for shape."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"its {part} is not a table of tensors")
    own = module.state_dict()
    missing, unknown = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unknown:
        parts = ([f"{len(missing)} tensor(s) missing (e.g. {missing[0]!r})"] if missing else []) + \
                ([f"{len(unknown)} unknown (e.g. {unknown[0]!r})"] if unknown else [])
        raise CheckpointError(f"its {part} does not fit the model: {', '.join(parts)}")
    for name, value in saved.items():
        shape, expected = tuple(getattr(value, "shape", ())), tuple(getattr(own[name], "shape", ()))
        if shape != expected:
            raise CheckpointError(f"its {part} tensor {name!r} has shape {shape}, the model's is {expected}")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file; CheckpointError with a one-line reason when it does not load."""
    import torch

    size = path.stat().st_size
    if size == 0:
        raise CheckpointError("empty file (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"not a complete torch checkpoint ({size:,} bytes, no zip directory): "
                              "truncated or overwritten")
    try:
        # memory-mapped: the tensors are read from the file as they are used, so ranks that each
        # load a large checkpoint do not each hold a private copy of all of it
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure is the reason the file is unusable
        raise CheckpointError(f"does not load: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError("not a grpo-harness checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"written by another version (format {state['format']!r}, this one reads "
                              f"{CHECKPOINT_FORMAT})")
    return state


class CheckpointStore:
    """``checkpoint.pt`` and the one before it, ``checkpoint.prev.pt``."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.latest = folder.path / CHECKPOINT_FILE
        self.previous = folder.path / PREVIOUS_CHECKPOINT_FILE
        self.used_previous = False
        """``load`` fell back to the previous file (the next save then writes the latest)."""

    def save(self, state: dict[str, Any]) -> Path:
        import torch

        if self.folder.writes:
            keep = self.previous if self.latest.exists() else None
            atomic_write(self.latest, lambda tmp: torch.save(state, tmp), keep_previous=keep)
        return self.latest

    def load(self, say) -> dict[str, Any] | None:
        """The newest checkpoint that loads, None when there is no checkpoint file at all (a
        run killed before its first save). ``say(line)`` reports a newest one that does not
        load (it is moved aside to ``<name>.corrupt``, so the next save does not rotate it into
        the previous one's place). UsageError, in one line, when none loads."""
        if not self.latest.is_file() and not self.previous.is_file():
            return None
        reasons = []
        for path in (self.latest, self.previous):
            if not path.is_file():
                reasons.append(f"{path} is missing")
                continue
            try:
                state = read_checkpoint(path)
            except CheckpointError as e:
                reasons.append(f"{path}: {e}")
                continue
            self.used_previous = path == self.previous
            if self.used_previous:
                if self.latest.is_file() and self.folder.writes:
                    aside = self.latest.with_name(self.latest.name + ".corrupt")
                    os.replace(self.latest, aside)
                    reasons[0] += f"; moved it to {aside.name}"
                say(f"{reasons[0]}; resuming from {path.name}")
            return state
        raise UsageError(f"cannot resume: no checkpoint loads ({'; '.join(reasons)})")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def fingerprint_diff(checkpoint: dict, run: dict) -> list[str]:
    """``"key (checkpoint X, this run Y)"`` for every leaf where two fingerprints differ. A
    GRPOConfig field that the checkpoint lacks (added to the config after it was written) is
    no difference when this run has it at its default, which is what the older code did."""
    from grpo_core.config import GRPOConfig

    a, b = _flatten(checkpoint), _flatten(run)
    added = {f"config.{k}": v for k, v in GRPOConfig().to_dict().items()}
    missing = "(absent)"
    return [f"{k} (checkpoint {a.get(k, missing)!r}, this run {b.get(k, missing)!r})"
            for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)
            and not (k not in a and k in added and b.get(k) == added[k])]


# --- RNG state: checkpointed so that a resumed process continues every global stream ----------

def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    npst = np.random.get_state(legacy=False)
    cuda = {"cuda": [t.cpu() for t in torch.cuda.get_rng_state_all()]} if torch.cuda.is_initialized() else {}
    return {**cuda, "torch": torch.get_rng_state(),
            "numpy": {"bit_generator": npst["bit_generator"],
                      "key": torch.from_numpy(npst["state"]["key"].astype(np.int64)),
                      "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                      "gauss": float(npst["gauss"])},
            "python": random.getstate()}


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and Python streams at the start of a new run, so that code
    drawing from them (a user's reward function, a library's initialiser) repeats across
    processes; checkpoints then carry them on across a resume."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():  # a CUDA run: each device's stream
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another number of visible GPUs: this process's own device
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# --- signals ----------------------------------------------------------------------------------

class Interrupted(BaseException):
    """Raised by ``StopSignals`` to abandon the current iteration (a BaseException, as
    KeyboardInterrupt, so that ``except Exception`` in user code does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    """SIGINT and SIGTERM for the duration of a run (main thread only; elsewhere a no-op).

    Modes: "run" (a signal raises ``Interrupted`` when ``abandon`` is set, else it is noted and
    the loop stops at the end of the iteration; a second signal raises), ``deferred()`` (held
    until the block ends: a metrics line and the snapshot always describe the same iteration)
    and ``saving()`` (noted, never raised: nothing interrupts the final writes).
    """

    def __init__(self, say):
        self.say = say
        self.received: int | None = None
        self.count = 0
        self.abandon = True
        self._mode = "run"
        self._pending = False
        self._noted = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum
        if self._mode == "saving":
            if not self._noted:
                self._noted = True
                self.say(f"{SIGNAL_NAMES[signum]} received while saving: finishing the checkpoint first")
            return
        if self._mode == "deferred":
            self._pending = True
            return
        if self.abandon or self.count > 1:
            raise self.stop()
        self.say(f"{SIGNAL_NAMES[signum]}: finishing this iteration, then saving "
                 "(send it again to stop now and keep the last checkpoint)")

    @contextlib.contextmanager
    def deferred(self):
        previous, self._mode = self._mode, "deferred"
        try:
            yield
        finally:
            self._mode = previous
        if self._pending and previous == "run":
            self._pending = False
            if self.abandon or self.count > 1:
                raise self.stop()

    def stop(self) -> Interrupted:
        """The exception that ends the run; from here on every signal is only noted, so that
        a second or third one cannot interrupt the saving (or print a traceback)."""
        self._mode = "saving"
        return Interrupted(self.received if self.received is not None else signal.SIGINT)

    @contextlib.contextmanager
    def saving(self):
        self._mode = "saving"
        yield

    def exit_code(self, signum: int | None = None) -> int:
        return 128 + int(signum or self.received or signal.SIGINT)


def raised_in(exc: BaseException, code_objects) -> bool:
    """True when ``exc`` or an exception it was raised from passed through one of the given
    functions' code objects (identity, not names)."""
    codes = set(code_objects)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False



# --- the run ----------------------------------------------------------------------------------

class TrainingRun:
    """The life cycle of one ``train`` invocation; a command subclasses it and fills in the
    hooks below (everything else, in the module docstring, happens here once).

    Hooks: ``resolve_task`` (the task and model identity), ``check_train``, ``build`` (adapter
    and trainer), ``initial_progress``, ``preflight``, ``before_step``, ``make_record``,
    ``stop_reason``, ``make_display`` / ``on_record``, ``describe``, ``write_curve``,
    ``summary_lines``, ``on_finish``, ``user_error``.
    """

    env = ""
    """The command's name (``train ENV``), written into config.json and every checkpoint."""
    prog = "grpo-harness train"
    """Prefix of the one-line error messages."""
    DEFAULTS: dict[str, dict[str, Any]] = {"grpo": {}, "train": {}}
    """``grpo``: over GRPOConfig's defaults; ``train``: every training option's default."""
    FIXED_TRAIN: tuple[str, ...] = ()
    """Training options that may not change on resume (they are part of the fingerprint)."""
    x_key = "iteration"
    """The record key TensorBoard plots against (it must grow with every iteration)."""
    world = None
    """``grpo_harness.launch.World`` under torchrun, else None (one process)."""

    def __init__(self, args):
        self.args = args
        self.task: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.progress: dict[str, Any] = {}
        self.snapshot: dict[str, Any] | None = None
        self.keep_snapshots = True
        self.saved_iteration: int | None = None
        self.completed = 0
        self.resumed = False
        self.bar = None
        self.log = None
        self.signals: StopSignals | None = None
        self._dirty = False
        self.no_space: str | None = None
        """The file whose write found the file system full (then nothing more is written)."""

    # --- hooks --------------------------------------------------------------------------------
    def resolve_task(self, saved: dict[str, Any] | None) -> None:
        """Fill ``self.task`` and ``self.model`` (JSON values) from the arguments, or from the
        saved ``config.json`` document on resume."""

    def check_train(self) -> None:
        """Validate the command's own training options in ``self.train`` (UsageError)."""

    def default_threads(self) -> int | None:
        return None

    def build(self):
        """Make the adapter; return the GRPOTrainer. Bad input -> UsageError."""
        raise NotImplementedError

    def initial_progress(self) -> dict[str, Any]:
        """The command's counters at iteration 0 (JSON values; saved with every checkpoint)."""
        return {}

    def preflight(self) -> bool:
        """Checks before the first iteration; False refuses to train (exit 1)."""
        return True

    def before_step(self) -> None:
        """Called before every ``trainer.step()``."""

    def make_record(self, stats: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the metrics record of the iteration just done, the progress counters after it)."""
        raise NotImplementedError

    def stop_reason(self) -> str | None:
        """Why to stop now (before the next iteration), or None to go on."""
        raise NotImplementedError

    def make_display(self):
        """An object with ``write(line)``, ``close()``; ``on_record`` feeds it."""
        from .trainlog import BarWriter

        return BarWriter()

    def on_record(self, record: dict[str, Any]) -> None:
        """Show a committed record."""

    def describe(self) -> str:
        """What is trained, for the first line: ``training <this>`` / ``resuming at ... <this>``."""
        return f"-> {self.folder.path}"

    def write_curve(self, path: Path) -> None:
        """Draw the learning curve from metrics.jsonl into ``path``."""

    def summary_lines(self) -> list[str]:
        return []

    def on_finish(self, clean: bool) -> list[str]:
        """Last writes (e.g. an exported model); ``clean``: the live trainer holds the last
        completed iteration. Returns extra summary lines (``label: path``)."""
        return []

    def user_error(self, exc: Exception) -> str | None:
        """A one-line message when an exception raised while training is the user's mistake
        (their reward code or data), else None (a bug: the traceback is shown)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # --- helpers for the hooks ----------------------------------------------------------------
    def say(self, line: str) -> None:
        if self.world is not None and not self.world.writer:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def wall(self) -> float:
        return self.wall_base + (time.perf_counter() - self.session_start)

    def upgrade_saved_train(self, saved_train: dict[str, Any]) -> dict[str, Any]:
        """The run settings of a run folder written by an older version, in today's names (a
        command renames what it renamed)."""
        return saved_train

    def make_trainer(self, adapter, precision: str = "32", **distributed):
        """The trainer of ``adapter`` with ``self.cfg`` and ``precision``: a ``GRPOTrainer``, or
        under torchrun a ``DistributedGRPOTrainer`` (``distributed``: its ``shard`` and
        ``fsdp_units``)."""
        if self.world is None:
            from grpo_core.loop import GRPOTrainer

            return GRPOTrainer(adapter, self.cfg, precision=precision)
        from grpo_core.distributed import DistributedGRPOTrainer

        return DistributedGRPOTrainer(adapter, self.cfg, precision=precision, **distributed)

    def agree(self, value):
        """``value`` as rank 0 has it (one process: ``value``), for decisions every rank must
        take alike."""
        return value if self.world is None else self.world.agree(value)

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block before the other ranks (one process: just the block)."""
        with contextlib.nullcontext() if self.world is None else self.world.rank_zero_first():
            yield

    @property
    def out(self) -> Path:
        return self.folder.path

    # --- set-up -------------------------------------------------------------------------------
    def main(self) -> int:
        """Run the command; the exit status (0 done, 1 failed, 2 usage error, 130/143 signal)."""
        try:
            return self._main()
        finally:
            if getattr(self, "folder", None) is not None:
                self.folder.release()

    def _main(self) -> int:
        with StopSignals(self.say) as self.signals:
            self.folder = None
            try:
                if not self._prepare():
                    self._discard()
                    return EXIT_FAILED
            except UsageError as e:
                self._discard()
                if self.world is None or self.world.writer:  # every rank checks the same arguments: say it once
                    print(f"{self.prog}: error: {e}", file=sys.stderr, flush=True)
                return EXIT_USAGE
            except (Interrupted, KeyboardInterrupt) as e:
                self._discard()
                self.say("interrupted before training started; nothing was saved")
                return self.signals.exit_code(getattr(e, "signum", None))
            except BaseException as e:
                self._discard()
                if self.folder is not None and no_space(e, self.folder.path):
                    print(f"{self.prog}: error: no space left on device under {self.folder.path} before training "
                          "started; nothing was kept", file=sys.stderr, flush=True)
                    return EXIT_FAILED
                raise
            return self._train()

    def _discard(self) -> None:
        if self.folder is not None and not self.resumed:
            self.folder.discard()

    def _prepare(self) -> bool:
        args = self.args
        self.resumed = bool(args.resume)
        if self.resumed and args.out is None:
            raise UsageError("--resume needs --out DIR (the run folder to continue)")
        out = Path(args.out) if args.out is not None else \
            Path("runs") / f"{self.env}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.folder = RunFolder(out)
        self.store = CheckpointStore(self.folder)
        checkpoint = None
        if self.resumed:
            self._resolve(self.folder.read_config(self.env))
            self.folder.hold()
            self.folder.remove_stale_temporaries()
            checkpoint = self.store.load(self.say)
            if checkpoint is None:
                self.say(f"no checkpoint in {self.out} yet (the run stopped before its first save): "
                         "starting it again from iteration 0 with its saved settings")
            else:
                self._check_checkpoint(checkpoint)
        else:
            self._resolve(None)
            self.folder.check_new()
        self._set_threads()
        if not self.resumed:
            self.folder.create()
        seed_everything(self.cfg.seed)  # a resumed run then restores the checkpoint's streams
        self.trainer = self.build()
        self.notes = self.start_notes()
        self.progress = {**self.initial_progress(), "wall_time": 0.0, "last_x": None}
        if checkpoint is not None:
            self._restore_newest(checkpoint)
        elif self.resumed:
            self._drop_metrics_from(0)
        if not self.preflight():
            return False
        self.folder.write_json(CONFIG_FILE, self.config_doc())
        return True

    def _resolve(self, saved: dict[str, Any] | None) -> None:
        keys = tuple(self.DEFAULTS["train"])
        grpo_given, train_given = explicit_settings(self.args, env=self.env, train_keys=keys)
        if saved is None:
            self.cfg = make_config({**self._defaults_for_world(grpo_given), **grpo_given}, train_keys=keys)
            self.train = {**self.DEFAULTS["train"], **train_given}
        else:
            self.cfg = make_config(saved["grpo"], train_keys=keys)
            asked = make_config({**self.cfg.to_dict(), **grpo_given}, train_keys=keys)
            diffs = [f"{k} (run {getattr(self.cfg, k)!r}, given {getattr(asked, k)!r})"
                     for k in self.cfg.field_names() if getattr(self.cfg, k) != getattr(asked, k)]
            if diffs:
                raise UsageError("cannot resume: --config/--set/--seed disagree with the run's config: "
                                 + "; ".join(diffs) + ". Drop them (the saved config is used) or start "
                                 "a new run in another --out")
            saved_train = self.upgrade_saved_train(dict(saved.get("train", {})))
            self.train = {**self.DEFAULTS["train"], **saved_train, **train_given}
            for key in self.FIXED_TRAIN:
                if key in train_given and train_given[key] != saved_train.get(key):
                    raise UsageError(f"cannot resume: {key.replace('_', '-')}={train_given[key]!r} differs "
                                     f"from the run's {saved_train.get(key)!r}")
        self.resolve_task(saved)
        check_run_options(self.train)
        self.check_train()
        fp = {"config": self.cfg.to_dict(), "train": {k: self.train[k] for k in self.FIXED_TRAIN},
              "task": self.task, "model": self.model}
        self.fingerprint = json.loads(json.dumps(fp, default=str))

    def _defaults_for_world(self, given: dict[str, Any]) -> dict[str, Any]:
        """``DEFAULTS["grpo"]``, with a default dynamic sampling turned off (and said) under a
        torchrun launch (the distributed trainer does not support it yet, one process
        included); asked for explicitly there, it is refused by the distributed trainer."""
        defaults = dict(self.DEFAULTS["grpo"])
        if self.world is not None and defaults.get("dynamic_sampling") and "dynamic_sampling" not in given:
            defaults["dynamic_sampling"] = False
            n = self.world.size
            self.say(f"dynamic sampling (a default) is off: not supported under torchrun yet ({n} process"
                     f"{'es' if n > 1 else ''})")
        return defaults

    def _set_threads(self) -> None:
        import torch

        threads = self.args.threads if self.args.threads is not None else self.default_threads()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise UsageError(f"--threads={threads} must be >= 1")
            torch.set_num_threads(threads)

    def config_doc(self) -> dict[str, Any]:
        return {"env": self.env, "grpo": self.cfg.to_dict(), "train": self.train, "task": self.task,
                "model": self.model, "notes": list(getattr(self, "notes", []))}

    def start_notes(self) -> list[str]:
        """Lines said at the start of training and kept in config.json (``inspect`` shows them):
        settings that train another objective than GRPO's, and (a command adds its own) a
        precision that cannot move the weights."""
        notes = list(self.cfg.objective_notes())
        if self.cfg.kl_is_inert():  # GRPOConfig's KLInertWarning, as one line (make_config holds it back)
            from grpo_core.config import KLInertWarning

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", KLInertWarning)
                self.cfg.replace()
            notes += [f"warning: {w.message}" for w in caught if issubclass(w.category, KLInertWarning)]
        if self.cfg.group_size == 1:
            notes.append("warning: group_size=1: a group of one has no relative signal, so every advantage is 0 and "
                         "every update without a KL or entropy term is skipped: nothing is learned (GRPO compares "
                         "group_size >= 2 samples of one prompt)")
        return notes

    def _check_checkpoint(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("env") != self.env:
            raise UsageError(f"cannot resume: the checkpoint in {self.out} is a {ckpt.get('env')!r} "
                             f"checkpoint, not {self.env}")
        diffs = fingerprint_diff(ckpt.get("fingerprint", {}), self.fingerprint)
        if diffs:
            more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            raise UsageError(f"cannot resume: the checkpoint in {self.out} belongs to another run; it "
                             f"differs from {self.out / CONFIG_FILE} in " + "; ".join(diffs[:4]) + more)

    def _restore_newest(self, ckpt: dict[str, Any]) -> None:
        """Restore ``ckpt``, the newest checkpoint that loads; one that loads but does not
        restore (``_restore``) is named in one line and the previous one is used, as for a file
        that does not load. UsageError when none restores (nothing dropped, nothing moved)."""
        store = self.store
        path = store.previous if store.used_previous else store.latest
        try:
            self._restore(ckpt)
            return
        except CheckpointError as e:
            reason = f"{path}: {e}"
        if path == store.previous or not store.previous.is_file():
            gone = "" if path == store.previous else f"; {store.previous} is missing"
            raise UsageError(f"cannot resume: no checkpoint restores ({reason}{gone})")
        try:
            previous = read_checkpoint(store.previous)
            self._check_checkpoint(previous)
            store.used_previous = True
            self._restore(previous)
        except CheckpointError as e:
            store.used_previous = False
            raise UsageError(f"cannot resume: no checkpoint restores ({reason}; {store.previous}: {e})") from None
        if self.folder.writes:
            aside = store.latest.with_name(store.latest.name + ".corrupt")
            os.replace(store.latest, aside)
            reason += f"; moved it to {aside.name}"
        self.say(f"{reason}; resuming from {store.previous.name}")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Load a checkpoint into the run; CheckpointError (nothing dropped yet) when it does not
        fit: the trainer state (``load_trainer_state``), its RNG streams, or counters that
        disagree with the metrics already written (``_check_counters``)."""
        missing = [k for k in ("trainer", "rng", "progress") if not isinstance(ckpt.get(k), dict)]
        if missing:
            raise CheckpointError(f"it has no {' and no '.join(missing)}")
        self._check_counters(ckpt)
        load_trainer_state(self.trainer, ckpt["trainer"])
        try:
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"its random states do not load: {type(e).__name__}: {one_line(e)[:160]}") from None
        self.progress = dict(ckpt["progress"])
        self.load_extra_state(ckpt.get("extra") or {})
        self.completed = self.trainer.iteration
        self.saved_iteration = None if self.store.used_previous else self.completed
        self._drop_metrics_from(self.trainer.iteration)

    def _check_counters(self, ckpt: dict[str, Any]) -> None:
        """CheckpointError when the checkpoint's iteration counter disagrees with its own
        progress and metrics.jsonl: the metrics line of its last iteration must exist (when the
        file holds lines) and carry the checkpoint's ``x_key`` value and wall time, which were
        copied from that very line when it was written."""
        from .trainlog import METRICS_FILE, read_metrics

        it, progress = ckpt["trainer"].get("iteration"), ckpt["progress"]
        if not isinstance(it, int) or it <= 0:
            return  # load_trainer_state names a counter that is not a count
        records = read_metrics(self.out / METRICS_FILE)
        if not records:
            return
        line = next((r for r in records if r.get("iteration") == it - 1), None)
        if line is None:
            last = max((r.get("iteration", -1) for r in records if isinstance(r.get("iteration"), int)), default=-1)
            if last < it - 1:  # the metrics' tail was lost (a crash before it reached the disk): keep the checkpoint
                self.say(f"{METRICS_FILE} ends at iteration {last}, before the checkpoint's iteration {it - 1}: "
                         f"the lines of iterations {last + 1}-{it - 1} were lost in a crash; resuming from the "
                         "checkpoint without them")
                return
            raise CheckpointError(f"its iteration counter ({it}) disagrees with {METRICS_FILE}, which ends at "
                                  f"iteration {last}")
        mine = (progress.get("last_x"), progress.get("wall_time"))
        theirs = (line.get(self.x_key), line.get("wall_time"))
        if mine != theirs:
            raise CheckpointError(f"its iteration counter ({it}) disagrees with {METRICS_FILE}: the line of "
                                  f"iteration {it - 1} has {self.x_key} {theirs[0]!r} at {theirs[1]!r} s, the "
                                  f"checkpoint {mine[0]!r} at {mine[1]!r} s")

    def _drop_metrics_from(self, iteration: int) -> None:
        from .completions import COMPLETIONS_FILE
        from .trainlog import METRICS_FILE, drop_records_from

        dropped = drop_records_from(self.out / METRICS_FILE, iteration) if self.folder.writes else 0
        if self.folder.writes:  # the sample completions past the checkpoint go the same way
            drop_records_from(self.out / COMPLETIONS_FILE, iteration)
        if dropped:
            self.say(f"dropped {dropped} metrics line(s) from iteration {iteration} on, past the "
                     "checkpoint (they are regenerated)")

    # --- checkpoints --------------------------------------------------------------------------
    def capture(self) -> dict[str, Any]:
        """The checkpoint of the live trainer, copied to CPU memory."""
        return {"format": CHECKPOINT_FORMAT, "env": self.env, "fingerprint": self.fingerprint,
                "trainer": trainer_state(self.trainer), "progress": copy.deepcopy(self.progress),
                "rng": rng_state(), "extra": cpu_copy(self.extra_state()),
                "world_size": 1 if self.world is None else self.world.size}

    def _size_snapshots(self) -> None:
        size = state_bytes(self.trainer)
        self.keep_snapshots = self.agree(size <= SNAPSHOT_LIMIT_BYTES)
        self.signals.abandon = self.keep_snapshots
        self.snapshot = self.capture() if self.keep_snapshots else None

    def _save(self, state: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.flush()  # every TensorBoard point up to this checkpoint is on disk
        try:
            self.store.save(state)
        except Exception as e:
            if no_space(e, self.out, need=tensor_bytes(state)):
                raise NoSpace(CHECKPOINT_FILE) from None
            raise
        self.saved_iteration = state["trainer"]["iteration"]
        self._last_save = time.monotonic()

    def _maybe_checkpoint(self) -> None:
        it = self.trainer.iteration
        every, minutes = self.train["checkpoint_every"], self.train["checkpoint_minutes"]
        due = (every > 0 and it % every == 0) or (minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes)
        due = self.agree(due)
        if due:
            with self.signals.deferred():
                self._save(self.snapshot if self.snapshot is not None else self.capture())

    # --- training -----------------------------------------------------------------------------
    def _commit(self, record: dict[str, Any], progress: dict[str, Any]) -> None:
        """Write the record and advance the run's state, signals held: the metrics line and the
        snapshot always describe the same iteration."""
        with self.signals.deferred():
            try:
                self.log.write(record)
            except Exception as e:
                from .trainlog import METRICS_FILE

                if no_space(e, self.out):
                    raise NoSpace(METRICS_FILE) from None
                raise
            self.progress = {**progress, "wall_time": record["wall_time"], "last_x": record[self.x_key]}
            self.completed = self.trainer.iteration
            self._dirty = False
            if self.keep_snapshots:
                self.snapshot = self.capture()

    def _loop(self) -> str:
        stop = self.stop_reason()
        while stop is None:
            self._dirty = True
            self.before_step()
            stats = self.trainer.step()
            record, progress = self.make_record(stats)
            record.setdefault("wall_time", self.wall())
            self._commit(record, progress)
            self.on_record(record)
            self._maybe_checkpoint()
            if self.signals.received is not None:
                raise self.signals.stop()
            stop = self.stop_reason()
        return stop

    def _train(self) -> int:
        from grpo_core.loop import NonFiniteLossError

        from .trackers import open_metrics_log

        self.start_iteration = self.completed = self.trainer.iteration
        self.wall_base, self.session_start = self.progress["wall_time"], time.perf_counter()
        self._last_save = time.monotonic()
        last_x = self.progress["last_x"]  # TensorBoard drops what a killed session logged past it
        purge = None if not self.resumed else (0 if last_x is None else int(last_x) + 1)
        self.log = open_metrics_log(self.out, x_key=self.x_key, purge_step=purge, writes=self.folder.writes,
                                    report_to=getattr(self.args, "report_to", None), config=self.config_doc(),
                                    resumed=self.resumed, say=self.say)
        self.bar = self.make_display() if self.world is None or self.world.writer else _Silent()
        try:
            self._size_snapshots()  # a collective under torchrun: a lost peer or a signal can stop it
        except BaseException:
            self.bar.close()
            self.log.close()  # the trackers end (a wandb run is finished, not left open)
            raise
        verb = f"resuming at iteration {self.start_iteration}" if self.resumed else "training"
        self.say(f"{verb} {self.describe()}")
        for note in self.notes:
            self.say(note)
        exit_code, error, crash = 0, None, None
        try:
            stop = self._loop()
        except (Interrupted, KeyboardInterrupt) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            exit_code, stop = self.signals.exit_code(signum), f"interrupted ({SIGNAL_NAMES[signum]})"
        except NonFiniteLossError as e:
            exit_code, stop = EXIT_FAILED, f"non-finite loss: {e}"
        except UsageError as e:
            exit_code, stop, error = EXIT_USAGE, "error (below)", str(e)
        except Exception as e:  # noqa: BLE001 - reported after the checkpoint is written
            if no_space(e, self.out):
                self.no_space = str(e) if isinstance(e, NoSpace) else (getattr(e, "filename", None) or "a file")
                exit_code, stop = EXIT_FAILED, "no space left on device"
            else:
                error = self.user_error(e)
                exit_code, stop = (EXIT_USAGE, "error (below)") if error else \
                    (EXIT_FAILED, f"crashed: {type(e).__name__}")
                crash = None if error else e
        finally:
            self.bar.close()
            try:
                self.log.close()
            except Exception as e:  # noqa: BLE001 - a full disk is said below; anything else is raised
                if not no_space(e, self.out):
                    raise
                self.no_space = self.no_space or "the metrics"
                exit_code, stop = exit_code or EXIT_FAILED, "no space left on device"
        return self._finish(stop, exit_code, error, crash)

    def _finish(self, stop: str, exit_code: int, error: str | None, crash: Exception | None) -> int:
        with self.signals.saving():
            if not self.resumed and self.completed == 0:  # nothing worth keeping: no half-made run
                self.folder.discard()
                if error is None and crash is None:
                    self.say(f"stopped: {stop} before the first iteration completed; nothing was saved")
            else:
                if self._dirty and self.snapshot is not None:  # abandoned mid-iteration: back to the last
                    load_trainer_state(self.trainer, self.snapshot["trainer"])  # completed one
                    self._dirty = False
                state = self.snapshot if self.snapshot is not None else (None if self._dirty else self.capture())
                extra = []
                try:
                    if self.no_space is None:  # a full disk: nothing more is written
                        if state is not None and state["trainer"]["iteration"] != self.saved_iteration:
                            self._save(state)
                        from .trainlog import CURVE_FILE

                        if self.folder.writes:
                            self.write_curve(self.out / CURVE_FILE)
                        extra = self.on_finish(clean=not self._dirty)
                except Exception as e:  # noqa: BLE001 - a full disk is said in one line; anything else raised
                    if not no_space(e, self.out):
                        raise
                    self.no_space = str(e) if isinstance(e, NoSpace) else (getattr(e, "filename", None) or "a file")
                    exit_code, stop = exit_code or EXIT_FAILED, "no space left on device"
                self._summary(stop, exit_code, extra, crash is not None)
                if self.no_space is not None and self.folder.writes:
                    error = self._no_space_line()
        if error:
            print(f"{self.prog}: error: {error}", file=sys.stderr, flush=True)
        if crash is not None:
            raise crash
        return exit_code

    def _no_space_line(self) -> str:
        """The one line of a run stopped by a full disk: what was kept, how to go on."""
        from .trainlog import METRICS_FILE

        s, k = self.saved_iteration, self.completed
        kept = (f"the checkpoint after iteration {s - 1} ({self.store.latest.name})" if s else
                "no checkpoint (none could be written)")
        kept += f" and {METRICS_FILE} through iteration {k - 1}" if k else ""
        return (f"no space left on device under {self.out} (writing {self.no_space}); kept: {kept}; free some "
                f"space, then resume with: grpo-harness train {self.env} --out {self.out} --resume")

    def _summary(self, stop: str, exit_code: int, extra: list[str], crashed: bool) -> None:
        from .trainlog import CURVE_FILE, METRICS_FILE, TB_DIR

        if self.world is not None and not self.world.writer:
            return
        k, s = self.completed, self.saved_iteration
        done = f" (iterations 0-{k - 1})" if k else ""
        lines = [f"stopped: {stop}; {k} iteration(s) done{done}, {k - self.start_iteration} in this session, "
                 f"{self.progress['wall_time']:.1f} s"]
        lines += self.summary_lines()
        ckpt = f"{self.store.latest} (after iteration {s - 1}; resumes at iteration {s})" if s else "none"
        if s is not None and s < k:
            ckpt += f"; iterations {s}-{k - 1} were not saved"
        lines += [f"curve:       {self.out / CURVE_FILE}", f"metrics:     {self.out / METRICS_FILE}",
                  f"checkpoint:  {ckpt}", f"config:      {self.out / CONFIG_FILE}", *extra]
        if "tensorboard" in getattr(self.log, "report_to", ("tensorboard",)):
            lines.append(f"tensorboard: tensorboard --logdir {self.out / TB_DIR}")
        if exit_code != 0 and s:
            lines.append(f"resume with: grpo-harness train {self.env} --out {self.out} --resume")
        if crashed:
            lines.append("the error follows:")
        print("\n".join(lines), flush=True)


def run_command(cls, args) -> int:
    """``args.run`` of a train command: its exit status; under torchrun the rank's process ends
    in ``grpo_harness.launch.run_on_world`` with it."""
    from .launch import launched_by_torchrun, run_on_world

    if launched_by_torchrun():
        def only_rank_zero_writes(world) -> None:
            RunFolder.writes = world.writer

        return run_on_world(cls, args, start=only_rank_zero_writes)
    return cls(args).main()


class _Silent:
    """The progress display of a rank that does not write: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
