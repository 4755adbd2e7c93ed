"""Retrieval: BM25 over the real passages (HotpotQA's paragraphs, the wiki-18 sample, the 2Wiki
corpus), the index cache (keyed by the corpus, no pickle), attach_contexts, the CLI, and the
dense option's mechanics on a tiny random encoder."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import DATA, needs_data
from transformers import BertConfig, BertModel, BertTokenizerFast

from hrpo.core.prompts import Example
from hrpo.retrieve import main
from hrpo.tasks import retrieval
from hrpo.tasks.records import DataError
from hrpo.tasks.registry import load_task
from hrpo.tasks.retrieval import BM25Index, attach_contexts, open_index, rank, read_corpus

WIKI18 = DATA / "wiki_corpus" / "flashrag_wiki18_sample.jsonl"
WIKI2 = DATA / "wiki_corpus" / "hipporag_2wiki_dev_corpus.jsonl"
PASSAGES = [
    {"id": "0", "contents": '"Paris"\nParis is the capital and largest city of France.'},
    {"id": "1", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
    {"id": "2", "contents": '"Lyon"\nLyon is a city in France on the Rhone.'},
    {"id": "3", "contents": '"Danube"\nThe Danube flows through Vienna and Budapest.'},
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(BM25Index, "build", refuse)


# ---------------------------------------------------------------- the real passages


@needs_data
def test_hotpotqa_recall_at_3():
    """IRCoT's 500 HotpotQA questions against all their paragraphs pooled (4858 once duplicates
    are merged): recall@3 of the supporting paragraphs is 0.681 (measured; 0.660 without
    stemming), both found for 43.6% of questions."""
    start = time.perf_counter()
    examples = load_task("hotpotqa", str(DATA / "hotpotqa" / "ircot_dev_subsampled.jsonl"))
    pool = {}
    for ex in examples:
        for c in ex.contexts:
            pool.setdefault((c["title"], c["text"]), {"title": c["title"], "text": c["text"]})
    index = BM25Index.build(list(pool.values()), progress=False)
    found = index.search([ex.question for ex in examples], 3)
    hits = [
        sum((d["title"], d["text"]) in {(c["title"], c["text"]) for c in ex.contexts if c["supporting"]} for d in docs)
        for ex, docs in zip(examples, found)
    ]
    recall, both = sum(hits) / (2 * len(examples)), sum(h == 2 for h in hits) / len(examples)
    print(
        f"{len(pool)} paragraphs; recall@3 {recall:.3f}, both supporting in top 3 {both:.3f}; "
        f"{time.perf_counter() - start:.1f}s"
    )
    assert len(pool) == 4858 and all(len(docs) == 3 for docs in found)
    assert recall >= 0.65 and both >= 0.4


@needs_data
def test_wiki18_sample(tmp_path):
    passages = read_corpus(WIKI18)
    assert len(passages) == 1000
    assert passages[0]["title"] == "Evan Morris" and passages[0]["text"].startswith("Evan Morris Evan L. Morris")
    index = open_index(WIKI18, cache_dir=tmp_path, progress=False)  # the shared data stays untouched
    top = index.search(["Who designed the dome of Pavia Cathedral?"], 3)[0]
    assert top[0]["title"] == "Pavia Cathedral" and "Carlo Maciachini" in top[0]["text"]
    assert (tmp_path / f"{WIKI18.name}.bm25" / "key.json").is_file()


@needs_data
def test_2wiki_corpus(tmp_path):
    index = open_index(WIKI2, cache_dir=tmp_path, progress=False)
    assert len(index.passages) == 6119
    # HippoRAG's first 2Wiki question; its supporting paragraphs are Lothair II and Ermengarde of Tours.
    titles = [d["title"] for d in index.search(["When did Lothair Ii's mother die?"], 3)[0]]
    assert titles[0] == "Lothair II", titles


# ---------------------------------------------------------------- index and cache


def test_cache_keyed_by_corpus_and_free_of_pickle(tmp_path, monkeypatch):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    index = open_index(corpus, progress=False)
    assert [d["title"] for d in index.search(["capital of Germany"], 2)[0]] == ["Berlin", "Paris"]
    cache = tmp_path / "corpus.jsonl.bm25"
    files = sorted(f.name for f in cache.iterdir())
    assert all(f.endswith((".npy", ".json")) for f in files) and "key.json" in files
    for f in cache.glob("*.npy"):
        np.load(f, allow_pickle=False)  # plain arrays: loading runs nothing
    key = json.loads((cache / "key.json").read_text())
    assert key["corpus_sha256"] == retrieval.file_digest(corpus) and key["method"] == "bm25"

    with monkeypatch.context() as m:  # the second open loads the cache
        _no_build(m)
        again = open_index(corpus, progress=False)
        assert again.search(["capital of Germany"], 2) == index.search(["capital of Germany"], 2)

    _write_jsonl(corpus, PASSAGES + [{"id": "4", "contents": '"Bonn"\nBonn was the capital of West Germany.'}])
    changed = open_index(corpus, progress=False)  # a changed corpus rebuilds
    assert len(changed.passages) == 5 and changed.search(["capital of West Germany"], 1)[0][0]["title"] == "Bonn"

    (cache / "data.csc.index.npy").write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="cached index unreadable"):
        assert len(open_index(corpus, progress=False).passages) == 5


def test_cache_never_replaces_other_folders_and_survives_unwritable_places(tmp_path):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    foreign = tmp_path / "corpus.jsonl.bm25"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.warns(UserWarning, match="is not an hrpo index"):
        open_index(corpus, progress=False)
    assert [f.name for f in foreign.iterdir()] == ["mine.txt"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="the index is not cached"):
        index = open_index(corpus, cache_dir=blocker, progress=False)
    assert index.search(["Vienna"], 1)[0][0]["title"] == "Danube"


def test_corpus_forms_and_errors(tmp_path):
    plain = _write_jsonl(
        tmp_path / "plain.jsonl", [{"title": "Teutberga", "text": "A queen."}, {"id": 1, "contents": "no title"}]
    )
    assert read_corpus(plain) == [{"title": "Teutberga", "text": "A queen."}, {"title": "", "text": "no title"}]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"title": "t", "text": "x"}, {"title": "t"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text': expected a non-empty string, got null"):
        open_index(bad, progress=False)
    with pytest.raises(DataError, match="no such corpus file"):
        open_index(tmp_path / "missing.jsonl")
    stop_words = _write_jsonl(tmp_path / "stop.jsonl", [{"text": "the a an"}])
    with pytest.raises(DataError, match="no passage has a word to index"):
        open_index(stop_words, progress=False)


def test_rank_is_stable():
    docs = [{"title": "", "text": t} for t in ["nothing here", "also nothing", "France capital Paris", "nothing again"]]
    assert [d["text"] for d in rank("capital of France", docs)] == [
        "France capital Paris",
        "nothing here",
        "also nothing",
        "nothing again",
    ]
    assert rank("q", []) == [] and rank("q", [{"title": "", "text": "a"}]) == [{"title": "", "text": "a"}]


def test_attach_contexts(tmp_path, monkeypatch):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    own = [{"title": "Mine", "text": "my passage"}]
    examples = [
        Example("What is the capital of Germany?", ["Berlin"]),
        Example("q", ["a"], contexts=own),
        Example("Where does the Danube flow?", ["Vienna"], contexts=[]),
    ]
    out = attach_contexts(examples, corpus, k=2, progress=False)
    assert out is not examples and out[1] is examples[1]
    assert [d["title"] for d in out[0].contexts] == ["Berlin", "Paris"] and out[2].contexts[0]["title"] == "Danube"
    assert examples[0].contexts is None and examples[2].contexts == []  # inputs unchanged
    with monkeypatch.context() as m:  # nothing missing: no index is opened, not even the corpus
        m.setattr(retrieval, "open_index", None)
        assert attach_contexts(out, tmp_path / "missing.jsonl") == out


# ---------------------------------------------------------------- the CLI


def test_cli_writes_prepared_records(tmp_path, capsys):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    data = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"id": "test_0", "question": "What is the capital of Germany?", "golden_answers": ["Berlin"]},
            {
                "question": "Which city is the capital of France?",
                "answer": "Paris",
                "context": [["Rome", ["Rome is in Italy."]], ["Paris", ["Paris is the capital of France."]]],
                "supporting_facts": [["Paris", 0]],
            },
        ],
    )
    out = tmp_path / "prepared.jsonl"
    args = ["--corpus", str(corpus), "--task", "nq", "--input", str(data), "--output", str(out), "--k", "2"]
    assert main(args) == 0
    assert "2 questions, passages retrieved for 1 from" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0] == {
        "id": "test_0",
        "question": "What is the capital of Germany?",
        "golden_answers": ["Berlin"],
        "contexts": [
            {"title": "Berlin", "text": "Berlin is the capital of Germany."},
            {"title": "Paris", "text": "Paris is the capital and largest city of France."},
        ],
    }
    # A record's own paragraphs are kept (ranked, with their supporting flags), not retrieved.
    assert records[1]["contexts"] == [
        {"title": "Paris", "text": "Paris is the capital of France.", "supporting": True},
        {"title": "Rome", "text": "Rome is in Italy.", "supporting": False},
    ]
    again = load_task("rag-qa", str(out))  # the prepared file reads back as it was written
    assert [ex.contexts for ex in again] == [r["contexts"] for r in records]

    assert main(args) == 2  # never overwritten silently
    err = capsys.readouterr().err
    assert err == f"error: {out} exists; pass --overwrite to replace it\n"
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--task": "gsm8k"}, "--task gsm8k is not a retrieval-QA task"),
        ({"--task": "poetry"}, "unknown task 'poetry'"),
        ({"--k": "0"}, "--k must be at least 1, got 0"),
        ({"--method": "dense"}, "--method dense needs --encoder"),
        ({"--corpus": "missing.jsonl"}, "missing.jsonl: no such corpus file"),
        ({"--input": "nothing.jsonl"}, "nothing.jsonl: no such file"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "corpus.jsonl", PASSAGES)
    _write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    args = {"--corpus": "corpus.jsonl", "--task": "nq", "--input": "q.jsonl", "--output": "out.jsonl", **change}
    assert main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- dense


def _tiny_encoder(path, texts):
    """A random 2-layer BERT and a word-level vocabulary of the texts, saved as a model folder."""
    words = sorted({w for t in texts for w in t.split()} | {"query", "passage", ":"})
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_dense_mechanics(tmp_path, monkeypatch):
    texts = [
        "alpha bravo charlie delta echo foxtrot golf hotel india juliet",
        "kilo lima mike november oscar papa quebec romeo sierra tango",
        "uniform victor whiskey xray yankee zulu one two three four",
        "five six seven eight nine ten eleven twelve thirteen fourteen",
    ]
    encoder = _tiny_encoder(tmp_path / "encoder", texts)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"title": "", "text": t} for t in texts])
    index = open_index(corpus, method="dense", encoder=encoder, progress=False)
    assert index.embeddings.shape == (4, 32)
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(4))
    found = index.search(texts, 2)
    assert [len(docs) for docs in found] == [2] * 4
    assert [docs[0]["text"] for docs in found] == texts  # a passage equal to the query ranks first

    cache = tmp_path / "corpus.jsonl.dense"
    assert sorted(f.name for f in cache.iterdir()) == ["embeddings.safetensors", "key.json"]
    with monkeypatch.context() as m:  # cached: the passages are not encoded again
        m.setattr(retrieval.DenseIndex, "build", None)
        assert torch.equal(
            open_index(corpus, method="dense", encoder=encoder, progress=False).embeddings, index.embeddings
        )
    key = json.loads((cache / "key.json").read_text())
    other = _tiny_encoder(tmp_path / "other", texts + ["extra"])
    rebuilt = open_index(corpus, method="dense", encoder=other, progress=False)  # another encoder: rebuilt
    assert json.loads((cache / "key.json").read_text())["encoder"] != key["encoder"]
    assert not torch.equal(rebuilt.embeddings, index.embeddings)
