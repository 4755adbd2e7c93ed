"""Multiple-choice answers: the option letter read after the marker, for 3 to 10 options and
for ARC's numerically labelled items, and every gold letter of ARC-Challenge and MMLU-STEM
round-tripping."""

from __future__ import annotations

import pytest
from conftest import DATA, needs_data

from hrpo.core.prompts import ANSWER_MARKER
from hrpo.tasks import get_task
from hrpo.tasks.choice import LETTERS, convert, read_choice
from hrpo.tasks.registry import load_task

OURS = ("paper", "strict")  # the protocols our readers serve; "official": test_official_protocol.py

READS = [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("[D]", "D"),
    ("D: text", "D"),
    ("B) Vitamin C", "B"),
    ("**B**", "B"),
    ("\\boxed{B}", "B"),
    ("$\\boxed{\\text{B}}$", "B"),
    ("J", "J"),
    ("(J)", "J"),
    ("The answer is B", "B"),
    ("Answer: (C) text", "C"),
    ("Answer:B", "B"),
    ("The correct option is E.", "E"),
    ("The answer is (B), not (A)", "B"),
    ("I think A is wrong; the answer is C", "C"),
    ("(B) because (A) is wrong", "B"),
    # "A" the article and "I" the pronoun are not letters when another letter is there
    ("A good answer is C", "C"),
    ("A tough one, but C", "C"),
    ("I pick D", "D"),
    ("A is correct", "A"),
    ("B because", "B"),
    ("C\nbecause A", "C"),
    # lower case: the whole line, or a leading letter marked as an option; never prose
    ("c", "C"),
    ("(b)", "B"),
    ("d.", "D"),
    ("a) 12 N", "A"),
    ("**c**", "C"),
    ("\\boxed{c}", "C"),
    ("j", "J"),
    ("c. 42 N", "C"),
    ("a total of 5 apples", None),
    ("i.e. B", "B"),
    ("e.g. the second", None),
    ("k", None),
    # unreadable: lower case, numerals, option text, several letters, nothing
    ("the answer is a", None),
    ("2", None),
    ("Planetary days will become shorter.", None),
    ("B or C", None),
    ("Both", None),
    ("", None),
    ("\uff22", None),
]


@pytest.mark.parametrize("after,expected", READS)
def test_reading(after, expected):
    assert read_choice(after) == expected
    for protocol in OURS:
        assert get_task("mmlu").answer(f"thinking\n{ANSWER_MARKER} {after}", protocol) == expected


@pytest.mark.parametrize("n", range(3, 11))
def test_three_to_ten_options(n):
    task = get_task("mmlu")
    for gold in range(n):
        ex = convert({"question": "q", "choices": [f"option {j}" for j in range(n)], "answer": gold})
        assert task.render(ex).splitlines()[-1].startswith(f"{LETTERS[n - 1]}. ")
        for j, letter in enumerate(LETTERS[:n]):
            for form in ("{}", "({})", "The answer is {}", "**{}.** option text"):
                assert task.reward(f"{ANSWER_MARKER} {form.format(letter)}", ex.answer) == float(j == gold)


def test_numeric_labels_are_asked_and_answered_as_letters():
    """An ARC item labelled 1-4 is shown lettered A-D and its gold mapped onto the letters;
    the numeral itself is not an answer to the question as asked."""
    rec = {
        "question": {"stem": "q", "choices": [{"text": t, "label": str(i + 1)} for i, t in enumerate("wxyz")]},
        "answerKey": "2",
    }
    ex = convert(rec)
    task = get_task("arc-c")
    assert ex.answer == "B" and "\nB. x" in task.render(ex)
    assert task.reward(f"{ANSWER_MARKER} B", ex.answer) == 1.0
    assert task.reward(f"{ANSWER_MARKER} 2", ex.answer) == 0.0


@needs_data
@pytest.mark.parametrize("task,path", [("arc-c", "arc_challenge/test.jsonl"), ("mmlu-stem", "mmlu_stem")])
def test_gold_letters_round_trip(task, path):
    examples = load_task(task, str(DATA / path), "test")
    spec = get_task(task)
    assert {len(e.choices) for e in examples} <= set(range(3, 11))
    for e in examples:
        for letter in LETTERS[: len(e.choices)]:
            for protocol in OURS:
                assert spec.reward(f"reasoning\n{ANSWER_MARKER} {letter}", e.answer, protocol) == float(
                    letter == e.answer
                )
    if task == "arc-c":
        assert len(examples) == 1172 and {len(e.choices) for e in examples} == {3, 4, 5}


@pytest.mark.parametrize(
    "name, hub, splits",
    [  # MMLU-STEM publishes only a test split, so it is both the training and held-out one
        ("mmlu", "cais/mmlu:all", ("train", "test")),
        ("mmlu-stem", "TIGER-Lab/MMLU-STEM", ("test", "test")),
        ("arc-c", "allenai/ai2_arc:ARC-Challenge", ("train", "test")),
    ],
)
def test_registered_datasets(name, hub, splits):
    task = get_task(name)
    assert (task.recipe, task.hub, task.splits, task.max_new_tokens) == ("mmlu", hub, splits, 512)
    assert task.read("(C) text") == "C" and task.score("C", " c ") == 1.0
