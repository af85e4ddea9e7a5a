"""``grpo-harness gpu-check`` (``make gpu-check``): does VLM GRPO work on this GPU, how fast,
and how much memory does it take.

::

    grpo-harness gpu-check [--iterations 20] [--out benchmarks/results] [--results-md FILE]
    grpo-harness gpu-check --device cpu --tiny     # the same code path on a tiny model

Without CUDA it prints one line saying so and exits 0, running nothing; but when the machine has
an NVIDIA device (``/dev/nvidia*``) or ``--device cuda:N`` was asked for and torch sees no CUDA
(a CPU build of torch, as ``make install`` puts in by default), it says so and exits 1: a check
that passes without having run is no check. On a CUDA device:

1. builds in memory, on the device, a random-init Qwen2-VL with the shape of Qwen2-VL-2B
   (``SHAPES``; text 1536 wide x 28 layers, vocabulary 151,936, vision tower 1280 wide x 32
   blocks; about 2.2B parameters), float32 master weights under ``--precision bf16-mixed``
   (the default, as in the README's GPU recipes), with a word-level tokenizer whose synthetic
   words fill the vocabulary; nothing is downloaded;
2. runs the preflight (``adapters.vlm_preflight``) in that precision, prints its table and
   records the measured log-prob gap between sampling and the training forward (max and mean);
3. the learning check: one update at the recipe's lr (1e-6) on one rollout, and the share of
   the trainable entries it moved (float32 master weights: about 99%; bf16 weights: about 3%,
   the updates round away) and the loss on that batch before and after; fails below 50%;
4. trains ``--iterations`` GRPO iterations with ``VLM_DEFAULTS`` (4 prompts x 8 completions,
   448 x 448 images of 256 image tokens each, up to 64 new tokens; dynamic sampling off) and
   gradient checkpointing; the reward is a number in [0, 1) hashed from the completion text,
   which has spread on a random model (the colours reward would be 0 everywhere and skip every
   step);
5. writes ``gpu.json`` (every number) and ``gpu.md`` (a RESULTS section) into ``--out``, and
   puts that section into ``--results-md`` (default ``benchmarks/RESULTS.md`` on CUDA), in
   place of its ``## GPU check`` section.

Step time: wall seconds per iteration (rollout + update, device synchronised), median over the
iterations after the first. Tokens per second: sampled (valid completion) tokens per second,
and trained tokens (prompt + valid completion) per second. Peak memory:
``torch.cuda.max_memory_allocated`` (and reserved); on CPU the process's peak RSS.

Exit status: 0 when it ran (or there is no GPU at all), 1 when a preflight check or the learning
check failed (the numbers are still measured and written) or a GPU is present that torch cannot
use, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## GPU check"

SHAPES = {
    "qwen2-vl-2b": {
        "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
        "tie_word_embeddings": True, "image_size": 448, "max_new_tokens": 64,
    },
}
"""Model shapes (Qwen2-VL-2B-Instruct's published config, random weights)."""
TINY = {"image_size": 56, "max_new_tokens": 8}
"""``--tiny``: ``adapters.vlm_tiny``'s model, small images and completions (tests, CPU)."""
NUM_PROMPTS = 16
LR = 1e-6
MOVED_AT_LEAST = 0.5
"""The learning check fails when one update moves fewer of the trainable entries: at lr 1e-6
float32 master weights move ~99% (the tiny model on CPU: 98.9%), bf16 weights ~3% (2.6%)."""


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="train a realistic random-init Qwen2-VL for a few iterations on the GPU: "
                       "preflight, step time, tokens/s, peak memory",
                       description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20, help="training iterations measured (default 20)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (only with --tiny) (default cuda)")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of the 2B shape")
    p.add_argument("--precision", choices=["32", "bf16-mixed", "bf16-true"], default="bf16-mixed",
                   help="as train vlm's --precision (default bf16-mixed, the README's GPU recipes)")
    p.add_argument("--lr", type=float, default=LR, help=f"Adam's learning rate (default {LR:g}, the README's "
                   "full fine-tuning recipe): the learning check reports the share of weights one step moves")
    p.add_argument("--dtype", help=argparse.SUPPRESS)  # retired: refused with what replaced it
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for gpu.json and gpu.md (default benchmarks/results)")
    p.add_argument("--results-md", type=Path, default=None,
                   help="markdown file whose '## GPU check' section is replaced (default: "
                   "benchmarks/RESULTS.md on CUDA without --tiny, none otherwise)")
    p.set_defaults(run=run)


def nvidia_devices() -> list[str]:
    """The NVIDIA device files of this machine (``/dev/nvidia0``, ...): a GPU is installed,
    whatever the torch build can see."""
    import glob

    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def run(args) -> int:
    import torch

    if args.dtype is not None:
        print("gpu-check: --dtype was replaced by --precision (bf16-mixed: float32 master weights, bf16 "
              "compute; bf16-true: bf16 weights; 32)", file=sys.stderr)
        return 2
    if args.iterations < 1:
        print(f"gpu-check: --iterations must be >= 1, got {args.iterations}", file=sys.stderr)
        return 2
    if not args.lr > 0:
        print(f"gpu-check: --lr must be > 0, got {args.lr}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        print(f"gpu-check: --device {args.device!r} is not a device: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        gpus = nvidia_devices()
        where = (f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}")
        if gpus or args.device != "cuda":
            seen = f"this machine has {len(gpus)} NVIDIA device(s)" if gpus else f"--device {args.device} was asked for"
            print(f"gpu-check: {seen} but torch sees no CUDA device ({where}): install a CUDA build of torch, "
                  "e.g. make install TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'",
                  file=sys.stderr)
            return 1
        print(f"gpu-check: no CUDA device here ({where}); nothing run")
        return 0
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        print(f"gpu-check: --device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        print("gpu-check: --device cpu needs --tiny (the 2B shape would take hours on a CPU)", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu-check: --device {args.device}: only cuda and cpu are supported", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # the tiny model: more threads only spin against each other
    result = measure(device, tiny=args.tiny, iterations=args.iterations, precision=args.precision, lr=args.lr)
    write_outputs(result, args.out, args.results_md if args.results_md is not None
                  else (None if args.tiny or device.type != "cuda" else REPO / "benchmarks" / "RESULTS.md"))
    return 0 if result["preflight_passed"] and result["learning"]["passed"] else 1


# --- the model ---------------------------------------------------------------------------------

def spread_reward(prompts, completions, **kwargs) -> list[float]:
    """A number in [0, 1) from the completion text (sha256): spread within every group of a
    random-init model, so that every iteration has a gradient and takes an optimizer step."""
    return [int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) / 2**32 for c in completions]


def shape_config(shape: str, tokenizer):
    """The Qwen2VLConfig of ``SHAPES[shape]``, its special token ids from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    from adapters.vlm_tiny import tiny_config

    s = SHAPES[shape]
    tiny = tiny_config("qwen2_vl", tokenizer)
    text = {k: v for k, v in tiny.text_config.to_dict().items() if k not in ("layer_types", "max_window_layers")}
    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")}
    return Qwen2VLConfig(text_config=dict(text, **s["text"]), vision_config=s["vision"],
                         tie_word_embeddings=s["tie_word_embeddings"], **ids)


def build_model(shape: str | None, device, dtype):
    """``(model, processor)``: the tiny model (shape None) or ``SHAPES[shape]``, random init,
    built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2VLImageProcessorPil

    from adapters.vlm_tasks import colours_vocabulary
    from adapters.vlm_tiny import CHAT_TEMPLATE, build_tokenizer, register_processors, tiny_config

    words = colours_vocabulary()
    size = TINY["image_size"] if shape is None else SHAPES[shape]["image_size"]
    if shape is not None:  # synthetic words fill the vocabulary: every id decodes to a word
        base = len(build_tokenizer(words))
        words = words + [f"w{i}" for i in range(SHAPES[shape]["text"]["vocab_size"] - base)]
    tok = build_tokenizer(words)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": size * size})
    processor = register_processors()["qwen2_vl"](image_processor=image_processor, tokenizer=tok,
                                                  chat_template=CHAT_TEMPLATE)
    config = tiny_config("qwen2_vl", tok) if shape is None else shape_config(shape, tok)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.eval()
    return model, processor


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the measurement ---------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device) -> dict:
    import resource

    import torch

    if device.type == "cuda":
        return {"peak_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(device, *, tiny: bool, iterations: int, precision: str = "bf16-mixed", lr: float = LR) -> dict:
    """Build, preflight, one learning check, train ``iterations`` iterations; every number in
    one dict."""
    import torch

    from grpo_core.precision import weight_dtype

    dtype = weight_dtype(precision)
    from adapters.vlm import VLMAdapter, enable_checkpointing
    from adapters.vlm_preflight import LOGPROB, failed_names, format_preflight, run_preflight
    from adapters.vlm_tasks import colours_dataset
    from grpo_core.config import GRPOConfig
    from grpo_core.loop import GRPOTrainer
    from grpo_harness.train_vlm import VLM_DEFAULTS

    shape = None if tiny else "qwen2-vl-2b"
    spec = TINY if tiny else SHAPES[shape]
    t0 = time.perf_counter()
    model, processor = build_model(shape, device, dtype)
    enable_checkpointing(model)
    build_s = time.perf_counter() - t0
    data = colours_dataset(NUM_PROMPTS, size=spec["image_size"], seed=0)
    adapter = VLMAdapter(model, processor, data, [spread_reward], seed=0, max_new_tokens=spec["max_new_tokens"],
                         old_logp_forward=False)
    cfg = GRPOConfig.from_dict(dict(VLM_DEFAULTS["grpo"], seed=0, lr=lr, dynamic_sampling=False))
    trainer = GRPOTrainer(adapter, cfg, precision=precision)
    rows = run_preflight(trainer, max_new_tokens=spec["max_new_tokens"])
    print(format_preflight(rows), flush=True)
    learning = learning_check(trainer)
    print(learning_line(learning, precision, lr), flush=True)
    gap = next((r.details for r in rows if r.name == LOGPROB and r.details), {})
    gap = dict(gap, bound=next((r.bound for r in rows if r.name == LOGPROB), None))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = [_timed_step(trainer, device) for _ in range(iterations)]
    timed = steps[1:] or steps
    median_s = statistics.median(s["seconds"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "shape": shape or "tiny", "parameters": parameter_count(model),
        "dtype": str(dtype).removeprefix("torch."), "precision": precision, "lr": lr, "learning": learning,
        "gradient_checkpointing": True,
        "groups_per_iteration": cfg.groups_per_iteration, "group_size": cfg.group_size,
        "image_size": spec["image_size"], "max_new_tokens": spec["max_new_tokens"], "iterations": iterations,
        "build_seconds": build_s, "median_step_seconds": median_s,
        "sampled_tokens_per_second": sum(s["sampled_tokens"] for s in timed) / seconds,
        "trained_tokens_per_second": sum(s["trained_tokens"] for s in timed) / seconds,
        **_peak_memory(device), "logprob_gap": gap,
        "preflight": [r.to_dict() for r in rows], "preflight_passed": not failed_names(rows),
        "steps": steps, "versions": _versions(), "date": datetime.date.today().isoformat(),
    }


def learning_check(trainer) -> dict:
    """One update on one rollout, at the run's lr and precision, and what it did: the share of
    the trainable entries that changed (``moved_share``; float32 master weights at lr 1e-6: ~99%,
    bf16 weights: ~3%) and the loss on that rollout before and after the step (the surrogate of
    the batch just trained on falls when the update follows its gradient). The trainer's
    iteration counter is not advanced."""
    import torch

    from grpo_core.losses import agg_count
    from grpo_core.precision import moved_share

    cfg = trainer.config
    rollout = trainer._collect()
    adv = trainer._advantages(rollout)
    if rollout.old_logp is None:
        rollout.old_logp = trainer._batch_logp(trainer.policy, rollout)
    ref_logp = trainer._batch_logp(trainer.reference, rollout) if cfg.beta != 0 else None
    rows = torch.arange(rollout.rewards.shape[0])
    total = trainer._global_count(agg_count(rollout.mask, cfg.loss_agg))
    before = {n: p.detach().to("cpu", copy=True) for n, p in trainer.policy.named_parameters() if p.requires_grad}
    stats = trainer._minibatch_step(rollout, adv, ref_logp, rows)
    after = {n: p.detach().to("cpu", copy=True) for n, p in trainer.policy.named_parameters() if p.requires_grad}
    with torch.no_grad():
        loss_after, _ = trainer._micro_loss(rollout, adv, ref_logp, rows, total, True)
    share = moved_share(before, after)
    return {"moved_share": share, "loss_before": stats["loss"], "loss_after": float(loss_after),
            "skipped": bool(stats["skipped_steps"]), "passed": share >= MOVED_AT_LEAST and not stats["skipped_steps"]}


def learning_line(learning: dict, precision: str, lr: float) -> str:
    verdict = "learns" if learning["passed"] else "DOES NOT LEARN"
    why = "" if learning["passed"] else (
        " (the step was skipped: no signal)" if learning["skipped"] else
        f"; fewer than {MOVED_AT_LEAST:.0%} moved: updates round away (bf16 weights? use --precision bf16-mixed)")
    return (f"learning check ({precision}, lr {lr:g}): one update moved {learning['moved_share']:.1%} of the trainable "
            f"entries; loss on its batch {learning['loss_before']:.6g} -> {learning['loss_after']:.6g}: {verdict}{why}")


def _timed_step(trainer, device) -> dict:
    _sync(device)
    t = time.perf_counter()
    st = trainer.step()
    _sync(device)
    seconds = time.perf_counter() - t
    n = trainer.config.group_size * trainer.config.groups_per_iteration
    sampled = st["completion_len_mean"] * n
    return {"seconds": seconds, "sampled_tokens": sampled, "trained_tokens": sampled + st["prompt_len_mean"] * n,
            "skipped_steps": st["skipped_steps"], "grad_norm": st["grad_norm"], "loss": st["loss"]}


def _versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__}


# --- outputs -----------------------------------------------------------------------------------

def section(r: dict) -> str:
    """The RESULTS section of one measurement (markdown)."""
    mem = (f"{r['peak_memory_allocated_gb']:.1f} GiB allocated ({r['peak_memory_reserved_gb']:.1f} GiB reserved)"
           if "peak_memory_allocated_gb" in r else f"{r['peak_rss_gb']:.2f} GiB peak RSS (CPU)")
    gap = r["logprob_gap"]
    gap_text = (f"max {gap['max']:.3g}, mean {gap['mean']:.3g} nats over {gap['tokens']} tokens "
                f"(bound: {gap.get('statistic', '?')} <= {gap.get('bound')})" if "max" in gap else "not measured")
    v = r["versions"]
    lines = [SECTION, "",
             (f"`make gpu-check` on {r['device']} ({r['date']}; torch {v['torch']}, CUDA {v['cuda']}, "
              f"transformers {v['transformers']}). Model: random-init `{r['shape']}` shape, "
              f"{_count(r['parameters'])} parameters, {r['dtype']}, gradient checkpointing; "
              f"{r['groups_per_iteration']} prompts x {r['group_size']} completions per iteration, "
              f"{r['image_size']}x{r['image_size']} images, up to {r['max_new_tokens']} new tokens; "
              f"{r['iterations']} iterations (median over all but the first)."), "",
             "| measure | value |", "|---|---:|",
             f"| seconds per iteration (rollout + update), median | {r['median_step_seconds']:.3f} |",
             f"| sampled tokens / s | {r['sampled_tokens_per_second']:.0f} |",
             f"| trained tokens / s (prompt + completion) | {r['trained_tokens_per_second']:.0f} |",
             f"| peak memory | {mem} |",
             f"| preflight log-prob gap (sampling vs training forward) | {gap_text} |",
             f"| preflight | {'passed' if r['preflight_passed'] else 'FAILED'} |",
             f"| learning check ({r['precision']}, lr {r['lr']:g}): entries one update moved | "
             f"{r['learning']['moved_share']:.1%} ({'passed' if r['learning']['passed'] else 'FAILED'}) |",
             f"| learning check: loss on the updated batch, before -> after | "
             f"{r['learning']['loss_before']:.6g} -> {r['learning']['loss_after']:.6g} |",
             "", "Raw numbers: `benchmarks/results/gpu.json`."]
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def replace_section(text: str, new: str) -> str:
    """``text`` with its ``## GPU check`` section (up to the next ``## `` heading) replaced by
    ``new``, or ``new`` appended when there is none."""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda m: new + "\n", text, count=1)
    return text.rstrip("\n") + "\n\n" + new


def write_outputs(result: dict, out: Path, results_md: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    text = section(result)
    (out / "gpu.md").write_text(text)
    print(text)
    if results_md is not None:
        results_md.write_text(replace_section(results_md.read_text() if results_md.is_file() else "", text))
        print(f"gpu-check: wrote {out / 'gpu.json'}, {out / 'gpu.md'} and the GPU check section of {results_md}")
    else:
        print(f"gpu-check: wrote {out / 'gpu.json'} and {out / 'gpu.md'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grpo_harness.gpu_check")
    add_parser(p.add_subparsers(dest="command", required=True), "gpu-check")
    args = p.parse_args(["gpu-check", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
