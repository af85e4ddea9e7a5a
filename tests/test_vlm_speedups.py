"""The VLM adapter's two speed-ups (``VLMAdapter(encode_once=True)``, the default) change
nothing but the work done:

- sampling on the B prompts with ``num_return_sequences=G`` draws the same tokens, with the same
  processed scores, as sampling on the prompts repeated G times;
- the training forward that runs the vision tower once per prompt and takes the M-RoPE
  positions computed once per rollout gives the same log-probs and entropies (bit for bit on
  CPU in float32) and the same gradients as the model's own forward over repeated inputs;
- the preflight's ``logprob_consistency`` compares against that new path, and fails on the
  mistakes the new path could make (positions without M-RoPE, images paired with the wrong rows).

The independent side of each comparison is the plain path (``encode_once=False``): transformers'
own image encoding and ``get_rope_index`` over each whole row, and generate's processed scores.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm import VLMAdapter, enable_checkpointing, logprob_consistency  # noqa: E402
from adapters.vlm_preflight import LOGPROB, failed_names, format_preflight, run_preflight  # noqa: E402

from .test_vlm import (  # noqa: E402,F401  (fixtures)
    FAMILIES,
    _one_thread,
    _quiet_transformers,
    make_adapter,
    mixed_dataset,
    tiny_dirs,
)
from .test_vlm_preflight import CFG, make_trainer  # noqa: E402


def _pair(tiny_dirs, family, **kw):
    """The fast and the plain adapter on one set of weights (two loads of one checkpoint)."""
    kw.setdefault("dataset", mixed_dataset())  # left padding, and a prompt with two images
    fast = make_adapter(tiny_dirs, family, encode_once=True, **kw)
    plain = make_adapter(tiny_dirs, family, encode_once=False, **kw)
    return fast, plain


def _logp_ent_grads(adapter, rollout):
    adapter.policy.zero_grad(set_to_none=True)
    rows = torch.arange(rollout.mask.shape[0])
    logp, ent = adapter.logp_and_entropy(adapter.policy, rollout, rows)
    valid = rollout.mask.bool()
    (logp[valid].sum() + 0.1 * ent[valid].sum()).backward()
    grads = {n: p.grad.clone() for n, p in adapter.policy.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_on_b_prompts_draws_the_same_tokens(tiny_dirs, family):
    fast, plain = _pair(tiny_dirs, family, record_generation_logp=True, temperature=0.9)
    for it in (0, 1):
        a = fast.collect(num_groups=4, group_size=3, iteration=it)
        b = plain.collect(num_groups=4, group_size=3, iteration=it)
        assert torch.equal(a.inputs["completion_ids"], b.inputs["completion_ids"])
        assert torch.equal(a.inputs["completion_attn"], b.inputs["completion_attn"])
        assert torch.equal(a.inputs["gen_sample_logp"], b.inputs["gen_sample_logp"])
        assert torch.equal(a.rewards, b.rewards) and torch.equal(a.old_logp, b.old_logp)


@pytest.mark.parametrize("family", FAMILIES)
def test_encoded_forward_gives_the_same_logp_entropy_and_gradients(tiny_dirs, family):
    fast, plain = _pair(tiny_dirs, family, temperature=0.9)
    rollout = fast.collect(num_groups=4, group_size=3, iteration=0)
    assert rollout.inputs["prompt_positions"].shape[:2] == (3, 4)  # once per prompt, not per row
    lf, ef, gf = _logp_ent_grads(fast, rollout)
    lp, ep, gp = _logp_ent_grads(plain, rollout)
    valid = rollout.mask.bool()
    torch.testing.assert_close(lf[valid], lp[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(ef[valid], ep[valid], rtol=0, atol=1e-6)
    assert gf.keys() == gp.keys() and any("visual" in k for k in gf)  # the vision tower learns too
    for name in gp:  # features reused by G rows: their gradients summed in another order
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-4, atol=1e-7)


def test_encoded_forward_with_checkpointing_and_small_blocks(tiny_dirs):
    """Blocks that split a prompt's completions (forward_batch 5 over groups of 3) and the
    train-mode forward of gradient checkpointing take the same path."""
    fast, plain = _pair(tiny_dirs, "qwen2_5_vl", forward_batch=5)
    enable_checkpointing(fast.policy)
    rollout = fast.collect(num_groups=4, group_size=3, iteration=1)
    lf, _, gf = _logp_ent_grads(fast, rollout)
    lp, _, gp = _logp_ent_grads(plain, rollout)
    valid = rollout.mask.bool()
    torch.testing.assert_close(lf[valid], lp[valid], rtol=0, atol=1e-6)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-4, atol=1e-7)


def test_vision_tower_runs_on_each_prompt_once(tiny_dirs):
    """What the speed-up is: per rollout and per training forward, the vision tower sees the
    patches of the B prompts' images, not of B * G copies."""
    seen = []
    for encode_once in (True, False):
        ad = make_adapter(tiny_dirs, encode_once=encode_once, old_logp_forward=False)
        rows = []
        ad.policy.model.visual.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
        ro = ad.collect(num_groups=2, group_size=4, iteration=0)
        ad.logp_and_entropy(ad.policy, ro, torch.arange(8))
        seen.append(rows)
    patches = 2 * 16  # two 56x56 images of 16 patches
    assert seen[0] == [patches, patches]
    assert seen[1] == [4 * patches, 4 * patches]


def test_lora_reference_and_policy_take_the_encoded_path(tiny_dirs):
    pytest.importorskip("peft")
    from adapters.vlm_lora import LoRAVLMAdapter
    from adapters.vlm_tiny import load_vlm
    from adapters.vlm_tasks import colours_dataset, first_word_reward

    out = []
    for encode_once in (True, False):
        model, processor = load_vlm(tiny_dirs["qwen2_vl"])
        ad = LoRAVLMAdapter(model, processor, colours_dataset(8), [first_word_reward], lora_rank=2,
                            max_new_tokens=4, encode_once=encode_once)
        ref = ad.make_reference()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a reference that differs from the policy, equal in both runs
            for _, p in sorted(ref.tensors().items()):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        ro = ad.collect(num_groups=2, group_size=2, iteration=0)
        pol, _ = ad.forward_logp(ad.policy, ro, torch.arange(4))
        rlp, _ = ad.forward_logp(ref, ro, torch.arange(4))
        out.append((ro.inputs["completion_ids"], pol.detach(), rlp))
    (ids_f, pol_f, ref_f), (ids_p, pol_p, ref_p) = out
    assert torch.equal(ids_f, ids_p)
    torch.testing.assert_close(pol_f, pol_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref_f, ref_p, rtol=0, atol=1e-6)
    assert (ref_f - pol_f).abs().max() > 1e-4  # the reference adapter was active


# --- the preflight covers the new path ----------------------------------------------------------

class TextPositions(VLMAdapter):
    """Broken variant: the encoded forward with plain 1-D positions (M-RoPE forgotten)."""

    def encoded_inputs(self, rollout, rows, features, device=None):
        kw = super().encoded_inputs(rollout, rows, features, device)
        flat = (kw["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        kw["position_ids"] = flat[None].expand(3, -1, -1)
        return kw


class RolledImages(VLMAdapter):
    """Broken variant: each row gets the image features of the next prompt of the block."""

    def encoded_inputs(self, rollout, rows, features, device=None):
        kw = super().encoded_inputs(rollout, rows, features, device)
        feats = kw["mm_encoder_outputs"]["image"].pooler_output
        g = rollout.inputs["group_size"]
        kw["mm_encoder_outputs"]["image"].pooler_output = feats[g:] + feats[:g]
        return kw


@pytest.mark.parametrize("family", FAMILIES)
def test_consistency_passes_on_the_encoded_path(tiny_dirs, family):
    ad = make_adapter(tiny_dirs, family, record_generation_logp=True, dataset=mixed_dataset())
    ro = ad.collect(num_groups=4, group_size=2, iteration=0)
    assert logprob_consistency(ad, ro) < 1e-5
    rows = run_preflight(make_trainer(tiny_dirs, family), checks=(LOGPROB,))
    assert failed_names(rows) == [] and rows[0].passed, format_preflight(rows)


@pytest.mark.parametrize("broken", [TextPositions, RolledImages])
def test_preflight_rejects_a_broken_encoded_path(tiny_dirs, broken):
    rows = run_preflight(make_trainer(tiny_dirs, "qwen2_vl", cls=broken, cfg=CFG), checks=(LOGPROB,))
    assert failed_names(rows) == [LOGPROB], format_preflight(rows)
    assert rows[0].value > 1e-4
