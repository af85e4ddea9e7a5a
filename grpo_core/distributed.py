"""Data-parallel GRPO on ``torch.distributed``: one process per rank (``torchrun``), the same
updates as one process holding every group.

``DistributedGRPOTrainer`` is a ``GRPOTrainer`` (``grpo_core.loop``) for a process group that is
already initialised (gloo on CPU, nccl on CUDA). Each convention below is pinned by a test that
compares W processes with one (``tests/test_distributed*.py``):

Groups
    The B groups of an iteration are split into W contiguous blocks of B/W: rank r collects
    groups ``r*B/W .. (r+1)*B/W - 1`` (``adapter.collect(..., first_group=, total_groups=)``),
    each started from its global index, so a group never spans two ranks and no two ranks
    sample the same one. B not divisible by W is refused. On CartPole (each group's start
    state and action noise seeded by its index) the ranks' rollouts together are the
    one-process rollout; the VLM adapter samples each rank's share from one random stream per
    share, so its ranks draw other completions than one process would (its updates from a
    given rollout are equal).
Advantages
    A group's statistics are computed where the group is. ``scale="batch"`` needs the std of the
    whole batch: the ranks' rewards and masks (a few numbers per sequence) are all-gathered and
    ``group_advantages`` runs on the whole batch, each rank keeping its own rows: the numbers one
    process computes.
Minibatches
    Every rank draws the one-process order of the ``N = B*G`` global rows
    (``_seeding.minibatch_order``: same seed, iteration and epoch) and keeps, of each minibatch,
    the rows it holds, in that order. Minibatch m of W ranks is minibatch m of one process,
    split unevenly between the ranks (a rank may hold none of it); a one-process run with the
    same seed therefore reproduces a W-process run, and any W reproduces any other.
Loss and gradient
    Every loss term divides by the minibatch's global count (``agg_count`` summed over ranks:
    valid tokens, sequences, or rows for Dr. GRPO), so a rank's loss is its share of the
    one-process loss. DDP and FSDP average gradients over ranks, so each rank's loss is
    multiplied by W before its backward: the synced gradient is the sum of the shares, the
    one-process gradient, whatever W. A rank with no row of a minibatch (or, under FSDP, fewer
    micro-batches than another rank) runs the forward of one row cut to zero rows: it joins
    every collective and adds nothing. The zero-signal skip is taken only when no rank has
    signal, so every rank steps or none does.
Reference
    Built, like the policy, from rank 0's initial weights (broadcast before DDP or FSDP wraps
    them, so ranks initialised differently still share one reference), then refreshed on every
    rank from its own policy, which is the same on every rank (DDP keeps the replicas equal);
    under FSDP the reference is sharded like the policy and refreshed shard by shard.
Metrics
    ``step()`` returns the same metrics on every rank: the loss terms summed over ranks (each is
    a share of the global mean), token shares (clip fractions, approx KL) weighted by tokens,
    the ratio range over ranks with tokens, ``adv_abs_mean`` weighted by valid steps,
    ``zero_signal_groups`` summed, the adapter's rollout ``info`` by ``reduce_info``.
Checkpoints
    ``state_dict()`` has the one-process trainer's format (full tensors, the optimizer state
    keyed by parameter index), so a checkpoint loads at any world size and into a plain
    ``GRPOTrainer``. Under FSDP it is a collective (every rank calls it) and rank 0's holds the
    tensors (``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``).

``shard="fsdp"`` (FSDP2, ``torch.distributed.fsdp.fully_shard``): each module of
``fsdp_units(model)`` (decoder layers, vision blocks, and any module the adapter calls outside
the model's own forward) and then the root are sharded, for the policy and the reference.
Sampling runs with the policy's parameters gathered (one all-gather per rollout, not one per
generated token). It needs ``micro_batch_size`` (every rank then runs the same number of
forwards) no larger than the adapter's ``forward_batch`` when it has one, and a model whose
trainable parameters are all of it (no LoRA: use DDP there).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.distributed as dist

from .adapter import Adapter, Rollout
from .advantages import group_advantages
from .config import GRPOConfig
from .loop import GRPOTrainer, chunk_norms

SHARDS = ("ddp", "fsdp")
_SUMMED = ("loss", "policy_loss", "kl", "entropy")
_TOKEN_SHARES = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl")


class _PolicyForward(torch.nn.Module):
    """The adapter's log-prob forward as a module, so that DDP wraps the whole of it (a VLM's
    vision tower call and every block of rows included) and not only ``policy.forward``."""

    def __init__(self, adapter: Adapter, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self._adapter = adapter  # not a module: a plain attribute

    def forward(self, rollout: Rollout, rows: torch.Tensor):
        return self._adapter.logp_and_entropy(self.policy, rollout, rows)


class DistributedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` on every rank of the default process group (conventions: module doc)."""

    def __init__(self, adapter: Adapter, config: GRPOConfig, optimizer: torch.optim.Optimizer | None = None,
                 *, keep_reference: bool | None = None, shard: str = "ddp", fsdp_units=None,
                 precision: str = "32"):
        """``shard``: "ddp" (replicas, gradients all-reduced) or "fsdp" (FSDP2 shards; the
        optimizer, Adam at ``config.lr`` by default, is built over the shards: one given is
        rebuilt with its class and defaults). ``fsdp_units(model) -> list of modules``: what
        FSDP shards besides the root. ``precision``: as ``GRPOTrainer``'s; under FSDP
        ``"bf16-mixed"`` also gathers the float32 shards as bf16 and reduces gradients in float32
        (``MixedPrecisionPolicy``), under DDP the autocast alone (gradients are float32)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedGRPOTrainer needs an initialised torch.distributed process group "
                               "(launch with torchrun, which sets the environment for init_process_group)")
        if shard not in SHARDS:
            raise ValueError(f"shard={shard!r} is invalid; expected one of {SHARDS}")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        _check_config(config, self.world, shard, adapter)
        if self.world > 1:
            _check_share_collect(adapter)
        super().__init__(adapter, config, optimizer, keep_reference=keep_reference, precision=precision)
        if self.world > 1:
            self._sync_initial_weights()
        self.shard = shard
        self.local_groups = config.groups_per_iteration // self.world
        self.first_group = self.rank * self.local_groups
        self._local_valid = 0
        self._info_keys: tuple[str, ...] = ()
        self.wrapper = None
        if shard == "fsdp":
            if optimizer is not None and len(optimizer.param_groups) != 1:
                raise ValueError("shard='fsdp' rebuilds the optimizer over the parameters' shards with its class "
                                 f"and defaults; got one with {len(optimizer.param_groups)} parameter groups")
            self._fully_shard(fsdp_units, optimizer)
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapper = DistributedDataParallel(_PolicyForward(adapter, self.policy), device_ids=None)

    @torch.no_grad()
    def _sync_initial_weights(self) -> None:
        """Rank 0's policy and reference on every rank, before anything is wrapped or sharded.
        DDP broadcasts the policy it wraps, but the reference was copied from each rank's own
        initial policy before that, and FSDP2 broadcasts nothing: a rank initialised
        differently would pull its KL term towards its own weights (or shard a mix of ranks'
        weights). A reference that is not a module (an adapter's handle to weights inside the
        policy, LoRA's) travels with the policy."""
        for model in (self.policy, self.reference):
            if isinstance(model, torch.nn.Module):
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=0)

    # --- rollouts and advantages ------------------------------------------------------------
    def _collect(self, draw: int = 0) -> Rollout:
        cfg = self.config
        kw = {"num_groups": self.local_groups, "group_size": cfg.group_size, "iteration": self.iteration}
        if self.world > 1:
            kw.update(first_group=self.first_group, total_groups=cfg.groups_per_iteration)
        with torch.no_grad(), self.gathered_parameters(), self.compute():
            rollout = self.adapter.collect(**kw)
        rollout.validate(cfg.group_size, self.local_groups)
        self._local_valid = int(rollout.mask.bool().sum())
        self._info_keys = tuple(rollout.info)
        return rollout

    def _advantages(self, rollout: Rollout) -> torch.Tensor:
        if self.config.scale != "batch" or self.world == 1:
            return super()._advantages(rollout)
        cfg = self.config
        n, t_len = rollout.rewards.shape
        rewards, mask, scored = (all_gather_rows(x, self.world) for x in
                                 (rollout.rewards, rollout.mask, rollout.scored))
        adv = group_advantages(rewards, mask, cfg.group_size, gamma=cfg.gamma, scale=cfg.scale,
                               stats_over=cfg.stats_over, eps=cfg.adv_eps, scored=scored, baseline=cfg.baseline)
        return adv[self.rank * n:(self.rank + 1) * n, :t_len].contiguous()

    @torch.no_grad()
    def _batch_logp(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """As the base, in at most as many chunks as this rank has rows (its share may be
        smaller than ``minibatches``; every rank holds the same number of rows)."""
        n = rollout.rewards.shape[0]
        chunks = torch.arange(n).tensor_split(min(self.config.minibatches, n))
        parts = []
        for rows in chunks:
            with self.compute():
                parts.append(self.adapter.logp_and_entropy(model, rollout, rows)[0])
        return torch.cat(parts)

    # --- the update -------------------------------------------------------------------------
    def _minibatch_rows(self, epoch: int, n: int) -> list[torch.Tensor]:
        lo = self.rank * n
        return [rows[(rows >= lo) & (rows < lo + n)] - lo for rows in super()._minibatch_rows(epoch, n * self.world)]

    def _minibatch_step(self, rollout, adv, ref_logp, rows) -> dict[str, float]:
        stats = super()._minibatch_step(rollout, adv, ref_logp, rows)
        return reduce_minibatch_stats(stats, int(rollout.mask[rows].bool().sum()))

    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        micros = super()._micro_batches(rows) or [rows]
        if self.shard == "fsdp":  # every rank runs as many forwards as the busiest one
            most = int(_all_reduce(torch.tensor([len(micros)]), dist.ReduceOp.MAX))
            micros += [rows[:0]] * (most - len(micros))
        return micros

    def _accumulating(self, more: bool):
        if self.wrapper is not None:
            return self.wrapper.no_sync() if more else contextlib.nullcontext()
        self.policy.set_requires_gradient_sync(not more)
        return contextlib.nullcontext()

    def _policy_forward(self, rollout: Rollout, rows: torch.Tensor):
        empty = rows.numel() == 0
        use = torch.zeros(1, dtype=torch.long) if empty else rows
        if self.wrapper is not None:
            logp, entropy = self.wrapper(rollout, use)
        else:
            logp, entropy = self.adapter.logp_and_entropy(self.policy, rollout, use)
        if empty:  # a forward that joins the collectives and contributes nothing
            return logp[:0], None if entropy is None else entropy[:0]
        return logp, entropy

    def _micro_loss(self, rollout, adv, ref_logp, rows, total, skip):
        loss, stats = super()._micro_loss(rollout, adv, ref_logp, rows, total, skip)
        return loss * self.world, stats  # DDP / FSDP average the ranks' gradients: sum them

    def _global_count(self, count: int) -> int:
        return int(_all_reduce(torch.tensor([count], dtype=torch.float64), dist.ReduceOp.SUM))

    def _no_signal(self, adv: torch.Tensor, mask: torch.Tensor) -> bool:
        local = super()._no_signal(adv, mask)
        return bool(_all_reduce(torch.tensor([int(local)]), dist.ReduceOp.MIN))

    def _clip_gradients(self) -> float:
        if self.shard != "fsdp":
            return super()._clip_gradients()  # DDP: every rank holds the whole synced gradient
        grads = [p.grad for p in self.params if p.grad is not None]
        # this rank's shards' squared norm, summed on the device (one host sync, not one per chunk)
        local = chunk_norms([_local(g) for g in grads]).square().sum() if grads else torch.zeros((), dtype=torch.float64)
        norm = math.sqrt(float(_all_reduce(local.reshape(1).cpu(), dist.ReduceOp.SUM)))
        if not math.isfinite(norm):
            from .loop import NonFiniteLossError

            raise NonFiniteLossError(f"iteration {self.iteration}: gradient norm is {norm}")
        coef = self.config.max_grad_norm / (norm + 1e-6)
        if self.config.max_grad_norm > 0 and coef < 1:
            for g in grads:
                g.mul_(coef)
        return norm

    def step(self) -> dict[str, float]:
        stats = super().step()
        if self.world == 1:
            return stats
        n = self._adv_valid
        valid = _all_reduce(torch.tensor([stats["adv_abs_mean"] * n, n, stats["zero_signal_groups"]],
                                         dtype=torch.float64), dist.ReduceOp.SUM)
        stats["adv_abs_mean"] = float(valid[0] / valid[1]) if valid[1] > 0 else 0.0
        stats["zero_signal_groups"] = float(valid[2])
        if "mismatch_kl" in stats:  # an engine correction's stats: shares of this rank's tokens and rows
            stats.update(reduce_correction_stats(stats, *self._correction_counts))
        infos: list = [None] * self.world
        dist.all_gather_object(infos, {k: stats[k] for k in self._info_keys})
        stats.update(reduce_info(infos))
        return stats

    # --- FSDP -------------------------------------------------------------------------------
    def _fully_shard(self, fsdp_units, optimizer) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {"reshard_after_forward": True}
        if self.precision == "bf16-mixed":  # float32 shards, bf16 gathers and compute, float32 reduction
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif self.precision == "bf16-true":  # bf16 shards; the reduction at least in float32
            kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for model in (self.policy, self.reference):
            if model is None:
                continue
            for unit in (fsdp_units(model) if fsdp_units is not None else []):
                fully_shard(unit, **kw)
            fully_shard(model, **kw)
            # FSDP takes the first module to run forward as the root; the adapter may call a unit
            # (a vision tower) before the model's own forward, so name the root now
            model._get_fsdp_state()._lazy_init()
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.Adam(self.params, lr=self.config.lr) if optimizer is None
                          else type(optimizer)(self.params, **optimizer.defaults))

    @contextlib.contextmanager
    def gathered_parameters(self):
        """Within: the policy's full parameters on every rank (FSDP; nothing to do for DDP), so
        that sampling runs no collective per generated token and ranks may stop at different
        lengths."""
        if self.shard != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.policy.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.set_reshard_after_forward(True, recurse=False)
                m.reshard()

    def policy_state(self) -> dict:
        """The policy's full state dict (FSDP: a collective, every rank calls it, and rank 0's
        holds the tensors, on CPU)."""
        if self.shard != "fsdp":
            return self.policy.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict(self) -> dict:
        if self.shard != "fsdp":
            return super().state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        policy = get_model_state_dict(self.policy, options=opts)
        ref = None if self.reference is None else get_model_state_dict(self.reference, options=opts)
        if self.optimizer.state:
            optim = _by_index(get_optimizer_state_dict(self.policy, self.optimizer, options=opts), self._param_names())
        else:  # no step yet: get_optimizer_state_dict would make one (at lr 0) to create the state
            optim = self.optimizer.state_dict() if self.rank == 0 else {}
        return {"policy": policy, "reference": ref, "optimizer": optim,
                "iteration": self.iteration, "ref_is_policy": self.ref_is_policy,
                "best_outcome": self.best_outcome, "config": self.config.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.shard != "fsdp":
            super().load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)  # every rank holds the full state
        set_model_state_dict(self.policy, state["policy"], options=opts)
        if self.reference is not None and state["reference"] is not None:
            set_model_state_dict(self.reference, state["reference"], options=opts)
        if state["optimizer"].get("state"):  # an empty one is the fresh optimizer's (no step to restore)
            set_optimizer_state_dict(self.policy, self.optimizer, _by_name(state["optimizer"], self._param_names()),
                                     options=opts)
        self.iteration = int(state["iteration"])
        self.ref_is_policy = bool(state.get("ref_is_policy", False)) and self.reference is not None
        self.best_outcome = float(state.get("best_outcome", -math.inf))

    def _param_names(self) -> list[str]:
        return [n for n, p in self.policy.named_parameters() if p.requires_grad]


# --- checks -------------------------------------------------------------------------------------

def _check_config(config: GRPOConfig, world: int, shard: str, adapter) -> None:
    b = config.groups_per_iteration
    if b % world:
        raise ValueError(f"groups_per_iteration={b} is not divisible by the world size {world}: every rank "
                         "collects the same number of whole groups (a group split across ranks would take "
                         "its mean and std from part of its samples)")
    if getattr(config, "dynamic_sampling", False):
        raise ValueError("dynamic_sampling=True is not supported by the distributed trainer yet (torchrun, "
                         f"{world} process{'es' if world > 1 else ''}): start the run with dynamic_sampling=false "
                         "(a run started with it resumes without torchrun only)")
    if shard == "fsdp":
        most = getattr(adapter, "forward_batch", None)
        size = config.micro_batch_size
        if size is None or (most is not None and size > most):
            raise ValueError(f"shard='fsdp' needs micro_batch_size set (every rank then runs the same number of "
                             f"forwards){f', at most the adapter forward_batch={most}' if most else ''}, "
                             f"got {size!r}")


def _check_share_collect(adapter) -> None:
    params = inspect.signature(adapter.collect).parameters
    takes = all(k in params for k in ("first_group", "total_groups")) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes:
        raise ValueError(f"{type(adapter).__name__}.collect takes no first_group/total_groups, so a rank cannot "
                         "collect its own share of the groups (see grpo_core.adapter.Adapter); every rank would "
                         "sample the same groups")


# --- collectives and reductions -----------------------------------------------------------------

def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    dist.all_reduce(t, op=op)
    return t


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_gather_rows(x: torch.Tensor | None, world: int) -> torch.Tensor | None:
    """Every rank's ``x`` stacked by rank, each padded with zeros to the longest T.

    Shapes: x (n, T_rank) on each rank -> (world * n, max T); None -> None."""
    if x is None:
        return None
    n, t_len = x.shape
    longest = int(_all_reduce(torch.tensor([t_len]), dist.ReduceOp.MAX))
    padded = torch.zeros(n, longest, dtype=torch.float64)
    padded[:, :t_len] = x.double()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.cat(parts)
    return out.bool() if x.dtype == torch.bool else out.to(x.dtype)


def reduce_minibatch_stats(stats: dict[str, float], tokens: int) -> dict[str, float]:
    """One minibatch's stats over every rank from this rank's (``tokens``: its valid tokens in
    the minibatch): loss terms summed, token shares weighted by tokens, the ratio range over
    the ranks that hold tokens; ``grad_norm`` and ``skipped_steps`` are the same on every rank."""
    summed = [k for k in _SUMMED if k in stats]
    shares = [k for k in _TOKEN_SHARES if k in stats]
    vals = [stats[k] for k in summed] + [stats[k] * tokens for k in shares] + [tokens]
    total = _all_reduce(torch.tensor(vals, dtype=torch.float64), dist.ReduceOp.SUM).tolist()
    lo, hi = (stats["ratio_min"], stats["ratio_max"]) if tokens else (math.inf, -math.inf)
    ends = _all_reduce(torch.tensor([lo, -hi], dtype=torch.float64), dist.ReduceOp.MIN).tolist()
    out = dict(stats)
    out.update(zip(summed, total))
    count = total[-1]
    out.update({k: total[len(summed) + i] / count if count else 0.0 for i, k in enumerate(shares)})
    out["ratio_min"], out["ratio_max"] = (ends[0], -ends[1]) if count else (1.0, 1.0)
    return out


_CORRECTION_TOKEN_SHARES = ("mismatch_kl", "is_ratio_mean", "is_truncated_frac", "is_masked_frac")


def reduce_correction_stats(stats: dict[str, float], tokens: int, rows: int) -> dict[str, float]:
    """An engine correction's stats over every rank (``losses.engine_correction``): token shares
    weighted by the ranks' valid tokens, the masked-row share by their rows with a token, the
    ratio range over the ranks that hold tokens."""
    vals = [stats[k] * tokens for k in _CORRECTION_TOKEN_SHARES] + [stats["is_masked_seq_frac"] * rows, tokens, rows]
    total = _all_reduce(torch.tensor(vals, dtype=torch.float64), dist.ReduceOp.SUM).tolist()
    n_tok, n_rows = total[-2], total[-1]
    out = {k: total[i] / n_tok if n_tok else 0.0 for i, k in enumerate(_CORRECTION_TOKEN_SHARES)}
    out["is_masked_seq_frac"] = total[len(_CORRECTION_TOKEN_SHARES)] / n_rows if n_rows else 0.0
    lo, hi = (stats["is_ratio_min"], stats["is_ratio_max"]) if tokens else (math.inf, -math.inf)
    ends = _all_reduce(torch.tensor([lo, -hi], dtype=torch.float64), dist.ReduceOp.MIN).tolist()
    out["is_ratio_min"], out["is_ratio_max"] = (ends[0], -ends[1]) if n_tok else (1.0, 1.0)
    return out


def reduce_info(infos: list[dict]) -> dict[str, float]:
    """The ranks' rollout ``info`` dicts as one: a key that starts with ``min_`` or ends with
    ``_min`` takes the min over ranks, ``max_`` / ``_max`` the max, one that ends with ``steps``
    or ``_count`` (``env_steps``) the sum, any other the mean over ranks (ignoring NaN). Ranks
    hold equal numbers of sequences, so the mean of per-sequence means is the global mean; a
    mean over a rank-dependent subset (``reward_mean`` over scored completions) or a spread
    (``reward_std``) is the mean of the ranks' values, not the global one."""
    out = {}
    for key in infos[0]:
        vals = [float(i[key]) for i in infos if key in i and not math.isnan(float(i[key]))]
        if not vals:
            out[key] = math.nan
        elif key.startswith("min_") or key.endswith("_min"):
            out[key] = min(vals)
        elif key.startswith("max_") or key.endswith("_max"):
            out[key] = max(vals)
        elif key.endswith(("steps", "_count")):
            out[key] = sum(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out


def _by_index(optim: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state dict (``get_optimizer_state_dict``) in ``Optimizer.state_dict``
    form: parameters by their index among the trainable ones (empty stays empty: a rank but 0's
    share of a full state dict gathered to rank 0)."""
    if not optim:
        return {}
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]
    return {"state": {index[n]: s for n, s in optim["state"].items()}, "param_groups": groups}


def _by_name(optim: dict, names: list[str]) -> dict:
    """Inverse of ``_by_index``."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in optim["state"].items()}, "param_groups": groups}
