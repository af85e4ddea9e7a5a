"""LoRA for the VLM adapter: the policy and its reference are two LoRA adapters on one base model.

Needs ``peft`` (the ``lora`` extra). ``LoRAVLMAdapter`` is a ``VLMAdapter`` whose model is
wrapped with ``peft.get_peft_model`` (LoRA injected in place into the model's linear layers):

- ``"policy"``: the trained adapter (the only parameters with ``requires_grad``, so the only
  ones the trainer's optimizer sees). LoRA's B starts at zero: the policy starts as the base
  model.
- ``"reference"``: a second adapter of the same shape on the same layers, frozen. It is added
  by ``make_reference()``, which returns a ``LoRAReference`` handle, not a model: the base
  weights exist once in memory, and a reference forward is the policy model's forward with the
  ``"reference"`` adapter active, under no_grad (``forward_logp`` switches and switches back).
- Refresh (the trainer calls ``adapter.refresh_reference(reference, config)``): hard copies the
  policy adapter's tensors into the reference adapter; soft mixes them,
  ``ref <- alpha * policy + (1 - alpha) * ref``, factor by factor. Note that the effective
  weight change of a LoRA layer is the product ``B @ A``, so mixing A and B separately is not
  the same as mixing the two weight changes (it is for alpha 0 and 1, and whenever the two
  adapters are equal); it is a mix of the adapters, not of the models.

Targets: by default the language model's attention and MLP projections
(``q/k/v/o_proj``, ``gate/up/down_proj``), not the vision tower (whose Qwen2.5-VL MLP uses the
same names) and not the embeddings or LM head. Dropout is 0: the adapter keeps the policy in
eval mode so that sampling and training see the same function.

``merged_state_dict`` / ``save_merged`` write the base model with the policy adapter merged
into its weights, a plain checkpoint that ``from_pretrained`` loads without peft.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from grpo_core._seeding import derive_seed

from .vlm import VLMAdapter

POLICY = "policy"
REFERENCE = "reference"
DEFAULT_TARGETS = r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
"""Regular expression (peft matches it against the full module name): every attention and MLP
projection outside the vision tower."""


def _require_peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without peft
        raise ImportError("LoRA needs peft: pip install 'grpo-harness[lora]' (or pip install peft)") from e
    return peft


def lora_config(rank: int, *, alpha: float | None = None, targets=DEFAULT_TARGETS):
    """``peft.LoraConfig`` of rank ``rank``, ``lora_alpha = alpha`` (default ``2 * rank``),
    dropout 0, no bias, on the modules matched by ``targets``."""
    peft = _require_peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    return peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0,
                           bias="none", target_modules=targets)


def _tuner_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_tensors(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """Every parameter of LoRA adapter ``adapter_name`` in ``model``, keyed by
    ``<module>.<lora_A|lora_B|...>[.<param>]`` (the adapter name left out, so that the keys of
    two adapters on the same layers are equal)."""
    out: dict[str, torch.nn.Parameter] = {}
    for mod_name, module in _tuner_layers(model):
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.nn.Parameter):
                out[f"{mod_name}.{attr}"] = item
            else:
                for pname, p in item.named_parameters():
                    out[f"{mod_name}.{attr}.{pname}"] = p
    return out


class LoRAReference(torch.nn.Module):
    """What ``LoRAVLMAdapter.make_reference`` returns: a handle to the ``"reference"`` adapter.

    It owns no weights (the model is not registered as a submodule). ``state_dict()`` holds the
    reference adapter's tensors (keys as ``adapter_tensors``) and ``load_state_dict`` copies
    into them in place, so the trainer's checkpoints carry the reference as usual. Pass it back
    to the adapter's ``logp_and_entropy`` / ``forward_logp`` for reference log-probs.
    """

    def __init__(self, owner: LoRAVLMAdapter):
        super().__init__()
        self.__dict__["_owner"] = owner  # plain attribute: not a submodule, no second copy

    @property
    def owner(self) -> LoRAVLMAdapter:
        return self.__dict__["_owner"]

    def tensors(self) -> dict[str, torch.nn.Parameter]:
        return adapter_tensors(self.owner.policy, self.owner.reference_name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, p in self.tensors().items():
            destination[prefix + name] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = self.tensors()
        for name, p in own.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != p.shape:
                error_msgs.append(f"size mismatch for {key}: {tuple(value.shape)} in the state dict, "
                                  f"{tuple(p.shape)} in the reference adapter")
                continue
            with torch.no_grad():
                p.copy_(value)
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix):] not in own:
                unexpected_keys.append(key)

    def forward(self, *args, **kwargs):
        raise TypeError("LoRAReference is a handle, not a model: pass it to the adapter's "
                        "logp_and_entropy / forward_logp")


class LoRAVLMAdapter(VLMAdapter):
    """``VLMAdapter`` with a LoRA policy and a LoRA reference on one shared base model.

    ``model`` is wrapped in place (``peft.get_peft_model``); ``self.peft`` is the PeftModel,
    ``self.policy`` the original model object, now holding the LoRA layers (``generate``, the
    rope-delta reset and every other ``VLMAdapter`` convention work on it unchanged). Other
    arguments as ``VLMAdapter``.
    """

    def __init__(self, model, processor, dataset, reward_funcs, *, lora_rank: int,
                 lora_alpha: float | None = None, lora_targets=DEFAULT_TARGETS, **kwargs):
        peft = _require_peft()
        self.lora_config = lora_config(lora_rank, alpha=lora_alpha, targets=lora_targets)
        self.policy_name, self.reference_name = POLICY, REFERENCE
        # LoRA's A matrices are drawn from the global stream: fork it and seed it from ``seed``, so
        # two adapters built with the same seed start alike whatever ran before in the process
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(derive_seed(kwargs.get("seed", 0), "lora-init"))
            self.peft = peft.get_peft_model(model, self.lora_config, adapter_name=POLICY)
        base = self.peft.get_base_model()
        if not adapter_tensors(base, POLICY):
            raise ValueError(f"LoRA targets {lora_targets!r} matched no module of {type(base).__name__}")
        super().__init__(base, processor, dataset, reward_funcs, **kwargs)

    # -- reference ---------------------------------------------------------------------------

    def make_reference(self) -> LoRAReference:
        """Add the frozen ``"reference"`` adapter (once) as a copy of the policy adapter."""
        if self.reference_name not in self.peft.peft_config:
            self.peft.add_adapter(self.reference_name, self.lora_config)
        self.peft.set_adapter(self.policy_name)  # policy active and trainable, reference frozen
        ref = LoRAReference(self)
        for p in ref.tensors().values():
            p.requires_grad_(False)
        self._mix(ref, 1.0)
        return ref

    def reference_pairs(self, reference: LoRAReference):
        """``(name, policy tensor, reference tensor)`` for every adapter tensor: what "the
        reference equals the policy" means here (the base weights are one and the same)."""
        pol = adapter_tensors(self.policy, self.policy_name)
        ref = reference.tensors()
        if pol.keys() != ref.keys():
            raise ValueError(f"policy and reference adapters differ in layout: "
                             f"{sorted(pol.keys() ^ ref.keys())[:3]}")
        return [(k, pol[k], ref[k]) for k in pol]

    @torch.no_grad()
    def _mix(self, reference: LoRAReference, alpha: float) -> None:
        for _, pol, ref in self.reference_pairs(reference):
            if alpha == 1.0:
                ref.copy_(pol)
            else:
                ref.mul_(1.0 - alpha).add_(pol.to(ref.dtype), alpha=alpha)

    def refresh_reference(self, reference: LoRAReference, config) -> None:
        """Hard: reference adapter <- policy adapter; soft: ``alpha * policy + (1 - alpha) * ref``
        per adapter tensor (``config.ref_mix_alpha``)."""
        alpha = 1.0 if config.ref_update == "hard" else float(config.ref_mix_alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is outside [0, 1]")
        self._mix(reference, alpha)

    @contextmanager
    def reference_active(self):
        """Within: the model computes the reference (``"reference"`` adapter active, no grad)."""
        self.peft.set_adapter(self.reference_name)
        try:
            with torch.no_grad():
                yield
        finally:
            self.peft.set_adapter(self.policy_name)  # also re-freezes the reference adapter

    # -- log-probs ---------------------------------------------------------------------------

    def forward_logp(self, model, rollout, rows, *, want_entropy: bool = True):
        if isinstance(model, LoRAReference):
            if model.owner is not self:
                raise ValueError("this LoRAReference belongs to another adapter")
            with self.reference_active():
                return super().forward_logp(self.policy, rollout, rows, want_entropy=want_entropy)
        return super().forward_logp(model, rollout, rows, want_entropy=want_entropy)

    # -- export ------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict with the policy adapter merged into each LoRA layer's
        weight (``W + scaling * B @ A``); LoRA tensors dropped, ``base_layer`` names restored.
        The model itself is left as it is. The sum is taken in float32 and a merged weight is
        float32 whatever the base's dtype: a delta added to a bf16 base would be rounded to the
        base's bf16 grid, and a delta below half a bf16 ulp of its weight, which acted in training
        (the adapter's path is applied apart), would vanish (61% of the entries of a delta of 1e-4
        against weights of 0.02)."""
        layers = dict(_tuner_layers(self.policy))
        names = sorted({a for m in layers.values() for a in m.adapter_layer_names})
        lora_part = re.compile(r"\.(" + "|".join(map(re.escape, names)) + r")\.")
        out = {}
        for key, value in self.policy.state_dict().items():
            if lora_part.search(key):
                continue
            if ".base_layer." in key:
                owner, _, leaf = key.rpartition(".base_layer.")
                if leaf == "weight" and owner in layers and self.policy_name in getattr(layers[owner], "lora_A", {}):
                    delta = layers[owner].get_delta_weight(self.policy_name)
                    value = value.float() + delta.float()
                key = f"{owner}.{leaf}"
            out[key] = value
        return out

    def save_merged(self, path) -> Path:
        """``save_pretrained`` of the merged model (see ``merged_state_dict``) into ``path``."""
        path = Path(path)
        self.policy.save_pretrained(path, state_dict=self.merged_state_dict())
        return path
