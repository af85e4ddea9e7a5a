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
completion's index n (group n // G, member n % G): a NaN or infinite value, a value beyond
float32's range (rewards are float32 tensors: 1e300 would become inf there), a value that is not
a number, a result of the wrong length, an exception inside the function, a ``sys.exit`` call
(``SystemExit``: a reward that ends the process would read as a successful run), or a call that
does not return within the time limit (``limits``).

Each function gets its own copy of the lists it is passed (and of the lists and dicts inside
them: a conversational prompt), so one that changes them (``completions.clear()``,
``completions[i] = "..."``) changes nothing for the next function or the caller.

``limits(timeout=S, say=f)`` around training bounds every call to S seconds
(``adapters.time_limit``, main thread only) and says through ``f`` which function is still
running after ``SLOW_AFTER_S`` seconds. ``train vlm`` sets it from ``--reward-timeout``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import pathlib
import numbers
from collections.abc import Callable, Sequence

from .time_limit import TimeLimitExceeded, time_limit

RewardFn = Callable[..., Sequence]
FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: the rewards become a float32 tensor."""
SLOW_AFTER_S = 10.0
"""Seconds after which a reward function still running is named (with ``limits``' ``say``)."""


@dataclasses.dataclass
class RewardLimits:
    timeout: float | None = None
    """Seconds one call may take; None or 0: no limit."""
    say: Callable[[str], None] | None = None
    """Where the note on a slow function goes; None: nowhere."""
    slow_after: float | None = None
    """Seconds before that note; None: ``SLOW_AFTER_S``."""


_limits = RewardLimits()


@contextlib.contextmanager
def limits(timeout: float | None = None, say: Callable[[str], None] | None = None, slow_after: float | None = None):
    """Within the block, every reward call is bounded by ``timeout`` seconds and a slow one is
    named through ``say``; yields the ``RewardLimits`` (its fields may be set later, once known).
    ``slow_after`` overrides ``SLOW_AFTER_S``."""
    global _limits
    previous, _limits = _limits, RewardLimits(timeout, say, slow_after)
    try:
        yield _limits
    finally:
        _limits = previous


def _own_copy(value):
    """``value`` with every list, tuple and dict in it copied (strings, numbers and other objects,
    e.g. images, are shared): what one reward function may change without another seeing it."""
    if isinstance(value, list):
        return [_own_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_own_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _own_copy(v) for k, v in value.items()}
    return value


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
        batch = f"a batch of {n} completions ({n // group_size} groups of {group_size})"
        limit = _limits.timeout
        say = _limits.say

        def slow(elapsed: float, name=name, batch=batch, limit=limit, say=say) -> None:
            bound = f" (limit {limit:g} s, --reward-timeout)" if limit else ""
            say(f"reward function {name!r} is still running after {elapsed:.0f} s on {batch}{bound}")

        def lost(name=name, say=say, limit=limit) -> None:
            if say is not None and limit:
                say(f"reward function {name!r} set its own SIGALRM timer (signal.alarm): --reward-timeout "
                    "could not apply to that call")

        try:
            with time_limit(limit, slow_after=_limits.slow_after or SLOW_AFTER_S,
                            on_slow=slow if say is not None else None, on_lost=lost):
                values = fn(prompts=_own_copy(prompts), completions=list(completions),
                            **{key: _own_copy(col) for key, col in columns.items()})
        except TimeLimitExceeded:
            raise ValueError(f"reward function {name!r} did not return within {limit:g} s (--reward-timeout) "
                             f"on {batch}") from None
        except SystemExit as exc:
            raise ValueError(f"reward function {name!r} called sys.exit({exc.code!r}); a reward function "
                             "returns its scores, it does not end the process") from None
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
            if abs(float(v)) > FLOAT32_MAX:
                raise ValueError(f"reward function {name!r} returned {float(v)!r} for {where}: beyond float32's "
                                 f"range (|r| <= {FLOAT32_MAX:.3g}), in which rewards are kept")
        per_function[key] = [None if v is None else float(v) for v in values]
        for i, v in enumerate(values):
            if total[i] is not None:
                total[i] = None if v is None else total[i] + float(w) * float(v)
                if total[i] is not None and not abs(total[i]) <= FLOAT32_MAX:
                    where = f"sample {i} (group {i // group_size}, completion {i % group_size})"
                    raise ValueError(f"the weighted reward of {where} is {total[i]!r} after reward function "
                                     f"{name!r}: beyond float32's range (|r| <= {FLOAT32_MAX:.3g})")
    return total, per_function
