"""Exit statuses and the one-line form of an error, shared by the run module and the torchrun
launch (both import this module; neither imports the other's internals)."""

from __future__ import annotations

EXIT_FAILED = 1
"""A run that failed (a crash, a lost rank, a reward function's error)."""
EXIT_USAGE = 2
"""A user's mistake, said in one line (a bad file, an unknown option)."""


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
