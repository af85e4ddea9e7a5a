"""The estimator kit (grpo_core.testing.kit / checks) at the Python level.

The kit must reach the known facts about k1/k2/k3/k3_is by computation: the gradient class by
exact enumeration of categorical distributions, k2's bias by sampling. The deliberately wrong
estimators of ``tests/wrong_estimators.py`` must each fail the row that names their bug.
"""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

import grpo_core.testing

from tests import wrong_estimators as wrong
from grpo_core import kl_k1, kl_k2, kl_k3, kl_k3_is
from grpo_core.testing.checks import (
    KINDS,
    ROW_KINDS,
    Z_BOUND,
    CheckResult,
    classify_gradient,
    measure_bias,
)
from grpo_core.testing.kit import (
    BUILTIN_KINDS,
    BUILTINS,
    EstimatorUsageError,
    all_passed,
    check_estimator,
    declares,
    format_table,
    get_claims,
    parse_expect,
)

# ---------------------------------------------------------------------------------------------
# Findings reached by computation
# ---------------------------------------------------------------------------------------------

EXPECTED_GRAD = {"k1": "zero", "k2": "kl_policy_ref", "k3": "kl_ref_policy",
                 "k3_is": "kl_policy_ref"}


@pytest.mark.parametrize("name", sorted(EXPECTED_GRAD))
def test_gradient_class_is_computed_by_enumeration(name):
    rep = classify_gradient(BUILTINS[name])
    assert rep.label == EXPECTED_GRAD[name]
    assert len(rep.pairs) >= 5
    for p in rep.pairs:
        if rep.label == "zero":
            assert p["norm_ratio"] < 1e-9
        elif rep.label == "kl_policy_ref":
            assert p["rel_policy_ref"] < 1e-6 and p["cos_policy_ref"] > 1 - 1e-9
        else:
            assert p["rel_ref_policy"] < 1e-6 and p["cos_ref_policy"] > 1 - 1e-9


def test_gradient_class_of_the_unwrapped_core_functions():
    labels = [classify_gradient(f, seed=3).label for f in (kl_k1, kl_k2, kl_k3, kl_k3_is)]
    assert labels == ["zero", "kl_policy_ref", "kl_ref_policy", "kl_policy_ref"]


def test_gradient_class_neither_for_a_mixture():
    rep = classify_gradient(lambda lp, rf: 0.5 * kl_k2(lp, rf) + 0.5 * kl_k3(lp, rf))
    assert rep.label == "neither"


def test_three_argument_estimator_needs_the_ratio_gradient():
    """Importance-corrected k3 with the ratio detached: same values, k3's gradient."""

    @declares(unbiased=True, nonnegative=True, grad="kl_policy_ref")
    def k3_is_detached_ratio(logp, ref_logp, old_logp):
        return torch.exp(logp - old_logp).detach() * kl_k3(logp, ref_logp)

    rows = {r.name: r for r in check_estimator(k3_is_detached_ratio, "kl")}
    assert rows["grad_direction"].failed and rows["grad_direction"].value == "kl_ref_policy"
    assert rows["unbiased"].passed and rows["unbiased_off_policy"].passed


def _far_pair():
    gen = torch.Generator().manual_seed(1)
    pi = torch.randn(16, generator=gen, dtype=torch.float64)
    ref = 5.0 * torch.randn(16, generator=gen, dtype=torch.float64)
    return pi, ref


def test_k2_bias_is_measured_clearly_nonzero_on_a_far_pair():
    pi, ref = _far_pair()
    k2 = measure_bias(BUILTINS["k2"], pi, ref, samples=20_000, seed=0)
    assert k2["kl"] > 2.0
    assert abs(k2["bias"]) > 0.2 * k2["kl"]
    assert k2["z"] > 10 * Z_BOUND and not k2["ok"]
    # k1 and k3 on the same pair and samples: within the bound
    for name in ("k1", "k3"):
        r = measure_bias(BUILTINS[name], pi, ref, samples=20_000, seed=0)
        assert r["ok"] and r["z"] < Z_BOUND, (name, r)
        assert r["k1_bias"] == pytest.approx(k2["k1_bias"])  # same samples


def test_k3_is_is_unbiased_off_policy():
    pi, ref = _far_pair()
    old = pi + 0.5 * torch.randn(16, generator=torch.Generator().manual_seed(2),
                                 dtype=torch.float64)
    assert measure_bias(BUILTINS["k3_is"], pi, ref, old_logits=old)["ok"]
    # plain k3 fed tokens from old (no importance weight) is biased
    assert not measure_bias(lambda lp, rf, od: kl_k3(lp, rf), pi, ref, old_logits=old)["ok"]


# ---------------------------------------------------------------------------------------------
# Built-ins pass their own claims
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_pass_their_declared_claims(name):
    rows = check_estimator(BUILTINS[name], BUILTIN_KINDS[name])
    assert all_passed(rows), format_table(rows)
    claimed = {r.name for r in rows if r.kind == "claim"}
    if BUILTIN_KINDS[name] == "kl":
        assert {"unbiased", "nonnegative", "grad_direction"} <= claimed
    if name == "k2":  # claims unbiased=False: the row passes because bias was measured
        row = next(r for r in rows if r.name == "unbiased")
        assert row.passed and row.value > 20 * Z_BOUND and "BIASED" in row.explanation
    if name == "k3_is":
        assert {r.name for r in rows} >= {"unbiased_off_policy", "uses_old_logp"}


@pytest.mark.parametrize("seed", [1, 17, 123])
def test_builtins_pass_with_other_seeds(seed):
    for name in ("k1", "k3", "k3_is"):
        rows = check_estimator(BUILTINS[name], "kl", seed=seed)
        assert all_passed(rows), format_table(rows)


def test_builtins_wrap_without_touching_core():
    assert not hasattr(kl_k3, "__grpo_claims__")
    assert get_claims(BUILTINS["k3"]) == {"unbiased": True, "nonnegative": True,
                                          "grad": "kl_ref_policy"}
    x, y = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    assert torch.equal(BUILTINS["k3"](x, y), kl_k3(x, y))


def test_issue_27_builtins_declare_their_forms():
    """GSPO, GSPO-token, CISPO and RLOO wrap the core's functions with the claims that name
    their form; the kit measures each (test_builtins_pass_their_declared_claims)."""
    want = {"gspo_loss": ("loss", {"ratio_level": "sequence", "policy_loss": "ppo"}),
            "gspo_token_loss": ("loss", {"ratio_level": "sequence-token", "policy_loss": "ppo"}),
            "cispo_loss": ("loss", {"ratio_level": "token", "policy_loss": "cispo"}),
            "rloo_advantage": ("advantage", {"leave_one_out": True, "std_scaled": True})}
    for name, (kind, claims) in want.items():
        assert BUILTIN_KINDS[name] == kind
        assert claims.items() <= get_claims(BUILTINS[name]).items(), name
    for name in ("policy_loss", "policy_loss_dual_clip"):
        assert get_claims(BUILTINS[name])["ratio_level"] == "token"


# ---------------------------------------------------------------------------------------------
# Wrong estimators fail the row that names the bug (the CLI tests repeat this end to end)
# ---------------------------------------------------------------------------------------------

WRONG = [
    ("kl_detached", "kl", {"grad_reaches_logp", "grad_direction"}),
    ("kl_wrong_sign", "kl", {"nonnegative", "unbiased", "grad_direction"}),
    ("kl_k3_inverted", "kl", {"unbiased", "grad_direction"}),
    ("adv_biased_std_one_sample", "advantage", {"group_size_one"}),
    ("adv_mean_only_claims_std", "advantage", {"unit_scale", "bessel", "affine_invariance"}),
    ("adv_leak_across_groups", "advantage", {"zero_mean", "groups_independent"}),
    ("returns_off_by_one", "returns", {"recursion", "gamma_zero", "oracle"}),
    ("returns_padding_leak", "returns", {"padding_invariance"}),
    ("adv_loo_std_of_others", "advantage", {"bounded_advantage"}),
    ("gspo_wrong_axis", "loss", {"row_equivariance"}),
    ("cispo_undetached", "loss", {"weight"}),
]


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")  # torch.std of one sample warns
@pytest.mark.parametrize("name,kind,rows_expected", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_estimators_fail_the_named_rows(name, kind, rows_expected):
    rows = check_estimator(getattr(wrong, name), kind)
    failed = {r.name for r in rows if r.failed}
    assert rows_expected <= failed, format_table(rows)


@pytest.mark.parametrize("name,kind", [("correct_k3", "kl"), ("correct_adv", "advantage"),
                                       ("correct_returns", "returns"), ("correct_loss", "loss")])
def test_correct_estimators_pass(name, kind):
    rows = check_estimator(getattr(wrong, name), kind)
    assert all_passed(rows), format_table(rows)


def test_kl_k3_inverted_gradient_is_flagged_neither():
    row = next(r for r in check_estimator(wrong.kl_k3_inverted, "kl")
               if r.name == "grad_direction")
    assert row.value == "neither" and "NEITHER" in row.explanation


# ---------------------------------------------------------------------------------------------
# Claims, report rows, usage errors
# ---------------------------------------------------------------------------------------------


def test_declares_sets_attributes_and_rejects_bad_claims():
    @declares(unbiased=True, grad="kl_ref_policy")
    def f(logp, ref_logp):
        return kl_k3(logp, ref_logp)

    assert f.unbiased is True and f.grad == "kl_ref_policy"
    assert get_claims(f) == {"unbiased": True, "grad": "kl_ref_policy"}
    with pytest.raises(EstimatorUsageError):
        declares(grad="forward")
    with pytest.raises(EstimatorUsageError):
        declares(fast=True)
    with pytest.raises(EstimatorUsageError):
        declares(unbiased="yes")


def test_parse_expect():
    assert parse_expect("unbiased, nonnegative,grad=kl_policy_ref,bessel=false") == {
        "unbiased": True, "nonnegative": True, "grad": "kl_policy_ref", "bessel": False}
    assert parse_expect("") == {}
    for bad in ("grad", "grad=up", "speed", "bessel=maybe"):
        with pytest.raises(EstimatorUsageError):
            parse_expect(bad)


def test_unclaimed_properties_are_info_rows_with_measurements():
    def plain_k3(logp, ref_logp):
        return kl_k3(logp, ref_logp)

    rows = {r.name: r for r in check_estimator(plain_k3, "kl")}
    for name in ("nonnegative", "unbiased", "grad_direction", "variance_vs_k1"):
        assert rows[name].kind == "info" and rows[name].passed is None
    assert rows["grad_direction"].value == "kl_ref_policy"
    assert rows["unbiased"].value < Z_BOUND


def test_claims_argument_overrides_decorator():
    rows = check_estimator(BUILTINS["k3"], "kl", claims={"grad": "kl_policy_ref"})
    failed = {r.name for r in rows if r.failed}
    assert failed == {"grad_direction"}
    with pytest.raises(EstimatorUsageError):  # an advantage claim on a KL estimator
        check_estimator(BUILTINS["k3"], "kl", claims={"bessel": True})


def test_report_rows_have_the_structure():
    rows = check_estimator(BUILTINS["k3_is"], "kl") + check_estimator(
        BUILTINS["group_advantages"], "advantage") + check_estimator(
        BUILTINS["discounted_returns"], "returns")
    for r in rows:
        assert isinstance(r, CheckResult)
        assert isinstance(r.name, str) and r.name
        assert r.kind in ROW_KINDS
        assert (r.passed is None) == (r.kind == "info")
        assert r.status in ("PASS", "FAIL", "info")
        assert isinstance(r.explanation, str) and r.explanation and "\n" not in r.explanation
        d = json.loads(json.dumps(r.to_dict()))
        assert set(d) >= {"name", "passed", "value", "bound", "explanation", "kind", "status"}
    names = [r.name for r in check_estimator(BUILTINS["k3"], "kl")]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError):
        CheckResult("x", None, 0, 0, "info row with the wrong kind", "required")
    table = format_table(rows[:3])
    assert table.splitlines()[0].split()[:5] == ["check", "status", "value", "bound",
                                                 "explanation"]
    assert table.splitlines()[-1].startswith("result: PASS")


def test_usage_errors_raise():
    with pytest.raises(EstimatorUsageError, match="not callable"):
        check_estimator(42, "kl")
    with pytest.raises(EstimatorUsageError, match="wrong signature"):
        check_estimator(wrong.kl_wrong_signature, "kl")
    with pytest.raises(EstimatorUsageError, match="basic call raised RuntimeError"):
        check_estimator(wrong.returns_raises, "returns")
    with pytest.raises(EstimatorUsageError, match="kind"):
        check_estimator(BUILTINS["k3"], "policy")
    assert set(KINDS) == set(BUILTIN_KINDS.values())


def test_estimator_raising_inside_a_check_gives_a_failed_row():
    def fragile(scores):
        if scores.shape[-1] == 1:
            raise ValueError("need two samples")
        if scores.abs().max() > 1e20:
            raise OverflowError("too large")
        return BUILTINS["group_advantages"](scores)

    rows = {r.name: r for r in check_estimator(fragile, "advantage")}
    row = rows["group_size_one"]  # the row catches it itself and names it
    assert row.failed and "raised ValueError: need two samples" in row.explanation
    row = rows["extreme_magnitudes"]  # any other row: the generic catch
    assert row.failed and row.value == "raised" and "OverflowError: too large" in row.explanation
    # declared unsupported, refusing groups of one is the declared convention
    rows = check_estimator(fragile, "advantage", claims={"singleton": "unsupported"})
    assert next(r for r in rows if r.name == "group_size_one").passed


def test_oracle_row_is_info_when_reference_is_unavailable(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "reference.grpo_math", None)  # import now fails
    row = next(r for r in check_estimator(BUILTINS["discounted_returns"], "returns")
               if r.name == "oracle")
    assert row.kind == "info" and row.passed is None and "not importable" in row.explanation


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def test_kl_plot_writes_a_png(tmp_path):
    from matplotlib.image import imread

    from grpo_harness.kl_plot import plot_kl_estimators

    path = tmp_path / "kl_estimators.png"
    data = plot_kl_estimators(path, distances=[0.0, 0.5, 1.0, 2.0])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).ndim == 3
    assert data["true_kl"][0] == 0.0 and data["true_kl"] == sorted(data["true_kl"])
    assert all(abs(b) < 1e-12 for b in data["k1"]["bias"] + data["k3"]["bias"])
    assert data["k2"]["bias"][-1] > 0.1  # k2 is biased away from the reference
    assert all(math.isfinite(s) for n in ("k1", "k2", "k3") for s in data[n]["std"])
    json.dumps(data)


# ---------------------------------------------------------------------------------------------
# The kit's modules import one way (no import circle, not even inside functions)
# ---------------------------------------------------------------------------------------------


def _kit_imports() -> dict[str, set[str]]:
    """For each module of grpo_core/testing, the kit modules it imports anywhere in its code."""
    folder = Path(grpo_core.testing.__file__).parent
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1 and mod in names:  # from .x import ...
                    found.add(mod)
                elif node.level == 1 and not mod:  # from . import x
                    found |= {a.name for a in node.names if a.name in names}
                elif mod.startswith("grpo_core.testing."):
                    found.add(mod.split(".")[2])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[2] for a in node.names
                          if a.name.startswith("grpo_core.testing.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_kit_modules_import_one_way():
    graph = _kit_imports()
    assert graph["base"] == set()
    assert "checks" not in graph["adv_checks"] | graph["loss_checks"]
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            assert state.get(dep) != "open", f"import circle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
