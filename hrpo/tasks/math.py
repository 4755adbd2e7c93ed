"""MATH and MATH-500: competition problems whose answer is LaTeX (`\\boxed{}` in solutions).

The answer is, in the text after the marker, the last `\\boxed{}`, else the last inline or
display LaTeX ($...$, $$...$$, \\(...\\), \\[...\\]), else the first line without the plain words
that open or close it ("The answer is 5 cm." -> 5).

Two answers are equal when their normalised strings or their exact values agree (a fast path
that decides most pairs), else when math-verify judges them equal. math-verify is used only
through its LaTeX parser (latex2sympy2_extended, an ANTLR grammar) and its sympy comparison:
never its expression path, which hands text to sympy's parse_expr (that is, to eval). Its own
SIGALRM timeouts are switched off; each comparison runs under reward_guard.time_limit instead,
which keeps the reward call's deadline (like any SIGALRM limit, only in the main thread).
Answers that could make sympy work without end (over _MAX_CHARS, power towers, huge exponents
or factorials) are not handed to it.

`official_latex` is the paper's own MATH scoring (eval_math.py), kept apart from the above.
"""

from __future__ import annotations

import functools
import logging
import re

from hrpo.core.prompts import Example
from hrpo.tasks.records import Rejected, expected, text_field
from hrpo.tasks.reward_guard import RewardTimeout, time_limit

from .base import Official, Task, first_line, last_boxed, official_text, official_trim, question_only, register, unwrap
from .gsm8k import exact_value

_COMPARE_SECONDS = 2.0  # per comparison by math-verify
_MAX_CHARS = 1000  # longer answers score 0: MATH's longest gold answer has 159 characters
# Work sympy may do in C, where no signal can stop it: 10^{10^{10}}, 2^{123456}, 100000!.
_COSTLY = re.compile(r"\^\s*\{[^{}]*[\^!]|\^\s*\{?\s*-?[0-9]{5,}|[0-9]{5,}\s*!|[0-9]{200,}")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_SET = re.compile(r"\\\{.*\\\}", re.S)  # \{...\} (normalised: no spaces or \left)
_TUPLE = re.compile(r"[(\[].*[)\]]", re.S)
_WORD = re.compile(r"[A-Za-z][a-z]+[.,:;]?")  # a plain word (not x, nor a point or segment: ABC)


class _CompareTimeout(RewardTimeout):
    """One comparison ran past _COMPARE_SECONDS (the reward call's own limit stays armed)."""


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
    """The LaTeX answer after the marker (see the module's docstring)."""
    answer = last_boxed(after)
    if answer is None:
        spans = list(_MATH_SPAN.finditer(after))
        answer = next(g for g in spans[-1].groups() if g) if spans else None
    if answer is None:
        line = unwrap(first_line(after)).rstrip(".")
        # Plain words before and after the value are prose or units ("The answer is 5 cm.");
        # words alone ("Evelyn", "odd") are the answer.
        tokens = line.split()
        lo, hi = 0, len(tokens)
        while lo < hi and _WORD.fullmatch(tokens[lo]):
            lo += 1
        while hi > lo and _WORD.fullmatch(tokens[hi - 1]):
            hi -= 1
        answer = " ".join(tokens[lo:hi]) or line
    return answer.strip() or None


_UNIT = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}(?:\^\{?\d\}?)?$")


def normalize_math(answer: str) -> str:
    """Canonical string form of a LaTeX answer, so that notational variants compare equal."""
    s = unwrap(str(answer).strip()).rstrip(".")
    s = s.replace("\n", " ")
    s = re.sub(r"\\(?:displaystyle|left|right)(?![a-zA-Z])", "", s)  # \left( -> (, not \leftarrow
    s = re.sub(r"(?<!\\)\\[!,;:> ]", "", s)  # thin spaces and friends (not a row break)
    s = s.replace("~", "")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s).replace("\\varnothing", "\\emptyset")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("\\circ", "")  # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("{,}", "")  # LaTeX thousands separator 10{,}000
    s = _UNIT.sub("", s) or s  # trailing units such as 5\text{ cm}
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<![\d.])(\d+)\s+(\d+)/(\d+)", r"\1\\frac{\2}{\3}", s)  # 3 1/2: mixed, not 31/2
    s = s.replace(" ", "")
    # \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \frac{a}2 -> \frac{a}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    # "x=5", "\theta=30" -> the value (one '=' only, so equations such as y=2x+1=... stay)
    m = re.fullmatch(r"\\?[a-zA-Z]{1,6}(?:_\{?\w+\}?)?=([^=]+)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    return s


@functools.cache
def _math_verify():
    import math_verify

    # Its warnings are about its own timeouts, which are off here (time_limit replaces them).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


@functools.lru_cache(maxsize=4096)  # a gold answer is compared with many completions
def _parsed(answer: str):
    mv = _math_verify()
    answer = answer.replace("\\$", "").replace("$", "")  # currency, or stray delimiters
    return mv.parse(f"${answer}$", extraction_config=[mv.LatexExtractionConfig()], parsing_timeout=None)


def _verified(pred: str, gold: str) -> bool:
    if _COSTLY.search(pred):
        return False
    mv = _math_verify()  # imported outside the limit: an import cut short would stay half done
    try:
        with time_limit(_COMPARE_SECONDS, _CompareTimeout):
            # allow_set_relation_comp: "x \geq 5" answers "[5, \infty)", and the other way round.
            return bool(mv.verify(_parsed(gold), _parsed(pred), allow_set_relation_comp=True, timeout_seconds=None))
    except _CompareTimeout:
        return False


def math_equal(pred: str, gold: str) -> bool:
    if len(pred) > _MAX_CHARS:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    value, other = exact_value(a), exact_value(b)
    if value is not None and other is not None and "%" not in pred + gold:
        return value == other  # two numbers: exactly, not to math-verify's 6 rounded places
    if (_SET.fullmatch(a) and _TUPLE.fullmatch(b)) or (_SET.fullmatch(b) and _TUPLE.fullmatch(a)):
        return False  # a set is never a tuple or an interval (math-verify may say it is)
    return _verified(pred, gold)


def math_score(pred: str, gold) -> float:
    return float(math_equal(pred, str(gold)))


# ------------------------------------------------------------ the paper's own scoring


def _official_box(text: str) -> str:
    """find_box (utils.py:126-145): after the LAST "boxed" anywhere in the text (so also in
    "unboxed"), the content of the brace group that starts right there (all the rest when its
    braces never close); without a brace right after it ("\\boxed 5", "\\boxed {5}") the text
    up to the next "$", stripped -- "\\boxed {5}" so reads as "{5}"."""
    rest = text.rsplit("boxed", 1)[-1]
    if not rest.startswith("{"):
        return rest.split("$", 1)[0].strip()
    depth = 0
    for j, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:j]
    return rest[1:]


_OFFICIAL_OPENER = re.compile(r"\\[\[(]|\$")
_OFFICIAL_CLOSER = {"\\[": "\\]", "\\(": "\\)", "$$": "$$", "$": "$"}


def _official_span(text: str) -> str:
    """find_latex (utils.py:148-160): the stripped content of the LAST \\[..\\], \\(..\\), $$..$$
    or $..$ span; "" when none. Spans are found as its regex finds them: left to right, never
    overlapping, each closed by the first closer at least one character after its opener, $$
    tried before $ (so "$5 and $6" gives "5 and"). A scan in linear time, where the regex takes
    quadratic time on many unclosed openers; a closer once missing past a point stays missing."""
    found, pos, missing = "", 0, set()
    while (m := _OFFICIAL_OPENER.search(text, pos)) is not None:
        start = m.start()
        openers = ["$$", "$"] if text.startswith("$$", start) else [m.group()]
        pos = start + 1  # where the search goes on when no closer follows
        for opener in openers:
            closer = _OFFICIAL_CLOSER[opener]
            end = -1 if closer in missing else text.find(closer, start + len(opener) + 1)
            if end < 0:
                missing.add(closer)
                continue
            found, pos = text[start + len(opener) : end], end + len(closer)
            break
    return found.strip()


def _official_sqrt(text: str) -> str:
    """_fix_sqrt (utils.py:204-216): \\sqrtX -> \\sqrt{X} for the one character X after it,
    before spaces are removed: "\\sqrt 2" becomes "\\sqrt{ }2"."""
    head, *parts = text.split("\\sqrt")
    return head + "".join("\\sqrt" + (f"{{{p[0]}}}{p[1:]}" if p and p[0] != "{" else p) for p in parts)


def _official_fracs(text: str) -> str:
    """_fix_fracs (utils.py:171-201): \\fracab -> \\frac{a}{b}, \\fraca{b} -> \\frac{a}{b}; a
    \\frac with a single character after it leaves the whole text as it was."""
    head, *parts = text.split("\\frac")
    out = [head]
    for part in parts:
        if part and part[0] != "{":
            if len(part) < 2:
                return text
            part = "{" + part[0] + "}" + (part[1:] if part[1] == "{" else "{" + part[1] + "}" + part[2:])
        out.append("\\frac" + part)
    return "".join(out)


def _official_slash(text: str) -> str:
    """_fix_a_slash_b (utils.py:219-231): a/b of two integers written as Python writes them
    (no sign +, no leading zero) -> \\frac{a}{b}; anything else unchanged."""
    if text.count("/") != 1:
        return text
    a, b = text.split("/")
    try:
        a_int, b_int = int(a), int(b)
    except ValueError:
        return text
    return f"\\frac{{{a_int}}}{{{b_int}}}" if text == f"{a_int}/{b_int}" else text


_OFFICIAL_DROPS = [
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
]


def _official_strip(text: str) -> str:
    """_strip_string (utils.py:234-265), in its order. Its quirks: "\\left"/"\\right" are cut
    out of "\\leftarrow"/"\\rightarrow" too; only "\\%" is dropped, not a bare "%" (and twice:
    utils.py:248's "\\%" is the same two characters, which matters when a removal joins a new
    one); units go only as "\\text{ " with a space (everything from the first one on); "x=5"
    keeps 5 only when the left side has at most 2 characters; spaces go after _fix_sqrt."""
    for old, new in _OFFICIAL_DROPS:
        text = text.replace(old, new)
    text = text.strip("$").replace("\\$", "").split("\\text{ ", 1)[0]
    text = text.replace("\\%", "").replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    return _official_slash(_official_fracs(_official_sqrt(text).replace(" ", "")))


_OFFICIAL_NUMBER = re.compile(r"-?\d*\.?\d+")


def official_latex(text: str) -> str:
    """process_math_answer (utils.py:280-295): of the trimmed text, the content of the last
    "boxed" if the word occurs at all, else the last LaTeX span, else the last number (""
    without one); then _strip_string, trailing dots and slashes cut, \\text{..} unwrapped, all
    lower-cased. Two answers count as equal only when these strings are (eval_math.py:138, 151):
    "0.5" is not "\\frac{1}{2}", "50%" is not "50"."""
    text = official_trim(text)
    if "boxed" in text:
        answer = _official_box(text)
    else:
        numbers = _OFFICIAL_NUMBER.findall(text)
        answer = _official_span(text) or (numbers[-1] if numbers else "")
    answer = _official_strip(answer).rstrip(".").rstrip("/")
    return re.sub(r"\\text\{([^}]*)\}", r"\1", answer).lower()


def _official_gold(solution) -> list[str]:
    """eval_math.py:132-133: the solution's last "boxed" content, stripped and boxed again
    (extract_boxed_answer, utils.py:32-36), then read like a completion."""
    return [official_latex("\\boxed{" + _official_box(str(solution)).strip() + "}")]


# The script scores MATH-500 as the MATH test problems whose text is in MATH-500
# (eval_math.py:136-139), so with the MATH solution's box; a record without a solution
# (an answer alone) is read as that answer boxed.
OFFICIAL = Official(
    answer=lambda completion: official_latex(official_text(completion)),
    golds=_official_gold,
    source=lambda ex: ex.meta.get("solution", "\\boxed{" + ex.answer + "}"),
)


def _math_task(name: str, hub: str, splits: tuple[str, str] = ("train", "test")) -> Task:
    """MATH and MATH-500 differ only in name and dataset."""
    return Task(
        name,
        recipe="math",
        convert=convert,
        render=question_only,
        read=read_latex,
        score=math_score,
        official=OFFICIAL,
        max_new_tokens=1024,
        hub=hub,
        splits=splits,
    )


register(
    _math_task("math", "DigitalLearningGmbH/MATH-lighteval"),
    _math_task("math500", "HuggingFaceH4/MATH-500", splits=("test", "test")),
)
