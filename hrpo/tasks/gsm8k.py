"""GSM8K: grade-school word problems with a numeric answer (`#### N` ends each solution).

The answer is the final value of the answer line (the first non-empty line after the marker,
up to its first sentence end), the same under both protocols: of an equation (`9*2 = 18`,
`x = 5`) its last side; of an arithmetic expression (`1/2`, `2^10`, `\\frac{3}{4}`: + - * / ^
and parentheses) its value, worked out by the small parser below, never by eval; of text with
words or units (`18 apples`, `The answer is 18`, `1/3 cup`) the value of its last run of number
and operator characters, else that run's last number. `3 1/2` and `3\\frac{1}{2}` are mixed
numbers. Thousands commas, currency signs, %, trailing periods and invisible format characters
are ignored; only ASCII digits are digits.

Values compare exactly, as fractions. A number too large for that (over _MAX_DIGITS significant
digits, or a power of ten past it: `1e999999`) is kept as its digits and exponent and compares
only with the same number written so, never expanded; arithmetic on such numbers, a result over
_MAX_BITS, a division by zero or a malformed expression makes the answer unreadable (None).
So no answer raises or takes long.

`official_number` is the paper's own GSM8K scoring (eval_gsm8k.py), kept apart from the above.
"""

from __future__ import annotations

import re
from fractions import Fraction

from hrpo.core.prompts import ANSWER_MARKER, Example
from hrpo.tasks.records import Rejected, text_field

from .base import Official, Task, first_line, official_text, official_trim, question_only, register, unwrap

_CALC = re.compile(r"<<[^>]*>>")

_MAX_DIGITS = 1000  # a literal past this many digits (or 10^this) is kept as digits and exponent
_MAX_BITS = 3400  # about 1000 decimal digits: the largest numerator or denominator worked out
_MAX_EXPRESSION = 200  # characters of an expression the parser will take
_MAX_DEPTH = 20  # nested parentheses

_LITERAL = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_SIGNED = re.compile(r"(?:(?<![\w)])-)?" + _LITERAL)  # a minus after a word or ")" is an operator
_EXPRESSION_CHARS = set("0+-*/^() ")  # an expression, once each of its numbers is written 0
_TOKEN = re.compile(r"\s*(?:(" + _LITERAL + r")|([-+*/^()]))")
_RUN = re.compile(r"[-+*/^(). 0-9]+")  # a number or an expression among words
_NUMBER = re.compile(r"-?" + _LITERAL)
_MIXED = re.compile(r"(-?)([0-9]{1,18})\s+([0-9]{1,18})/([0-9]{1,18})")  # 3 1/2 (after _clean)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")  # zero-width, bidi marks
_SYMBOLS = [
    ("\u2212", "-"),
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\u00d7", "*"),
    ("\u00b7", "*"),
    ("\\div", "/"),
    ("\u00f7", "/"),
    ("\\left", ""),
    ("\\right", ""),
    ("{,}", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\%", ""),
    ("%", ""),
    ("\u00a3", ""),
    ("\u20ac", ""),
    ("\u00a5", ""),
]


class _Unreadable(Exception):
    pass


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


def _clean(text: str) -> str:
    """Drop what never changes a number's value: format characters, currency, %, thousands
    commas, \\text{} wrappers, trailing periods; LaTeX operators and \\frac become plain ones."""
    text = _INVISIBLE.sub("", text)
    for old, new in _SYMBOLS:
        text = text.replace(old, new)
    text = re.sub(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))", "", text)  # 1,234 but not the list 1,2
    text = re.sub(r"(?<![0-9.])([0-9]+)\s*\\[dt]?frac\{([0-9]+)\}\{([0-9]+)\}", r"\1 \2/\3", text)  # mixed
    for _ in range(_MAX_DEPTH):  # \frac{a}{b} -> ((a)/(b)), innermost first
        text, n = _FRAC.subn(r"((\1)/(\2))", text)
        if not n:
            break
    text = text.replace("{", "(").replace("}", ")")  # 2^{10}
    return text.strip().rstrip(".").strip()


def _literal(text: str):
    """An unsigned decimal literal: a Fraction, or (sign 1, digits, exponent) when too large."""
    m = re.fullmatch(r"([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]{1,9}))?", text)
    if not m:
        raise _Unreadable
    frac = m.group(2) or ""
    digits = (m.group(1) + frac).lstrip("0")
    significant = digits.rstrip("0")
    exponent = int(m.group(3) or 0) - len(frac) + len(digits) - len(significant)
    if not significant:
        return Fraction(0)
    if len(significant) > _MAX_DIGITS or abs(exponent) > _MAX_DIGITS:
        return (1, significant, exponent)  # never expanded: compared as written
    return Fraction(int(significant) * 10 ** max(exponent, 0), 10 ** max(-exponent, 0))


def _checked(value: Fraction) -> Fraction:
    if max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise _Unreadable
    return value


class _Parser:
    """Recursive descent over + - * / ^ and parentheses; ^ binds tighter than a unary minus."""

    def __init__(self, text: str):
        self.tokens, pos = [], 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise _Unreadable
            self.tokens.append(m.group(1) or m.group(2))
            pos = m.end()
        self.pos, self.depth = 0, 0

    def value(self):
        value = self.sum()
        if self.pos != len(self.tokens):
            raise _Unreadable
        return value

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        token = self.peek()
        if token is None:
            raise _Unreadable
        self.pos += 1
        return token

    def sum(self):
        value = self.product()
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.product()
            value = _checked(_fraction(value) + _fraction(rhs) if op == "+" else _fraction(value) - _fraction(rhs))
        return value

    def product(self):
        value = self.unary()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), _fraction(self.unary())
            if op == "/" and rhs == 0:
                raise _Unreadable
            value = _checked(_fraction(value) * rhs if op == "*" else _fraction(value) / rhs)
        return value

    def unary(self):
        if self.peek() == "+":
            self.take()
            return self.unary()
        if self.peek() == "-":
            self.take()
            return _negate(self.unary())
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = _fraction(self.unary())  # right-associative: 2^3^2 = 2^9
        base = _fraction(base)
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
        if exponent.denominator != 1 or (base == 0 and exponent < 0) or bits * abs(exponent) > _MAX_BITS:
            raise _Unreadable
        return base ** int(exponent)

    def atom(self):
        token = self.take()
        if token == "(":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise _Unreadable
            value = self.sum()
            if self.take() != ")":
                raise _Unreadable
            self.depth -= 1
            return value
        if token[0] in "0123456789.":
            return _literal(token)
        raise _Unreadable


def _fraction(value) -> Fraction:
    if isinstance(value, tuple):  # no arithmetic on numbers too large to expand
        raise _Unreadable
    return value


def _negate(value):
    return (-value[0],) + value[1:] if isinstance(value, tuple) else -value


def _evaluate(text: str):
    """The value of a number, mixed number or arithmetic expression (text after _clean)."""
    m = _MIXED.fullmatch(text)
    if m and 0 < int(m.group(3)) < int(m.group(4)):
        return (-1 if m.group(1) else 1) * (int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4))))
    if _NUMBER.fullmatch(text):  # a lone number, of any length
        return _negate(_literal(text[1:])) if text.startswith("-") else _literal(text)
    if len(text) > _MAX_EXPRESSION:
        raise _Unreadable
    return _Parser(text).value()


def exact_value(text: str):
    """The value of a text that is a number or an arithmetic expression and nothing else
    (a Fraction, or (sign, digits, exponent) for a number too large to expand); else None."""
    try:
        return _evaluate(_clean(unwrap(str(text))))
    except _Unreadable:
        return None


def _final_value(line: str):
    side = _clean(line).rsplit("=", 1)[-1].strip()  # an equation's value is its last side
    # An expression alone is read by its value; among words or units, the last run of number
    # and operator characters is (1/3 cup), or failing that its last number.
    if side and set(_SIGNED.sub("0", side)) <= _EXPRESSION_CHARS:
        return _evaluate(side)
    last = max(map(side.rfind, "0123456789"))  # the run around the last digit
    if last < 0:
        return None
    run = _RUN.match(side, last + 1 - len(_RUN.match(side[last::-1]).group())).group()
    try:
        return _evaluate(run.strip())
    except _Unreadable:
        return _evaluate(_SIGNED.findall(run)[-1])


def _show(value) -> str:
    """A value written so that exact_value reads it back: 18, -7.5, 1/3, 1e999999."""
    if isinstance(value, tuple):
        sign, digits, exponent = value
        return ("-" if sign < 0 else "") + digits + (f"e{exponent}" if exponent else "")
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)  # a terminating decimal: exactly this many places
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


def read_number(after: str) -> str | None:
    """The final value of the answer line (see the module's docstring), written by _show()."""
    line = unwrap(first_line(after))
    line = re.split(r"\.\s+(?=[A-Za-z])", line, maxsplit=1)[0]  # "18. Because ..." -> "18"
    try:
        value = _final_value(line)
    except _Unreadable:
        return None
    return None if value is None else _show(value)


_OFFICIAL_NUMBER = re.compile(r"-?\d+/?\.?\d*")  # utils.py:271: no comma, so 1,000 is two numbers
_PYTHON_INT = re.compile(r"[1-9][0-9]*|0+")  # an int literal Python accepts: no leading zero
_PYTHON_DIVISOR = re.compile(r"[1-9][0-9]*|0+|\.[0-9]+")  # what may follow "/" in a number above


def _official_quotient(number: str) -> float | None:
    """The value eval() gives `a/b` at utils.py:113, worked out from the digits instead: a and b
    must be Python literals (ASCII, no leading zeros: 3/05 is a SyntaxError; 3/ and 3/. too);
    int/int is Python's correctly rounded true division, int/float divides float(a). None
    where eval raises (also a zero divisor, a result past float, an int past 4300 digits)."""
    sign, body = ("-", number[1:]) if number.startswith("-") else ("", number)
    a, b = body.split("/")
    if not (body.isascii() and _PYTHON_INT.fullmatch(a) and _PYTHON_DIVISOR.fullmatch(b)):
        return None
    try:
        numerator = int(sign + a)
        divisor = float(b) if b.startswith(".") else int(b)
        return numerator / divisor
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _official_value(number: str) -> str:
    """delete_extra_zero (utils.py:108-123) of one matched number: float() it (any Unicode
    digits), else the quotient above; shown as the float's repr with its trailing zeros cut,
    then "." dropped (12.0 -> 12) or what is left read back as a float -- so repr 1e+20 loses
    its exponent's 0 and becomes 100.0. Unreadable (3/0, 3/05): the text as it was."""
    try:
        value = float(number)
    except ValueError:
        value = _official_quotient(number)
        if value is None:
            return number
    shown = repr(value).rstrip("0")
    return str(int(shown[:-1])) if shown.endswith(".") else repr(float(shown))


def official_number(text: str) -> str:
    """process_gsm8k_answer (utils.py:268-277): of the trimmed text, the LAST match of
    -?\\d+/?\\.?\\d* through _official_value, trailing dots and slashes cut; "" when none.
    Commas are not part of a number, so "1,000" reads as its last group: "0" (and a gold
    "114,200" as "200"); prose after the answer counts ("18 apples, 2 left" -> "2")."""
    numbers = _OFFICIAL_NUMBER.findall(official_trim(text))
    # The script converts every match but keeps the last; the conversion has no effect on the others.
    return _official_value(numbers[-1]).rstrip(".").rstrip("/") if numbers else ""


# eval_gsm8k.py:107-111: both sides through process_gsm8k_answer, compared with ==; the gold
# is the text after the solution's marker as written (extract_hash_answer, utils.py:25-29).
OFFICIAL = Official(
    answer=lambda completion: official_number(official_text(completion)),
    golds=lambda gold: [official_number(str(gold))],
    source=lambda ex: ex.meta.get("final", ex.answer),
)


def number_score(pred: str, gold) -> float:
    pred_value, gold_value = exact_value(pred), exact_value(gold)
    return float(pred_value is not None and pred_value == gold_value)


register(
    Task(
        "gsm8k",
        recipe="gsm8k",
        convert=convert,
        render=question_only,
        read=read_number,
        score=number_score,
        official=OFFICIAL,
        hub="openai/gsm8k:main",
    )
)
