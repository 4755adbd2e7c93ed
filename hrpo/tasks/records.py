"""Reading task data: a local file, a directory or a hub dataset, each record kept with where
it came from and turned into an :class:`hrpo.core.prompts.Example` by its task's converter
(hrpo.tasks: one module per benchmark family; hrpo.tasks.registry applies it).

Each field a converter uses is checked for type and emptiness first (the checks below). A
record that fails is rejected with a reason, never coerced; rejections are counted by reason
in a :class:`LoadReport` and summarised in one warning (a DataError when nothing is left).

Only the standard library is needed for JSON/JSONL; ``pyarrow`` (parquet) and ``datasets``
(hub names) are imported lazily so the package works without them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hrpo.core.errors import error_line
from hrpo.core.prompts import Example


class DataError(ValueError):
    """A one-line, user-facing problem with the input data (file, line or record named)."""


MAX_OPTIONS = 10  # multiple-choice options, lettered A-J


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
        raise DataError(f"{path}: expected a JSON list of objects, got {kind(data)}")
    return [Raw(f"{path}: record {i}", rec) for i, rec in enumerate(data)]


def _read_parquet(path: str) -> list[Raw]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {error_line(e)})") from None
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
        raise DataError(f"{name!r} is not a local path and loading hub datasets needs `pip install datasets`") from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # network, missing split, unknown repo: keep it to one line
        raise DataError(
            f"{name}: cannot load split {split!r} from the hub ({type(e).__name__}: {error_line(e)})"
        ) from None
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


class Rejected(Exception):
    """A record the converter cannot use; the message is the reason, without the location."""


def kind(value: Any) -> str:
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


def expected(name: str, what: str, value: Any) -> Rejected:
    return Rejected(f"field {name!r}: expected {what}, got {kind(value)}")


def is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def field_path(name: str, key: str) -> str:
    """How a nested field is named in a rejection: `contexts[0].title`."""
    return f"{name}.{key}" if name else key


def given(obj: dict, key: str) -> bool:
    """An optional field counts only when not null (a table fills a missing column with null)."""
    return obj.get(key) is not None


def get_field(obj: dict, key: str, name: str | None = None) -> Any:
    if key not in obj:
        raise Rejected(f"missing field {name or key!r}")
    return obj[key]


def text_field(obj: dict, key: str) -> str:
    value = get_field(obj, key)
    if not is_text(value):
        raise expected(key, "a non-empty string", value)
    return value


def options_field(value: Any, name: str) -> list[str]:
    """A list of 2-10 non-empty strings (MMLU choices, ARC texts and labels)."""
    what = f"a list of 2-{MAX_OPTIONS} non-empty strings"
    if not isinstance(value, list):
        raise expected(name, what, value)
    if not 2 <= len(value) <= MAX_OPTIONS:
        raise Rejected(f"field {name!r}: expected {what}, got a list of {len(value)}")
    for j, item in enumerate(value):
        if not is_text(item):
            raise expected(f"{name}[{j}]", "a non-empty string", item)
    return value


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


# ---------------------------------------------------------------- the project's own record form

PREPARED = "hrpo_task"  # marks a record written by `python -m hrpo.data prepare`; its value names the task


def prepared_record(ex: Example, task: str) -> dict:
    """An Example as a JSON record of the project's own form (what `prepare` writes)."""
    rec = {PREPARED: task, "question": ex.question, "answer": ex.answer}
    for name in ("choices", "contexts"):
        if getattr(ex, name) is not None:
            rec[name] = getattr(ex, name)
    if ex.meta:
        rec["meta"] = ex.meta
    return rec
