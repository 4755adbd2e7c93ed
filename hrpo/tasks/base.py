"""What every benchmark or training task is made of, and the registry of them.

A Task keeps together what the paper's protocol needs of one benchmark: how a source record
becomes an Example (validated, never coerced), the user turn it is asked as, how the answer
is read from the text after the marker, and how that answer is scored against the gold.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from hrpo.prompts import ANSWER_MARKER, Example

PROTOCOLS = ("paper", "strict")


@dataclass(frozen=True)
class Task:
    name: str
    recipe: str  # the training recipe in hrpo.config.RECIPES this task uses
    convert: Callable[[dict], Example] | None  # a source record -> Example (raises data.Rejected)
    render: Callable[[Example], str]  # the user turn
    read: Callable[[str], Any]  # the answer in the text after the marker (None: unreadable)
    score: Callable[[Any, Any], float]  # (read answer, gold) -> 0..1
    metric: str = "accuracy"
    details: Callable[[str, Any], dict] | None = None  # more per-sample metrics (QA: F1), from the read answer
    max_new_tokens: int = 512  # the paper's evaluation budget
    hub: str | None = None  # default dataset ("repo" or "repo:config") when no path is given
    splits: tuple[str, str] = ("train", "test")  # (training split, held-out split) of `hub`

    def answer(self, completion: str, protocol: str = "strict"):
        """The answer a completion gives: after its last marker ("paper"), or after its only
        marker ("strict", the training reward: a second marker scores nothing)."""
        after = text_after_marker(completion, protocol)
        return None if after is None else self.read(after)

    def reward(self, completion: str, gold, protocol: str = "strict") -> float:
        pred = self.answer(completion, protocol)
        return 0.0 if pred is None else float(self.score(pred, gold))


REGISTRY: dict[str, Task] = {}


def register(*tasks: Task) -> None:
    for task in tasks:
        REGISTRY[task.name] = task


def text_after_marker(text: str, protocol: str = "strict") -> str | None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not isinstance(text, str) or ANSWER_MARKER not in text:
        return None
    if protocol == "strict" and text.count(ANSWER_MARKER) != 1:
        return None
    return text.rsplit(ANSWER_MARKER, 1)[1].strip()


def first_line(text: str) -> str:
    """Models often explain after the answer; the answer is the first non-empty line."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of the
    brace-less ``\\boxed 5`` form; None when there is none."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    pos = starts[-1].end()
    rest = text[pos:].lstrip()
    if not rest.startswith("{"):
        # "\boxed 2" form: the answer runs to the next space, $ or end.
        m = re.match(r"[^\s$]+", rest)
        return m.group(0).rstrip(".") if m else None
    depth = 0
    for j, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:j].strip()
    return None  # unbalanced braces


def unwrap(text: str) -> str:
    """Strip presentation wrappers: \\boxed{}, markdown bold, math delimiters."""
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("**", "").strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left): len(text) - len(right)].strip()
    return text


def question_only(ex: Example) -> str:
    """The user turn of GSM8K and MATH: the question as it is."""
    return ex.question
