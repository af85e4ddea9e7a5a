"""Tiny Qwen2-VL on the colours task: this project's GRPO vs TRL's GRPOTrainer (seconds per
optimizer step and peak memory), and the colours ablation through ``grpo-harness ablate``.

    python -m benchmarks.vlm [--steps 60] [--seeds 0-19] [--jobs 2] [--out benchmarks/results]

Needs the ``vlm`` extra and ``trl`` (``pip install "trl>=1.0"``); without TRL the comparison is
skipped with a note.

Speed and memory. The tiny model is built once (``adapters.vlm_tiny``, seed 0) into a temporary
folder; each side then runs in its own fresh subprocess at one torch thread, loads it with
``load_vlm``, trains ``--steps`` optimizer steps and reports the wall time between consecutive
step ends (median after ``--warmup`` steps) and its peak RSS (``ru_maxrss``). The sides run
alternately ``--repeats`` times; the table shows the median over repeats. Matched settings:
the same 64 colours prompts, 4 prompts x 8 completions per step, 2 new tokens, temperature 1,
top_p 1, top_k 0, the same suppressed token ids, Adam(W) lr 1e-3 decaying linearly to 0 over
the run, gradient norm clipped at 1, beta 0, one optimizer step per generation batch, rewards
scaled by the group std (eps 1e-4) and the loss averaged over all valid tokens of the batch
(ours ``loss_agg="token-mean"``, TRL ``loss_type="dapo"``, which with one process, one
accumulation step and one step per generation divides by the same token count).

Ablation. ``grpo-harness ablate vlm --variants benchmarks/ablations/colours.toml`` (the colours
task under ``train vlm``'s defaults, each variant's overrides, paired verdicts over seeds; see
``grpo_harness.ablate``), run into ``--out/ablation-colours`` and continued there if interrupted;
``--seeds`` replaces the file's verdict seeds. The colours task cannot show a discount or a
refresh with one epoch: ``benchmarks/ablations/sequence.toml`` is the ablation of the plan's
claims.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUM_PROMPTS = 64
COLOURS = 4
MAX_NEW_TOKENS = 2
TIME_TARGET = 0.45  # the target: at most 0.45x TRL's step time, no more peak memory

ABLATION_FILE = REPO / "benchmarks" / "ablations" / "colours.toml"

# --- workers: one fresh process per measured side ----------------------------------------------

def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _colour_rows():
    from adapters.vlm_tasks import colours_dataset

    return colours_dataset(NUM_PROMPTS, k=COLOURS, seed=0)


def _train_ours(model_dir: str, steps: int, on_step_end, encode_once: bool = True) -> dict:
    """This project's loop: VLMAdapter + GRPOTrainer with VLM_DEFAULTS["grpo"];
    ``encode_once=False``: the adapter's repeated path (before the speed-ups), for comparison."""
    import torch

    from adapters.vlm import VLMAdapter
    from adapters.vlm_tasks import first_word_reward
    from adapters.vlm_tiny import load_vlm
    from grpo_core.config import GRPOConfig
    from grpo_core.loop import GRPOTrainer
    from grpo_harness.train_vlm import VLM_DEFAULTS

    model, processor = load_vlm(model_dir)
    cfg = GRPOConfig.from_dict(dict(VLM_DEFAULTS["grpo"], seed=0))
    adapter = VLMAdapter(model, processor, _colour_rows(), [first_word_reward], seed=0, temperature=1.0,
                         top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, old_logp_forward=False, encode_once=encode_once)
    trainer = GRPOTrainer(adapter, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: max(0.0, 1.0 - i / steps))
    before = {"rss_before_train_mb": _current_rss_mb(), "peak_rss_before_train_mb": _peak_rss_mb()}
    on_step_end()
    rewards = []
    for _ in range(steps):
        rewards.append(trainer.step()["reward_mean"])
        sched.step()
        on_step_end()
    return dict(before, suppressed_ids=adapter.suppress_ids, reward_mean_last10=statistics.fmean(rewards[-10:]),
                setup=cfg.to_dict())


def _trl_first_word_reward(prompts, completions, answer, **kwargs):
    """The colours reward on TRL's conversational completions ([{"role", "content"}])."""
    from adapters.vlm_tasks import first_word_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return first_word_reward(prompts, texts, answer)


def trl_trainer(model, processor, rows: list[dict], *, steps: int, seed: int, output_dir: str,
                callbacks=(), logging_steps: int | None = None, question: str | None = None,
                reward=_trl_first_word_reward, max_completion_length: int = MAX_NEW_TOKENS, **overrides):
    """TRL's GRPOTrainer with the matched settings (see the module docstring) on ``rows``
    (colours items by default; another task gives its ``question``, ``reward`` on TRL's
    completions, its rows' extra columns and completion length); ``overrides``: GRPOConfig
    arguments over the matched ones. Returns ``(trainer, suppressed ids)``."""
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from adapters.vlm import suppressed_token_ids
    from adapters.vlm_tasks import QUESTION

    hf_logging.set_verbosity_error()
    suppress = suppressed_token_ids(processor.tokenizer, model.config)  # the list our adapter uses
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question or QUESTION}]}]
    ds = Dataset.from_list([{**{k: v for k, v in r.items() if k != "prompt"}, "prompt": prompt} for r in rows])
    matched = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=seed,
        num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": suppress},
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=steps, beta=0.0, num_iterations=1, epsilon=0.2, scale_rewards="group", loss_type="dapo",
        report_to="none", save_strategy="no", logging_steps=logging_steps or steps, disable_tqdm=True,
        dataloader_num_workers=0)
    args = GRPOConfig(**dict(matched, **overrides))
    trainer = GRPOTrainer(model=model, processing_class=processor, reward_funcs=[reward],
                          args=args, train_dataset=ds, callbacks=list(callbacks))
    return trainer, suppress


def _train_trl(model_dir: str, steps: int, on_step_end) -> dict:
    """TRL's GRPOTrainer with the matched settings (see the module docstring)."""
    from transformers import TrainerCallback

    from adapters.vlm_tiny import load_vlm

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            on_step_end()

    model, processor = load_vlm(model_dir)
    out = tempfile.TemporaryDirectory(prefix="trl-out-")
    trainer, suppress = trl_trainer(model, processor, _colour_rows(), steps=steps, seed=0, output_dir=out.name,
                                    callbacks=[StepEnd()])
    before = {"rss_before_train_mb": _current_rss_mb(), "peak_rss_before_train_mb": _peak_rss_mb()}
    on_step_end()
    trainer.train()
    out.cleanup()
    args = trainer.args
    logged = [h for h in trainer.state.log_history if "reward" in h]
    setup = {k: getattr(args, k) for k in ("num_generations", "per_device_train_batch_size", "loss_type",
                                            "scale_rewards", "beta", "num_iterations", "epsilon",
                                            "max_completion_length", "temperature", "top_p", "top_k",
                                            "learning_rate", "lr_scheduler_type", "optim", "max_grad_norm",
                                            "use_bias_correction_kl", "mask_truncated_completions")}
    setup["generation_config"] = trainer.generation_config.to_diff_dict()
    return dict(before, suppressed_ids=suppress, reward_mean_logged=logged[-1]["reward"] if logged else None,
                setup=setup)


def run_worker(side: str, model_dir: str, steps: int, profile: bool) -> dict:
    """Train one side; returns step times, memory and setup. ``profile``: under cProfile."""
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    ends: list[float] = []
    train = {"ours": _train_ours, "trl": _train_trl,
             "ours-repeated": lambda *a: _train_ours(*a, encode_once=False)}[side]
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()

        def on_step_end():
            ends.append(time.perf_counter())
            if len(ends) == 1:
                prof.enable()
    else:
        def on_step_end():
            ends.append(time.perf_counter())
    info = train(model_dir, steps, on_step_end)
    if prof is not None:
        prof.disable()
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    out = dict(info, side=side, steps=steps, step_seconds=step_s, peak_rss_mb=_peak_rss_mb(),
               process_seconds=time.perf_counter() - t_start, torch_threads=torch.get_num_threads())
    if prof is not None:
        out["profile"] = profile_summary(prof, len(step_s))
    return out


def _short(filename: str) -> str:
    """A profile entry's file relative to its package or this repository (no machine paths)."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    try:
        return str(Path(filename).resolve().relative_to(REPO))
    except ValueError:
        return Path(filename).name if filename.startswith("/") else filename


# (label, file suffix, function name): where a step's time goes, read off the profile
KEY_FUNCTIONS = [
    ("ours: rollout (collect)", "adapters/vlm.py", "collect"),
    ("ours: prompt encoding (processor)", "adapters/vlm.py", "encode_prompts"),
    ("ours: generate", "adapters/vlm.py", "generate"),
    ("ours: log-prob forwards (old at rollout + policy in the update)", "adapters/vlm.py", "forward_logp"),
    ("ours: policy log-prob forward in the update", "adapters/vlm.py", "logp_and_entropy"),
    ("ours: update (forward, loss, backward, clip, step)", "grpo_core/loop.py", "_update"),
    ("TRL: generate and score", "trl/trainer/grpo_trainer.py", "_generate_and_score_completions"),
    ("TRL: prompt encoding (processor)", "trl/trainer/grpo_trainer.py", "_tokenize_prompts"),
    ("TRL: generate", "trl/trainer/grpo_trainer.py", "_generate_single_turn"),
    ("TRL: policy log-prob forward (loss)", "trl/trainer/grpo_trainer.py", "_get_per_token_logps_and_entropies"),
    ("TRL: compute_loss", "trl/trainer/grpo_trainer.py", "_compute_loss"),
    ("rewards", "adapters/vlm_rewards.py", "compute_rewards"),
    ("rewards", "trl/trainer/grpo_trainer.py", "_calculate_rewards"),
    ("model forward calls (Qwen2VLModel.forward)", "models/qwen2_vl/modeling_qwen2_vl.py", "forward@Qwen2VLModel"),
    ("vision tower (get_image_features)", "models/qwen2_vl/modeling_qwen2_vl.py", "get_image_features"),
    ("M-RoPE position ids (get_rope_index)", "models/qwen2_vl/modeling_qwen2_vl.py", "get_rope_index"),
    ("backward", "torch/_tensor.py", "backward"),
    ("optimizer step (Adam / AdamW)", "torch/optim/adam.py", "adam"),
    ("optimizer step (Adam / AdamW)", "torch/optim/adamw.py", "adamw"),
    ("gc.collect", "~", "<built-in method gc.collect>"),
]


def _key_rows(stats: dict, steps: int) -> list[dict]:
    import inspect

    from transformers.models.qwen2_vl import modeling_qwen2_vl

    model_forward_line = inspect.getsourcelines(modeling_qwen2_vl.Qwen2VLModel.forward)[1]
    out = []
    for label, suffix, name in KEY_FUNCTIONS:
        cum = calls = 0.0
        for (fn, line, fname), (_cc, nc, _tt, ct, _callers) in stats.items():
            want = name.split("@")[0]
            if fname == want and fn.endswith(suffix) and ("@" not in name or abs(line - model_forward_line) < 40):
                cum, calls = cum + ct, calls + nc
        if calls:
            out.append({"what": label, "function": f"{suffix}:{name}", "cum_ms_per_step": 1e3 * cum / steps,
                        "calls_per_step": calls / steps})
    return out


def profile_summary(prof, steps: int, top: int = 30) -> dict:
    """Top functions by cumulative and by own time, in ms per step, and the key functions."""
    import pstats

    st = pstats.Stats(prof)
    rows = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{_short(fn)}:{line}({name})", "calls_per_step": nc / steps,
                     "own_ms_per_step": 1e3 * tt / steps, "cum_ms_per_step": 1e3 * ct / steps})
    total = 1e3 * st.total_tt / steps
    by_cum = sorted(rows, key=lambda r: -r["cum_ms_per_step"])[:top]
    by_own = sorted(rows, key=lambda r: -r["own_ms_per_step"])[:top]
    return {"total_ms_per_step": total, "key": _key_rows(st.stats, steps), "by_cumulative": by_cum,
            "by_own": by_own}


# --- speed and memory --------------------------------------------------------------------------

def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def spawn_worker(side: str, model_dir: Path, steps: int, scratch: Path, *, profile: bool = False) -> dict:
    result = scratch / f"{side}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.vlm", "--worker", side, "--model", str(model_dir),
           "--steps", str(steps), "--result", str(result)] + (["--profile", "always"] if profile else [])
    proc = subprocess.run(cmd, cwd=REPO, env=_worker_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def trl_available() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def speed(model_dir: Path, scratch: Path, *, steps: int, warmup: int, repeats: int, log,
          before: bool = False) -> dict:
    """Alternate ours / TRL (/ ours before the speed-ups) ``repeats`` times; per run the median
    step time after ``warmup``."""
    sides = ["ours"] + (["trl"] if trl_available() else []) + (["ours-repeated"] if before else [])
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(repeats):
        for side in sides:
            r = spawn_worker(side, model_dir, steps, scratch)
            r["median_step_s"] = statistics.median(r["step_seconds"][warmup:])
            runs[side].append(r)
            log(f"  speed run {rep + 1}/{repeats} {side}: {1e3 * r['median_step_s']:.1f} ms/step, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB")
    summary = {}
    for side, rs in runs.items():
        summary[side] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in rs),
            "per_run_median_step_s": [r["median_step_s"] for r in rs],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "rss_before_train_mb": statistics.median(r["rss_before_train_mb"] for r in rs),
            "peak_rss_before_train_mb": statistics.median(r["peak_rss_before_train_mb"] for r in rs),
            "process_seconds": statistics.median(r["process_seconds"] for r in rs),
            "setup": rs[0]["setup"], "suppressed_ids": rs[0]["suppressed_ids"],
        }
        for r in rs:
            r.pop("setup", None)
    if "trl" in summary:
        o, t = summary["ours"], summary["trl"]
        summary["ratio_time"] = o["median_step_s"] / t["median_step_s"]
        summary["ratio_peak_rss"] = o["peak_rss_mb"] / t["peak_rss_mb"]
        summary["ratio_training_rss_growth"] = ((o["peak_rss_mb"] - o["rss_before_train_mb"])
                                                / max(1e-9, t["peak_rss_mb"] - t["rss_before_train_mb"]))
        summary["same_suppressed_ids"] = o["suppressed_ids"] == t["suppressed_ids"]
    if "ours-repeated" in summary:
        rep = summary["ours-repeated"]["median_step_s"]
        summary["ratio_time_repeated"] = rep / summary["ours"]["median_step_s"]
    summary["runs"] = runs
    return summary


# --- ablation ----------------------------------------------------------------------------------

def ablation(out: Path, seeds: str | None, jobs: int) -> tuple[int, dict]:
    """The colours ablation through ``grpo-harness ablate`` (see the module docstring): (exit
    status, the report's data, with its markdown)."""
    from grpo_harness.ablate import run_file

    return run_file(ABLATION_FILE, out, seeds=seeds, jobs=jobs)


# --- report ------------------------------------------------------------------------------------

def _f(x, fmt="{:.0f}", none="–"):
    return none if x is None else fmt.format(x)


def speed_table(s: dict) -> str:
    lines = ["| side | median s/step | peak RSS (MB) | RSS before training (MB) | growth in training (MB) |",
             "|---|---:|---:|---:|---:|"]
    names = {"ours": "this project (GRPOTrainer + VLMAdapter)", "trl": "TRL GRPOTrainer",
             "ours-repeated": "this project, repeated inputs (encode_once=False, before the speed-ups)"}
    for side in ("ours", "trl", "ours-repeated"):
        if side in s:
            r = s[side]
            lines.append(f"| {names[side]} | {r['median_step_s']:.4f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['rss_before_train_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_train_mb']:.0f} |")
    if "ratio_time" in s:
        met_t = "met" if s["ratio_time"] <= TIME_TARGET else "not met"
        met_m = "met" if s["ratio_peak_rss"] <= 1.0 else "not met"
        lines.append(f"| **ratio ours / TRL** | **{s['ratio_time']:.2f}x** (target <= {TIME_TARGET}x: {met_t}) | "
                     f"**{s['ratio_peak_rss']:.2f}x** (target <= 1x: {met_m}) | | "
                     f"{s['ratio_training_rss_growth']:.2f}x |")
    if "ratio_time_repeated" in s:
        lines.append(f"| speed-up of the encode-once path (repeated / ours) | {s['ratio_time_repeated']:.2f}x "
                     "| | | |")
    return "\n".join(lines)


def profile_table(result: dict) -> str:
    """The key functions of both profiles (cumulative ms per step, cProfile overhead included)."""
    lines = ["| where | cumulative ms/step | calls/step |", "|---|---:|---:|"]
    for side, name in (("ours", "this project"), ("trl", "TRL")):
        prof = result.get(f"profile_{side}")
        if prof is None:
            continue
        lines.append(f"| **{name}: whole step (profiled)** | **{prof['total_ms_per_step']:.1f}** | |")
        for r in prof["key"]:
            lines.append(f"| {r['what']} | {r['cum_ms_per_step']:.1f} | {r['calls_per_step']:.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": 1, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_available(),
            "date": datetime.date.today().isoformat()}


def report(result: dict) -> str:
    m = result["machine"]
    parts = [(f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, 1 torch thread per process; "
              f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; "
              f"{m['date']}.")]
    if "speed" in result:
        s = result["speed"]
        parts += ["", (f"### Seconds per optimizer step and peak memory ({result['args']['steps']} steps, "
                       f"median after {result['args']['warmup']}, median of {result['args']['repeats']} "
                       "alternating runs)"), "", speed_table(s)]
        if "profile_ours" in result:
            parts += ["", "Where a step's time goes (cProfile, one run per side; full lists in vlm.json):", "",
                      profile_table(result)]
    if "ablation" in result:
        parts += ["", "### Colours ablation (`grpo-harness ablate`, benchmarks/ablations/colours.toml)", "",
                  result["ablation"]["markdown"]]
    return "\n".join(parts)


# --- main --------------------------------------------------------------------------------------

def _build_model(folder: Path) -> Path:
    from adapters.vlm_tasks import colours_vocabulary
    from adapters.vlm_tiny import build_tiny_vlm

    return build_tiny_vlm(folder / "model", words=colours_vocabulary(COLOURS), seed=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vlm", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per speed run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="alternating speed runs per side (default 2)")
    p.add_argument("--seeds", default=None, help="ablation verdict seeds, e.g. 0-4 (default: the variants file's)")
    p.add_argument("--jobs", type=int, default=2, help="ablation runs at once (default 2; 1 thread each)")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="cProfile both sides (auto: when ours misses the time target)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--before", action="store_true",
                   help="also alternate the adapter's repeated path (encode_once=False) as a third side")
    p.add_argument("--worker", choices=["ours", "trl", "ours-repeated"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = run_worker(args.worker, args.model, args.steps, args.profile == "always")
        args.result.write_text(json.dumps(res))
        return 0
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = {"args": {k: v for k, v in vars(args).items()
                       if k not in ("out", "worker", "model", "result")},
              "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        scratch = Path(tmp)
        if not args.skip_speed:
            if not trl_available():
                log("trl is not installed: the TRL side is skipped (pip install 'trl>=1.0')")
            model_dir = _build_model(scratch)
            log(f"speed: {args.repeats} x ours / TRL, {args.steps} steps each")
            result["speed"] = speed(model_dir, scratch, steps=args.steps, warmup=args.warmup,
                                    repeats=args.repeats, log=log, before=args.before)
            s = result["speed"]
            missed = s.get("ratio_time", 0) > TIME_TARGET or s.get("ratio_peak_rss", 0) > 1.0
            if args.profile == "always" or (args.profile == "auto" and missed):
                for side in ("ours", "trl") if "trl" in s else ("ours",):
                    log(f"profiling {side}")
                    prof = spawn_worker(side, model_dir, args.steps, scratch, profile=True)
                    result[f"profile_{side}"] = prof["profile"]
    status = 0
    if not args.skip_ablation:
        log(f"ablation: grpo-harness ablate vlm --variants {ABLATION_FILE.relative_to(REPO)}, {args.jobs} at once")
        status, result["ablation"] = ablation(args.out / "ablation-colours", args.seeds, args.jobs)
    result["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vlm.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    (args.out / "vlm.md").write_text(text + "\n")
    print(text)
    log(f"wrote {args.out / 'vlm.json'} and {args.out / 'vlm.md'} ({result['wall_seconds']:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
