"""Ctrl-C and SIGTERM during a command: raised where the work is (so every ``with`` block cleans up), and never
lost. Python turns a signal into an exception at the next bytecode, and when that bytecode runs where exceptions
are swallowed (a ``__del__``, a callback from C: tokenizers does this) the exception vanishes and the work goes on;
the signal is therefore also recorded and raised again at the next stage boundary (``StageLog.stage``)."""

from __future__ import annotations

import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``), handled like Ctrl-C."""


_received: list[int] = []


def _raise(signum, frame):
    _received.append(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _unraisable(hook):
    def quiet(info):  # a signal swallowed in a destructor: no "Exception ignored" traceback, raise_pending() acts
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)
    return quiet


def install():
    """Handle SIGINT and SIGTERM as above until the returned function is called (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _received.clear()
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook
        _received.clear()
    return restore


def raise_pending() -> None:
    """Raise a signal that arrived but whose exception was swallowed on the way."""
    if _received:
        signum = _received[-1]
        _received.clear()
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
