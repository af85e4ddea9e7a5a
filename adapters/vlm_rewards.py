"""Reward functions for the VLM adapter, with TRL's calling convention.

A reward function is called once per rollout batch as

    reward_fn(prompts=[...], completions=[...], **columns) -> list[float | None]

with one entry per completion (N = B * G): ``prompts[n]`` is the dataset's ``prompt`` value of
the completion's prompt, ``completions[n]`` the decoded completion text (special tokens
skipped) and ``columns`` every other dataset column, also repeated per completion (e.g.
``answer=[...]``, ``image=[...]``). Functions should accept ``**kwargs`` for the columns they
do not use, as TRL requires.

Several functions are combined with weights: ``reward = sum_k w_k * r_k``. ``None`` from any
function marks the completion as unscorable: it is masked out of the loss and of the group
statistics (its mask row is all zero). (TRL instead ignores a None when another function scores
the sample; here one None is enough, which keeps a partially scored sample out of training.)

Errors stop the run with a ValueError naming the function and, where there is one, the
completion's index n (group n // G, member n % G): a NaN or infinite value, a value that is not
a number, a result of the wrong length, or an exception inside the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pathlib
import numbers
from collections.abc import Callable, Sequence

RewardFn = Callable[..., Sequence]


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def load_reward(spec: str) -> RewardFn:
    """``"package.module:function"`` -> the function (``"path/to/file.py:function"`` works too)."""
    if ":" not in spec:
        raise ValueError(f"reward {spec!r} must look like 'module:function'")
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = pathlib.Path(module_name)
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ValueError(f"cannot import reward file {module_name!r}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no reward function {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


def compute_rewards(funcs: Sequence[RewardFn], weights: Sequence[float] | None, *, prompts: list,
                    completions: list[str], columns: dict[str, list], group_size: int):
    """Call every function and combine: returns ``(total, per_function)`` where ``total[n]`` is
    the weighted sum (None if any function returned None for n) and ``per_function[name]`` the
    raw values of each function (for logging)."""
    n = len(completions)
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    per_function: dict[str, list] = {}
    total: list[float | None] = [0.0] * n
    for k, (fn, w) in enumerate(zip(funcs, weights)):
        name = reward_name(fn)
        key = name if name not in per_function else f"{name}_{k}"
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:  # noqa: BLE001 - re-raised with the function's name
            raise ValueError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        try:
            values = list(values)
        except TypeError:
            raise ValueError(f"reward function {name!r} returned {type(values).__name__}, "
                             f"expected a list of {n} floats or None") from None
        if len(values) != n:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} "
                             "completions")
        for i, v in enumerate(values):
            if v is None:
                continue
            where = f"sample {i} (group {i // group_size}, completion {i % group_size})"
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) "
                                 f"for {where}; expected a float or None")
            if not math.isfinite(float(v)):
                raise ValueError(f"reward function {name!r} returned {float(v)} for {where}")
        per_function[key] = [None if v is None else float(v) for v in values]
        for i, v in enumerate(values):
            if total[i] is not None:
                total[i] = None if v is None else total[i] + float(w) * float(v)
    return total, per_function
