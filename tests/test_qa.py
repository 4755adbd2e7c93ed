"""Retrieval-QA tasks: every real form loads, records' own paragraphs are ranked and
reproducible, bad fields are named, and EM / F1 are SQuAD's with empty answers never matching."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import DATA, needs_data

from hrpo.tasks import get_task
from hrpo.tasks.qa import exact_match, f1_score, render
from hrpo.tasks.registry import load_task
from hrpo.tasks.rewards import get_reward_fn

BENCHMARKS = {
    "nq": ("nq", ("train", "test")),
    "triviaqa": ("triviaqa", ("train", "test")),
    "hotpotqa": ("hotpotqa", ("train", "dev")),
    "2wiki": ("2wikimultihopqa", ("train", "dev")),
    "bamboogle": ("bamboogle", ("test", "test")),
}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _load_clean(task, path):
    """Examples of a file that must load with no record rejected (a rejection warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_task(task, str(path))


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_registered(name):
    task = get_task(name)
    config, splits = BENCHMARKS[name]
    assert (task.recipe, task.metric, task.hub, task.splits) == (
        "rag-qa",
        "exact_match",
        f"RUC-NLPIR/FlashRAG_datasets:{config}",
        splits,
    )


# ---------------------------------------------------------------- the real files

REAL = [
    ("nq", "nq/nq_open_dev.jsonl", 3610),
    ("nq", "nq/searchr1_test.jsonl", 3610),
    ("triviaqa", "triviaqa/llm_foundry_triviaqa_sm_sub.jsonl", 3000),
    ("hotpotqa", "hotpotqa/dev_simplified.jsonl", 7405),
    ("hotpotqa", "hotpotqa/ircot_dev_subsampled.jsonl", 500),
    ("hotpotqa", "hotpotqa/dev_distractor_head.jsonl", 53),
    ("2wiki", "2wikimultihopqa/dev_questions_answers.jsonl", 12576),
    ("bamboogle", "bamboogle/test.jsonl", 125),
]


@needs_data
@pytest.mark.parametrize("task,file,n", REAL, ids=[f for _, f, _ in REAL])
def test_real_file_loads_whole(task, file, n):
    examples = _load_clean(task, DATA / file)
    assert len(examples) == n
    assert all(ex.question.strip() and ex.answer and all(a.strip() for a in ex.answer) for ex in examples)


@needs_data
def test_nq_open_and_search_r1_forms_agree():
    """The same 3610 questions in two forms: equal answer lists once a trailing '?' is ignored."""

    def by_question(file):
        return {ex.question.rstrip("?"): sorted(ex.answer) for ex in _load_clean("nq", DATA / "nq" / file)}

    assert by_question("nq_open_dev.jsonl") == by_question("searchr1_test.jsonl")
    first = _load_clean("nq", DATA / "nq" / "searchr1_test.jsonl")[0]
    assert (first.meta, first.question, first.answer) == (
        {"id": "test_0"},
        "who got the first nobel prize in physics?",
        ["Wilhelm Conrad Röntgen"],
    )


@needs_data
def test_triviaqa_llm_foundry():
    examples = _load_clean("triviaqa", DATA / "triviaqa" / "llm_foundry_triviaqa_sm_sub.jsonl")
    dikdik = next(ex for ex in examples if ex.question == "What type of animal is a dik-dik?")
    # The answer, then the aliases it is not already among.
    assert dikdik.answer == ["Antelope", "Botswanan Antelopes", "Antilopina", "Antelopes", "Hybrid antelope"]
    assert dikdik.contexts is None and render(dikdik) == "What type of animal is a dik-dik?"


@needs_data
def test_hotpotqa_distractor_forms_keep_supporting_paragraphs():
    ircot = _load_clean("hotpotqa", DATA / "hotpotqa" / "ircot_dev_subsampled.jsonl")
    assert all(sum(c["supporting"] for c in ex.contexts) == 2 for ex in ircot)
    assert sum(len(ex.contexts) for ex in ircot) == 4931  # every paragraph kept
    assert ircot[0].meta == {"id": "5a8c7595554299585d9e36b6"} and ircot[0].answer == ["Chief of Protocol"]
    official = _load_clean("hotpotqa", DATA / "hotpotqa" / "dev_distractor_head.jsonl")
    first = official[0]  # "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert {c["title"] for c in first.contexts if c["supporting"]} == {"Scott Derrickson", "Ed Wood"}
    derrickson = next(c for c in first.contexts if c["title"] == "Scott Derrickson")
    # Sentences joined by one space (HotpotQA's carry a leading space of their own).
    assert derrickson["text"].startswith(
        "Scott Derrickson (born July 16, 1966) is an American director, "
        "screenwriter and producer. He lives in Los Angeles, California."
    )


@needs_data
def test_own_paragraphs_top3_share_of_supporting():
    """Which 3 of a record's own paragraphs the prompt shows: BM25 over them for the question.
    On IRCoT's 500 HotpotQA questions 77.2% of the supporting paragraphs are in that top 3
    (measured; the file's order puts them anywhere)."""
    examples = _load_clean("hotpotqa", DATA / "hotpotqa" / "ircot_dev_subsampled.jsonl")
    shown = sum(c["supporting"] for ex in examples for c in ex.contexts[:3]) / (2 * len(examples))
    print(f"supporting paragraphs among the 3 shown: {shown:.3f}")
    assert shown >= 0.75
    assert render(examples[0]).count("::::") == 3


@needs_data
def test_unscorable_golden_answers_kept_and_never_matched():
    """Four real questions have only golden answers that normalise to nothing (NQ's '---' and
    ')', HotpotQA's bands 'The The' and '!!!'). They are kept, so counts match the published
    sets, and score 0 whatever the answer, the gold itself included."""
    cases = {
        ("nq", "nq/nq_open_dev.jsonl"): [["---"], [")"]],
        ("hotpotqa", "hotpotqa/dev_simplified.jsonl"): [["The The"], ["!!!"]],
    }
    for (task, file), golds in cases.items():
        answers = [ex.answer for ex in _load_clean(task, DATA / file)]
        for gold in golds:
            assert gold in answers
            assert exact_match(gold[0], gold) == f1_score(gold[0], gold) == 0.0


# ---------------------------------------------------------------- hub and other forms


def test_hub_forms(tmp_path):
    paragraphs = {"title": ["A", "B"], "sentences": [["Alpha is here.", " More."], ["Bravo is the answer."]]}
    recs = {
        "nq": {"question": "q1", "answer": ["a", "b"]},  # google-research-datasets/nq_open
        "triviaqa": {
            "question": "q2",
            "question_id": "tc_1",  # mandarjoshi90/trivia_qa rc.nocontext
            "answer": {
                "aliases": ["Onion", "Onions"],
                "normalized_aliases": ["onion", "onions"],
                "value": "Onion",
                "type": "WikipediaEntity",
            },
        },
        "hotpotqa": {
            "id": "h1",
            "question": "Which is Bravo?",
            "answer": "B",
            "type": "bridge",
            "level": "hard",
            "supporting_facts": {"title": ["B"], "sent_id": [0]},
            "context": paragraphs,
        },
        "2wiki": {
            "_id": "w1",
            "question": "Which is Bravo?",
            "answer": "B",
            "supporting_facts": {"title": ["B"], "sent_id": [0]},
            "context": {"title": paragraphs["title"], "content": paragraphs["sentences"]},
        },
        "bamboogle": {"Question": "q5", "Answer": "a5"},  # chiayewken/bamboogle
        "rag-qa": {
            "id": "test_1",
            "question": "q6",
            "golden_answers": ["g"],
            "metadata": {},
            "contexts": [{"id": "7", "contents": '"Some Title"\nSome text.'}],
        },  # FlashRAG's retrieval result
    }
    ex = {task: load_task(task, str(_write_jsonl(tmp_path / f"{task}.jsonl", [rec])))[0] for task, rec in recs.items()}
    assert ex["nq"].answer == ["a", "b"] and ex["nq"].contexts is None
    assert (ex["triviaqa"].question, ex["triviaqa"].answer, ex["triviaqa"].meta) == (
        "q2",
        ["Onion", "Onions"],
        {"id": "tc_1"},
    )
    for task in ("hotpotqa", "2wiki"):
        assert ex[task].contexts == [
            {"title": "B", "text": "Bravo is the answer.", "supporting": True},
            {"title": "A", "text": "Alpha is here. More.", "supporting": False},
        ]
    assert (ex["bamboogle"].question, ex["bamboogle"].answer) == ("q5", ["a5"])
    assert ex["rag-qa"].contexts == [{"title": "Some Title", "text": "Some text."}]
    assert (
        render(ex["rag-qa"]) == "Context (which may or may not be relevant):\nSome Title::::Some text.\n\nQuestion: q6"
    )


def test_own_paragraphs_ranked_reproducibly(tmp_path):
    """A distractor set is ranked by BM25 for the question, ties in file order; passages in our
    form are taken as already ranked."""
    context = [
        ["Zeta", ["Nothing relevant."]],
        ["Eta", ["Also nothing."]],
        ["Paris", ["Paris is the capital of France."]],
        ["Theta", ["Still nothing."]],
    ]
    rec = {"_id": "x", "question": "What is the capital of France?", "answer": "Paris", "context": context}
    path = _write_jsonl(tmp_path / "d.jsonl", [rec, rec])
    first, again = load_task("2wiki", str(path))
    assert [c["title"] for c in first.contexts] == ["Paris", "Zeta", "Eta", "Theta"]
    assert first.contexts == again.contexts and "supporting" not in first.contexts[0]
    assert render(first) == (
        "Context (which may or may not be relevant):\nParis::::Paris is the capital of France.\n"
        "Zeta::::Nothing relevant.\nEta::::Also nothing.\n\nQuestion: What is the capital of France?"
    )
    ours = {
        "question": rec["question"],
        "golden_answers": ["Paris"],
        "contexts": [{"title": t, "text": " ".join(s)} for t, s in context],
    }
    kept = load_task("2wiki", str(_write_jsonl(tmp_path / "ours.jsonl", [ours])))[0]
    assert [c["title"] for c in kept.contexts] == ["Zeta", "Eta", "Paris", "Theta"]


GOOD = {"question": "q", "answer": "a"}
IRCOT = {
    "question_text": "q",
    "answers_objects": [{"spans": ["a"]}],
    "contexts": [{"title": "t", "paragraph_text": "p", "is_supporting": True}],
}
OFFICIAL = {"question": "q", "answer": "a", "context": [["t", ["s."]]], "supporting_facts": [["t", 0]]}
FOUNDRY = {"context": "Question: q?\nAnswer:", "answer": "a", "aliases": ["a", "b"]}
BAMBOOGLE = {"Question": "q", "Answer": "a"}
MISSING = object()  # a field left out of the bad record

BAD = [
    (GOOD, {"question": None}, "field 'question': expected a non-empty string, got null"),
    (GOOD, {"question": MISSING}, "missing field 'question'"),
    (GOOD, {"answer": MISSING}, "missing field 'golden_answers' (or 'answer')"),
    (GOOD, {"answer": ["a", ""]}, "field 'answer[1]': expected a non-empty string, got empty string"),
    (GOOD, {"answer": {"value": "a"}}, "missing field 'answer.aliases'"),
    (
        GOOD,
        {"answer": {"aliases": []}},
        "field 'answer.aliases': expected a non-empty string or a non-empty list of non-empty strings, got empty list",
    ),
    (
        BAMBOOGLE,
        {"Answer": 3},
        "field 'Answer': expected a non-empty string or a non-empty list of non-empty strings, got number",
    ),
    (FOUNDRY, {"context": "What is q?"}, "field 'context': expected 'Question: ...\\nAnswer:', got 'What is q?'"),
    (FOUNDRY, {"aliases": [None]}, "field 'aliases[0]': expected a non-empty string, got null"),
    (IRCOT, {"answers_objects": []}, "field 'answers_objects': expected a non-empty list, got empty list"),
    (IRCOT, {"answers_objects": ["a"]}, "field 'answers_objects[0]': expected an object, got string"),
    (
        IRCOT,
        {"answers_objects": [{"spans": []}]},
        "field 'answers_objects[0].spans': expected a non-empty string or a non-empty list of non-empty strings, "
        "got empty list",
    ),
    (
        IRCOT,
        {"contexts": [{"title": "t", "paragraph_text": " "}]},
        "field 'contexts[0].paragraph_text': expected a non-empty string, got empty string",
    ),
    (
        IRCOT,
        {"contexts": [{"title": "t", "paragraph_text": "p", "is_supporting": "yes"}]},
        "field 'contexts[0].is_supporting': expected true or false, got string",
    ),
    (OFFICIAL, {"context": "passage"}, "field 'context': expected a list of [title, sentences] pairs, got string"),
    (OFFICIAL, {"context": [["t"]]}, "field 'context[0]': expected a [title, sentences] pair, got list"),
    (OFFICIAL, {"context": [["", ["s."]]]}, "field 'context[0][0]': expected a non-empty string, got empty string"),
    (OFFICIAL, {"context": [["t", "s."]]}, "field 'context[0][1]': expected a list of strings, got string"),
    (OFFICIAL, {"context": [["t", [" "]]]}, "field 'context[0][1]': expected sentences with text, got list"),
    (
        OFFICIAL,
        {"context": {"title": ["t"], "sentences": []}},
        "field 'context.title': expected one title per paragraph, got 1 for 0",
    ),
    (OFFICIAL, {"context": {"sentences": [["s."]]}}, "missing field 'context.title'"),
    (
        OFFICIAL,
        {"supporting_facts": [["t"]]},
        "field 'supporting_facts[0]': expected a [title, sentence] pair, got list",
    ),
    (
        OFFICIAL,
        {"supporting_facts": {"title": [7]}},
        "field 'supporting_facts.title[0]': expected a non-empty string, got number",
    ),
    (
        {"golden_answers": ["a"], "question": "q"},
        {"contexts": [{"contents": '"Title"\n '}]},
        "field 'contexts[0].contents': expected text after the title line, got empty string",
    ),
    (GOOD, {"id": 1.5}, "field 'id': expected a non-empty string or an integer, got number"),
]


@pytest.mark.parametrize("good,fields,reason", BAD)
def test_bad_record_rejected(tmp_path, good, fields, reason):
    bad = {k: v for k, v in {**good, **fields}.items() if v is not MISSING}
    path = _write_jsonl(tmp_path / "data.jsonl", [good, bad])
    with pytest.warns(UserWarning) as caught:
        assert len(load_task("hotpotqa", str(path))) == 1
    assert [str(w.message) for w in caught] == [
        f"{path}: kept 1 of 2 records; rejected 1: 1 x {reason} (first at {path}:2)"
    ]


def test_null_optional_fields_are_absent(tmp_path):
    """As a table writes a column some records lack: null contexts, flags, ids and facts are absent."""
    recs = [
        {"question": "q", "answer": "a", "contexts": None, "id": None, "aliases": None, "context": None},
        {"question": "q", "golden_answers": ["a"], "contexts": [{"text": "p", "supporting": None}]},
        {**OFFICIAL, "supporting_facts": None},
    ]
    examples = load_task("hotpotqa", str(_write_jsonl(tmp_path / "n.jsonl", recs)))
    assert [(ex.contexts, ex.meta) for ex in examples] == [
        (None, {}),
        ([{"title": "", "text": "p"}], {}),
        ([{"title": "t", "text": "s."}], {}),
    ]


def test_rag_qa_needs_passages(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "contexts": []}, GOOD, FOUNDRY])
    with pytest.warns(UserWarning, match="2 x missing field 'contexts'"):
        assert load_task("rag-qa", str(path))[0].contexts == []


# ---------------------------------------------------------------- EM and F1


def test_exact_match_and_f1_by_hand():
    golds = ["The Eiffel Tower", "Tour Eiffel"]
    assert exact_match("eiffel tower!", golds) == 1.0 and f1_score("eiffel tower!", golds) == 1.0
    # "the tower in paris" -> [tower, in, paris] vs [eiffel, tower]: 1 common, P 1/3, R 1/2, F1 0.4;
    # vs [tour, eiffel]: none.
    assert exact_match("the tower in Paris", golds) == 0.0
    assert f1_score("the tower in Paris", golds) == pytest.approx(0.4)
    # Repeated tokens count once per occurrence in the gold: [paris, paris] vs [paris]: P 1/2, R 1, F1 2/3.
    assert f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)
    # The best alias wins: [eiffel] vs [tour, eiffel] -> P 1, R 1/2, F1 2/3; vs [eiffel, tower] the same.
    assert f1_score("Eiffel", golds) == pytest.approx(2 / 3)


def test_empty_answers_never_match():
    for pred, gold in [(".", "The The"), ("", "a"), ("the", ["An", "!"]), ("Paris", ["The", "!!!"])]:
        assert exact_match(pred, gold) == f1_score(pred, gold) == 0.0
    for name in sorted(BENCHMARKS):
        assert get_reward_fn(name)(
            ["#### .", "#### The The", "#### the an", "#### paris."], ["The The", "The The", ["A"], ["The", "Paris"]]
        ) == [0.0, 0.0, 0.0, 1.0]
