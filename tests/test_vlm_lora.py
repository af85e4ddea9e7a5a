"""LoRA policy + LoRA reference on one base model (adapters.vlm_lora): refreshes, shared base
weights, the trainer, the merged export and ``train vlm --lora-rank``. Needs peft."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from adapters.vlm_lora import LoRAReference, LoRAVLMAdapter, adapter_tensors  # noqa: E402
from adapters.vlm_preflight import failed_names, format_preflight, run_preflight  # noqa: E402
from adapters.vlm_tasks import colours_dataset  # noqa: E402
from adapters.vlm_tiny import load_vlm  # noqa: E402
from grpo_core.config import GRPOConfig  # noqa: E402
from grpo_core.loop import GRPOTrainer  # noqa: E402
from grpo_harness.train_vlm import main  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, add_eos_bias, tiny_dirs  # noqa: E402,F401  (fixtures)
from .test_vlm_preflight import varied_reward  # noqa: E402

CFG = GRPOConfig(group_size=4, groups_per_iteration=2, gamma=1.0, grpo_epochs=2, minibatches=2, beta=0.04,
                 update_ref_model_freq=1, stats_over="sequences", lr=5e-2, seed=0)
RANK = 4


def q_proj(model):
    return model.model.language_model.layers[0].self_attn.q_proj


def make(tiny_dirs, family="qwen2_5_vl", **kw):
    model, processor = load_vlm(tiny_dirs[family])
    add_eos_bias(model, processor.tokenizer.eos_token_id)
    kw.setdefault("max_new_tokens", 5)
    return LoRAVLMAdapter(model, processor, colours_dataset(8), [varied_reward], lora_rank=RANK, **kw)


@torch.no_grad()
def nudge_policy_adapter(ad, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in adapter_tensors(ad.policy, "policy").values():
        p.add_(scale * torch.randn(p.shape, generator=gen))


def logps(ad, model, rollout):
    with torch.no_grad():
        lp, _ = ad.logp_and_entropy(model, rollout, torch.arange(rollout.mask.shape[0]))
    return lp


def test_hard_refresh_makes_reference_logprobs_equal_policy_logprobs(tiny_dirs):
    ad = make(tiny_dirs)
    ref = ad.make_reference()
    assert isinstance(ref, LoRAReference)
    ro = ad.collect(num_groups=2, group_size=4, iteration=0)
    assert torch.equal(logps(ad, ad.policy, ro), logps(ad, ref, ro))  # made as a copy
    nudge_policy_adapter(ad)
    pol = logps(ad, ad.policy, ro)
    valid = ro.mask.bool()
    assert (pol - logps(ad, ref, ro))[valid].abs().max() > 1e-3  # now they differ
    ad.refresh_reference(ref, CFG)  # hard
    assert torch.equal(pol, logps(ad, ref, ro))
    for _, a, b in ad.reference_pairs(ref):
        assert torch.equal(a, b)
    # switching back: the policy adapter is active and trainable again, the reference frozen
    assert torch.equal(pol, logps(ad, ad.policy, ro))
    assert all(p.requires_grad for p in adapter_tensors(ad.policy, "policy").values())
    assert not any(p.requires_grad for p in ref.tensors().values())


def test_base_weights_are_shared_not_copied(tiny_dirs):
    model, processor = load_vlm(tiny_dirs["qwen2_5_vl"])
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    n_base = sum(p.numel() for p in model.parameters())
    q_ptr = q_proj(model).weight.data_ptr()
    ad = LoRAVLMAdapter(model, processor, colours_dataset(8), [varied_reward], lora_rank=RANK, max_new_tokens=3)
    ref = ad.make_reference()
    layer = q_proj(ad.policy)
    assert layer.base_layer.weight.data_ptr() == q_ptr  # wrapped in place, not copied
    # every base tensor still exists exactly once; the only new tensors are the two adapters
    params = dict(ad.policy.named_parameters())
    ptrs = [p.data_ptr() for p in params.values()]
    assert len(ptrs) == len(set(ptrs))
    assert sorted(p.data_ptr() for n, p in params.items() if ".lora_" not in n) == sorted(base_ptrs.values())
    n_pol = sum(p.numel() for p in adapter_tensors(ad.policy, "policy").values())
    n_ref = sum(p.numel() for p in ref.tensors().values())
    assert n_pol == n_ref > 0 and sum(p.numel() for p in ad.policy.parameters()) == n_base + n_pol + n_ref
    assert all(".lora_" in k for k in ref.state_dict()) and list(ref.parameters()) == []
    # the reference forward runs on the very same base weight storage as the policy forward
    seen = []
    hook = layer.base_layer.register_forward_hook(lambda m, a, o: seen.append(m.weight.data_ptr()))
    ro = ad.collect(num_groups=1, group_size=2, iteration=0)
    seen.clear()
    logps(ad, ad.policy, ro)
    logps(ad, ref, ro)
    hook.remove()
    assert len(seen) == 2 and set(seen) == {q_ptr}


def test_soft_refresh_mixes_adapter_weights(tiny_dirs):
    ad = make(tiny_dirs)
    ref = ad.make_reference()
    nudge_policy_adapter(ad, seed=1)
    old = {k: v.clone() for k, v in ref.state_dict().items()}
    pol = {k: a.detach().clone() for k, a, _ in ad.reference_pairs(ref)}
    alpha = 0.6
    ad.refresh_reference(ref, CFG.replace(ref_update="soft", ref_mix_alpha=alpha))
    new = ref.state_dict()
    moved = 0
    for k in old:
        want = alpha * pol[k] + (1 - alpha) * old[k]
        assert torch.allclose(new[k], want, atol=1e-7), k
        moved += not torch.equal(new[k], old[k])
    assert moved > 0
    ad.refresh_reference(ref, CFG.replace(ref_update="soft", ref_mix_alpha=0.0))  # alpha 0: no change
    assert all(torch.equal(ref.state_dict()[k], new[k]) for k in new)


def test_short_training_run_is_finite_and_trains_only_the_policy_adapter(tiny_dirs):
    ad = make(tiny_dirs)
    tr = GRPOTrainer(ad, CFG)
    assert isinstance(tr.reference, LoRAReference)
    policy_ids = {id(p) for p in adapter_tensors(ad.policy, "policy").values()}
    assert {id(p) for p in tr.params} == policy_ids
    base = {n: p.detach().clone() for n, p in ad.policy.named_parameters() if ".lora_" not in n}
    start = {k: v.detach().clone() for k, v in adapter_tensors(ad.policy, "policy").items()}
    rows = run_preflight(tr)
    assert failed_names(rows) == [], format_preflight(rows)
    kls = []
    for _ in range(2):
        stats = tr.step()
        assert all(math.isfinite(v) for v in stats.values()), stats
        kls.append(stats["kl"])
    assert stats["kl_start"] == 0.0 and max(kls) > 0  # freq 1: KL 0 at the refresh, > 0 after a step
    assert all(torch.equal(base[n], p) for n, p in ad.policy.named_parameters() if ".lora_" not in n)
    assert any(not torch.equal(start[k], v) for k, v in adapter_tensors(ad.policy, "policy").items())
    # the reference round-trips through the trainer's checkpoint
    state = tr.state_dict()
    assert set(state["reference"]) == set(tr.reference.state_dict()) and len(state["reference"]) > 0
    with torch.no_grad():
        for p in tr.reference.tensors().values():
            p.zero_()
    tr.load_state_dict(state)
    assert all(torch.equal(state["reference"][k], v) for k, v in tr.reference.state_dict().items())


def test_merged_export_matches_the_lora_policy(tiny_dirs, tmp_path):
    from transformers import AutoModelForImageTextToText

    ad = make(tiny_dirs)
    nudge_policy_adapter(ad, seed=2)
    ro = ad.collect(num_groups=1, group_size=4, iteration=0)
    want = logps(ad, ad.policy, ro)
    ad.save_merged(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged")).eval()
    add_eos_bias(merged, ad.eos_id)
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    got = logps(ad, merged, ro)
    valid = ro.mask.bool()
    assert (got - want)[valid].abs().max() < 1e-5


def test_train_vlm_lora_rank(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(out), "--threads", "1",
            "--num-prompts", "8", "--eval-size", "4", "--set", "group_size=4", "--set", "groups_per_iteration=2",
            "--set", "beta=0.04", "--set", "update_ref_model_freq=1", "--lora-rank", str(RANK)]
    assert main([*args, "--max-iterations", "1"]) == 0
    assert "result: PASS" in capsys.readouterr().out
    assert main(["--out", str(out), "--resume", "--max-iterations", "2", "--threads", "1"]) == 0  # rank from config
    model, _ = load_vlm(out / "final")  # a plain checkpoint, the policy adapter merged in
    assert not any(".lora_" in k for k in model.state_dict())
    assert main(["--task", "colours", "--out", str(tmp_path / "neg"), "--lora-rank", "-1"]) == 2
    assert "--lora-rank" in capsys.readouterr().err


def test_lora_initialisation_is_seeded_by_the_adapter(tiny_dirs):
    """Two adapters built with the same seed start with the same LoRA weights, whatever the
    global random stream did in between; another seed gives others."""
    from adapters.vlm_lora import adapter_tensors

    def init(seed):
        torch.manual_seed(1000 + seed * 7)  # disturb the global stream differently each time
        ad = make(tiny_dirs, seed=seed)
        return {k: v.detach().clone() for k, v in adapter_tensors(ad.peft.get_base_model(), "policy").items()}

    a, b, c = init(0), init(0), init(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
