"""``grpo-harness train cartpole``: train a CartPole-v1 policy with the verified GRPO loop.

Configuration, lowest to highest precedence:

1. ``CARTPOLE_DEFAULTS["grpo"]`` over ``GRPOConfig``'s generic defaults;
2. ``--config FILE`` (TOML or JSON). Either a flat table of GRPOConfig keys, or the sectioned
   form that ``config.json`` is written in: ``grpo`` (GRPOConfig keys) and ``train`` (the
   training options below, by their flag names with underscores);
3. ``--set KEY=VALUE`` (GRPOConfig keys; VALUE is read as a JSON literal when it parses,
   otherwise as a string: ``--set beta=0.0 --set kl_estimator=k1``);
4. ``--seed N``.

Training options (budget, evaluation cadence, network width) are flags, not GRPOConfig
fields; their defaults are ``CARTPOLE_DEFAULTS["train"]``.

The run folder (``--out``) receives ``config.json`` (resolved), ``metrics.jsonl`` (one line per
iteration), TensorBoard scalars in ``tb/``, ``checkpoint.pt`` and ``curve.png``. ``--resume``
continues from ``checkpoint.pt``; the CartPole rollouts, minibatch orders and evaluation start
states are all seeded from (seed, iteration) or the evaluation round, so a resumed run writes
the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from .trainlog import defer_sigint

# ---------------------------------------------------------------------------------------------
# CartPole defaults: the one place to tune them.
# "grpo" overrides GRPOConfig's generic defaults; "train" holds the training-only options.
CARTPOLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {
        "group_size": 4,
        "groups_per_iteration": 1,
        "gamma": 0.99,
        "grpo_epochs": 10,
        "minibatches": 1,
        "lr": 1e-2,
        "beta": 0.04,
        "ent_coef": 0.0,
        "max_grad_norm": 1.0,
    },
    "train": {
        "max_env_steps": 200_000,  # stop once the cumulative env steps reach this
        "max_iterations": None,  # stop after this many iterations in total (None: no limit)
        "eval_every": 5,  # greedy evaluation every K iterations (0: only at the end)
        "eval_episodes": 100,
        "checkpoint_every": 5,  # checkpoint.pt every K iterations (0: only at the end)
        "early_stop": True,  # stop at the first evaluation whose mean reaches the threshold
        "hidden": 64,  # width of the policy MLP's two hidden layers
    },
}
# ---------------------------------------------------------------------------------------------

SOLVED_THRESHOLD = 475.0  # CartPole-v1's reward threshold (gymnasium's spec)
ENV_ID = "CartPole-v1"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
LOG_EVERY = 10  # plain-log cadence (iterations) when stderr is not a terminal

# train option -> (minimum value, None allowed)
_TRAIN_LIMITS = {"max_env_steps": (1, False), "max_iterations": (1, True), "eval_every": (0, False),
                 "eval_episodes": (1, False), "checkpoint_every": (0, False), "hidden": (1, False)}
# options that must match the checkpoint on --resume (the others may change, e.g. a longer budget)
_RESUME_FIXED = ("hidden",)


class UsageError(Exception):
    """Bad input from the user: reported on stderr with exit code 2, without a traceback."""


def add_parser(sub, name: str) -> None:
    from .train_vlm import add_vlm_arguments

    d = CARTPOLE_DEFAULTS["train"]
    train = sub.add_parser(name, help="train with GRPO: cartpole, or vlm (Qwen2-VL family)",
                           description="Train a policy with the verified GRPO loop.")
    envs = train.add_subparsers(dest="env", required=True, metavar="ENV")
    add_vlm_arguments(envs.add_parser(
        "vlm", help="a Qwen2-VL / Qwen2.5-VL model (needs the vlm extra)",
        description="GRPO on an image-text model; see grpo_harness/train_vlm.py for the options' story."))
    p = envs.add_parser(
        "cartpole", help="CartPole-v1 with a small MLP policy",
        description="Train CartPole-v1 with the verified GRPO loop. Precedence: CartPole defaults < "
        "--config < --set < --seed.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML or JSON file of GRPOConfig keys (flat, or [grpo]/[train] sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one GRPOConfig key; VALUE is a JSON literal or a string (repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR", help="run folder (default runs/cartpole-<timestamp>)")
    p.add_argument("--seed", type=int, help="GRPOConfig.seed (rollouts, start states, init)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt with its saved config")
    p.add_argument("--max-env-steps", type=int, metavar="N",
                   help=f"total env-step budget (default {d['max_env_steps']:,})")
    p.add_argument("--max-iterations", type=int, metavar="N", help="total iteration budget (default: none)")
    p.add_argument("--eval-every", type=int, metavar="K",
                   help=f"greedy evaluation every K iterations, 0 = only at the end (default {d['eval_every']})")
    p.add_argument("--eval-episodes", type=int, metavar="N",
                   help=f"episodes per evaluation (default {d['eval_episodes']})")
    p.add_argument("--checkpoint-every", type=int, metavar="K",
                   help=f"checkpoint every K iterations, 0 = only at the end (default {d['checkpoint_every']})")
    p.add_argument("--no-early-stop", dest="early_stop", action="store_false", default=None,
                   help=f"keep training after an evaluation mean reaches {SOLVED_THRESHOLD:g}")
    p.add_argument("--hidden", type=int, metavar="H", help=f"policy hidden width (default {d['hidden']})")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: a small MLP gains nothing from more, and "
                   "extra threads spin against other processes on a busy machine)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    if args.threads < 1:
        print(f"grpo-harness train: error: --threads={args.threads} must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    torch.set_num_threads(args.threads)
    try:
        return _Run(args).main()
    except UsageError as e:
        print(f"grpo-harness train: error: {e}", file=sys.stderr)
        return EXIT_USAGE


# --- configuration ---------------------------------------------------------------------------

def parse_set(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value); the value is a JSON literal if it parses, else a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key, value


def _load_toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError(f"cannot read {path}: TOML needs Python 3.11+ or the 'tomli' package "
                             "(pip install tomli); or pass a .json config") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None


def load_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a TOML or JSON config file -> (GRPOConfig values, training options)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = _load_toml(path)
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} is not valid JSON: {e}") from None
        else:
            raise UsageError(f"config file {path}: unknown format {suffix or '(no suffix)'!r}; use .toml or .json")
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a table of keys")
    if isinstance(data.get("grpo"), dict):  # sectioned form, as config.json is written
        extra = sorted(set(data) - {"env", "grpo", "train"})
        if extra:
            raise UsageError(f"{path}: unknown section(s) {', '.join(map(repr, extra))}; "
                             "expected 'grpo' and 'train'")
        if data.get("env", "cartpole") != "cartpole":
            raise UsageError(f"{path} is a config for env {data['env']!r}, not cartpole")
        train = data.get("train", {})
        if not isinstance(train, dict):
            raise UsageError(f"{path}: 'train' must be a table")
        unknown = sorted(set(train) - set(CARTPOLE_DEFAULTS["train"]))
        if unknown:
            raise UsageError(f"{path}: unknown training option(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(CARTPOLE_DEFAULTS['train'])}")
        return dict(data["grpo"]), dict(train)
    return data, {}


def _coerce_floats(values: dict[str, Any]) -> dict[str, Any]:
    """Ints given for float fields become floats (``--set beta=0`` -> 0.0), so config.json and
    resume comparisons see one spelling."""
    from grpo_core.config import GRPOConfig

    floats = {f.name for f in dataclasses.fields(GRPOConfig) if isinstance(f.default, float)}
    return {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in values.items()}


def _make_config(values: dict[str, Any]):
    from grpo_core.config import GRPOConfig

    for key in values:
        if key in CARTPOLE_DEFAULTS["train"]:
            raise UsageError(f"{key!r} is a training option, not a GRPOConfig key: use "
                             f"--{key.replace('_', '-')}")
    try:
        return GRPOConfig.from_dict(_coerce_floats(values))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _check_train(train: dict[str, Any]) -> None:
    for key, (low, nullable) in _TRAIN_LIMITS.items():
        value = train[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{key.replace('_', '-')}={value!r} is invalid: expected an int >= {low}")
    if not isinstance(train["early_stop"], bool):
        raise UsageError(f"early_stop={train['early_stop']!r} is invalid: expected true or false")


def explicit_settings(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the user set on this invocation: (GRPOConfig values, training options)."""
    grpo: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if args.config is not None:
        g, t = load_config_file(args.config)
        grpo.update(g)
        train.update(t)
    for item in args.overrides:
        key, value = parse_set(item)
        grpo[key] = value
    if args.seed is not None:
        grpo["seed"] = args.seed
    for key in CARTPOLE_DEFAULTS["train"]:
        value = getattr(args, key, None)
        if value is not None:
            train[key] = value
    return grpo, train


# --- RNG state (checkpointed so that a resumed process continues every global stream) --------

def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    npst = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "numpy": {"bit_generator": npst["bit_generator"],
                      "key": torch.from_numpy(npst["state"]["key"].astype(np.int64)),
                      "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                      "gauss": float(npst["gauss"])},
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))




# --- the run -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Progress:
    """Run-level counters that are saved with the checkpoint."""

    env_steps: int = 0
    wall_time: float = 0.0
    eval_index: int = 0  # evaluation rounds consumed by periodic evaluations
    best_eval: float | None = None
    solved: dict[str, Any] | None = None  # iteration, env_steps, wall_time, eval_mean


class _Run:
    def __init__(self, args):
        self.args = args

    # setup ------------------------------------------------------------------------------------
    def _resolve(self) -> None:
        import torch

        args = self.args
        grpo_given, train_given = explicit_settings(args)
        self.checkpoint: dict[str, Any] | None = None
        if args.resume:
            if args.out is None:
                raise UsageError("--resume needs --out DIR (the run folder to continue)")
            self.out = Path(args.out)
            path = self.out / CHECKPOINT_FILE
            if not path.is_file():
                raise UsageError(f"cannot resume: no checkpoint at {path}")
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error here
                raise UsageError(f"cannot resume: {path} is not a readable checkpoint ({e})") from None
            if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("env") != "cartpole":
                raise UsageError(f"cannot resume: {path} is not a cartpole checkpoint of this version")
            saved = _make_config(ckpt["trainer"]["config"])
            asked = _make_config({**saved.to_dict(), **grpo_given})
            diffs = [f"{k} (checkpoint {getattr(saved, k)!r}, given {getattr(asked, k)!r})"
                     for k in saved.field_names() if getattr(saved, k) != getattr(asked, k)]
            if diffs:
                raise UsageError("cannot resume: --config/--set/--seed disagree with the checkpoint's "
                                 "config: " + "; ".join(diffs) + ". Drop them (the saved config is used) "
                                 "or start a new run in another --out")
            self.cfg = saved
            self.train = {**CARTPOLE_DEFAULTS["train"], **ckpt["train"], **train_given}
            for key in _RESUME_FIXED:
                if self.train[key] != ckpt["train"][key]:
                    raise UsageError(f"cannot resume: {key}={self.train[key]} differs from the "
                                     f"checkpoint's {ckpt['train'][key]}")
            self.checkpoint = ckpt
        else:
            self.cfg = _make_config({**CARTPOLE_DEFAULTS["grpo"], **grpo_given})
            self.train = {**CARTPOLE_DEFAULTS["train"], **train_given}
            self.out = Path(args.out) if args.out is not None else \
                Path("runs") / f"cartpole-{time.strftime('%Y%m%d-%H%M%S')}"
            from .trainlog import METRICS_FILE

            for name in (CHECKPOINT_FILE, METRICS_FILE):
                if (self.out / name).exists():
                    raise UsageError(f"{self.out} already holds a run ({name}); pass --resume to "
                                     "continue it, or choose another --out")
        _check_train(self.train)

    def _write_config(self) -> None:
        from .trainlog import atomic_write

        doc = {"env": "cartpole", "grpo": self.cfg.to_dict(), "train": self.train}
        atomic_write(self.out / CONFIG_FILE,
                     lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))

    # checkpointing ----------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """The state after the last completed iteration; what checkpoint.pt is written from."""
        return {"format": CHECKPOINT_FORMAT, "env": "cartpole",
                "trainer": copy.deepcopy(self.trainer.state_dict()), "train": dict(self.train),
                **copy.deepcopy(dataclasses.asdict(self.state)), "rng": _rng_state()}

    def _save_checkpoint(self) -> Path:
        import torch

        from .trainlog import atomic_write

        path = self.out / CHECKPOINT_FILE
        snap = self.snapshot
        atomic_write(path, lambda tmp: torch.save(snap, tmp))
        return path

    # evaluation and stopping ------------------------------------------------------------------
    def _budget_reached(self) -> str | None:
        t = self.train
        if t["max_iterations"] is not None and self.trainer.iteration >= t["max_iterations"]:
            return f"iteration budget ({t['max_iterations']:,} iterations)"
        if self.state.env_steps >= t["max_env_steps"]:
            return f"env-step budget ({t['max_env_steps']:,} steps)"
        return None

    def _evaluate(self, round_: int) -> tuple[float, float]:
        returns = self.adapter.evaluate(self.train["eval_episodes"], round_=round_)
        return float(returns.mean()), float(returns.std())

    def _wall(self) -> float:
        return self.wall_base + (time.perf_counter() - self.session_start)

    # main -------------------------------------------------------------------------------------
    def main(self) -> int:
        self._resolve()

        from adapters.cartpole import CartPoleAdapter
        from grpo_core.loop import GRPOTrainer, NonFiniteLossError

        from .trainlog import CURVE_FILE, METRICS_FILE, TB_DIR, MetricsLog, Progress, drop_records_from

        self.out.mkdir(parents=True, exist_ok=True)
        self.adapter = CartPoleAdapter(seed=self.cfg.seed, hidden=self.train["hidden"])
        self.trainer = GRPOTrainer(self.adapter, self.cfg)
        self.state = _Progress()
        notes = []
        if self.checkpoint is not None:
            ck = self.checkpoint
            self.trainer.load_state_dict(ck["trainer"])
            _set_rng_state(ck["rng"])
            self.state = _Progress(**{f.name: ck[f.name] for f in dataclasses.fields(_Progress)})
            dropped = drop_records_from(self.out / METRICS_FILE, self.trainer.iteration)
            if dropped:
                notes.append(f"dropped {dropped} metrics line(s) past the checkpoint's iteration "
                             f"{self.trainer.iteration} (they are regenerated)")
        self._write_config()
        self.snapshot = self._snapshot()
        start_iteration, start_steps = self.trainer.iteration, self.state.env_steps
        self.wall_base, self.session_start = self.state.wall_time, time.perf_counter()

        log = MetricsLog(self.out, purge_step=self.state.env_steps if self.checkpoint else None)
        progress = Progress(self.train["max_env_steps"], self.state.env_steps, every=LOG_EVERY)
        verb = f"resuming at iteration {start_iteration}" if self.checkpoint else "training"
        progress.write(f"{verb} {ENV_ID} -> {self.out} (seed {self.cfg.seed}, "
                       f"{self.cfg.groups_per_iteration}x{self.cfg.group_size} episodes/iteration, "
                       f"budget {self.train['max_env_steps']:,} env steps)")
        for note in notes:
            progress.write(note)

        t = self.train
        stop: str | None = None
        exit_code = 0
        try:
            if self.state.solved is not None and t["early_stop"]:
                stop = "already solved (pass --no-early-stop to keep training)"
            else:
                stop = self._budget_reached()
            while stop is None:
                stats = self.trainer.step()
                env_steps = self.state.env_steps + int(stats["env_steps"])
                record = {k: v for k, v in stats.items() if k != "env_steps"}
                record["iteration_env_steps"] = int(stats["env_steps"])
                record["env_steps"] = env_steps
                done = self.trainer.iteration
                periodic = t["eval_every"] > 0 and done % t["eval_every"] == 0
                last = ((t["max_iterations"] is not None and done >= t["max_iterations"])
                        or env_steps >= t["max_env_steps"])
                eval_index, solved, best = self.state.eval_index, self.state.solved, self.state.best_eval
                if periodic or last:
                    # A final-only evaluation reuses the next round without consuming it, so a
                    # longer (resumed) run evaluates on the same start states as a straight one.
                    mean, std = self._evaluate(eval_index)
                    record["eval_mean"], record["eval_std"] = mean, std
                    eval_index += int(periodic)
                    best = mean if best is None else max(best, mean)
                record["wall_time"] = self._wall()
                newly_solved = solved is None and record.get("eval_mean", -1.0) >= SOLVED_THRESHOLD
                if newly_solved:
                    solved = {"iteration": stats["iteration"], "env_steps": env_steps,
                              "wall_time": record["wall_time"], "eval_mean": record["eval_mean"]}
                with defer_sigint():
                    log.write(record)
                    self.state = _Progress(env_steps, record["wall_time"], eval_index, best, solved)
                    self.snapshot = self._snapshot()
                elapsed = time.perf_counter() - self.session_start
                progress.update(record, int(stats["env_steps"]), (env_steps - start_steps) / max(elapsed, 1e-9))
                if newly_solved:
                    progress.write(f"solved: eval mean {solved['eval_mean']:.1f} >= {SOLVED_THRESHOLD:g} at "
                                   f"iteration {solved['iteration']}, {env_steps:,} env steps, "
                                   f"{solved['wall_time']:.1f} s")
                if t["checkpoint_every"] > 0 and done % t["checkpoint_every"] == 0:
                    self._save_checkpoint()
                if solved is not None and t["early_stop"]:
                    stop = f"solved (eval mean >= {SOLVED_THRESHOLD:g})"
                elif last:
                    stop = self._budget_reached()
        except KeyboardInterrupt:
            exit_code = EXIT_INTERRUPTED
            stop = "interrupted (Ctrl-C)"
        except NonFiniteLossError as e:
            exit_code = 1
            stop = f"non-finite loss: {e}"
        finally:
            progress.close()
            log.close()

        # Outputs; a second Ctrl-C is held until they are written.
        with defer_sigint():
            ckpt_path = self._save_checkpoint()
            from .trainlog import plot_curve, read_metrics

            curve = self.out / CURVE_FILE
            solved = self.state.solved
            plot_curve(read_metrics(self.out / METRICS_FILE), curve, threshold=SOLVED_THRESHOLD,
                       solved_env_steps=solved["env_steps"] if solved else None,
                       title=f"{ENV_ID} GRPO (seed {self.cfg.seed})")
        self._summary(stop, exit_code, start_iteration, ckpt_path, curve, self.out / METRICS_FILE,
                      self.out / TB_DIR)
        return exit_code

    def _summary(self, stop, exit_code, start_iteration, ckpt_path, curve, metrics, tb) -> None:
        s = self.state
        it = self.snapshot["trainer"]["iteration"]  # the last completed (committed) iteration
        lines = [f"stopped: {stop}, after {it} iteration(s) ({it - start_iteration} this session), "
                 f"{s.env_steps:,} env steps, {s.wall_time:.1f} s"]
        if s.solved:
            lines.append(f"{ENV_ID}: SOLVED (eval mean {s.solved['eval_mean']:.1f} >= {SOLVED_THRESHOLD:g}) "
                         f"at iteration {s.solved['iteration']}, after {s.solved['env_steps']:,} env steps "
                         f"and {s.solved['wall_time']:.1f} s")
        else:
            best = "none yet" if s.best_eval is None else f"{s.best_eval:.1f}"
            lines.append(f"{ENV_ID}: not solved (best eval mean {best}, threshold {SOLVED_THRESHOLD:g}) "
                         f"after {s.env_steps:,} env steps and {s.wall_time:.1f} s")
        lines += [f"curve:       {curve}", f"metrics:     {metrics}", f"checkpoint:  {ckpt_path}",
                  f"config:      {self.out / CONFIG_FILE}", f"tensorboard: tensorboard --logdir {tb}"]
        if exit_code == EXIT_INTERRUPTED:
            lines.append(f"resume with: grpo-harness train cartpole --out {self.out} --resume")
        print("\n".join(lines), flush=True)
