"""The embedded task: synthetic multi-step arithmetic (hrpo.tasks.synthetic), answered like GSM8K."""

from __future__ import annotations

from .base import Task, question_only, register
from .gsm8k import OFFICIAL, number_score, read_number

register(
    Task(
        "arith",
        recipe="arith",
        convert=None,
        render=question_only,
        read=read_number,
        score=number_score,
        official=OFFICIAL,
    )
)
