"""Stopping a run cleanly on a signal."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from tqdm import tqdm


class SignalStop(BaseException):
    """SIGINT or SIGTERM that stops the process where it is (a BaseException, as
    KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise SignalStop(signum)


@contextlib.contextmanager
def stop_at_once():
    """SIGINT and SIGTERM raise SignalStop while this is active (the default SIGTERM would
    kill the process without rolling its output folder back)."""
    with _handlers(_raise):
        yield


@contextlib.contextmanager
def handled_elsewhere():
    """Within: SIGINT and SIGTERM are taken and dropped here, for work that stops gracefully on
    them by itself (uvicorn's server shuts down, then re-sends the signal to the handlers it
    found: these), so the program ends as that work ends, not with SignalStop."""
    with _handlers(lambda signum, frame: None):
        yield


@contextlib.contextmanager
def _handlers(handler):
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequests:
    """SIGTERM and the first Ctrl-C ask the run to stop after the current device step (with a
    checkpoint); a second Ctrl-C stops at once (SignalStop)."""

    def __init__(self):
        self.signum: int | None = None
        self._installed = None

    def __enter__(self):
        self._installed = _handlers(self._handle)
        self._installed.__enter__()
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise SignalStop(signum)
        self.signum = signum
        # tqdm.write: on a line of its own, not after the progress bar's
        tqdm.write(
            f"hrpo: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping"
            + (" (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        self._installed.__exit__(*exc)
