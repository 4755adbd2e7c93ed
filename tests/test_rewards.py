"""Reward tests: gold answers from the real data fed back as completions must score 1, and
wrong, doubled or missing answers must score 0."""

from __future__ import annotations

import pytest
from conftest import DATA, needs_data

from hrpo.core.prompts import ANSWER_MARKER
from hrpo.tasks.base import last_boxed
from hrpo.tasks.math import math_equal, normalize_math
from hrpo.tasks.qa import normalize_qa
from hrpo.tasks.registry import load_task
from hrpo.tasks.rewards import extract_answer, get_reward_fn


def _rate(task, completions, answers, label):
    rewards = get_reward_fn(task)(completions, answers)
    failed = [(c[-200:], a) for c, a, r in zip(completions, answers, rewards) if r != 1.0]
    for completion, answer in failed[:20]:
        print(f"[{label}] gold={answer!r} completion tail={completion!r}")
    rate = 1 - len(failed) / len(rewards)
    print(f"[{label}] {rate:.4f} of {len(rewards)} score 1")
    return rate


# ---------------------------------------------------------------- real data fed back


@needs_data
@pytest.mark.parametrize("split", ["test", "train"])
def test_gsm8k_reference_solutions_score_one(split):
    examples = load_task("gsm8k", str(DATA / "gsm8k"), split)
    # The worked solution, final line "#### N" exactly as the dataset writes N (commas kept).
    completions = [f"{e.meta['solution']}\n{ANSWER_MARKER} {e.meta['final']}" for e in examples]
    assert _rate("gsm8k", completions, [e.answer for e in examples], f"gsm8k/{split}") >= 0.995
    # A wrong number in the same format scores 0.
    wrong = [f"{e.meta['solution']}\n{ANSWER_MARKER} {int(e.answer) + 1}" for e in examples[:200]]
    assert sum(get_reward_fn("gsm8k")(wrong, [e.answer for e in examples[:200]])) == 0


@needs_data
def test_math500_answers_score_one():
    examples = load_task("math", str(DATA / "math" / "math500.jsonl"))
    golds = [e.answer for e in examples]
    # The boxed answer of the reference solution, written after the marker, vs the `answer` field.
    boxed = [f"reasoning\n{ANSWER_MARKER} {last_boxed(e.meta['solution'])}" for e in examples]
    assert _rate("math", boxed, golds, "math500 boxed") >= 0.99
    as_boxed = [f"so\n{ANSWER_MARKER} $\\boxed{{{g}}}$" for g in golds]
    assert _rate("math", as_boxed, golds, "math500 \\boxed{answer}") == 1.0
    # Shifting every answer to another item's answer must almost never match.
    shifted = golds[1:] + golds[:1]
    wrong = get_reward_fn("math")([f"{ANSWER_MARKER} {g}" for g in shifted], golds)
    assert sum(wrong) <= 5


@needs_data
@pytest.mark.filterwarnings("ignore:.*kept 7498 of 7500")  # two MATH train items, see test_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_math_train_test_boxed_answers(split):
    examples = load_task("math", str(DATA / "math"), split)
    completions = [f"{e.meta['solution']}\n{ANSWER_MARKER} {e.answer}" for e in examples]
    assert _rate("math", completions, [e.answer for e in examples], f"math/{split}") == 1.0


@needs_data
def test_mmlu_letters():
    examples = load_task("mmlu", str(DATA / "mmlu_stem"), "test")
    golds = [e.answer for e in examples]
    forms = ["{}", "({})", "{}.", "{}) because", "The answer is {}", "**{}**"]
    completions = [f"thinking\n{ANSWER_MARKER} " + forms[i % len(forms)].format(g) for i, g in enumerate(golds)]
    assert _rate("mmlu", completions, golds, "mmlu_stem") == 1.0
    wrong = [f"{ANSWER_MARKER} {'ABCD'[('ABCD'.index(g) + 1) % 4]}" for g in golds]
    assert sum(get_reward_fn("mmlu")(wrong, golds)) == 0


# ---------------------------------------------------------------- hand-written cases


@pytest.mark.parametrize("task", ["gsm8k", "arith"])
def test_numeric_forms(task):
    fn = get_reward_fn(task)
    good = [
        "#### 18",
        "x\n#### $18",
        "#### 18 dollars",
        "#### 18.",
        "#### \\boxed{18}",
        "#### 18.00",
        "#### The answer is 18",
        "#### **18**\nbecause 9*2",
    ]
    assert fn(good, ["18"] * len(good)) == [1.0] * len(good)
    assert fn(["#### 1,234,567"], ["1234567"]) == [1.0]
    assert fn(["#### 3.50"], ["3.5"]) == [1.0]
    assert fn(["#### -7"], [-7]) == [1.0]
    bad = ["#### 17", "the answer is 18", "#### 18\n#### 18", "####", "#### eighteen", "18 ####"]
    assert fn(bad, ["18"] * len(bad)) == [0.0] * len(bad)


@pytest.mark.parametrize("task", ["gsm8k", "arith"])
def test_numeric_long_numbers(task):
    """Numbers past int()'s 4300-digit limit compare as decimal strings and never raise."""
    fn = get_reward_fn(task)
    big = "9" * 5000
    assert (
        fn([f"#### {big}", f"#### -{big}.50", f"#### 0.{big}", f"#### 000{big}"], [big, f"-{big}.5", f"0.{big}0", big])
        == [1.0] * 4
    )
    assert (
        fn(
            [f"#### {big[:-1]}8", f"#### {big}", f"#### {big}1", "#### 1e999999", f"#### {big}"],
            [big, f"-{big}", big, "5", "1/3"],
        )
        == [0.0] * 5
    )
    assert fn(["#### 1"], [rf"\frac{{{big}}}{{{big}}}"]) == [0.0]  # a fraction too long to read scores 0


def test_marker_count_and_prompt_irrelevant():
    fn = get_reward_fn("gsm8k")
    # The reward sees completions only: a marker in the prompt cannot add or remove one.
    prompt = "Example: #### 5\nQuestion: 2+3?"
    assert fn(["#### 5"], ["5"]) == [1.0]
    assert fn([prompt + "#### 5"], ["5"]) == [0.0]  # two markers if a prompt were echoed
    assert fn(["5"], ["5"]) == [0.0]
    assert extract_answer("#### 5 #### 6") is None
    with pytest.raises(ValueError):
        fn(["#### 5"], ["5", "6"])


def test_math_normalisation():
    pairs = [
        (r"\dfrac{1}{2}", r"\frac12"),
        (r"\frac{1}{2}", "0.5"),
        ("1/2", r"\tfrac{1}{2}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"90^\circ", "90"),
        (r"\$5", "5"),
        (r"x = 5", "5"),
        (r"\text{Monday}", "Monday"),
        ("10.", "10"),
        (r"5\text{ cm}", "5"),
        (r"10{,}000", "10000"),
        (r"\!-\!3", "-3"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"-\frac{3}{4}", "-0.75"),
        (r"\boxed{7}", "7"),
        ("$7$", "7"),
    ]
    for a, b in pairs:
        assert math_equal(a, b), (a, b, normalize_math(a), normalize_math(b))
    for a, b in [("1/2", "1/3"), (r"\frac{\pi}{2}", r"\frac{\pi}{3}"), ("(1,2)", "(2,1)"), ("12", "1,2")]:
        assert not math_equal(a, b), (a, b)


def test_math_reward():
    fn = get_reward_fn("math")
    assert fn(["so #### $\\frac{3}{4}$"], ["\\dfrac34"]) == [1.0]
    assert fn(["#### the answer is \\boxed{0.75}"], ["\\frac{3}{4}"]) == [1.0]
    assert fn(["\\boxed{3}"], ["3"]) == [0.0]  # a boxed answer without the marker does not count
    assert fn(["#### 3 #### 3"], ["3"]) == [0.0]


def test_mmlu_forms():
    fn = get_reward_fn("mmlu")
    assert (
        fn(
            [
                "#### B",
                "#### (B)",
                "#### B.",
                "#### B) text",
                "#### The answer is B",
                "#### Answer: B",
                "#### \\boxed{B}",
            ],
            ["B"] * 7,
        )
        == [1.0] * 7
    )
    assert fn(["#### C", "#### Both", "B", "#### B #### B"], ["B"] * 4) == [0.0] * 4
    assert extract_answer("#### (D) 42", "mmlu") == "D"


def test_rag_qa_reward():
    fn = get_reward_fn("rag-qa")
    golds = [["William Shakespeare", "Shakespeare"]] * 4
    out = fn(["#### shakespeare.", "#### The William Shakespeare!", "#### Marlowe", "Shakespeare"], golds)
    assert out == [1.0, 1.0, 0.0, 0.0]
    assert normalize_qa("The  Eiffel, Tower!") == "eiffel tower"


def test_rag_qa_empty_answers_never_match():
    """An answer or alias that normalises to "" (articles, punctuation) matches nothing."""
    fn = get_reward_fn("rag-qa")
    assert fn(
        ["#### .", "#### The", "#### the an", "#### ", "#### Paris"],
        ["The The", ["a", "Paris"], ["An", "!"], "A", ["The", "paris"]],
    ) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_chat_style_completions_and_unknown_task():
    fn = get_reward_fn("gsm8k")
    assert fn([[{"role": "assistant", "content": "#### 4"}]], ["4"]) == [1.0]
    with pytest.raises(ValueError):
        get_reward_fn("poetry")
