"""MATH answers: reading after the marker, equivalence on a hand-labelled set (ours against
plain math-verify, measured in the same run), math-verify used without eval on model text,
per-comparison time limits that keep the reward call's deadline, and MATH-500's reference
answers judged equal to the boxed answers of their solutions."""

from __future__ import annotations

import re
import signal
import time

import pytest
from conftest import DATA, needs_data

import hrpo.tasks.math as math_task
from hrpo.core.prompts import ANSWER_MARKER
from hrpo.tasks import get_task
from hrpo.tasks.base import last_boxed
from hrpo.tasks.math import math_equal, normalize_math, read_latex
from hrpo.tasks.registry import load_task
from hrpo.tasks.reward_guard import RewardTimeout, time_limit

OURS = ("paper", "strict")  # the protocols our readers serve; "official": test_official_protocol.py

# (gold, prediction, equal?): each pair and its label written by hand for this file.
LABELLED = [
    # numbers, fractions, decimals
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", r"\frac34", True),
    (r"\frac{2}{3}", r"\cfrac{2}{3}", True),
    (r"-\frac{3}{4}", "-0.75", True),
    (r"-\frac{3}{4}", r"\frac{-3}{4}", True),
    ("1.5", "1.50", True),
    ("6", "6.0", True),
    (r"\frac{3}{4}", r"\frac{4}{3}", False),
    (r"\frac{1}{3}", "0.3", False),
    ("5", "-5", False),
    ("1000", "100", False),
    # mixed numbers
    ("918.5", r"918\frac{1}{2}", True),
    (r"\frac{31}{4}", r"7\frac{3}{4}", True),
    (r"\frac{7}{3}", r"2\tfrac{1}{3}", True),
    (r"\frac{7}{2}", "3 1/2", True),
    ("918.5", r"\frac{918}{2}", False),
    # thousands separators, currency, units, degrees, text
    ("10000", "10{,}000", True),
    ("10000", "10,000", True),
    ("1000", r"\$1,\!000", True),
    ("18.90", r"\$18.90", True),
    ("5", r"5\text{ cm}", True),
    ("12", r"12 \text{ inches}", True),
    (r"5\text{ square units}", "5", True),
    ("5", r"6\text{ cm}", False),
    ("90", r"90^\circ", True),
    (r"90^{\circ}", "90", True),
    (r"45^\circ", r"90^\circ", False),
    (r"\text{Monday}", "Monday", True),
    (r"\text{Monday}", r"\text{Tuesday}", False),
    (r"\text{(C)}", "(C)", True),
    (r"\textbf{(A)}", r"\text{(A)}", True),
    (r"\text{odd}", "odd", True),
    # percent
    (r"28\%", "28", True),
    (r"28\%", "28 percent", True),
    (r"28\%", r"28\text{ percent}", True),
    (r"28\%", "27", False),
    # symbolic equality
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt2}", True),
    (r"4\sqrt{2}", r"\sqrt{32}", True),
    (r"2\sqrt{3}", r"3\sqrt{2}", False),
    (r"\sqrt{2}", "2", False),
    ("2x+2", "2(x+1)", True),
    ("x^2-1", "(x-1)(x+1)", True),
    (r"\frac{x}{2}", r"\frac{1}{2}x", True),
    (r"\frac{x+1}{x-1}", r"\frac{1+x}{x-1}", True),
    ("2x+1", "2x-1", False),
    ("x^2", "2x", False),
    (r"\sec^2 y", r"\tan^2 y + 1", True),
    (r"\sec^2 y", r"\tan^2 y", False),
    ("1", r"\sin^2 x + \cos^2 x", True),
    ("3", r"\log_2 8", True),
    ("10", r"\binom{5}{2}", True),
    ("20", r"\binom{5}{2}", False),
    ("1024", "2^{10}", True),
    (r"10^{10}", r"10^{9}", False),
    (r"\frac{\pi}{2}", r"\dfrac{\pi}{2}", True),
    (r"\frac{\pi}{2}", r"\frac{\pi}{3}", False),
    (r"\pi", "3.14", False),
    ("1+2i", "2i+1", True),
    ("1+2i", "1-2i", False),
    # equations and assignments
    ("5", "x = 5", True),
    ("-0.5", r"k = -\frac{1}{2}", True),
    ("6", "x = 5", False),
    ("y = 2x + 3", "y=2x+3", True),
    ("y = 2x + 3", "y = 3x + 2", False),
    # inequalities
    (r"x \geq 5", "x >= 5", True),
    (r"x \ge 5", r"x\geq5", True),
    ("x < -2", "x<-2", True),
    (r"x > 5", r"x \geq 5", False),
    (r"x \le 3", r"x \ge 3", False),
    # intervals
    ("[1, 4]", "[1,4]", True),
    (r"(-\infty, 3) \cup (5, \infty)", r"(-\infty,3)\cup(5,\infty)", True),
    (r"[5, \infty)", r"x \geq 5", True),
    ("(-2, 3)", "-2 < x < 3", True),
    ("[2, 5]", r"x \in [2,5]", True),
    ("[1, 4]", "(1, 4)", False),
    (r"(-\infty, 3)", r"(-\infty, 3]", False),
    ("[2, 5]", "[2, 6]", False),
    # sets and tuples
    (r"\{1, 2, 3\}", r"\{3, 2, 1\}", True),
    (r"\{1, 2\}", r"\{1, 2, 3\}", False),
    (r"(1,\frac{9}{2})", "(1,4.5)", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})", True),
    ("(2, 3)", "(2,3)", True),
    ("(1, 2)", "(2, 1)", False),
    (r"(3, \frac{\pi}{2})", r"(3, \frac{\pi}{3})", False),
    ("12", "1,2", False),
    # matrices and vectors
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\begin{pmatrix} \frac{1}{2} \\ -1 \end{pmatrix}", r"\begin{bmatrix} 0.5 \\ -1 \end{bmatrix}", True),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}", False),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", False),
    # infinity
    (r"\infty", r"-\infty", False),
    # numbers in other notations, with units and text
    ("1", "1.0000001", False),
    (r"\frac{1}{2}", r"\frac{2}{4}", True),
    ("1234", "1,234", True),
    ("123456789", "123,456,789", True),
    (r"10^{6}", "1,000,000", True),
    ("3500", r"3.5 \times 10^{3}", True),
    (r"\frac{3}{2}", r"1\frac{1}{2}", True),
    ("-2.5", r"-2\frac{1}{2}", True),
    ("-1.5", r"-2\frac{1}{2}", False),
    (r"\frac{9}{2}", r"4\frac{1}{2}", True),
    (r"\frac52", r"2.5 \text{ hours}", True),
    ("20", r"\$20", True),
    ("20", r"20 \text{ dollars}", True),
    ("60", r"60 \text{ degrees}", True),
    ("20", r"20 \text{ cm}^2", True),
    (r"\text{Evelyn}", r"\text{ Evelyn }", True),
    (r"\text{Evelyn}", r"\text{Evan}", False),
    # roots, factorials, binomials, floors, complex numbers, functions
    (r"\frac{x^2}{4}", "0.25x^2", True),
    ("2", r"\sqrt[3]{8}", True),
    (r"\sqrt{20}", r"2 \sqrt{5}", True),
    (r"3\sqrt{2}", r"\sqrt{6}", False),
    ("120", "5!", True),
    ("20", r"\binom{6}{3}", True),
    ("3", r"\lfloor 3.7 \rfloor", True),
    ("-1", r"e^{i\pi}", True),
    (r"\frac{1}{2}", r"\frac{1}{2}x", False),
    ("2n+1", "2n-1", False),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}", True),
    ("2x", "f(x) = 2x", True),
    # equations, lists of solutions, sets against tuples
    ("y = -\\frac{1}{2}x + 3", r"y = 3 - \frac{x}{2}", True),
    ("y = 2x", r"y = \frac{x}{2}", False),
    ("x = 2", "x = -2", False),
    ("2, 3", "3, 2", True),
    (r"\{-1, 1\}", "-1, 1", True),
    (r"\{1, 2, 3\}", r"\{1, 2, 4\}", False),
    ("(1, 2)", r"\{1, 2\}", False),
    ("(2, 3)", "(a, b) = (2, 3)", True),
    (r"\emptyset", r"\varnothing", True),
    # intervals against inequalities
    ("[3, 5]", r"3 \le x \le 5", True),
    (r"(-\infty, \infty)", r"\mathbb{R}", True),
    ("(0, 1]", r"x \in (0, 1]", True),
    ("[0, 1)", "[0, 1]", False),
    (r"(0, \infty)", r"[0, \infty)", False),
    # matrices: shape and form
    (r"\begin{pmatrix} 1 & 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", False),
    (r"\begin{pmatrix} 2 & 0 \\ 0 & 2 \end{pmatrix}", r"\begin{bmatrix} 2 & 0 \\ 0 & 2 \end{bmatrix}", True),
]

READS = [
    ("\\frac{3}{4}", "\\frac{3}{4}"),
    ("$\\frac{3}{4}$", "\\frac{3}{4}"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("x = \\boxed{5}, not $6$", "5"),
    ("\\boxed{5} at first, but \\boxed{6}", "6"),
    ("so $x$ is $7$", "7"),
    ("\\(\\sqrt{2}\\)", "\\sqrt{2}"),
    ("\\[ \\frac12 \\]", "\\frac12"),
    ("$$ 7 $$", "7"),
    ("\\$5", "\\$5"),
    ("x = 5", "x = 5"),
    ("(1, 2)", "(1, 2)"),
    ("The answer is 5 cm.", "5"),
    ("Answer: (1, 2)", "(1, 2)"),
    ("the final answer is: 12", "12"),
    ("\\frac{3}{4} cup", "\\frac{3}{4}"),
    ("5\\text{ cm}", "5\\text{ cm}"),
    ("Evelyn", "Evelyn"),
    ("\\text{Monday}", "\\text{Monday}"),
    ("\\frac{1}{7}\\triangle ABC", "\\frac{1}{7}\\triangle ABC"),
    ("-2 \\text{ or } -12", "-2 \\text{ or } -12"),
    ("18\nthen $2 \\cdot 9$", "2 \\cdot 9"),
    ("", None),
]


@pytest.mark.parametrize("after,expected", READS)
def test_reading(after, expected):
    assert read_latex(after) == expected
    for protocol in OURS:
        assert get_task("math").answer(f"work $y$\n{ANSWER_MARKER} {after}", protocol) == expected


def _plain_math_verify(gold: str, pred: str) -> bool:
    """math-verify as its documentation uses it (on this file's own strings, not model text)."""
    from math_verify import parse, verify

    return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))


def test_labelled_equivalence_at_least_math_verify():
    assert len(LABELLED) >= 60 and {label for *_, label in LABELLED} == {True, False}
    ours = [math_equal(pred, gold) == label for gold, pred, label in LABELLED]
    plain = [_plain_math_verify(gold, pred) == label for gold, pred, label in LABELLED]
    for (gold, pred, label), o, p in zip(LABELLED, ours, plain):
        if not (o and p):
            verdicts = f"{'ours wrong' if not o else '':10} {'math-verify wrong' if not p else '':17}"
            print(f"{verdicts} {gold!r} vs {pred!r}: {label}")
    accuracy, baseline = sum(ours) / len(ours), sum(plain) / len(plain)
    print(f"labelled set of {len(LABELLED)}: ours {accuracy:.3f}, plain math-verify {baseline:.3f}")
    assert accuracy >= baseline and accuracy >= 0.95


def test_no_string_reaches_sympys_parser_but_numbers(monkeypatch):
    """sympy's parse_expr (which runs eval) sees only what the LaTeX lexer already read as a
    number: latex2sympy2_extended builds numbers with sympy.Number(token text)."""
    import math_verify.parser
    import sympy.parsing.sympy_parser as sympy_parser

    seen = []
    real = sympy_parser.parse_expr
    monkeypatch.setattr(sympy_parser, "parse_expr", lambda s, *a, **k: seen.append(s) or real(s, *a, **k))
    for cached in (math_task._parsed, math_verify.parser.parse_latex_cached, math_verify.parser.extract_latex):
        cached.cache_clear()
    hostile = [
        "__import__('os').system('true')",
        "\\operatorname{eval}(1)",
        "\\mathrm{lambda: 1}",
        "x.__class__",
        "\\text{exec(1)}",
        "1_000",
        "0x1F",
        "1e5",
        "\\$5",
        "12\\%",
        "0,111",
        "1,234.5",
    ]
    for gold, pred, _ in LABELLED + [("1", h, False) for h in hostile]:
        math_equal(pred, gold)
    assert seen and all(re.fullmatch(r"[0-9.,]+", s) for s in seen), sorted(set(seen))


class _Inner(RewardTimeout):
    pass


def _spin(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_time_limit_nests():
    # No enclosing limit: the inner one fires, and leaves no timer behind.
    with pytest.raises(_Inner):
        with time_limit(0.05, _Inner):
            _spin(1)
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    # An inner limit that fires keeps the outer deadline: re-armed with the time it has left.
    with time_limit(5):
        with pytest.raises(_Inner):
            with time_limit(0.05, _Inner):
                _spin(1)
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 4 < left < 4.96
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    # An outer limit that falls first fires as its own, through the inner block.
    with pytest.raises(RewardTimeout) as err:
        with time_limit(0.05):
            with time_limit(5, _Inner):
                _spin(1)
    assert type(err.value) is RewardTimeout
    # An outer deadline that passed while the inner block ran (its timeout swallowed, as a
    # library's bare except would) fires at once when the block ends.
    with pytest.raises(RewardTimeout) as err:
        with time_limit(0.2):
            with time_limit(0.05, _Inner):
                try:
                    _spin(1)
                except _Inner:
                    _spin(0.3)
            _spin(1)
    assert type(err.value) is RewardTimeout


def test_a_slow_comparison_is_cut_and_the_reward_deadline_kept(monkeypatch):
    monkeypatch.setattr(math_task, "_COMPARE_SECONDS", 0.2)
    with time_limit(30):
        start = time.perf_counter()
        assert not math_equal("(x+1)^{9999}", "\\frac{1}{2}")  # sympy works on it for minutes
        assert time.perf_counter() - start < 1.5
        assert 25 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30


def test_answers_sympy_cannot_bound_are_not_compared():
    start = time.perf_counter()
    for pred in ["10^{10^{10}}", "2^{123456789}", "99999999!", "2^{(2^{20})}", "9" * 300, "x" * 2000]:
        assert not math_equal(pred, "1")
    assert time.perf_counter() - start < 1


@needs_data
def test_math500_reference_answers_equal_their_boxed_solutions():
    examples = load_task("math", str(DATA / "math" / "math500.jsonl"))
    assert len(examples) == 500
    start = time.perf_counter()
    unequal = [
        (e.answer, last_boxed(e.meta["solution"]))
        for e in examples
        if not math_equal(last_boxed(e.meta["solution"]), e.answer)
    ]
    assert not unequal, unequal
    task = get_task("math500")
    for protocol in OURS:
        assert all(
            task.reward(f"{e.meta['solution']}\n{ANSWER_MARKER} {e.answer}", e.answer, protocol) for e in examples
        )
    # Each answer against the next item's, which the library mostly decides: only the pairs
    # that are the same answer written alike (5 and x=5) may be equal.
    golds = [e.answer for e in examples]
    same = [(g, p) for g, p in zip(golds, golds[1:] + golds[:1]) if math_equal(p, g)]
    print(f"math500: 500 pairs equal, {len(same)} shifted pairs equal {same}, {time.perf_counter() - start:.2f} s")
    assert all(normalize_math(g) == normalize_math(p) for g, p in same)


@pytest.mark.parametrize(
    "name, hub, splits",
    [  # MATH-500 publishes only a test split, so it is both the training and held-out one
        ("math", "DigitalLearningGmbH/MATH-lighteval", ("train", "test")),
        ("math500", "HuggingFaceH4/MATH-500", ("test", "test")),
    ],
)
def test_registered_datasets(name, hub, splits):
    task = get_task(name)
    assert (task.recipe, task.hub, task.splits, task.max_new_tokens) == ("math", hub, splits, 1024)
    assert task.read("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
