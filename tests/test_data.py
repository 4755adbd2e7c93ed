"""Loader tests on the real data in ../shared/data and on small records written to tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, needs_data

from hrpo.data import DataError, last_boxed, load_task
from hrpo.prompts import Example



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
    with pytest.warns(UserWarning, match="skipped 2"):  # two train items have an empty \boxed{}
        train = load_task("math", str(DATA / "math"), "train")
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
    assert e.answer == "C"
    assert "\nA. maintain" in e.question and "\nD. increase the mortality rate" in e.question


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
    assert ex[1].question == "Q2?\nA. w\nB. x\nC. y\nD. z"


def test_rag_qa(tmp_path):
    recs = [
        {"question": "Who wrote Hamlet?", "contexts": [{"title": "Hamlet", "text": "A play by Shakespeare."}, "Plain passage."],
         "golden_answers": ["William Shakespeare", "Shakespeare"]},
        {"question": "Capital of France?", "contexts": ["Paris is the capital."], "golden_answers": "Paris"},
    ]
    path = tmp_path / "nq.json"  # a .json list of records
    path.write_text(json.dumps(recs), encoding="utf-8")
    ex = load_task("rag-qa", str(path))
    assert ex[0].answer == ["William Shakespeare", "Shakespeare"] and ex[1].answer == ["Paris"]
    q = ex[0].question
    assert q.index("[1] (Hamlet) A play") < q.index("[2] Plain passage.") < q.index("Who wrote Hamlet?")


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
    with pytest.raises(DataError, match=r"nofield\.jsonl: record 1: missing field 'answer'"):
        load_task("gsm8k", str(path))
    path = _write_jsonl(tmp_path / "rag.jsonl", [{"question": "q", "golden_answers": ["a"]}])
    with pytest.raises(DataError, match="'contexts'"):
        load_task("rag-qa", str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
        load_task("gsm8k", str(path))


def test_missing_path_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_task("gsm8k", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown task"):
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
