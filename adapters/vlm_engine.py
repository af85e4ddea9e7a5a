"""Sampling engines for the VLM adapter: what generates the completions, apart from what trains.

The adapter (``adapters.vlm.VLMAdapter``) encodes the prompts, hands the engine one
``SamplingRequest`` per rollout and gets back a ``Generation``: the sampled token ids and, from
an engine that is not the trained policy itself, the log-prob the engine gave each sampled token
under the distribution it sampled from (``softmax(logits / temperature)`` over the ids that are
not suppressed). Before every rollout the adapter calls ``engine.sync(policy)`` with the
trainer's module, so the engine samples with the weights of the latest optimizer step. Syncing
before each rollout rather than after each optimizer step gives the same weights at every
sampling (nothing samples in between) with one copy per rollout instead of one per step; a
dynamic-sampling redraw syncs again (a copy of unchanged weights).

Two engines run here:

``PolicyEngine``
    The policy itself (the default; what the adapter always did): ``sync`` points at the
    trainer's module, ``generate`` is ``hf_generate`` on it, and no engine log-probs are
    reported (``Generation.logp`` None, ``Rollout.engine_logp`` None), so the loop computes no
    mismatch and applies no correction: training is bit-identical to the adapter without an
    engine.
``CopyEngine``
    A separate copy of the policy in another dtype (bf16 by default; float32 for checks),
    ``sync`` copies the trainer's parameters and persistent buffers into it (cast), and
    ``generate`` samples with it and records, at every step, ``log_softmax`` of the scores the
    token is drawn from, after suppression and temperature (``SampledLogp``, last processor of
    the list). Same weights as the trainer, other arithmetic: the trainer's log-probs of the same
    tokens differ by rounding only (bf16 on the tiny model: a mean |gap| of 6e-4 to 6e-3 nats), a
    real mismatch of the kind an inference engine brings, measured by the loop
    (``mismatch_kl``, ``is_ratio_*``) and corrected (``GRPOConfig.engine_correction``).

An inference server (vLLM, SGLang) plugs into the same two calls, as an object with
``separate = True``, a ``name`` and a ``dtype`` (the preflight's bound; None counts as bf16);
README, "Sampling engines":

- ``sync(policy)``: load the trainer's weights after each optimizer step (a weight-update call
  with the state dict, or a checkpoint path the server reloads), every tensor the forward reads;
  a missed update shows as a jump of ``mismatch_kl`` and fails the preflight's
  ``engine_consistency`` row.
- ``generate(request)``: the prompts' token ids and images, ``n = num_return_sequences`` samples
  each, ``temperature``, ``max_tokens = max_new_tokens``, top-p 1 and top-k off (a truncation the
  trainer does not apply makes its log-probs score another distribution), the suppressed ids
  banned (a logit bias of -inf), stop at ``eos_id``; the random seed from ``request.seed``.
  ``Generation.logp`` is the log-prob of every sampled token taken from the engine's
  *processed* log-probs (vLLM: ``logprobs_mode="processed_logprobs"``, temperature applied; its
  default returns the raw model's, the mistake of TRL issue 4159), one per token of every
  completion, the EOS included; ``sequences`` the prompt ids followed by the completion ids
  (right-padded with ``pad_id``), as ``transformers``' ``generate`` returns them.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

ENGINES = ("policy", "copy-bf16")
"""``train vlm --engine`` choices: the policy itself, or a bf16 copy of it (``make_engine``)."""


@dataclass
class SamplingRequest:
    """What the adapter asks an engine for: ``num_return_sequences`` completions of each prompt
    row (row ``b * n + i`` of the answer is sample ``i`` of prompt row ``b``).

    Shapes: input_ids, attention_mask, mm_token_type_ids (B, P) on the CPU, left-padded;
    pixel_values (patches, features) and image_grid_thw (images, 3) of the B rows' images."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    num_return_sequences: int
    seed: int
    """Seed of the sampling's random stream (the global stream is left as it was)."""
    temperature: float
    top_p: float
    max_new_tokens: int
    suppress_ids: list[int]
    eos_id: int
    pad_id: int
    keep_scores: bool = False
    """Also return each step's raw logits and processed scores (``logprob_consistency``)."""


@dataclass
class Generation:
    """An engine's answer. Shapes: sequences (N, P + T); logp (N, T) float32 on the CPU."""

    sequences: torch.Tensor
    """Prompt ids then completion ids; after a row's EOS, ``pad_id``."""
    logp: torch.Tensor | None = None
    """The engine's log-prob of each sampled token under the distribution it drew it from;
    None: the trained policy sampled (nothing to compare). Values after a row's EOS are not read."""
    scores: tuple | None = None
    """Per step (N, V): the processed scores the tokens were drawn from (with ``keep_scores``)."""
    logits: tuple | None = None
    """Per step (N, V): the raw logits (with ``keep_scores``)."""


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that caches ``rope_deltas`` (``model.model`` for the ...ForConditionalGeneration
    classes)."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "rope_deltas") else model


def reset_rope_deltas(model: torch.nn.Module) -> None:
    """Forget the M-RoPE offsets that ``generate`` cached on the model."""
    inner = inner_model(model)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


class SampledLogp:
    """A logits processor that records the log-prob of each sampled token under the scores it
    receives; placed last in ``generate``'s list, those are the scores the token is drawn from.

    At each call it keeps ``log_softmax(scores)`` (N, V) of the step and reads the previous step's
    at the token ``generate`` appended since (the last column of ``input_ids``); ``finish`` reads
    the last step's at the last column of the output. One step's (N, V) is held at a time, not
    the (N, T, V) of ``output_scores``."""

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]))
        self.pending = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Shapes: sequences (N, P + T) -> (N, T) float32 on the CPU."""
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sequences[:, -1:].to(self.pending.device)))
            self.pending = None
        return torch.cat(self.steps, 1).cpu()


def hf_generate(model: torch.nn.Module, request: SamplingRequest, *, processors: list | None = None,
                temperature: float | None = None):
    """``model.generate`` on ``request`` (transformers' output: ``sequences``, and ``logits`` /
    ``scores`` with ``keep_scores``): sampling with ``temperature`` (default the request's),
    top-k 0, the request's top-p, the suppressed ids; ``processors`` (optional) go after
    transformers' own processors and before its warpers (temperature, top-k, top-p). The model's
    ``generation_config`` is swapped out for the call, its M-RoPE cache reset before and after,
    and the random stream seeded from ``request.seed`` inside a fork of the global one."""
    from transformers import GenerationConfig, LogitsProcessorList

    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=request.eos_id, pad_token_id=request.pad_id)
    reset_rope_deltas(model)
    first = next(model.parameters())
    device = first.device
    extra = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(request.seed)
            out = model.generate(
                input_ids=request.input_ids.to(device), attention_mask=request.attention_mask.to(device),
                mm_token_type_ids=request.mm_token_type_ids.to(device),
                pixel_values=request.pixel_values.to(device=device, dtype=first.dtype),
                image_grid_thw=request.image_grid_thw.to(device),
                num_return_sequences=request.num_return_sequences,
                do_sample=True, temperature=request.temperature if temperature is None else temperature,
                top_p=request.top_p, top_k=0, max_new_tokens=request.max_new_tokens,
                suppress_tokens=request.suppress_ids, eos_token_id=request.eos_id, pad_token_id=request.pad_id,
                return_dict_in_generate=True, output_logits=request.keep_scores,
                output_scores=request.keep_scores, **extra)
    finally:
        model.generation_config = saved
        reset_rope_deltas(model)
    return out


class PolicyEngine:
    """Samples with the trained policy itself; reports no engine log-probs (module docstring)."""

    separate = False
    """False: the samples come from the trained policy (no mismatch to measure)."""
    name = "policy"

    def __init__(self):
        self.model: torch.nn.Module | None = None

    def sync(self, policy: torch.nn.Module) -> None:
        """Sample with ``policy`` itself: nothing to copy."""
        self.model = policy

    def generate(self, request: SamplingRequest) -> Generation:
        if self.model is None:
            raise RuntimeError("PolicyEngine.generate before sync(policy): no model to sample with")
        out = hf_generate(self.model, request)
        return Generation(out.sequences, None, out.scores, out.logits)


class CopyEngine:
    """A copy of the policy in ``dtype`` that samples and reports its log-probs (module docstring).

    The copy is made once (``copy.deepcopy``, then every floating parameter cast to ``dtype``;
    buffers such as the rotary frequencies keep the policy's dtype), frozen and in eval mode;
    ``sync`` overwrites its parameters and persistent buffers in place with the trainer's
    (``Tensor.copy_`` casts). Memory: one more model in ``dtype``."""

    separate = True

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.name = f"copy-{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')}"
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        self.model.eval()
        self.syncs = 0
        """How many times ``sync`` copied the weights (a test reads it)."""

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the trainer's weights into the engine, cast to its dtype."""
        source = policy.state_dict()
        mine = self.model.state_dict()
        if source.keys() != mine.keys():
            odd = sorted(source.keys() ^ mine.keys())
            raise ValueError(f"CopyEngine.sync: the policy's tensors differ from the engine's, e.g. {odd[:3]}")
        for name, tensor in mine.items():
            tensor.copy_(source[name])
        self.syncs += 1

    @torch.no_grad()
    def weight_gap(self, policy: torch.nn.Module) -> tuple[float, str | None]:
        """Largest |engine tensor - policy tensor cast to the engine's dtype| and where: 0 right
        after ``sync`` (the preflight reads it)."""
        source = policy.state_dict()
        worst, where = 0.0, None
        for name, tensor in self.model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            gap = float((tensor - source[name].to(tensor.dtype)).abs().max()) if tensor.numel() else 0.0
            if gap > worst or gap != gap:
                worst, where = gap, name
        return worst, where

    def generate(self, request: SamplingRequest) -> Generation:
        record = SampledLogp()
        # temperature applied by our own warper, before the recorder: transformers applies its
        # warpers after every processor it is given, so a recorder given with temperature=T
        # would read the untempered scores (TRL issue 4159's mistake)
        warp = [] if request.temperature == 1.0 else [_temperature(request.temperature)]
        with _compute_in(self.model):
            out = hf_generate(self.model, request, processors=[*warp, record], temperature=1.0)
        return Generation(out.sequences, record.finish(out.sequences), out.scores, out.logits)


def _temperature(value: float):
    from transformers import TemperatureLogitsWarper

    return TemperatureLogitsWarper(value)


@contextlib.contextmanager
def _compute_in(model: torch.nn.Module):
    """Run the engine in its own dtype: autocast (the trainer's ``bf16-mixed`` rollout context) off."""
    device = next(model.parameters()).device.type
    with torch.autocast(device_type=device, enabled=False):
        yield


def make_engine(name: str, model: torch.nn.Module):
    """The engine ``train vlm --engine NAME`` samples with (``ENGINES``)."""
    if name == "policy":
        return PolicyEngine()
    if name == "copy-bf16":
        return CopyEngine(model, torch.bfloat16)
    raise ValueError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
