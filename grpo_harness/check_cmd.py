"""``grpo-harness check-estimator``: property-test a KL, advantage, returns estimator or a loss.

::

    grpo-harness check-estimator TARGET --kind kl|advantage|returns|loss
        [--json] [--seed N] [--samples N] [--expect CLAIMS]

TARGET is ``package.module:function``, ``path/to/file.py:function`` or ``builtin:NAME``
(``k1``, ``k2``, ``k3``, ``k3_is``, ``group_advantages``, ``discounted_returns``,
``policy_loss``, ``policy_loss_dual_clip``; for these ``--kind`` may be left out).
``--expect`` adds claims to (and overrides) those of the function's ``@declares``, comma
separated: ``unbiased``, ``nonnegative``, ``grad=...``, ``clamp=C`` (kl); ``std_scaled``,
``bessel=true|false``, ``eps=E``, ``singleton=zero|raw|unsupported`` (advantage);
``eps_low=E``, ``eps_high=E``, ``agg=NAME``, ``max_len=L``, ``clip_ratio_c=C|none`` (loss).

Prints one row per check (name, PASS/FAIL/info, value, bound, explanation), or the rows as
JSON with ``--json``. Exit status: 0 when every required and claimed check passes, 1 when one
fails, 2 on a usage error (target not found, import error, not callable, wrong signature,
raising on a basic call, an unknown or ill-typed claim, a function that does not return within
``--timeout`` seconds, default 600, all checks together), said in one line on stderr; a function
still running after 10 s is named on stderr meanwhile. Ctrl-C: one line, exit 130.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

KIND_CHOICES = ("kl", "advantage", "returns", "loss")
DEFAULT_TIMEOUT_S = 600.0
SLOW_AFTER_S = 10.0
"""Seconds after which the function under test is named as still running."""


class UsageError(Exception):
    """A one-line reason why the target cannot be checked (exit status 2)."""


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="property-test a KL, advantage or returns estimator, or a policy loss",
        description="Property-test an estimator: exit 0 when every required and claimed check "
        "passes, 1 when one fails, 2 on a usage error.",
    )
    p.add_argument("target", help="package.module:function, path/to/file.py:function, or "
                   "builtin:NAME (k1, k2, k3, k3_is, group_advantages, discounted_returns, "
                   "policy_loss, policy_loss_dual_clip)")
    p.add_argument("--kind", choices=KIND_CHOICES,
                   help="estimator kind (may be left out for builtin targets)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checks (default 0)")
    p.add_argument("--samples", type=int, default=None,
                   help="tokens sampled per categorical pair in the unbiasedness check "
                   "(default 20000)")
    p.add_argument("--expect", default=None,
                   help="claims, comma-separated. kl: unbiased, nonnegative, "
                   "grad=kl_policy_ref|kl_ref_policy|zero|neither, clamp=C; advantage: "
                   "std_scaled, bessel=true|false, eps=E, singleton=zero|raw|unsupported; "
                   "loss: eps_low=E, eps_high=E, agg=token-mean|seq-mean-token-mean|"
                   "seq-mean-token-sum|seq-mean-token-sum-norm|grpo, max_len=L, "
                   "clip_ratio_c=C|none")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"stop when the checks take more than S seconds in all, naming the function (a function "
                   f"that never returns); 0 = no limit (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(run=run)


def _load_file(path_text: str):
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"file not found: {path_text}")
    mod_name = "_grpo_estimator_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load {path_text} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)  # sibling imports of the user's file
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise UsageError(f"importing {path_text} failed: {type(e).__name__}: {_line(e)}") from None
    return module


def _line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""


def resolve_target(target: str):
    """The object ``target`` names; raises :class:`UsageError`. Imports nothing heavy itself."""
    if target.startswith("builtin:"):
        from grpo_core.testing.kit import BUILTINS

        name = target.split(":", 1)[1]
        if name not in BUILTINS:
            raise UsageError(f"unknown builtin {name!r}; choose one of {', '.join(BUILTINS)}")
        return BUILTINS[name]
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"target {target!r} must look like package.module:function, "
                         "path/to/file.py:function or builtin:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise UsageError(f"module not found: {where} ({_line(e)})") from None
        except Exception as e:
            raise UsageError(f"importing {where} failed: {type(e).__name__}: {_line(e)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{where}:{attr} is not callable (it is a {type(obj).__name__})")
    return obj


def _print_json(target, kind, claims, rows, ok) -> None:
    doc = {
        "target": target,
        "kind": kind,
        "claims": claims,
        "passed": ok,
        "rows": [r.to_dict() for r in rows],
    }
    print(json.dumps(doc, indent=2))


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"check-estimator: interrupted (Ctrl-C) while checking {args.target}; nothing was written",
              file=sys.stderr, flush=True)
        return 130


def _run(args) -> int:
    import math

    from adapters.time_limit import TimeLimitExceeded, time_limit

    try:
        timeout = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
            raise UsageError(f"--timeout {timeout!r}: expected a number of seconds >= 0 (0: no limit)")
        if args.kind is None and not args.target.startswith("builtin:"):
            raise UsageError("--kind is required (kl, advantage, returns or loss)")
        fn = resolve_target(args.target)
        from grpo_core.testing.kit import (  # torch is imported here, not at CLI start
            BUILTIN_KINDS,
            EstimatorUsageError,
            all_passed,
            check_estimator,
            format_table,
            get_claims,
            parse_expect,
        )

        kind = args.kind
        if args.target.startswith("builtin:"):
            own = BUILTIN_KINDS[args.target.split(":", 1)[1]]
            if kind is None:
                kind = own
            elif kind != own:
                raise UsageError(f"{args.target} is a {own} estimator, not {kind}")
        try:
            claims = {**get_claims(fn), **parse_expect(args.expect)}
            kwargs = {} if args.samples is None else {"samples": args.samples}
            name = getattr(fn, "__name__", args.target)

            def slow(elapsed: float) -> None:
                bound = f" (limit {timeout:g} s, --timeout)" if timeout else ""
                print(f"check-estimator: {name} is still running after {elapsed:.0f} s{bound}",
                      file=sys.stderr, flush=True)

            with time_limit(timeout, slow_after=SLOW_AFTER_S, on_slow=slow):
                rows = check_estimator(fn, kind, claims=claims, seed=args.seed, **kwargs)
        except EstimatorUsageError as e:
            raise UsageError(f"{args.target}: {e}") from None
        except TimeLimitExceeded:
            raise UsageError(f"{args.target}: {name} did not return within {timeout:g} s (--timeout; the checks "
                             "call it many times, a correct estimator takes seconds)") from None
    except UsageError as e:
        print(f"check-estimator: error: {e}", file=sys.stderr)
        return 2
    ok = all_passed(rows)
    if args.json:
        _print_json(args.target, kind, claims, rows, ok)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in claims.items()) or "none"
        print(f"check-estimator {args.target} (kind {kind}; claims: {shown})")
        print(format_table(rows))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run this subcommand alone: ``python -m grpo_harness.check_cmd TARGET --kind ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="grpo-harness")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, "check-estimator")
    args = parser.parse_args(["check-estimator", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
