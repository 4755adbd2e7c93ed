"""Retrieval-augmented QA: questions with passages and a list of golden answers.

Asked as the paper asks it: the top 3 passages under `Context (which may or may not be
relevant):`, each as `title::::text` on its own line, a blank line, then `Question: ...`.
The answer is the first line after the marker, scored by SQuAD-style normalised exact match
against any golden answer; an answer that normalises to nothing matches nothing.
"""
from __future__ import annotations

import re
import string
from typing import Any

from hrpo.data import expected, get_field, is_text, text_field
from hrpo.prompts import Example

from .base import Task, first_line, register, unwrap

TOP_K = 3  # passages shown, as in the paper


def passage(ctx: Any, name: str) -> dict:
    """One context: a string, or an object {title, text} ({title, contents} in FlashRAG's form)."""
    if is_text(ctx):
        return {"title": "", "text": ctx}
    if not isinstance(ctx, dict):
        raise expected(name, "a non-empty string or an object with 'text'", ctx)
    text = ctx.get("text", ctx.get("contents"))
    if not is_text(text):
        raise expected(f"{name}.text", "a non-empty string", text)
    title = ctx.get("title")
    if title is not None and not isinstance(title, str):
        raise expected(f"{name}.title", "a string", title)
    return {"title": title or "", "text": text}


def golden_answers(value: Any, name: str) -> list[str]:
    if is_text(value):
        return [value]
    if isinstance(value, list) and value:
        for j, alias in enumerate(value):
            if not is_text(alias):  # an empty alias would match an empty prediction
                raise expected(f"{name}[{j}]", "a non-empty string", alias)
        return list(value)
    raise expected(name, "a non-empty string or a non-empty list of non-empty strings", value)


def convert(rec: dict) -> Example:
    question = text_field(rec, "question")
    contexts = get_field(rec, "contexts")
    golden = golden_answers(get_field(rec, "golden_answers"), "golden_answers")
    if isinstance(contexts, list):
        docs = [passage(ctx, f"contexts[{j}]") for j, ctx in enumerate(contexts)]
    elif isinstance(contexts, (str, dict)):  # a single passage
        docs = [passage(contexts, "contexts")]
    else:
        raise expected("contexts", "a list of passages or a string", contexts)
    return Example(question=question, answer=golden, contexts=docs)


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


def exact_match(pred: str, gold) -> float:
    aliases = [gold] if isinstance(gold, str) else list(gold)
    pred = normalize_qa(pred)
    # An answer that normalises to nothing ("The", ".") matches nothing, not every empty alias.
    return float(bool(pred) and any(pred == normalize_qa(a) for a in aliases))


register(Task("rag-qa", recipe="rag-qa", convert=convert, render=render, read=read_span, score=exact_match,
              metric="exact_match"))
