"""Loader tests on the real data in ../shared/data and on small records written to tmp_path."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from conftest import DATA, needs_data

from hrpo.core.prompts import Example
from hrpo.tasks.base import last_boxed
from hrpo.tasks.choice import render as render_choice
from hrpo.tasks.qa import render as render_qa
from hrpo.tasks.records import DataError, load_records
from hrpo.tasks.registry import convert_records, load_task


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- real data


@needs_data
@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_gsm8k_real(split, count):
    examples = load_task("gsm8k", str(DATA / "gsm8k"), split)
    assert len(examples) == count
    assert all(isinstance(e, Example) for e in examples)
    first = examples[0]
    assert first.answer.lstrip("-").isdigit()
    # Gold answers are bare integers: thousands commas removed, calculator notes dropped.
    assert all("," not in e.answer and e.answer.lstrip("-").isdigit() for e in examples)
    assert all("<<" not in e.meta["solution"] and "####" not in e.meta["solution"] for e in examples)
    if split == "test":
        assert first.answer == "18" and first.question.startswith("Janet")


@needs_data
def test_gsm8k_commas_removed():
    examples = load_task("gsm8k", str(DATA / "gsm8k" / "test.jsonl"))
    with_commas = [e for e in examples if "," in e.meta["final"]]
    assert with_commas and all(e.answer == e.meta["final"].replace(",", "") for e in with_commas)


@needs_data
def test_math_real():
    path = DATA / "math" / "train.jsonl"
    with pytest.warns(UserWarning) as caught:  # two train items have an empty \boxed{}
        train = load_task("math", str(DATA / "math"), "train")
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 7498 of 7500 records; rejected 2: 2 x field 'solution': expected a \\boxed{{}} answer, "
        f"got an empty \\boxed{{}} (first at {path}:5342)"
    ]
    assert len(train) == 7498
    test = load_task("math", str(DATA / "math"), "test")
    assert len(test) == 5000 and all(e.answer for e in test)
    m500 = load_task("math", str(DATA / "math" / "math500.jsonl"))
    assert len(m500) == 500
    # The MATH-500 `answer` field agrees with the last \boxed{} of its solution.
    assert sum(last_boxed(e.meta["solution"]) == e.answer for e in m500) >= 495


@needs_data
def test_mmlu_real():
    examples = load_task("mmlu", str(DATA / "mmlu_stem"), "test")
    assert len(examples) == 3018
    assert {e.answer for e in examples} == {"A", "B", "C", "D"}
    e = examples[0]
    assert e.answer == "C" and len(e.choices) == 4
    prompt = render_choice(e)
    assert prompt.startswith("Question: Based on the characteristic population curves")
    assert "\nOptions:\nA. maintain" in prompt and prompt.endswith("\nD. increase the mortality rate")


# Every real file the loaders read is used whole, except the two MATH train items whose
# solutions end in an empty \boxed{} (train/number_theory/7115.json and 7117.json, lines 5342
# and 5344): they have no gold answer to compare against.
REAL_FILES = [
    ("gsm8k", "gsm8k/train.jsonl", {}),
    ("gsm8k", "gsm8k/test.jsonl", {}),
    ("math", "math/train.jsonl", {"field 'solution': expected a \\boxed{} answer, got an empty \\boxed{}": 2}),
    ("math", "math/test.jsonl", {}),
    ("math", "math/math500.jsonl", {}),
    ("mmlu", "mmlu_stem/test.jsonl", {}),
]


@needs_data
@pytest.mark.parametrize("task,name,rejected", REAL_FILES)
def test_real_files_rejections(task, name, rejected):
    records, source = load_records(str(DATA / name))
    examples, report = convert_records(task, records, source)
    assert dict(report.reasons) == rejected
    assert report.kept == len(examples) == len(records) - sum(rejected.values())
    if rejected:
        assert list(report.first_at.values()) == [f"{DATA / name}:5342"]


@needs_data
def test_limit_keeps_first():
    examples = load_task("gsm8k", str(DATA / "gsm8k"), "test", limit=3)
    assert [e.answer for e in examples] == [e.answer for e in load_task("gsm8k", str(DATA / "gsm8k"), "test")[:3]]


# ---------------------------------------------------------------- hand-written records


def test_last_boxed():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$ and \boxed{x^{2}}.") == "x^{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"is $\boxed 2$.") == "2"
    assert last_boxed("no box") is None


def test_arc_forms(tmp_path):
    recs = [
        {"question": "Q1?", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"question": "Q2?", "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
        {"question": "Q3?", "choices": ["p", "q", "r", "s", "t"], "answer": "E"},
        {"question": "Q4?", "choices": ["p", "q"], "answer": 1},
    ]
    ex = load_task("mmlu", str(_write_jsonl(tmp_path / "arc.jsonl", recs)))
    assert [e.answer for e in ex] == ["B", "C", "E", "B"]
    assert ex[1].question == "Q2?" and ex[1].choices == ["w", "x", "y", "z"]
    assert render_choice(ex[1]) == "Question: Q2?\nOptions:\nA. w\nB. x\nC. y\nD. z"


def test_rag_qa(tmp_path):
    recs = [
        {
            "question": "Who wrote Hamlet?",
            "contexts": [{"title": "Hamlet", "text": "A play by Shakespeare."}, "Plain passage."],
            "golden_answers": ["William Shakespeare", "Shakespeare"],
        },
        {"question": "Capital of France?", "contexts": ["Paris is the capital."], "golden_answers": "Paris"},
    ]
    path = tmp_path / "nq.json"  # a .json list of records
    path.write_text(json.dumps(recs), encoding="utf-8")
    ex = load_task("rag-qa", str(path))
    assert ex[0].answer == ["William Shakespeare", "Shakespeare"] and ex[1].answer == ["Paris"]
    # The paper's form: the passages as title::::text lines under a header, a blank line, the question.
    assert render_qa(ex[0]) == (
        "Context (which may or may not be relevant):\nHamlet::::A play by Shakespeare.\n"
        "Plain passage.\n\nQuestion: Who wrote Hamlet?"
    )


def test_parquet_and_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = [{"problem": "1+1?", "solution": r"It is $\boxed{2}$."}, {"problem": "2+2?", "solution": r"$\boxed{4}$"}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "test.parquet")
    assert [e.answer for e in load_task("math", str(tmp_path / "test.parquet"))] == ["2", "4"]
    # A directory resolves to {split}.parquet / {split}.jsonl.
    _write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "work\n#### 1,234"}])
    assert load_task("math", str(tmp_path), split="test")[1].answer == "4"
    assert load_task("gsm8k", tmp_path, split="train")[0].answer == "1234"
    with pytest.raises(DataError, match="validation"):
        load_task("gsm8k", str(tmp_path), split="validation")


# ---------------------------------------------------------------- bad inputs


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_task("gsm8k", str(path))
    msg = str(err.value)
    assert "bad.jsonl" in msg and ":2:" in msg and "\n" not in msg


def test_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "nofield.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    with pytest.warns(UserWarning) as caught:
        assert [e.answer for e in load_task("gsm8k", str(path))] == ["1"]
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 1 of 2 records; rejected 1: 1 x missing field 'answer' (first at {path}:2)"
    ]
    path = _write_jsonl(tmp_path / "rag.jsonl", [{"question": "q", "golden_answers": ["a"]}])
    with pytest.raises(DataError, match="'contexts'"):
        load_task("rag-qa", str(path))


# One good record of each task; each bad case below is written between two of them.
GOOD = {
    "gsm8k": {"question": "q", "answer": "work\n#### 1"},
    "math": {"problem": "p", "solution": r"so $\boxed{1}$"},
    "mmlu": {"question": "q", "choices": ["w", "x", "y", "z"], "answer": 0},
    "rag-qa": {"question": "q", "contexts": ["c"], "golden_answers": ["g"]},
}
GOLD = {"gsm8k": "1", "math": "1", "mmlu": "A", "rag-qa": ["g"]}
MISSING = object()  # a field left out of the bad record
STRINGS = "a non-empty string or a non-empty list of non-empty strings"
ARC = {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}

BAD = [
    ("gsm8k", {"answer": 42}, "field 'answer': expected a non-empty string, got number"),
    ("gsm8k", {"answer": None}, "field 'answer': expected a non-empty string, got null"),
    ("gsm8k", {"question": ""}, "field 'question': expected a non-empty string, got empty string"),
    ("gsm8k", {"question": ["q"]}, "field 'question': expected a non-empty string, got list"),
    ("gsm8k", {"question": MISSING}, "missing field 'question'"),
    ("gsm8k", {"answer": "no marker"}, "field 'answer': expected a final '#### N' line, got none"),
    ("gsm8k", {"answer": "work ####  "}, "field 'answer': expected a number after '####', got nothing"),
    ("math", {"problem": 3}, "field 'problem': expected a non-empty string, got number"),
    ("math", {"solution": 5}, "field 'solution': expected a string, got number"),
    ("math", {"solution": "no box"}, "field 'solution': expected a \\boxed{} answer, got none"),
    ("math", {"solution": "$\\boxed{}$"}, "field 'solution': expected a \\boxed{} answer, got an empty \\boxed{}"),
    ("math", {"answer": 5}, "field 'answer': expected a non-empty string, got number"),  # not coerced to "5"
    ("math", {"answer": ""}, "field 'answer': expected a non-empty string, got empty string"),
    ("math", {"solution": MISSING}, "missing field 'solution' (or 'answer')"),
    ("mmlu", {"choices": "wxyz"}, "field 'choices': expected a list of 2-10 non-empty strings, got string"),
    ("mmlu", {"choices": ["w"]}, "field 'choices': expected a list of 2-10 non-empty strings, got a list of 1"),
    ("mmlu", {"choices": ["w", 2]}, "field 'choices[1]': expected a non-empty string, got number"),
    ("mmlu", {"choices": ["w", " "]}, "field 'choices[1]': expected a non-empty string, got empty string"),
    ("mmlu", {"answer": 4}, "field 'answer': expected an index 0-3 or a letter A-D, got 4"),
    ("mmlu", {"answer": "E"}, "field 'answer': expected an index 0-3 or a letter A-D, got 'E'"),
    ("mmlu", {"answer": "2"}, "field 'answer': expected an index 0-3 or a letter A-D, got '2'"),
    ("mmlu", {"answer": 1.0}, "field 'answer': expected an index 0-3 or a letter A-D, got number"),
    ("mmlu", {"answer": True}, "field 'answer': expected an index 0-3 or a letter A-D, got bool"),
    ("mmlu", {"answer": None}, "field 'answer': expected an index 0-3 or a letter A-D, got null"),
    (
        "mmlu",
        {"choices": {**ARC, "label": ["1", "2", "3"]}, "answerKey": "1"},
        "field 'choices.label': expected one label per option, got 3 for 4",
    ),
    (
        "mmlu",
        {"choices": ARC, "answerKey": "5"},
        "field 'answerKey': expected an index 0-3 or a letter A-D or a label 1/2/3/4, got '5'",
    ),
    ("mmlu", {"choices": {"text": ["w", "x"]}}, "missing field 'choices.label'"),
    ("rag-qa", {"golden_answers": None}, f"field 'golden_answers': expected {STRINGS}, got null"),
    ("rag-qa", {"golden_answers": ""}, f"field 'golden_answers': expected {STRINGS}, got empty string"),
    ("rag-qa", {"golden_answers": {"text": "g"}}, f"field 'golden_answers': expected {STRINGS}, got object"),
    ("rag-qa", {"golden_answers": 5}, f"field 'golden_answers': expected {STRINGS}, got number"),
    ("rag-qa", {"golden_answers": []}, f"field 'golden_answers': expected {STRINGS}, got empty list"),
    ("rag-qa", {"golden_answers": ["g", None]}, "field 'golden_answers[1]': expected a non-empty string, got null"),
    (
        "rag-qa",
        {"golden_answers": ["g", ""]},
        "field 'golden_answers[1]': expected a non-empty string, got empty string",
    ),
    ("rag-qa", {"golden_answers": [{"a": 1}]}, "field 'golden_answers[0]': expected a non-empty string, got object"),
    ("rag-qa", {"golden_answers": [7]}, "field 'golden_answers[0]': expected a non-empty string, got number"),
    ("rag-qa", {"contexts": 5}, "field 'contexts': expected a list of passages or a string, got number"),
    (
        "rag-qa",
        {"contexts": [5]},
        "field 'contexts[0]': expected a non-empty string or an object with 'text', got number",
    ),
    ("rag-qa", {"contexts": ["c", {"title": "t"}]}, "field 'contexts[1].text': expected a non-empty string, got null"),
    ("rag-qa", {"contexts": [{"title": 3, "text": "x"}]}, "field 'contexts[0].title': expected a string, got number"),
    ("rag-qa", {"question": 1}, "field 'question': expected a non-empty string, got number"),
]


@pytest.mark.parametrize("task,fields,reason", BAD)
def test_bad_record_rejected(tmp_path, task, fields, reason):
    bad = {k: v for k, v in {**GOOD[task], **fields}.items() if v is not MISSING}
    path = _write_jsonl(tmp_path / "data.jsonl", [GOOD[task], bad, GOOD[task]])
    with pytest.warns(UserWarning) as caught:
        examples = load_task(task, str(path))
    assert [e.answer for e in examples] == [GOLD[task]] * 2  # the good records around it are kept
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 2 of 3 records; rejected 1: 1 x {reason} (first at {path}:2)"
    ]


def test_null_optional_fields_are_absent(tmp_path):
    """A table fills a missing column with null: MATH's `answer` then falls back to the solution,
    and a context's title is left out."""
    recs = [
        {"problem": "p", "answer": None, "solution": r"$\boxed{3}$"},
        {"problem": "p", "answer": "7", "solution": "no box needed"},
    ]
    assert [e.answer for e in load_task("math", str(_write_jsonl(tmp_path / "m.jsonl", recs)))] == ["3", "7"]
    rag = [{"question": "q", "contexts": [{"title": None, "contents": "text"}], "golden_answers": "g"}]
    assert load_task("rag-qa", str(_write_jsonl(tmp_path / "r.jsonl", rag)))[0].contexts == [
        {"title": "", "text": "text"}
    ]


def test_rejections_grouped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        GOOD["gsm8k"],
        {"question": "q", "answer": 42},
        None,
        ["not", "an object"],
        {"question": "q"},
        None,
        {"question": "q", "answer": 7},
        GOOD["gsm8k"],
        {"question": "q"},
        {"question": "q", "answer": 1},
    ]
    # None stands for a blank line: locations are physical line numbers, blank lines counted.
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    number = "field 'answer': expected a non-empty string, got number"
    with pytest.warns(UserWarning) as caught:
        assert len(load_task("gsm8k", str(path))) == 2
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 2 of 8 records; rejected 6: 3 x {number} (first at {path}:2); "
        f"2 x missing field 'answer' (first at {path}:5); 1 x expected a JSON object, got list (first at {path}:4)"
    ]
    # The same report as an object; with a limit, conversion stops once enough are kept.
    records, source = load_records(str(path))
    assert [r.where for r in records[:3]] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    examples, report = convert_records("gsm8k", records, source, limit=1)
    assert len(examples) == report.kept == report.total == 1 and report.rejected == 0
    assert report.summary() == f"{path}: kept 1 of 1 records"
    _, report = convert_records("gsm8k", records, source)
    assert dict(report.reasons) == {number: 3, "missing field 'answer'": 2, "expected a JSON object, got list": 1}
    assert report.first_at[number] == f"{path}:2" and (report.kept, report.total) == (2, 8)


def test_all_rejected_raises(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": 1}, {"question": "q", "answer": 2}])
    with pytest.raises(DataError) as err:
        load_task("gsm8k", str(path))
    assert str(err.value) == (
        f"{path}: kept 0 of 2 records; rejected 2: 2 x field 'answer': expected a non-empty string, got number "
        f"(first at {path}:1)"
    )


def test_json_list_and_parquet_locations(tmp_path):
    bad = {"question": None, "answer": "#### 2"}
    reason = "field 'question': expected a non-empty string, got null"
    path = tmp_path / "list.json"
    path.write_text(json.dumps([GOOD["gsm8k"], "text", bad]), encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        load_task("gsm8k", str(path))
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 1 of 3 records; rejected 2: 1 x expected a JSON object, got string (first at {path}: record 1); "
        f"1 x {reason} (first at {path}: record 2)"
    ]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD["gsm8k"], bad]), path)
    with pytest.warns(UserWarning) as caught:
        load_task("gsm8k", str(path))
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 1 of 2 records; rejected 1: 1 x {reason} (first at {path}: record 1)"
    ]


def test_utf8_bom_accepted(tmp_path):
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"question": "café?", "answer": "#### 1"}] * 2)
    jsonl, json_list = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    json_list.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD["gsm8k"]]).encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing rejected either
        assert [e.question for e in load_task("gsm8k", str(jsonl))] == ["café?"] * 2
        assert len(load_task("gsm8k", str(json_list))) == 1


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    with pytest.raises(DataError) as err:
        load_task("gsm8k", str(path))
    assert str(err.value) == f"{path}:2: byte 0xe9 is not UTF-8 (save the file as UTF-8)"
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"question": "q", "answer": "#### 1"},\n{"question": "caf\xe9", "answer": "#### 2"}]')
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: byte 0xe9 is not UTF-8")):
        load_task("gsm8k", str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
        load_task("gsm8k", str(path))


def test_missing_path_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_task("gsm8k", str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        load_task("poetry", str(tmp_path))
    assert issubclass(DataError, ValueError)


def test_hub_name_without_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            load_task("gsm8k", "some-org/some-dataset")
    else:
        pytest.skip("datasets is installed; the hub path would try the network")
