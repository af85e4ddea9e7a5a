"""Smoke tests of the float64 CartPole GRPO oracle (reference/cartpole_grpo.py)."""

import math

import pytest
import torch

from reference.cartpole_grpo import discounted_returns, group_advantages, run_oracle

CONFIG = {
    "group_size": 3,
    "groups_per_iteration": 2,
    "gamma": 0.99,
    "grpo_epochs": 2,
    "minibatches": 2,
    "update_ref_model_freq": 1,
    "ref_update": "hard",
    "ref_mix_alpha": 0.5,
    "clip_eps_low": 0.2,
    "clip_eps_high": 0.2,
    "beta": 0.1,
    "kl_estimator": "k3",
    "scale": "group",
    "stats_over": "steps",
    "loss_agg": "token-mean",
    "max_len": None,
    "ent_coef": 0.01,
    "max_grad_norm": 0.5,
    "lr": 1e-2,
    "adv_eps": 1e-8,
    "seed": 0,
    "skip_zero_grad_steps": True,
    "an_unknown_key": "ignored",
}


def initial_policy(hidden=8):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 2),
    )
    return {f"net.{k}": v.detach().to(torch.float64).clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def records():
    return run_oracle(CONFIG, initial_policy(), iterations=2)


def test_records_are_finite_float64(records):
    assert len(records) == 2
    for rec in records:
        for sd in (rec["policy"], rec["reference"]):
            for v in sd.values():
                assert v.dtype == torch.float64
                assert torch.isfinite(v).all()
        for k, v in rec["metrics"].items():
            assert math.isfinite(v), k
        m = rec["metrics"]
        assert m["env_steps"] == round(m["mean_length"] * 6)
        assert m["mean_return"] == m["mean_length"]  # 1.0 reward per step


def test_parameters_change(records):
    init = initial_policy()
    p0, p1 = records[0]["policy"], records[1]["policy"]
    assert any(not torch.equal(init[k], p0[k]) for k in init)
    assert any(not torch.equal(p0[k], p1[k]) for k in init)


def test_hard_refresh_at_freq_1(records):
    init = initial_policy()
    for k in init:
        # refreshed at it=0 from the initial policy, at it=1 from the policy after it=0
        assert torch.equal(records[0]["reference"][k], init[k])
        assert torch.equal(records[1]["reference"][k], records[0]["policy"][k])


def test_single_update_sees_ratio_one():
    cfg = dict(CONFIG, grpo_epochs=1, minibatches=1)
    recs = run_oracle(cfg, initial_policy(), iterations=2)
    for rec in recs:
        m = rec["metrics"]
        assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0
        assert m["approx_kl"] == 0.0
        assert m["kl"] == 0.0  # hard refresh at every iteration: reference == policy


def test_returns_backward_recursion():
    assert discounted_returns([1.0, 1.0, 1.0], 0.5) == [1.75, 1.5, 1.0]


def test_equal_episodes_give_zero_advantage():
    ep = [0.0, 0.0, 3.0]  # an outcome reward, paid at the last step
    adv = group_advantages([ep, ep, ep], 3, "group", "sequences", 1e-8, 0.99)
    assert adv == [[0.0, 0.0, 0.0]] * 3
    with pytest.raises(ValueError, match="outcome reward at the last step only"):
        group_advantages([[1.0, 1.0], [1.0]], 2, "group", "sequences", 1e-8, 0.99)
    # one-step episodes: the step-pooled values are all equal too
    adv = group_advantages([[1.0], [1.0], [1.0]], 3, "group", "steps", 1e-8, 0.99)
    assert adv == [[0.0]] * 3
    # equal outcomes, different lengths: no signal at any step, whatever gamma
    adv = group_advantages([[0.0] * 9 + [1.0], [0.0] * 10 + [1.0]], 2, "group", "sequences", 1e-8, 0.995)
    assert adv == [[0.0] * 10, [0.0] * 11]


def test_group_advantage_literal():
    # outcomes 1, 2, 3: mean 2, Bessel std 1
    adv = group_advantages([[1.0], [2.0], [3.0]], 3, "group", "sequences", 1e-8, 0.99)
    assert adv == [[-1.0 / (1.0 + 1e-8)], [0.0], [1.0 / (1.0 + 1e-8)]]
    adv = group_advantages([[1.0], [2.0], [3.0]], 3, "none", "sequences", 1e-8, 0.99)
    assert adv == [[-1.0], [0.0], [1.0]]
    # outcome 1 after two steps (length 3) vs 3 at once: mean 2, std sqrt(2);
    # the longer episode's first step is 0.5**2 * (1 - 2) / sqrt(2)
    adv = group_advantages([[0.0, 0.0, 1.0], [3.0]], 2, "group", "sequences", 0.0, 0.5)
    s = math.sqrt(2.0)
    assert adv[0] == pytest.approx([-0.25 / s, -0.5 / s, -1.0 / s], rel=1e-15)
    assert adv[1] == pytest.approx([1.0 / s], rel=1e-15)
