"""Calling a reward function so that one bad completion cannot end a run.

A call that raises or runs past its time limit is retried one completion at a time; the
completions whose own call still fails score 0 and are counted as reward errors, with a
warning naming the exception. A function that returns something other than one number per
completion has a bug no retry can fix: that is a one-line RewardFnError.

The time limit is a SIGALRM timer (main thread, Unix), which interrupts Python code; a
call stuck inside C code that never returns to the interpreter cannot be interrupted.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from numbers import Real

from hrpo.core.errors import error_line


class RewardFnError(ValueError):
    """A reward function that breaks its contract (one number per completion), in one line."""


class RewardTimeout(BaseException):
    """Raised inside a reward call that ran past its limit (a BaseException, so that the
    function's own `except Exception` cannot swallow it)."""


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


@contextmanager
def time_limit(seconds: float, error: type[BaseException] = RewardTimeout):
    """Raise `error` in the block once `seconds` have passed. Limits nest: an enclosing limit
    keeps its deadline (when it falls first, this one changes nothing; otherwise it is re-armed
    on exit with the time it has left, and fires at once if that time is already spent)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]  # 0.0: no enclosing limit
    if outer_left and outer_left <= seconds:
        yield
        return

    def expire(signum, frame):
        raise error(f"took longer than {seconds:g} s")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-6))


def _checked(fn, values, n: int) -> list[float]:
    """The call's result as n floats (NaN and inf kept: the trainer skips such updates)."""
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardFnError(
            f"reward function {_name(fn)} returned {type(values).__name__}, expected a list of {n} numbers"
        )
    if len(values) != n:
        raise RewardFnError(f"reward function {_name(fn)} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # a 0-d tensor or numpy scalar
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, Real):
            raise RewardFnError(
                f"reward function {_name(fn)} returned {type(v).__name__} for completion {i}, expected a number"
            )
        out.append(float(v))
    return out


def _call(fn, completions: list, answers: list, timeout: float) -> list[float]:
    with time_limit(timeout):
        values = fn(completions, answers)
    return _checked(fn, values, len(completions))


def score(fn, completions: list, answers: list, timeout: float = 0.0) -> tuple[list[float], int]:
    """(one reward per completion, how many completions scored 0 because their call failed)."""
    try:
        return _call(fn, completions, answers, timeout), 0
    except RewardFnError:
        raise
    except (Exception, RewardTimeout) as err:
        batch_err = err
    rewards, failed = [], []
    for i, (c, a) in enumerate(zip(completions, answers)):
        try:
            rewards.extend(_call(fn, [c], [a], timeout))
        except RewardFnError:
            raise
        except (Exception, RewardTimeout) as err:
            rewards.append(0.0)
            failed.append((i, err))
    if failed:
        i, err = failed[0]
        warnings.warn(
            f"reward function {_name(fn)}: {len(failed)} of {len(completions)} completions scored 0 because "
            f"the call failed (first: completion {i}, {type(err).__name__}: {error_line(err)[:200]})",
            RuntimeWarning,
            stacklevel=2,
        )
    else:  # only the batch call failed: say so, the scores stand
        warnings.warn(
            f"reward function {_name(fn)} failed on the batch ({type(batch_err).__name__}: "
            f"{error_line(batch_err)[:200]}) but not on any single completion",
            RuntimeWarning,
            stacklevel=2,
        )
    return rewards, len(failed)


def all_finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)
