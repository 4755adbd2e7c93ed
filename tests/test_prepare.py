"""`python -m hrpo.data prepare`: source forms into the project's record form, with counts,
duplicates, conflicts and rejects reported; every loader reads the result back."""

import json

import pytest
from conftest import DATA, needs_data

from hrpo.data import main as data_main
from hrpo.tasks.registry import load_task


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_duplicates_conflicts_and_rejects_are_reported(tmp_path, capsys):
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"question": "Q1?", "choices": ["w", "x", "y"], "answer": 1},
            {"question": "Q2?", "choices": "wxyz", "answer": 0},  # rejected: choices as a string
            {"question": "Q1?", "choices": ["w", "x", "y"], "answer": "B"},  # the same item again
        ],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {
                "id": "arc1",
                "question": {"stem": "Q1?", "choices": [{"text": t, "label": lab} for t, lab in zip("wxy", "123")]},
                "answerKey": "3",
            },  # the same prompt, another answer: a conflict
            {
                "id": "arc2",
                "question": {"stem": "Q3?", "choices": [{"text": t, "label": lab} for t, lab in zip("pq", "AB")]},
                "answerKey": "A",
            },
        ],
    )
    out = tmp_path / "out" / "mc.jsonl"
    assert data_main(["prepare", "--task", "arc-c", "--input", str(a), str(b), "--output", str(out)]) == 0
    assert "wrote 2 records" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "mc.jsonl.report.json").read_text())
    assert report["duplicates"] == 1 and report["conflicts"] == 1 and report["written"] == 2
    assert report["inputs"][0]["rejected"] == {
        "field 'choices': expected a list of 2-10 non-empty strings, got string": 1
    }
    assert report["inputs"][0]["first_at"] == {
        "field 'choices': expected a list of 2-10 non-empty strings, got string": f"{a}:2"
    }
    assert report["conflict_examples"][0]["kept"] == "B" and report["conflict_examples"][0]["dropped"] == "C"
    back = load_task("arc-c", str(out))
    assert [(e.question, e.choices, e.answer) for e in back] == [
        ("Q1?", ["w", "x", "y"], "B"),
        ("Q3?", ["p", "q"], "A"),
    ]
    assert back[1].meta == {"id": "arc2"}
    # Not overwritten unless asked; a prepared file of another family is refused record by record.
    assert data_main(["prepare", "--task", "arc-c", "--input", str(a), "--output", str(out)]) == 2
    with pytest.raises(ValueError, match="field 'hrpo_task': expected a task of the gsm8k family, got 'arc-c'"):
        load_task("gsm8k", str(out))


def test_prepared_records_are_validated_like_sources(tmp_path):
    bad = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"hrpo_task": "gsm8k", "question": "q", "answer": "3"},
            {"hrpo_task": "gsm8k", "question": "q", "answer": ""},
            {"hrpo_task": "gsm8k", "question": 5, "answer": "3"},
        ],
    )
    with pytest.warns(
        UserWarning,
        match=r"kept 1 of 3 records; rejected 2: 1 x field 'answer': expected a non-empty "
        r"string or a list of non-empty strings, got empty string",
    ):
        assert [e.answer for e in load_task("gsm8k", str(bad))] == ["3"]


@needs_data
def test_real_training_sets_round_trip(tmp_path, capsys):
    out = tmp_path / "gsm8k.jsonl"
    assert (
        data_main(["prepare", "--task", "gsm8k", "--input", str(DATA / "gsm8k" / "train.jsonl"), "--output", str(out)])
        == 0
    )
    original = load_task("gsm8k", str(DATA / "gsm8k" / "train.jsonl"))
    back = load_task("gsm8k", str(out))
    assert len(back) == len(original) == 7473
    assert all((a.question, a.answer, a.meta) == (b.question, b.answer, b.meta) for a, b in zip(original, back))
    # The multiple-choice recipe's sets together: MMLU-STEM holds 12 exact repeats.
    out = tmp_path / "mc.jsonl"
    argv = [
        "prepare",
        "--task",
        "mmlu",
        "--input",
        str(DATA / "mmlu_stem" / "test.jsonl"),
        str(DATA / "arc_challenge" / "test.jsonl"),
        "--output",
        str(out),
    ]
    assert data_main(argv) == 0
    report = json.loads(out.with_name("mc.jsonl.report.json").read_text())
    assert [i["kept"] for i in report["inputs"]] == [3018, 1172]
    assert report["duplicates"] == 12 and report["written"] == 3018 + 1172 - 12
