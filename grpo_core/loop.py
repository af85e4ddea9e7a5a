"""The one GRPO training loop; it drives any ``Adapter``.

Per iteration, in the plan's order:

1. ``adapter.collect`` samples B groups of G sequences from the policy (old log-probs frozen).
2. ``group_advantages`` of the rewards (gamma, scale, stats_over). With ``dynamic_sampling``
   (DAPO), the groups without signal are dropped and more groups drawn (``collect_more``),
   and the iteration continues on the groups with signal (``join_groups``); with
   ``dynamic_sampling_redraw="retry"`` the extra draws are the unsolved groups' prompts again.
3. Reference refresh when ``update_ref_model_freq > 0`` and ``iteration % freq == 0``. It
   happens after the rollout and before any update, so during iteration ``i``'s updates a
   hard-refreshed reference equals the policy that collected iteration ``i``'s rollouts: the
   KL term is exactly 0 at the start of every iteration with freq 1 and grows only with the
   drift of the ``grpo_epochs`` updates. At iteration 0 the reference is the initial policy
   whatever the setting.
4. Reference log-probs, once per iteration (no grad); old log-probs too if the adapter left
   them out and more than one update will read them.
5. ``grpo_epochs`` passes; each shuffles the N sequences and splits them into
   ``minibatches`` (``_seeding.minibatch_order``) and, per minibatch: clipped loss + beta*KL - ent_coef*entropy,
   backward, global gradient-norm clip, optimizer step.

The zero-signal skip (``skip_zero_grad_steps``) is decided from the signal, before the forward,
never from a gradient norm (rounding noise is never exactly zero). A minibatch carries no signal
when (a) every advantage of its valid tokens is exactly 0, (b) ``ent_coef == 0``, and (c)
``beta == 0``, or the reference equals the policy weight for weight (a hard refresh, or a soft
one with alpha 1, or the initial copy, and no optimizer step since) and the KL estimator's
per-token gradient is exactly 0 there (k2, k3, k3_is: ``kl.FLAT_AT_REFERENCE``; not k1, whose
term moves the weights at the reference too). Under (c) the KL term's gradient is 0 in exact
arithmetic; what a forward computes there (log-probs about 1e-7 apart between a policy and its
frozen copy on another kernel path) is rounding noise, which Adam would turn into weight changes
of up to lr. A skipped minibatch still runs its forward (no graph) for the metrics, and counts
in ``skipped_steps``; nothing of the optimizer runs for it (no step, no decoupled weight decay).

``GRPOTrainer.step()`` returns the iteration's metrics as a flat dict of floats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections import defaultdict

import torch

from ._seeding import minibatch_order
from .adapter import Adapter, Rollout
from .advantages import group_advantages
from .config import GRPOConfig
from .determinism import StochasticForwardError, watch_stochastic_modules
from .kl import FLAT_AT_REFERENCE
from .losses import DR_GRPO, agg_count, engine_correction, grpo_loss
from .precision import check_precision, compute_context
from .refmodel import hard_refresh, soft_refresh

_MEAN_STATS = ("loss", "policy_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "clip_frac_dual",
               "approx_kl", "grad_norm")


NORM_CHUNK = 1 << 22
"""Entries per float64 cast of the gradient norm (32 MiB of float64 at a time)."""


class NonFiniteLossError(RuntimeError):
    """Raised instead of stepping the optimizer on a NaN or infinite loss or gradient."""


class GRPOTrainer:
    """Holds the policy's optimizer, the reference model and the iteration counter."""

    def __init__(self, adapter: Adapter, config: GRPOConfig, optimizer: torch.optim.Optimizer | None = None,
                 *, keep_reference: bool | None = None, precision: str = "32"):
        """``keep_reference``: hold a reference model; default only when ``beta != 0`` (with
        ``beta = 0`` it is never read, and for a large model it would double the memory).
        ``precision``: ``grpo_core.precision.PRECISIONS``; ``"bf16-mixed"`` runs every forward
        (rollouts, old and reference log-probs, the update's) under bf16 autocast over the
        policy's float32 weights. The weights' own dtype is the adapter's (``"bf16-true"``:
        load them in bf16)."""
        self.adapter = adapter
        self.config = config
        self.precision = check_precision(precision)
        self.policy = adapter.policy
        if keep_reference is None:
            keep_reference = config.beta != 0
        if not keep_reference and config.beta != 0:
            raise ValueError(f"keep_reference=False needs beta=0 (the KL term reads the reference), "
                             f"got beta={config.beta!r}")
        self.reference = adapter.make_reference() if keep_reference else None
        self.ref_is_policy = self.reference is not None
        """True while the reference equals the policy weight for weight (see the module doc)."""
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.Adam(self.params, lr=config.lr)
        self.iteration = 0
        self.max_len = config.max_len or getattr(adapter, "max_len", None)
        """Dr. GRPO's constant length: ``config.max_len``, else the adapter's ``max_len``."""
        if config.loss_agg == DR_GRPO and not self.max_len:
            raise ValueError(f"loss_agg={DR_GRPO!r} divides by a constant length: set max_len "
                             "(the maximum completion length) in the config; this adapter has none")
        self._forward_checked = False
        self._token_weight: torch.Tensor | None = None
        """The iteration's engine-correction weights (TIS), or None."""
        self.best_outcome = -math.inf
        """The best sample outcome seen so far (``dynamic_sampling_redraw="retry"``)."""
        missing = [m for m in ("collect_more", "join_groups") if not callable(getattr(adapter, m, None))]
        if config.dynamic_sampling and missing:
            raise ValueError(f"dynamic_sampling=True needs an adapter with collect_more and join_groups; "
                             f"{type(adapter).__name__} has no {' or '.join(missing)}")
        if config.dynamic_sampling and config.dynamic_sampling_redraw == "retry" and not missing:
            params = inspect.signature(adapter.collect_more).parameters
            if "again" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                raise ValueError(f"dynamic_sampling_redraw='retry' needs an adapter whose collect_more "
                                 f"takes again=(rollout, groups); {type(adapter).__name__}'s does not")

    def compute(self):
        """The context of one forward call (``grpo_core.precision.compute_context``): bf16
        autocast for ``precision="bf16-mixed"``, nothing otherwise. Entered around each call
        that runs the model (a rollout, a block of log-probs, one micro-batch's forward) and
        left before the backward and the optimizer step: autocast caches the bf16 copy of every
        weight for as long as its context is open, so a context held across an optimizer step
        would keep computing with the weights from before the step."""
        device = next(self.policy.parameters()).device
        return compute_context(self.precision, device)

    def step(self) -> dict[str, float]:
        """Run one full iteration and return its metrics."""
        cfg, it = self.config, self.iteration
        self._token_weight = None
        rollout = self._collect()
        adv = self._advantages(rollout)
        info = rollout.info
        zero_groups = _zero_signal_groups(adv, rollout.mask.bool(), cfg.group_size)
        sampling = {}
        if cfg.dynamic_sampling and cfg.dynamic_sampling_redraw == "retry":
            rollout, adv, sampling = self._retry_unsolved(rollout, adv)
        elif cfg.dynamic_sampling:
            rollout, adv, sampling = self._dynamic_sampling(rollout, adv)
        self.refresh_reference(it)
        ref_logp = self._batch_logp(self.reference, rollout) if cfg.beta != 0 else None
        engine = rollout.engine_logp is not None
        if rollout.old_logp is None and (cfg.grpo_epochs > 1 or cfg.minibatches > 1 or engine):
            with watch_stochastic_modules(self.policy) as active:
                rollout.old_logp = self._batch_logp(self.policy, rollout)  # no update yet: sampling weights
            if active:
                raise StochasticForwardError(
                    f"the policy's forward is random ({', '.join(active)}), so the old log-probs the loop "
                    "recomputes are not those of the distribution that sampled (verl issue 4708): set that "
                    "dropout to 0 or put the policy in eval mode, or collect old_logp in the adapter")
        correction = {}
        if engine:  # another engine sampled: measure the mismatch, correct the loss
            rollout, correction = self._correct_for_engine(rollout)
        stats = self._update(rollout, adv, ref_logp)
        stats.update(correction)
        valid = rollout.mask.bool()
        self._adv_valid = int(valid.sum())  # after an engine correction's mask: what adv_abs_mean averages
        stats["adv_abs_mean"] = float(adv[valid].abs().mean()) if valid.any() else 0.0
        stats["zero_signal_groups"] = float(zero_groups)  # of the first draw
        stats.update(sampling)
        stats["iteration"] = it
        stats.update(info)
        self.iteration += 1
        return stats

    def _correct_for_engine(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        """The rollout the update sees under ``GRPOConfig.engine_correction`` (``losses.
        engine_correction``): the correction's mask in place of the rollout's (MIS), and its
        weight kept for the loss (TIS, ``self._token_weight``), and the mismatch metrics."""
        cfg = self.config
        weight, keep, stats = engine_correction(rollout.old_logp, rollout.engine_logp, rollout.mask,
                                                mode=cfg.engine_correction, level=cfg.engine_correction_level,
                                                threshold=cfg.engine_correction_threshold)
        self._token_weight = weight
        m = rollout.mask.bool()
        self._correction_counts = (int(m.sum()), int(m.any(-1).sum()))  # what the stats are shares of
        corrected = dataclasses.replace(rollout, mask=keep.to(rollout.mask.dtype))
        return corrected, stats

    def refresh_reference(self, iteration: int) -> bool:
        """Refresh the reference if ``iteration`` is a refresh iteration; True if it did."""
        freq = self.config.update_ref_model_freq
        if self.reference is None or freq == 0 or iteration % freq != 0:
            return False
        custom = getattr(self.adapter, "refresh_reference", None)
        if custom is not None:
            custom(self.reference, self.config)
        elif self.config.ref_update == "hard":
            hard_refresh(self.reference, self.policy)
        else:
            soft_refresh(self.reference, self.policy, self.config.ref_mix_alpha)
        copied = self.config.ref_update == "hard" or self.config.ref_mix_alpha == 1.0
        self.ref_is_policy = copied or self.ref_is_policy
        return True

    def _collect(self, draw: int = 0, again: tuple[Rollout, list[int]] | None = None) -> Rollout:
        """The iteration's rollout (draw 0), or extra draw ``draw`` of dynamic sampling (with
        ``again``: the named groups' prompts once more)."""
        cfg = self.config
        groups = cfg.groups_per_iteration if again is None else len(again[1])
        kw = {"num_groups": groups, "group_size": cfg.group_size, "iteration": self.iteration}
        with torch.no_grad(), self.compute():
            if draw == 0:
                rollout = self.adapter.collect(**kw)
            elif again is None:
                rollout = self.adapter.collect_more(**kw, draw=draw)
            else:
                rollout = self.adapter.collect_more(**kw, draw=draw, again=again)
        rollout.validate(cfg.group_size, groups)
        return rollout

    def _advantages(self, rollout: Rollout) -> torch.Tensor:
        cfg = self.config
        return group_advantages(rollout.rewards, rollout.mask, cfg.group_size, gamma=cfg.gamma,
                                scale=cfg.scale, stats_over=cfg.stats_over, eps=cfg.adv_eps,
                                scored=rollout.scored, baseline=cfg.baseline)

    def _dynamic_sampling(self, rollout: Rollout, adv: torch.Tensor):
        """DAPO's dynamic sampling (``GRPOConfig.dynamic_sampling``): ``(rollout, advantages,
        metrics)`` of the groups with signal, the first draw's when nothing was dropped or
        nothing had signal. Advantages are recomputed on the joined groups (the same per group
        with ``scale="group"``; ``"batch"`` takes the std of the trained batch)."""
        cfg = self.config
        b, g = cfg.groups_per_iteration, cfg.group_size
        parts = [(rollout, _signal_groups(adv, rollout.mask, g))]
        found = len(parts[0][1])
        while found < b and len(parts) <= cfg.dynamic_sampling_rounds:
            more = self._collect(draw=len(parts))
            parts.append((more, _signal_groups(self._advantages(more), more.mask, g)))
            found += len(parts[-1][1])
        picks, room = [], b
        for part, groups in parts:
            picks.append((part, groups[:room]))
            room -= len(picks[-1][1])
        stats = {"sampling_rounds": float(len(parts)), "extra_generations": float((len(parts) - 1) * b * g),
                 "groups_dropped": float(sum(b - len(gs) for _, gs in parts)),
                 "groups_trained": float(b - room)}
        if room == b or (len(parts) == 1 and room == 0):
            return rollout, adv, stats
        joined = self._join([(part, gs) for part, gs in picks if gs])
        joined.validate(g, b - room)
        return joined, self._advantages(joined), stats

    def _retry_unsolved(self, rollout: Rollout, adv: torch.Tensor):
        """Dynamic sampling with ``dynamic_sampling_redraw="retry"``: ``(rollout, advantages,
        metrics)`` of the first draw's groups with signal and of the retries of its unsolved
        groups that found signal (the first draw's when nothing was dropped or nothing has
        signal)."""
        cfg = self.config
        b, g = cfg.groups_per_iteration, cfg.group_size
        outcome, valid = self._see_outcomes(rollout)
        signal = _signal_groups(adv, rollout.mask, g)
        group_outcome = _group_outcomes(outcome, valid, g)
        todo = [k for k in range(b) if k not in signal and _unsolved(group_outcome[k], self.best_outcome)]
        todo = todo if cfg.dynamic_sampling_rounds else []
        retried, dropped, found, extra, rounds = len(todo), b - len(signal), [], 0, 1
        while todo and rounds <= cfg.dynamic_sampling_rounds:
            more = self._collect(draw=rounds, again=(rollout, todo))
            self._see_outcomes(more)
            hits = _signal_groups(self._advantages(more), more.mask, g)
            found.append((more, hits))
            extra += len(todo) * g
            dropped += len(todo) - len(hits)
            todo = [k for j, k in enumerate(todo) if j not in hits]
            rounds += 1
        trained = len(signal) + sum(len(h) for _, h in found)
        stats = {"sampling_rounds": float(rounds), "extra_generations": float(extra),
                 "groups_dropped": float(dropped), "groups_trained": float(trained),
                 "groups_retried": float(retried)}
        if trained == 0 or len(signal) == b:  # nothing with signal, or the first draw all signal
            return rollout, adv, stats
        joined = self._join([(part, gs) for part, gs in [(rollout, signal)] + found if gs])
        joined.validate(g, trained)
        return joined, self._advantages(joined), stats

    def _join(self, parts: list[tuple[Rollout, list[int]]]) -> Rollout:
        """``adapter.join_groups(parts)``, refusing a join that lost the parts' engine log-probs
        (the correction would silently be skipped)."""
        joined = self.adapter.join_groups(parts)
        if any(p.engine_logp is not None for p, _ in parts) and joined.engine_logp is None:
            raise ValueError(f"{type(self.adapter).__name__}.join_groups dropped Rollout.engine_logp: the joined "
                             "rollout must carry the parts' engine log-probs (engine_correction needs them)")
        return joined

    def _see_outcomes(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``_sample_outcomes(rollout)``, after raising ``best_outcome`` to their best."""
        outcome, valid = _sample_outcomes(rollout)
        if valid.any():
            self.best_outcome = max(self.best_outcome, float(outcome[valid].max()))
        return outcome, valid

    @torch.no_grad()
    def _batch_logp(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """Log-probs of the whole batch under ``model``, one minibatch-sized chunk at a time (no
        empty chunk when dynamic sampling trains fewer rows than ``minibatches``)."""
        n = rollout.rewards.shape[0]
        parts = []
        for rows in torch.arange(n).tensor_split(max(1, min(self.config.minibatches, n))):
            with self.compute():
                logp, _ = self.adapter.logp_and_entropy(model, rollout, rows)
            parts.append(logp)
        return torch.cat(parts)

    def _update(self, rollout: Rollout, adv: torch.Tensor, ref_logp: torch.Tensor | None) -> dict:
        cfg = self.config
        n = rollout.rewards.shape[0]
        acc: dict[str, list[float]] = defaultdict(list)
        for epoch in range(cfg.grpo_epochs):
            for rows in self._minibatch_rows(epoch, n):
                st = self._minibatch_step(rollout, adv, ref_logp, rows)
                for k, v in st.items():
                    acc[k].append(v)
        out = {k: sum(acc[k]) / len(acc[k]) for k in _MEAN_STATS if k in acc}
        if "kl" in acc:
            out["kl_start"] = acc["kl"][0]  # first update of the iteration, before any step
        out["grad_norm_max"] = max(acc["grad_norm"])
        out["skipped_steps"] = sum(acc["skipped_steps"])
        out["ratio_min"] = min(acc["ratio_min"])
        out["ratio_max"] = max(acc["ratio_max"])
        return out

    def _minibatch_step(self, rollout, adv, ref_logp, rows) -> dict[str, float]:
        """One optimizer step on ``rows``, accumulated over micro-batches of
        ``micro_batch_size`` rows (one forward/backward each, one graph alive at a time). Every
        loss term divides by the minibatch's global count (``agg_count`` over all its rows,
        ``_global_count`` over all ranks), so the accumulated gradient is the one-shot one."""
        cfg = self.config
        skip = cfg.skip_zero_grad_steps and self._no_signal(adv[rows], rollout.mask[rows])
        total = self._global_count(agg_count(rollout.mask[rows], cfg.loss_agg))
        if not skip:
            self.optimizer.zero_grad(set_to_none=True)
        parts = []
        micros = self._micro_batches(rows)
        for k, micro in enumerate(micros):
            with torch.set_grad_enabled(not skip), self._accumulating(more=k < len(micros) - 1):
                loss, stats = self._micro_loss(rollout, adv, ref_logp, micro, total, skip)
                if not skip:
                    loss.backward()
            parts.append((stats, int(rollout.mask[micro].bool().sum())))
        stats = merge_micro_stats(parts)
        stats["skipped_steps"] = float(skip)
        if skip:
            stats["grad_norm"] = 0.0
            return stats
        stats["grad_norm"] = self._clip_gradients()
        self.optimizer.step()
        self.ref_is_policy = False
        return stats

    def _minibatch_rows(self, epoch: int, n: int) -> list[torch.Tensor]:
        """The rows of each minibatch of ``epoch`` (``_seeding.minibatch_order``); a
        data-parallel trainer keeps its share of the global order."""
        # fewer rows than minibatches only after dynamic sampling found few groups
        return minibatch_order(self.config.seed, self.iteration, epoch, n, min(self.config.minibatches, n))

    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        size = self.config.micro_batch_size
        return [rows] if size is None else list(rows.split(size))

    def _accumulating(self, more: bool):
        """Context of one micro-batch's forward and backward; ``more``: another micro-batch of
        the same step follows (a data-parallel trainer defers its gradient sync to the last)."""
        return contextlib.nullcontext()

    def _policy_forward(self, rollout: Rollout, rows: torch.Tensor):
        """The policy's log-probs and entropies of ``rows``, with gradient (a data-parallel
        trainer runs it through its wrapper)."""
        return self.adapter.logp_and_entropy(self.policy, rollout, rows)

    def _global_count(self, count: int) -> int:
        """The minibatch's count over every process; one process: the count itself."""
        return count

    def _micro_loss(self, rollout, adv, ref_logp, rows, total, skip):
        cfg = self.config
        shortcut = rollout.old_logp is None
        with self._checked_forward(shortcut and not skip), self.compute():
            logp, entropy = self._policy_forward(rollout, rows)
        # old_logp is None only with one epoch and one minibatch: this forward is the first
        # and only one since sampling, so it is the sampling policy's (ratio exactly 1); the
        # forward is checked for dropout once (``_checked_forward``)
        old_logp = logp.detach() if shortcut else rollout.old_logp[rows]
        loss, stats = grpo_loss(
            logp, old_logp, None if ref_logp is None else ref_logp[rows],
            adv[rows], rollout.mask[rows], entropy=entropy, beta=cfg.beta,
            ent_coef=cfg.ent_coef, kl_estimator=cfg.kl_estimator, eps_low=cfg.clip_eps_low,
            eps_high=cfg.clip_eps_high, agg=cfg.loss_agg, max_len=self.max_len,
            clip_ratio_c=cfg.clip_ratio_c, total=total, ratio_level=cfg.ratio_level,
            policy_loss=cfg.policy_loss,
            token_weight=None if self._token_weight is None else self._token_weight[rows],
        )
        if not math.isfinite(stats["loss"]):
            raise NonFiniteLossError(f"iteration {self.iteration}: loss is {stats['loss']} "
                                     f"(parts: {stats}); refusing to step the optimizer")
        return loss, stats

    def _no_signal(self, adv: torch.Tensor, mask: torch.Tensor) -> bool:
        """No term of this minibatch's loss has a non-zero expected gradient (module doc)."""
        cfg = self.config
        flat_kl = self.ref_is_policy and cfg.kl_estimator in FLAT_AT_REFERENCE
        if cfg.ent_coef != 0 or (cfg.beta != 0 and not flat_kl):
            return False
        return not bool((adv[mask.bool()] != 0).any())

    @contextlib.contextmanager
    def _checked_forward(self, check: bool):
        """On the first forward whose log-probs also serve as the old ones, refuse dropout."""
        if not check or self._forward_checked:
            yield
            return
        with watch_stochastic_modules(self.policy) as active:
            yield
        if active:
            raise StochasticForwardError(
                f"the policy's forward is random ({', '.join(active)}), so the old log-probs "
                "cannot be taken from the update's own forward (grpo_epochs=1, minibatches=1): "
                "set that dropout to 0, or collect old_logp in the adapter")
        self._forward_checked = True

    def _clip_gradients(self) -> float:
        """Global L2 norm of the gradient before clipping; clips when max_grad_norm > 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        norm = float(torch.linalg.vector_norm(chunk_norms(grads)))  # one host sync
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"iteration {self.iteration}: gradient norm is {norm}")
        if self.config.max_grad_norm > 0:
            coef = self.config.max_grad_norm / (norm + 1e-6)
            if coef < 1:
                torch._foreach_mul_(grads, coef)
        return norm

    def state_dict(self) -> dict:
        ref = None if self.reference is None else self.reference.state_dict()
        return {"policy": self.policy.state_dict(), "reference": ref,
                "optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
                "ref_is_policy": self.ref_is_policy, "best_outcome": self.best_outcome,
                "config": self.config.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        if self.reference is not None and state["reference"] is not None:
            self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        # an older checkpoint does not say: assume the reference differs (never skips wrongly)
        self.ref_is_policy = bool(state.get("ref_is_policy", False)) and self.reference is not None
        self.best_outcome = float(state.get("best_outcome", -math.inf))  # older checkpoints: none seen


def _signal_groups(adv: torch.Tensor, mask: torch.Tensor, group_size: int) -> list[int]:
    """Indices of the groups with a non-zero advantage at a valid step. Shapes: (N, T) -> list."""
    nonzero = ((adv != 0) & mask.bool()).view(-1, group_size * adv.shape[1]).any(1)
    return nonzero.nonzero().flatten().tolist()


def _sample_outcomes(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's outcome (its rewards summed over its valid steps) and whether it has a
    valid step. Shapes: (N, T) -> (N,), (N,) bool."""
    mask = rollout.mask.bool()
    return torch.where(mask, rollout.rewards, torch.zeros_like(rollout.rewards)).sum(1), mask.any(1)


def _group_outcomes(outcome: torch.Tensor, valid: torch.Tensor, group_size: int) -> list[float]:
    """Each group's mean outcome over its valid samples; NaN for a group without one."""
    out = []
    for o, v in zip(outcome.view(-1, group_size), valid.view(-1, group_size)):
        out.append(float(o[v].double().mean()) if v.any() else math.nan)
    return out


def chunk_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norms of ``grads`` cut into chunks of ``NORM_CHUNK`` entries, in float64, stacked
    (their vector norm is the gradient's). float64: a float32 (or bf16) norm overflows once the
    squares pass 3.4e38, at entries of about 1e19, although the gradient and its clipped form are
    finite. By chunks (one fused kernel per chunk list): a float64 copy of a whole large tensor
    (an embedding's gradient) would cost twice its memory for the step.

    Shapes: a list of tensors of any shapes -> (chunks,) float64."""
    chunks = [c for g in grads for c in g.reshape(-1).split(NORM_CHUNK)]
    return torch.stack(torch._foreach_norm(chunks, 2, dtype=torch.float64))


def _below(value: float, best: float) -> bool:
    """``value`` is below ``best`` by more than rounding (a relative 1e-6); NaN never is."""
    return value < best - 1e-6 * max(1.0, abs(best))


def _unsolved(outcome: float, best: float) -> bool:
    """A group without signal is retried when its outcome is below the best, or when it has no
    outcome at all (NaN: no sample with a valid step, so nothing says it is solved)."""
    return math.isnan(outcome) or _below(outcome, best)


def _zero_signal_groups(adv: torch.Tensor, valid: torch.Tensor, group_size: int) -> int:
    """Groups whose every valid advantage is exactly 0 (no reward spread, or no sample)."""
    nonzero = ((adv != 0) & valid).view(-1, group_size * adv.shape[1]).any(1)
    return int((~nonzero).sum())


_SUMMED = ("loss", "policy_loss", "kl", "entropy")
_TOKEN_SHARES = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl")


def merge_micro_stats(parts: list[tuple[dict, int]]) -> dict[str, float]:
    """One minibatch's stats from its micro-batches' ``(stats, valid tokens)``: the loss terms
    (already divided by the global count) add up, token shares are token-weighted, the ratio
    range is the range over the micro-batches that have tokens."""
    if len(parts) == 1:
        return dict(parts[0][0])
    out = {k: sum(st[k] for st, _ in parts) for k in _SUMMED if k in parts[0][0]}
    tokens = sum(n for _, n in parts)
    for k in _TOKEN_SHARES:
        if k in parts[0][0]:
            out[k] = sum(st[k] * n for st, n in parts) / tokens if tokens else 0.0
    live = [st for st, n in parts if n] or [parts[0][0]]
    out["ratio_min"] = min(st["ratio_min"] for st in live)
    out["ratio_max"] = max(st["ratio_max"] for st in live)
    return out
