"""The task registry and what needs it: a task by name, and loading its examples (a file, a
folder, a hub dataset or the embedded generator), each record converted by its task."""

from __future__ import annotations

import os
import warnings

from hrpo.core.prompts import Example
from hrpo.tasks import arith, choice, gsm8k, math, qa  # noqa: F401  (each registers its tasks)
from hrpo.tasks.base import REGISTRY, Task
from hrpo.tasks.records import (
    PREPARED,
    DataError,
    LoadReport,
    Raw,
    Rejected,
    expected,
    get_field,
    is_text,
    kind,
    load_records,
    options_field,
    text_field,
)
from hrpo.tasks.synthetic import synthetic_split

ARITH_TRAIN_SIZE = 20000
ARITH_TEST_SIZE = 500


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def task_names() -> list[str]:
    return sorted(REGISTRY)


def load_examples(cfg, split: str, path: str | None = None, limit: int | None = None):
    """The examples of cfg.task's split: generated for the embedded task, else loaded from
    `path` (or cfg.data; without either, the task's hub dataset)."""
    if cfg.task == "arith":
        n = limit or (ARITH_TRAIN_SIZE if split == "train" else ARITH_TEST_SIZE)
        return synthetic_split(split, n, seed=0)
    source = path or cfg.data
    if source is None:  # the hub dataset, whose splits the task names
        task = get_task(cfg.task)
        source, split = task.hub, task.splits[split != "train"]
    return load_task(cfg.task, source, split=split, limit=limit)


def user_messages(task: str, examples) -> list[str]:
    """The user turn of each example, as the task asks it."""
    render = get_task(task).render
    return [render(ex) for ex in examples]


def from_prepared(rec: dict, task: str) -> Example:
    """A record of the project's form, every field checked like a source's."""
    made_for = rec[PREPARED]
    if (
        not isinstance(made_for, str)
        or made_for not in task_names()
        or get_task(made_for).recipe != get_task(task).recipe
    ):
        raise Rejected(
            f"field {PREPARED!r}: expected a task of the {get_task(task).recipe} family, got {made_for!r:.40}"
        )
    question = text_field(rec, "question")
    answer = get_field(rec, "answer")
    if not (is_text(answer) or (isinstance(answer, list) and answer and all(is_text(a) for a in answer))):
        raise expected("answer", "a non-empty string or a list of non-empty strings", answer)
    choices = options_field(rec["choices"], "choices") if rec.get("choices") is not None else None
    contexts = rec.get("contexts")
    if contexts is not None:
        if not isinstance(contexts, list):
            raise expected("contexts", "a list of passages", contexts)
        for j, c in enumerate(contexts):
            if not (isinstance(c, dict) and is_text(c.get("text")) and isinstance(c.get("title", ""), str)):
                raise expected(f"contexts[{j}]", "an object with a non-empty 'text' and a string 'title'", c)
        contexts = [{**c, "title": c.get("title", "")} for c in contexts]
    meta = rec.get("meta", {})
    if not isinstance(meta, dict):
        raise expected("meta", "an object", meta)
    return Example(question=question, answer=answer, choices=choices, contexts=contexts, meta=meta)


def convert_records(
    task: str, records: list[Raw], source: str, limit: int | None = None
) -> tuple[list[Example], LoadReport]:
    """Examples for ``task`` (a name in hrpo.tasks) from located raw records (stopping once
    ``limit`` are kept) and the report of what was rejected; a record that fails a check is
    rejected, never coerced. Records of the project's own form are read as such."""
    convert = get_task(task).convert
    report = LoadReport(source)
    examples = []
    for where, rec in records:
        if limit is not None and len(examples) >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise Rejected(f"expected a JSON object, got {kind(rec)}")
            examples.append(from_prepared(rec, task) if PREPARED in rec else convert(rec))
        except Rejected as reason:
            report.reject(str(reason), where)
    report.kept = len(examples)
    return examples, report


def load_task(task: str, path: str | None = None, split: str = "train", limit: int | None = None) -> list[Example]:
    """Load ``task`` from ``path`` (.jsonl/.json/.parquet file, a directory holding
    ``{split}.jsonl``/``{split}.parquet``, or a hub name; None: the task's hub dataset),
    keeping the first ``limit`` usable records. Rejected records are summarised in one
    warning; if none is usable, a DataError."""
    spec = get_task(task)
    if spec.convert is None:
        raise DataError(f"task {task!r} is generated, not loaded from data")
    if path is None:
        if spec.hub is None:
            raise DataError(f"task {task!r} has no default dataset; pass a path")
        path = spec.hub
    records, source = load_records(os.fspath(path), split)
    examples, report = convert_records(task, records, source, limit)
    if report.rejected and not examples:
        raise DataError(report.summary())
    if report.rejected:
        warnings.warn(report.summary(), stacklevel=2)
    return examples
