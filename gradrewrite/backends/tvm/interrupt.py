"""Ctrl-C while TVM works: remembered, so it is never lost inside TVM's C++.

A ``KeyboardInterrupt`` raised in a Python callback that TVM's C++ called (MetaSchedule's
builder, runner, measure callbacks, loggers) comes out of the C++ as a bare
``RuntimeError``, and ``except Exception`` around the tuner then reports a failed tune.
While ``watch()`` is active, SIGINT also sets a flag: ``raise_if_hit`` turns such an
error back into ``KeyboardInterrupt``, and long loops check it between steps.

The handler is installed from the main thread over Python's default one, and over
SIG_IGN: a shell without job control (a script) starts background jobs with SIGINT
ignored, so ``gradrewrite compile ... & ...; kill -INT $!`` went on tuning for minutes and
exited 0. A handler of the host application's own is left alone. The previous setting is
restored when ``watch`` ends.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_hit = False
_depth = 0
_deferred = 0


def _on_sigint(signum, frame):
    global _hit
    _hit = True
    if not _deferred:
        raise KeyboardInterrupt


@contextlib.contextmanager
def watch():
    """Remember SIGINT for the duration (re-entrant); the flag starts clear."""
    global _hit, _depth
    previous = None
    if _depth == 0:
        _hit = False
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_IGN):
            previous = signal.signal(signal.SIGINT, _on_sigint)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def hit() -> bool:
    return _hit


def raise_if_hit(cause: BaseException | None = None) -> None:
    """``KeyboardInterrupt`` if SIGINT arrived while watching (``cause``: what TVM made of it)."""
    if _hit:
        raise KeyboardInterrupt from cause


@contextlib.contextmanager
def deferred():
    """Cleanup that must not be cut short (merging records): a SIGINT meanwhile only sets the
    flag; call ``raise_if_hit`` after."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
