"""Per-token log-probs and entropies from language-model logits, without a full log-softmax.

A vocabulary of ~150k makes the naive ``torch.log_softmax(logits.float(), -1)`` of a rollout
batch the largest tensor of a step: (N, T, V) float32 is 1.2 GB for 2048 tokens. Here the
work is done over blocks of at most ``chunk`` tokens:

- ``logp_t = x_t[id_t] - logsumexp(x_t)`` and ``H_t = -sum_v p_tv log p_tv`` with
  ``x = logits / temperature`` upcast to float32 one block at a time;
- the backward pass is a custom ``torch.autograd.Function`` that saves only the logits (the
  caller's tensor, no copy), the ids and one float32 ``logsumexp`` per token, and recomputes
  the block's softmax when the gradient is needed. A chained ``logsumexp`` would instead keep
  a float32 copy of every block alive for backward, i.e. the full (N, T, V) again.

Gradients (per token, ``p = softmax(x)``, ``g`` the incoming gradient, then ``/ temperature``
for the chain rule through ``x = logits / temperature``):

    d logp / d x_v = 1[v = id] - p_v
    d H    / d x_v = -p_v (log p_v + H)

Vocabulary masking (``masked_ids``): ids the sampler never draws (suppressed special tokens)
get logit ``-inf`` in every block before the ``logsumexp``, so log-probs and entropies are those
of the distribution actually sampled from, renormalised over the other ids. Their probability is
exactly 0; ``0 * log 0`` is taken as 0 in the entropy and its gradient (also for a logit that
is already -inf), and their logits get a zero gradient (never NaN).

Shapes: logits (N, T, V) or (R, V); ids (N, T) or (R,) -> (N, T) or (R,), float32.
Only torch is imported.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256
"""Tokens per block: 256 x 151_936 float32 is ~156 MB of temporaries at most."""


def selective_logp(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
                   chunk: int = DEFAULT_CHUNK, masked_ids=None) -> torch.Tensor:
    """Log-prob of the chosen ids under ``softmax(logits / temperature)`` (``masked_ids`` set
    to -inf first, see the module doc).

    Shapes: logits (N, T, V), ids (N, T) -> (N, T); or logits (R, V), ids (R,) -> (R,).
    The result is float32 whatever the logits' dtype (bf16 logits are upcast per block).
    Differentiable with respect to ``logits``.
    """
    logp, _ = _logp_entropy(logits, ids, temperature, chunk, masked_ids, want_logp=True, want_entropy=False)
    return logp


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0,
                        chunk: int = DEFAULT_CHUNK, masked_ids=None) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per token, in nats.

    Shapes: logits (N, T, V) -> (N, T); or (R, V) -> (R,). Float32, differentiable.
    """
    _, ent = _logp_entropy(logits, None, temperature, chunk, masked_ids, want_logp=False, want_entropy=True)
    return ent


def selective_logp_and_entropy(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
                               chunk: int = DEFAULT_CHUNK, masked_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both at once from one pass over the logits (one backward block loop, one gradient
    buffer). Shapes as ``selective_logp``: -> logp (N, T), entropy (N, T)."""
    return _logp_entropy(logits, ids, temperature, chunk, masked_ids, want_logp=True, want_entropy=True)


def _masked_index(masked_ids, vocab: int, device) -> torch.Tensor | None:
    """``masked_ids`` as a sorted unique long tensor on ``device`` (None when empty)."""
    if masked_ids is None:
        return None
    idx = torch.as_tensor(masked_ids, dtype=torch.long).flatten().unique()
    if idx.numel() == 0:
        return None
    if int(idx.min()) < 0 or int(idx.max()) >= vocab:
        raise ValueError(f"masked_ids must lie in [0, {vocab}), found {int(idx.min())}..{int(idx.max())}")
    if idx.numel() == vocab:
        raise ValueError(f"masked_ids masks all {vocab} ids: no distribution is left")
    return idx.to(device)


def _logp_entropy(logits, ids, temperature, chunk, masked_ids, *, want_logp, want_entropy):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, T, V) or (R, V), got shape {tuple(logits.shape)}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    squeeze = logits.dim() == 2
    x = logits.unsqueeze(0) if squeeze else logits
    if ids is None:
        ids3 = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    else:
        if ids.shape != logits.shape[:-1]:
            raise ValueError(f"ids has shape {tuple(ids.shape)}; expected {tuple(logits.shape[:-1])} "
                             f"for logits of shape {tuple(logits.shape)}")
        ids3 = (ids.unsqueeze(0) if squeeze else ids).long()
        vocab = logits.shape[-1]
        if ids3.numel() and (int(ids3.min()) < 0 or int(ids3.max()) >= vocab):
            raise ValueError(f"ids must lie in [0, {vocab}), found {int(ids3.min())}..{int(ids3.max())}")
    masked = _masked_index(masked_ids, logits.shape[-1], logits.device)
    if masked is not None and ids is not None and bool(torch.isin(ids3, masked).any()):
        bad = int(ids3[torch.isin(ids3, masked)][0])
        raise ValueError(f"id {bad} is in masked_ids: it has probability 0 under the masked "
                         "distribution (it cannot have been sampled from it)")
    logp, ent = _ChunkedLogpEntropy.apply(x, ids3, float(temperature), int(chunk), want_logp, want_entropy,
                                          masked)
    if squeeze:
        logp, ent = logp.squeeze(0), ent.squeeze(0)
    return (logp if want_logp else None), (ent if want_entropy else None)


def _blocks(n: int, t: int, chunk: int):
    """Index blocks covering an (n, t) grid with at most ``max(chunk, 1)`` tokens each, as
    (row slice, column slice) pairs that are views of a (n, t, V) tensor (no copy)."""
    if chunk >= t:
        rows = max(1, chunk // max(t, 1))
        for i in range(0, n, rows):
            yield slice(i, min(n, i + rows)), slice(0, t)
    else:
        for i in range(n):
            for j in range(0, t, chunk):
                yield slice(i, i + 1), slice(j, min(t, j + chunk))


def _block_x(logits: torch.Tensor, r: slice, c: slice, temperature: float, masked) -> torch.Tensor:
    """A float32 copy of one block of ``logits / temperature``, masked ids at -inf, that may be
    modified in place."""
    x = logits[r, c].to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    if masked is not None:
        x.index_fill_(-1, masked, float("-inf"))
    return x


def _log_probs(x: torch.Tensor, block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p = x - lse`` (in place) and ``p``; where ``p`` is 0 (a masked id, or a logit at
    -inf) ``log p`` is set to 0: every use multiplies it by ``p``, and ``0 * log 0`` is 0, not
    NaN."""
    logq = x.sub_(block_lse.unsqueeze(-1))
    p = torch.exp(logq)
    logq.masked_fill_(torch.isneginf(logq), 0.0)
    return logq, p


class _ChunkedLogpEntropy(torch.autograd.Function):
    """Forward and backward over blocks; at most ~3 float32 temporaries of one block alive."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk, want_logp, want_entropy, masked):
        n, t, _ = logits.shape
        logp = torch.zeros(n, t, dtype=torch.float32, device=logits.device)
        ent = torch.zeros(n, t, dtype=torch.float32, device=logits.device)
        lse = torch.zeros(n, t, dtype=torch.float32, device=logits.device)
        for r, c in _blocks(n, t, chunk):
            x = _block_x(logits, r, c, temperature, masked)
            block_lse = torch.logsumexp(x, -1)
            lse[r, c] = block_lse
            if want_logp:
                logp[r, c] = x.gather(-1, ids[r, c].unsqueeze(-1)).squeeze(-1) - block_lse
            if want_entropy:
                # H = -sum p log p with log p = x - lse (no cancellation against lse)
                logq, p = _log_probs(x, block_lse)
                ent[r, c] = -(p.mul_(logq)).sum(-1)
            del x
        ctx.save_for_backward(logits, ids, lse, ent)
        ctx.temperature, ctx.chunk, ctx.masked = temperature, chunk, masked
        ctx.want_logp, ctx.want_entropy = want_logp, want_entropy
        ctx.mark_non_differentiable(*([] if want_logp else [logp]), *([] if want_entropy else [ent]))
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, ids, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        n, t, _ = logits.shape
        grad = torch.zeros_like(logits)
        use_logp = ctx.want_logp and grad_logp is not None
        use_ent = ctx.want_entropy and grad_ent is not None
        for r, c in _blocks(n, t, ctx.chunk):
            # d/dx = -p * (gl + ge * (log p + H)) + onehot(id) * gl
            logq, p = _log_probs(_block_x(logits, r, c, ctx.temperature, ctx.masked), lse[r, c])
            coef = logq  # reuse the buffer
            if use_ent:
                coef.add_(ent[r, c].unsqueeze(-1)).mul_(grad_ent[r, c].float().unsqueeze(-1))
            else:
                coef.zero_()
            if use_logp:
                gl = grad_logp[r, c].float().unsqueeze(-1)
                coef.add_(gl)
            g = p.mul_(coef).neg_()
            del coef, logq
            if use_logp:
                g.scatter_add_(-1, ids[r, c].unsqueeze(-1), gl)
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad[r, c] = g
            del g, p
        return grad, None, None, None, None, None, None
