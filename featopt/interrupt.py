"""Ctrl-C and `kill -TERM` end a run cleanly: the signal becomes :class:`Interrupted`, raised in
the main thread, which unwinds through every writer's cleanup (results and caches are written to
temporary names and renamed into place, so nothing half-written is left) up to the command line,
which prints one line and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

Why not KeyboardInterrupt: Lightning's `Trainer.fit` catches it and calls `sys.exit(1)`. Why not
SystemExit: Lightning raises its own (`SIGTERMException`, exit status 0) one step after a SIGTERM.
Lightning chains a handler installed before `fit` after its own SIGTERM notifier, so ours still runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A SIGINT or SIGTERM. A BaseException, so `except Exception` does not swallow it; `hint` says
    how to resume (set on the way up by the code that knows about checkpoints)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.hint: str | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def raising_on_signals():
    """While inside, SIGINT and SIGTERM raise :class:`Interrupted` (once: a second signal during the
    cleanup is ignored, so the cleanup finishes). A no-op outside the main thread, where Python
    cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    # A signal ignored on entry (`nohup`, a shell's background job) stays ignored.
    previous = {s: signal.signal(s, handler) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
