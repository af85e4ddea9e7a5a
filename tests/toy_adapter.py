"""A tiny sequence task for loop tests: a tabular policy emits tokens, the reward comes at the end.

The policy is a table of logits, one categorical per position, so every log-prob is exact and
cheap. Each sample's length is drawn between 1 and T; its outcome reward (the share of token 0
in the completion) sits on its last token, like an outcome reward on a VLM completion.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from grpo_core.adapter import Rollout


class TablePolicy(nn.Module):
    def __init__(self, t_max: int, vocab: int, dtype=torch.float64, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.randn(t_max, vocab, generator=gen, dtype=dtype) * 0.5)


class ToyAdapter:
    def __init__(self, *, t_max: int = 5, vocab: int = 3, seed: int = 0, dtype=torch.float64):
        self.policy = TablePolicy(t_max, vocab, dtype, seed)
        self.t_max, self.vocab, self.seed = t_max, vocab, seed

    def make_reference(self) -> nn.Module:
        ref = copy.deepcopy(self.policy)
        ref.requires_grad_(False)
        return ref.eval()

    def collect(self, *, num_groups: int, group_size: int, iteration: int) -> Rollout:
        n = num_groups * group_size
        gen = torch.Generator().manual_seed(1000 * self.seed + iteration)
        probs = torch.softmax(self.policy.logits, -1)
        tokens = torch.stack([torch.multinomial(probs, 1, generator=gen).squeeze(-1) for _ in range(n)])
        lengths = torch.randint(1, self.t_max + 1, (n,), generator=gen)
        mask = torch.arange(self.t_max)[None, :] < lengths[:, None]
        outcome = ((tokens == 0) & mask).sum(1).double() / lengths.double()
        rewards = torch.zeros(n, self.t_max, dtype=self.policy.logits.dtype)
        rewards[torch.arange(n), lengths - 1] = outcome.to(rewards.dtype)
        rollout = Rollout(rewards=rewards, mask=mask, old_logp=torch.empty(0),
                          inputs={"tokens": tokens, "outcome": outcome},
                          info={"mean_return": float(outcome.mean())})
        rollout.old_logp = self.logp_and_entropy(self.policy, rollout, torch.arange(n))[0]
        return rollout

    def logp_and_entropy(self, model, rollout: Rollout, rows: torch.Tensor):
        logp_all = torch.log_softmax(model.logits, -1)  # (T, V)
        tokens = rollout.inputs["tokens"][rows]
        logp = logp_all.gather(1, tokens.T).T  # (n, T)
        entropy = -(logp_all.exp() * logp_all).sum(-1).expand(len(rows), -1)
        return logp, entropy
