"""Task loaders: read a local file, a directory or a hub dataset and turn each record into an
:class:`hrpo.prompts.Example` whose question is the full user message and whose answer is the
gold string the reward compares against (a list of aliases for retrieval QA).

Each field a converter uses is checked for type and emptiness first. A record that fails is
rejected with a reason, never coerced; rejections are counted by reason in a
:class:`LoadReport` and summarised in one warning (a DataError when nothing is left).

Only the standard library is needed for JSON/JSONL; ``pyarrow`` (parquet) and ``datasets``
(hub names) are imported lazily so the package works without them.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from hrpo.prompts import ANSWER_MARKER, Example

__all__ = ["DataError", "LoadReport", "Raw", "TASKS", "convert_records", "load_task", "load_records", "last_boxed"]


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


class Raw(NamedTuple):
    """One record as read, with where it came from: ``path:line`` in a JSONL file (the
    physical line, blank lines counted) or ``path: record N`` in a JSON list, a parquet
    table or a hub split (N counts from 0, an index into the list or table)."""

    where: str
    record: Any  # a dict when the file is well formed; anything else is rejected later


def _decode(data: bytes, path: str) -> str:
    """UTF-8 text with a leading BOM (as some editors write) dropped; any other undecodable
    byte is an error naming the file and line rather than a bare UnicodeDecodeError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 (save the file as UTF-8)") from None


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _read_jsonl(path: str) -> list[Raw]:
    records = []
    # Split on "\n" only, so line numbers are the ones an editor or `sed -n Np` shows.
    for lineno, line in enumerate(_decode(_read_bytes(path), path).split("\n"), 1):
        if not line.strip():  # tolerate blank lines, e.g. a trailing newline
            continue
        try:
            records.append(Raw(f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
    return records


def _read_json(path: str) -> list[Raw]:
    try:
        data = json.loads(_decode(_read_bytes(path), path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {_kind(data)}")
    return [Raw(f"{path}: record {i}", rec) for i, rec in enumerate(data)]


def _read_parquet(path: str) -> list[Raw]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})".splitlines()[0]) from None
    return [Raw(f"{path}: record {i}", rec) for i, rec in enumerate(rows)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _read_file(path: str) -> list[Raw]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")
    return _READERS[ext](path)


def _read_hub(name: str, split: str) -> list[Raw]:
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
    return [Raw(f"{name}[{split}]: record {i}", dict(r)) for i, r in enumerate(ds)]


def load_records(path: str, split: str = "train") -> tuple[list[Raw], str]:
    """Raw records, each with its location, and the name to cite in errors (the file
    actually read, or the hub name)."""
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


# ---------------------------------------------------------------- field checks


class _Rejected(Exception):
    """A record the converter cannot use; the message is the reason, without the location."""


def _kind(value: Any) -> str:
    """The JSON name of a value's type, as the user reading the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string" if value.strip() else "empty string"  # whitespace only counts as empty
    if isinstance(value, list):
        return "list" if value else "empty list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__  # parquet/hub types with no JSON name (bytes, datetime)


def _expected(name: str, what: str, value: Any) -> _Rejected:
    return _Rejected(f"field {name!r}: expected {what}, got {_kind(value)}")


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _get(obj: dict, key: str, name: str | None = None) -> Any:
    if key not in obj:
        raise _Rejected(f"missing field {name or key!r}")
    return obj[key]


def _text(obj: dict, key: str) -> str:
    value = _get(obj, key)
    if not _is_text(value):
        raise _expected(key, "a non-empty string", value)
    return value


def _options(value: Any, name: str) -> list[str]:
    """A list of 2-10 non-empty strings (MMLU choices, ARC texts and labels)."""
    what = f"a list of 2-{len(LETTERS)} non-empty strings"
    if not isinstance(value, list):
        raise _expected(name, what, value)
    if not 2 <= len(value) <= len(LETTERS):
        raise _Rejected(f"field {name!r}: expected {what}, got a list of {len(value)}")
    for j, item in enumerate(value):
        if not _is_text(item):
            raise _expected(f"{name}[{j}]", "a non-empty string", item)
    return value


# ---------------------------------------------------------------- per-task conversion


_CALC = re.compile(r"<<[^>]*>>")


def _gsm8k(rec: dict) -> Example:
    question = _text(rec, "question")
    solution = _text(rec, "answer")
    if ANSWER_MARKER not in solution:
        raise _Rejected(f"field 'answer': expected a final '{ANSWER_MARKER} N' line, got none")
    reasoning, final = solution.rsplit(ANSWER_MARKER, 1)
    final = final.strip()
    answer = final.replace(",", "")
    if not answer:
        raise _Rejected(f"field 'answer': expected a number after '{ANSWER_MARKER}', got nothing")
    meta = {
        # The worked solution without calculator annotations, usable as an SFT/reference trace.
        "solution": _CALC.sub("", reasoning).strip(),
        "final": final,  # the final answer as written (may contain thousands commas)
    }
    return Example(question=question, answer=answer, meta=meta)


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


def _math(rec: dict) -> Example:
    problem = _text(rec, "problem")
    meta = {k: rec[k] for k in ("level", "type", "subject", "unique_id") if k in rec}
    solution = rec.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise _expected("solution", "a string", solution)
    # A parquet or hub table fills a column a row lacks with null, so null counts as absent.
    if rec.get("answer") is not None:  # MATH-500 form carries the answer explicitly
        answer = _text(rec, "answer")
    elif solution is None:
        raise _Rejected("missing field 'solution' (or 'answer')")
    else:
        answer = last_boxed(solution)
        if answer is None:
            raise _Rejected("field 'solution': expected a \\boxed{} answer, got none")
        if not answer:  # two MATH train items end in a bare \boxed{}: nothing to compare against
            raise _Rejected("field 'solution': expected a \\boxed{} answer, got an empty \\boxed{}")
    if solution is not None:
        meta["solution"] = solution
    # Answers are read from one line after the marker, so a gold answer wrapped over lines
    # (one MATH test answer breaks "square units" over two lines) is joined onto one line.
    answer = re.sub(r"\s*\n\s*", " ", answer).strip()
    return Example(question=problem, answer=answer, meta=meta)


def _mmlu(rec: dict) -> Example:
    question = _text(rec, "question")
    choices = _get(rec, "choices")
    labels: list[str] | None = None
    if isinstance(choices, dict):  # ARC form: {"text": [...], "label": [...]}
        labels = _options(_get(choices, "label", "choices.label"), "choices.label")
        choices = _options(_get(choices, "text", "choices.text"), "choices.text")
        if len(labels) != len(choices):
            raise _Rejected(
                f"field 'choices.label': expected one label per option, got {len(labels)} for {len(choices)}"
            )
    else:
        choices = _options(choices, "choices")  # a string such as "wxyz" is not a list of options
    if "answer" not in rec and "answerKey" not in rec:
        raise _Rejected("missing field 'answer' (or 'answerKey')")
    name = "answerKey" if "answerKey" in rec else "answer"
    key = rec[name]
    n = len(choices)
    # Options are always rendered as A, B, C...; the gold is mapped onto that lettering.
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < n:
        index = key
    elif isinstance(key, str) and labels is not None and key.strip() in labels:  # ARC labels may be "1".."4"
        index = labels.index(key.strip())
    elif isinstance(key, str) and len(key.strip()) == 1 and key.strip().upper() in LETTERS[:n]:
        index = LETTERS.index(key.strip().upper())
    else:
        what = f"an index 0-{n - 1} or a letter A-{LETTERS[n - 1]}"
        what += f" or a label {'/'.join(labels)}" if labels else ""
        shown = f"{key!r:.20}" if isinstance(key, (int, str)) and not isinstance(key, bool) else _kind(key)
        raise _Rejected(f"field {name!r}: expected {what}, got {shown}")
    rendered = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
    meta = {k: rec[k] for k in ("subject", "type", "id") if k in rec}
    return Example(question=f"{question}\n{rendered}", answer=LETTERS[index], meta=meta)


def _passage(ctx: Any, name: str) -> str:
    """One context: a string, or an object {title, text} ({title, contents} in FlashRAG's form)."""
    if _is_text(ctx):
        return ctx
    if not isinstance(ctx, dict):
        raise _expected(name, "a non-empty string or an object with 'text'", ctx)
    text = ctx.get("text", ctx.get("contents"))
    if not _is_text(text):
        raise _expected(f"{name}.text", "a non-empty string", text)
    title = ctx.get("title")
    if title is not None and not isinstance(title, str):
        raise _expected(f"{name}.title", "a string", title)
    return f"({title}) {text}" if title else text


def _rag_qa(rec: dict) -> Example:
    question = _text(rec, "question")
    contexts = _get(rec, "contexts")
    golden = _get(rec, "golden_answers")
    if _is_text(golden):
        golden = [golden]
    elif isinstance(golden, list) and golden:
        for j, alias in enumerate(golden):
            if not _is_text(alias):  # an empty alias would match an empty prediction
                raise _expected(f"golden_answers[{j}]", "a non-empty string", alias)
    else:
        raise _expected("golden_answers", "a non-empty string or a non-empty list of non-empty strings", golden)
    if isinstance(contexts, list):
        docs = [_passage(ctx, f"contexts[{j}]") for j, ctx in enumerate(contexts)]
    elif isinstance(contexts, (str, dict)):  # a single passage
        docs = [_passage(contexts, "contexts")]
    else:
        raise _expected("contexts", "a list of passages or a string", contexts)
    listed = "\n".join(f"[{j}] {doc}" for j, doc in enumerate(docs, 1))
    message = f"{listed}\n\nQuestion: {question}" if docs else question
    return Example(question=message, answer=golden, meta={"question": question})


_CONVERTERS: dict[str, Callable[[dict], Example]] = {
    "gsm8k": _gsm8k,
    "math": _math,
    "mmlu": _mmlu,
    "rag-qa": _rag_qa,
}
TASKS = tuple(_CONVERTERS)


@dataclass
class LoadReport:
    """What converting a source kept and rejected: rejections counted by reason, with the
    location of the first record rejected for each reason."""

    source: str
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_at: dict[str, str] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    @property
    def total(self) -> int:
        return self.kept + self.rejected

    def reject(self, reason: str, where: str) -> None:
        self.reasons[reason] += 1
        self.first_at.setdefault(reason, where)

    def summary(self) -> str:
        """One line: ``{source}: kept K of N records; rejected R: C x <reason> (first at <where>); ...``."""
        line = f"{self.source}: kept {self.kept} of {self.total} records"
        if not self.rejected:
            return line
        groups = "; ".join(
            f"{n} x {reason} (first at {self.first_at[reason]})" for reason, n in self.reasons.most_common()
        )
        return f"{line}; rejected {self.rejected}: {groups}"


def convert_records(
    task: str, records: list[Raw], source: str, limit: int | None = None
) -> tuple[list[Example], LoadReport]:
    """Examples for ``task`` from located raw records (stopping once ``limit`` are kept) and the
    report of what was rejected; a record that fails a check is rejected, never coerced.
    ``task`` is one of :data:`TASKS`."""
    convert = _CONVERTERS[task]
    report = LoadReport(source)
    examples = []
    for where, rec in records:
        if limit is not None and len(examples) >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise _Rejected(f"expected a JSON object, got {_kind(rec)}")
            examples.append(convert(rec))
        except _Rejected as reason:
            report.reject(str(reason), where)
    report.kept = len(examples)
    return examples, report


def load_task(task: str, path: str | None = None, split: str = "train", limit: int | None = None) -> list[Example]:
    """Load ``task`` from ``path`` (.jsonl/.json/.parquet file, a directory holding
    ``{split}.jsonl``/``{split}.parquet``, or a hub name), keeping the first ``limit`` usable
    records. Rejected records are summarised in one warning; if none is usable, a DataError."""
    if task not in _CONVERTERS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if path is None:
        if task not in DEFAULT_HUB:
            raise DataError(f"task {task!r} has no default dataset; pass a path")
        path = DEFAULT_HUB[task]
    records, source = load_records(os.fspath(path), split)
    examples, report = convert_records(task, records, source, limit)
    if report.rejected and not examples:
        raise DataError(report.summary())
    if report.rejected:
        warnings.warn(report.summary(), stacklevel=2)
    return examples
