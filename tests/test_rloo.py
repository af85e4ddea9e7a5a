"""Leave-one-out (RLOO) advantages: ``GRPOConfig.baseline="leave-one-out"``.

Independent sides: hand-computed cases from the definition A_i = r_i - mean of the others
(Ahmadian et al. 2024), the identity A_i = G/(G - 1) (r_i - mean), Samuelson's inequality for the
bound, and the field's mistake kept as a broken variant (NeMo-RL issue 1518: a std of the other
G - 1 values, which is 0 when they are equal, so a group with one different sample gets
advantages of 1/eps)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_core.advantages import group_advantages
from grpo_core.config import GRPOConfig


def outcome(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One outcome reward per sample (a one-step sequence each), float64."""
    r = torch.tensor(rows, dtype=torch.float64).reshape(-1, 1)
    return r, torch.ones_like(r)


def loo(rewards, **kw):
    r, m = outcome([rewards])
    kw = {"gamma": 1.0, "stats_over": "sequences", "scale": "none", **kw}
    return group_advantages(r, m, len(rewards), baseline="leave-one-out", **kw)[:, 0].tolist()


def test_by_hand_from_the_definition():
    """[1, 0, 0, 1]: 1 - (0 + 0 + 1)/3 = 2/3, 0 - (1 + 0 + 1)/3 = -2/3. Divided by the group's
    Bessel std sqrt(1/3): +-(2/3)/sqrt(1/3) = +-1.1547."""
    assert loo([1.0, 0.0, 0.0, 1.0]) == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], rel=1e-15)
    s = math.sqrt(1 / 3)
    got = loo([1.0, 0.0, 0.0, 1.0], scale="group", eps=0.0)
    assert got == pytest.approx([2 / 3 / s, -2 / 3 / s, -2 / 3 / s, 2 / 3 / s], rel=1e-14)


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_it_is_the_mean_baseline_times_g_over_g_minus_1(scale):
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(3 * 5, 1, generator=gen, dtype=torch.float64)
    m = torch.ones_like(r)
    kw = dict(gamma=1.0, stats_over="sequences", scale=scale, eps=1e-6)
    mean = group_advantages(r, m, 5, **kw)
    rloo = group_advantages(r, m, 5, baseline="leave-one-out", **kw)
    assert torch.allclose(rloo, mean * 5 / 4, rtol=1e-13, atol=0)


def test_shift_invariant_and_ties_give_exactly_zero():
    base = [0.3, 1.7, -0.4, 2.0]
    shifted = loo([x + 1e3 for x in base], scale="group", eps=1e-8)
    assert shifted == pytest.approx(loo(base, scale="group", eps=1e-8), rel=1e-9)
    assert loo([0.7] * 4, scale="group") == [0.0] * 4  # ties: no signal, exactly 0
    assert loo([5.0], scale="group") == [0.0]  # a group of one has no other sample: 0


def _loo_std_variant(rewards, eps=1e-6):
    """NeMo-RL issue 1518's form: the leave-one-out mean, divided by the std of the others."""
    out = []
    for i, x in enumerate(rewards):
        rest = rewards[:i] + rewards[i + 1:]
        mean = sum(rest) / len(rest)
        std = math.sqrt(sum((y - mean) ** 2 for y in rest) / max(len(rest) - 1, 1))
        out.append((x - mean) / (std + eps))
    return out


@pytest.mark.parametrize("spread", [1.0, 1e-3, 1e-9])
def test_bounded_by_sqrt_g_on_near_constant_groups(spread):
    """One sample apart from 7 equal ones, by 1, 1e-3 or 1e-9: |A| <= sqrt(8) = 2.83 here
    (Samuelson: |x - mean| <= (n - 1)/sqrt(n) s, times n/(n - 1)); the others' std (NeMo-RL
    1518) is 0 there, and the outlier's advantage is spread / eps: 1e6 at spread 1, 1e3 at 1e-3."""
    rewards = [0.0] * 7 + [spread]
    got = loo(rewards, scale="group", eps=1e-6)
    assert max(abs(a) for a in got) <= math.sqrt(8) + 1e-9
    assert got[-1] == pytest.approx(math.sqrt(8) * spread / (spread + 1e-6 * math.sqrt(8)), rel=1e-6)
    broken = _loo_std_variant(rewards)
    assert abs(broken[-1]) == pytest.approx(spread / 1e-6, rel=1e-9)
    if spread >= 1e-3:
        assert abs(broken[-1]) > 300 * math.sqrt(8)  # 1e3 and 1e6: far outside the bound


def test_the_config_names_it_and_refuses_others():
    assert GRPOConfig().baseline == "mean"
    assert GRPOConfig(baseline="leave-one-out").baseline == "leave-one-out"
    with pytest.raises(ValueError, match="baseline='loo' is not valid; choose one of mean, leave-one-out"):
        GRPOConfig(baseline="loo")
