"""Preflight: cheap checks on a few real samples before any (GPU) training step.

``run_preflight(trainer_or_adapter, config)`` returns one ``CheckResult`` row per check (the
estimator kit's row type: ``passed`` True/False, or None for a check that does not apply);
``train vlm`` prints them and refuses to train when one failed. Nothing the trainer will use
is changed: no optimizer step, no ``.grad`` written (gradients are taken with
``torch.autograd.grad``), the reference restored if the refresh check had to overwrite it,
and the rollout seeded as the trainer's own (no global random state consumed).

The checks, on one rollout of ``samples`` completions of the iteration the trainer runs next:

``logprob_consistency`` (a)
    The log-probs the loss recomputes (one forward over prompt + completion, suppressed ids
    masked) against those of the distribution the sampling steps drew from (generate's processed
    scores: temperature and suppression applied, KV-cached decoding) for the same tokens: two
    computations of one distribution. Wrong M-RoPE positions (Qwen2.5-VL with
    ``mm_token_type_ids`` not covering the completion), images paired with the wrong rows, a
    shifted token alignment, a stale rope-delta cache, a different temperature or suppressed set
    all show here and nowhere else; the ratio and the KL are then computed against a
    distribution that was never sampled from. Bounds (``LOGPROB_BOUNDS``): float32,
    max |gap| <= 1e-4 (a correct forward is ~1e-6 on the tiny model). bfloat16 / float16:
    mean |gap| <= 0.05 nats, see ``LOGPROB_BOUNDS``.
``engine_consistency`` (a'', when the adapter samples with a separate engine)
    With an engine apart from the policy (``adapters.vlm_engine``: a bf16 copy, an inference
    server), the log-probs the engine reports for its samples (``Rollout.engine_logp``) against
    the trainer's forward of the same tokens, on one rollout the engine sampled (synced by the
    adapter as in training): the mismatch the loop corrects, which must be rounding only. A
    missed weight sync (the policy moved since the engine's last sync), log-probs without the
    temperature, or the log-prob of another token than the sampled one are far above it; an
    engine that can compare its weights with the policy's (``CopyEngine.weight_gap``) must also
    hold them exactly (cast). Bounds: ``ENGINE_BOUNDS``. The other rows then run on a rollout the
    policy itself sampled, so that ``logprob_consistency`` checks the training forward alone.
``reference_refresh`` (b, when a reference is kept)
    After a hard refresh through the trainer's own refresh path (``adapter.refresh_reference``
    when defined, else ``load_state_dict``) every reference tensor equals the policy's (max
    |diff| 0) and the reference's log-probs equal the policy's on the rollout (0: same weights,
    same code, same inputs). Catches a refresh that copies the wrong module, misses tensors,
    leaves the reference in train mode (dropout) or in another dtype.
``deterministic_forward`` (a')
    Two forwards with gradient of the same rows give the same log-probs, and no dropout runs
    in train mode during them (``grpo_core.determinism``). With one epoch and one minibatch the
    loop takes the old log-probs from the update's own forward: a random forward (dropout, which
    gradient checkpointing's train-mode forward turns on) forces the PPO ratio to 1 while the
    true ratio is not, and with several epochs it makes the ratio noise. Fails naming the module.
``finite_loss`` (c)
    The GRPO loss of one minibatch of the rollout exactly as the trainer computes it (returns,
    group advantages, reference log-probs, ``grpo_loss``) and its gradient are finite; a NaN
    here stops training at the first step anyway, after the model load and the first rollout.
``kl_gradient`` (d, when beta > 0)
    The KL term alone (advantages 0, entropy off) against reference log-probs moved off the
    policy's (fixed noise, std ``KL_NOISE``; right after a hard refresh the k3 gradient is
    exactly 0) must have a non-zero, finite gradient norm with respect to the trainable
    parameters. A detached ``logp`` (``no_grad`` around the forward, a ``.detach()`` in the
    estimator or loss) gives a silent zero: beta then does nothing.
``kit_kl`` / ``kit_advantage`` / ``kit_returns`` (e)
    The estimator kit (``grpo_core.testing.kit.check_estimator``) on the configured KL
    estimator (``BUILTINS[config.kl_estimator]``), the group-advantage builtin and the returns
    builtin: unbiasedness, gradient direction, shapes, padding, ... (each row summarises one
    estimator's rows; ``details["failed"]`` holds the failing rows).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from grpo_core.adapter import Rollout
from grpo_core.advantages import group_advantages
from grpo_core.determinism import watch_stochastic_modules
from grpo_core.losses import grpo_loss
from grpo_core.testing.checks import CheckResult
from grpo_core.testing.kit import BUILTIN_KINDS, BUILTINS, check_estimator, format_table

LOGPROB, REFRESH, FINITE, KL_GRAD = "logprob_consistency", "reference_refresh", "finite_loss", "kl_gradient"
DETERMINISM, ROLLOUT = "deterministic_forward", "rollout"
KIT_KL, KIT_ADV, KIT_RET = "kit_kl", "kit_advantage", "kit_returns"
ENGINE = "engine_consistency"
CHECKS = (LOGPROB, DETERMINISM, REFRESH, FINITE, KL_GRAD, KIT_KL, KIT_ADV, KIT_RET)
"""The checks, in the order of the table. A rollout that cannot be collected (a reward function
raising, an image that does not decode) gives one failed ``rollout`` row naming the error, and
the checks that need it are reported as skipped."""
ENGINE_CHECKS = (ENGINE,)
"""Checks whose row appears only when the adapter samples with a separate engine (after
``logprob_consistency`` in the table); ``checks=`` may name them too."""
_ORDER = (LOGPROB, ENGINE, *CHECKS[1:])

LOGPROB_BOUNDS: dict[torch.dtype, tuple[str, float]] = {
    torch.float64: ("max", 1e-4),
    torch.float32: ("max", 1e-4),
    torch.bfloat16: ("mean", 0.05),
    torch.float16: ("mean", 0.05),
}
"""Statistic of |generation log-prob - training log-prob| over the valid completion tokens, and
its bound, by the model's dtype.

float32: the max, 1e-4: a correct forward measures ~5e-7 on the tiny models (both families,
CPU); the Qwen2.5-VL M-RoPE bug (``mm_token_type_ids`` not extended) measures 7e-4 to 1e-3 on
the same random tiny model, where logits are nearly flat (expected far larger on a trained one).

bfloat16 / float16: the mean, 0.05 nats, set from measurement (``benchmarks/bf16_logprob_gap.py``,
CPU, both paths in the run's precision: ``bf16-mixed`` under autocast, ``bf16-true`` with bf16
weights; mean |gap| over the valid tokens of 8 completions, 2-3 rollouts):

    model (random init)                     bf16-mixed mean / max     bf16-true mean / max
    tiny (2 layers, hidden 64)              1.3e-4 / 2.0e-3           1.7e-4 / 2.0e-3
    Qwen2-VL-2B widths, 4 layers            3.0e-3 / 1.6e-2           4.4e-3 / 1.9e-2
    Qwen2-VL-2B widths, 8 layers            4.1e-3 / 1.6e-2           6.1e-3 / 2.4e-2

The mean grows about as the square root of depth (x1.37 and x1.40 from 4 to 8 layers), which
puts the 28 layers of Qwen2-VL-2B near 7.7e-3 (bf16-mixed) and 1.1e-2 (bf16-true): the bound
sits 6.5x and 4.5x above that. The max is not used: single tokens reach 2e-2 already at 8 layers
(a logit in [16, 32) is stored in steps of 0.125 in bf16, and log-softmax moves by up to twice
the largest logit change), so a max bound loose enough for rounding would miss real bugs. A
structural bug (positions, images, token alignment) changes the distribution on most tokens,
far above 0.05 nats on a trained model; on these random models, whose logits are nearly flat,
the Qwen2.5-VL M-RoPE bug measures ~2e-3, under the bound, so in bf16 the tiny model cannot show
detection (the float32 tests do). float16 (11 significant bits) is held to the same bound.
A GPU's kernels round differently from the CPU's: ``make gpu-check`` prints the measured gap
of the 2B shape, and ``logprob_bound=`` (``--preflight-bound``) overrides the bound."""

CUDA_FLOAT32_BOUND = ("max", 1e-3)
"""float32 on a GPU: the cached decode and the full forward run other kernel shapes and reduction
orders there than on a CPU (where a correct forward measures ~5e-7); not measured yet, so 10x
the CPU bound. The row prints the measured max and mean; ``--preflight-bound`` sets the bound
from the first GPU run's numbers."""


def logprob_bound(dtype: torch.dtype, device_type: str) -> tuple[str, float]:
    """(statistic, bound) of ``logprob_consistency`` for a compute ``dtype`` on a device type."""
    if device_type == "cuda" and dtype in (torch.float32, torch.float64):
        return CUDA_FLOAT32_BOUND
    return LOGPROB_BOUNDS.get(dtype, ("max", 1e-4))


REFRESH_BOUND = 0.0
"""Reference vs policy tensors right after a hard refresh: exact equality."""
REFRESH_LOGP_BOUND = 1e-5
"""Reference vs policy log-probs right after a hard refresh. Not 0: with identical weights,
a model whose parameters require grad and a frozen copy take different kernel paths on CPU
(measured up to 7e-7 in float32 on the tiny model), while a refresh that misses a tensor moves
log-probs by far more. Low-precision dtypes use their log-prob consistency bound."""
KL_NOISE = 0.1
"""Std of the fixed noise added to the reference log-probs for ``kl_gradient``."""
DEFAULT_SAMPLES = 8
DEFAULT_MAX_NEW_TOKENS = 64


class PreflightError(RuntimeError):
    """Raised by ``require_preflight`` when a check failed; ``rows`` holds every row."""

    def __init__(self, rows: list[CheckResult]):
        self.rows = rows
        names = ", ".join(r.name for r in rows if r.failed)
        super().__init__(f"preflight failed: {names}")


def _row(name: str, passed: bool, value, bound, explanation: str, details: dict | None = None) -> CheckResult:
    return CheckResult(name=name, passed=bool(passed), value=value, bound=bound,
                       explanation=explanation, kind="required", details=details)


def _skip(name: str, why: str) -> CheckResult:
    return CheckResult(name=name, passed=None, value=None, bound=None, explanation=f"skipped: {why}",
                       kind="info")


def _error(name: str, exc: BaseException, what: str = "") -> CheckResult:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return _row(name, False, None, None, f"{what}{type(exc).__name__}: {msg}")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _valid(rollout: Rollout) -> torch.Tensor:
    attn = rollout.inputs.get("completion_attn") if isinstance(rollout.inputs, dict) else None
    return (attn if attn is not None else rollout.mask).bool().cpu()


def _max_abs(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    if not valid.any():
        return 0.0
    return float((a.detach().float().cpu() - b.detach().float().cpu())[valid].abs().max())


# --- (a) ---------------------------------------------------------------------------------------

def _compute_dtype(trainer, policy: torch.nn.Module) -> torch.dtype:
    """The dtype the forwards compute in: bf16 under ``precision="bf16-mixed"`` (float32
    weights, bf16 autocast), else the weights' own."""
    if trainer is not None and getattr(trainer, "precision", "32") == "bf16-mixed":
        return torch.bfloat16
    return _model_dtype(policy)


def check_logprob_consistency(adapter, rollout: Rollout, bound: float | None = None,
                              dtype: torch.dtype | None = None) -> CheckResult:
    """Row (a); ``rollout`` collected with ``record_generation_logp=True``. ``dtype``: the
    compute dtype whose bound applies (default: the policy's weights')."""
    from .vlm import logprob_consistency

    dtype = _model_dtype(adapter.policy) if dtype is None else dtype
    stat, default = logprob_bound(dtype, next(adapter.policy.parameters()).device.type)
    bound = default if bound is None else float(bound)
    worst = logprob_consistency(adapter, rollout)
    valid = _valid(rollout)
    gen = rollout.inputs["gen_sample_logp"]
    train, _ = adapter.forward_logp(adapter.policy, rollout, torch.arange(gen.shape[0]), want_entropy=False)
    gap = (gen - train.detach().float().cpu())[valid].abs()
    mean = float(gap.mean()) if gap.numel() else 0.0
    value = worst if stat == "max" else mean
    ok = math.isfinite(value) and math.isfinite(worst) and value <= bound
    dname = str(dtype).removeprefix("torch.")
    expl = (f"{dname}: {stat} |gen - train log-prob| over {int(valid.sum())} tokens "
            f"(max {worst:.3g}, mean {mean:.3g}) {'<=' if ok else 'exceeds'} {bound:g}")
    if not ok:
        expl += ("; the training forward does not reproduce the sampled distribution (positions, "
                 "mm_token_type_ids, images, token alignment, temperature or suppressed ids)")
    return _row(LOGPROB, ok, value, bound, expl,
                {"dtype": dname, "statistic": stat, "max": worst, "mean": mean, "tokens": int(valid.sum())})


# --- (a'') -------------------------------------------------------------------------------------

ENGINE_BOUNDS: dict[torch.dtype, tuple[str, float]] = {
    torch.float64: ("max", 1e-4),
    torch.float32: ("max", 1e-4),
    torch.bfloat16: ("mean", 0.02),
    torch.float16: ("mean", 0.02),
}
"""Statistic of |engine log-prob - trainer log-prob| over the valid completion tokens of one
rollout the engine sampled, and its bound, by the lower of the engine's dtype and the trainer's
compute dtype (an engine that does not say its dtype counts as bf16: inference servers sample in
it). Measured on CPU with ``benchmarks/engine_mismatch.py`` (``CopyEngine`` against a float32
trainer, 8 completions per rollout, 20 rollouts per setting; results in
``benchmarks/results/engine_mismatch.json``):

    model (tiny Qwen2-VL / Qwen2.5-VL)     float32 copy: max      bf16 copy: mean (worst rollout) / max
    random init, T 1, 2 or 16 tokens       4.8e-7                 6.3e-4 - 7.2e-4 (8.8e-4) / 3.1e-3
    random init, T 0.7, 16 tokens          7.2e-7                 9.7e-4 - 1.0e-3 (1.2e-3) / 4.4e-3
    trained 150 iterations (reward 0.65)   -                      2.6e-3 - 2.7e-3 (4.0e-3) / 2.3e-2
    trained 400 iterations (reward 0.99)   7.2e-7                 5.0e-4 - 1.7e-3 (5.8e-3) / 5.0e-2

float32: the max, 1e-4 (as ``logprob_consistency``'s): the same weights and function, cached
decoding against one full forward. bf16: the mean, 0.02 nats, 3.5x the worst rollout measured
(the trained model at temperature 0.7 over 16 tokens, past the 2 it was trained to say) and 17x
the random model's; the max is not bounded (single tokens reach 5e-2). What the row exists to
catch measures, on the random tiny model (``tests/test_vlm_engine.py``): a sync missed for one
optimizer step (lr 1e-3 / 1e-2) 0.12 / 0.18, log-probs without the temperature at T 0.7 0.06 -
0.07 (0.014 at T 0.9: missed there, though the mismatch metric still shows it), the log-prob of
the token before the sampled one 0.19 - 0.23. The bound comes from the tiny model: a wider and
deeper one rounds more in bf16 (``LOGPROB_BOUNDS``' measurements), so measure the gap of a real
model before trusting it (``run_preflight(engine_bound=...)``)."""


def engine_bound(engine_dtype: torch.dtype | None, compute_dtype: torch.dtype) -> tuple[str, float]:
    """(statistic, bound) of ``engine_consistency`` for an engine and a trainer's compute dtype."""
    half = (torch.bfloat16, torch.float16)
    dtype = engine_dtype if engine_dtype is not None else torch.bfloat16
    if compute_dtype in half and dtype not in half:
        dtype = compute_dtype
    return ENGINE_BOUNDS.get(dtype, ENGINE_BOUNDS[torch.bfloat16])


def separate_engine(adapter):
    """The adapter's sampling engine when it is not the policy itself, else None."""
    engine = getattr(adapter, "engine", None)
    return engine if getattr(engine, "separate", False) else None


def check_engine_consistency(adapter, rollout: Rollout, dtype: torch.dtype | None = None,
                             bound: float | None = None) -> CheckResult:
    """Row (a''); ``rollout`` sampled by ``adapter.engine`` (a separate one). ``dtype``: the
    trainer's compute dtype (default: the policy's weights')."""
    engine = separate_engine(adapter)
    if engine is None or rollout.engine_logp is None:
        raise ValueError("engine_consistency needs a rollout sampled by a separate engine (Rollout.engine_logp)")
    dtype = _model_dtype(adapter.policy) if dtype is None else dtype
    stat, default = engine_bound(getattr(engine, "dtype", None), dtype)
    bound = default if bound is None else float(bound)
    valid = _valid(rollout)
    rows = torch.arange(rollout.mask.shape[0])
    train, _ = adapter.forward_logp(adapter.policy, rollout, rows, want_entropy=False)
    gap = (rollout.engine_logp.float().cpu() - train.detach().float().cpu())[valid].abs()
    mean = float(gap.mean()) if gap.numel() else 0.0
    worst = float(gap.max()) if gap.numel() else 0.0
    value = worst if stat == "max" else mean
    weights, where = engine.weight_gap(adapter.policy) if callable(getattr(engine, "weight_gap", None)) \
        else (None, None)
    ok = math.isfinite(value) and math.isfinite(worst) and value <= bound and weights in (None, 0.0)
    ename = getattr(engine, "name", type(engine).__name__)
    expl = (f"engine {ename} vs the trainer ({str(dtype).removeprefix('torch.')}): {stat} |log-prob gap| over "
            f"{int(valid.sum())} sampled tokens (max {worst:.3g}, mean {mean:.3g}) "
            f"{'<=' if value <= bound else 'exceeds'} {bound:g}")
    if weights is not None:
        expl += f"; weights max |engine - policy| {weights:.3g}" + (f" ({where})" if where else "")
    if not ok:
        expl += ("; the engine does not sample the trainer's distribution: a weight sync missed, log-probs "
                 "without the temperature, or of another token than the sampled one")
    return _row(ENGINE, ok, value, bound, expl,
                {"statistic": stat, "max": worst, "mean": mean, "tokens": int(valid.sum()), "weights": weights,
                 "engine": ename})


@contextlib.contextmanager
def _policy_sampling(adapter):
    """Within: the adapter samples with the policy itself (its engine set aside and restored)."""
    from .vlm_engine import PolicyEngine

    saved = adapter.engine
    adapter.engine = PolicyEngine()
    try:
        yield
    finally:
        adapter.engine = saved


# --- (a') --------------------------------------------------------------------------------------

def check_deterministic_forward(adapter, policy, rollout: Rollout, dtype: torch.dtype | None = None) -> CheckResult:
    """Row (a'): two grad-mode forwards of the rollout's rows agree, and no dropout is active."""
    rows = torch.arange(rollout.mask.shape[0])
    with torch.enable_grad(), watch_stochastic_modules(policy) as active:
        first, _ = adapter.logp_and_entropy(policy, rollout, rows)
        second, _ = adapter.logp_and_entropy(policy, rollout, rows)
    gap = _max_abs(first, second, _valid(rollout))
    dtype = _model_dtype(policy) if dtype is None else dtype
    bound = REFRESH_LOGP_BOUND if dtype not in (torch.bfloat16, torch.float16) else LOGPROB_BOUNDS[dtype][1]
    ok = not active and math.isfinite(gap) and gap <= bound
    expl = f"two forwards with gradient: max |log-prob gap| {gap:.3g}"
    if active:
        expl += f"; random modules in train mode: {', '.join(active)}"
    if not ok:
        expl += ("; the old log-probs and the PPO ratio would be wrong (with one epoch and one "
                 "minibatch the ratio is forced to 1): set dropout to 0")
    return _row(DETERMINISM, ok, gap, bound, expl, {"active": list(active)})


# --- (b) ---------------------------------------------------------------------------------------

def _tensor_pairs(adapter, policy: torch.nn.Module, reference) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    custom = getattr(adapter, "reference_pairs", None)
    if custom is not None:
        return list(custom(reference))
    pol, ref = policy.state_dict(), reference.state_dict()
    if pol.keys() != ref.keys():
        odd = sorted(pol.keys() ^ ref.keys())
        raise ValueError(f"reference and policy state dicts differ in keys, e.g. {odd[:3]}")
    return [(k, pol[k], ref[k]) for k in ref]


def _all_equal(pairs) -> bool:
    return all(a.shape == b.shape and torch.equal(a, b.to(a.device)) for _, a, b in pairs)


def _max_tensor_diff(pairs) -> tuple[float, str | None]:
    """Largest |a - b| over the pairs and where. Differences are taken in the tensors' own dtype
    (no float64 copy of a large embedding); distinct finite values never subtract to 0."""
    worst, where = 0.0, None
    for name, a, b in pairs:
        if a.shape != b.shape:
            return math.inf, name
        b = b.to(a.device)
        if torch.equal(a, b) or not a.numel():
            continue
        if not a.is_floating_point():
            d = 1.0  # integer tensors that differ
        else:
            d = float((a.detach() - b.detach().to(a.dtype)).abs().max())
        if not math.isfinite(d) or d > worst:
            worst, where = d if math.isfinite(d) else math.inf, name
    return worst, where


def _hard_refresh(trainer, adapter, policy, reference, config) -> None:
    """A hard refresh through the trainer's own code path when there is a trainer."""
    hard = config.replace(ref_update="hard", update_ref_model_freq=1)
    if trainer is not None:
        saved, flag = trainer.config, trainer.ref_is_policy
        trainer.config = hard
        try:
            trainer.refresh_reference(0)
        finally:
            # the caller restores the reference: the trainer's knowledge of it stays as it was
            trainer.config, trainer.ref_is_policy = saved, flag
        return
    custom = getattr(adapter, "refresh_reference", None)
    if custom is not None:
        custom(reference, hard)
    else:
        from grpo_core.refmodel import hard_refresh

        hard_refresh(reference, policy)


def check_reference_refresh(trainer, adapter, policy, reference, config, rollout: Rollout,
                            dtype: torch.dtype | None = None) -> CheckResult:
    """Row (b). Leaves ``reference`` as it found it (restored from a CPU copy if it differed
    from the policy before the refresh, as on a resumed run)."""
    saved = None
    if not _all_equal(_tensor_pairs(adapter, policy, reference)):
        saved = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}
    try:
        _hard_refresh(trainer, adapter, policy, reference, config)
        diff, where = _max_tensor_diff(_tensor_pairs(adapter, policy, reference))
        rows = torch.arange(rollout.mask.shape[0])
        with torch.no_grad():
            lp_pol, _ = adapter.logp_and_entropy(policy, rollout, rows)
            lp_ref, _ = adapter.logp_and_entropy(reference, rollout, rows)
        ldiff = _max_abs(lp_pol, lp_ref, _valid(rollout))
    finally:
        if saved is not None:
            reference.load_state_dict(saved)
    lbound = REFRESH_LOGP_BOUND
    dtype = next(policy.parameters()).dtype if dtype is None else dtype
    if dtype in (torch.bfloat16, torch.float16):
        lbound = LOGPROB_BOUNDS.get(dtype, ("max", lbound))[1]
    ok = diff <= REFRESH_BOUND and ldiff <= lbound
    value = max(diff, ldiff) if math.isfinite(ldiff) else ldiff
    expl = f"after a hard refresh: max |policy - reference| tensor {diff:.3g}"
    if where is not None:
        expl += f" (worst {where})"
    expl += f", log-prob {ldiff:.3g}"
    if saved is not None:
        expl += "; the reference differed before and was restored"
    if not ok:
        expl += "; the refresh does not make the reference the policy"
    return _row(REFRESH, ok, value, f"tensors {REFRESH_BOUND:g}, log-probs {lbound:g}", expl,
                {"tensor_diff": diff, "logp_diff": ldiff})


# --- (c), (d) ----------------------------------------------------------------------------------

def _grad_norm(loss: torch.Tensor, params: list[torch.Tensor], *, retain: bool) -> float:
    if not loss.requires_grad or not params:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    norms = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _loss_kwargs(config, adapter) -> dict:
    return {"kl_estimator": config.kl_estimator, "eps_low": config.clip_eps_low,
            "eps_high": config.clip_eps_high, "agg": config.loss_agg,
            "max_len": config.max_len or getattr(adapter, "max_len", None),
            "clip_ratio_c": config.clip_ratio_c, "ratio_level": config.ratio_level,
            "policy_loss": config.policy_loss}


def check_loss_and_kl_gradient(adapter, policy, reference, params, config, rollout: Rollout,
                               group_size: int, *, want_kl: bool) -> list[CheckResult]:
    """Rows (c) and (d, when ``want_kl``) from one forward with gradient."""
    cfg = config
    n, t_len = rollout.mask.shape
    rows = torch.arange(n)
    mask = rollout.mask
    adv = group_advantages(rollout.rewards, mask, group_size, gamma=cfg.gamma, scale=cfg.scale,
                           stats_over=cfg.stats_over, eps=cfg.adv_eps, scored=rollout.scored,
                           baseline=cfg.baseline)
    ref_logp = None
    if reference is not None and cfg.beta != 0:
        with torch.no_grad():
            ref_logp, _ = adapter.logp_and_entropy(reference, rollout, rows)
    out: list[CheckResult] = []
    logp, entropy = adapter.logp_and_entropy(policy, rollout, rows)
    # an adapter may leave old_logp to the loop; before any update it is the policy's own
    old_logp = logp.detach() if rollout.old_logp is None else rollout.old_logp
    try:
        loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, entropy=entropy, beta=cfg.beta,
                                ent_coef=cfg.ent_coef, **_loss_kwargs(cfg, adapter))
        value = stats["loss"]
        gnorm = _grad_norm(loss, params, retain=want_kl) if math.isfinite(value) else math.nan
        ok = math.isfinite(value) and math.isfinite(gnorm)
        parts = ", ".join(f"{k} {stats[k]:.3g}" for k in ("policy_loss", "kl", "entropy") if k in stats)
        expl = f"GRPO loss of {n} real completions {value:.4g} ({parts}), gradient norm {gnorm:.3g}"
        if not ok:
            expl += "; training would stop at its first step (NonFiniteLossError)"
        out.append(_row(FINITE, ok, value, "finite", expl, {"grad_norm": gnorm, **stats}))
    except Exception as e:  # noqa: BLE001 - reported as a failed row
        out.append(_error(FINITE, e))
    if want_kl:
        try:
            gen = torch.Generator().manual_seed(0)
            noise = KL_NOISE * torch.randn(ref_logp.shape, generator=gen).to(ref_logp.device)
            shifted = (ref_logp + noise).clamp(max=0.0)
            kl_loss, kst = grpo_loss(logp, old_logp, shifted, torch.zeros_like(adv), mask,
                                     entropy=None, beta=cfg.beta, ent_coef=0.0, **_loss_kwargs(cfg, adapter))
            gnorm = _grad_norm(kl_loss, params, retain=False)
            ok = math.isfinite(gnorm) and gnorm > 0 and math.isfinite(kst["kl"])
            expl = (f"beta*KL term alone ({cfg.kl_estimator}, KL {kst['kl']:.3g} against reference log-probs "
                    f"+ N(0, {KL_NOISE}) noise): gradient norm {gnorm:.3g} over {len(params)} trainable tensors")
            if not ok:
                expl += "; the KL term does not reach the policy (detached logp?): beta would do nothing"
            out.append(_row(KL_GRAD, ok, gnorm, "> 0", expl, {"kl": kst["kl"], "grad_norm": gnorm}))
        except Exception as e:  # noqa: BLE001
            out.append(_error(KL_GRAD, e))
    return out


# --- (e) ---------------------------------------------------------------------------------------

def check_kit(config, *, kit_samples: int | None = None) -> list[CheckResult]:
    """Rows (e): the kit on the configured KL estimator, the advantage and returns builtins."""
    out = []
    advantage = "rloo_advantage" if getattr(config, "baseline", "mean") == "leave-one-out" else "group_advantages"
    for row_name, key in ((KIT_KL, config.kl_estimator), (KIT_ADV, advantage),
                          (KIT_RET, "discounted_returns")):
        try:
            kw = {} if kit_samples is None else {"samples": kit_samples}
            rows = check_estimator(BUILTINS[key], BUILTIN_KINDS[key], **kw)
            failed = [r for r in rows if r.failed]
            judged = [r for r in rows if r.passed is not None]
            expl = f"estimator kit on builtin {key}: {len(judged) - len(failed)}/{len(judged)} rows passed"
            if failed:
                expl += " (failed: " + ", ".join(r.name for r in failed) + ")"
            out.append(_row(row_name, not failed, f"{len(judged) - len(failed)}/{len(judged)}", "all", expl,
                            {"failed": [r.to_dict() for r in failed]}))
        except Exception as e:  # noqa: BLE001
            out.append(_error(row_name, e, f"kit on {key}: "))
    return out


# --- driver ------------------------------------------------------------------------------------

def _collect(adapter, iteration: int, num_groups: int, group_size: int, max_new_tokens: int | None) -> Rollout:
    saved = {k: getattr(adapter, k) for k in ("record_generation_logp", "max_new_tokens") if hasattr(adapter, k)}
    try:
        if "record_generation_logp" in saved:
            adapter.record_generation_logp = True
        if "max_new_tokens" in saved and max_new_tokens is not None:
            adapter.max_new_tokens = min(adapter.max_new_tokens, int(max_new_tokens))
        with torch.no_grad():
            rollout = adapter.collect(num_groups=num_groups, group_size=group_size, iteration=iteration)
    finally:
        for k, v in saved.items():
            setattr(adapter, k, v)
    rollout.validate(group_size, num_groups)
    return rollout


def run_preflight(trainer_or_adapter, config=None, *, samples: int = DEFAULT_SAMPLES,
                  max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, logprob_bound: float | None = None,
                  checks: Sequence[str] | None = None, iteration: int | None = None,
                  kit_samples: int | None = None, engine_bound: float | None = None) -> list[CheckResult]:
    """Run the preflight checks (module docstring); one row per check, in ``CHECKS`` order.

    ``trainer_or_adapter``: a ``GRPOTrainer`` (its adapter, reference, trainable parameters and
    next iteration are used) or an adapter (then a reference is made, as the trainer would,
    when ``config.beta != 0``, and dropped afterwards). ``config``: the GRPOConfig (default: the
    trainer's). ``samples``: completions in the rollout (``min(G, samples)`` per group).
    ``max_new_tokens``: cap on the completion length for the rollout (None: the adapter's).
    ``logprob_bound``: overrides ``LOGPROB_BOUNDS`` for the model's dtype; ``engine_bound``
    ``ENGINE_BOUNDS``. ``checks``: run only these (names in ``CHECKS`` and ``ENGINE_CHECKS``;
    default: all, ``engine_consistency`` when the adapter has a separate engine). A check that
    raises gives a failed row naming the error.
    """
    from grpo_core.loop import GRPOTrainer

    if isinstance(trainer_or_adapter, GRPOTrainer):
        trainer, adapter = trainer_or_adapter, trainer_or_adapter.adapter
        config = config if config is not None else trainer.config
        reference, params = trainer.reference, trainer.params
        it = trainer.iteration if iteration is None else iteration
    else:
        if config is None:
            raise ValueError("run_preflight(adapter, config): config is required without a trainer")
        trainer, adapter = None, trainer_or_adapter
        reference = adapter.make_reference() if config.beta != 0 else None
        params = [p for p in adapter.policy.parameters() if p.requires_grad]
        it = 0 if iteration is None else iteration
    wanted = tuple((*CHECKS, *ENGINE_CHECKS) if checks is None else checks)
    unknown = [c for c in wanted if c not in CHECKS + ENGINE_CHECKS]
    if unknown:
        raise ValueError(f"unknown preflight check(s) {unknown}; choose from {', '.join(CHECKS + ENGINE_CHECKS)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples!r}")
    policy = adapter.policy
    rows = _run_checks(trainer, adapter, policy, reference, params, config, it, wanted, samples,
                       max_new_tokens, logprob_bound, kit_samples)
    if ENGINE in wanted:
        row = _engine_row(trainer, adapter, policy, it, samples, config, max_new_tokens, engine_bound,
                          asked=checks is not None)
        if row is not None:
            rows.append(row)
    return [r for name in (ROLLOUT, *_ORDER) for r in rows if r.name == name]


def _engine_row(trainer, adapter, policy, it, samples, config, max_new_tokens, bound, *, asked: bool):
    """Row (a'') on a rollout of its own, sampled by the adapter's engine; None when the adapter
    samples with the policy and the row was not asked for by name."""
    if separate_engine(adapter) is None:
        return _skip(ENGINE, "the adapter samples with the policy itself") if asked else None
    g = max(1, min(config.group_size, samples))
    ctx = trainer.compute() if trainer is not None else contextlib.nullcontext()
    try:
        with ctx:
            rollout = _collect(adapter, it, max(1, samples // g), g, max_new_tokens)
            return check_engine_consistency(adapter, rollout, _compute_dtype(trainer, policy), bound)
    except Exception as e:  # noqa: BLE001 - reported as a failed row
        return _error(ENGINE, e, "the engine's rollout: ")


def _run_checks(trainer, adapter, policy, reference, params, config, it, wanted, samples, max_new_tokens,
                logprob_bound, kit_samples) -> list[CheckResult]:
    """``run_preflight``'s checks, each in its own context of the trainer's precision
    (``ctx``): autocast caches the bf16 copy of every weight that requires grad while its
    context is open, and a check that changes weights (the refresh check restores the
    reference it replaced) must not leave a stale copy to the next."""
    def ctx():
        return trainer.compute() if trainer is not None else contextlib.nullcontext()

    dtype = _compute_dtype(trainer, policy)
    g = max(1, min(config.group_size, samples))
    b = max(1, samples // g)

    rows: dict[str, CheckResult] = {}
    needs_rollout = {LOGPROB, DETERMINISM, REFRESH, FINITE, KL_GRAD} & set(wanted)
    rollout = None
    if needs_rollout:
        try:  # sampled by the policy itself: the engine has a row of its own
            with ctx(), _policy_sampling(adapter) if separate_engine(adapter) else contextlib.nullcontext():
                rollout = _collect(adapter, it, b, g, max_new_tokens)
        except Exception as e:  # noqa: BLE001
            rows[ROLLOUT] = _error(ROLLOUT, e, "could not collect a rollout: ")
            for name in needs_rollout:
                rows[name] = _skip(name, "no rollout (see the rollout row)")
    if rollout is not None:
        if DETERMINISM in wanted:
            try:
                with ctx():
                    rows[DETERMINISM] = check_deterministic_forward(adapter, policy, rollout, dtype)
            except Exception as e:  # noqa: BLE001
                rows[DETERMINISM] = _error(DETERMINISM, e)
        if LOGPROB in wanted:
            if "gen_sample_logp" not in (rollout.inputs if isinstance(rollout.inputs, dict) else {}):
                rows[LOGPROB] = _skip(LOGPROB, "the adapter does not record generation-time log-probs")
            else:
                try:
                    with ctx():
                        rows[LOGPROB] = check_logprob_consistency(adapter, rollout, logprob_bound, dtype)
                except Exception as e:  # noqa: BLE001
                    rows[LOGPROB] = _error(LOGPROB, e)
        if REFRESH in wanted:
            if reference is None:
                rows[REFRESH] = _skip(REFRESH, "no reference is kept (beta = 0)")
            else:
                try:
                    with ctx():
                        rows[REFRESH] = check_reference_refresh(trainer, adapter, policy, reference, config,
                                                                rollout, dtype)
                except Exception as e:  # noqa: BLE001
                    rows[REFRESH] = _error(REFRESH, e)
        want_kl = KL_GRAD in wanted and config.beta != 0 and reference is not None
        if KL_GRAD in wanted and not want_kl:
            rows[KL_GRAD] = _skip(KL_GRAD, "beta = 0: no KL term")
        if FINITE in wanted or want_kl:
            try:
                with ctx():
                    checked = check_loss_and_kl_gradient(adapter, policy, reference, params, config, rollout, g,
                                                         want_kl=want_kl)
                for row in checked:
                    rows[row.name] = row
            except Exception as e:  # noqa: BLE001
                rows[FINITE] = _error(FINITE, e)
                if want_kl:
                    rows[KL_GRAD] = _error(KL_GRAD, e)
        if FINITE not in wanted:
            rows.pop(FINITE, None)
    if {KIT_KL, KIT_ADV, KIT_RET} & set(wanted):
        for row in check_kit(config, kit_samples=kit_samples):
            if row.name in wanted:
                rows[row.name] = row
    return [rows[name] for name in (ROLLOUT, *CHECKS) if name in rows]


def failed_names(rows: Sequence[CheckResult]) -> list[str]:
    return [r.name for r in rows if r.failed]


def format_preflight(rows: Sequence[CheckResult]) -> str:
    """The rows as the kit's plain-text table, headed ``preflight``."""
    return "preflight\n" + format_table(list(rows))


def require_preflight(rows: Sequence[CheckResult]) -> list[CheckResult]:
    """Return ``rows``; raise ``PreflightError`` naming the failed rows if any failed."""
    rows = list(rows)
    if failed_names(rows):
        raise PreflightError(rows)
    return rows
