"""The kit's ``loss`` kind: aggregation identification, clip measurement, required rows.

The kit's aggregation models are held against the oracle's weights and against closed forms;
its token expectation against the oracle's dual-clip twin; and the deliberately wrong losses
of ``tests/wrong_estimators.py`` must each fail the rows that name their bug.
"""

import itertools
import math

import pytest
import torch

import reference.grpo_math as ref
from grpo_core.testing.checks import Context
from grpo_core.testing.kit import EstimatorUsageError, check_estimator, format_table
from grpo_core.testing.loss_checks import (
    AGG_MODELS,
    design_layouts,
    expected_token,
    identify_aggregation,
    measure_clip,
    model_weights,
)
from tests import wrong_estimators as wrong

F64 = torch.float64
MODELS = {m.name: m for m in AGG_MODELS}


def _mask(lengths, t_len):
    mask = torch.zeros(len(lengths), t_len, dtype=F64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


# ---------------------------------------------------------------------------------------------
# Aggregation models against the oracle and closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_model_weights_equal_the_oracle(agg):
    for lengths, t_len in design_layouts(48):
        w = model_weights(MODELS[agg], _mask(lengths, t_len))
        want = ref.aggregate_weights(lengths, agg)
        for i, n in enumerate(lengths):
            assert w[i, :n].tolist() == pytest.approx(want[i], rel=1e-14)
            assert w[i, n:].abs().sum() == 0


def test_dr_grpo_and_trl_grpo_weights_by_closed_form():
    """Dr. GRPO: 1 / (N max_len), N every row (an empty one too); TRL grpo: 1 / (N len_i)."""
    for lengths, t_len in design_layouts(48):
        mask = _mask(lengths, t_len)
        n_rows = len(lengths)
        dr = model_weights(MODELS["seq-mean-token-sum-norm"], mask, 48.0)
        grpo = model_weights(MODELS["grpo"], mask)
        for i, n in enumerate(lengths):
            if n == 0:
                continue
            assert dr[i, :n].tolist() == pytest.approx([1 / (n_rows * 48)] * n, rel=1e-14)
            assert grpo[i, :n].tolist() == pytest.approx([1 / (n_rows * n)] * n, rel=1e-14)


@pytest.mark.parametrize("max_len", [4, 8, 48, 512])
def test_identification_batches_tell_every_model_apart(max_len):
    """On the design batches no two models' values are equal, nor proportional when one of
    them may be scaled by a fitted constant: the identification is unambiguous. (The one
    pair proportional by construction, seq-mean-token-sum and the same divided by a constant,
    is told apart by the constant: 1 for the first, which is tried first.)"""
    gen = torch.Generator().manual_seed(0)
    vals = {m.name: [] for m in AGG_MODELS}
    for lengths, t_len in design_layouts(max_len):
        mask = _mask(lengths, t_len).bool()
        v = 0.3 + 1.7 * torch.rand(mask.shape, generator=gen, dtype=F64)
        for m in AGG_MODELS:
            vals[m.name].append(float(m.reduce(v, mask)))
    same_up_to_scale = {"seq-mean-token-sum", "sum-norm over non-empty rows"}
    for a, b in itertools.combinations(AGG_MODELS, 2):
        if {a.name, b.name} == same_up_to_scale:
            continue
        x, y = vals[a.name], vals[b.name]
        if a.constant or b.constant:
            ratios = [p / q for p, q in zip(x, y)]
            assert max(ratios) / min(ratios) - 1 > 1e-3, (a.name, b.name)
        else:
            assert max(abs(p - q) / abs(q) for p, q in zip(x, y)) > 1e-3, (a.name, b.name)


def _model_loss(model, scale):
    def loss(logp, old_logp, adv, mask):
        ratio = torch.exp(logp - old_logp)
        tok = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        return model.reduce(tok, mask.bool()) / scale

    return loss


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_is_identified_as_itself(name):
    model = MODELS[name]
    scale = 64.0 if model.constant else 1.0
    found = identify_aggregation(Context(fn=_model_loss(model, scale), kind="loss"))
    assert found["model"].name == name and found["scale"] == scale


def test_declared_max_len_is_checked():
    fn = _model_loss(MODELS["seq-mean-token-sum-norm"], 64.0)
    rows = {r.name: r for r in check_estimator(fn, "loss", claims={
        "agg": "seq-mean-token-sum-norm", "max_len": 48})}
    assert rows["aggregation"].failed and "max_len = 64" in rows["aggregation"].explanation
    rows = {r.name: r for r in check_estimator(fn, "loss", claims={
        "agg": "seq-mean-token-sum-norm", "max_len": 64})}
    assert rows["aggregation"].passed


# ---------------------------------------------------------------------------------------------
# The token expectation and the clip measurement
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_expected_token_equals_the_oracle_twin(clip_ratio_c):
    for x in [-2.0, -0.5, -0.1, 0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0]:
        for a in (-1.7, -0.3, 0.4, 2.0):
            got = expected_token(math.exp(x), a, 0.2, 0.28, clip_ratio_c)
            want = ref.dual_clip_token_loss(x, 0.0, a, 0.2, 0.28, clip_ratio_c)
            assert got == pytest.approx(want, rel=1e-14, abs=1e-15)


@pytest.mark.parametrize("low,high,c", [(0.2, 0.28, None), (0.1, 0.1, 1.5), (0.3, 2.0, 10.0)])
def test_bisection_finds_the_clip_range(low, high, c):
    def loss(logp, old_logp, adv, mask):
        ratio = torch.exp(logp - old_logp)
        tok = -torch.minimum(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)
        if c is not None:
            tok = torch.where(adv < 0, torch.minimum(tok, -c * adv), tok)
        return (tok * mask).sum() / mask.sum()

    got = measure_clip(Context(fn=loss, kind="loss"))
    assert got["eps_low"] == pytest.approx(low, abs=1e-9)
    assert got["eps_high"] == pytest.approx(high, abs=1e-9)
    assert (got["clip_ratio_c"] is None) == (c is None)
    if c is not None:
        assert got["clip_ratio_c"] == pytest.approx(c, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Wrong losses fail the rows that name their bug
# ---------------------------------------------------------------------------------------------

WRONG_LOSSES = [
    ("correct_loss", set()),
    ("loss_unbounded_ratio", {"finite_extreme"}),
    ("loss_clip_leaks_gradient", {"eps_low", "eps_high", "clip_region"}),
    ("loss_mean_over_padding", {"aggregation", "padding_invariance"}),
    ("loss_sign_flipped", {"aggregation", "ratio_one_gradient"}),
    ("loss_clip_sides_swapped", {"eps_low", "eps_high"}),
]


@pytest.mark.parametrize("name,failing", WRONG_LOSSES, ids=[w[0] for w in WRONG_LOSSES])
def test_wrong_losses_fail_the_named_rows(name, failing):
    rows = check_estimator(getattr(wrong, name), "loss")
    assert {r.name for r in rows if r.failed} == failing, format_table(rows)


def test_unbounded_ratio_gives_inf_in_float32():
    """The broken variant really overflows: exp(100) is inf in float32, and inf * A < 0."""
    row = next(r for r in check_estimator(wrong.loss_unbounded_ratio, "loss")
               if r.name == "finite_extreme")
    assert row.value == math.inf and math.isinf(torch.exp(torch.tensor(100.0)).item())


def test_mean_over_padding_is_named_for_its_normaliser():
    row = next(r for r in check_estimator(wrong.loss_mean_over_padding, "loss")
               if r.name == "aggregation")
    assert row.value == "sum-norm by padded T"


def test_loss_usage_errors():
    with pytest.raises(EstimatorUsageError, match="wrong signature"):
        check_estimator(lambda logp, old_logp, adv: logp.sum(), "loss")
    with pytest.raises(EstimatorUsageError, match="unknown claim 'eps'"):
        check_estimator(wrong.correct_loss, "loss", claims={"eps": 1e-4})

    def per_token(logp, old_logp, adv, mask):
        return -torch.exp(logp - old_logp) * adv * mask

    row = next(r for r in check_estimator(per_token, "loss") if r.name == "shape_scalar")
    assert row.failed and "0-dim" in row.explanation
