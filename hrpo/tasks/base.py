"""What every benchmark or training task is made of, and the registry of them.

A Task keeps together what the paper's protocol needs of one benchmark: how a source record
becomes an Example (validated, never coerced), the user turn it is asked as, how the answer
is read from the text after the marker, and how that answer is scored against the gold; and
how the paper's own evaluation scripts score it (`official`, docs/evaluation-protocols.md).

Protocols: "paper" reads the text after the last marker with our answer readers; "strict"
(the training reward) only a completion with exactly one marker; "official" scores as the
original code's eval_*.py scripts do, their bugs included.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hrpo.core.prompts import ANSWER_MARKER, Example

PROTOCOLS = ("paper", "official", "strict")


@dataclass(frozen=True)
class Official:
    """How the paper's evaluation script scores one benchmark: `answer` turns a whole completion
    into the string the script compares; `golds` turns a gold, as `source` takes it from an
    Example (what the script read from its dataset), into the strings it is compared with; a
    completion is correct when its string equals one of them (== or `in`, as the scripts do)."""

    answer: Callable[[str], str]
    golds: Callable[[Any], list[str]]
    source: Callable[[Example], Any] = lambda ex: ex.answer


@dataclass(frozen=True)
class Task:
    name: str
    recipe: str  # the training recipe in hrpo.training.config.RECIPES this task uses
    convert: Callable[[dict], Example] | None  # a source record -> Example (raises data.Rejected)
    render: Callable[[Example], str]  # the user turn
    read: Callable[[str], Any]  # the answer in the text after the marker (None: unreadable)
    score: Callable[[Any, Any], float]  # (read answer, gold) -> 0..1
    official: Official  # the paper's own scoring of this benchmark
    metric: str = "accuracy"
    details: Callable[[str, Any], dict] | None = None  # more per-sample metrics (QA: F1), from the read answer
    max_new_tokens: int = 512  # the paper's evaluation budget
    hub: str | None = None  # default dataset ("repo" or "repo:config") when no path is given
    splits: tuple[str, str] = ("train", "test")  # (training split, held-out split) of `hub`

    def answer(self, completion: str, protocol: str = "strict"):
        """The answer a completion gives: after its last marker ("paper"), or after its only
        marker ("strict", the training reward: a second marker scores nothing); under
        "official", the string the paper's script compares (never None)."""
        if protocol == "official":
            return self.official.answer(completion)
        after = text_after_marker(completion, protocol)
        return None if after is None else self.read(after)

    def gold(self, ex: Example, protocol: str = "strict"):
        """What a completion of `ex` is scored against: its answer, or under "official" what
        the paper's script reads from its dataset (GSM8K's final line as written, MATH's
        solution, ARC's own answer key)."""
        return self.official.source(ex) if protocol == "official" else ex.answer

    def reward(self, completion: str, gold, protocol: str = "strict") -> float:
        if protocol == "official":
            return float(self.official.answer(completion) in self.official.golds(gold))
        pred = self.answer(completion, protocol)
        return 0.0 if pred is None else float(self.score(pred, gold))


REGISTRY: dict[str, Task] = {}


def register(*tasks: Task) -> None:
    for task in tasks:
        REGISTRY[task.name] = task


def text_after_marker(text: str, protocol: str = "strict") -> str | None:
    """The text after the last marker, or under "strict" after the only one; None without."""
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
            text = text[len(left) : len(text) - len(right)].strip()
    return text


def question_only(ex: Example) -> str:
    """The user turn of GSM8K and MATH: the question as it is."""
    return ex.question


def official_text(completion: str) -> str:
    """The text every official script scores (extract_from_response, utils.py:15-22): after the
    LAST marker, or the WHOLE completion when it has none (str.split never fails, so the
    IndexError fallback at utils.py:21 never runs); stripped, one trailing "." cut."""
    answer = str(completion).rsplit(ANSWER_MARKER, 1)[-1].strip()
    return answer[:-1].strip() if answer.endswith(".") else answer


def official_trim(text: str) -> str:
    """The first step of process_gsm8k/math/mmlu_answer (utils.py:269, 281, 299): newlines
    off both ends, then trailing dots, then trailing slashes, then spaces off both ends."""
    return text.strip("\n").rstrip(".").rstrip("/").strip(" ")
