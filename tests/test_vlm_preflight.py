"""Preflight (adapters.vlm_preflight): passes on the tiny models, leaves the trainer as it was,
and each check fails on a setup broken in the way it exists to catch; ``train vlm`` refuses to
train on a failure unless ``--skip-preflight``."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm import VLMAdapter  # noqa: E402
from adapters.vlm_preflight import (  # noqa: E402
    CHECKS,
    FINITE,
    KIT_ADV,
    KIT_KL,
    KL_GRAD,
    LOGPROB,
    LOGPROB_BOUNDS,
    REFRESH,
    PreflightError,
    failed_names,
    format_preflight,
    require_preflight,
    run_preflight,
)
from adapters.vlm_tasks import colours_dataset  # noqa: E402
from adapters.vlm_tiny import load_vlm  # noqa: E402
from grpo_core import losses  # noqa: E402
from grpo_core.config import GRPOConfig  # noqa: E402
from grpo_core.loop import GRPOTrainer  # noqa: E402
from grpo_core.refmodel import hard_refresh  # noqa: E402
from grpo_core.testing import kit  # noqa: E402
from grpo_harness.train_vlm import main  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, add_eos_bias, tiny_dirs  # noqa: E402,F401  (fixtures)
from .wrong_estimators import adv_leak_across_groups, kl_wrong_sign  # noqa: E402

CFG = GRPOConfig(group_size=4, groups_per_iteration=2, gamma=1.0, grpo_epochs=1, beta=0.04,
                 update_ref_model_freq=1, stats_over="sequences", lr=1e-2, seed=0)


def varied_reward(prompts, completions, **kw):
    """Different values within groups, so that the advantages and the loss are not all 0."""
    return [0.1 * len(c.split()) + 0.05 * (i % 3) for i, c in enumerate(completions)]


def make_trainer(tiny_dirs, family="qwen2_5_vl", *, cls=VLMAdapter, dtype=torch.float32, cfg=CFG, **kw):
    model, processor = load_vlm(tiny_dirs[family], dtype=dtype)
    add_eos_bias(model, processor.tokenizer.eos_token_id)  # ragged completion lengths
    kw.setdefault("max_new_tokens", 5)
    adapter = cls(model, processor, colours_dataset(8), [varied_reward], **kw)
    return GRPOTrainer(adapter, cfg)


def by_name(rows):
    return {r.name: r for r in rows}


# --- passes, and changes nothing ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_preflight_passes_on_the_tiny_model(tiny_dirs, family):
    tr = make_trainer(tiny_dirs, family)
    rows = run_preflight(tr)
    assert [r.name for r in rows] == list(CHECKS)
    assert failed_names(rows) == [], format_preflight(rows)
    assert all(r.passed for r in rows)
    row = by_name(rows)
    assert row[LOGPROB].details["statistic"] == "max" and row[LOGPROB].value < 1e-5
    assert row[REFRESH].value == 0.0
    assert row[FINITE].details["grad_norm"] > 0  # varied rewards: a real, non-zero loss gradient
    assert row[KL_GRAD].value > 0
    assert require_preflight(rows) == rows
    table = format_preflight(rows)
    assert "result: PASS" in table and all(name in table for name in CHECKS)


def test_preflight_leaves_the_trainer_as_it_was(tiny_dirs):
    """Same first iteration with and without a preflight before it; no .grad written."""
    plain, checked = make_trainer(tiny_dirs), make_trainer(tiny_dirs)
    run_preflight(checked)
    assert all(p.grad is None for p in checked.policy.parameters())
    assert checked.iteration == 0
    a, b = plain.step(), checked.step()
    assert a == b


def test_preflight_bf16_uses_the_mean_bound(tiny_dirs):
    tr = make_trainer(tiny_dirs, dtype=torch.bfloat16)
    rows = run_preflight(tr, checks=(LOGPROB, FINITE))
    assert failed_names(rows) == [], format_preflight(rows)
    row = by_name(rows)[LOGPROB]
    assert (row.details["statistic"], row.bound) == LOGPROB_BOUNDS[torch.bfloat16] == ("mean", 0.05)
    assert "bfloat16" in row.explanation and math.isfinite(row.details["max"])


def test_beta_zero_skips_reference_and_kl_rows(tiny_dirs):
    tr = make_trainer(tiny_dirs, cfg=CFG.replace(beta=0.0))
    assert tr.reference is None
    row = by_name(run_preflight(tr))
    assert row[REFRESH].passed is None and row[KL_GRAD].passed is None
    assert row[FINITE].passed and row[LOGPROB].passed


def test_adapter_without_trainer(tiny_dirs):
    ad = make_trainer(tiny_dirs, cfg=CFG.replace(beta=0.0)).adapter
    rows = run_preflight(ad, CFG, checks=(REFRESH, KL_GRAD))  # makes its own reference (beta > 0)
    assert [r.name for r in rows] == [REFRESH, KL_GRAD] and failed_names(rows) == []
    with pytest.raises(ValueError, match="config is required"):
        run_preflight(ad)
    with pytest.raises(ValueError, match="unknown preflight check"):
        run_preflight(ad, CFG, checks=("nope",))


# --- each check fails on what it is there to catch -----------------------------------------------

class NoMMExtension(VLMAdapter):
    """Forwards without mm_token_type_ids over the completion (the Qwen2.5-VL M-RoPE bug)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, extend_mm_token_type_ids=False, **kw)


def test_a_fails_without_mm_token_type_ids_extension_on_qwen2_5_vl(tiny_dirs):
    rows = run_preflight(make_trainer(tiny_dirs, "qwen2_5_vl", cls=NoMMExtension))
    assert failed_names(rows) == [LOGPROB], format_preflight(rows)
    row = by_name(rows)[LOGPROB]
    assert row.value > 1e-4 and "positions" in row.explanation
    with pytest.raises(PreflightError, match=LOGPROB):
        require_preflight(rows)


def test_a_fails_when_qwen2_vl_raises(tiny_dirs):
    """Qwen2-VL raises in the rollout's own forward: one failed ``rollout`` row naming the
    error, the checks that need a rollout skipped (not four unrelated failures)."""
    rows = run_preflight(make_trainer(tiny_dirs, "qwen2_vl", cls=NoMMExtension), checks=(LOGPROB,))
    assert failed_names(rows) == ["rollout"]
    assert "ValueError" in rows[0].explanation and "mm_token_type_ids" in rows[0].explanation
    assert by_name(rows)[LOGPROB].passed is None


class PerturbingRefresh(VLMAdapter):
    """A refresh that copies the policy, then moves one reference tensor."""

    def refresh_reference(self, reference, config):
        hard_refresh(reference, self.policy)
        with torch.no_grad():  # the EOS row: a sampleable token (a suppressed one is masked)
            reference.lm_head.weight[self.eos_id, 0] += 1e-3


def test_b_fails_on_a_reference_perturbed_after_refresh(tiny_dirs):
    rows = run_preflight(make_trainer(tiny_dirs, cls=PerturbingRefresh))
    assert failed_names(rows) == [REFRESH], format_preflight(rows)
    row = by_name(rows)[REFRESH]
    assert row.details["tensor_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert row.details["logp_diff"] > 0 and "lm_head.weight" in row.explanation


def test_b_restores_a_reference_that_differed(tiny_dirs):
    """On a resumed run the reference may legitimately differ from the policy: the check
    refreshes it, then puts it back."""
    tr = make_trainer(tiny_dirs)
    with torch.no_grad():
        tr.reference.lm_head.weight.add_(0.01)
    before = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    row = by_name(run_preflight(tr, checks=(REFRESH,)))[REFRESH]
    assert row.passed and "restored" in row.explanation
    after = tr.reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class NaNEntropy(VLMAdapter):
    """Entropy with one NaN on a valid token of the training forward (e.g. an overflow)."""

    def logp_and_entropy(self, model, rollout, rows):
        logp, ent = super().logp_and_entropy(model, rollout, rows)
        if torch.is_grad_enabled():
            ent = ent.clone()
            ent[0, 0] = float("nan")
        return logp, ent


def test_c_fails_on_nan(tiny_dirs):
    rows = run_preflight(make_trainer(tiny_dirs, cls=NaNEntropy, cfg=CFG.replace(ent_coef=0.01)))
    assert failed_names(rows) == [FINITE], format_preflight(rows)
    assert math.isnan(by_name(rows)[FINITE].value)


def test_d_fails_on_a_detached_kl(tiny_dirs, monkeypatch):
    real = losses.kl_estimate
    monkeypatch.setattr(losses, "kl_estimate",
                        lambda name, logp, ref, old=None: real(name, logp.detach(), ref, old))
    rows = run_preflight(make_trainer(tiny_dirs))
    assert failed_names(rows) == [KL_GRAD], format_preflight(rows)
    row = by_name(rows)[KL_GRAD]
    assert row.value == 0.0 and "detached" in row.explanation


def test_e_fails_on_a_wrong_builtin(tiny_dirs, monkeypatch):
    monkeypatch.setitem(kit.BUILTINS, "k3", kl_wrong_sign)
    monkeypatch.setitem(kit.BUILTINS, "group_advantages", adv_leak_across_groups)
    rows = run_preflight(make_trainer(tiny_dirs), checks=(KIT_KL, KIT_ADV))
    assert failed_names(rows) == [KIT_KL, KIT_ADV]
    assert "failed:" in rows[0].explanation and rows[0].details["failed"]


# --- train vlm -----------------------------------------------------------------------------------

def cli(tiny_dirs, out, *extra):
    return ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(out), "--threads", "1",
            "--num-prompts", "8", "--eval-size", "4", "--max-iterations", "1", "--set", "group_size=4",
            "--set", "groups_per_iteration=2", "--set", "beta=0.04", "--set", "update_ref_model_freq=1", *extra]


def test_train_vlm_refuses_on_a_failed_preflight_unless_skipped(tiny_dirs, tmp_path, monkeypatch, capsys):
    ok = tmp_path / "ok"
    assert main(cli(tiny_dirs, ok)) == 0
    assert "result: PASS" in capsys.readouterr().out
    real = losses.kl_estimate
    monkeypatch.setattr(losses, "kl_estimate",
                        lambda name, logp, ref, old=None: real(name, logp.detach(), ref, old))
    out = tmp_path / "bad"
    assert main(cli(tiny_dirs, out)) == 1
    cap = capsys.readouterr()
    assert "FAIL" in cap.out and "preflight failed: kl_gradient" in cap.err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()
    assert main(cli(tiny_dirs, out, "--skip-preflight")) == 0  # the same folder: nothing was written
    cap = capsys.readouterr()
    assert "preflight skipped" in cap.err and "check " not in cap.out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "config.json").read_text())["grpo"]["beta"] == 0.04


def _with_attention_dropout(trainer, p=0.3):
    """Attention dropout p in every attention module, and gradient checkpointing, whose
    grad-mode forward runs in train mode: the review's repro of a random training forward."""
    from adapters.vlm import enable_checkpointing

    names = []
    for name, module in trainer.policy.named_modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            names.append(name)
    assert names, "the tiny model has attention modules with attention_dropout"
    enable_checkpointing(trainer.policy)
    return names


def test_deterministic_forward_passes_on_the_tiny_models(tiny_dirs):
    for family in ("qwen2_vl", "qwen2_5_vl"):
        row = by_name(run_preflight(make_trainer(tiny_dirs, family), checks=("deterministic_forward",)))[
            "deterministic_forward"]
        assert row.passed and row.value == 0.0, row.explanation


def test_deterministic_forward_fails_on_dropout_naming_the_module(tiny_dirs):
    tr = make_trainer(tiny_dirs, "qwen2_vl")
    names = _with_attention_dropout(tr)
    row = by_name(run_preflight(tr, checks=("deterministic_forward",)))["deterministic_forward"]
    assert row.failed and names[0] in row.explanation and "p=0.3" in row.explanation
    assert row.value > 1e-3  # the two forwards really differ


def test_loop_refuses_the_old_logp_shortcut_with_dropout(tiny_dirs):
    """One epoch, one minibatch, old log-probs left to the loop: the loop stops at the first
    update naming the attention module, instead of training with a ratio forced to 1."""
    from grpo_core.determinism import StochasticForwardError

    cfg = CFG.replace(beta=0.0, update_ref_model_freq=0)
    tr = make_trainer(tiny_dirs, "qwen2_vl", cfg=cfg, old_logp_forward=False)
    names = _with_attention_dropout(tr)
    with pytest.raises(StochasticForwardError, match=names[0].replace(".", r"\.")):
        tr.step()


class FullVocabularyLogp(VLMAdapter):
    """The convention before the correctness pass: training log-probs over the full vocabulary
    while sampling suppresses the special tokens."""

    def forward_logp(self, model, rollout, rows, *, want_entropy=True):
        saved, self.suppress_ids = self.suppress_ids, []
        try:
            return super().forward_logp(model, rollout, rows, want_entropy=want_entropy)
        finally:
            self.suppress_ids = saved


def test_a_fails_when_training_logp_is_not_the_sampled_distribution(tiny_dirs):
    """logprob_consistency compares with generate's processed scores: a training forward that
    leaves the suppressed ids in the softmax is caught before training."""
    rows = run_preflight(make_trainer(tiny_dirs, "qwen2_vl", cls=FullVocabularyLogp), checks=(LOGPROB,))
    assert failed_names(rows) == [LOGPROB], format_preflight(rows)
    assert by_name(rows)[LOGPROB].value > 1e-2


class PerTokenRewards(VLMAdapter):
    """Process supervision: each completion's reward spread over its tokens, every valid
    token scored (Rollout.scored)."""

    def collect(self, **kw):
        ro = super().collect(**kw)
        m = ro.mask.bool()
        total = ro.rewards.sum(1, keepdim=True)
        ro.rewards = torch.where(m, total / m.sum(1, keepdim=True).clamp(min=1), torch.zeros_like(ro.rewards))
        ro.scored = m
        return ro


def test_finite_loss_reads_the_scored_steps(tiny_dirs):
    """The preflight computes advantages as the loop does, Rollout.scored included."""
    rows = run_preflight(make_trainer(tiny_dirs, "qwen2_vl", cls=PerTokenRewards), checks=(FINITE,))
    assert failed_names(rows) == [], format_preflight(rows)
