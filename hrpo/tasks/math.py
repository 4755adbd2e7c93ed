"""MATH and MATH-500: competition problems whose answer is LaTeX (`\\boxed{}` in solutions).

The answer is the `\\boxed{}` after the marker, else its first line; answers compare after a
normalisation of notational variants, as exact fractions, and with math_verify when it is
installed. Nothing is evaluated as code.
"""
from __future__ import annotations

import re

from hrpo.data import Rejected, expected, text_field
from hrpo.prompts import Example

from .base import Task, first_line, last_boxed, question_only, register, unwrap
from .gsm8k import fraction


def convert(rec: dict) -> Example:
    problem = text_field(rec, "problem")
    meta = {k: rec[k] for k in ("level", "type", "subject", "unique_id") if k in rec}
    solution = rec.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise expected("solution", "a string", solution)
    # A parquet or hub table fills a column a row lacks with null, so null counts as absent.
    if rec.get("answer") is not None:  # MATH-500 form carries the answer explicitly
        answer = text_field(rec, "answer")
    elif solution is None:
        raise Rejected("missing field 'solution' (or 'answer')")
    else:
        answer = last_boxed(solution)
        if answer is None:
            raise Rejected("field 'solution': expected a \\boxed{} answer, got none")
        if not answer:  # two MATH train items end in a bare \boxed{}: nothing to compare against
            raise Rejected("field 'solution': expected a \\boxed{} answer, got an empty \\boxed{}")
    if solution is not None:
        meta["solution"] = solution
    # Answers are read from one line after the marker, so a gold answer wrapped over lines
    # (one MATH test answer breaks "square units" over two lines) is joined onto one line.
    answer = re.sub(r"\s*\n\s*", " ", answer).strip()
    return Example(question=problem, answer=answer, meta=meta)


def read_latex(after: str) -> str | None:
    """The LaTeX answer after the marker: a \\boxed{} anywhere after it, else the first line."""
    boxed = last_boxed(after)
    answer = boxed if boxed is not None else unwrap(first_line(after))
    return answer if answer else None


_UNIT = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}(?:\^\{?\d\}?)?$")


def normalize_math(answer: str) -> str:
    """Canonical string form of a LaTeX answer, so that notational variants compare equal."""
    s = unwrap(str(answer).strip())
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
    fa, fb = fraction(a), fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return _verify(pred, gold)


def math_score(pred: str, gold) -> float:
    return float(math_equal(pred, str(gold)))


register(
    Task("math", recipe="math", convert=convert, render=question_only, read=read_latex, score=math_score,
         max_new_tokens=1024, hub="DigitalLearningGmbH/MATH-lighteval"),
    Task("math500", recipe="math", convert=convert, render=question_only, read=read_latex, score=math_score,
         max_new_tokens=1024, hub="HuggingFaceH4/MATH-500", splits=("test", "test")),
)
