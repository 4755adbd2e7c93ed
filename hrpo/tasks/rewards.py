"""Outcome rewards for training: read the answer a completion writes after the marker and
compare it with the gold answer, as the completion's task does (hrpo.tasks).

A completion earns its score only when the marker occurs exactly once (so a policy cannot
hedge by writing several answers); everything else earns 0.0. Only completions are read: a
marker in the prompt never matters. Answers are parsed, never evaluated as code.

An optional format credit W (`--format-reward`, off by default: the paper's reward is the
strict one) makes the reward denser for a model that rarely answers right: a completion
whose only marker is followed by an answer the task can read earns at least W. A right answer
earns the task's score, 1, not 1 + W: it has the format by construction, so the credit is a
floor under formatted answers rather than a bonus, the reward stays in [0, 1], and a reward of
1 still means right.
"""

from __future__ import annotations

from collections.abc import Callable

from hrpo.tasks import get_task, task_names

__all__ = ["REWARD_TASKS", "get_reward_fn", "extract_answer"]

REWARD_TASKS = tuple(task_names())


def extract_answer(text: str, task: str = "gsm8k", protocol: str = "strict"):
    """The answer ``task`` reads from a completion, or None when it cannot read one."""
    return get_task(task).answer(text, protocol)


def _as_text(completion) -> str:
    """Accept plain strings and chat-style completions ([{"role", "content"}, ...])."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return completion if isinstance(completion, str) else ""


def get_reward_fn(
    task: str, protocol: str = "strict", format_credit: float = 0.0
) -> Callable[[list, list], list[float]]:
    """``fn(completions, answers) -> rewards``: the task's score of a single-marker answer, else
    0.0; with `format_credit` W > 0, at least W for any single-marker answer the task can read."""
    spec = get_task(task)
    if not 0.0 <= format_credit < 1.0:
        raise ValueError(f"format_credit must lie in [0, 1), got {format_credit!r}")

    def score(text: str, gold) -> float:
        value = spec.reward(text, gold, protocol)
        if format_credit and spec.answer(text, "strict") is not None:
            return max(value, format_credit)
        return value

    def reward_fn(completions: list, answers: list, **_: object) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        return [score(_as_text(c), a) for c, a in zip(completions, answers)]

    reward_fn.__name__ = f"{task.replace('-', '_')}_reward"
    return reward_fn
