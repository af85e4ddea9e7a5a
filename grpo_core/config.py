"""GRPOConfig: every option of the training loop, documented once, here."""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass
from typing import Any

from .advantages import BASELINES, SCALES, STATS_OVER
from .kl import FLAT_AT_REFERENCE, KL_ESTIMATORS
from .losses import AGGS, CORRECTION_LEVELS, CORRECTIONS, POLICY_LOSSES, RATIO_LEVELS

REF_UPDATES = ("hard", "soft")
REDRAWS = ("fresh", "retry")


class KLInertWarning(UserWarning):
    """The configured KL term cannot change any update (see ``GRPOConfig.kl_is_inert``)."""


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8
    """G, samples per group (episodes from one start state, or completions of one prompt).
    >= 1; a group of 1 has no relative signal (its advantages are 0)."""
    groups_per_iteration: int = 4
    """B, groups collected per iteration; N = B * G sequences per rollout batch. >= 1."""
    gamma: float = 0.99
    """Discount of the returns G_t = r_t + gamma G_{t+1} (plan item 3), in [0, 1]. 1 with an
    outcome-only reward is standard GRPO; the plan suggests 0.995..0.999 for the VLM."""
    grpo_epochs: int = 10
    """Passes over each rollout batch with the old log-probs frozen at rollout time (plan
    item 4). >= 1. With 1 epoch and 1 minibatch the PPO ratio is exactly 1 (no clipping); with
    more minibatches it is not: every minibatch after the first is taken by a policy that the
    earlier ones' steps already moved."""
    minibatches: int = 1
    """Minibatches per epoch; the batch's sequences are shuffled and split (1..N)."""
    micro_batch_size: int | None = None
    """Rows per forward/backward inside a minibatch; their gradients accumulate into one
    optimizer step, every loss term divided by the minibatch's global count, so the step is the
    same as with the whole minibatch at once (only one micro-batch's activations alive at a
    time). None: the whole minibatch in one pass. >= 1."""
    update_ref_model_freq: int = 1
    """Refresh the reference from the policy when iteration % freq == 0, after computing
    advantages and before the updates (plan item 1). 0 keeps the initial policy forever."""
    ref_update: str = "hard"
    """"hard": copy the policy (load_state_dict, eval, no grad); "soft": ref = alpha*policy +
    (1 - alpha)*ref, as TRL's sync_ref_model (Rafailov et al., 2024)."""
    ref_mix_alpha: float = 0.6
    """alpha of the soft refresh, in [0, 1] (TRL's ref_model_mixup_alpha)."""
    clip_eps_low: float = 0.2
    """Lower PPO clip: the ratio is clipped at 1 - eps_low (Schulman et al., 2017), in [0, 1)."""
    clip_eps_high: float = 0.2
    """Upper PPO clip, 1 + eps_high; a larger value is DAPO's "clip-higher". >= 0."""
    clip_ratio_c: float | None = None
    """Dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c): for A < 0 the token loss is capped
    at c*|A|, with no gradient once the ratio exceeds c. None turns it off; otherwise > 1,
    usually >= 1 + clip_eps_high (verl's default is 3)."""
    policy_loss: str = "ppo"
    """The policy term: "ppo" (the clipped surrogate above) or "cispo" (MiniMax 2025,
    "MiniMax-M1": each token's loss is -w A logp with w = min(ratio, 1 + clip_eps_high) detached;
    no lower bound, as in the paper; clip_eps_low and clip_ratio_c do not apply; every token keeps
    a gradient). See grpo_core.losses.cispo_loss. TRL: loss_type="cispo", whose epsilon_high is
    the cap itself (so TRL's epsilon_high=5 is clip_eps_high=4 here); verl:
    policy_loss.loss_mode="cispo" with clip_ratio_high as here."""
    ratio_level: str = "token"
    """Which importance ratio the PPO surrogate clips: "token" (PPO, GRPO), "sequence" (GSPO,
    Zheng et al. 2025: the geometric mean of the response's token ratios, one clip decision per
    response) or "sequence-token" (GSPO-token: the same value, each token's gradient with its
    own advantage). TRL: importance_sampling_level ("token" / "sequence"). GSPO's paper pairs it
    with loss_agg="seq-mean-token-mean" and clip ranges of 3e-4 / 4e-4."""
    engine_correction: str = "tis"
    """When the samples come from an engine apart from the trained policy (``Rollout.engine_logp``:
    an inference engine, a copy in bf16), how the loss corrects for the engine's distribution
    (``grpo_core.losses.engine_correction``): "tis" (truncated importance sampling, Yao et al.
    2025: each token's policy loss weighted by min(pi_old / pi_engine, C), a constant; token-level
    TIS was TRL's first default for vLLM and held up best in a public comparison of the options
    on long generations), "mis" (masked:
    tokens or sequences with a ratio outside [1/C, C] leave the loss and its normaliser) or "none"
    (measure only). No effect when the policy itself sampled (no engine log-probs)."""
    engine_correction_level: str = "token"
    """"token" or "geometric" (verl's name: the geometric mean of a sequence's token ratios, for
    every token; much closer to 1 than the sequence's product of ratios, so it wants a threshold
    near 1: verl suggests 1.0002-1.001)."""
    engine_correction_threshold: float = 2.0
    """C of engine_correction, > 1 (Yao et al. and verl's rollout_is_threshold: 2)."""
    beta: float = 0.04
    """KL coefficient; the KL term is added to the loss, beta * agg(kl). >= 0 (0: no reference
    log-probs are computed)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator (plan item 2): k1, k2, k3 or k3_is; see grpo_core.kl."""
    scale: str = "group"
    """Advantage scaling (plan item 5): "group" std, "batch" std (Dr. GRPO / TRL
    scale_rewards="batch") or "none" (mean only)."""
    baseline: str = "mean"
    """What a value is measured against within its group: "mean" (GRPO: the group's mean) or
    "leave-one-out" (RLOO, Ahmadian et al. 2024: the mean of the group's other values, which
    makes the advantage n/(n - 1) times GRPO's, n the pooled values; divided by the group's std
    when scale="group", where each pooled value's |A| is bounded by sqrt(n); see
    grpo_core.advantages). The RLOO of the papers and of verl (adv_estimator="rloo") has no std:
    scale="none" with stats_over="sequences"; with scale="group" it is GRPO's advantage times a
    constant n/(n - 1), nearly the same update under Adam. With stats_over="steps" the pool is
    every step's return, so one step is left out, not one sample."""
    stats_over: str = "steps"
    """Group statistics over every valid step's return, "steps" (the plan's CartPole GRPO), or
    over one outcome per sample, the sum of its rewards, "sequences" (GRPO's outcome
    supervision, discounted by the distance to the end); see grpo_core.advantages."""
    adv_eps: float = 1e-8
    """Added to the std in the advantage denominator. >= 0."""
    loss_agg: str = "token-mean"
    """How per-token terms become one loss: token-mean, seq-mean-token-mean,
    seq-mean-token-sum, seq-mean-token-sum-norm (see grpo_core.losses.agg_loss)."""
    max_len: int | None = None
    """Constant length that seq-mean-token-sum-norm (Dr. GRPO) divides by: the maximum
    completion length. None: the adapter's (CartPole 500 steps, the VLM's max_new_tokens)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (plan item 6); the loss subtracts ent_coef * agg(entropy). >= 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (plan item 7); 0 disables clipping. >= 0."""
    lr: float = 1e-3
    """Adam learning rate. > 0."""
    skip_zero_grad_steps: bool = True
    """Skip the optimizer step of a minibatch that carries no signal: every advantage exactly
    0, no entropy bonus, and no KL term or a reference equal to the policy (the rule is in
    grpo_core.loop). Adam would otherwise move the weights on its momentum (and on rounding
    noise) and let its second moment decay, so that the next rare signal makes an outsized
    step; seen as a collapse on the tiny-VLM colours task. Counted in ``skipped_steps``."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): a group whose samples all got the
    same reward (every advantage 0) is dropped, and while fewer than groups_per_iteration groups
    with signal have been found, groups_per_iteration more groups are sampled from a fresh draw of
    prompts or start states (the adapter's ``collect_more``; a prompt may recur), at most ``dynamic_sampling_rounds`` extra
    draws per iteration. The update uses the first groups_per_iteration groups with signal, in
    draw order (fewer when the draws run out, the loss then normalised by the rows trained;
    none: the first draw, a no-signal iteration). ``sampling_rounds`` counts the first draw.
    Metrics: ``groups_dropped``, ``extra_generations`` (sequences sampled by the extra draws),
    ``sampling_rounds``, ``groups_trained``; ``reward_mean`` and ``zero_signal_groups`` stay
    those of the first draw. Needs an adapter with ``collect_more`` and ``join_groups``."""
    dynamic_sampling_rounds: int = 2
    """Most extra draws per iteration with dynamic_sampling (DAPO's max_num_gen_batches is
    this + 1; DAPO errors when they run out, this trains on what was found). >= 0."""
    dynamic_sampling_redraw: str = "fresh"
    """What an extra draw of dynamic_sampling samples. ``"fresh"``: DAPO's, as above. ``"retry"``:
    the prompts or start states of the first draw's unsolved groups once more (the adapter's
    ``collect_more(..., again=(rollout, groups))``), G new samples each, until a draw gives the
    group a signal or the rounds run out. A group is unsolved when it has no signal and its
    outcome (the mean over its samples of each sample's summed rewards) is below the best
    sample outcome the run has seen (``GRPOTrainer.best_outcome``, kept in checkpoints), or when
    none of its samples has a valid step (every reward None, every completion truncated and
    masked: nothing says it is solved); a group without signal at that best is solved and is
    dropped without a retry, so a task that is mostly solved costs no extra draws. The update
    trains the first draw's groups with signal and the retried groups that found one (fewer
    than groups_per_iteration when some never do). Also counted: ``groups_retried``.

    Retry changes the objective; fresh does not. Plain GRPO trains prompt q's group when it has
    signal, with probability ``s_q``; a fresh draw multiplies every prompt's chance by the same
    factor (the draws stop on other groups' signal, not on q's). Retry also trains q when its
    first group failed every sample (probability ``z_q``) and a retry found signal, so q's
    weight relative to plain GRPO is ``1 + (z_q / s_q) (1 - (1 - s_q)**R)`` (R the rounds),
    while a group that succeeded everywhere is not retried: a curriculum towards hard prompts.
    With G = 4, R = 2 and success rates 0.1 and 0.6 it is 2.09 and 1.03, twice the weight for
    the hard prompt (``tests/test_dynamic_sampling.py`` measures it against this formula).
    ``objective_notes()`` says so at the start of a run. The formula takes 0/1 rewards once a
    success has been seen: before that the best outcome is the failures' own and nothing is
    retried (the curriculum starts with the first success); with partial credit, z is the
    chance of no signal below the best. Fresh redraws keep GRPO's weighting of the policy term
    only: with beta > 0 or ent_coef > 0 the dropped groups take their KL and entropy terms
    with them, so those regularisers lean towards the prompts with signal."""
    seed: int = 0
    """Seeds rollouts, start states and minibatch shuffles. >= 0."""

    def __post_init__(self) -> None:
        _check_int(self, "group_size", 1)
        _check_int(self, "groups_per_iteration", 1)
        _check_int(self, "grpo_epochs", 1)
        _check_int(self, "minibatches", 1)
        _check_int(self, "update_ref_model_freq", 0)
        _check_int(self, "seed", 0)
        if self.max_len is not None:
            _check_int(self, "max_len", 1)
        if self.micro_batch_size is not None:
            _check_int(self, "micro_batch_size", 1)
        n = self.group_size * self.groups_per_iteration
        if self.minibatches > n:
            raise ValueError(f"minibatches={self.minibatches} exceeds the {n} sequences per batch "
                             "(group_size * groups_per_iteration)")
        _check_float(self, "gamma", 0.0, 1.0)
        _check_float(self, "ref_mix_alpha", 0.0, 1.0)
        _check_float(self, "clip_eps_low", 0.0, 1.0, high_open=True)
        _check_float(self, "clip_eps_high", 0.0, float("inf"))
        if self.clip_ratio_c is not None:
            _check_float(self, "clip_ratio_c", 1.0, float("inf"), low_open=True)
        _check_float(self, "beta", 0.0, float("inf"))
        _check_float(self, "adv_eps", 0.0, float("inf"))
        _check_float(self, "ent_coef", 0.0, float("inf"))
        _check_float(self, "max_grad_norm", 0.0, float("inf"))
        _check_float(self, "lr", 0.0, float("inf"), low_open=True)
        _check_int(self, "dynamic_sampling_rounds", 0)
        if not isinstance(self.dynamic_sampling, bool):
            raise ValueError(f"dynamic_sampling={self.dynamic_sampling!r} is invalid: expected true or false")
        if not isinstance(self.skip_zero_grad_steps, bool):
            raise ValueError(f"skip_zero_grad_steps={self.skip_zero_grad_steps!r} is invalid: "
                             "expected true or false")
        _check_choice(self, "ref_update", REF_UPDATES)
        _check_choice(self, "dynamic_sampling_redraw", REDRAWS)
        _check_choice(self, "kl_estimator", tuple(KL_ESTIMATORS))
        _check_choice(self, "scale", SCALES)
        _check_choice(self, "baseline", BASELINES)
        _check_choice(self, "stats_over", STATS_OVER)
        _check_choice(self, "loss_agg", AGGS)
        _check_choice(self, "policy_loss", POLICY_LOSSES)
        _check_choice(self, "engine_correction", CORRECTIONS)
        _check_choice(self, "engine_correction_level", CORRECTION_LEVELS)
        _check_float(self, "engine_correction_threshold", 1.0, float("inf"), low_open=True)
        _check_choice(self, "ratio_level", RATIO_LEVELS)
        if self.policy_loss == "cispo" and (self.ratio_level != "token" or self.clip_ratio_c is not None):
            raise ValueError(f"policy_loss='cispo' clips each token's own weight: it takes ratio_level='token' and "
                             f"clip_ratio_c=None, got ratio_level={self.ratio_level!r}, "
                             f"clip_ratio_c={self.clip_ratio_c!r}")
        if self.kl_is_inert():
            warnings.warn(
                f"beta={self.beta} does nothing with kl_estimator={self.kl_estimator!r}, "
                "update_ref_model_freq=1 (hard refresh), grpo_epochs=1 and minibatches=1: the "
                "reference equals the policy at every update, where this estimator's gradient is 0; "
                "use grpo_epochs > 1, minibatches > 1, a less frequent or soft refresh, or beta=0",
                KLInertWarning, stacklevel=3)

    def kl_is_inert(self) -> bool:
        """True when the KL term can never move the weights: every update sees a reference
        hard-copied from the policy with no optimizer step since, and the estimator's gradient
        is exactly 0 there (k2, k3, k3_is; k1's is not)."""
        hard = self.ref_update == "hard" or self.ref_mix_alpha == 1.0
        return (self.beta != 0 and self.update_ref_model_freq == 1 and hard
                and self.grpo_epochs == 1 and self.minibatches == 1
                and self.kl_estimator in FLAT_AT_REFERENCE)

    def objective_notes(self) -> list[str]:
        """One line for each setting that trains another objective than GRPO's (the run prints
        them at its start): today the retry form of dynamic sampling, a curriculum."""
        if not (self.dynamic_sampling and self.dynamic_sampling_redraw == "retry" and self.dynamic_sampling_rounds):
            return []
        return [f"note: dynamic_sampling_redraw='retry' ({self.dynamic_sampling_rounds} rounds) weights a prompt "
                "whose group often fails every sample up to (1 + rounds) times more than GRPO does (a "
                "curriculum towards hard prompts); 'fresh' keeps GRPO's weighting"]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GRPOConfig":
        """Build from a mapping; an unknown key raises ValueError naming the closest field."""
        names = cls.field_names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown GRPOConfig key {key!r}{hint}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "GRPOConfig":
        return dataclasses.replace(self, **changes)


def _check_int(cfg: GRPOConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= {low}")


def _check_float(cfg, name, low, high, *, low_open=False, high_open=False) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number")
    if not ((low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={getattr(cfg, name)!r} is outside the valid range {lo}{low}, {high}{hi}")


def _check_choice(cfg: GRPOConfig, name: str, valid: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")
