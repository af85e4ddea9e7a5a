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

``--vlm``: the adapter's whole training forward (``VLMAdapter.forward_logp`` + backward) on the
tiny Qwen2-VL with its LM head widened to a large vocabulary, measured by counting the bytes of
every tensor storage alive after each aten op (``LiveBytes``, a ``TorchDispatchMode``; the
weights are left out, the LM head is frozen so that its V x hidden gradient is not counted) and
the bytes saved for backward (``saved_bytes``, ``torch.autograd.graph.saved_tensors_hooks``).
Everything that does not grow with the vocabulary cancels in the slope between two vocabulary
sizes, which is compared with ``adapters.vlm.logprob_peak_bytes``; ``--sliced`` also runs the
path before the fix (logits of T + 1 positions, then ``[:, :-1]``). Then the formula's table
for Qwen2-VL-2B and -7B:

    python benchmarks/logprob_memory.py --vlm --sliced
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MB = 1024 * 1024
GB = 1e9
QWEN2_VL = {"Qwen2-VL-2B": {"vocab": 151_936, "hidden": 1536}, "Qwen2-VL-7B": {"vocab": 152_064, "hidden": 3584}}
"""Vocabulary (config ``vocab_size``, the LM head's rows) and hidden size of the two checkpoints."""


def _torch_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class LiveBytes:
    """Bytes of the tensor storages alive after each aten op run while it is entered (a
    ``TorchDispatchMode``, which sees the backward's ops too): ``now``, ``peak`` and, at the
    peak, the largest storages (``at_peak``: (bytes, op, shape)). A storage is counted from the
    first op that returns it until it is freed; pass the weights as ``exclude`` (a view of a
    weight is an op's output too). A buffer an op allocates and frees inside itself is not seen
    (the steps of a composite op such as ``logsumexp`` are aten ops of their own, and are)."""

    def __init__(self, exclude=()):
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        outer = self

        class _Mode(_torch_dispatch_mode()):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._drop_dead()  # before adding: a freed storage's address may be reused
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = st._cdata
                        if key not in outer._live and key not in outer.exclude:
                            outer._live[key] = (StorageWeakRef(st), st.nbytes(), str(func), tuple(t.shape))
                outer._count()
                return out

        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self._live: dict[int, tuple] = {}
        self._mode = _Mode()
        self.now = self.peak = 0
        self.at_peak: list[tuple] = []

    def _drop_dead(self) -> None:
        for key in [k for k, v in self._live.items() if v[0].expired()]:
            del self._live[key]

    def _count(self) -> None:
        self._drop_dead()
        self.now = sum(v[1] for v in self._live.values())
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = sorted(((v[1], v[2], v[3]) for v in self._live.values()), reverse=True)[:6]

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._count()


@contextlib.contextmanager
def saved_bytes(exclude=()):
    """Yields a dict {storage: bytes} of every storage autograd saves for backward while the
    context is open (a view counts its whole storage: what it keeps alive), ``exclude``'s
    storages (the weights) left out."""
    import torch

    skip = {t.untyped_storage()._cdata for t in exclude}
    held: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip:
            held[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield held


def sliced_logits(model) -> None:
    """Make ``model`` answer a tensor of positions in ``logits_to_keep`` as the adapter asked
    before the fix: the last T + 1 positions, then the slice ``[:, :-1]`` (kept to measure what
    the fix changed)."""
    forward = model.forward

    def old_way(*args, logits_to_keep=0, **kw):
        out = forward(*args, logits_to_keep=len(logits_to_keep) + 1, **kw)
        out.logits = out.logits[:, :-1]
        return out

    model.forward = old_way


def measure_vlm_forward(adapter, rollout, vocab: int, *, sliced: bool = False, seed: int = 0) -> dict:
    """Replace ``adapter.policy``'s LM head by a frozen random one of ``vocab`` rows, run
    ``forward_logp`` on every row of ``rollout`` and backward through log-probs + entropies;
    the live bytes' peak after the forward and overall, and the bytes saved for backward."""
    import torch

    model = adapter.policy
    hidden = model.lm_head.in_features
    dtype = model.lm_head.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.copy_(0.02 * torch.randn(vocab, hidden, generator=gen))
    if sliced:
        sliced_logits(model)
    model.zero_grad(set_to_none=True)
    rows = torch.arange(rollout.mask.shape[0])
    weights = list(model.parameters())
    with saved_bytes(weights) as held, LiveBytes(weights) as live:
        logp, ent = adapter.forward_logp(model, rollout, rows)
        forward_peak = live.peak
        (logp.sum() + ent.sum()).backward()
    if sliced:
        del model.forward
    return {"vocab": vocab, "forward_peak": forward_peak, "peak": live.peak, "saved": sum(held.values()),
            "at_peak": live.at_peak}


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


def _vlm(args) -> int:
    """``--vlm``: measured slopes of the tiny model's forward_logp vs the formula, then the
    formula's table for the real models."""
    import tempfile

    import torch

    from adapters.vlm import VLMAdapter, logprob_peak_bytes
    from adapters.vlm_tasks import colours_dataset, colours_vocabulary, first_word_reward
    from adapters.vlm_tiny import build_tiny_vlm, load_vlm

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.finfo(dtype).bits // 8
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_vlm(folder, words=colours_vocabulary(), family="qwen2_vl", seed=0)
        model, processor = load_vlm(folder, dtype=dtype)
    adapter = VLMAdapter(model, processor, colours_dataset(8), [first_word_reward], max_new_tokens=args.new_tokens,
                         chunk=args.chunk, old_logp_forward=False)
    rollout = adapter.collect(num_groups=2, group_size=args.rows // 2, iteration=0)
    n, t = rollout.mask.shape
    small, large = args.vocab // 2, args.vocab
    print(f"tiny Qwen2-VL, {args.dtype}: {n} rows, T = {t} completion tokens, chunk {args.chunk}; "
          f"LM head of V = {small:,} and {large:,} rows")
    print(f"{'path':28s} {'saved/V':>8s} {'peak/V':>8s} {'formula/V':>10s} {'peak at V=' + format(large, ','):>16s}")
    for sliced in ((False, True) if args.sliced else (False,)):
        a, b = (measure_vlm_forward(adapter, rollout, v, sliced=sliced) for v in (small, large))
        slope = {k: (b[k] - a[k]) / (large - small) for k in ("saved", "peak")}
        formula = (logprob_peak_bytes(n, t, large, itemsize, args.chunk)
                   - logprob_peak_bytes(n, t, small, itemsize, args.chunk)) / (large - small)
        name = "before: T+1 logits, [:, :-1]" if sliced else "positions P-1..P+T-2"
        print(f"{name:28s} {slope['saved']:8.0f} {slope['peak']:8.0f} {formula:10.0f} {b['peak'] / MB:13.1f} MB")
        print("    largest at the peak: " + ", ".join(f"{op.split('.')[1]} {list(shape)} {size / MB:.1f} MB"
                                                  for size, op, shape in b["at_peak"][:3]))
    print(f"(per V: saved = rows*T*bytes = {n * t * itemsize}; formula = 2*rows*T*bytes + 9*c)")
    print()
    print(table())
    return 0


def table(new_tokens: int = 512, rows=(4, 8, 32), chunk: int = 256) -> str:
    """The formula's numbers (``adapters.vlm.logprob_peak_bytes``) for Qwen2-VL-2B and -7B, as a
    markdown table: logits held until backward, the peak with their gradient and the chunked
    log-prob's temporaries, and the LM head's float32 weight gradient beside them."""
    from adapters.vlm import logprob_peak_bytes

    lines = [f"| model (V) | dtype | rows | logits held (rows x {new_tokens} x V) | peak "
             "| LM head gradient (V x hidden, fp32) |", "|---|---|---:|---:|---:|---:|"]
    for name, spec in QWEN2_VL.items():
        v = spec["vocab"]
        for dtype, size in (("bf16", 2), ("float32", 4)):
            for n in rows:
                lines.append(f"| {name} ({v:,}) | {dtype} | {n} | {n * new_tokens * v * size / GB:.2f} GB | "
                             f"{logprob_peak_bytes(n, new_tokens, v, size, chunk) / GB:.2f} GB | "
                             f"{v * spec['hidden'] * 4 / GB:.2f} GB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, help="default 151,936 (with --vlm: 80,000, and half of it)")
    p.add_argument("--tokens", type=int, default=2048, help="N*T, split as N=8 rows")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk", type=int, help="tokens per block; default 256 (with --vlm: 8, blocks much "
                   "smaller than the logits as with T = 512 and chunk 256)")
    p.add_argument("--backward", action="store_true", help="also run backward through both outputs")
    p.add_argument("--vlm", action="store_true", help="the tiny VLM's forward_logp + backward (live bytes) "
                   "against adapters.vlm.logprob_peak_bytes, then the table for Qwen2-VL-2B/7B")
    p.add_argument("--sliced", action="store_true", help="with --vlm: also the path before the fix")
    p.add_argument("--new-tokens", type=int, default=12, help="with --vlm: max_new_tokens of the tiny rollout")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vlm:
        args.vocab, args.chunk = args.vocab or 80_000, args.chunk or 8
        return _vlm(args)
    args.vocab, args.chunk = args.vocab or 151_936, args.chunk or 256
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
