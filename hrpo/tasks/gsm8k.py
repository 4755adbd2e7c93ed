"""GSM8K: grade-school word problems with a numeric answer (`#### N` ends each solution).

The answer is the number written after the marker: its leading number (units or words may
follow), else its only number. Numbers compare exactly (decimals as canonical strings, any
length; fractions by value), never through int() or eval.
"""
from __future__ import annotations

import re
from fractions import Fraction

from hrpo.data import Rejected, text_field
from hrpo.prompts import ANSWER_MARKER, Example

from .base import Task, first_line, question_only, register, unwrap

_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def convert(rec: dict) -> Example:
    question = text_field(rec, "question")
    solution = text_field(rec, "answer")
    if ANSWER_MARKER not in solution:
        raise Rejected(f"field 'answer': expected a final '{ANSWER_MARKER} N' line, got none")
    reasoning, final = solution.rsplit(ANSWER_MARKER, 1)
    final = final.strip()
    answer = final.replace(",", "")
    if not answer:
        raise Rejected(f"field 'answer': expected a number after '{ANSWER_MARKER}', got nothing")
    meta = {
        # The worked solution without calculator annotations, usable as an SFT/reference trace.
        "solution": _CALC.sub("", reasoning).strip(),
        "final": final,  # the final answer as written (may contain thousands commas)
    }
    return Example(question=question, answer=answer, meta=meta)


def read_number(after: str) -> str | None:
    """The number in the text after the marker: the leading number of the answer line (units
    or an explanation may follow it), else the only number on the line; None when ambiguous."""
    line = unwrap(first_line(after))
    line = line.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    line = re.sub(r"\\text\{([^{}]*)\}", r"\1", line)
    line = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", line)  # thousands separators only, not lists
    numbers = _NUMBER.findall(line)
    lead = re.match(r"\s*(" + _NUMBER.pattern + ")", line)
    if lead:
        return lead.group(1)
    return numbers[0] if len(numbers) == 1 else None


def fraction(text: str) -> Fraction | None:
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


def canonical_decimal(text: str) -> str | None:
    """A plain decimal as a canonical string ('-007.50' -> '-7.5'), or None for other forms.
    Comparing these needs no int(), which refuses strings of more than 4300 digits."""
    m = re.fullmatch(r"(-?)(\d*)(?:\.(\d+))?", text)
    if not m or not (m.group(2) or m.group(3)):
        return None
    whole, frac = m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    sign = m.group(1) if whole != "0" or frac else ""  # -0 is 0
    return sign + whole + ("." + frac if frac else "")


def number_score(pred: str, gold) -> float:
    gold = str(gold).replace(",", "").strip()
    gold_key = canonical_decimal(gold)
    if gold_key is not None:
        return float(canonical_decimal(pred) == gold_key)
    # A gold fraction (a/b, \frac{a}{b}) is compared by value; fraction() gives None instead of
    # raising on numbers past int()'s digit limit, so an overlong answer just scores 0.
    pred_value, gold_value = fraction(pred), fraction(gold)
    return float(pred_value is not None and pred_value == gold_value)


register(Task("gsm8k", recipe="gsm8k", convert=convert, render=question_only, read=read_number, score=number_score,
              hub="openai/gsm8k:main"))
