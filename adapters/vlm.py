"""Qwen2-VL / Qwen2.5-VL adapter: prompts with images in, padded completion tensors out.

Conventions (the loop sees only ``Rollout`` tensors):

- Row ``n = b * G + i`` is completion ``i`` of prompt ``b``; T is the longest completion.
- Prompts: at iteration ``it`` the B prompts are dataset items ``k = it * B + b`` of a walk
  through the dataset in a fresh permutation per pass (``derive_seed(seed, "pass", k // len)``),
  so every item is used once per pass and the choice depends only on (seed, iteration). Extra
  draws of dynamic sampling (``collect_more``, draw r >= 1) take the first B items of a
  permutation seeded by (seed, "draw", iteration, r) and sample with
  ``derive_seed(seed, "sample", iteration, "draw", r)``; a retry (``collect_more(again=...)``)
  draws the named groups' items again (``inputs["items"]``: each group's dataset index) and
  samples with ``derive_seed(seed, "sample", iteration, "retry", r)``; ``join_groups`` pads the
  chosen groups of several rollouts into one.
- Sampling: ``softmax(logits / temperature)`` with ``top_k = 0``, ``top_p = 1`` and every
  special token except the EOS ``<|im_end|>`` suppressed (a sampled ``<|image_pad|>`` would
  break the next forward). ``top_p < 1`` is refused: the PPO ratio and every KL estimator
  assume that the tokens come from the distribution whose log-probs they use, and a nucleus
  cut depends on the sampling policy's own ranking, which the training forward does not share.
  The model's own ``generation_config`` is swapped out for the call, so a checkpoint's
  repetition penalty, top-k or temperature cannot leak into sampling. Random
  numbers come from a generator seeded by ``derive_seed(seed, "sample", iteration)``.
- Engine: ``generate`` samples through ``self.engine`` (``adapters.vlm_engine``), synced with
  the policy before each rollout: by default the policy itself (``Rollout.engine_logp`` None,
  the path above unchanged); a separate engine (a bf16 copy) also reports its log-prob of each
  sampled token, which the rollout carries as ``engine_logp`` (0 under padding) for the loop's
  mismatch metrics and correction.
- Work done once per prompt (``encode_once``, the default): ``generate`` gets the B prompts and
  ``num_return_sequences=G`` (transformers encodes the B prompts' images and M-RoPE index
  before expanding the batch), and the training forward runs the vision tower once per call
  on the images of the prompts whose rows the call asks for (``image_features``; a
  micro-batch of 4 rows encodes at most 4 prompts, not all B) and passes the features
  (``mm_encoder_outputs=``) and the M-RoPE ``position_ids`` (computed once per rollout by
  ``get_rope_index`` on the B prompts, continued over the completion) instead of G copies of
  the pixels. Samples and float32 log-probs are bit-identical to the repeated path
  (``encode_once=False``) on the tiny models; gradients agree to rounding.
- Completion mask: 1 up to and including the first EOS; a completion that never emits EOS keeps
  all ``max_new_tokens`` tokens valid (``mask_truncated=True`` masks such rows out instead).
- Log-probs and entropies (old, policy and reference) come from one forward over prompt +
  completion in the model's dtype, whose LM head projects only the T positions P-1 .. P+T-2
  that predict the completion (``logits_to_keep`` as a tensor of positions: (rows, T, V)
  logits, no slice of them whose backward would allocate a zero-filled copy of their size;
  the memory is in ``logprob_peak_bytes``), of the distribution actually sampled from:
  ``log_softmax(logits / temperature)`` with the suppressed ids at ``-inf`` (renormalised over
  the sampleable ids; TRL instead uses the full vocabulary, so its KL and ratio see tokens drawn
  from another distribution than the one they score). Padding after the EOS is scored as EOS
  (masked out anyway; a suppressed pad id would give ``-inf``). ``pixel_values`` are
  split per image by the grid products and (repeated path) repeated per completion,
  ``image_grid_thw`` repeated, ``mm_token_type_ids`` extended with zeros (text) over the
  completion and the cached ``rope_deltas`` reset first. Qwen2.5-VL silently computes wrong
  M-RoPE positions when ``mm_token_type_ids`` does not cover the completion;
  ``logprob_consistency`` catches it, and also checks the encode-once path.
- Rewards: see ``adapters.vlm_rewards``; the scalar reward of a completion sits on its last
  valid token, zeros elsewhere; a None reward masks the row out.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence

import torch

from grpo_core._seeding import derive_seed
from grpo_core.adapter import Rollout
from grpo_core.logprobs import DEFAULT_CHUNK, selective_logp, selective_logp_and_entropy
from grpo_core.refmodel import frozen_copy

from .vlm_engine import PolicyEngine, SamplingRequest, inner_model, reset_rope_deltas  # noqa: F401  (re-exported)
from .vlm_rewards import compute_rewards


def _open_image(img):
    from PIL import Image

    if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__"):
        with Image.open(img) as im:
            return im.convert("RGB")
    return img


def _images_of(item) -> list:
    img = item["image"]
    return [_open_image(i) for i in (img if isinstance(img, (list, tuple)) else [img])]


def _messages_of(item) -> list[dict]:
    prompt = item["prompt"]
    if isinstance(prompt, str):
        n_img = len(item["image"]) if isinstance(item["image"], (list, tuple)) else 1
        return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_img)),
                                             {"type": "text", "text": prompt}]}]
    return list(prompt)


def suppressed_token_ids(tokenizer, model_config=None) -> list[int]:
    """Every special / added-special token id except the EOS, plus the image/video pad ids."""
    eos = tokenizer.eos_token_id
    ids = set(tokenizer.all_special_ids)
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        tid = getattr(model_config, name, None) if model_config is not None else None
        if tid is not None:
            ids.add(int(tid))
    ids.discard(eos)
    return sorted(i for i in ids if i is not None and i >= 0)


class VLMAdapter:
    """Implements ``grpo_core.adapter.Adapter`` for an image-text-to-text model."""

    def __init__(self, model: torch.nn.Module, processor, dataset: Sequence[dict],
                 reward_funcs: Sequence[Callable] | Callable, *, reward_weights: Sequence[float] | None = None,
                 seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 16,
                 mask_truncated: bool = False, chunk: int = DEFAULT_CHUNK, forward_batch: int = 64,
                 record_generation_logp: bool = False, extend_mm_token_type_ids: bool = True,
                 old_logp_forward: bool = True, encode_once: bool = True, encode_all_prompts: bool = False,
                 engine=None):
        if not len(dataset):
            raise ValueError("the dataset is empty")
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_p != 1:
            raise ValueError(f"top_p={top_p!r} is not supported: nucleus sampling draws tokens from "
                             "a truncated distribution whose log-probs the training forward cannot "
                             "reproduce, which biases the PPO ratio and the KL; use top_p=1 (and "
                             "temperature to sharpen sampling)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        self.policy = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.dataset = dataset
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.reward_weights = None if reward_weights is None else [float(w) for w in reward_weights]
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_weights)} reward weights for "
                             f"{len(self.reward_funcs)} reward functions")
        self.seed = seed
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_new_tokens = int(max_new_tokens)
        self.max_len = self.max_new_tokens
        """The maximum completion length: Dr. GRPO's constant normaliser (GRPOConfig.max_len)."""
        self.mask_truncated = mask_truncated
        self.chunk = chunk
        self.forward_batch = forward_batch
        self.record_generation_logp = record_generation_logp
        """Keep generation-time log-probs (``inputs["gen_sample_logp"]`` from the processed scores,
        the distribution sampled from; ``inputs["gen_logp"]`` from the raw logits over the full
        vocabulary) for ``logprob_consistency``; costs an (N, T, V) copy of the logits per
        rollout, so off for training."""
        self.extend_mm_token_type_ids = extend_mm_token_type_ids
        """False drops mm_token_type_ids from the training forward (and selects the repeated
        forward, which is the one that reads them): only for the test that shows why the
        extension is needed (Qwen2-VL raises, Qwen2.5-VL silently shifts positions)."""
        self.encode_once = encode_once
        """True: ``generate`` runs on the B prompts with ``num_return_sequences=G`` (the vision
        tower and the M-RoPE index on B prompts, expanded by transformers afterwards), and the
        training forward runs the vision tower once per prompt of a block and takes the M-RoPE
        positions computed once per rollout (``prompt_positions``), extended over the completion.
        False: every row's inputs repeated G times and encoded by the model's own forward (the
        plain path the tests compare the fast one against: samples and log-probs equal)."""
        self.encode_all_prompts = encode_all_prompts
        """With ``encode_once``: False (the default) runs the vision tower of a ``forward_logp``
        call on the prompts of the rows asked for only (a micro-batch of a few rows encodes a
        few prompts, and keeps only their features alive until backward); True on all B
        prompts of the rollout whatever the rows (the path before, which the tests compare
        against)."""
        self.old_logp_forward = old_logp_forward
        """True: ``collect`` runs a forward for ``Rollout.old_logp`` (and the sample-entropy
        metric). False: it leaves ``old_logp`` None for the loop, which saves that forward when
        there is one epoch and one minibatch (``train vlm`` passes False)."""
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.suppress_ids = suppressed_token_ids(self.tokenizer, getattr(model, "config", None))
        self.engine = PolicyEngine() if engine is None else engine
        """What samples the completions (``adapters.vlm_engine``): the policy itself (None, the
        default), or a separate engine (``CopyEngine``) synced with the policy before every
        rollout, whose log-probs of its samples the rollout carries (``Rollout.engine_logp``)."""
        self.policy.eval()  # no dropout: sampling and training see the same function

    # -- Adapter protocol -------------------------------------------------------------------

    def make_reference(self) -> torch.nn.Module:
        return frozen_copy(self.policy)

    def prompt_indices(self, iteration: int, num_groups: int, draw: int = 0) -> list[int]:
        """Dataset items of iteration ``iteration`` (see the module docstring); for an extra
        draw of dynamic sampling (``draw`` >= 1), the first items of a permutation seeded by
        ``(seed, "draw", iteration, draw)``."""
        size = len(self.dataset)
        if draw:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "draw", iteration, draw))
            perm = torch.randperm(size, generator=gen).tolist()
            return [perm[b % size] for b in range(num_groups)]
        out, perms = [], {}
        for b in range(num_groups):
            k = iteration * num_groups + b
            p = k // size
            if p not in perms:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, "pass", p))
                perms[p] = torch.randperm(size, generator=gen).tolist()
            out.append(perms[p][k % size])
        return out

    def collect(self, *, num_groups: int, group_size: int, iteration: int, first_group: int = 0,
                total_groups: int | None = None) -> Rollout:
        """Groups ``first_group ..`` of the iteration's ``total_groups`` (default ``num_groups``):
        a data-parallel rank's share gets the prompts one process gives those groups; a share
        that does not start at group 0 samples from ``derive_seed(seed, "sample", iteration,
        "groups", first_group)`` (a stream per rank's share, not per group)."""
        return self._collect(num_groups, group_size, iteration, 0, first_group, total_groups)

    def collect_more(self, *, num_groups: int, group_size: int, iteration: int, draw: int,
                     again: tuple[Rollout, list[int]] | None = None) -> Rollout:
        """Extra draw ``draw`` >= 1 of dynamic sampling: other prompts (``prompt_indices``),
        sampled with ``derive_seed(seed, "sample", iteration, "draw", draw)``; with ``again =
        (rollout, groups)`` the prompts of those groups of ``rollout`` once more (in that order),
        sampled with ``derive_seed(seed, "sample", iteration, "retry", draw)``."""
        if draw < 1:
            raise ValueError(f"draw must be >= 1 (draw 0 is collect), got {draw!r}")
        if again is None:
            return self._collect(num_groups, group_size, iteration, draw)
        rollout, groups = again
        if len(groups) != num_groups:
            raise ValueError(f"collect_more: again names {len(groups)} groups, num_groups is {num_groups}")
        items = rollout.inputs["items"]
        return self._collect(num_groups, group_size, iteration, draw, indices=[items[k] for k in groups])

    @torch.no_grad()
    def _collect(self, num_groups: int, group_size: int, iteration: int, draw: int, first_group: int = 0,
                 total_groups: int | None = None, indices: list[int] | None = None) -> Rollout:
        if indices is None:
            indices = self.prompt_indices(iteration, total_groups or num_groups, draw)
            indices = indices[first_group:first_group + num_groups]
            stream = ("draw", draw) if draw else ()
        else:
            stream = ("retry", draw)
        items = [self.dataset[i] for i in indices]
        batch = self.encode_prompts(items)
        seed = derive_seed(self.seed, "sample", iteration, *stream,
                           *(("groups", first_group) if first_group else ()))
        gen_out = self.generate(batch, group_size, seed)
        inputs = self._rollout_inputs(batch, gen_out, group_size)
        inputs["items"] = list(indices)  # the dataset item of each group (a retry draws them again)

        completions = self.tokenizer.batch_decode(
            [ids[: int(n)] for ids, n in zip(inputs["completion_ids"], inputs["completion_attn"].sum(1))],
            skip_special_tokens=True)
        g = group_size
        prompts = [it["prompt"] for it in items for _ in range(g)]
        columns = {k: [it.get(k) for it in items for _ in range(g)]
                   for k in items[0] if k != "prompt"}
        total, per_fn = compute_rewards(self.reward_funcs, self.reward_weights, prompts=prompts,
                                        completions=completions, columns=columns, group_size=g)

        attn = inputs["completion_attn"]
        n, t_len = attn.shape
        lengths = attn.sum(1)
        truncated = ~inputs["ended"]
        scored = torch.tensor([r is not None for r in total])
        keep = scored & ~(truncated if self.mask_truncated else torch.zeros_like(truncated))
        mask = attn.bool() & keep[:, None]
        rewards = torch.zeros(n, t_len, dtype=torch.float32)
        last = (lengths - 1).clamp(min=0)
        values = torch.tensor([0.0 if r is None else r for r in total], dtype=torch.float32)
        rewards[torch.arange(n), last] = torch.where(keep, values, torch.zeros_like(values))

        engine_logp = None
        if gen_out.logp is not None:  # a separate engine sampled: its log-probs, 0 under padding
            engine_logp = torch.where(attn.bool(), gen_out.logp.float(), torch.zeros((), dtype=torch.float32))
        rollout = Rollout(rewards=rewards, mask=mask, old_logp=None, inputs=inputs, engine_logp=engine_logp)
        old_ent = None
        if self.old_logp_forward:
            old_logp, old_ent = self.forward_logp(self.policy, rollout, torch.arange(n), want_entropy=True)
            rollout.old_logp = torch.where(attn.bool(), old_logp, torch.zeros_like(old_logp))
        inputs["completions"] = completions
        inputs["reward_scores"] = per_fn  # each function's raw score per sample (completions log)
        rollout.info = self._info(total, per_fn, lengths, truncated, scored, old_ent, attn)
        rollout.info["prompt_len_mean"] = float(inputs["prompt_attn"].sum(1).float().mean())
        return rollout

    def join_groups(self, parts: list[tuple[Rollout, list[int]]]) -> Rollout:
        """One rollout of the listed groups of each part, in order (dynamic sampling): prompts
        left-padded (ids: the pad id, masks and positions: 0, as the processor pads) and
        completions right-padded (the pad id, mask 0, not scored) to the longest of the parts;
        ``info`` is the first part's."""
        g = parts[0][0].inputs["group_size"]
        chosen = [(r, groups, torch.tensor([b * g + i for b in groups for i in range(g)]))
                  for r, groups in parts if groups]
        p_len = max(r.inputs["prompt_ids"].shape[1] for r, _, _ in chosen)
        t_len = max(r.rewards.shape[1] for r, _, _ in chosen)

        def rows(get, width=None, value=0, left=False):
            """The chosen rows of ``get(rollout)``, padded to ``width`` (left or right)."""
            return torch.cat([_pad(get(r)[idx], width, value, left) for r, _, idx in chosen])

        def column(key):
            return lambda r: r.inputs[key]

        inputs = {"group_size": g,
                  "prompt_ids": rows(column("prompt_ids"), p_len, self.pad_id, left=True),
                  "prompt_attn": rows(column("prompt_attn"), p_len, 0, left=True),
                  "prompt_mm": rows(column("prompt_mm"), p_len, 0, left=True),
                  "completion_ids": rows(column("completion_ids"), t_len, self.pad_id),
                  "completion_attn": rows(column("completion_attn"), t_len, 0),
                  "ended": rows(column("ended")),
                  "pixels": [r.inputs["pixels"][b] for r, groups, _ in chosen for b in groups],
                  "grids": [r.inputs["grids"][b] for r, groups, _ in chosen for b in groups],
                  "items": [r.inputs["items"][b] for r, groups, _ in chosen for b in groups],
                  "completions": [r.inputs["completions"][i] for r, _, idx in chosen
                                  for i in idx.tolist()]}
        if all("prompt_positions" in r.inputs for r, _, _ in chosen):
            inputs["prompt_positions"] = torch.cat(
                [_pad(r.inputs["prompt_positions"][:, groups], p_len, 0, True) for r, groups, _ in chosen], 1)
        no_old = any(r.old_logp is None for r, _, _ in chosen)
        no_engine = any(r.engine_logp is None for r, _, _ in chosen)
        scored = [r.scored is not None for r, _, _ in chosen]
        if any(scored) and not all(scored):
            raise ValueError("join_groups: some parts mark their scored steps (Rollout.scored) and others do not")
        return Rollout(rewards=rows(lambda r: r.rewards, t_len, 0.0), mask=rows(lambda r: r.mask, t_len, False),
                       old_logp=None if no_old else rows(lambda r: r.old_logp, t_len, 0.0),
                       scored=rows(lambda r: r.scored, t_len, False) if all(scored) else None,
                       engine_logp=None if no_engine else rows(lambda r: r.engine_logp, t_len, 0.0),
                       inputs=inputs, info=dict(parts[0][0].info))

    def logp_and_entropy(self, model: torch.nn.Module, rollout: Rollout, rows: torch.Tensor):
        """Shapes: rows (n,) -> logp (n, T), entropy (n, T), float32, gradient to ``model``."""
        return self.forward_logp(model, rollout, rows, want_entropy=True)

    # -- pieces -----------------------------------------------------------------------------

    def encode_prompts(self, items: Sequence[dict]) -> dict:
        """Chat template + processor for B items. Returns the processor's tensors plus
        ``pixels`` (a list of per-prompt patch tensors) and ``grids`` (per-prompt grid rows)."""
        texts = [self.processor.apply_chat_template(_messages_of(it), add_generation_prompt=True,
                                                    tokenize=False) for it in items]
        images = [_images_of(it) for it in items]
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        if "mm_token_type_ids" not in enc:
            enc["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(enc["input_ids"]))
        grid = enc["image_grid_thw"]
        per_image = list(enc["pixel_values"].split(grid.prod(-1).tolist()))
        pixels, grids, k = [], [], 0
        for imgs in images:
            pixels.append(torch.cat(per_image[k:k + len(imgs)]))
            grids.append(grid[k:k + len(imgs)])
            k += len(imgs)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "mm_token_type_ids": enc["mm_token_type_ids"], "pixels": pixels, "grids": grids}

    def _visual_rows(self, batch_pixels, batch_grids, groups: list[int]):
        dtype = next(self.policy.parameters()).dtype
        pv = torch.cat([batch_pixels[b] for b in groups]).to(dtype)
        grid = torch.cat([batch_grids[b] for b in groups])
        return pv, grid

    def generate(self, batch: dict, group_size: int, seed: int):
        """Sample ``group_size`` completions per prompt (row ``b * G + i``) with the random
        stream ``seed`` through ``self.engine``, synced with the policy first; returns its
        ``adapters.vlm_engine.Generation``. ``encode_once``: the B prompts with
        ``num_return_sequences=G``; else the prompts repeated G times."""
        b = batch["input_ids"].shape[0]
        g = 1 if self.encode_once else group_size
        pv, grid = self._visual_rows(batch["pixels"], batch["grids"], [r // g for r in range(b * g)])
        rep = lambda t: t.repeat_interleave(g, 0)  # noqa: E731
        request = SamplingRequest(
            input_ids=rep(batch["input_ids"]), attention_mask=rep(batch["attention_mask"]),
            mm_token_type_ids=rep(batch["mm_token_type_ids"]), pixel_values=pv, image_grid_thw=grid,
            num_return_sequences=group_size // g, seed=seed, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, suppress_ids=self.suppress_ids, eos_id=self.eos_id,
            pad_id=self.pad_id, keep_scores=self.record_generation_logp)
        self.engine.sync(self.policy)  # the weights of the latest optimizer step
        return self.engine.generate(request)

    def _rollout_inputs(self, batch: dict, gen_out, group_size: int) -> dict:
        p_len = batch["input_ids"].shape[1]
        comp = gen_out.sequences[:, p_len:].cpu()
        n, t_len = comp.shape
        is_eos = comp == self.eos_id
        ended = is_eos.any(1)
        first = torch.where(ended, is_eos.int().argmax(1), torch.full((n,), t_len))
        length = torch.where(ended, first + 1, torch.full((n,), t_len))
        attn = (torch.arange(t_len)[None, :] < length[:, None]).long()
        comp = torch.where(attn.bool(), comp, torch.full_like(comp, self.pad_id))
        rep = lambda t: t.repeat_interleave(group_size, 0)  # noqa: E731
        inputs = {"prompt_ids": rep(batch["input_ids"]), "prompt_attn": rep(batch["attention_mask"]),
                  "prompt_mm": rep(batch["mm_token_type_ids"]), "pixels": batch["pixels"],
                  "grids": batch["grids"], "group_size": group_size, "completion_ids": comp,
                  "completion_attn": attn, "ended": ended}
        if self.encode_once:
            inputs["prompt_positions"] = self.prompt_positions(batch)
        if self.record_generation_logp:
            logits = torch.stack([s.float().cpu() for s in gen_out.logits], 1)  # (N, T, V)
            ids = self._scored_ids(comp, attn)
            inputs["gen_logp"] = selective_logp(logits, ids, temperature=self.temperature, chunk=self.chunk)
            # the distribution actually sampled from (temperature and suppression applied by
            # generate's processors): what the training log-probs must equal
            scores = torch.stack([s.float().cpu() for s in gen_out.scores], 1)
            inputs["gen_sample_logp"] = selective_logp(scores, ids, chunk=self.chunk)
        return inputs

    def model_inputs(self, rollout: Rollout, rows: torch.Tensor, device=None) -> dict:
        """Forward kwargs for prompt + completion of ``rows`` (see the module docstring)."""
        x = rollout.inputs
        rows = rows.cpu()
        groups = (rows // x["group_size"]).tolist()
        pv, grid = self._visual_rows(x["pixels"], x["grids"], groups)
        comp = x["completion_ids"][rows]
        kw = {"input_ids": torch.cat([x["prompt_ids"][rows], comp], 1),
              "attention_mask": torch.cat([x["prompt_attn"][rows], x["completion_attn"][rows]], 1),
              "pixel_values": pv, "image_grid_thw": grid}
        if self.extend_mm_token_type_ids:
            kw["mm_token_type_ids"] = torch.cat([x["prompt_mm"][rows], torch.zeros_like(comp)], 1)
        # else: the prompt-only ids cannot be passed at all (shape error), so none are; this is
        # what a caller that forwards only the processor's prompt outputs ends up doing.
        if device is not None:
            kw = {k: v.to(device) for k, v in kw.items()}
        return kw

    def prompt_positions(self, batch: dict) -> torch.Tensor:
        """M-RoPE positions of the B prompts (``get_rope_index``: text, then each image's
        (t, h, w) grid), computed once per rollout; left padding gets 0.

        Shapes: batch["input_ids"] (B, P) -> (3, B, P) long."""
        pos, _ = inner_model(self.policy).get_rope_index(
            input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=torch.cat(batch["grids"]), attention_mask=batch["attention_mask"])
        return pos.cpu()

    def image_features(self, model: torch.nn.Module, rollout: Rollout, device=None,
                       groups: Sequence[int] | None = None) -> dict[int, tuple]:
        """The features of the images of prompts ``groups`` (default: all B prompts of the
        rollout) under ``model``'s vision tower, in one call (gradient included); each prompt
        once, however many of its rows there are, in increasing prompt order.

        Returns {prompt index: one tensor per image of that prompt, (tokens, hidden) each}."""
        x = rollout.inputs
        chosen = sorted(set(range(len(x["pixels"])) if groups is None else (int(b) for b in groups)))
        pv, grid = self._visual_rows(x["pixels"], x["grids"], chosen)
        feats = inner_model(model).get_image_features(pv.to(device), grid.to(device),
                                                      return_dict=True).pooler_output
        bounds = [0, *itertools.accumulate(len(x["grids"][b]) for b in chosen)]
        return {b: tuple(feats[lo:hi]) for b, (lo, hi) in zip(chosen, itertools.pairwise(bounds))}

    def encoded_inputs(self, rollout: Rollout, rows: torch.Tensor, features: dict[int, tuple],
                       device=None) -> dict:
        """Forward kwargs for prompt + completion of ``rows`` with the prompts' image
        ``features`` (``image_features``, keyed by prompt index, holding at least the prompts of
        ``rows``; each prompt's reused by its G completions) and the
        M-RoPE positions of ``prompt_positions`` continued over the completion: token t at the
        prompt's last position + 1 + t, padding after the EOS at 0 (what ``get_rope_index`` on
        the whole row gives).

        Shapes: rows (n,) -> input_ids, attention_mask (n, P + T), position_ids (3, n, P + T)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        x = rollout.inputs
        rows = rows.cpu()
        groups = rows // x["group_size"]
        comp, comp_attn = x["completion_ids"][rows], x["completion_attn"][rows]
        prompt_pos = x["prompt_positions"][:, groups]
        start = prompt_pos.amax(dim=(0, 2)) + 1
        comp_pos = (start[:, None] + torch.arange(comp.shape[1])) * comp_attn
        kw = {"input_ids": torch.cat([x["prompt_ids"][rows], comp], 1),
              "attention_mask": torch.cat([x["prompt_attn"][rows], comp_attn], 1),
              "position_ids": torch.cat([prompt_pos, comp_pos.expand(3, -1, -1)], 2)}
        if device is not None:
            kw = {k: v.to(device) for k, v in kw.items()}
        per_row = [f for b in groups.tolist() for f in features[b]]
        kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_row)}
        return kw

    def forward_logp(self, model: torch.nn.Module, rollout: Rollout, rows: torch.Tensor, *,
                     want_entropy: bool = True):
        """Per-token log-prob (and entropy) of the completion tokens of ``rows`` under
        ``softmax(model logits / temperature)``, in blocks of ``forward_batch`` rows.

        The encoded path runs the vision tower once per call, on the prompts of ``rows`` only
        (every prompt of the rollout with ``encode_all_prompts``). The LM head projects the T
        positions P-1 .. P+T-2 only (P the padded prompt length): the (n, T, V) logits are held
        for backward as they are, with no slice whose backward would allocate a zero-filled
        (n, T + 1, V) copy (``logprob_peak_bytes``).

        Shapes: rows (n,) -> (n, T), (n, T) float32 (entropy None if not wanted)."""
        device = next(model.parameters()).device
        comp_all = rollout.inputs["completion_ids"]
        p_len, t_len = rollout.inputs["prompt_ids"].shape[1], comp_all.shape[1]
        keep = torch.arange(p_len - 1, p_len - 1 + t_len, device=device)  # P-1+t predicts token t
        lps, ents = [], []
        features = None
        if self.encode_once and self.extend_mm_token_type_ids and "prompt_positions" in rollout.inputs:
            groups = None if self.encode_all_prompts else (rows.cpu() // rollout.inputs["group_size"]).tolist()
            with _checkpointing_forward(model):
                features = self.image_features(model, rollout, device, groups)
        for part in rows.split(self.forward_batch):
            reset_rope_deltas(model)
            with _checkpointing_forward(model):
                kw = (self.model_inputs(rollout, part, device) if features is None
                      else self.encoded_inputs(rollout, part, features, device))
                logits = model(**kw, use_cache=False, logits_to_keep=keep).logits  # (n, T, V)
            reset_rope_deltas(model)
            ids = self._scored_ids(comp_all[part.cpu()], rollout.inputs["completion_attn"][part.cpu()]).to(device)
            kw = {"temperature": self.temperature, "chunk": self.chunk, "masked_ids": self.suppress_ids}
            if want_entropy:
                lp, ent = selective_logp_and_entropy(logits, ids, **kw)
                ents.append(ent)
            else:
                lp = selective_logp(logits, ids, **kw)
            lps.append(lp)
        home = rollout.mask.device  # the loop combines these with the rollout's tensors
        logp = torch.cat(lps).to(home)
        ent = torch.cat(ents).to(home) if ents else None
        return logp, ent

    def _scored_ids(self, comp: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Completion ids with the padding after the EOS replaced by the EOS, a sampleable id
        (the pad id is a suppressed special token, whose log-prob is -inf)."""
        return torch.where(attn.bool(), comp, torch.full_like(comp, self.eos_id))

    def _info(self, total, per_fn, lengths, truncated, scored, old_ent, attn) -> dict[str, float]:
        vals = [r for r in total if r is not None]
        info = {"reward_mean": sum(vals) / len(vals) if vals else math.nan,
                "reward_std": float(torch.tensor(vals).std()) if len(vals) > 1 else 0.0,
                "scored_frac": float(scored.float().mean()),
                "completion_len_mean": float(lengths.float().mean()),
                "truncated_frac": float(truncated.float().mean())}
        if old_ent is not None:
            info["sample_entropy"] = float((old_ent * attn).sum() / attn.sum().clamp(min=1))
        for name, values in per_fn.items():
            v = [x for x in values if x is not None]
            info[f"reward/{name}"] = sum(v) / len(v) if v else math.nan
        return info

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict], *, batch_size: int = 16) -> dict[str, float]:
        """Greedy (argmax) completions for every item; mean of the weighted reward."""
        totals = []
        model = self.policy
        saved = model.generation_config
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig(eos_token_id=self.eos_id, pad_token_id=self.pad_id)
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
                batch = self.encode_prompts(items)
                pv, grid = self._visual_rows(batch["pixels"], batch["grids"], list(range(len(items))))
                device = next(model.parameters()).device
                reset_rope_deltas(model)
                out = model.generate(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device),
                                     mm_token_type_ids=batch["mm_token_type_ids"].to(device),
                                     pixel_values=pv.to(device), image_grid_thw=grid.to(device),
                                     do_sample=False, max_new_tokens=self.max_new_tokens,
                                     suppress_tokens=self.suppress_ids, eos_token_id=self.eos_id,
                                     pad_token_id=self.pad_id)
                reset_rope_deltas(model)
                texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:].cpu(),
                                                    skip_special_tokens=True)
                columns = {k: [it.get(k) for it in items] for k in items[0] if k != "prompt"}
                total, _ = compute_rewards(self.reward_funcs, self.reward_weights,
                                           prompts=[it["prompt"] for it in items], completions=texts,
                                           columns=columns, group_size=1)
                totals += [r for r in total if r is not None]
        finally:
            model.generation_config = saved
        return {"eval_reward_mean": sum(totals) / len(totals) if totals else math.nan,
                "eval_samples": len(totals)}


LOGIT_MEMORY_SHARE = 1 / 8
"""Share of a GPU's memory that ``micro_batch_for_memory`` lets the log-prob's logits take."""


def _block_tokens(rows: int, new_tokens: int, chunk: int) -> int:
    """Tokens of the largest block ``grpo_core.logprobs`` works on at once: its first block
    (``_blocks`` tiles the grid with equal blocks, the last one possibly smaller)."""
    from grpo_core.logprobs import _blocks

    first = next(_blocks(rows, new_tokens, chunk), None)
    return 0 if first is None else (first[0].stop - first[0].start) * (first[1].stop - first[1].start)


def logprob_peak_bytes(rows: int, new_tokens: int, vocab: int, itemsize: int, chunk: int = DEFAULT_CHUNK) -> int:
    """Peak bytes of ``forward_logp`` + backward that scale with the vocabulary, for ``rows``
    rows of ``new_tokens`` completion tokens (T) in a compute dtype of ``itemsize`` bytes:

        L     = rows * T * V * itemsize     the logits, held from the forward until backward
        c     = tokens of one block of the chunked log-prob (<= chunk)
        peak  = max(L + 17 * c * V,         forward: the logits, two blocks' float32 temporaries
                    2 * L + 9 * c * V)      backward: the logits, their gradient, one block's

    Measured exactly (slope in V of the live bytes, tests/test_vlm_forward_memory.py; the
    forward's 17 when the blocks have equal sizes, less otherwise: the previous block's copy
    and exp are still referenced while the next block's are made). Not
    included: the LM head's weight and its gradient (V x hidden), and the model's other
    activations (they grow with the hidden size and the prompt + completion length)."""
    big = rows * new_tokens * vocab * itemsize
    c = _block_tokens(rows, new_tokens, chunk)
    return max(big + 17 * c * vocab, 2 * big + 9 * c * vocab)


def micro_batch_for_memory(memory_bytes: int, new_tokens: int, vocab: int, itemsize: int, *,
                           share: float = LOGIT_MEMORY_SHARE, most: int = 64, chunk: int = DEFAULT_CHUNK) -> int:
    """The most rows (1 .. ``most``) whose ``logprob_peak_bytes`` fits in ``share`` of
    ``memory_bytes`` (1 if even one row does not)."""
    budget = share * memory_bytes
    fits = [n for n in range(1, most + 1) if logprob_peak_bytes(n, new_tokens, vocab, itemsize, chunk) <= budget]
    return max(fits, default=1)


def _pad(t: torch.Tensor, width: int | None, value, left: bool = False) -> torch.Tensor:
    """``t`` padded with ``value`` along its last dimension to ``width`` (None: as it is)."""
    if width is None:
        return t
    extra = width - t.shape[-1]
    return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)


@torch.no_grad()
def logprob_consistency(adapter: VLMAdapter, rollout: Rollout) -> float:
    """Max |generation-time log-prob - training-forward log-prob| over the valid completion
    tokens; needs a rollout collected with ``record_generation_logp=True``.

    The generation side is ``log_softmax`` of the processed scores of the sampling steps
    (``output_scores``: temperature and suppression applied, the distribution the tokens were
    drawn from), the training side ``adapter.forward_logp(policy, ...)``: the same distribution
    computed two ways (KV-cached incremental decoding with generate's processors vs one full
    forward with the adapter's masking), so any mismatch in positions, images, masks, the
    temperature or the suppressed ids shows up here. About 1e-6 in float32 when right.
    """
    gen = rollout.inputs.get("gen_sample_logp")
    if gen is None:
        raise ValueError("rollout has no generation log-probs; collect with record_generation_logp=True")
    n = gen.shape[0]
    train, _ = adapter.forward_logp(adapter.policy, rollout, torch.arange(n), want_entropy=False)
    valid = rollout.inputs["completion_attn"].bool()
    if not valid.any():
        return 0.0
    return float((gen - train.cpu())[valid].abs().max())


@contextlib.contextmanager
def _checkpointing_forward(model: torch.nn.Module):
    """transformers recomputes activations (gradient checkpointing) only in train mode, and
    the policy lives in eval mode (no dropout). For a forward that builds a graph on a model
    with checkpointing enabled, switch to train mode for the call only; Qwen2-VL's dropouts
    are 0 by default, so the function computed is the same."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # transformers < 5.2x names it so
    use = torch.is_grad_enabled() and bool(getattr(model, flag, False))
    was_training = model.training
    if use:
        model.train()
    try:
        yield
    finally:
        if use and not was_training:
            model.eval()


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation (gradient) checkpointing under either transformers name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
