"""Plain float64 CartPole GRPO: the oracle a user trusts.

Written like the math, one episode at a time, with explicit loops.  It is the
independent reference against which the vectorised trainer is checked (to 1e-9
relative in every parameter after every iteration), so it imports nothing from
``grpo_core`` or ``adapters`` and re-derives every formula inline.

Public entry point::

    run_oracle(config, initial_policy, iterations) -> list[dict]

Each record is ``{"policy": state_dict, "reference": state_dict, "metrics": dict}``
taken after that iteration's updates.

Equation numbers in the comments refer to this list:

  (1)  G_t = r_t + gamma * G_{t+1},  G_T = 0                        returns
  (2a) A_t = (G_t - mean_g) / (std + adv_eps), mean and std over every
       step's G_t of the group (stats_over="steps")                 advantages
  (2b) A_t = (1) of the normalised outcome (R - mean_g) / (std + adv_eps)
       placed at the last step; mean and std over each episode's outcome
       reward R, paid at its last step (stats_over="sequences", GRPO outcome
       supervision; needs cfg["outcome_reward"])
  (2c) baseline="leave-one-out" (RLOO, Ahmadian et al. 2024): in (2a)/(2b) every
       "- mean_g" is "- b", b the mean of the group's other pooled values (the value
       itself left out), summed term by term; the denominator is unchanged
  (3)  ratio_t = exp(logp_t - old_logp_t)
  (3b) GSPO (Zheng et al. 2025, sec. 4.1), ratio_level="sequence": every step of an
       episode takes the episode's ratio s = exp((1/L) sum_t (logp_t - old_logp_t)), its
       gradient reaching every step; "sequence-token" (sec. 4.3): the value s at step t,
       whose gradient is s times that of logp_t alone (s_t = sg[s] exp(logp_t - sg[logp_t]));
       the KL term's k3_is keeps the step's own ratio (3)
  (4)  pg_t = -min(ratio_t A_t, clip(ratio_t, 1-eps_lo, 1+eps_hi) A_t)
  (5)  d_t = ref_logp_t - logp_t;  k1 = -d,  k2 = d^2/2,
       k3 = exp(d) - d - 1,  k3_is = ratio_t * k3
  (6)  H_t = -sum_a p_a log p_a                                       entropy
  (7)  loss = agg(pg) + beta agg(kl) - ent_coef agg(H)
  (8)  coef = max_grad_norm / (||g|| + 1e-6); g <- coef g if coef < 1
  (9)  Dr. GRPO: agg = sum of every term / (episodes x max_len), max_len the
       config's or the 500-step time limit
  (10) skip the optimizer step (skip_zero_grad_steps) when the minibatch has no
       signal: every advantage is 0, ent_coef is 0, and beta is 0 or (every
       reference parameter equals the policy's and the estimator's derivative
       (5') is 0 at d = 0: k2 -d, k3 1 - exp(d), k3_is ratio (k3 + 1 - exp(d));
       k1's is 1)
"""

from __future__ import annotations

import hashlib
import math

import gymnasium as gym
import numpy as np
import torch

DTYPE = torch.float64
MAX_STEPS = 500  # CartPole-v1 time limit
PARAM_NAMES = (
    "net.0.weight",
    "net.0.bias",
    "net.2.weight",
    "net.2.bias",
    "net.4.weight",
    "net.4.bias",
)


# --------------------------------------------------------------------------
# Policy: a tanh MLP over the 4 CartPole state variables, categorical over 2.
# --------------------------------------------------------------------------


def policy_logits(params: dict, states: torch.Tensor) -> torch.Tensor:
    """logits = W4 tanh(W2 tanh(W0 x + b0) + b2) + b4, for a (T, 4) batch of states."""
    h = torch.tanh(states @ params["net.0.weight"].T + params["net.0.bias"])
    h = torch.tanh(h @ params["net.2.weight"].T + params["net.2.bias"])
    return h @ params["net.4.weight"].T + params["net.4.bias"]


def log_probs_and_entropy(params: dict, states: list, actions: list):
    """Per step of one episode: log p(a_t | s_t) and the state entropy (6).

    Returns two (T,) tensors; they carry gradients when ``params`` do.
    """
    x = torch.tensor(np.array(states), dtype=DTYPE)
    log_p = torch.log_softmax(policy_logits(params, x), dim=-1)  # (T, 2)
    a = torch.tensor(actions, dtype=torch.long)
    logp_taken = log_p.gather(1, a.unsqueeze(1)).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (6)
    return logp_taken, entropy


def copy_params(params: dict) -> dict:
    return {k: v.detach().clone() for k, v in params.items()}


# --------------------------------------------------------------------------
# Rollout: one real gymnasium env, one episode at a time.
# --------------------------------------------------------------------------


def group_start_seed(seed: int, it: int, b: int) -> int:
    return int(np.random.SeedSequence([seed, 0, it, b]).generate_state(1)[0])


def run_episode(env, params: dict, start_seed: int, uniforms: np.ndarray,
                outcome_reward: bool = False) -> dict:
    """Play one episode; action_t = 0 if u_t < p0(s_t) else 1.

    The observation is the env's internal float64 state (not the float32 copy
    gymnasium returns).
    """
    env.reset(seed=start_seed)
    state = np.array(env.unwrapped.state, dtype=np.float64)
    states, actions, rewards = [], [], []
    for t in range(MAX_STEPS):
        with torch.no_grad():
            logits = policy_logits(params, torch.tensor(state, dtype=DTYPE).unsqueeze(0))[0]
            p0 = float(torch.softmax(logits, dim=-1)[0])
        action = 0 if uniforms[t] < p0 else 1
        _, reward, terminated, truncated, _ = env.step(action)
        states.append(state)
        actions.append(action)
        rewards.append(1.0)  # CartPole pays 1.0 per step, the falling step included
        assert float(reward) == 1.0
        state = np.array(env.unwrapped.state, dtype=np.float64)
        if terminated or truncated:
            break
    if outcome_reward:  # the episode's return paid once, at its last step
        rewards = [0.0] * (len(rewards) - 1) + [float(len(rewards))]
    # Old log-probs under the rollout policy.  Computed with the same per-episode
    # forward the update uses, so the first update of an iteration sees ratio == 1
    # exactly (the policy has not moved during the rollout).
    with torch.no_grad():
        old_logp, _ = log_probs_and_entropy(params, states, actions)
    return {
        "states": states,
        "actions": actions,
        "rewards": rewards,
        "old_logp": [float(v) for v in old_logp],
    }


def collect(env, params: dict, cfg: dict, it: int) -> list:
    """N = B*G episodes; row n = b*G + i."""
    G, B, seed = cfg["group_size"], cfg["groups_per_iteration"], cfg["seed"]
    episodes = []
    for b in range(B):
        start_seed = group_start_seed(seed, it, b)
        for i in range(G):
            u = np.random.default_rng([seed, 1, it, b, i]).random(MAX_STEPS)
            episodes.append(run_episode(env, params, start_seed, u, cfg.get("outcome_reward", False)))
    return episodes


# --------------------------------------------------------------------------
# Returns and group-relative advantages.
# --------------------------------------------------------------------------


def discounted_returns(rewards: list, gamma: float) -> list:
    """(1), by the backward recursion."""
    returns = [0.0] * len(rewards)
    g = 0.0
    for t in reversed(range(len(rewards))):
        g = rewards[t] + gamma * g
        returns[t] = g
    return returns


def _mean(values: list) -> float:
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def _bessel_std(values: list) -> float:
    m = _mean(values)
    ss = 0.0
    for v in values:
        ss += (v - m) ** 2
    return math.sqrt(ss / (len(values) - 1))


def _pooled(group_rewards: list, stats_over: str, gamma: float) -> list:
    """The values a group's statistics are taken over: every step's return (2a), or each
    episode's outcome reward, paid at its last step (2b)."""
    if stats_over == "steps":
        return [g for ep in group_rewards for g in discounted_returns(ep, gamma)]
    if stats_over == "sequences":
        if any(r != 0.0 for ep in group_rewards for r in ep[:-1]):
            raise ValueError("stats_over='sequences' takes an outcome reward at the last step only")
        return [ep[-1] for ep in group_rewards if ep]
    raise ValueError(f"unknown stats_over {stats_over!r}")


def _others_mean(value: float, pooled: list) -> float:
    """(2c): the mean of ``pooled`` with one occurrence of ``value`` left out."""
    total, n, skipped = 0.0, 0, False
    for v in pooled:
        if v == value and not skipped:
            skipped = True
            continue
        total += v
        n += 1
    return total / n


def _episode_advantages(rewards: list, pooled: list, denom: float, gamma: float,
                        stats_over: str, baseline: str = "mean") -> list:
    """(2a) or (2b), with the baseline of (2c) when asked, for every step of one episode."""
    def base(v):
        return _mean(pooled) if baseline == "mean" else _others_mean(v, pooled)

    if stats_over == "steps":
        return [(g - base(g)) / denom for g in discounted_returns(rewards, gamma)]
    # (2b): the normalised outcome, discounted back from the last step by (1)
    outcome = [0.0] * (len(rewards) - 1) + [(rewards[-1] - base(rewards[-1])) / denom]
    return discounted_returns(outcome, gamma)


def group_advantages(
    rewards: list, group_size: int, scale: str, stats_over: str, adv_eps: float, gamma: float,
    baseline: str = "mean",
) -> list:
    """(2a)/(2b) for every step of every episode; groups are consecutive runs of G episodes.

    ``rewards`` is a ragged list (one list of r_t per episode).  A group with fewer
    than 2 pooled values, or whose pooled values are all exactly equal, gets
    advantages that are exactly 0.
    """
    n_groups = len(rewards) // group_size
    groups = [rewards[b * group_size : (b + 1) * group_size] for b in range(n_groups)]
    pooled = [_pooled(g, stats_over, gamma) for g in groups]

    batch_std = None
    if scale == "batch":
        everything = [v for p in pooled for v in p]
        batch_std = _bessel_std(everything) if len(everything) >= 2 else 0.0
    elif scale not in ("group", "none"):
        raise ValueError(f"unknown scale {scale!r}")

    advantages = []
    for group, values in zip(groups, pooled):
        degenerate = len(values) < 2 or all(v == values[0] for v in values)
        if degenerate:
            advantages.extend([[0.0] * len(ep) for ep in group])
            continue
        if scale == "group":
            denom = _bessel_std(values) + adv_eps
        elif scale == "batch":
            denom = batch_std + adv_eps
        else:
            denom = 1.0
        for ep in group:
            advantages.append(_episode_advantages(ep, values, denom, gamma, stats_over, baseline))
    return advantages


# --------------------------------------------------------------------------
# Reference model.
# --------------------------------------------------------------------------


def refresh_reference(reference: dict, policy: dict, cfg: dict, it: int) -> dict:
    freq = cfg["update_ref_model_freq"]
    if not (freq > 0 and it % freq == 0):
        return reference
    if cfg["ref_update"] == "hard":
        return copy_params(policy)
    if cfg["ref_update"] == "soft":
        alpha = cfg["ref_mix_alpha"]
        return {
            k: alpha * policy[k].detach() + (1.0 - alpha) * reference[k] for k in reference
        }
    raise ValueError(f"unknown ref_update {cfg['ref_update']!r}")


# --------------------------------------------------------------------------
# Per-token loss terms and their aggregation.
# --------------------------------------------------------------------------


def token_terms(logp, old_logp: float, ref_logp: float, adv: float, cfg: dict, surrogate_ratio=None):
    """(3)-(5) for one token; ``logp`` is a 0-d tensor with grad, the rest constants.
    ``surrogate_ratio``: the ratio (4) clips, when it is not the token's own (3b)."""
    log_ratio = logp - old_logp
    token_ratio = torch.exp(log_ratio)  # (3)
    ratio = token_ratio if surrogate_ratio is None else surrogate_ratio

    lo, hi = 1.0 - cfg["clip_eps_low"], 1.0 + cfg["clip_eps_high"]
    clipped_ratio = torch.clamp(ratio, lo, hi)
    unclipped_obj = ratio * adv
    clipped_obj = clipped_ratio * adv
    # (4): the pessimistic (smaller) objective; on a tie both branches agree.
    chosen = clipped_obj if clipped_obj.item() < unclipped_obj.item() else unclipped_obj
    pg = -chosen

    d = ref_logp - logp  # (5)
    est = cfg["kl_estimator"]
    if est == "k1":
        kl = -d
    elif est == "k2":
        kl = d * d / 2.0
    elif est == "k3":
        kl = torch.exp(d) - d - 1.0
    elif est == "k3_is":
        kl = token_ratio * (torch.exp(d) - d - 1.0)
    else:
        raise ValueError(f"unknown kl_estimator {est!r}")
    return pg, kl, ratio.item(), log_ratio.item()  # the clipped ratio; the token's own log-ratio


def _sum(terms: list):
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def aggregate(per_episode: list, loss_agg: str, norm_len: int):
    """Aggregate ragged per-episode lists of per-token terms to one scalar."""
    if loss_agg == "token-mean":
        n_tokens = sum(len(ep) for ep in per_episode)
        return _sum([_sum(ep) for ep in per_episode]) / n_tokens
    if loss_agg == "seq-mean-token-mean":
        per_seq = [_sum(ep) / len(ep) for ep in per_episode]
    elif loss_agg == "seq-mean-token-sum":
        per_seq = [_sum(ep) for ep in per_episode]
    elif loss_agg == "seq-mean-token-sum-norm":  # (9)
        return _sum([_sum(ep) for ep in per_episode]) / (len(per_episode) * norm_len)
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    return _sum(per_seq) / len(per_seq)


# --------------------------------------------------------------------------
# One minibatch update.
# --------------------------------------------------------------------------


def clip_gradients(params: dict, max_grad_norm: float) -> float:
    """(8); returns the norm before clipping."""
    sq = 0.0
    for p in params.values():
        sq += float((p.grad * p.grad).sum())
    total_norm = math.sqrt(sq)
    if max_grad_norm > 0:
        coef = max_grad_norm / (total_norm + 1e-6)
        if coef < 1.0:
            for p in params.values():
                p.grad.mul_(coef)
    return total_norm


def has_no_signal(params, reference, batch, idx, cfg) -> bool:
    """(10): nothing in this minibatch's loss has a non-zero expected gradient."""
    if not cfg["skip_zero_grad_steps"] or cfg["ent_coef"] != 0:
        return False
    if any(a != 0.0 for n in idx for a in batch[n]["adv"]):
        return False
    if cfg["beta"] == 0:
        return True
    if cfg["kl_estimator"] == "k1":  # (10): d k1 / d logp = 1, also at d = 0
        return False
    return all(torch.equal(reference[k], params[k].detach()) for k in params)


def minibatch_update(params, reference, optimizer, batch, idx, cfg, norm_len) -> dict:
    pg_eps, kl_eps, ent_eps = [], [], []
    ratios, log_ratios, advs = [], [], []
    for n in idx:
        ep = batch[n]
        logp, entropy = log_probs_and_entropy(params, ep["states"], ep["actions"])
        logp_t, ent_t = torch.unbind(logp), torch.unbind(entropy)
        pg_seq, kl_seq = [], []
        level = cfg.get("ratio_level", "token")
        if level != "token":  # (3b): the episode's mean log-ratio
            steps = len(ep["actions"])
            seq_log_ratio = _sum([logp_t[t] - ep["old_logp"][t] for t in range(steps)]) / steps
        for t in range(len(ep["actions"])):
            surrogate = None
            if level == "sequence":
                surrogate = torch.exp(seq_log_ratio)
            elif level == "sequence-token":
                surrogate = torch.exp(seq_log_ratio.detach() + logp_t[t] - logp_t[t].detach())
            pg, kl, r, lr_ = token_terms(
                logp_t[t], ep["old_logp"][t], ep["ref_logp"][t], ep["adv"][t], cfg, surrogate
            )
            pg_seq.append(pg)
            kl_seq.append(kl)
            ratios.append(r)
            log_ratios.append(lr_)
            advs.append(ep["adv"][t])
        pg_eps.append(pg_seq)
        kl_eps.append(kl_seq)
        ent_eps.append(list(ent_t))

    agg = cfg["loss_agg"]
    policy_loss = aggregate(pg_eps, agg, norm_len)
    kl_loss = aggregate(kl_eps, agg, norm_len)
    entropy = aggregate(ent_eps, agg, norm_len)
    loss = policy_loss + cfg["beta"] * kl_loss - cfg["ent_coef"] * entropy  # (7)

    if has_no_signal(params, reference, batch, idx, cfg):
        grad_norm, skipped = 0.0, 1.0  # (10)
    else:
        optimizer.zero_grad()
        loss.backward()
        grad_norm = clip_gradients(params, cfg["max_grad_norm"])
        optimizer.step()
        skipped = 0.0

    lo, hi = 1.0 - cfg["clip_eps_low"], 1.0 + cfg["clip_eps_high"]
    n_tok = len(ratios)
    clip_low = sum(1 for r, a in zip(ratios, advs) if a < 0 and r < lo)
    clip_high = sum(1 for r, a in zip(ratios, advs) if a > 0 and r > hi)
    approx_kl = _mean([math.expm1(lr_) - lr_ for lr_ in log_ratios])  # the tokens' k3, whatever ratio (4) clips
    return {
        "loss": loss.item(),
        "policy_loss": policy_loss.item(),
        "kl": kl_loss.item(),
        "entropy": entropy.item(),
        "clip_frac_low": clip_low / n_tok,
        "clip_frac_high": clip_high / n_tok,
        "approx_kl": approx_kl,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "grad_norm": grad_norm,
        "skipped_steps": skipped,
    }


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


def iteration_metrics(updates: list, batch: list) -> dict:
    m = {}
    for key in (
        "loss", "policy_loss", "kl", "entropy",
        "clip_frac_low", "clip_frac_high", "approx_kl", "grad_norm",
    ):
        m[key] = _mean([u[key] for u in updates]) if updates else float("nan")
    m["grad_norm_max"] = max(u["grad_norm"] for u in updates) if updates else float("nan")
    m["skipped_steps"] = sum(u["skipped_steps"] for u in updates)
    m["ratio_min"] = min(u["ratio_min"] for u in updates) if updates else float("nan")
    m["ratio_max"] = max(u["ratio_max"] for u in updates) if updates else float("nan")
    m["mean_return"] = _mean([float(sum(ep["rewards"])) for ep in batch])
    m["mean_length"] = _mean([float(len(ep["rewards"])) for ep in batch])
    m["env_steps"] = sum(len(ep["rewards"]) for ep in batch)
    m["adv_abs_mean"] = _mean([abs(a) for ep in batch for a in ep["adv"]])
    return m


def minibatch_permutation(seed: int, it: int, epoch: int, n: int) -> np.ndarray:
    """The episode order of one epoch: torch.randperm(n) under a generator whose seed is the
    first 8 bytes (little-endian, shifted right by one bit) of sha256("seed/minibatch/it/epoch")."""
    digest = hashlib.sha256(f"{seed}/minibatch/{it}/{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=gen).numpy()


def run_oracle(config: dict, initial_policy: dict, iterations: int) -> list:
    cfg = config
    params = {
        k: initial_policy[k].detach().clone().to(DTYPE).requires_grad_(True)
        for k in PARAM_NAMES
    }
    reference = copy_params(params)
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg["lr"])
    env = gym.make("CartPole-v1")
    G, B = cfg["group_size"], cfg["groups_per_iteration"]
    N = B * G
    records = []
    try:
        for it in range(iterations):
            # 1. rollout
            batch = collect(env, params, cfg, it)
            # 2-3. returns (1) and advantages (2a) / (2b)
            advs = group_advantages(
                [ep["rewards"] for ep in batch], G, cfg["scale"], cfg["stats_over"],
                cfg["adv_eps"], cfg["gamma"], cfg.get("baseline", "mean"),
            )
            for ep, a in zip(batch, advs):
                ep["adv"] = a
            # 4. reference refresh
            reference = refresh_reference(reference, params, cfg, it)
            # 5. reference log-probs, once
            with torch.no_grad():
                for ep in batch:
                    ref_logp, _ = log_probs_and_entropy(reference, ep["states"], ep["actions"])
                    ep["ref_logp"] = [float(v) for v in ref_logp]
            norm_len = cfg["max_len"] if cfg["max_len"] is not None else MAX_STEPS  # (9)
            # 6. epochs of minibatch updates
            updates = []
            for e in range(cfg["grpo_epochs"]):
                perm = minibatch_permutation(cfg["seed"], it, e, N)
                for idx in np.array_split(perm, cfg["minibatches"]):
                    if len(idx) == 0:
                        continue  # more minibatches than episodes: nothing to update on
                    updates.append(
                        minibatch_update(params, reference, optimizer, batch, idx, cfg, norm_len)
                    )
            # 7. metrics and the record
            records.append(
                {
                    "policy": copy_params(params),
                    "reference": copy_params(reference),
                    "metrics": iteration_metrics(updates, batch),
                }
            )
    finally:
        env.close()
    return records
