"""VLM adapter on a tiny random Qwen2-VL / Qwen2.5-VL: build + reload, log-prob consistency,
sampling conventions, masks and rewards.

The models are built offline (adapters.vlm_tiny) into a temporary folder once per family and
loaded back through AutoProcessor / AutoModelForImageTextToText. Everything runs on CPU in a few
seconds; transformers is required (skipped otherwise).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from adapters.vlm import VLMAdapter, logprob_consistency, suppressed_token_ids  # noqa: E402
from adapters.vlm_rewards import compute_rewards  # noqa: E402
from adapters.vlm_tasks import colours_dataset, colours_vocabulary, first_word_reward  # noqa: E402
from adapters.vlm_tiny import build_tiny_vlm, check_processor, load_vlm  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
EOS_BIAS = 3.0  # added to the EOS logit so that a random model ends some completions early


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; with 2 threads on a busy 2-core machine a step
    can take 50x longer (OpenMP threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model per family (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {fam: build_tiny_vlm(root / fam, words=colours_vocabulary(), family=fam, seed=0)
            for fam in FAMILIES}


def add_eos_bias(model, eos_id: int, bias: float = EOS_BIAS) -> None:
    """Raise the EOS logit by ``bias`` everywhere (generation and training alike), via a
    forward hook on the LM head, so that completions of a random model have ragged lengths."""
    def hook(module, args, out):
        out = out.clone()
        out[..., eos_id] += bias
        return out
    model.lm_head.register_forward_hook(hook)


def make_adapter(tiny_dirs, family="qwen2_vl", *, rewards=(first_word_reward,), eos_bias=True,
                 dataset=None, **kw):
    model, processor = load_vlm(tiny_dirs[family])
    if eos_bias:
        add_eos_bias(model, processor.tokenizer.eos_token_id)
    kw.setdefault("max_new_tokens", 6)
    return VLMAdapter(model, processor, dataset or colours_dataset(8), list(rewards), **kw)


def mixed_dataset():
    """Prompts of different lengths (left padding) and a prompt with two images of different
    sizes (pixel_values split by grid products, two image spans in M-RoPE)."""
    ds = colours_dataset(4)
    ds[1]["prompt"] = "colour ?"
    ds[2]["prompt"] = "what is the colour of this image ? is it red or blue or green ?"
    ds[3]["image"] = [ds[3]["image"], colours_dataset(1, seed=3)[0]["image"].resize((84, 56))]
    return ds


# --- build and reload --------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_through_auto_classes(tiny_dirs, family):
    from transformers import AutoProcessor

    model, processor = load_vlm(tiny_dirs[family])
    expected = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family]
    assert type(model).__name__ == expected
    assert type(processor).__name__.startswith("ImageOnly")
    assert type(AutoProcessor.from_pretrained(str(tiny_dirs[family]))) is type(processor)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert not model.config.tie_word_embeddings
    # the reloaded weights are the saved ones: a second load gives identical tensors
    again, _ = load_vlm(tiny_dirs[family])
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    tok = processor.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    enc = processor(images=[colours_dataset(1)[0]["image"]], text=["<|vision_start|><|image_pad|><|vision_end|> red"],
                    return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 -> 16 patches -> 4 merged tokens
    assert enc["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 4
    assert enc["mm_token_type_ids"].sum() == 4


def test_processor_type_check_rejects_a_bare_tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs["qwen2_vl"]))
    with pytest.raises(TypeError, match="text-only"):
        check_processor(tok, "somewhere")
    _, processor = load_vlm(tiny_dirs["qwen2_vl"])
    assert check_processor(processor) is processor


def test_suppressed_tokens_are_all_specials_but_eos(tiny_dirs):
    model, processor = load_vlm(tiny_dirs["qwen2_vl"])
    tok = processor.tokenizer
    ids = suppressed_token_ids(tok, model.config)
    assert tok.eos_token_id not in ids
    for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|endoftext|>", "<|im_start|>", "<unk>"):
        assert tok.convert_tokens_to_ids(t) in ids, t
    assert tok.convert_tokens_to_ids("red") not in ids


# --- log-prob consistency ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logprob_consistency(tiny_dirs, family):
    ad = make_adapter(tiny_dirs, family, record_generation_logp=True, temperature=0.9,
                      dataset=mixed_dataset())
    ro = ad.collect(num_groups=4, group_size=2, iteration=0)
    assert len(set(ro.inputs["prompt_attn"].sum(1).tolist())) == 4  # padded prompts
    assert sorted(len(g) for g in ro.inputs["grids"]) == [1, 1, 1, 2]  # one prompt has 2 images
    assert logprob_consistency(ad, ro) < 1e-4
    # old log-probs are the training forward's, at rollout time, of the distribution sampled
    # from (suppressed ids masked), not of the full vocabulary (the convention before the
    # correctness pass, which gave the ratio and the KL tokens from another distribution)
    valid = ro.inputs["completion_attn"].bool()
    assert torch.allclose(ro.old_logp[valid], ro.inputs["gen_sample_logp"][valid], atol=1e-4)
    full_vocab_gap = (ro.old_logp - ro.inputs["gen_logp"])[valid].abs().max()
    assert full_vocab_gap > 1e-2, "the suppressed ids carry mass on the tiny model: the test can tell"


def test_unextended_mm_token_type_ids_silently_break_qwen2_5_vl(tiny_dirs):
    ad = make_adapter(tiny_dirs, "qwen2_5_vl", record_generation_logp=True)
    ro = ad.collect(num_groups=2, group_size=4, iteration=0)
    assert logprob_consistency(ad, ro) < 1e-4
    ad.extend_mm_token_type_ids = False
    diff = logprob_consistency(ad, ro)  # no error raised: the positions are silently wrong
    assert diff > 1e-4, diff


def test_unextended_mm_token_type_ids_raise_on_qwen2_vl(tiny_dirs):
    ad = make_adapter(tiny_dirs, "qwen2_vl", record_generation_logp=True)
    ro = ad.collect(num_groups=1, group_size=2, iteration=0)
    ad.extend_mm_token_type_ids = False
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        logprob_consistency(ad, ro)


# --- sampling conventions ------------------------------------------------------------------------

def test_temperature_is_pinned(tiny_dirs):
    """old_logp = log_softmax(logits / T) of a plain forward with the suppressed ids at -inf,
    which is exactly the sampled distribution (no top-k, no repetition penalty)."""
    temperature = 0.7
    ad = make_adapter(tiny_dirs, record_generation_logp=True, temperature=temperature)
    ro = ad.collect(num_groups=2, group_size=3, iteration=1)
    n, t_len = ro.mask.shape
    kw = ad.model_inputs(ro, torch.arange(n))
    with torch.no_grad():
        logits = ad.policy(**kw, use_cache=False).logits[:, -t_len - 1:-1].double()
    ids = ro.inputs["completion_ids"]
    valid = ro.inputs["completion_attn"].bool()
    scaled = logits / temperature
    scaled[..., ad.suppress_ids] = -math.inf
    sampled = torch.log_softmax(scaled, -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(ro.old_logp.double()[valid], sampled[valid], atol=1e-5)
    assert torch.allclose(ro.inputs["gen_sample_logp"].double()[valid], sampled[valid], atol=1e-5)
    wrong = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    assert (ro.old_logp.double()[valid] - wrong[valid]).abs().max() > 1e-3  # T matters here
    full_vocab = torch.log_softmax(logits / temperature, -1).gather(-1, ids[..., None])[..., 0]
    assert (ro.old_logp.double()[valid] - full_vocab[valid]).abs().max() > 1e-3  # so does the mask


def test_top_p_below_one_is_refused(tiny_dirs):
    """Nucleus sampling draws from a truncated distribution the training forward cannot
    reproduce: refused with a message naming top_p."""
    with pytest.raises(ValueError, match=r"top_p=0.9 is not supported"):
        make_adapter(tiny_dirs, top_p=0.9)


def test_training_entropy_is_the_sampled_distributions(tiny_dirs):
    """The entropy the loss sees is that of the masked distribution (float64 formula), and
    its gradient is finite with suppressed ids at -inf."""
    ad = make_adapter(tiny_dirs, temperature=1.0)
    ro = ad.collect(num_groups=1, group_size=3, iteration=0)
    n, t_len = ro.mask.shape
    logp, ent = ad.logp_and_entropy(ad.policy, ro, torch.arange(n))
    kw = ad.model_inputs(ro, torch.arange(n))
    with torch.no_grad():
        logits = ad.policy(**kw, use_cache=False).logits[:, -t_len - 1:-1].double()
    logits[..., ad.suppress_ids] = -math.inf
    lq = torch.log_softmax(logits, -1)
    want = -(lq.exp() * torch.where(torch.isinf(lq), torch.zeros_like(lq), lq)).sum(-1)
    valid = ro.mask.bool()
    assert torch.allclose(ent.double()[valid], want[valid], atol=1e-5)
    (ent[valid].sum() + logp[valid].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in ad.policy.parameters() if p.grad is not None)


def test_completion_mask_ends_at_eos(tiny_dirs):
    ad = make_adapter(tiny_dirs, max_new_tokens=8)
    ro = ad.collect(num_groups=2, group_size=8, iteration=0)
    ids, mask = ro.inputs["completion_ids"], ro.mask
    eos = ad.eos_id
    ended = truncated = 0
    for row in range(ids.shape[0]):
        hits = (ids[row] == eos).nonzero().flatten()
        length = int(mask[row].sum())
        if len(hits):
            ended += 1
            assert length == int(hits[0]) + 1  # includes the EOS itself
            assert ids[row, length - 1] == eos
        else:
            truncated += 1
            assert length == ad.max_new_tokens == ids.shape[1]
        assert mask[row, :length].all() and not mask[row, length:].any()
        # the reward sits on the last valid token only
        assert (ro.rewards[row, :max(length - 1, 0)] == 0).all() and (ro.rewards[row, length:] == 0).all()
    assert ended and truncated, (ended, truncated)
    assert ro.info["truncated_frac"] == truncated / ids.shape[0]


def test_rollouts_are_deterministic_in_seed_and_iteration(tiny_dirs):
    ad = make_adapter(tiny_dirs)
    a = ad.collect(num_groups=2, group_size=4, iteration=3)
    b = ad.collect(num_groups=2, group_size=4, iteration=3)
    c = ad.collect(num_groups=2, group_size=4, iteration=4)
    assert torch.equal(a.inputs["completion_ids"], b.inputs["completion_ids"])
    assert torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.inputs["completion_ids"], c.inputs["completion_ids"]) or \
        not torch.equal(a.inputs["prompt_ids"], c.inputs["prompt_ids"])
    # prompts: each pass over the dataset uses every item once
    seen = [i for it in range(4) for i in ad.prompt_indices(it, 2)]
    assert sorted(seen) == list(range(8))


# --- rewards -------------------------------------------------------------------------------------

def _call(fn, n=4, g=2):
    return compute_rewards([fn], None, prompts=["q"] * n, completions=["red"] * n,
                           columns={"answer": ["red"] * n}, group_size=g)


def test_reward_errors_name_the_function_and_sample():
    def nan_at_3(prompts, completions, **kw):
        return [0.0, 1.0, 0.0, float("nan")]

    def too_short(prompts, completions, **kw):
        return [1.0]

    def boom(prompts, completions, **kw):
        raise KeyError("answer_column")

    def text_value(prompts, completions, **kw):
        return [1.0, "yes", 0.0, 0.0]

    with pytest.raises(ValueError, match=r"'nan_at_3' returned nan for sample 3 \(group 1, completion 1\)"):
        _call(nan_at_3)
    with pytest.raises(ValueError, match=r"'too_short' returned 1 values for 4 completions"):
        _call(too_short)
    with pytest.raises(ValueError, match=r"'boom' raised KeyError"):
        _call(boom)
    with pytest.raises(ValueError, match=r"'text_value' returned 'yes' .* sample 1"):
        _call(text_value)


def test_weighted_sum_and_none():
    def a(prompts, completions, **kw):
        return [1.0, 0.0, None, 1.0]

    def b(prompts, completions, answer, **kw):
        assert answer == ["red"] * 4
        return [0.5, 0.5, 0.5, None]

    total, per_fn = compute_rewards([a, b], [2.0, -1.0], prompts=["q"] * 4, completions=["x"] * 4,
                                    columns={"answer": ["red"] * 4}, group_size=2)
    assert total == [1.5, -0.5, None, None]
    assert per_fn == {"a": [1.0, 0.0, None, 1.0], "b": [0.5, 0.5, 0.5, None]}


def test_reward_error_through_collect(tiny_dirs):
    def bad(prompts, completions, **kw):
        return [float("nan")] * len(completions)

    ad = make_adapter(tiny_dirs, rewards=(bad,))
    with pytest.raises(ValueError, match="'bad' returned nan for sample 0"):
        ad.collect(num_groups=1, group_size=2, iteration=0)


def test_none_reward_masks_the_sample_out(tiny_dirs):
    def skip_two(prompts, completions, answer, **kw):
        return [None if i == 2 else float(i % 3 == 0) for i in range(len(completions))]

    ad = make_adapter(tiny_dirs, rewards=(skip_two,))
    ro = ad.collect(num_groups=2, group_size=4, iteration=0)
    assert not ro.mask[2].any() and (ro.rewards[2] == 0).all()
    assert ro.mask[[0, 1, 3]].any(1).all()
    assert ro.info["scored_frac"] == 7 / 8
    from grpo_core.advantages import group_advantages

    adv = group_advantages(ro.rewards, ro.mask, 4, gamma=1.0, scale="group", stats_over="sequences")
    assert (adv[2] == 0).all()
    # the group statistics use the 3 scored samples only: their G_0 are 1, 0, 1 (rows 0, 1, 3)
    g0 = torch.tensor([1.0, 0.0, 1.0])
    want = (g0 - g0.mean()) / (g0.std() + 1e-8)
    got = torch.stack([adv[r][ro.mask[r]][0] for r in (0, 1, 3)])
    assert torch.allclose(got, want, atol=1e-6)
