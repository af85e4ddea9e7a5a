"""What the VLM training forward keeps and runs per call (issue 29, items 3 and 6):

- the vision tower of a ``forward_logp`` call encodes the prompts of the rows asked for, not all
  B prompts of the rollout: per minibatch in micro-batches smaller than a group, it sees the
  images of each micro-batch's own prompts (counted by wrapping ``get_image_features``), and
  the log-probs and gradients equal those of the all-prompts path (``encode_all_prompts``) and
  of the plain path (transformers' own encoding of repeated inputs);
- the LM head projects only the T positions that predict the completion: the bytes saved for
  backward grow with the vocabulary as rows x T x bytes (not rows x (T + 1) x bytes), and the
  peak of the live tensor bytes as ``adapters.vlm.logprob_peak_bytes`` says, exactly (the
  slope between two vocabulary sizes, where everything else cancels); the path before the fix
  (T + 1 positions, then ``[:, :-1]``) is measured beside it and is off by rows x bytes per word;
- on CUDA a new run gets a ``micro_batch_size`` from that formula when nobody set one (checked
  against the closed form with a mocked device), on CPU none, and ``--set`` wins.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm import VLMAdapter, inner_model, logprob_peak_bytes  # noqa: E402
from benchmarks.logprob_memory import measure_vlm_forward, sliced_logits  # noqa: E402
from grpo_core.config import GRPOConfig  # noqa: E402
from grpo_core.loop import GRPOTrainer  # noqa: E402

from .test_vlm import (  # noqa: E402,F401  (fixtures)
    _one_thread,
    _quiet_transformers,
    make_adapter,
    mixed_dataset,
    tiny_dirs,
)

G = 4


def _images_per_prompt(adapter) -> list[int]:
    return [len(grid) for grid in adapter.encode_prompts(adapter.dataset)["grids"]]


def _count_vision_calls(adapter) -> list[int]:
    """Images encoded by each vision-tower call with gradient (the training forwards; generate
    runs without), recorded by wrapping ``get_image_features`` on the model."""
    inner = inner_model(adapter.policy)
    calls, encode = [], inner.get_image_features

    def counting(pixel_values, image_grid_thw, *args, **kw):
        if torch.is_grad_enabled():
            calls.append(int(image_grid_thw.shape[0]))
        return encode(pixel_values, image_grid_thw, *args, **kw)

    inner.get_image_features = counting
    return calls


def _count_rows(adapter) -> list[tuple[list[int], list[int]]]:
    """The rows of each gradient call of ``logp_and_entropy`` (one per micro-batch), with the
    dataset item of each group of its rollout."""
    seen, forward = [], adapter.logp_and_entropy

    def recording(model, rollout, rows):
        if torch.is_grad_enabled():
            seen.append((rows.tolist(), list(rollout.inputs["items"])))
        return forward(model, rollout, rows)

    adapter.logp_and_entropy = recording
    return seen


def _varied(prompts, completions, **kw):
    """Distinct rewards within every group: every micro-batch has a gradient to take."""
    return [len(c) + 0.1 * i for i, c in enumerate(completions)]


@pytest.mark.parametrize("encode_all", [False, True])
def test_micro_batches_encode_only_their_own_prompts(tiny_dirs, encode_all):
    """4 prompts (one with two images) x 4 completions, one minibatch in micro-batches of 2
    rows: each of the 8 forwards runs the vision tower once, on the images of the prompts of
    its own 2 rows (at most 2 prompts), not on all 5 images of the 4 prompts (the path before,
    kept as ``encode_all_prompts``)."""
    ad = make_adapter(tiny_dirs, dataset=mixed_dataset(), rewards=(_varied,), max_new_tokens=4,
                      old_logp_forward=False, encode_all_prompts=encode_all)
    images = _images_per_prompt(ad)
    assert images == [1, 1, 1, 2]
    calls, seen = _count_vision_calls(ad), _count_rows(ad)
    cfg = GRPOConfig(group_size=G, groups_per_iteration=4, grpo_epochs=1, minibatches=1, beta=0.0,
                     micro_batch_size=2, lr=1e-3)
    GRPOTrainer(ad, cfg).step()
    assert len(seen) == 8 and len(calls) == 8  # one vision-tower call per micro-batch
    if encode_all:
        assert calls == [sum(images)] * 8
        return
    want = [sum(images[items[b]] for b in {r // G for r in rows}) for rows, items in seen]
    assert calls == want
    assert max(calls) <= 3 and sum(calls) < 8 * sum(images)


def _logp_and_grads(adapter, rollout, rows):
    adapter.policy.zero_grad(set_to_none=True)
    logp, ent = adapter.forward_logp(adapter.policy, rollout, rows)
    valid = rollout.mask[rows].bool()
    (logp[valid].sum() + 0.1 * ent[valid].sum()).backward()
    grads = {n: p.grad.clone() for n, p in adapter.policy.named_parameters() if p.grad is not None}
    return logp.detach(), grads


def test_rows_of_a_few_prompts_get_their_own_features(tiny_dirs):
    """Rows out of order, from three prompts (one with two images of different sizes), in two
    blocks: log-probs equal to the all-prompts path and to the plain path (transformers'
    encoding of repeated inputs), gradients too, the vision tower's included."""
    fast = make_adapter(tiny_dirs, dataset=mixed_dataset(), max_new_tokens=5, forward_batch=3)
    plain = make_adapter(tiny_dirs, dataset=mixed_dataset(), max_new_tokens=5, forward_batch=3, encode_once=False)
    rollout = fast.collect(num_groups=4, group_size=3, iteration=0)
    two_images = fast.prompt_indices(0, 4).index(3)  # the group whose prompt holds two images
    rows = torch.tensor([3 * two_images + 2, 1, 3 * two_images, 5, 0])
    assert len({int(r) // 3 for r in rows}) == 3
    calls = _count_vision_calls(fast)
    lp, gp = _logp_and_grads(fast, rollout, rows)
    assert calls == [1 + 1 + 2]  # the three prompts' images, once for both blocks
    fast.encode_all_prompts = True
    la, ga = _logp_and_grads(fast, rollout, rows)
    assert calls[-1] == 5  # every prompt's
    lr, gr = _logp_and_grads(plain, rollout, rows)
    valid = rollout.mask[rows].bool()
    for other, grads in ((la, ga), (lr, gr)):
        torch.testing.assert_close(lp[valid], other[valid], rtol=0, atol=1e-6)
        assert gp.keys() == grads.keys() and any("visual" in k for k in gp)
        for name in grads:
            torch.testing.assert_close(gp[name], grads[name], rtol=1e-4, atol=1e-7)


# --- item 6: the logits held for backward, and the peak ----------------------------------------

@pytest.fixture(scope="module")
def wide_head(tiny_dirs):
    """``run(dtype, sliced)``: a rollout of the tiny model (6 rows of T = 8 tokens, no EOS
    bias), measured with LM heads of 20,000 and 40,000 words (frozen: their V x hidden
    gradient is not what is measured), chunks of 4 tokens."""
    from adapters.vlm_tasks import colours_dataset, first_word_reward
    from adapters.vlm_tiny import load_vlm

    def run(dtype, sliced=False):
        model, processor = load_vlm(tiny_dirs["qwen2_vl"], dtype=dtype)
        ad = VLMAdapter(model, processor, colours_dataset(8), [first_word_reward], max_new_tokens=8, chunk=4,
                        old_logp_forward=False)
        rollout = ad.collect(num_groups=2, group_size=3, iteration=0)
        assert rollout.mask.shape == (6, 8)
        return ad, rollout, [measure_vlm_forward(ad, rollout, v, sliced=sliced) for v in (20_000, 40_000)]
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_memory_is_the_formula(wide_head, dtype):
    ad, rollout, (a, b) = wide_head(dtype)
    n, t = rollout.mask.shape
    size = torch.finfo(dtype).bits // 8
    dv = b["vocab"] - a["vocab"]
    # saved for backward: the (n, T, V) logits, nothing of T + 1 positions
    assert b["saved"] - a["saved"] == n * t * size * dv
    # the peak: logits + their gradient + the chunked log-prob's float32 block temporaries
    # (blocks of chunk = 4 tokens: a float32 copy, its exp and an isneginf mask, 9 bytes a word)
    assert b["peak"] - a["peak"] == (2 * n * t * size + 9 * 4) * dv
    # the forward alone: the logits, a block's copy, exp and mask (9 bytes a word), and the
    # previous block's copy and exp still referenced (8 more)
    assert b["forward_peak"] - a["forward_peak"] == (n * t * size + 17 * 4) * dv
    formula = [logprob_peak_bytes(n, t, r["vocab"], size, ad.chunk) for r in (a, b)]
    assert formula[1] - formula[0] == (2 * n * t * size + 9 * 4) * dv
    assert [size_ for size_, _, _ in b["at_peak"][:2]] == [n * t * b["vocab"] * size] * 2  # the logits, their gradient


def test_the_sliced_path_is_measured_as_such(wide_head):
    """The measurement tells the fix apart: the path before held T + 1 positions' logits and
    its slice's backward allocated another (n, T + 1, V) tensor."""
    ad, rollout, (a, b) = wide_head(torch.float32, sliced=True)
    n, t = rollout.mask.shape
    dv = b["vocab"] - a["vocab"]
    assert (b["saved"] - a["saved"]) == n * (t + 1) * 4 * dv
    formula = logprob_peak_bytes(n, t, b["vocab"], 4, ad.chunk) - logprob_peak_bytes(n, t, a["vocab"], 4, ad.chunk)
    assert b["peak"] - a["peak"] == formula + n * 4 * dv


def test_positions_give_the_sliced_paths_logp_and_gradients(tiny_dirs):
    """The T kept positions are the right ones: log-probs, and gradients of log-probs +
    entropies, equal to those of T + 1 positions then ``[:, :-1]`` (the path before), on
    prompts of different lengths (left padding) and a prompt of two images."""
    ad = make_adapter(tiny_dirs, dataset=mixed_dataset(), max_new_tokens=5)
    rollout = ad.collect(num_groups=4, group_size=2, iteration=0)
    rows = torch.arange(8)
    new, g_new = _logp_and_grads(ad, rollout, rows)
    sliced_logits(ad.policy)
    old, g_old = _logp_and_grads(ad, rollout, rows)
    del ad.policy.forward
    valid = rollout.mask.bool()
    torch.testing.assert_close(new[valid], old[valid], rtol=0, atol=1e-6)
    for name in g_old:
        torch.testing.assert_close(g_new[name], g_old[name], rtol=1e-4, atol=1e-7)


def test_formula_by_hand():
    """Qwen2-VL-2B's vocabulary, 32 rows of 512 tokens in bf16: 4.98 GB of logits, a peak of
    twice that plus 9 bytes x 256 tokens x V of block temporaries."""
    v = 151_936
    logits = 32 * 512 * v * 2
    assert logits == 4_978_638_848
    assert logprob_peak_bytes(32, 512, v, 2) == 2 * logits + 9 * 256 * v
    # one row of 8 tokens, chunk 256: one block of 8 tokens, the forward's temporaries dominate
    assert logprob_peak_bytes(1, 8, 100, 4, chunk=256) == 32 * 100 + 17 * 8 * 100
    assert logprob_peak_bytes(4, 512, 100, 2, chunk=256) == 2 * 4 * 512 * 100 * 2 + 9 * 256 * 100


# --- the default micro_batch_size on CUDA ------------------------------------------------------

class _Props:
    total_memory = 80 * 10**9


def _resolved(monkeypatch, tmp_path, device, *extra):
    """``train vlm``'s settings for a new run on ``device`` (resolved as given: no GPU needed),
    the GPU reporting 80 GB, the model a config.json of Qwen2-VL-7B's vocabulary."""
    from grpo_harness import train_vlm

    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {"vocab_size": 152_064}}))
    monkeypatch.setattr(train_vlm, "resolve_device", lambda spec: spec)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    parser = argparse.ArgumentParser()
    train_vlm.add_arguments(parser)
    args = parser.parse_args(["--task", "colours", "--model", str(model), "--device", device,
                              "--max-new-tokens", "512", *extra])
    run = train_vlm.VLMRun(args)
    run.say = lambda line: None
    run._resolve(None)
    return run


def _closed_form(memory, t, v, size, chunk=256):
    """The most rows n with 2 n T V size + 9 chunk V <= memory / 8 (T > chunk), at most 64."""
    return max(1, min(64, math.floor((memory / 8 - 9 * chunk * v) / (2 * t * v * size))))


@pytest.mark.parametrize("precision, size", [("bf16-mixed", 2), ("32", 4)])
def test_cuda_gets_a_micro_batch_that_fits(monkeypatch, tmp_path, precision, size):
    run = _resolved(monkeypatch, tmp_path, "cuda", "--precision", precision)
    want = _closed_form(80 * 10**9, 512, 152_064, size)
    assert want == {2: 30, 4: 15}[size]
    assert run.cfg.micro_batch_size == want
    assert logprob_peak_bytes(want, 512, 152_064, size) <= 10**10 < logprob_peak_bytes(want + 1, 512, 152_064, size)


def test_cpu_keeps_one_pass_and_set_wins(monkeypatch, tmp_path):
    assert _resolved(monkeypatch, tmp_path, "cpu").cfg.micro_batch_size is None
    assert _resolved(monkeypatch, tmp_path, "cuda", "--set", "micro_batch_size=3").cfg.micro_batch_size == 3
    assert _resolved(monkeypatch, tmp_path, "cuda", "--set", "micro_batch_size=null").cfg.micro_batch_size is None
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("micro_batch_size = 5\n")
    assert _resolved(monkeypatch, tmp_path, "cuda:0", "--config", str(cfg)).cfg.micro_batch_size == 5
