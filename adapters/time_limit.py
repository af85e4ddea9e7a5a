"""A time limit on user code that runs inside a command (a reward function, an estimator).

``time_limit(seconds, slow_after=S, on_slow=f)`` around a block: after ``S`` seconds
``f(elapsed)`` is called once (to say what is running), and after ``seconds`` the block is
interrupted by ``TimeLimitExceeded``. The clock is ``signal.setitimer(ITIMER_REAL)`` and the
interruption a SIGALRM handler, so it works only in the main thread (elsewhere the block runs
without a limit) and interrupts Python code, including ``time.sleep`` and blocking reads, but
not a C extension that never returns to the interpreter. ``TimeLimitExceeded`` derives from
``BaseException``, like ``KeyboardInterrupt``, so that user code's ``except Exception`` does
not swallow it. Under torchrun every rank is its own process with its own clock.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable


class TimeLimitExceeded(BaseException):
    """The block ran past its limit; ``seconds``: the limit."""

    def __init__(self, seconds: float):
        super().__init__(f"did not finish within {seconds:g} s")
        self.seconds = seconds


@contextlib.contextmanager
def time_limit(seconds: float | None, *, slow_after: float | None = None,
               on_slow: Callable[[float], None] | None = None, on_lost: Callable[[], None] | None = None):
    """Bound the block to ``seconds`` (None or 0: no bound); ``on_slow(elapsed)`` once after
    ``slow_after`` seconds (None: never). ``on_lost()`` is called after the block when the block
    itself took the clock away (replaced the SIGALRM handler, or disarmed the timer, as user code
    with its own ``signal.alarm`` timeout does): the limit could not apply. A timer the caller had
    armed before the block is armed again afterwards, for what is left of it."""
    limit = seconds if seconds and seconds > 0 else None
    notice = slow_after if on_slow is not None and slow_after and slow_after > 0 else None
    if notice is not None and limit is not None and notice >= limit:
        notice = None
    if (limit is None and notice is None) or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return
    start = time.monotonic()
    pending = {"notice": notice is not None}

    def arm() -> None:
        now = time.monotonic() - start
        due = [t for t, on in ((notice, pending["notice"]), (limit, True)) if t is not None and on]
        if due:
            signal.setitimer(signal.ITIMER_REAL, max(min(due) - now, 1e-3))

    def handler(signum, frame) -> None:
        elapsed = time.monotonic() - start
        if limit is not None and elapsed >= limit - 1e-3:
            raise TimeLimitExceeded(limit)
        if pending["notice"] and elapsed >= notice - 1e-3:
            pending["notice"] = False
            on_slow(elapsed)
        arm()

    outer_left, outer_every = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, handler)
    finished = False
    try:
        arm()
        yield
        finished = True
    finally:
        left, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        taken = signal.getsignal(signal.SIGALRM) is not handler or (limit is not None and left == 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer_left > 0:  # the caller's own timer, for what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3), outer_every)
        if taken and finished and on_lost is not None:
            on_lost()
