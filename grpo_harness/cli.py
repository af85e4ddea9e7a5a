"""``grpo-harness`` command line: ``train``, ``check-estimator``, ``report``, ``ablate``,
``gpu-check``, ``inspect``.

Each subcommand lives in its own module and registers itself through ``add_parser(subparsers)``;
heavy imports (torch, transformers) happen only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that defines add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "train": "grpo_harness.run",
    "check-estimator": "grpo_harness.check_cmd",
    "report": "grpo_harness.report",
    "ablate": "grpo_harness.ablate",
    "gpu-check": "grpo_harness.gpu_check",
    "inspect": "grpo_harness.inspect_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-harness",
        description="GRPO verification harness: train with a verified GRPO core, and "
        "property-test new estimators.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        mod.add_parser(sub, name)
    _plain_text(parser)
    return parser


def _plain_text(parser: argparse.ArgumentParser) -> None:
    """Drop the reST markup (````name````) that descriptions taken from module docstrings carry:
    ``--help`` is read in a terminal."""
    if parser.description:
        parser.description = parser.description.replace("``", "")
    for action in parser._actions:
        if action.help:
            action.help = action.help.replace("``", "")
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.help:
                    choice.help = choice.help.replace("``", "")
            for child in action.choices.values():
                _plain_text(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
