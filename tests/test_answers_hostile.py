"""Hostile completions: whatever a policy writes, reading and scoring it in every answer family
(numeric, MATH, multiple choice) neither raises nor takes a second, under every protocol and
through the training reward."""

from __future__ import annotations

import time

import pytest

from hrpo.core.prompts import ANSWER_MARKER as M
from hrpo.tasks import PROTOCOLS, get_task
from hrpo.tasks.rewards import get_reward_fn

MB = 1_000_000
HOSTILE = {
    "megabyte of an expression": f"{M} " + "1 + " * (MB // 4),
    "megabyte of digits": f"{M} " + "9" * MB,
    "megabyte in a box": f"{M} \\boxed{{" + "x" * MB + "}",
    "megabyte of dollars": f"{M} " + "$" * MB,
    "megabyte of spaces": f"{M} 5" + " " * MB + "x",
    "megabyte of newlines": f"{M}" + "\n" * MB + "5",
    "megabyte of words": f"{M} " + "A a " * (MB // 4),
    "megabyte of minus signs": f"{M} " + "-" * MB + "5",
    "10,000 nested braces": f"{M} " + "{" * 10_000 + "1" + "}" * 10_000,
    "10,000 nested boxes": f"{M} " + "\\boxed{" * 10_000 + "1" + "}" * 10_000,
    "10,000 nested parentheses": f"{M} " + "(" * 10_000 + "1" + ")" * 10_000,
    "3,000 nested fractions": f"{M} " + "\\frac{1}{" * 3000 + "2" + "}" * 3000,
    "unclosed braces": f"{M} \\boxed{{" + "{" * 10_000,
    "power tower": f"{M} 10^{{10^{{10}}}}",
    "boxed power tower": f"{M} $\\boxed{{10^{{10^{{10}}}}}}$",
    "huge power": f"{M} 2^{{99999999}}",
    "huge factorial": f"{M} 99999999!",
    "huge exponent literal": f"{M} 1e999999",
    "exponent literal of 5000 digits": f"{M} 1e" + "9" * 5000,
    "5000 digits": f"{M} " + "7" * 5000,
    "right-to-left marks": f"{M} \u202e81\u202c \u200f",
    "zero-width characters": f"{M} 1\u200b8\u200d \u2060B",
    "full-width digits and letters": f"{M} \uff11\uff18 \uff22",
    "combining characters": f"{M} 1\u03018\u0301 B\u0301 \\frac{{1\u0301}}{{2}}",
    "lone surrogates": f"{M} \ud800\udfff x",
    "NUL and controls": f"{M} 18\x00\x1b[2J\x7f",
    "emoji": f"{M} \U0001f522 18 \U0001f389",
    "long LaTeX": f"{M} $" + "x+" * 400 + "1$",
    "100,000 markers": f"{M} 1 " * 100_000,
}
FAMILIES = {"gsm8k": "18", "math": "\\frac{1}{2}", "mmlu": "B"}  # arith, math500, mmlu-stem, arc-c share these


def _seconds(task, text, gold, protocol) -> float:
    """Seconds to read and score; a slow run is tried once more, as the bound is against
    runaway work, not scheduler noise."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        assert task.reward(text, gold, protocol) in (0.0, 1.0)
        times.append(time.perf_counter() - start)
        if times[-1] < 1.0:
            break
    return min(times)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_completion_is_read_and_scored_fast(name):
    slow = {}
    for family, gold in FAMILIES.items():
        for protocol in PROTOCOLS:
            seconds = _seconds(get_task(family), HOSTILE[name], gold, protocol)
            if seconds >= 1.0:
                slow[family, protocol] = round(seconds, 2)
    assert not slow, slow


def test_training_rewards_take_the_whole_batch():
    texts = [t for t in HOSTILE.values() if len(t) < 100_000]  # the megabytes are timed above
    for family, gold in FAMILIES.items():
        rewards = get_reward_fn(family)(texts, [gold] * len(texts))
        assert len(rewards) == len(texts) and set(rewards) <= {0.0, 1.0}
