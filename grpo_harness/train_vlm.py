"""``grpo-harness train vlm``: GRPO on an image-text model with the verified loop.

Two ways to run it:

- ``--task colours``: the synthetic colours task (``adapters.vlm_tasks``). Without ``--model``
  a tiny random Qwen2-VL (``--family qwen2_5_vl`` for Qwen2.5-VL) is built into ``OUT/model``
  first; with the defaults (below) it learns on one CPU thread in well under a minute.
- ``--data PATH --reward module:function [--reward ...] --model ID_OR_PATH``: your rows and
  TRL-style reward functions. PATH is a folder saved with ``datasets``' ``save_to_disk``, or a
  parquet, CSV, JSON or JSONL file; columns ``image`` (or ``images``: a path, bytes, a
  ``{"bytes", "path"}`` dict, or a list of them) and ``prompt`` (text, or TRL's chat messages),
  anything else goes to the reward functions; ``--column image=img`` renames (all in
  ``grpo_harness.datasets_io``). Every row's images are decoded once when the rows are loaded,
  so a bad one is named by its row before any model is loaded. A reward function that scores
  no sample of an iteration (None for all) stops the run, naming it.

Before the first iteration (also on ``--resume``) the preflight checks of ``adapters.vlm_preflight``
run on a few real samples and print a table; if one fails, the command exits 1 naming it
(``--skip-preflight`` skips them). ``--lora-rank R`` trains LoRA adapters (``adapters.vlm_lora``);
its checkpoints then hold only the adapter tensors and the optimizer state, not the base model.

This module says what to train; the run folder, configuration layering (``VLM_DEFAULTS`` <
``--config`` < ``--set`` < ``--seed``), checkpoints, signals and resume are ``grpo_harness.run``'s.
The learning rate at iteration i is ``lr * (1 - i / max_iterations)`` (``--lr-schedule linear``,
the default) or ``lr`` (``constant``), computed from i each iteration, so a resumed run with
another ``--max-iterations`` follows the schedule of its new budget. The run folder also gets
``final/`` at the end (the trained model and processor, loadable with ``from_pretrained``; with
LoRA, the base model with the policy adapter merged in). Prompts, sampling and minibatch
orders are seeded from (seed, iteration), so a resumed run writes the same metrics as an
uninterrupted one. TensorBoard plots against the iteration. Every ``--completions-every``
iterations and at the end, sample completions with their rewards go to ``completions.jsonl``
and a table in the progress output (``grpo_harness.completions``); every iteration's metrics
include ``frac_reward_zero_std``, the share of groups without reward spread.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any

from .run import (TrainingRun, UsageError, add_run_arguments, check_int, finite_float, one_line,
                  raised_in, run_command)
from .trainlog import BarWriter

# ---------------------------------------------------------------------------------------------
# VLM defaults: the one place to tune them. Measured with these defaults on the tiny model and
# the colours task (K = 4, 64 prompts, one CPU thread, ~0.08 s per iteration): the rolling mean
# reward (25 iterations) went ~0.05 -> 0.8 at iteration 148 / 138 / 164 (seeds 0 / 1 / 2,
# ~12 s) and ended at 0.97-0.99, greedy held-out reward 1.0; Qwen2.5-VL seed 0: 146.
# With 2 prompts per iteration (the notes' TRL setting) seed 0 sat at 0.75 for ~400 iterations
# (3 of 4 colours certain, no reward variance left in the 4th colour's groups).
# Outcome reward on the last token with gamma = 1 gives every completion token the reward;
# statistics over sequences is standard GRPO; beta = 0 as TRL's current default.
VLM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {
        "group_size": 8,
        "groups_per_iteration": 4,
        "gamma": 1.0,
        "grpo_epochs": 1,
        "minibatches": 1,
        "beta": 0.0,
        "update_ref_model_freq": 0,
        "stats_over": "sequences",
        "scale": "group",
        "adv_eps": 1e-4,
        "loss_agg": "token-mean",
        "lr": 1e-3,
        "max_grad_norm": 1.0,
        # Groups whose samples all scored the same are dropped (DAPO), and the prompts of the
        # unsolved ones (below the best outcome seen) sampled again, up to 2 more times. On the
        # tuning seeds 100-109 the old defaults stalled on one colour on 101 and 107; DAPO's fresh
        # redraws and these retries (2 or 4 rounds) learned all 10. Per seed to a rolling 0.8
        # against the old defaults: 2 retries 0.95x the wall seconds (side by side), 1.01x the
        # completions, 0.81x the iterations; 4 retries 1.00x, 0.99x, 0.77x (2 vs 4: within the
        # noise of the wall times); fresh redraws 1.27x the completions. Report seeds 1000-1019
        # with TRL: benchmarks/RESULTS.md, "VLM reliability". Off under torchrun (not supported
        # there yet).
        "dynamic_sampling": True,
        "dynamic_sampling_redraw": "retry",
        "dynamic_sampling_rounds": 2,
    },
    "train": {
        "max_iterations": 400,
        "lr_schedule": "linear",
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": None,  # 2 for --task colours, 32 for --data
        "eval_every": 100,
        "checkpoint_every": 100,
        "checkpoint_minutes": 10.0,
        "target_reward": 0.8,
        "window": 25,
        "precision": None,  # "32" on CPU, "bf16-mixed" on CUDA (grpo_core.precision)
        "completions_every": 10,
        "completions_per_group": 4,
        "reward_timeout": 600.0,  # seconds one reward call may take; 0 = no limit
        "engine": "policy",  # what samples: the policy itself, or copy-bf16 (adapters/vlm_engine.py)
    },
}
# The task and the model: defaults of the flags that define them (saved in config.json and
# taken from there on --resume; a flag given on resume must agree with the saved value).
TASK_DEFAULTS: dict[str, Any] = {"data": None, "eval_data": None, "column": [], "reward": [], "reward_weight": [],
                                 "colours": 4, "num_prompts": 64, "eval_size": 32}
MODEL_DEFAULTS: dict[str, Any] = {"model": None, "family": "qwen2_vl", "lora_rank": 0}
# ---------------------------------------------------------------------------------------------

LOG_EVERY = 10
TINY_MODEL = "tiny"
"""``--model tiny``: build a tiny random model into the run folder (``model/``), also for --data,
from the data's words (``data_words``); a folder named tiny is passed as ./tiny."""
TINY_VOCABULARY = 20000
"""Most words of --data a tiny model's tokenizer holds (the most frequent ones)."""
LR_SCHEDULES = ("linear", "constant")
PRECISIONS = ("32", "bf16-mixed", "bf16-true")
"""``grpo_core.precision.PRECISIONS``, spelled out so that parsing the command line imports no
torch (a test holds them equal)."""
ENGINES = ("policy", "copy-bf16")
"""``adapters.vlm_engine.ENGINES``, spelled out for the same reason (a test holds them equal)."""
DTYPE_TO_PRECISION = {"float32": "32", "bfloat16": "bf16-true"}
"""What the retired ``--dtype`` meant, in ``--precision`` names (read from older run folders)."""
HELP = "a Qwen2-VL / Qwen2.5-VL model (needs the vlm extra)"
DESCRIPTION = "GRPO on an image-text model; see grpo_harness/train_vlm.py for the options' story."


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train vlm`` options to ``p`` and set ``run`` as its default."""
    _add_task_arguments(p.add_argument_group("task and model"))
    _add_training_arguments(p.add_argument_group("run"))
    p.set_defaults(run=run_vlm)
    return p


def _add_task_arguments(src) -> None:
    from adapters.vlm_tasks import TASKS

    td, md = TASK_DEFAULTS, MODEL_DEFAULTS
    src.add_argument("--task", choices=list(TASKS), help="built-in task: colours (one word), sequence or "
                     "sequence-words (three words; adapters.vlm_tasks) (default: colours unless --data)")
    src.add_argument("--data", type=Path, metavar="PATH",
                     help="training rows: a folder saved with datasets' save_to_disk, or a .parquet, .csv, "
                     ".json or .jsonl file; columns image (or images) and prompt, any others go to the reward "
                     "functions (formats: grpo_harness/datasets_io.py)")
    src.add_argument("--eval-data", type=Path, metavar="PATH", help="held-out rows for greedy evaluation "
                     "(same formats)")
    src.add_argument("--column", action="append", metavar="TARGET=SOURCE",
                     help="use the data's column SOURCE as TARGET, e.g. image=img or answer=label (repeatable)")
    src.add_argument("--reward", action="append", metavar="MODULE:FN",
                     help="reward function reward_fn(prompts, completions, **columns), as package.module:fn or "
                     "path/file.py:fn (repeatable; default for colours: first word equals the answer)")
    src.add_argument("--reward-weight", action="append", type=finite_float, metavar="W",
                     help="weight of each --reward, in order (default 1.0 each)")
    src.add_argument("--model", metavar="ID_OR_PATH",
                     help="model + processor to load: a local folder, or a Hub id already in the local cache; "
                     "tiny: build a tiny random one into the run folder, for --data from the data's words, to try "
                     "a run offline (default for the built-in tasks)")
    src.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"],
                     help=f"architecture of the tiny model built when --model is not given (default {md['family']})")
    src.add_argument("--colours", type=int, metavar="K", help=f"colours in the task, 2..6 (default {td['colours']})")
    src.add_argument("--num-prompts", type=int, metavar="N", help=f"colours training prompts (default {td['num_prompts']})")
    src.add_argument("--eval-size", type=int, metavar="N", help=f"colours held-out prompts (default {td['eval_size']})")
    src.add_argument("--lora-rank", type=int, metavar="R",
                     help="train LoRA adapters of rank R instead of the full model; the reference is a second "
                     "adapter on the same base weights (0: off, default; needs peft, the lora extra)")


def _add_training_arguments(run) -> None:
    d = VLM_DEFAULTS["train"]
    add_run_arguments(run, d, threads="1 for the built tiny model, where more threads only wait on each "
                      "other, else torch's choice")
    run.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                     help="linear decay to 0 over --max-iterations (default) or constant")
    run.add_argument("--temperature", type=finite_float, help=f"sampling temperature (default {d['temperature']})")
    run.add_argument("--top-p", type=finite_float, help=f"nucleus sampling mass (default {d['top_p']})")
    run.add_argument("--max-new-tokens", type=int, metavar="N", help="completion length cap (default 2 for "
                     "colours, 32 for --data)")
    run.add_argument("--target-reward", type=finite_float, metavar="R",
                     help=f"report when the rolling mean reward reaches R (default {d['target_reward']})")
    run.add_argument("--stop-at-target", action="store_true", help="stop once the target is reached")
    run.add_argument("--precision", choices=PRECISIONS,
                     help="32: float32 weights and compute; bf16-mixed: float32 master weights and Adam state, "
                     "forward and backward in bf16 (autocast; FSDP: bf16 gathers, float32 gradient reduction); "
                     "bf16-true: bf16 weights and Adam (updates smaller than the weights' bf16 resolution are "
                     "lost; the run says so). Default: 32 on CPU, bf16-mixed on CUDA")
    run.add_argument("--dtype", help=argparse.SUPPRESS)  # retired: refused with what replaced it
    run.add_argument("--engine", choices=ENGINES,
                     help="what samples the completions: the policy itself (default), or copy-bf16, a bf16 copy of "
                     "it synced with the trainer's weights before every rollout, whose log-probs differ from the "
                     "trainer's by rounding: the loop measures the mismatch (mismatch_kl, is_ratio_*) and corrects "
                     "it (engine_correction, TIS by default); kept on --resume (adapters/vlm_engine.py)")
    run.add_argument("--completions-every", type=int, metavar="K",
                     help="log sample completions every K iterations, 0 = only at the end (default "
                     f"{d['completions_every']}): completions.jsonl and a table in the progress output")
    run.add_argument("--completions-per-group", type=int, metavar="N",
                     help=f"completions of each group shown and logged (default {d['completions_per_group']})")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument("--deterministic", action="store_true",
                     help="on CUDA: deterministic kernels (torch.use_deterministic_algorithms, the cuBLAS workspace "
                     "setting, the math attention backend), so that two runs of one seed, and a resumed run and an "
                     "uninterrupted one, agree bit for bit; slower. Without it a CUDA run agrees only to rounding "
                     "(atomics in the attention backward). On CPU runs are deterministic either way")
    run.add_argument("--tf32", action="store_true",
                     help="on CUDA with --precision 32: float32 matmuls on TensorFloat-32 tensor cores (faster, 10 "
                     "mantissa bits; off by default)")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute activations in the backward pass (less memory, ~30%% more time; "
                     "for real models on a GPU)")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard the model over the ranks with FSDP2 instead of replicating it "
                     "(DDP); needs --set micro_batch_size=N and full fine-tuning (grpo_harness.launch)")
    from adapters.vlm_rewards import SLOW_AFTER_S  # no torch: the command line stays light

    run.add_argument("--reward-timeout", type=finite_float, metavar="S",
                     help="stop when one call of a reward function takes more than S seconds, naming it (after "
                     f"checkpointing the finished iterations); 0 = no limit (default {d['reward_timeout']:g}). A "
                     f"function still running after {SLOW_AFTER_S:g} s is named in the progress output")
    run.add_argument("--preflight-bound", type=finite_float, metavar="NATS",
                     help="bound of the preflight's logprob_consistency row (its statistic stays: the max in "
                     "float32, the mean in bf16); default by device and precision (adapters/vlm_preflight.py). "
                     "The row prints the measured max and mean: set this from a first GPU run's numbers")
    run.add_argument("--skip-preflight", action="store_true",
                     help="do not run the preflight checks (log-prob consistency, reference refresh, finite "
                     "loss, KL gradient, estimator kit; see adapters.vlm_preflight) that otherwise run before "
                     "training and refuse to train when one fails")


def run_vlm(args) -> int:
    """Run ``train vlm``; the exit status (0 ok, 1 failed, 2 usage error, 130/143 signal)."""
    return run_command(VLMRun, args)


# --- checks of the user's inputs -----------------------------------------------------------------

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (torch's reproducibility notes)."""


def configure_cuda(device: str, *, deterministic: bool, tf32: bool = False) -> None:
    """Settings of a run on ``device`` (nothing on CPU, where runs are deterministic already).

    On CUDA: cuDNN's fused attention is turned off (PyTorch issue 196678, TRL issue 7181: with an
    explicit attention mask, which the training forward passes whenever completion lengths
    differ, some sequence lengths give NaN gradients on H100/H200 with torch 2.13); the flash,
    memory-efficient and math backends remain. ``deterministic``: ``CUBLAS_WORKSPACE_CONFIG`` (set
    before the first cuBLAS call, which happens after this), ``torch.use_deterministic_algorithms``
    and the math attention backend only (the fused backends' backward uses atomics). ``tf32``:
    float32 matmuls on TensorFloat-32 tensor cores (10 mantissa bits: faster, less precise; off
    by default, as torch has it)."""
    import os

    import torch

    if not device.startswith("cuda"):
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    if tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)


def eval_share(rows, rank: int, size: int) -> list:
    """Rank ``rank``'s share of the held-out ``rows``: every ``size``-th one from ``rank`` on."""
    return [rows[i] for i in range(rank, len(rows), size)]


def merge_eval(reward_sum: float, samples: int) -> dict[str, float]:
    """The evaluation metrics from the ranks' summed rewards and scored samples."""
    return {"eval_reward_mean": reward_sum / samples if samples else math.nan, "eval_samples": samples}


def rank_device(device: str, world) -> str:
    """The device of this process: ``device``, except under torchrun with CUDA, where every rank
    takes ``cuda:LOCAL_RANK`` (``world.local_rank``; ranks that shared one GPU would end in NCCL's
    "Duplicate GPU detected"). An explicit ``cuda:N`` that is not the rank's own is refused."""
    if world is None or not device.startswith("cuda"):
        return device
    own = f"cuda:{world.local_rank}"
    if device not in ("cuda", own):
        raise UsageError(f"--device {device}: under torchrun each rank uses the GPU of its local rank "
                         f"({own} for local rank {world.local_rank}); give --device cuda (or auto), and choose "
                         "the GPUs with CUDA_VISIBLE_DEVICES")
    return own


def lr_factor(schedule: str, iteration: int, total: int) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based) of a ``total``-iteration run."""
    return max(0.0, 1.0 - iteration / total) if schedule == "linear" else 1.0


def resolve_device(spec: str) -> str:
    """``--device`` -> a device this torch build and machine have (UsageError otherwise)."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {spec!r} is not a device: {one_line(e)}") from None
    if dev.type == "cpu":
        return spec
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return spec
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {spec}: no {dev.type} device is available to this torch build")
    return spec


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) <= 2 and all(parts) and not spec.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for part in parts for c in part))


def resolve_model_source(spec: str) -> str:
    """``--model`` -> a local folder to load from, failing fast in one line: a missing folder is
    named as such; a Hub id is looked up in the local cache, and when it is not there the Hub
    is asked once (no minute of retries when there is no network)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UsageError(f"--model {spec}: is a file; expected a folder holding config.json, the weights "
                         "and the processor files")
    if not _looks_like_hub_id(spec) or path.parent.is_dir() and str(path.parent) not in ("", "."):
        raise UsageError(f"--model {spec}: folder {spec} does not exist")
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: ask the Hub below
        pass
    hint = (f"download it where there is network (hf download {spec}) and point --model at the folder, "
            "or set HF_HOME to a cache that holds it")
    try:
        huggingface_hub.model_info(spec, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise UsageError(f"--model {spec}: no such model on the Hugging Face Hub (or it is private); "
                         "for a local model give its folder") from None
    except Exception as e:  # noqa: BLE001 - offline, DNS failure, timeout, HF_HUB_OFFLINE
        raise UsageError(f"--model {spec}: no such folder, and as a Hub id it is not in the local Hugging "
                         f"Face cache while the Hub cannot be reached ({type(e).__name__}); {hint}") from None
    return spec


def data_words(*tables) -> list[str]:
    """The words of the rows' prompts and text columns (split as the tiny tokenizer splits,
    lower-cased), the most frequent ``TINY_VOCABULARY`` first: a tiny model built from them can
    read the prompts and say the answers. Image values (bytes, ``{"bytes", "path"}``) are
    skipped; ``tables``: ``DataRows`` (or None)."""
    import collections
    import re

    counts: collections.Counter = collections.Counter()

    def walk(value) -> None:
        if isinstance(value, str):
            counts.update(w.lower() for w in re.findall(r"\w+|[^\w\s]+", value))
        elif isinstance(value, dict):
            if "bytes" not in value:
                for v in value.values():
                    walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for rows in tables:
        if rows is None:
            continue
        for i in range(len(rows)):
            walk({k: v for k, v in dict(rows.table[i]).items() if k not in ("image", "images")})
    return [w for w, _ in counts.most_common(TINY_VOCABULARY)]


def load_rewards(specs: list[str]):
    """``--reward`` specs -> functions; anything that goes wrong importing one is one line."""
    from adapters.vlm_rewards import load_reward

    funcs = []
    for spec in specs:
        module = spec.rpartition(":")[0]
        if module.endswith(".py") and not Path(module).is_file():
            raise UsageError(f"--reward {spec}: file {module} does not exist")
        try:
            funcs.append(load_reward(spec))
        except ValueError as e:
            raise UsageError(f"--reward {spec}: {one_line(e)}") from None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed to import
            where = f" ({e.filename}, line {e.lineno})" if isinstance(e, SyntaxError) else ""
            raise UsageError(f"--reward {spec}: cannot import it: {type(e).__name__}: "
                             f"{getattr(e, 'msg', None) or one_line(e)}{where}") from None
    return funcs


@contextlib.contextmanager
def recording_collect_errors(adapter, errors: list):
    """Within: an exception raised by ``adapter.collect`` is appended to ``errors`` (and raised)."""
    original = adapter.collect

    def collect(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as e:
            errors.append(e)
            raise

    adapter.collect = collect
    try:
        yield
    finally:
        del adapter.collect


def _rolling(values: list[float], window: int) -> float:
    tail = [v for v in values[-window:] if not math.isnan(v)]
    return sum(tail) / len(tail) if tail else math.nan


# --- progress and curve --------------------------------------------------------------------------

class _Progress(BarWriter):
    """tqdm over iterations on a terminal, else a plain line every LOG_EVERY iterations."""

    def __init__(self, total: int, initial: int, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True,
                            file=self.stream, desc="iterations")

    def update(self, record: dict, rolling: float) -> None:
        ev = record.get("eval_reward_mean")
        if self.bar is not None:
            post = {"reward": f"{record['reward_mean']:.2f}", "avg": f"{rolling:.2f}",
                    "len": f"{record['completion_len_mean']:.1f}"}
            if ev is not None:
                post["eval"] = f"{ev:.2f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif ev is not None or (record["iteration"] + 1) % LOG_EVERY == 0:
            extra = f" | eval {ev:.3f}" if ev is not None else ""
            entropy = record.get("sample_entropy", record.get("entropy", math.nan))
            self.write(f"it {record['iteration']:>5} | reward {record['reward_mean']:.3f} | "
                       f"rolling {rolling:.3f} | len {record['completion_len_mean']:.1f} | "
                       f"entropy {entropy:.2f} | grad {record['grad_norm']:.2f} | "
                       f"lr {record['lr']:.2e}{extra} | {record['wall_time']:.1f} s")


def plot_reward_curve(records: list[dict], path: Path, *, window: int, target: float | None,
                      title: str) -> None:
    """Mean reward per iteration, its rolling mean, greedy evaluations and the target (None:
    not drawn); whole iterations on the x axis. Returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .trainlog import atomic_write

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = [r["iteration"] for r in records]
    y = [r.get("reward_mean", math.nan) for r in records]
    ax.plot(x, y, lw=0.6, alpha=0.4, color="C0", label="mean reward per iteration")
    roll = [_rolling(y[: i + 1], window) for i in range(len(y))]
    ax.plot(x, roll, lw=1.6, color="C0", label=f"rolling mean ({window} iterations)")
    ev = [r for r in records if "eval_reward_mean" in r]
    if ev:
        ax.plot([r["iteration"] for r in ev], [r["eval_reward_mean"] for r in ev], "o", color="C1",
                ms=4, label="greedy held-out reward")
    if target is not None:
        ax.axhline(target, ls="--", color="C2", label=f"target {target:g}")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return fig


def curve_target(task: dict[str, Any], train: dict[str, Any]) -> float | None:
    """The target the curve draws: the built-in tasks' rewards lie in [0, 1], where the default
    target means something; a user's reward has its own scale, so only a ``--target-reward``
    the user chose is drawn."""
    target = train["target_reward"]
    if task.get("name") == "data" and target == VLM_DEFAULTS["train"]["target_reward"]:
        return None
    return target


# --- the run -------------------------------------------------------------------------------------

class VLMRun(TrainingRun):
    env = "vlm"
    prog = "grpo-harness train vlm"
    DEFAULTS = VLM_DEFAULTS
    reward_limits = None
    """``adapters.vlm_rewards.RewardLimits`` while ``main`` runs: ``--reward-timeout``."""
    FIXED_TRAIN = ("temperature", "top_p", "max_new_tokens", "precision")
    x_key = "iteration"
    recorder = None
    """The ``CompletionRecorder`` on the adapter (from the first iteration on)."""
    _logged = None
    """The last iteration whose completions were logged in this session."""

    def main(self) -> int:
        """The run with every reward call bounded by ``--reward-timeout`` (set once resolved)."""
        from adapters.vlm_rewards import limits

        with limits() as self.reward_limits:
            return super().main()

    # settings ---------------------------------------------------------------------------------
    def _given(self, defaults: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key in defaults:
            value = getattr(self.args, key, None)
            if value is not None and value != []:
                out[key] = str(value) if isinstance(value, Path) else value
        return out

    def resolve_task(self, saved) -> None:
        args = self.args
        task, model = self._given(TASK_DEFAULTS), self._given(MODEL_DEFAULTS)
        if saved is None:
            if args.data is not None and args.task is not None:
                raise UsageError("give either --task or --data, not both")
            name = "data" if args.data is not None else (args.task or "colours")
            self.task = {"name": name, **TASK_DEFAULTS, **task}
            self.model = {**MODEL_DEFAULTS, **model}
            return
        self.task, self.model = dict(saved.get("task", {})), dict(saved.get("model", {}))
        if args.task is not None and self.task.get("name") != args.task:
            raise UsageError(f"cannot resume: --task {args.task} differs from the run's task {self.task.get('name')!r}")
        for given, kept in ((task, self.task), (model, self.model)):
            for key, value in given.items():
                if value != kept.get(key):
                    raise UsageError(f"cannot resume: --{key.replace('_', '-')} {value!r} differs from the "
                                     f"run's {kept.get(key)!r} (a resumed run keeps its task and model)")

    def check_train(self) -> None:
        t, task, m = self.train, self.task, self.model
        if t["max_new_tokens"] is None:
            from adapters.vlm_tasks import TASKS

            t["max_new_tokens"] = TASKS[task["name"]].max_new_tokens if task["name"] in TASKS else 32
        for key, low in (("max_iterations", 1), ("max_new_tokens", 1), ("window", 1), ("completions_every", 0),
                         ("completions_per_group", 1)):
            check_int(t, key, low)
        self._check_floats()
        limit = t["reward_timeout"]
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < math.inf:
            raise UsageError(f"--reward-timeout={limit!r}: expected a number of seconds >= 0 (0: no limit)")
        if self.reward_limits is not None:
            self.reward_limits.timeout, self.reward_limits.say = (limit or None), self.say
        if getattr(self.args, "dtype", None) is not None:
            raise UsageError(f"--dtype was replaced by --precision: --dtype float32 is --precision 32, --dtype "
                             "bfloat16 is --precision bf16-true (bf16 weights and Adam: small updates are lost); "
                             "--precision bf16-mixed keeps float32 master weights and computes in bf16")
        if t["lr_schedule"] not in LR_SCHEDULES:
            raise UsageError(f"lr_schedule={t['lr_schedule']!r}: expected one of {LR_SCHEDULES}")
        self.device = rank_device(resolve_device(self.args.device), self.world)
        if t["precision"] is None:
            t["precision"] = "bf16-mixed" if self.device.startswith("cuda") else "32"
        if t["precision"] not in PRECISIONS:
            raise UsageError(f"precision={t['precision']!r}: expected one of {', '.join(PRECISIONS)}")
        if task.get("column"):
            from .datasets_io import parse_column_maps

            parse_column_maps(task["column"])
            if task["name"] != "data":
                raise UsageError("--column renames columns of --data; the built-in tasks have their own")
        if task["name"] == "data":
            if not task["reward"]:
                raise UsageError("--data needs at least one --reward module:function")
            if m["model"] is None:
                raise UsageError("--data needs --model ID_OR_PATH (or --model tiny: a tiny random model built from "
                                 "the data's words, to try the run offline)")
        else:
            from adapters.vlm_tasks import colour_names

            try:
                colour_names(task["colours"])
            except (ValueError, TypeError) as e:
                raise UsageError(f"--colours {task['colours']}: {one_line(e)}") from None
            check_int(task, "num_prompts", 1)
            check_int(task, "eval_size", 1)
        if task["reward_weight"] and len(task["reward_weight"]) != len(task["reward"]):
            raise UsageError(f"{len(task['reward_weight'])} --reward-weight for {len(task['reward'])} --reward")
        if task.get("eval_data") is not None and task["name"] != "data":
            raise UsageError(f"--eval-data gives held-out rows for --data; the built-in task {task['name']} makes its "
                             "own (--eval-size N): drop --eval-data, or train on --data")
        if m["model"] not in (None, TINY_MODEL) and getattr(self.args, "family", None) is not None:
            raise UsageError("--family chooses the architecture of the tiny model built when --model is not given; "
                             f"--model {m['model']} brings its own: drop --family")
        check_int(m, "lora_rank", 0)
        self._check_engine()
        self.model_source = None if m["model"] in (None, TINY_MODEL) else resolve_model_source(m["model"])
        self._default_micro_batch()

    def _check_engine(self) -> None:
        """``--engine``: a known one; on resume the run's own (a run folder from before the flag
        sampled with the policy; not in the fingerprint, so that its checkpoints still load)."""
        engine = self.train["engine"]
        if engine not in ENGINES:
            raise UsageError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        saved = getattr(self, "_saved_engine", None)
        if self.resumed and saved is not None and engine != saved:
            raise UsageError(f"cannot resume: engine={engine!r} differs from the run's {saved!r}")
        if engine == "policy":
            return
        if self.model["lora_rank"]:
            raise UsageError(f"--engine {engine} with --lora-rank is not supported: the copy would hold the base "
                             "model and both adapters (drop --engine, or train the full model)")
        if self.world is not None:
            raise UsageError(f"--engine {engine} is not supported under torchrun yet (each rank would copy its "
                             "own replica, or a shard under --fsdp): drop --engine")

    def _default_micro_batch(self) -> None:
        """A new run on CUDA whose micro_batch_size nobody set (``--set``, ``--config``) gets the
        most rows, up to 64, whose log-prob memory (``adapters.vlm.logprob_peak_bytes``: the
        logits, their gradient, the chunked log-prob's temporaries) takes at most 1/8 of the
        GPU's memory, for the model's vocabulary (config.json; 151,936 when it cannot be read)
        and max_new_tokens (README, "Scaling out"). A resumed run keeps its saved value."""
        if not self.device.startswith("cuda") or self.resumed:
            return
        from .run import explicit_settings

        given, _ = explicit_settings(self.args, env=self.env, train_keys=tuple(self.DEFAULTS["train"]))
        if "micro_batch_size" in given:
            return
        import json

        import torch

        from adapters.vlm import micro_batch_for_memory

        try:
            doc = json.loads((Path(self.model_source) / "config.json").read_text())
            vocab = int(doc.get("text_config", {}).get("vocab_size") or doc["vocab_size"])
        except (TypeError, OSError, ValueError, KeyError, AttributeError):
            vocab = 151_936  # Qwen2-VL-2B's (the tiny models' are far smaller)
        memory = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        t = self.train
        rows = micro_batch_for_memory(memory, t["max_new_tokens"], vocab, 4 if t["precision"] == "32" else 2)
        self.cfg = self.cfg.replace(micro_batch_size=rows)
        self.say(f"micro_batch_size={rows} (the default on CUDA: log-probs of {rows} rows x {t['max_new_tokens']} "
                 f"tokens x {vocab:,} words within 1/8 of the GPU's {memory / 2**30:.0f} GiB; --set "
                 "micro_batch_size=N to choose)")

    def _check_floats(self) -> None:
        t = self.train
        for key in ("temperature", "top_p", "target_reward"):
            v = t[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(f"--{key.replace('_', '-')}={v!r}: expected a finite number")
        if not t["temperature"] > 0:
            raise UsageError(f"--temperature={t['temperature']!r}: expected > 0")
        if not 0 < t["top_p"] <= 1:
            raise UsageError(f"--top-p={t['top_p']!r}: expected in (0, 1]")

    def default_threads(self) -> int | None:
        return 1 if self.model["model"] in (None, TINY_MODEL) else None

    # build ------------------------------------------------------------------------------------
    def _datasets(self):
        from adapters.vlm_tasks import TASKS

        task, seed = self.task, self.cfg.seed
        funcs = load_rewards(task["reward"])
        if task["name"] in TASKS:
            spec = TASKS[task["name"]]
            train = spec.dataset(task["num_prompts"], k=task["colours"], seed=2 * seed)
            held = spec.dataset(task["eval_size"], k=task["colours"], seed=2 * seed + 1)
            return train, held, funcs or [spec.reward]
        from .datasets_io import load_rows

        cols = task.get("column") or []
        held = load_rows(Path(task["eval_data"]), columns=cols, option="--eval-data") if task["eval_data"] else None
        return load_rows(Path(task["data"]), columns=cols), held, funcs

    def _load_model(self):
        import torch

        from adapters.vlm_tasks import TASKS
        from adapters.vlm_tiny import build_tiny_vlm, load_vlm

        source = self.model_source
        if source is None:
            source = self.out / "model"
            with self.rank_zero_first():  # under torchrun, rank 0 builds it and the others load it
                if not (source / "config.json").is_file():
                    words = TASKS[self.task["name"]].vocabulary(self.task["colours"]) if self.task["name"] in TASKS \
                        else data_words(self.train_rows, self.held)
                    build_tiny_vlm(source, words=words, family=self.model["family"],
                                   seed=self.cfg.seed)
        try:
            from grpo_core.precision import weight_dtype

            dtype = weight_dtype(self.train["precision"])
            if self.model["lora_rank"] and self.train["precision"] == "bf16-mixed":
                dtype = torch.bfloat16  # the frozen base has no update to round; peft keeps the adapters float32
            model, processor = load_vlm(source, dtype=dtype, device=self.device)
        except (OSError, TypeError, ValueError) as e:
            raise UsageError(f"cannot load model {str(source)!r}: {one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - safetensors' own error: a truncated or damaged weights file
            if type(e).__module__.split(".")[0] != "safetensors":
                raise
            raise UsageError(f"cannot load model {str(source)!r}: its weights file (model.safetensors) does not "
                             f"read: {one_line(e)}") from None
        if self.args.gradient_checkpointing:
            from adapters.vlm import enable_checkpointing

            enable_checkpointing(model)
        return model.to(self.device), processor

    def build(self):
        from transformers.utils import logging as hf_logging

        from adapters.vlm import VLMAdapter
        from adapters.vlm_tasks import task_adapter

        hf_logging.disable_progress_bar()
        configure_cuda(self.device, deterministic=bool(getattr(self.args, "deterministic", False)),
                       tf32=bool(getattr(self.args, "tf32", False)))
        train_ds, self.held, funcs = self._datasets()
        self.train_rows = train_ds
        model, self.processor = self._load_model()
        t = self.train
        kw = {"reward_weights": self.task["reward_weight"] or None, "seed": self.cfg.seed,
              "temperature": t["temperature"], "top_p": t["top_p"], "max_new_tokens": t["max_new_tokens"],
              "old_logp_forward": False}  # the loop fills old log-probs (one forward less)
        if t["engine"] != "policy":
            from adapters.vlm_engine import make_engine

            kw["engine"] = make_engine(t["engine"], model)
        try:
            if self.model["lora_rank"]:
                try:
                    from adapters.vlm_lora import LoRAVLMAdapter
                except ImportError as e:
                    raise UsageError(f"--lora-rank: {e}") from None
                import torch

                cuda = [torch.device(self.device)] if self.device.startswith("cuda") else []
                with torch.random.fork_rng(devices=cuda):  # LoRA's A factors are drawn from the global stream:
                    torch.manual_seed(self.cfg.seed)  # seed them, whatever ran before in the process
                    self.adapter = task_adapter(self.task, LoRAVLMAdapter)(
                        model, self.processor, train_ds, funcs, lora_rank=self.model["lora_rank"], **kw)
            else:
                self.adapter = task_adapter(self.task, VLMAdapter)(model, self.processor, train_ds, funcs, **kw)
            return self.make_trainer(self.adapter, precision=self.train["precision"], **self._sharding())
        except (ValueError, ImportError) as e:
            raise UsageError(one_line(e)) from None

    def _sharding(self) -> dict[str, Any]:
        """The data-parallel trainer's options: FSDP2 with ``--fsdp`` (torchrun only, no LoRA)."""
        if not getattr(self.args, "fsdp", False):
            return {}
        if self.world is None:
            raise UsageError("--fsdp shards the model over the ranks of a torchrun launch: run under "
                             "torchrun --nproc-per-node N (or drop --fsdp)")
        if self.model["lora_rank"]:
            raise UsageError("--fsdp with --lora-rank is not supported: LoRA trains few weights, replicate them "
                             "with DDP (drop --fsdp)")
        from .launch import vlm_fsdp_units

        return {"shard": "fsdp", "fsdp_units": vlm_fsdp_units}

    def initial_progress(self) -> dict[str, Any]:
        # first / recent: the mean rewards of the first and of the latest `window` iterations
        return {"first": [], "recent": [], "reached_target": None}

    def preflight(self) -> bool:
        """The preflight table; False (exit 1) when a check failed. A rollout that could not be
        collected is named once by its cause (exit 2 when it is the user's reward or data)."""
        if self.args.skip_preflight:
            self.say("preflight skipped (--skip-preflight)")
            return True
        if getattr(self.args, "fsdp", False):  # its checks compare and differentiate whole tensors, not FSDP shards
            self.say("preflight skipped: it needs whole parameters, and --fsdp shards them")
            return True
        from adapters.vlm_preflight import failed_names, format_preflight, run_preflight

        errors: list[Exception] = []
        with recording_collect_errors(self.adapter, errors):
            rows = run_preflight(self.trainer, self.cfg, logprob_bound=getattr(self.args, "preflight_bound", None))
        if self.folder.writes:
            print(format_preflight(rows), flush=True)
        failed = failed_names(rows)
        if not failed:
            return True
        if errors:
            message = self.user_error(errors[0], where="preflight")
            if message:
                raise UsageError(message)
            self.say(f"{self.prog}: preflight could not collect a rollout: {type(errors[0]).__name__}: "
                     f"{one_line(errors[0])}; refusing to train")
            return False
        self.say(f"{self.prog}: preflight failed: {', '.join(failed)}; refusing to train "
                 "(fix them, or pass --skip-preflight to train anyway)")
        return False

    def user_error(self, exc: Exception, where: str | None = None) -> str | None:
        """Errors of the user's reward functions (raising, NaN, wrong length) and images."""
        from adapters import vlm, vlm_rewards

        funcs = (getattr(vlm_rewards, "compute_rewards", None), getattr(vlm, "_open_image", None))
        if not raised_in(exc, [f.__code__ for f in funcs if f is not None]):
            return None
        return f"{where or f'iteration {self.completed}'}: {one_line(exc)}"

    # the loop ---------------------------------------------------------------------------------
    def before_step(self) -> None:
        if self.recorder is None:  # installed after the preflight, whose rollouts are not logged
            from .completions import CompletionRecorder

            self.recorder = CompletionRecorder(self.adapter, self.cfg)
            self.recorder.install()
        t = self.train
        self.lr = self.cfg.lr * lr_factor(t["lr_schedule"], self.trainer.iteration, t["max_iterations"])
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = self.lr

    def _check_scored(self, stats: dict[str, Any]) -> None:
        n = self.cfg.groups_per_iteration * self.cfg.group_size
        for key, value in stats.items():
            if key.startswith("reward/") and isinstance(value, float) and math.isnan(value):
                raise UsageError(f"iteration {stats['iteration']}: reward function {key[len('reward/'):]!r} "
                                 f"scored no sample (None for all {n} completions); nothing can be learned "
                                 "from such an iteration")

    def _evaluate(self) -> dict[str, float]:
        """Greedy evaluation of the held-out rows in the run's precision. Under torchrun each rank
        evaluates every W-th row (``eval_share``) with the policy's parameters gathered once
        (FSDP would otherwise gather every layer for every generated token), and the ranks'
        rewards are summed (``merge_eval``)."""
        import contextlib

        world = self.world
        rows = self.held if world is None else eval_share(self.held, world.rank, world.size)
        gathered = getattr(self.trainer, "gathered_parameters", contextlib.nullcontext)
        with self.trainer.compute(), gathered():
            mine = self.adapter.evaluate(rows) if len(rows) else {"eval_reward_mean": math.nan, "eval_samples": 0}
        if world is None:
            return mine
        import torch
        import torch.distributed as dist

        n = mine["eval_samples"]
        both = torch.tensor([0.0 if n == 0 else mine["eval_reward_mean"] * n, float(n)], dtype=torch.float64)
        dist.all_reduce(both)
        return merge_eval(float(both[0]), int(both[1]))

    def make_record(self, stats):
        self._check_scored(stats)
        t, p = self.train, dict(self.progress)
        done = self.trainer.iteration
        record = dict(stats)
        record["lr"] = self.lr
        record.update(self._spread_metrics(stats["iteration"]))
        if self.held is not None and ((t["eval_every"] and done % t["eval_every"] == 0) or done == t["max_iterations"]):
            record.update(self._evaluate())
        record["wall_time"] = self.wall()
        w = t["window"]
        p["first"] = (p["first"] + [record["reward_mean"]])[:w] if len(p["first"]) < w else p["first"]
        p["recent"] = (p["recent"] + [record["reward_mean"]])[-w:]
        record["reward_rolling"] = rolling = _rolling(p["recent"], w)
        self._newly = p["reached_target"] is None and rolling >= t["target_reward"]
        if self._newly:
            p["reached_target"] = {"iteration": stats["iteration"], "wall_time": record["wall_time"]}
        return record, p

    def _spread_metrics(self, iteration: int) -> dict[str, float]:
        from .completions import frac_reward_zero_std

        summary = self.recorder.of(iteration) if self.recorder is not None else None
        if summary is None:
            return {}
        return {"frac_reward_zero_std": frac_reward_zero_std(summary["totals"], summary["group_size"])}

    def _log_completions(self, iteration: int) -> None:
        """Sample completions of ``iteration`` to completions.jsonl and the progress output."""
        from .completions import append_records, format_table

        if self.recorder is None or iteration == self._logged:
            return
        records = self.recorder.records(iteration, self.train["completions_per_group"])
        if records:
            if self.folder.writes:
                append_records(self.out, records)
            self._logged = iteration
            self.say(format_table(records, stream=self.bar.stream))

    def stop_reason(self) -> str | None:
        if self.progress["reached_target"] is not None and self.args.stop_at_target:
            return "target reached"
        if self.trainer.iteration >= self.train["max_iterations"]:
            return f"iteration budget ({self.train['max_iterations']} iterations)"
        return None

    # display and outputs ----------------------------------------------------------------------
    def make_display(self):
        self._newly = False
        return _Progress(self.train["max_iterations"], self.trainer.iteration)

    def on_record(self, record) -> None:
        self.bar.update(record, record["reward_rolling"])
        if self._newly:
            self.say(f"rolling mean reward {record['reward_rolling']:.3f} >= {self.train['target_reward']} at "
                     f"iteration {record['iteration']} ({record['wall_time']:.1f} s)")
        every = self.train["completions_every"]
        if every and (record["iteration"] + 1) % every == 0:
            self._log_completions(record["iteration"])

    def upgrade_saved_train(self, saved_train: dict[str, Any]) -> dict[str, Any]:
        """A run folder from before ``--precision``: its ``dtype`` in today's words; from before
        ``--engine``: the policy sampled."""
        if "precision" not in saved_train and "dtype" in saved_train:
            saved_train["precision"] = DTYPE_TO_PRECISION.get(saved_train.pop("dtype"), "32")
        saved_train.setdefault("engine", "policy")
        self._saved_engine = saved_train["engine"]
        return saved_train

    def start_notes(self) -> list[str]:
        notes = super().start_notes()
        if self.train["precision"] == "bf16-true":
            from grpo_core.precision import bf16_true_note

            import torch

            bf16 = [p for p in self.trainer.params if p.dtype == torch.bfloat16]  # LoRA's adapters stay float32
            note = bf16_true_note(bf16, self.cfg.lr) if bf16 else None
            notes += [note] if note else []
        return notes

    def describe(self) -> str:
        m = self.model
        model = m["model"] if m["model"] not in (None, TINY_MODEL) else f"tiny random {m['family']} in {self.out / 'model'}"
        lora = f", LoRA rank {m['lora_rank']}" if m["lora_rank"] else ""
        lora += f", sampled by {self.train['engine']}" if self.train["engine"] != "policy" else ""
        return (f"{self.task['name']} ({model}{lora}) -> {self.out}: {self.cfg.groups_per_iteration} prompts x "
                f"{self.cfg.group_size} completions per iteration, {self.train['max_iterations']} iterations")

    def write_curve(self, path) -> None:
        from .trainlog import METRICS_FILE, read_metrics

        t = self.train
        plot_reward_curve(read_metrics(self.out / METRICS_FILE), path, window=t["window"],
                          target=curve_target(self.task, t), title=f"GRPO {self.task['name']} (seed {self.cfg.seed})")

    def summary_lines(self) -> list[str]:
        t, p = self.train, self.progress
        w = t["window"]
        if len(p["first"]) < w:  # fewer iterations than one window: first and last would be the same ones
            n = len(p["first"])
            lines = [f"mean reward over the {n} iteration{'s' if n != 1 else ''}: {_rolling(p['first'], w):.3f}"]
        else:
            lines = [f"mean reward: first {w} iterations {_rolling(p['first'], w):.3f}, last {w} "
                     f"{_rolling(p['recent'], w):.3f}"]
        if p["reached_target"]:
            r = p["reached_target"]
            lines.append(f"target {t['target_reward']} reached at iteration {r['iteration']} ({r['wall_time']:.1f} s)")
        else:
            lines.append(f"target {t['target_reward']} not reached")
        return lines

    def on_finish(self, clean: bool) -> list[str]:
        from .completions import COMPLETIONS_FILE

        self._log_completions(self.completed - 1)
        lines = [f"completions: {self.out / COMPLETIONS_FILE}"] if (self.out / COMPLETIONS_FILE).exists() else []
        return lines + self._export(clean)

    def _export(self, clean: bool) -> list[str]:
        final = self.out / "final"
        if not clean:
            return ["model:       not exported (the run stopped in the middle of an iteration)"]
        full = self.trainer.policy_state() if getattr(self.args, "fsdp", False) else None  # a collective: every rank
        if self.folder.writes:
            if self.model["lora_rank"]:
                self.adapter.save_merged(final)  # the base model with the policy adapter merged in
            else:
                self.adapter.policy.save_pretrained(final, state_dict=self._final_state(full))
            self.processor.save_pretrained(final)
        return [f"model:       {final}"]


    def _final_state(self, full):
        """The policy's state as ``final/`` holds it: the weights as trained, float32 under
        precision 32 and bf16-mixed (the master weights, as Lightning and the HF Trainer save
        them: autocast computes embeddings and norms in float32, and a bf16 copy would round
        away what training moved there), bf16 under bf16-true."""
        return full if full is not None else self.adapter.policy.state_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_harness.train_vlm", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
