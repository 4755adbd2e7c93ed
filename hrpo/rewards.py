"""Outcome rewards: read the answer a completion writes after the marker and compare it with
the gold answer.

A completion earns 1.0 only when the marker occurs exactly once (so a policy cannot hedge by
writing several answers) and the text after it matches the gold; everything else earns 0.0.
Only completions are read: a marker in the prompt never matters. Answers are parsed with
regular expressions and :class:`fractions.Fraction`, never evaluated as code.
"""
from __future__ import annotations

import re
import string
from fractions import Fraction
from typing import Callable

from hrpo.data import last_boxed
from hrpo.prompts import ANSWER_MARKER

__all__ = [
    "REWARD_TASKS",
    "get_reward_fn",
    "extract_answer",
    "EXTRACTORS",
    "normalize_math",
    "math_equal",
    "normalize_qa",
]


def _after_marker(text: str) -> str | None:
    """The text after the single marker, or None when there is no marker or more than one."""
    if not isinstance(text, str) or text.count(ANSWER_MARKER) != 1:
        return None
    return text.split(ANSWER_MARKER, 1)[1].strip()


def _first_line(text: str) -> str:
    """Models often explain after the answer; the answer is the first non-empty line."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _unwrap(text: str) -> str:
    """Strip presentation wrappers: \\boxed{}, markdown bold, math delimiters."""
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("**", "").strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left): len(text) - len(right)].strip()
    return text


# ---------------------------------------------------------------- numeric (gsm8k, arith)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> str | None:
    """The number after the marker: the leading number of the answer line (units or an
    explanation may follow it), else the only number on the line; None when ambiguous."""
    after = _after_marker(text)
    if after is None:
        return None
    line = _unwrap(_first_line(after))
    line = line.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    line = re.sub(r"\\text\{([^{}]*)\}", r"\1", line)
    line = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", line)  # thousands separators only, not lists
    numbers = _NUMBER.findall(line)
    lead = re.match(r"\s*(" + _NUMBER.pattern + ")", line)
    if lead:
        return lead.group(1)
    return numbers[0] if len(numbers) == 1 else None


def _fraction(text: str) -> Fraction | None:
    """Parse a plain number, a/b or \\frac{a}{b} (optionally signed) without evaluating."""
    text = text.strip()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:].strip()
    m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", text) or re.fullmatch(
        r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", text
    )
    try:
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else sign * Fraction(m.group(1)) / den
        if re.fullmatch(r"\d+(?:\.\d+)?|\.\d+", text):
            return sign * Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _canonical_decimal(text: str) -> str | None:
    """A plain decimal as a canonical string ('-007.50' -> '-7.5'), or None for other forms.
    Comparing these needs no int(), which refuses strings of more than 4300 digits."""
    m = re.fullmatch(r"(-?)(\d*)(?:\.(\d+))?", text)
    if not m or not (m.group(2) or m.group(3)):
        return None
    whole, frac = m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    sign = m.group(1) if whole != "0" or frac else ""  # -0 is 0
    return sign + whole + ("." + frac if frac else "")


def _numeric_reward(completion: str, gold) -> float:
    pred = extract_number(completion)  # always a plain decimal when not None
    if pred is None:
        return 0.0
    gold = str(gold).replace(",", "").strip()
    gold_key = _canonical_decimal(gold)
    if gold_key is not None:
        return float(_canonical_decimal(pred) == gold_key)
    # A gold fraction (a/b, \frac{a}{b}) is compared by value; _fraction gives None instead of
    # raising on numbers past int()'s digit limit, so an overlong answer just scores 0.
    pred_value, gold_value = _fraction(pred), _fraction(gold)
    return float(pred_value is not None and pred_value == gold_value)


# ---------------------------------------------------------------- math (LaTeX answers)


def extract_math(text: str) -> str | None:
    """The LaTeX answer after the marker: a \\boxed{} anywhere after it, else the first line."""
    after = _after_marker(text)
    if after is None:
        return None
    if last_boxed(after) is not None:
        answer = last_boxed(after)
    else:
        answer = _unwrap(_first_line(after))
    return answer if answer else None


_UNIT = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}(?:\^\{?\d\}?)?$")


def normalize_math(answer: str) -> str:
    """Canonical string form of a LaTeX answer, so that notational variants compare equal."""
    s = _unwrap(str(answer).strip())
    s = s.replace("\n", " ")
    s = re.sub(r"\\(?:displaystyle|left|right)(?![a-zA-Z])", "", s)  # \left( -> (, not \leftarrow
    s = re.sub(r"(?<!\\)\\[!,;:> ]", "", s)  # thin spaces and friends (not a row break)
    s = s.replace("~", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("\\circ", "")  # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("{,}", "")  # LaTeX thousands separator 10{,}000
    s = _UNIT.sub("", s) or s  # trailing units such as 5\text{ cm}
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace(" ", "")
    # \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \frac{a}2 -> \frac{a}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    # "x=5", "\theta=30" -> the value (one '=' only, so equations such as y=2x+1=... stay)
    m = re.fullmatch(r"\\?[a-zA-Z]{1,6}(?:_\{?\w+\}?)?=([^=]+)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    return s


_math_verify = None  # None: not tried yet; False: unavailable


def _verify(pred: str, gold: str) -> bool:
    """Optional extra check with the `math_verify` package, used only when it is installed."""
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify

            _math_verify = math_verify
        except ImportError:
            _math_verify = False
    if not _math_verify:
        return False
    try:
        return bool(_math_verify.verify(_math_verify.parse(f"${gold}$"), _math_verify.parse(f"${pred}$")))
    except Exception:  # its parser can fail on odd input; that just means "not shown equal"
        return False


def math_equal(pred: str, gold: str) -> bool:
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    fa, fb = _fraction(a), _fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return _verify(pred, gold)


def _math_reward(completion: str, gold) -> float:
    pred = extract_math(completion)
    return float(pred is not None and math_equal(pred, str(gold)))


# ---------------------------------------------------------------- multiple choice

_CHOICE = "ABCDE"  # MMLU uses A-D; a few ARC items have a fifth option


def extract_choice(text: str) -> str | None:
    """The option letter after the marker: B, (B), B., B) text, **B**, \\boxed{B},
    'The answer is B', 'Answer: B'."""
    after = _after_marker(text)
    if after is None:
        return None
    line = _unwrap(_first_line(after))
    line = re.sub(r"\\text\{([^{}]*)\}", r"\1", line)
    line = re.sub(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*", "", line, flags=re.I)
    m = re.match(rf"[\s(\[*]*([{_CHOICE}])(?![A-Za-z0-9])", line)
    return m.group(1) if m else None


def _choice_reward(completion: str, gold) -> float:
    pred = extract_choice(completion)
    return float(pred is not None and pred == str(gold).strip().upper())


# ---------------------------------------------------------------- retrieval QA


_PUNCT = frozenset(string.punctuation)


def normalize_qa(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_span(text: str) -> str | None:
    after = _after_marker(text)
    if after is None:
        return None
    line = _unwrap(_first_line(after))
    return line or None


def _qa_reward(completion: str, gold) -> float:
    pred = extract_span(completion)
    if pred is None:
        return 0.0
    aliases = [gold] if isinstance(gold, str) else list(gold)
    pred = normalize_qa(pred)
    # An answer that normalises to nothing ("The", ".") matches nothing, not every empty alias.
    return float(bool(pred) and any(pred == normalize_qa(a) for a in aliases))


# ---------------------------------------------------------------- registry

_REWARDS: dict[str, Callable[[str, object], float]] = {
    "gsm8k": _numeric_reward,
    "arith": _numeric_reward,
    "math": _math_reward,
    "mmlu": _choice_reward,
    "rag-qa": _qa_reward,
}
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": extract_number,
    "arith": extract_number,
    "math": extract_math,
    "mmlu": extract_choice,
    "rag-qa": extract_span,
}
REWARD_TASKS = tuple(_REWARDS)


def extract_answer(text: str, task: str = "gsm8k") -> str | None:
    """The answer ``task`` reads from a completion, or None when it cannot read one."""
    if task not in EXTRACTORS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(REWARD_TASKS)}")
    return EXTRACTORS[task](text)


def _as_text(completion) -> str:
    """Accept plain strings and chat-style completions ([{"role", "content"}, ...])."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return completion if isinstance(completion, str) else ""


def get_reward_fn(task: str) -> Callable[[list, list], list[float]]:
    """``fn(completions, answers) -> rewards``: 1.0 for a correct single-marker answer, else 0.0."""
    if task not in _REWARDS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(REWARD_TASKS)}")
    score = _REWARDS[task]

    def reward_fn(completions: list, answers: list, **_: object) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        return [score(_as_text(c), a) for c, a in zip(completions, answers)]

    reward_fn.__name__ = f"{task.replace('-', '_')}_reward"
    return reward_fn
