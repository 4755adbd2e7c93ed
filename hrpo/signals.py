"""Stopping a run cleanly on a signal."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequests:
    """SIGTERM and the first Ctrl-C ask the run to stop after the current device step (with a
    checkpoint); a second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nhrpo: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping"
              + (" (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
