"""Task loaders: read a local file, a directory or a hub dataset and turn each record into an
:class:`hrpo.prompts.Example` whose question is the full user message and whose answer is the
gold string the reward compares against (a list of aliases for retrieval QA).

Only the standard library is needed for JSON/JSONL; ``pyarrow`` (parquet) and ``datasets``
(hub names) are imported lazily so the package works without them.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Callable

from hrpo.prompts import ANSWER_MARKER, Example

__all__ = ["DataError", "TASKS", "load_task", "load_records", "last_boxed"]


class DataError(ValueError):
    """A one-line, user-facing problem with the input data (file, line or record named)."""


# Hub names used when no path is given; "name:config" selects a dataset configuration.
DEFAULT_HUB = {
    "gsm8k": "openai/gsm8k:main",
    "math": "DigitalLearningGmbH/MATH-lighteval",
    "mmlu": "cais/mmlu:all",
}

LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------- reading raw records


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():  # tolerate blank lines, e.g. a trailing newline
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})".splitlines()[0]) from None


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _read_file(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")
    return _READERS[ext](path)


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets  # optional dependency, only for hub names
    except ImportError:
        raise DataError(
            f"{name!r} is not a local path and loading hub datasets needs `pip install datasets`"
        ) from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # network, missing split, unknown repo: keep it to one line
        raise DataError(f"{name}: cannot load split {split!r} from the hub ({type(e).__name__}: {e})".splitlines()[0]) from None
    return [dict(r) for r in ds]


def load_records(path: str, split: str = "train") -> tuple[list[dict], str]:
    """Raw records and the name to cite in errors (the file actually read, or the hub name)."""
    if os.path.isdir(path):
        for ext in (".jsonl", ".parquet", ".json"):
            candidate = os.path.join(path, split + ext)
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise DataError(f"{path}: no {split}.jsonl or {split}.parquet in this directory")
    if os.path.isfile(path):
        records, source = _read_file(path), path
    elif path.lower().endswith(tuple(_READERS)) or path.startswith((".", "/", "~")):
        # Looks like a file path, not a hub name: say so instead of asking the hub.
        raise DataError(f"{path}: no such file")
    else:
        records, source = _read_hub(path, split), f"{path}[{split}]"
    if not records:
        raise DataError(f"{source}: dataset is empty")
    return records, source


# ---------------------------------------------------------------- per-task conversion


def _field(rec: dict, name: str, source: str, index: int) -> Any:
    if name not in rec or rec[name] is None:
        raise DataError(f"{source}: record {index}: missing field {name!r}")
    return rec[name]


_CALC = re.compile(r"<<[^>]*>>")


def _gsm8k(rec: dict, source: str, i: int) -> Example:
    question = _field(rec, "question", source, i)
    solution = _field(rec, "answer", source, i)
    if ANSWER_MARKER not in solution:
        raise DataError(f"{source}: record {i}: field 'answer' has no '{ANSWER_MARKER} N' line")
    reasoning, final = solution.rsplit(ANSWER_MARKER, 1)
    final = final.strip()
    meta = {
        # The worked solution without calculator annotations, usable as an SFT/reference trace.
        "solution": _CALC.sub("", reasoning).strip(),
        "final": final,  # the final answer as written (may contain thousands commas)
    }
    return Example(question=question, answer=final.replace(",", ""), meta=meta)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of the
    brace-less ``\\boxed 5`` form; None when there is none."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    pos = starts[-1].end()
    rest = text[pos:].lstrip()
    if not rest.startswith("{"):
        # "\boxed 2" form: the answer runs to the next space, $ or end.
        m = re.match(r"[^\s$]+", rest)
        return m.group(0).rstrip(".") if m else None
    depth = 0
    for j, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:j].strip()
    return None  # unbalanced braces


def _math(rec: dict, source: str, i: int) -> Example:
    problem = _field(rec, "problem", source, i)
    meta = {k: rec[k] for k in ("level", "type", "subject", "unique_id") if k in rec}
    if rec.get("answer") not in (None, ""):  # MATH-500 form carries the answer explicitly
        answer = str(rec["answer"])
        if "solution" in rec:
            meta["solution"] = rec["solution"]
    else:
        solution = _field(rec, "solution", source, i)
        answer = last_boxed(solution)
        if answer is None:
            raise DataError(f"{source}: record {i}: field 'solution' has no \\boxed{{...}} answer")
        meta["solution"] = solution
    # Answers are read from one line after the marker, so a gold answer wrapped over lines
    # (one MATH test answer breaks "square units" over two lines) is joined onto one line.
    answer = re.sub(r"\s*\n\s*", " ", answer).strip()
    return Example(question=problem, answer=answer, meta=meta)


def _mmlu(rec: dict, source: str, i: int) -> Example:
    question = _field(rec, "question", source, i)
    choices = _field(rec, "choices", source, i)
    labels: list[str] | None = None
    if isinstance(choices, dict):  # ARC form: {"text": [...], "label": [...]}
        labels = [str(x) for x in _field(choices, "label", source, i)]
        choices = _field(choices, "text", source, i)
    choices = [str(c) for c in choices]
    if not 2 <= len(choices) <= len(LETTERS):
        raise DataError(f"{source}: record {i}: field 'choices' has {len(choices)} options")
    key = rec.get("answerKey", rec.get("answer"))
    if key is None:
        raise DataError(f"{source}: record {i}: missing field 'answer' (or 'answerKey')")
    # Options are always rendered as A, B, C...; the gold is mapped onto that lettering.
    if isinstance(key, int) and not isinstance(key, bool):
        index = key
    elif labels is not None and str(key).strip() in labels:  # ARC labels may be "1".."4"
        index = labels.index(str(key).strip())
    elif str(key).strip().upper() in LETTERS[: len(choices)] and len(str(key).strip()) == 1:
        index = LETTERS.index(str(key).strip().upper())
    elif str(key).strip().isdigit():
        index = int(str(key).strip())
    else:
        raise DataError(f"{source}: record {i}: cannot read answer {key!r} as an option")
    if not 0 <= index < len(choices):
        raise DataError(f"{source}: record {i}: answer {key!r} out of range for {len(choices)} options")
    rendered = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
    meta = {k: rec[k] for k in ("subject", "type", "id") if k in rec}
    return Example(question=f"{question}\n{rendered}", answer=LETTERS[index], meta=meta)


def _rag_qa(rec: dict, source: str, i: int) -> Example:
    question = _field(rec, "question", source, i)
    contexts = _field(rec, "contexts", source, i)
    golden = _field(rec, "golden_answers", source, i)
    golden = [golden] if isinstance(golden, str) else [str(g) for g in golden]
    if not golden:
        raise DataError(f"{source}: record {i}: field 'golden_answers' is empty")
    docs = []
    for j, ctx in enumerate([contexts] if isinstance(contexts, (str, dict)) else contexts, 1):
        if isinstance(ctx, dict):
            title, text = ctx.get("title", ""), ctx.get("text", ctx.get("contents", ""))
            ctx = f"({title}) {text}" if title else str(text)
        docs.append(f"[{j}] {ctx}")
    message = ("\n".join(docs) + f"\n\nQuestion: {question}") if docs else question
    return Example(question=message, answer=golden, meta={"question": question})


_CONVERTERS: dict[str, Callable[[dict, str, int], Example]] = {
    "gsm8k": _gsm8k,
    "math": _math,
    "mmlu": _mmlu,
    "rag-qa": _rag_qa,
}
TASKS = tuple(_CONVERTERS)


def load_task(task: str, path: str | None = None, split: str = "train", limit: int | None = None) -> list[Example]:
    """Load ``task`` from ``path`` (.jsonl/.json/.parquet file, a directory holding
    ``{split}.jsonl``/``{split}.parquet``, or a hub name), keeping the first ``limit`` records."""
    if task not in _CONVERTERS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if path is None:
        if task not in DEFAULT_HUB:
            raise DataError(f"task {task!r} has no default dataset; pass a path")
        path = DEFAULT_HUB[task]
    records, source = load_records(os.fspath(path), split)
    if limit is not None:
        records = records[: max(limit, 0)]
    convert = _CONVERTERS[task]
    examples = [convert(rec, source, i) for i, rec in enumerate(records)]
    # A gold answer that is empty (two MATH train items have a bare \boxed{}) can never be
    # matched; such items would only waste rollouts, so they are dropped with a warning.
    kept = [ex for ex in examples if ex.answer not in ("", [])]
    if len(kept) < len(examples):
        warnings.warn(f"{source}: skipped {len(examples) - len(kept)} record(s) with an empty gold answer")
    if examples and not kept:
        raise DataError(f"{source}: no record has a usable gold answer")
    return kept
