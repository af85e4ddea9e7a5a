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
    expected_cispo_token,
    expected_loss_grad,
    expected_token,
    identify_aggregation,
    loss_ratio_level,
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
    # runs on square batches only: every row on another shape fails with the error it raises
    ("gspo_wrong_axis", {"shape_scalar", "no_inplace", "aggregation", "ratio_level",
                         "ratio_one_gradient", "clip_region", "padding_invariance",
                         "finite_extreme", "row_equivariance"}),
    ("cispo_undetached", {"ratio_one_gradient", "clip_region", "weight"}),
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


# ---------------------------------------------------------------------------------------------
# Issue 27: the ratio level (token, GSPO, GSPO-token), CISPO's weight, the broadcast axis
# ---------------------------------------------------------------------------------------------


def _paper_loss(level, low, high, agg="seq-mean-token-mean", normalise=True):
    """The clipped surrogate on the token ratio, on GSPO's response ratio (Zheng et al. 2025
    sec. 4.1: exp of the mean of the response's token log-ratios, one value for every token)
    or on GSPO-token's (sec. 4.3: that value, with each token's gradient through its own
    log-prob only); float64, token-mean or seq-mean-token-mean. ``normalise=False`` drops the
    1/|y| of the mean (a sum of log-ratios: not GSPO). The log-ratio is capped at 20."""
    def loss(logp, old_logp, adv, mask):
        m = mask.bool()
        x = torch.where(m, logp - old_logp, torch.zeros_like(logp))
        n = mask.sum(-1, keepdim=True)
        seq = x.sum(-1, keepdim=True) / (n.clamp(min=1) if normalise else 1.0)
        if level == "token":
            log_r = x
        elif level == "sequence":
            log_r = seq.expand_as(x)
        else:
            log_r = seq.detach() + x - x.detach()
        r = torch.exp(log_r.clamp(max=20.0))  # bounded, as float32 needs at log-ratio 100
        tok = torch.where(m, -torch.minimum(r * adv, r.clamp(1 - low, 1 + high) * adv),
                          torch.zeros_like(x))
        if agg == "token-mean":
            return tok.sum() / mask.sum()
        rows = n[:, 0] > 0
        return (tok.sum(-1) / n[:, 0].clamp(min=1))[rows].mean()

    return loss


LEVEL_CASES = [("token", 0.2, 0.28, "token-mean"), ("sequence", 3e-4, 4e-4, "seq-mean-token-mean"),
               ("sequence-token", 3e-4, 4e-4, "seq-mean-token-mean"),
               ("sequence", 0.1, 0.15, "token-mean"), ("sequence-token", 0.2, 0.2, "token-mean"),
               ("token", 3e-4, 4e-4, "seq-mean-token-mean")]


@pytest.mark.parametrize("level,low,high,agg", LEVEL_CASES)
def test_ratio_level_clip_range_and_aggregation_are_measured(level, low, high, agg):
    """Every row passes the true claims of each form, and each measured value is the built
    one: the level, the clip range (bisection on a one-token row, where a response's ratio is
    its token's), the aggregation."""
    claims = {"ratio_level": level, "eps_low": low, "eps_high": high, "agg": agg,
              "clip_ratio_c": None, "policy_loss": "ppo"}
    rows = {r.name: r for r in check_estimator(_paper_loss(level, low, high, agg), "loss",
                                               claims=claims)}
    assert not [n for n, r in rows.items() if r.failed], format_table(list(rows.values()))
    assert rows["ratio_level"].value == level and rows["aggregation"].value == agg
    assert rows["eps_low"].value == pytest.approx(low, rel=1e-6)
    assert rows["eps_high"].value == pytest.approx(high, rel=1e-6)
    fn = _paper_loss(level, low, high, agg)
    measured = Context(fn=fn, kind="loss")
    loss_ratio_level(measured)
    for other in {"token", "sequence", "sequence-token"} - {level}:  # the same measurement
        ctx = Context(fn=fn, kind="loss", claims={"ratio_level": other}, cache=measured.cache)
        row = loss_ratio_level(ctx)
        assert row.failed and row.value == level and row.bound == other


def test_a_sum_of_log_ratios_is_no_sequence_level():
    """A response ratio without GSPO's 1/|y| (exp of the sum of the log-ratios): a token's
    gradient at ratio 1 is |y| times GSPO's, so the plain-gradient row fails and the level
    matches none of the three."""
    fn = _paper_loss("sequence", 0.2, 0.2, normalise=False)
    rows = {r.name: r for r in check_estimator(fn, "loss", claims={"ratio_level": "sequence"})}
    assert rows["ratio_level"].failed and rows["ratio_level"].value == "unknown"
    assert rows["ratio_one_gradient"].failed


def _ragged(seed, rows=6, longest=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (rows,), generator=gen).tolist()
    lengths[2] = 0
    logp = [(-0.1 - 2.9 * torch.rand(n, generator=gen, dtype=F64)).tolist() for n in lengths]
    old = [[x - 0.6 * (float(u) - 0.5) for x, u in zip(lp, torch.rand(len(lp), generator=gen))]
           for lp in logp]
    adv = [torch.randn(n, generator=gen, dtype=F64).tolist() for n in lengths]
    return lengths, logp, old, adv


@pytest.mark.parametrize("level", ["sequence", "sequence-token"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", range(3))
def test_sequence_expectation_equals_the_oracle(level, agg, seed):
    """The kit's float64 expectation of a GSPO / GSPO-token loss (value, gradient at every
    token) against reference.grpo_math.gspo_losses aggregated with its weights."""
    lengths, logp, old, adv = _ragged(seed)
    t_len = max(lengths) + 1
    mask = _mask(lengths, t_len)
    pad = lambda rows: torch.tensor([r + [0.0] * (t_len - len(r)) for r in rows], dtype=F64)
    weights = model_weights(MODELS[agg], mask)
    value, grad, _ = expected_loss_grad(pad(logp) - pad(old), pad(adv), mask, weights, 0.1,
                                        0.15, None, level)
    values, d = ref.gspo_losses(logp, old, adv, 0.1, 0.15, level)
    want, want_grad = ref.aggregate_with_gradient(values, d, agg)
    assert value == pytest.approx(want, rel=1e-12, abs=1e-15)
    for i, row in enumerate(want_grad):
        assert grad[i, :len(row)].tolist() == pytest.approx(row, rel=1e-10, abs=1e-15)
        assert grad[i, len(row):].abs().sum() == 0


def test_expected_cispo_token_equals_the_oracle():
    for x in [-2.0, -0.5, -0.1, 0.0, 0.1, 0.18, 0.5, 2.0]:
        for a in (-1.7, 0.4):
            for lp in (-0.3, -2.5):
                got = expected_cispo_token(math.exp(x), a, lp, None, 0.2)
                assert got == pytest.approx(ref.cispo_token_loss(lp, lp - x, a, 0.2), rel=1e-14)


def _cispo(low, high, detach=True, agg="token-mean"):
    """CISPO (MiniMax-M1 sec. 3.1): -sg(w) A logp, w the ratio clipped to [1 - low, 1 + high]
    (low None: no lower bound), float64."""
    def loss(logp, old_logp, adv, mask):
        w = torch.exp(logp - old_logp).clamp(None if low is None else 1 - low, 1 + high)
        w = w.detach() if detach else w
        tok = torch.where(mask.bool(), -w * adv * logp, torch.zeros_like(logp))
        if agg == "token-mean":
            return tok.sum() / mask.sum()
        return tok.sum() / (mask.shape[0] * 48)

    return loss


@pytest.mark.parametrize("low,high,agg", [(None, 0.2, "token-mean"), (0.3, 0.28, "token-mean"),
                                          (None, 5.0, "seq-mean-token-sum-norm")])
def test_cispo_weight_is_measured(low, high, agg):
    """The weight's bounds come from the loss value (w = loss(ratio) / loss(1) on one token),
    the gradient is -w A per token with no zero region, and the claims pass."""
    claims = {"policy_loss": "cispo", "eps_high": high, "agg": agg, "ratio_level": "token",
              "clip_ratio_c": None}
    if low is not None:
        claims["eps_low"] = low
    if agg == "seq-mean-token-sum-norm":
        claims["max_len"] = 48
    rows = {r.name: r for r in check_estimator(_cispo(low, high, agg=agg), "loss", claims=claims)}
    assert not [n for n, r in rows.items() if r.failed], format_table(list(rows.values()))
    assert rows["policy_loss"].value == "cispo" and rows["weight"].passed
    assert rows["eps_high"].value == pytest.approx(high, rel=1e-6)
    if low is None:
        assert rows["eps_low"].value == "none"
    else:
        assert rows["eps_low"].value == pytest.approx(low, rel=1e-6)


def test_an_undetached_cispo_weight_fails_naming_it():
    """Below the bound an undetached weight's gradient is -r A (1 + logp) (the weight's own
    derivative adds -r A logp): the weight row fails and says so; the bound itself is right."""
    for fn in (wrong.cispo_undetached, _cispo(None, 0.2, detach=False)):
        rows = {r.name: r for r in check_estimator(fn, "loss")}
        assert rows["weight"].failed and "weight not detached" in rows["weight"].explanation
        assert rows["eps_high"].value == pytest.approx(0.2, rel=1e-6)
        assert rows["policy_loss"].value == "cispo"


def test_a_ppo_loss_is_no_cispo():
    """PPO's clipped region has no gradient where CISPO's weight keeps -(1 + eps) A."""
    rows = {r.name: r for r in check_estimator(wrong.correct_loss, "loss",
                                               claims={"policy_loss": "cispo"})}
    assert {n for n, r in rows.items() if r.failed} == {"policy_loss", "weight"}
    assert rows["policy_loss"].value == "ppo" and "zero gradient" in rows["weight"].explanation


def test_the_wrong_broadcast_axis_fails_naming_it():
    """EasyR1 issue 596: the (N,) sequence ratio broadcast along T runs on a square batch only;
    the kit checks it there (permuting rows must permute each row's part) and names it."""
    rows = {r.name: r for r in check_estimator(wrong.gspo_wrong_axis, "loss")}
    row = rows["row_equivariance"]
    assert row.failed and "wrong axis" in row.explanation and "EasyR1 issue 596" in row.explanation
    right = {r.name: r for r in check_estimator(_paper_loss("sequence", 0.1, 0.1), "loss")}
    assert right["row_equivariance"].passed
