"""Peak memory of per-token log-probs + entropies: naive log_softmax vs grpo_core.logprobs.

Each variant runs in a fresh subprocess; the number reported is the growth of the process's
peak resident set size (``resource.getrusage(...).ru_maxrss``) over its value right after the
input logits were created, i.e. the extra memory the computation needed on top of its input.
(``tracemalloc`` only sees Python-level allocations, not torch's CPU tensors, so it cannot
measure this.)

    python benchmarks/logprob_memory.py                 # V = 151_936, 2048 tokens, float32
    python benchmarks/logprob_memory.py --tokens 512 --dtype bfloat16 --backward

Measured on a shared 2-core CPU box (V = 151_936, N*T = 2048 as 8 x 256, float32 logits of
1187 MB, chunk 256), extra peak memory over the input:

    forward (no grad):   naive 3565 MB   chunked  453 MB
    forward + backward:  naive 5941 MB   chunked 1493 MB  (1187 MB of it is d loss / d logits)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MB = 1024 * 1024


def _peak_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _child(variant: str, n: int, t: int, vocab: int, dtype: str, backward: bool, chunk: int) -> dict:
    import torch

    from grpo_core.logprobs import selective_logp_and_entropy

    torch.set_num_threads(max(1, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, t, vocab, generator=gen).to(getattr(torch, dtype))
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    if backward:
        logits.requires_grad_()
    base = _peak_bytes()
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        if variant == "naive":
            logq = torch.log_softmax(logits.float(), -1)
            logp = logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            ent = -(logq.exp() * logq).sum(-1)
        else:
            logp, ent = selective_logp_and_entropy(logits, ids, chunk=chunk)
        if backward:
            (logp.sum() + ent.sum()).backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "extra_peak_mb": (_peak_bytes() - base) / MB,
            "input_mb": logits.numel() * logits.element_size() / MB, "seconds": seconds,
            "logp_sum": float(logp.detach().sum()), "entropy_sum": float(ent.detach().sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--tokens", type=int, default=2048, help="N*T, split as N=8 rows")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--backward", action="store_true", help="also run backward through both outputs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    n = args.rows
    t = max(1, args.tokens // n)
    if args.child:
        print(json.dumps(_child(args.child, n, t, args.vocab, args.dtype, args.backward, args.chunk)))
        return 0
    rows = []
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab), "--tokens",
               str(args.tokens), "--rows", str(n), "--dtype", args.dtype, "--chunk", str(args.chunk)]
        if args.backward:
            cmd.append("--backward")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mode = "forward+backward" if args.backward else "forward (no grad)"
    print(f"V={args.vocab}  N*T={n * t} (N={n}, T={t})  {args.dtype} logits of "
          f"{rows[0]['input_mb']:.0f} MB  {mode}  chunk={args.chunk}")
    print(f"{'variant':10s} {'extra peak MB':>14s} {'seconds':>9s}")
    for r in rows:
        print(f"{r['variant']:10s} {r['extra_peak_mb']:14.0f} {r['seconds']:9.2f}")
    diff = abs(rows[0]["logp_sum"] - rows[1]["logp_sum"]) / max(1.0, abs(rows[0]["logp_sum"]))
    print(f"relative difference of sum(logp): {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
    sys.exit(main())
