"""The log-prob gap between sampling and the training forward in bf16, measured on CPU.

The preflight's ``logprob_consistency`` compares the log-probs of the distribution the tokens
were sampled from (``generate``'s processed scores: KV-cached incremental decoding) with those
of the training forward (one forward over prompt + completion). In float32 the two agree to
about 1e-6; in bf16 they differ by rounding, and the preflight's bf16 bound has to sit above
that noise. This script measures it, for each precision that computes in bf16:

- ``bf16-mixed``: float32 weights, both paths under ``torch.autocast(bfloat16)`` (what
  ``train vlm --precision bf16-mixed`` runs);
- ``bf16-true``: the weights themselves in bf16.

on two random-init models: the tiny Qwen2-VL of the tests, and one with Qwen2-VL-2B's widths
(text 1536, vocabulary 151,936, vision 1280) cut to a few layers so that it fits a CPU run,
with 448x448 images (256 image tokens) and up to 32 new tokens per completion.

    python -m benchmarks.bf16_logprob_gap [--layers 4] [--rollouts 3] [--json FILE]

Prints, per model and precision, the mean and max |gap| over the valid completion tokens of
each rollout (8 completions), and the largest over rollouts. Results: benchmarks/RESULTS.md,
"bf16 log-prob gap"; the preflight bound (adapters/vlm_preflight.py) is set from them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(shape: str | None, layers: int):
    from grpo_harness import gpu_check

    if shape is None:
        return gpu_check.build_model(None, torch.device("cpu"), torch.float32)
    spec = gpu_check.SHAPES[shape]
    saved = (spec["text"]["num_hidden_layers"], spec["vision"]["depth"])
    spec["text"]["num_hidden_layers"], spec["vision"]["depth"] = layers, layers
    try:
        return gpu_check.build_model(shape, torch.device("cpu"), torch.float32)
    finally:
        spec["text"]["num_hidden_layers"], spec["vision"]["depth"] = saved


def gaps(model, processor, precision: str, *, image_size: int, max_new_tokens: int, rollouts: int) -> list[dict]:
    from adapters.vlm import VLMAdapter
    from adapters.vlm_tasks import colours_dataset
    from grpo_core.precision import compute_context
    from grpo_harness.gpu_check import spread_reward

    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    adapter = VLMAdapter(model, processor, colours_dataset(8, size=image_size, seed=0), [spread_reward], seed=0,
                         max_new_tokens=max_new_tokens, record_generation_logp=True, old_logp_forward=False)
    out = []
    with torch.no_grad(), compute_context(precision, "cpu"):
        for it in range(rollouts):
            ro = adapter.collect(num_groups=2, group_size=4, iteration=it)
            train, _ = adapter.forward_logp(model, ro, torch.arange(8), want_entropy=False)
            valid = ro.inputs["completion_attn"].bool()
            gap = (ro.inputs["gen_sample_logp"] - train.float().cpu())[valid].abs()
            out.append({"mean": float(gap.mean()), "max": float(gap.max()), "tokens": int(valid.sum())})
    if precision == "bf16-true":
        model.to(torch.float32)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="text layers and vision blocks of the 2B-wide model")
    p.add_argument("--rollouts", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name, shape, size, new in (("tiny", None, 56, 16), (f"qwen2-vl-2b width, {args.layers} layers",
                                                            "qwen2-vl-2b", 448, 32)):
        t0 = time.perf_counter()
        model, processor = build(shape, args.layers)
        for precision in ("32", "bf16-mixed", "bf16-true"):
            per = gaps(model, processor, precision, image_size=size, max_new_tokens=new, rollouts=args.rollouts)
            row = {"model": name, "precision": precision, "rollouts": per,
                   "mean_of_means": sum(r["mean"] for r in per) / len(per),
                   "worst_mean": max(r["mean"] for r in per), "worst_max": max(r["max"] for r in per),
                   "tokens": sum(r["tokens"] for r in per)}
            rows.append(row)
            print(f"{name:<32} {precision:<10} mean {row['mean_of_means']:.3g} (worst rollout {row['worst_mean']:.3g}), "
                  f"max {row['worst_max']:.3g} over {row['tokens']} tokens", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
