"""Retrieval-augmented QA: NQ, TriviaQA, HotpotQA, 2WikiMultihopQA and Bamboogle, and rag-qa
(records that bring their own passages).

Asked as the paper asks it: the top 3 passages under `Context (which may or may not be
relevant):`, each as `title::::text` on its own line, a blank line, then `Question: ...`.
The answer is the first line after the marker, scored by SQuAD-style normalised exact match
against any golden answer (F1 is reported beside it); an answer or golden answer that
normalises to nothing matches nothing.

One converter reads every form, recognised by its fields:
- ours, FlashRAG's and Search-R1's: question, golden_answers, optional contexts;
- NQ-open: question, answer (a list); HotpotQA simplified, 2Wiki, Bamboogle: question, answer
  (Bamboogle's hub copy: Question, Answer);
- TriviaQA: llm-foundry's context ("Question: ...\\nAnswer:"), answer, aliases; the hub's
  rc.nocontext: question, answer {aliases, ...};
- HotpotQA / 2Wiki distractor: question, answer, context [[title, [sentences]]] and
  supporting_facts [[title, n]] (official JSON), or context {title, sentences | content} and
  supporting_facts {title, sent_id} (the hub's); IRCoT's question_text, answers_objects,
  contexts [{title, paragraph_text, is_supporting}].

Passages: `contexts` in our form are taken as retrieved, best first. A record's own
paragraph set (the distractor setting: official `context`, IRCoT's `contexts`) comes in no
meaningful order, so it is ranked by BM25 against the question over those paragraphs alone
(ties keep file order; see hrpo.tasks.retrieval.rank) and the prompt shows the top 3; each keeps
`supporting` when the record marks it, for recall. Records without passages get them from a
corpus (hrpo.tasks.retrieval.attach_contexts, `--corpus`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from hrpo.core.prompts import Example
from hrpo.tasks.records import Rejected, expected, get_field, given, is_text, text_field
from hrpo.tasks.retrieval import TOP_K, passage, rank

from .base import Official, Task, first_line, official_text, register, unwrap

FLASHRAG = "RUC-NLPIR/FlashRAG_datasets"  # the test sets FlashRAG and Search-R1 (so HRPO) evaluate on


def golden_answers(value: Any, name: str) -> list[str]:
    if is_text(value):
        return [value]
    if isinstance(value, list) and value:
        for j, alias in enumerate(value):
            if not is_text(alias):  # an empty alias would match an empty prediction
                raise expected(f"{name}[{j}]", "a non-empty string", alias)
        return list(value)
    raise expected(name, "a non-empty string or a non-empty list of non-empty strings", value)


_FOUNDRY = re.compile(r"\s*Question:\s*(.*?)\s*\n\s*Answer:\s*", re.S)


QUESTION_KEYS = ("question", "question_text", "Question")  # ours and most; IRCoT; Bamboogle on the hub


def _question(rec: dict) -> str:
    for key in QUESTION_KEYS:
        if key in rec:
            return text_field(rec, key)
    if isinstance(rec.get("context"), str):  # llm-foundry's TriviaQA asks inside `context`
        m = _FOUNDRY.fullmatch(rec["context"])
        if not m or not m.group(1):
            raise Rejected(f"field 'context': expected 'Question: ...\\nAnswer:', got {rec['context']!r:.40}")
        return m.group(1)
    raise Rejected("missing field 'question'")


def _golden(rec: dict) -> list[str]:
    if "golden_answers" in rec:
        return golden_answers(rec["golden_answers"], "golden_answers")
    if "answers_objects" in rec:  # IRCoT: [{"spans": [...], "number": ..., "date": ...}]
        objects = rec["answers_objects"]
        if not isinstance(objects, list) or not objects:
            raise expected("answers_objects", "a non-empty list", objects)
        if not isinstance(objects[0], dict):
            raise expected("answers_objects[0]", "an object", objects[0])
        spans = get_field(objects[0], "spans", "answers_objects[0].spans")
        return golden_answers(spans, "answers_objects[0].spans")
    if "answer" in rec:
        answer = rec["answer"]
        if isinstance(answer, dict):  # TriviaQA on the hub: answer {aliases, normalized_aliases, value, ...}
            return golden_answers(get_field(answer, "aliases", "answer.aliases"), "answer.aliases")
        golds = golden_answers(answer, "answer")
        if given(rec, "aliases"):  # llm-foundry's TriviaQA: the answer and its aliases
            golds += [a for a in golden_answers(rec["aliases"], "aliases") if a not in golds]
        return golds
    if "Answer" in rec:
        return golden_answers(rec["Answer"], "Answer")
    raise Rejected("missing field 'golden_answers' (or 'answer')")


def _pairs(context: Any) -> list[tuple[Any, Any, str, str]]:
    """(title, sentences, and the names to cite for each) of a distractor `context`."""
    if isinstance(context, dict):  # the hub's: {"title": [...], "sentences" (2Wiki: "content"): [[...]]}
        key = "sentences" if "sentences" in context else "content"
        titles = get_field(context, "title", "context.title")
        bodies = get_field(context, key, f"context.{key}")
        for name, value in (("context.title", titles), (f"context.{key}", bodies)):
            if not isinstance(value, list):
                raise expected(name, "a list", value)
        if len(titles) != len(bodies):
            raise Rejected(
                f"field 'context.title': expected one title per paragraph, got {len(titles)} for {len(bodies)}"
            )
        return [(t, b, f"context.title[{j}]", f"context.{key}[{j}]") for j, (t, b) in enumerate(zip(titles, bodies))]
    if not isinstance(context, list):
        raise expected("context", "a list of [title, sentences] pairs", context)
    pairs = []
    for j, item in enumerate(context):  # the official JSON: [[title, [sentences]], ...]
        if not isinstance(item, list) or len(item) != 2:
            raise expected(f"context[{j}]", "a [title, sentences] pair", item)
        pairs.append((item[0], item[1], f"context[{j}][0]", f"context[{j}][1]"))
    return pairs


def _supporting_titles(facts: Any) -> set[str]:
    """Titles named by supporting_facts: [[title, sentence], ...] or the hub's {"title": [...], "sent_id": [...]}."""
    if isinstance(facts, dict):
        titles = get_field(facts, "title", "supporting_facts.title")
        if not isinstance(titles, list):
            raise expected("supporting_facts.title", "a list", titles)
        named = [(f"supporting_facts.title[{j}]", title) for j, title in enumerate(titles)]
    elif isinstance(facts, list):
        named = []
        for j, fact in enumerate(facts):
            if not isinstance(fact, list) or len(fact) != 2:
                raise expected(f"supporting_facts[{j}]", "a [title, sentence] pair", fact)
            named.append((f"supporting_facts[{j}][0]", fact[0]))
    else:
        raise expected("supporting_facts", "a list of [title, sentence] pairs", facts)
    for name, title in named:
        if not is_text(title):
            raise expected(name, "a non-empty string", title)
    return {title for _, title in named}


def _distractor(rec: dict) -> list[dict]:
    """The paragraphs of a HotpotQA / 2Wiki `context`, sentences joined by a space, in file order."""
    support = _supporting_titles(rec["supporting_facts"]) if given(rec, "supporting_facts") else None
    docs = []
    for title, sentences, title_name, body_name in _pairs(rec["context"]):
        if not is_text(title):
            raise expected(title_name, "a non-empty string", title)
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise expected(body_name, "a list of strings", sentences)
        text = " ".join(s.strip() for s in sentences if s.strip())  # HotpotQA's sentences carry their leading space
        if not text:
            raise expected(body_name, "sentences with text", sentences)
        doc = {"title": title, "text": text}
        if support is not None:
            doc["supporting"] = title in support
        docs.append(doc)
    return docs


def _contexts(rec: dict, question: str) -> list[dict] | None:
    """The record's passages, best first; None when it has none of its own."""
    if given(rec, "contexts"):
        contexts = rec["contexts"]
        if isinstance(contexts, list):
            docs = [passage(ctx, f"contexts[{j}]") for j, ctx in enumerate(contexts)]
        elif isinstance(contexts, (str, dict)):  # a single passage
            docs = [passage(contexts, "contexts")]
        else:
            raise expected("contexts", "a list of passages or a string", contexts)
        return rank(question, docs) if "question_text" in rec else docs  # IRCoT's are a distractor set
    if not given(rec, "context"):
        return None
    if not isinstance(rec["context"], str):
        return rank(question, _distractor(rec))
    if any(key in rec for key in QUESTION_KEYS):  # one passage string (SQuAD's form) is none of ours
        raise expected("context", "a list of [title, sentences] pairs", rec["context"])
    return None  # llm-foundry's TriviaQA: `context` held the question


def _record_id(rec: dict) -> dict:
    for key in ("id", "_id", "question_id", "idx"):
        if given(rec, key):
            value = rec[key]
            if not (is_text(value) or isinstance(value, int) and not isinstance(value, bool)):
                raise expected(key, "a non-empty string or an integer", value)
            return {"id": value}
    return {}


def convert(rec: dict) -> Example:
    """Any form above; contexts is None for a record with no passages of its own."""
    question = _question(rec)
    golden = _golden(rec)
    return Example(question=question, answer=golden, contexts=_contexts(rec, question), meta=_record_id(rec))


def convert_with_contexts(rec: dict) -> Example:
    """rag-qa: a record must bring its passages (an empty list is allowed: none shown)."""
    ex = convert(rec)
    if ex.contexts is None:
        raise Rejected("missing field 'contexts'")
    return ex


def render(ex: Example) -> str:
    if not ex.contexts:
        return ex.question
    lines = "".join(f"{c['title']}::::{c['text']}\n" if c["title"] else f"{c['text']}\n" for c in ex.contexts[:TOP_K])
    return f"Context (which may or may not be relevant):\n{lines}\nQuestion: {ex.question}"


_PUNCT = frozenset(string.punctuation)


def normalize_qa(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def read_span(after: str) -> str | None:
    line = unwrap(first_line(after))
    return line or None


def _aliases(gold) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(pred: str, gold) -> float:
    pred = normalize_qa(pred)
    # An answer that normalises to nothing ("The", ".") matches nothing, not every empty alias.
    return float(bool(pred) and any(pred == normalize_qa(a) for a in _aliases(gold)))


def f1_score(pred: str, gold) -> float:
    """SQuAD token F1, the best over the golden answers; 0 when either side normalises to nothing."""
    tokens = normalize_qa(pred).split()
    best = 0.0
    for alias in _aliases(gold):
        gold_tokens = normalize_qa(alias).split()
        same = sum((Counter(tokens) & Counter(gold_tokens)).values())
        if same:
            precision, recall = same / len(tokens), same / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def f1_details(pred: str, gold) -> dict:
    """The per-sample F1 the evaluation reports beside exact match."""
    return {"f1": f1_score(pred, gold)}


# eval_rag.py:127-131: the WHOLE text after the last marker (every line of it; the whole
# completion when it has no marker), normalised by process_qa_answer (utils.py:313-327, the
# SQuAD normalisation that normalize_qa is), must equal one normalised golden answer:
# "Paris\nIt is the capital" scores 0; an empty answer matches an alias that normalises to
# nothing ("The").
OFFICIAL = Official(
    answer=lambda completion: normalize_qa(official_text(completion)),
    golds=lambda gold: [normalize_qa(a) for a in _aliases(gold)],
)


def _qa_task(name: str, convert: Callable[[dict], Example], **dataset) -> Task:
    """The QA tasks differ only in name, conversion and dataset (`hub`, `splits`)."""
    return Task(
        name,
        recipe="rag-qa",
        convert=convert,
        render=render,
        read=read_span,
        score=exact_match,
        official=OFFICIAL,
        metric="exact_match",
        details=f1_details,
        **dataset,
    )


def _benchmark(name: str, config: str, splits: tuple[str, str]) -> Task:
    return _qa_task(name, convert, hub=f"{FLASHRAG}:{config}", splits=splits)


register(
    _qa_task("rag-qa", convert_with_contexts),
    # FlashRAG's splits: NQ and TriviaQA have a test set; HotpotQA and 2Wiki are evaluated on
    # dev (their test sets are unlabelled); Bamboogle is a single test set.
    _benchmark("nq", "nq", ("train", "test")),
    _benchmark("triviaqa", "triviaqa", ("train", "test")),
    _benchmark("hotpotqa", "hotpotqa", ("train", "dev")),
    _benchmark("2wiki", "2wikimultihopqa", ("train", "dev")),
    _benchmark("bamboogle", "bamboogle", ("test", "test")),
)
