"""TRL's ``GRPOConfig`` names, as a TRL user types them, and what they are called here.

``hint(key, value)`` is the one-line answer when ``key`` is not a ``GRPOConfig`` field here but
is one of TRL's: ``TRL's num_iterations is grpo_epochs here (--set grpo_epochs=2)``; the run
module says it for ``--set`` and config files (the README's "What a TRL script still changes"
lists the same names). Names that are the same in both (``beta``, ``seed``, ``max_grad_norm``)
need no entry.
"""

from __future__ import annotations

import json
from typing import Any

RENAMED: dict[str, str] = {
    "num_iterations": "grpo_epochs",
    "num_generations": "group_size",
    "learning_rate": "lr",
    "epsilon": "clip_eps_low",
    "epsilon_high": "clip_eps_high",
    "ref_model_sync_steps": "update_ref_model_freq",
    "ref_model_mixup_alpha": "ref_mix_alpha",
}
"""TRL's name -> the GRPOConfig field here that means the same."""
FLAGS: dict[str, str] = {
    "max_completion_length": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
}
"""TRL's name -> the ``train vlm`` option here (sampling is the adapter's, not GRPOConfig's)."""
LOSS_TYPES = {"dapo": "token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "grpo": "seq-mean-token-mean"}
"""TRL's ``loss_type`` -> ``loss_agg`` here (bnpo normalises per local batch, token-mean per minibatch)."""
SCALE_REWARDS = {True: "group", "group": "group", "true": "group", False: "none", "none": "none", "false": "none",
                 "batch": "batch"}
"""TRL's ``scale_rewards`` -> ``scale`` here."""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def hint(key: str, value: Any = None) -> str | None:
    """``TRL's KEY is ... here (...)`` for a TRL name, None for any other key."""
    given = value is not None
    if key in RENAMED:
        ours = RENAMED[key]
        return f"TRL's {key} is {ours} here (--set {ours}={_text(value) if given else '...'})"
    if key in FLAGS:
        flag = FLAGS[key]
        return (f"TRL's {key} is the train vlm option {flag} here, not a GRPOConfig key "
                f"({flag} {_text(value) if given else 'VALUE'})")
    if key == "importance_sampling_level":
        level = {"sequence": "sequence", "token": "token"}.get(value if isinstance(value, str) else "", None)
        return (f"TRL's importance_sampling_level is ratio_level here"
                + (f" (--set ratio_level={level})" if level else " (token, sequence = GSPO, sequence-token = GSPO-token)"))
    if key == "loss_type" and isinstance(value, str) and value.lower() == "cispo":
        return ("TRL's loss_type=cispo is --set policy_loss=cispo here (loss_agg stays token-mean); TRL's "
                "epsilon_high is CISPO's cap itself, here the cap is 1 + clip_eps_high (epsilon_high=5 is "
                "--set clip_eps_high=4)")
    if key == "loss_type":
        key_value = value.lower() if isinstance(value, str) else value
        if key_value in LOSS_TYPES:
            return f"TRL's loss_type is loss_agg here: loss_type={_text(value)} is --set loss_agg={LOSS_TYPES[key_value]}"
        pairs = ", ".join(f"{k} -> {v}" for k, v in LOSS_TYPES.items())
        return f"TRL's loss_type is loss_agg here ({pairs})"
    if key == "scale_rewards":
        key_value = value.lower() if isinstance(value, str) else value
        if key_value in SCALE_REWARDS:
            return f"TRL's scale_rewards is scale here: scale_rewards={_text(value)} is --set scale={SCALE_REWARDS[key_value]}"
        return "TRL's scale_rewards is scale here (true/group -> group, batch -> batch, false/none -> none)"
    if key in ("generation_batch_size", "per_device_train_batch_size", "steps_per_generation"):
        return (f"TRL's {key} has no one name here: a batch is groups_per_iteration prompts x group_size "
                "completions (--set groups_per_iteration=BATCH/num_generations); minibatches splits it")
    if key == "sync_ref_model":
        return ("TRL's sync_ref_model is ref_update here: sync_ref_model=true is --set ref_update=soft with "
                "ref_mix_alpha (TRL's ref_model_mixup_alpha) every update_ref_model_freq iterations")
    if key == "mask_truncated_completions":
        return ("TRL's mask_truncated_completions is not an option here: a reward function that returns None for "
                "a completion masks it out (train vlm)")
    return None
