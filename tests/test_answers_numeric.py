"""Numeric answers (GSM8K and the embedded arith task): what is read after the marker, how it
compares, and every GSM8K test reference solution scoring 1 under both protocols."""

from __future__ import annotations

import time

import pytest
from conftest import DATA, needs_data

from hrpo.core.prompts import ANSWER_MARKER
from hrpo.tasks import get_task
from hrpo.tasks.gsm8k import exact_value, number_score, read_number
from hrpo.tasks.registry import load_task

OURS = ("paper", "strict")  # the protocols our readers serve; "official": test_official_protocol.py

BIG = "9" * 5000  # past int()'s 4300-digit limit

READS = [
    # the number itself, in the forms models write it
    ("18", "18"),
    ("$1,234.50.", "1234.5"),
    ("\\$18", "18"),
    ("18%", "18"),
    ("**18**", "18"),
    ("\\boxed{18}", "18"),
    ("$\\frac{3}{4}$", "0.75"),
    ("-0", "0"),
    ("\u22127", "-7"),
    (".5", "0.5"),
    ("3.50", "3.5"),
    ("1,234,567", "1234567"),
    ("18\nbecause 9*2 = 18", "18"),
    # words and units around it: the last number (or expression) among them
    ("18 apples", "18"),
    ("The answer is 18", "18"),
    ("The answer is -5.", "-5"),
    ("1/3 cup", "1/3"),
    ("18. There were 3 boxes of 6", "18"),
    ("6 apples + 12 apples = 18 apples", "18"),
    # an equation by its last side, an expression by its value
    ("9*2 = 18", "18"),
    ("x = 5", "5"),
    ("18 = 9*2", "18"),
    ("1/2", "0.5"),
    ("4/6", "2/3"),
    ("2^10", "1024"),
    ("2^{10}", "1024"),
    ("-2^2", "-4"),
    ("(-2)^2", "4"),
    ("2^-1", "0.5"),
    ("(1+2)*3", "9"),
    ("3 \\times 4", "12"),
    ("12 \\div 4", "3"),
    ("\\frac{1}{\\frac{1}{2}}", "2"),
    # mixed numbers
    ("3 1/2", "3.5"),
    ("3\\frac{1}{2}", "3.5"),
    ("-3 1/2", "-3.5"),
    # large and exotic: kept exact, never expanded
    ("1e999999", "1e999999"),
    ("1e-5", "0.00001"),
    ("1.5e3", "1500"),
    (BIG, BIG),
    # invisible characters do not split a number
    ("1\u200b8", "18"),
    ("\u200f18\u200e", "18"),
    # unreadable: None
    ("", None),
    ("eighteen", None),
    ("5 = x", None),
    ("1/0", None),
    ("10^{10^{10}}", None),
    ("2^{99999999}", None),
    ("1e" + "9" * 5000, None),
    ("(" * 50 + "1" + ")" * 50, None),
    ("\uff11\uff18", None),  # full-width digits are not read as digits
]


@pytest.mark.parametrize("after,expected", READS)
def test_reading(after, expected):
    assert read_number(after) == expected
    for task in ("gsm8k", "arith"):
        for protocol in OURS:  # one reading for both protocols
            assert get_task(task).answer(f"work\n{ANSWER_MARKER} {after}", protocol) == expected


@pytest.mark.parametrize(
    "pred,gold,score",
    [
        ("0.5", "1/2", 1.0),
        ("1/2", "1", 0.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("3.5", "7/2", 1.0),
        ("1/3", "0.333333", 0.0),
        ("-0", "0", 1.0),
        ("18", "18.000", 1.0),
        ("18", 18, 1.0),
        ("-7", -7, 1.0),
        ("1234", "1,234", 1.0),
        (BIG, BIG, 1.0),
        (f"-{BIG}.5", f"-{BIG}.50", 1.0),
        (BIG, f"-{BIG}", 0.0),
        ("1e999999", "1e999999", 1.0),
        ("1e999999", "10e999998", 1.0),
        ("1e999999", "5", 0.0),
        ("1", f"\\frac{{{BIG}}}{{{BIG}}}", 0.0),  # no arithmetic on numbers too long to expand: unreadable
    ],
)
def test_scoring(pred, gold, score):
    assert number_score(pred, gold) == score


def test_rewards_of_common_completions():
    fn = get_task("gsm8k").reward
    assert fn("so 9*2 = 18\n#### 9*2 = 18", "18") == 1.0  # was 9: the leading number
    assert fn("#### 1/2", "1") == 0.0 and fn("#### 1/2", "0.5") == 1.0  # one half, not 1
    assert fn("#### 2^10", "2") == 0.0 and fn("#### 2^10", "1024") == 1.0
    assert fn("#### 1e999999", "1") == 0.0
    assert fn("#### 18 #### 18", "18", "strict") == 0.0 and fn("#### 17 #### 18", "18", "paper") == 1.0


def test_exact_value_is_strict():
    """exact_value (MATH's fast path) reads a number or an expression and nothing else."""
    assert exact_value("(1,2)") is None and exact_value("18 apples") is None and exact_value("x+1") is None
    assert exact_value("1,234") == 1234 and exact_value("918\\frac{1}{2}") == exact_value("918.5")


@needs_data
def test_every_gsm8k_test_reference_solution_scores_one():
    examples = load_task("gsm8k", str(DATA / "gsm8k"), "test")
    task = get_task("gsm8k")
    start = time.perf_counter()
    for protocol in OURS:
        completions = [f"{e.meta['solution']}\n{ANSWER_MARKER} {e.meta['final']}" for e in examples]
        failed = [
            (c[-80:], e.answer) for c, e in zip(completions, examples) if task.reward(c, e.answer, protocol) != 1.0
        ]
        assert not failed, failed[:5]
        wrong = [f"{e.meta['solution']}\n{ANSWER_MARKER} {exact_value(e.answer) + 1}" for e in examples]
        assert not any(task.reward(c, e.answer, protocol) for c, e in zip(wrong, examples))
    print(f"gsm8k test: {len(examples)} reference solutions x 2 protocols in {time.perf_counter() - start:.2f} s")
