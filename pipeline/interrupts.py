"""One signal policy for the whole program: SIGTERM stops it as Ctrl-C does, and no signal is lost.

`facesense.cli.main` calls `install_signal_policy()` once, before any command runs.
From then on SIGTERM and SIGINT raise `Interrupted` (a KeyboardInterrupt) in the main
thread, so every writer's cleanup (`finally`, `except BaseException`) runs on either.

Python drops an exception raised by a signal handler that lands inside a weakref
callback, a __del__ or an at-fork hook (pool start-up does all three), printing
"Exception ignored in ...". The policy's unraisablehook keeps such a signal instead,
without the traceback, and `raise_if_interrupted()` raises it again where the caller
can still act on it: pack calls it before publishing its output.

Without the policy (pack() called as a library): Ctrl-C is Python's own
KeyboardInterrupt, so cleanup still runs; SIGTERM keeps its default and kills the
process, and the next pack removes the partial directory it left.
"""
from __future__ import annotations

import signal
import sys
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_swallowed: list[int] = []  # signals whose Interrupted Python dropped, not yet raised again
_previous_hook = sys.unraisablehook


class Interrupted(KeyboardInterrupt):
    """The KeyboardInterrupt a signal raises under the policy; `signum` says which signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install_signal_policy() -> None:
    """SIGTERM/SIGINT -> Interrupted, and dropped ones kept for `raise_if_interrupted`.

    Main thread only (Python allows signal handlers nowhere else): a no-op elsewhere,
    and when already installed. A signal the process was started ignoring stays ignored
    (as Python itself leaves SIGINT for a background job).
    """
    global _previous_hook
    if threading.current_thread() is not threading.main_thread() or sys.unraisablehook is _keep_swallowed:
        return
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise)
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _keep_swallowed


def raise_if_interrupted() -> None:
    """Raise Interrupted if a signal's exception was swallowed since the last call (once per signal)."""
    if _swallowed:
        signum = _swallowed[0]
        _swallowed.clear()
        raise Interrupted(signum)


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


def _keep_swallowed(info) -> None:
    if isinstance(info.exc_value, Interrupted):
        _swallowed.append(info.exc_value.signum)
    else:  # any other dropped exception is reported as usual
        _previous_hook(info)
